"""Every read (and the one write) of Peewee's private attributes, in one place.

tenantdb's guarantees rest on seeing what a Peewee query will send: its FROM list, WHERE,
joins, CTEs, the rows of an INSERT and its ON CONFLICT clause. Peewee keeps these in
underscore attributes with no public reader, so they are read here and nowhere else, each
with why it is needed. ``tests/test_peewee_internals.py`` checks every one against the
Peewee releases CI runs (the lowest and the highest of the range ``pyproject.toml`` allows):
a release that renames one fails there, not silently in the verifier.

Also private, and not reads: :class:`tenantdb.tenancy.TenantSelect` overrides
``_get_cursor_wrapper`` (to stamp loaded rows with their org), and loaded rows are built
with the ``__no_default__`` keyword Peewee's cursor wrappers pass (:data:`NO_DEFAULT`).
``Model._meta`` is Peewee's documented metadata API and is used directly.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "NO_DEFAULT",
    "alias",
    "clear_dirty",
    "conflict_clauses",
    "conflict_update",
    "cte_columns",
    "cte_query",
    "ctes",
    "entity_path",
    "from_list",
    "function_clauses",
    "insert_columns",
    "insert_rows",
    "is_default_selection",
    "is_recursive",
    "join_context",
    "join_on",
    "loaded_instance",
    "on_conflict",
    "context_key",
    "query_database",
    "render_text",
    "raw_sql",
    "returning",
    "select_clauses",
    "set_where",
    "table_alias",
    "update_from",
    "update_values",
    "values_rows",
    "where",
]

#: The keyword Peewee's cursor wrappers build a loaded row with (no field defaults applied).
NO_DEFAULT = "__no_default__"


# -- queries: where the org predicate and the tables are ------------------------------------


def where(query: Any) -> Any:
    """WHERE's expression (``None`` if none): the verifier finds the org predicate in it."""
    return query._where


def set_where(query: Any, expression: Any) -> None:
    """Replace WHERE: a RIGHT/FULL join widens the base table's org term to let through the
    rows it null-extends (Peewee's ``where()`` can only AND a term on)."""
    query._where = expression


def from_list(query: Any) -> list[Any]:
    """A SELECT's sources (tables, joins, subqueries): each tenant table must be pinned."""
    return list(query._from_list)


def returning(query: Any) -> list[Any]:
    """A SELECT's columns, or a write's RETURNING: subqueries in them are verified, and an
    ``INSERT ... SELECT`` or a CTE's ``org_id`` output is traced to its source."""
    return list(query._returning or ())


def select_clauses(query: Any) -> tuple[Any, ...]:
    """A SELECT's other clauses (HAVING, columns, ORDER BY, GROUP BY, WINDOW, DISTINCT ON,
    LIMIT, OFFSET): any of them may hold a subquery of a tenant table."""
    return (query._having, query._returning, query._order_by, query._group_by,
            query._windows, query._distinct, query._limit, query._offset)


def is_default_selection(query: Any) -> bool:
    """Whether a model SELECT selects its model's fields because none were named (its
    column list may then be replayed from a rendering of the same model's)."""
    return bool(query._is_default)


def update_values(query: Any) -> dict[Any, Any]:
    """An UPDATE's SET: ``org_id`` may never be a target, and values may be subqueries."""
    return dict(query._update or {})


def update_from(query: Any) -> list[Any]:
    """An UPDATE's FROM sources: pinned like a SELECT's."""
    return list(query._from or ())


def insert_rows(query: Any) -> Any:
    """An INSERT's rows (a dict, a list of them, or a SELECT): their org is checked."""
    return query._insert


def insert_columns(query: Any) -> list[Any]:
    """An INSERT's explicit column list (empty if the rows name their columns)."""
    return list(query._columns or ())


def on_conflict(query: Any) -> Any:
    """An INSERT's ON CONFLICT clause, or ``None``: an upsert must not change ``org_id``."""
    return query._on_conflict


def conflict_update(conflict: Any) -> dict[Any, Any]:
    """ON CONFLICT's ``DO UPDATE SET``."""
    return dict(conflict._update or {})


