"""Statements built once per model: ``get_by_id``'s SQL, verified once, run with new values.

Peewee builds a statement's SQL afresh on every call, walking the query's nodes (about 1,500
Python calls for a get-by-id of an 8-column table: most of the call's client time). A
get-by-id of a model is always the same statement but for two values, so its SQL is built
and verified (:func:`tenantdb.verifier.verify`) the first time, and later calls only put
the org and the key into their places. A row's columns are converted as Peewee's
``ModelObjectCursorWrapper`` converts them (each through its field's ``python_value``),
with the converters resolved once here rather than again for every cursor; the row itself
is built by the constructor scoped selects use (``tenantdb.tenancy``).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .verifier import verify

__all__ = ["ByIdStatement", "by_id_statement"]

# Stand-ins for the two values while the SQL is built: found again by identity of their
# converted form among the statement's parameters.
_ORG_MARK = uuid.UUID("00000000-0000-4000-8000-00000000cafe")


@dataclass(frozen=True)
class ByIdStatement:
    """``SELECT <every column> FROM <table> WHERE org_id = %s AND id = %s LIMIT 1``, as
    Peewee writes it for ``model``, with where each value goes."""

    model: Any
    fields: tuple[Any, ...]
    sql: str
    params: tuple[Any, ...]
    org_slots: tuple[int, ...]
    key_slots: tuple[int, ...]
    converters: tuple[tuple[str, Callable[[Any], Any] | None], ...]

    def bind(self, org: uuid.UUID, key: Any) -> tuple[Any, ...]:
        """The parameters for ``org``'s row ``key``, converted as Peewee converts them."""
        params = list(self.params)
        org_value = self.model.org_id.db_value(org)
        key_value = self.model._meta.fields["id"].db_value(key)
        for slot in self.org_slots:
            params[slot] = org_value
        for slot in self.key_slots:
            params[slot] = key_value
        return tuple(params)

    def columns(self, row: tuple[Any, ...]) -> dict[str, Any]:
        """``row``'s values by field name, each through its field's ``python_value``: what
        Peewee's cursor wrapper hands a model's constructor."""
        return {name: value if convert is None else convert(value)
                for (name, convert), value in zip(self.converters, row, strict=True)}


_statements: dict[Any, ByIdStatement] = {}
_lock = threading.Lock()


def by_id_statement(model: Any) -> ByIdStatement:
    """``model``'s get-by-id statement, built (and verified) on first use."""
    statement = _statements.get(model)
    if statement is None or statement.fields != tuple(model._meta.sorted_fields):
        statement = _build(model)
        with _lock:
            _statements[model] = statement
    return statement


def _build(model: Any) -> ByIdStatement:
    id_field = model._meta.fields["id"]
    key_mark = _key_mark(id_field)
    query = model.select(org_id=_ORG_MARK).where(id_field == key_mark).limit(1)
    verdict = verify(query)
    if verdict.org != _ORG_MARK:  # pragma: no cover - select(org_id=) always pins it
        raise AssertionError(f"{model.__name__}'s get-by-id is not pinned to its org")
    sql, params = model._meta.database.get_sql_context().sql(query).query()
    org_value = model.org_id.db_value(_ORG_MARK)
    key_value = id_field.db_value(key_mark)
    org_slots = tuple(i for i, p in enumerate(params) if p == org_value)
    key_slots = tuple(i for i, p in enumerate(params) if p == key_value)
    if len(org_slots) != 1 or len(key_slots) != 1:  # pragma: no cover - Peewee's SQL changed
        raise AssertionError(f"{model.__name__}'s get-by-id SQL has unexpected parameters")
    fields = tuple(model._meta.sorted_fields)
    return ByIdStatement(model, fields, sql, tuple(params), org_slots, key_slots,
                         tuple((f.name, f.python_value) for f in fields))


def _key_mark(field: Any) -> Any:
    """A value of ``field``'s type that no real parameter of the statement equals."""
    if field.field_type in ("UUID", "UUIDB"):
        return uuid.UUID("00000000-0000-4000-8000-0000000beef0")
    if field.field_type in ("INT", "BIGINT", "AUTO", "BIGAUTO", "SMALLINT"):
        return -7_351_924_113
    return "tenantdb-key-mark-7351924113"
