"""The seeds loader: JSON files of rows, loaded idempotently, one transaction per file.

A seed file is a JSON object mapping table names to lists of records::

    {"org": [{"id": "...", "name": "Demo Travel", "slug": "demo"}],
     "destination": [{"org_id": "...", "id": "...", "name": "Lisbon"}],
     "embedding": [{"org_id": "...", "id": "...", "knowledge_item_id": "...",
                    "content": "..."}]}

Every record names its primary key, so a second load finds each row present and writes
nothing (``ON CONFLICT (primary key) DO NOTHING``). An embedding without ``vector`` gets one
from the embedder. The whole file is checked before any SQL runs; a row the database refuses
(a reference to a missing row, a duplicate natural key) rolls the whole file back.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

import peewee
from pgvector.peewee import VectorField

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
from .tenancy import BaseModel, cross_org

__all__ = ["SEED_TABLES", "SeedCounts", "SeedReport", "load_seed_file", "load_seeds"]

# Parents before children, so a file may reference rows it creates itself.
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
    rows = _read(file, embedder or default_embedder())
    with cross_org(reason=f"seed load {file.name}"), database.atomic():
        for table, index, row in rows:
            report._count(table, _insert(file, table, index, row))
    report.files.append(file)
    return report


def _insert(file: Path, table: str, index: int, row: dict[str, Any]) -> bool:
    model = SEED_TABLES[table]
    pk = [model._meta.fields[name] for name in _pk_names(model)]
    query = model.insert(**row).on_conflict(action="IGNORE", conflict_target=pk)
    try:
        with database.atomic():  # a savepoint, so the error names this record only
            return bool(query.as_rowcount().execute())
    except peewee.DatabaseError as exc:
        detail = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        raise SeedError(f"{file}: {_where(table, index, row)}: {detail}") from exc


def _read(file: Path, embedder: Embedder) -> list[tuple[str, int, dict[str, Any]]]:
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SeedError(f"{file}: not a readable JSON file: {exc}") from exc
    if not isinstance(data, dict):
        raise SeedError(f"{file}: a seed file is a JSON object of table name -> list of rows")
    unknown = sorted(set(data) - set(SEED_TABLES))
    if unknown:
        raise SeedError(f"{file}: unknown table {unknown[0]!r}; known: {', '.join(SEED_TABLES)}")
    rows = []
    for table in SEED_TABLES:  # dependency order, whatever the file's order
        records = data.get(table, [])
        if not isinstance(records, list):
            raise SeedError(f"{file}: {table} must be a list of records")
        for index, record in enumerate(records):
            rows.append((table, index, _check(file, table, index, record, embedder)))
    return rows


def _check(file: Path, table: str, index: int, record: object,
           embedder: Embedder) -> dict[str, Any]:
    where = f"{file}: {table}[{index}]"
    if not isinstance(record, dict):
        raise SeedError(f"{where}: a record is a JSON object")
    model = SEED_TABLES[table]
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
        return _coercer(fld)(value)
    except (TypeError, ValueError) as exc:
        raise SeedError(f"{where}: {fld.name}={_short(value)}: {exc}") from None


def _as_is(value: Any) -> Any:
    return value


def _as_text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def _as_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("expected an integer")
    return value


def _as_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("expected true or false")
    return value


def _as_vector(value: Any) -> list[float]:
    if not isinstance(value, list) or len(value) != EMBEDDING_DIMENSIONS:
        size = len(value) if isinstance(value, list) else type(value).__name__
        raise ValueError(f"expected a list of {EMBEDDING_DIMENSIONS} numbers, got {size}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
               for v in value):
        raise ValueError("every element must be a finite number")
    return [float(v) for v in value]


def _as_uuid(value: Any) -> uuid.UUID:
    return uuid.UUID(_as_text(value))


def _as_datetime(value: Any) -> datetime:
    parsed = datetime.fromisoformat(_as_text(value))
    if parsed.tzinfo is None:  # timestamptz: a naive time would be read in the server's zone
        raise ValueError("expected a time with its offset, e.g. 2026-05-01T09:00:00+00:00")
    return parsed


def _as_date(value: Any) -> date:
    return date.fromisoformat(_as_text(value))


# JSON fields take any JSON value as it is.
_COERCE: dict[type[peewee.Field], Callable[[Any], Any]] = {
    peewee.UUIDField: _as_uuid,
    peewee.TextField: _as_text,
    peewee.IntegerField: _as_int,
    peewee.BooleanField: _as_bool,
    peewee.DateTimeField: _as_datetime,
    peewee.DateField: _as_date,
    VectorField: _as_vector,
}


def _coercer(fld: peewee.Field) -> Callable[[Any], Any]:
    for cls in type(fld).__mro__:
        if cls in _COERCE:
            return _COERCE[cls]
    return _as_is


def _pk_names(model: type[BaseModel]) -> Iterable[str]:
    pk: Any = model._meta.primary_key
    return list(pk.field_names) if isinstance(pk, peewee.CompositeKey) else [pk.name]


def _where(table: str, index: int, row: dict[str, Any]) -> str:
    key = ", ".join(f"{name}={row.get(name)}" for name in _pk_names(SEED_TABLES[table]))
    return f"{table}[{index}] ({key})"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
