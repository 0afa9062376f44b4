"""The seeds loader: JSON files of rows, loaded idempotently, one transaction per file.

A seed file is a JSON object mapping table names to lists of records::

    {"org": [{"id": "...", "name": "Demo Travel", "slug": "demo"}],
     "destination": [{"org_id": "...", "id": "...", "name": "Lisbon"}],
     "embedding": [{"org_id": "...", "id": "...", "knowledge_item_id": "...",
                    "content": "..."}]}

Every record names its primary key, so a second load finds each row present and writes
nothing (``ON CONFLICT (primary key) DO NOTHING``). An embedding without ``vector`` gets one
from the embedder. The whole file is checked before any SQL runs (size, nesting depth,
duplicate keys, the same primary key twice, unknown tables and fields, values); a row the
database refuses (a reference to a missing row, a duplicate natural key) rolls the whole
file back. An application's own ``TenantModel`` subclasses are seedable by their table
names once their module is imported, after the package's tables and parents first.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import peewee
from pgvector.peewee import VectorField

from .context import cross_org
from .db import database
from .embedder import Embedder, default_embedder
from .errors import SeedError
from .models import (
    EMBEDDING_DIMENSIONS,
    AgentRun,
    Destination,
    Embedding,
    IdempotencyKey,
    Itinerary,
    KnowledgeItem,
    Org,
    RefreshToken,
    User,
)
from .tenancy import BaseModel, TenantForeignKey, TenantModel
from .validation import (
    check_int,
    check_text,
    check_uuid,
    check_vector,
    parse_aware_datetime,
    parse_date,
)

__all__ = [
    "DEMO_SEEDS",
    "MAX_SEED_DEPTH",
    "MAX_SEED_FILE_BYTES",
    "SEED_TABLES",
    "SeedCounts",
    "SeedReport",
    "load_seed_file",
    "load_seeds",
    "seed_tables",
]

#: The demo seeds shipped in the package (``tenantdb seed --demo``).
DEMO_SEEDS = Path(__file__).parent / "demo_seeds"
#: The deepest nesting of arrays and objects a seed file may hold (the file's object is
#: level 1, a table's list 2, a record 3); checked before parsing, so a hostile file meets
#: this limit and never the parser's recursion limit.
MAX_SEED_DEPTH = 64
#: The largest seed file read, in bytes.
MAX_SEED_FILE_BYTES = 64 * 1024 * 1024
# A JSON string (escapes included) or a bracket: what the depth scan needs to see.
_JSON_TOKEN_RE = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')

# Parents before children, so a file may reference rows it creates itself.
#: The package's tables; :func:`seed_tables` adds the application's.
SEED_TABLES: dict[str, type[BaseModel]] = {
    model._meta.table_name: model
    for model in (Org, User, RefreshToken, Destination, KnowledgeItem, Embedding, AgentRun,
                  Itinerary, IdempotencyKey)
}


@dataclass
class SeedCounts:
    """Rows of one table: inserted by this load, and found already present."""

    created: int = 0
    present: int = 0


@dataclass
class SeedReport:
    """What a load did, per table, over every file it read."""

    files: list[Path] = field(default_factory=list)
    tables: dict[str, SeedCounts] = field(default_factory=dict)

    @property
    def created(self) -> int:
        return sum(c.created for c in self.tables.values())

    @property
    def present(self) -> int:
        return sum(c.present for c in self.tables.values())

    def _count(self, table: str, created: bool) -> None:
        counts = self.tables.setdefault(table, SeedCounts())
        if created:
            counts.created += 1
        else:
            counts.present += 1


def load_seeds(path: Path | str, /, *, embedder: Embedder | None = None) -> SeedReport:
    """Load one seed file, or every ``*.json`` in a folder (in name order).

    :param embedder: makes the vectors of embeddings that have none (default: hashing).
    :raises SeedError: a bad file; it names the file and the record, and nothing from that
        file is written (files loaded before it stay loaded).
    """
    path = Path(path)
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files:
        raise SeedError(f"{path}: no *.json seed files")
    report = SeedReport()
    for file in files:
        load_seed_file(file, embedder=embedder, report=report)
    return report


def load_seed_file(
    file: Path, /, *, embedder: Embedder | None = None, report: SeedReport | None = None
) -> SeedReport:
    """Load one seed file in one transaction; see :func:`load_seeds`."""
    report = report if report is not None else SeedReport()
    tables = seed_tables()
    rows = _read(file, embedder or default_embedder(), tables)
    with cross_org(reason=f"seed load {file.name}"), database.atomic():
        for table, index, row in rows:
            report._count(table, _insert(file, tables[table], index, row))
    report.files.append(file)
    return report


def seed_tables() -> dict[str, type[BaseModel]]:
    """Every seedable table and its model, parents before children: the package's, then
    the application's ``TenantModel`` subclasses imported so far.

    :raises SeedError: two application models claim one table.
    """
    tables = dict(SEED_TABLES)
    claims: dict[str, list[type[TenantModel]]] = {}
    for model in _tenant_models(TenantModel):
        name = model._meta.table_name
        if name not in tables and model not in claims.get(name, []):
            claims.setdefault(name, []).append(model)
    for name, models in claims.items():
        if len(models) > 1:
            listed = ", ".join(f"{m.__module__}.{m.__name__}" for m in models)
            raise SeedError(f"table {name} has several models ({listed}): seeds need one")
    pending = {name: models[0] for name, models in claims.items()}
    while pending:  # parents first; a cycle keeps its definition order
        ready = [name for name, model in pending.items()
                 if not any(dep in pending and dep != name for dep in _parents(model))]
        for name in ready or list(pending)[:1]:
            tables[name] = pending.pop(name)
    return tables


def _tenant_models(base: type[TenantModel]) -> Iterable[type[TenantModel]]:
    for sub in base.__subclasses__():
        if not sub.__dict__.get("_tenantdb_abstract"):
            yield sub
        yield from _tenant_models(sub)


def _parents(model: type[BaseModel]) -> list[str]:
    return [f.rel_model._meta.table_name for f in model._meta.sorted_fields
            if isinstance(f, TenantForeignKey)]


def _insert(file: Path, model: type[BaseModel], index: int, row: dict[str, Any]) -> bool:
    pk = _pk_fields(model)
    query = model.insert(**row).on_conflict(action="IGNORE", conflict_target=pk)
    try:
        with database.atomic():  # a savepoint, so the error names this record only
            return bool(query.as_rowcount().execute())
    except peewee.DatabaseError as exc:
        detail = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        raise SeedError(f"{file}: {_where(model, index, row)}: {detail}") from exc


class _Object(dict[str, Any]):
    """A parsed JSON object that remembers the keys it was given more than once."""

    duplicates: list[str]


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object()
    obj.duplicates = []
    for key, value in pairs:
        if key in obj:
            obj.duplicates.append(key)
        obj[key] = value
    return obj


def _parse(file: Path) -> Any:
    try:
        size = file.stat().st_size
        if size > MAX_SEED_FILE_BYTES:
            raise SeedError(f"{file}: {size} bytes, over the limit of {MAX_SEED_FILE_BYTES} "
                            "bytes for a seed file (MAX_SEED_FILE_BYTES): split it")
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SeedError(f"{file}: not a readable JSON file: {exc}") from exc
    depth = 0
    for token in _JSON_TOKEN_RE.finditer(text):
        char = token.group()
        if char in "[{":
            depth += 1
            if depth > MAX_SEED_DEPTH:
                raise SeedError(f"{file}: nested deeper than {MAX_SEED_DEPTH} levels, the "
                                "limit for seed values (MAX_SEED_DEPTH)")
        elif char in "]}":
            depth -= 1
    try:
        return json.loads(text, object_pairs_hook=_object)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise SeedError(f"{file}: not a readable JSON file: {exc}") from None


def _read(file: Path, embedder: Embedder, tables: dict[str, type[BaseModel]]
          ) -> list[tuple[str, int, dict[str, Any]]]:
    data = _parse(file)
    if not isinstance(data, dict):
        raise SeedError(f"{file}: a seed file is a JSON object of table name -> list of rows")
    if isinstance(data, _Object) and data.duplicates:
        raise SeedError(f"{file}: table {data.duplicates[0]!r} appears twice: "
                        "give each table one list")
    unknown = sorted(set(data) - set(tables))
    if unknown:
        raise SeedError(f"{file}: unknown table {unknown[0]!r}; known: {', '.join(tables)} "
                        "(an application's models are known once their module is imported)")
    rows = []
    for table, model in tables.items():  # dependency order, whatever the file's order
        records = data.get(table, [])
        if not isinstance(records, list):
            raise SeedError(f"{file}: {table} must be a list of records")
        seen: dict[tuple[Any, ...], int] = {}
        for index, record in enumerate(records):
            row = _check(file, model, index, record, embedder)
            key = tuple(row[name] for name in _pk_names(model))
            if key in seen:
                raise SeedError(f"{file}: {_where(model, index, row)}: the same primary key "
                                f"as {table}[{seen[key]}]; each row appears once")
            seen[key] = index
            rows.append((table, index, row))
    return rows


def _check(file: Path, model: type[BaseModel], index: int, record: object,
           embedder: Embedder) -> dict[str, Any]:
    table = model._meta.table_name
    where = f"{file}: {table}[{index}]"
    if not isinstance(record, dict):
        raise SeedError(f"{where}: a record is a JSON object")
    if isinstance(record, _Object) and record.duplicates:
        raise SeedError(f"{where}: field {record.duplicates[0]!r} appears twice")
    unknown = sorted(set(record) - set(model._meta.fields))
    if unknown:
        raise SeedError(f"{where}: unknown field {unknown[0]!r} for {table}")
    missing = [name for name in _pk_names(model) if record.get(name) in (None, "")]
    if missing:
        raise SeedError(f"{where}: {missing[0]!r} is required (seeds name their keys)")
    row = {name: _coerce(where, model._meta.fields[name], value)
           for name, value in record.items()}
    if model is Embedding:
        _fill_vector(where, row, embedder)
    return row


def _fill_vector(where: str, row: dict[str, Any], embedder: Embedder) -> None:
    if "vector" not in row:
        if embedder.dimensions != EMBEDDING_DIMENSIONS:
            raise SeedError(f"{where}: the embedder makes {embedder.dimensions} dimensions, "
                            f"embedding.vector has {EMBEDDING_DIMENSIONS}")
        row["vector"] = embedder.embed([str(row.get("content", ""))])[0]
        row.setdefault("model", embedder.name)


def _coerce(where: str, fld: peewee.Field, value: Any) -> Any:
    if value is None:
        if not fld.null:
            raise SeedError(f"{where}: {fld.name} may not be null")
        return None
    try:
        return _coercer(fld)(value, fld.name)
    except ValueError as exc:  # the message names the field, the rule and the value
        raise SeedError(f"{where}: {exc}") from None


def _as_is(value: Any, name: str) -> Any:
    return value


def _as_text(value: Any, name: str) -> str:
    return check_text(value, name, allow_empty=True)


def _int_within(bits: int) -> Callable[[Any, str], int]:
    """A coercer to the signed integers of a ``bits``-bit column: larger values are refused
    here, with the record named, instead of by the server."""
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return lambda value, name: check_int(value, name, minimum=low, maximum=high)


def _as_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def _as_vector(value: Any, name: str) -> list[float]:
    # The rule search_knowledge applies: a zero or float32-overflowing vector would give
    # NaN distances once stored.
    return check_vector(value, name, dimensions=EMBEDDING_DIMENSIONS).tolist()


def _as_datetime(value: Any, name: str) -> datetime:
    # timestamptz: a naive time would be read in the server's zone, so the offset is required.
    return parse_aware_datetime(value, name)


# JSON fields take any JSON value as it is. Looked up along each field class's MRO, so the
# most specific entry wins (BigIntegerField before IntegerField).
_COERCE: dict[type[peewee.Field], Callable[[Any, str], Any]] = {
    peewee.UUIDField: check_uuid,
    peewee.TextField: _as_text,
    peewee.CharField: _as_text,
    peewee.SmallIntegerField: _int_within(16),
    peewee.IntegerField: _int_within(32),
    peewee.BigIntegerField: _int_within(64),
    peewee.BigAutoField: _int_within(64),
    peewee.BooleanField: _as_bool,
    peewee.DateTimeField: _as_datetime,
    peewee.DateField: parse_date,
    VectorField: _as_vector,
}


def _coercer(fld: peewee.Field) -> Callable[[Any, str], Any]:
    for cls in type(fld).__mro__:
        if cls in _COERCE:
            return _COERCE[cls]
    return _as_is


def _pk_fields(model: type[BaseModel]) -> list[peewee.Field]:
    # Peewee's key fields, in the CompositeKey's order (the table's PRIMARY KEY order).
    return list(model._meta.get_primary_keys())  # type: ignore[no-untyped-call]


def _pk_names(model: type[BaseModel]) -> list[str]:
    return [field.name for field in _pk_fields(model)]


def _where(model: type[BaseModel], index: int, row: dict[str, Any]) -> str:
    key = ", ".join(f"{name}={row.get(name)}" for name in _pk_names(model))
    return f"{model._meta.table_name}[{index}] ({key})"