def conflict_clauses(conflict: Any) -> list[Any]:
    """ON CONFLICT's other parts (WHERE, conflict WHERE, target, preserved columns): any may
    hold a subquery."""
    return [conflict._where, conflict._conflict_where, conflict._conflict_target,
            conflict._preserve]


# -- CTEs, aliases and other nodes ------------------------------------------------------------


def ctes(query: Any) -> list[Any]:
    """The query's WITH list: each CTE's query is verified, and may not take a tenant
    table's name."""
    return list(query._cte_list or ())


def alias(node: Any) -> str:
    """A CTE's or an alias's name."""
    return str(node._alias)


def cte_query(cte: Any) -> Any:
    """The query a CTE stands for."""
    return cte._query


def is_recursive(cte: Any) -> bool:
    """Whether a CTE is ``WITH RECURSIVE`` (its recursive term reads the anchor's rows)."""
    return bool(cte._recursive)


def cte_columns(cte: Any) -> Any:
    """A CTE's declared column names, or ``None``: they rename its query's output."""
    return cte._columns


def entity_path(node: Any) -> list[str]:
    """An ``Entity``'s dotted name: one naming a tenant table is refused."""
    return [str(part) for part in node._path]


def function_clauses(node: Any) -> tuple[Any, Any]:
    """A function call's ``FILTER (WHERE ...)`` and ordered-aggregate ``ORDER BY``: either
    may hold a subquery."""
    return node._filter, node._order_by


def values_rows(node: Any) -> list[Any]:
    """A ``VALUES`` list's rows: may hold subqueries."""
    return list(node._values)


def raw_sql(query: Any) -> str:
    """A raw query's SQL text, checked for statements that change settings or roles."""
    return str(getattr(query, "_sql", "") or "")


def join_on(join: Any) -> Any:
    """A join's ON expression (``None`` for a cross join): its org terms pin the joined
    table where the join type lets ON filter it."""
    return getattr(join, "_on", None)


def join_context(query: Any) -> Any:
    """The model a ``join()`` without ``src`` joins from: needed to infer the ON clause that
    a scoped join extends with the org term."""
    return query._join_ctx


def query_database(query: Any) -> Any:
    """The database a query is bound to (a CTE's outer query is bound the same way)."""
    return query._database


# -- SQL contexts: a default column list rendered once per model -----------------------------


def table_alias(table: Any) -> str | None:
    """The alias a ``Table`` was given in code (a model's own table has none)."""
    alias = table._alias
    return str(alias) if alias else None


def context_key(ctx: Any) -> tuple[Any, ...]:
    """What of a SQL context can change how a list of a model's own columns renders: the
    scope, parentheses and identifier quoting (the rest of the settings are about values,
    operators and clauses, which a column reference does not use)."""
    state = ctx.state
    return (state.scope, state.parentheses, state.settings.get("quote"))


def render_text(ctx: Any, render: Any) -> str | None:
    """Call ``render()`` (which writes to ``ctx``) and return the SQL text it wrote, or
    ``None`` if it also added parameters (then the text alone cannot be replayed)."""
    start, values = len(ctx._sql), len(ctx._values)
    render()
    if len(ctx._values) != values:
        return None
    return "".join(ctx._sql[start:])


# -- model instances -----------------------------------------------------------------------------


def loaded_instance(model: Any, data: dict[str, Any]) -> Any:
    """``model``'s row with ``data`` (already converted to Python values), built as Peewee's
    cursor wrappers leave a loaded row (nothing dirty, no related rows cached), without its
    per-field ``setattr``: for callers that build many rows from their own cursor."""
    instance: Any = object.__new__(model)
    instance.__data__ = data
    instance._dirty = set()
    instance.__rel__ = {}
    return instance


def clear_dirty(instance: Any) -> None:
    """Mark a just-loaded row clean, as Peewee's cursor wrappers do (its ``dirty_fields``
    is the public reader; there is no public way to clear them)."""
    instance._dirty.clear()
