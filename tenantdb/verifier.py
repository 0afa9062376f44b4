"""The execute-time verifier: no query object reaches PostgreSQL unscoped.

:func:`verify` walks a Peewee query before it becomes SQL: FROM lists, joins, subqueries in
any clause, CTEs, compound selects, UPDATE/DELETE targets and ``INSERT ... SELECT``. Every
reference to a tenant table must be constrained by an AND-ed ``org_id = <value>`` (in WHERE,
or in a join's ON where the join type lets ON filter that table) or by ``org_id`` equality to
a table that already is. An ``OR`` above the org predicate, a join that forgets the org, or
two different orgs in one statement are refused. Rewriting queries elsewhere is a
convenience; this walk is the boundary.

Raw SQL cannot be parsed here; :func:`mentions_tenant_table` finds tenant table names in its
text so that callers can refuse it (row-level security is the database's second wall).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import peewee
from peewee import (
    CTE,
    JOIN,
    OP,
    SQL,
    Case,
    Column,
    CompoundSelectQuery,
    Delete,
    Expression,
    Field,
    FieldAlias,
    Function,
    Insert,
    Join,
    ModelAlias,
    NodeList,
    NoopModelSelect,
    RawQuery,
    Select,
    SelectBase,
    Table,
    Update,
    Value,
    ValuesList,
    WrappedNode,
)

from .context import require_org
from .errors import CrossOrgError, MissingOrgError, UnscopedQueryError

__all__ = [
    "ORG_COLUMN",
    "TENANT_TABLES",
    "Verdict",
    "mentions_tenant_table",
    "register_tenant_table",
    "verify",
]

ORG_COLUMN = "org_id"
#: Names of the tables whose rows belong to one org (filled as tenant models are defined).
TENANT_TABLES: set[str] = set()
_tenant_table_re: re.Pattern[str] | None = None


@dataclass(frozen=True)
class Verdict:
    """What a verified statement touches: tenant tables or not, the one org if so, and
    whether it embeds a query built inside ``cross_org`` (then it runs as the bypass role)."""

    tenant: bool
    org: uuid.UUID | None
    cross: bool = False


def register_tenant_table(name: str) -> None:
    """Declare ``name`` a tenant table (done by every concrete ``TenantModel``)."""
    global _tenant_table_re
    TENANT_TABLES.add(name)
    names = "|".join(sorted(map(re.escape, TENANT_TABLES)))
    # Cautious on purpose: a schema-qualified or quoted name matches too, and a column that
    # happened to share a table's name would be refused rather than let through.
    _tenant_table_re = re.compile(rf'(?<![\w$])"?({names})"?(?![\w$])', re.IGNORECASE)


def mentions_tenant_table(sql: str) -> str | None:
    """The first tenant table named in raw ``sql``, or ``None`` (a cautious text match)."""
    if _tenant_table_re is None:
        return None
    match = _tenant_table_re.search(sql)
    return match.group(1) if match else None


def verify(query: Any) -> Verdict:
    """Check that every tenant table in ``query`` is pinned to one org; return the verdict.

    :raises UnscopedQueryError: a tenant table without its org predicate.
    :raises CrossOrgError: one statement names two orgs, or an UPDATE changes ``org_id``.
    :raises MissingOrgError: an org predicate or inserted org that is not a UUID.
    """
    walk = _Walk()
    walk.query(query, {})
    if len(walk.orgs) > 1:
        names = ", ".join(sorted(map(str, walk.orgs)))
        raise CrossOrgError(f"one statement names several orgs ({names}): use cross_org()")
    return Verdict(walk.tenant, next(iter(walk.orgs), None), walk.cross)


# -- the walk -----------------------------------------------------------------------------

_Scope = dict[object, uuid.UUID]  # a source (model, alias or table) -> its org
_ANY = None  # a predicate that may constrain any source of the statement


@dataclass
class _Source:
    key: object
    table: str | None  # the tenant table it reads, None for other sources


@dataclass
class _Predicate:
    expr: Any
    applies_to: frozenset[object] | None  # None: every source of the statement


class _Walk:
    def __init__(self) -> None:
        self.orgs: set[uuid.UUID] = set()
        self.tenant = False
        self.cross = False
        self.cte_names: set[str] = set()

    def query(self, query: Any, outer: _Scope) -> _Scope:
        if getattr(query, "_tenantdb_cross_org", None):
            # Built inside cross_org(): its permission travels with it (retention selectors).
            self.cross = True
            return outer
        if isinstance(query, NoopModelSelect):  # SELECT 0 WHERE 0: reads no table
            return outer
        if isinstance(query, CompoundSelectQuery):
            self.query(query.lhs, outer)
            return self.query(query.rhs, outer)
        if isinstance(query, Select):
            return self.select(query, outer)
        if isinstance(query, Update):
            return self.update(query, outer)
        if isinstance(query, Delete):
            return self.write(query, query.table, [], outer)
        if isinstance(query, Insert):
            return self.insert(query, outer)
        if isinstance(query, RawQuery):
            self.raw_text(getattr(query, "_sql", "") or "")
            return outer
        raise UnscopedQueryError(f"cannot verify a {type(query).__name__}: use cross_org()")

    # -- statements --

    def select(self, query: Any, outer: _Scope) -> _Scope:
        self.ctes(query, outer)
        sources: list[_Source] = []
        predicates = [_Predicate(e, _ANY) for e in _and_terms(query._where)]
        for item in query._from_list:
            self.collect(item, sources, predicates, outer)
        scope = self.solve(sources, predicates, outer)
        # The predicates hold WHERE's and every ON's terms.
        clauses = (query._having, query._returning, query._order_by, query._group_by,
                   [p.expr for p in predicates])
        self.subqueries(clauses, scope)
        return scope

    def update(self, query: Any, outer: _Scope) -> _Scope:
        for column in query._update or {}:
            if _column_name(column) == ORG_COLUMN:
                raise CrossOrgError("an UPDATE cannot change org_id: rows never move between "
                                    "orgs (insert a copy under the other org instead)")
        scope = self.write(query, query.table, list(query._from or ()), outer)
        self.subqueries([list((query._update or {}).values())], scope)
        return scope

    def write(self, query: Any, table: Any, extra: list[Any], outer: _Scope) -> _Scope:
        self.ctes(query, outer)
        sources: list[_Source] = []
        predicates = [_Predicate(e, _ANY) for e in _and_terms(query._where)]
        for item in [table, *extra]:
            self.collect(item, sources, predicates, outer)
        scope = self.solve(sources, predicates, outer)
        self.subqueries((query._where, query._returning), scope)
        return scope

    def insert(self, query: Any, outer: _Scope) -> _Scope:
        self.ctes(query, outer)
        table = _tenant_table(query.table, self.cte_names)
        rows = query._insert
        if isinstance(rows, SelectBase):
            scope = self.query(rows, outer)
            if table is not None:
                self.tenant = True
                self.orgs.add(self.inserted_org_of_select(query, rows, scope, table))
        elif table is not None:
            self.tenant = True
            for org in self.inserted_orgs(query, rows, table):
                self.orgs.add(org)
        conflict = query._on_conflict
        if conflict is not None and conflict._update:
            if any(_column_name(c) == ORG_COLUMN for c in conflict._update):
                raise CrossOrgError("an upsert cannot change org_id")
            self.subqueries([list(conflict._update.values())], outer)
        return outer

    def inserted_orgs(self, query: Any, rows: Any, table: str) -> Iterator[uuid.UUID]:
        if isinstance(rows, dict):
            rows = [rows]
        if not isinstance(rows, (list, tuple)):
            raise UnscopedQueryError(f"INSERT INTO {table}: pass the rows as a list so their "
                                     "org can be checked")
        columns = [_column_name(c) for c in query._columns or ()]
        for row in rows:
            yield _org_of_row(row, columns, table)

    def inserted_org_of_select(self, query: Any, select: Any, scope: _Scope,
                               table: str) -> uuid.UUID:
        columns = [_column_name(c) for c in query._columns or ()]
        if ORG_COLUMN not in columns or not isinstance(select, Select):  # not a UNION
            raise MissingOrgError(f"INSERT INTO {table} ... SELECT must insert org_id")
        selected: Any = select  # peewee's stubs omit the private _returning
        source = selected._returning[columns.index(ORG_COLUMN)]
        key = _org_column_key(source)
        if key is not None and key in scope:
            return scope[key]
        if _is_constant(source):
            return require_org(_constant(source), f"INSERT INTO {table}")
        raise UnscopedQueryError(f"INSERT INTO {table} ... SELECT: org_id must be a constant "
                                 "or the org_id of a scoped table")

    # -- sources and predicates --

    def ctes(self, query: Any, outer: _Scope) -> None:
        for cte in query._cte_list or ():
            self.cte_names.add(cte._alias)
            self.query(cte._query, outer)

    def collect(self, item: Any, sources: list[_Source], predicates: list[_Predicate],
                outer: _Scope) -> frozenset[object]:
        """Add ``item``'s sources; returns their keys (for join ON applicability)."""
        if isinstance(item, Join):
            on: Any = getattr(item, "_on", None)
            left = self.collect(item.lhs, sources, predicates, outer)
            right = self.collect(item.rhs, sources, predicates, outer)
            applies = _join_applies(item.join_type, left, right)
            terms = _and_terms(on) if isinstance(on, peewee.Node) else []
            predicates.extend(_Predicate(t, applies) for t in terms)
            return left | right
        if isinstance(item, SelectBase):
            self.query(item, outer)
            return frozenset()
        if isinstance(item, SQL):
            self.raw_text(item.sql)
            return frozenset()
        if isinstance(item, (CTE, ValuesList)):
            return frozenset()
        table = _tenant_table(item, self.cte_names)
        sources.append(_Source(item, table))
        if table is not None:
            self.tenant = True
        return frozenset([item])

    def solve(self, sources: list[_Source], predicates: list[_Predicate],
              outer: _Scope) -> _Scope:
        scope = dict(outer)
        links = []
        for predicate in predicates:
            link = self.pin(predicate, scope)
            if link is not None:
                links.append(link)
        changed = bool(links)
        while changed:  # org_id = org_id links carry an org from table to table
            changed = False
            for left, right, predicate in links:
                for known, other in ((left, right), (right, left)):
                    if known in scope and other not in scope and _applies(predicate, other):
                        scope[other] = scope[known]
                        changed = True
        for source in sources:
            if source.table is None:
                continue
            if source.key not in scope:
                raise UnscopedQueryError(
                    f"{source.table} is read or written without its org: add "
                    f"{source.table}.org_id == <org> (AND-ed, not OR-ed; for joins, in ON), "
                    "or use cross_org(reason) for admin work"
                )
            self.orgs.add(scope[source.key])
        return scope

    def pin(self, predicate: _Predicate, scope: _Scope
            ) -> tuple[object, object, _Predicate] | None:
        """Apply an ``org_id = <constant>`` predicate to ``scope``; return an
        ``org_id = org_id`` predicate as a link for :meth:`solve` to follow."""
        expr = predicate.expr
        if not (isinstance(expr, Expression) and expr.op == OP.EQ):
            return None
        left, right = _org_column_key(expr.lhs), _org_column_key(expr.rhs)
        if left is not None and right is not None:
            return None if left is right else (left, right, predicate)
        key, other = (left, expr.rhs) if left is not None else (right, expr.lhs)
        if key is not None and _is_constant(other) and _applies(predicate, key):
            org = require_org(_constant(other), "org_id predicate")
            if scope.setdefault(key, org) != org:
                raise CrossOrgError(f"one table is pinned to two orgs ({scope[key]}, {org})")
        return None

    def subqueries(self, clauses: Iterable[Any], scope: _Scope) -> None:
        for sub in _subqueries(list(clauses), self):
            self.query(sub, scope)

    def raw_text(self, sql: str) -> None:
        table = mentions_tenant_table(sql)
        if table is not None:
            raise UnscopedQueryError(
                f"raw SQL naming {table} cannot be verified: use Model.raw(..., org_id=...), "
                "execute_scoped(org_id, sql) or cross_org(reason)"
            )


# -- helpers ------------------------------------------------------------------------------

# Nodes that can hold no query: columns, plain values, names.
_LEAVES = (Field, Column, str, int, float, uuid.UUID, type(None))


def _and_terms(expr: Any) -> list[Any]:
    if expr is None:
        return []
    if isinstance(expr, Expression) and expr.op == OP.AND:
        return _and_terms(expr.lhs) + _and_terms(expr.rhs)
    return [expr]


def _join_applies(join_type: str, left: frozenset[object],
                  right: frozenset[object]) -> frozenset[object]:
    # An outer join keeps every row of its preserved side whatever ON says, so ON can only
    # constrain the side that may come back NULL.
    if join_type in (JOIN.LEFT_OUTER, JOIN.LEFT_LATERAL):
        return right
    if join_type == JOIN.RIGHT_OUTER:
        return left
    if join_type in (JOIN.FULL, JOIN.FULL_OUTER, JOIN.CROSS):
        return frozenset()
    return left | right


def _applies(predicate: _Predicate, key: object) -> bool:
    return predicate.applies_to is None or key in predicate.applies_to


def _tenant_table(source: Any, cte_names: set[str]) -> str | None:
    if isinstance(source, ModelAlias):
        source = source.model
    if isinstance(source, Table):
        name = source.__name__
    elif isinstance(source, type) and hasattr(source, "_meta"):
        name = source._meta.table_name
    else:
        return None
    return name if name in TENANT_TABLES and name not in cte_names else None


def _org_column_key(node: Any) -> object | None:
    """The source whose ``org_id`` column ``node`` is, else ``None``."""
    key: object | None = None
    if isinstance(node, FieldAlias):
        if node.field.column_name == ORG_COLUMN:
            key = node.source
    elif isinstance(node, Field):
        if node.column_name == ORG_COLUMN:
            key = getattr(node, "model", None)
    elif isinstance(node, Column) and node.name == ORG_COLUMN:
        key = node.source
    return key


def _column_name(column: Any) -> str | None:
    if isinstance(column, str):
        return column
    if isinstance(column, FieldAlias):
        return str(column.field.column_name)
    if isinstance(column, Field):
        return str(column.column_name)
    if isinstance(column, Column):
        return str(column.name)
    return None


def _is_constant(node: Any) -> bool:
    if isinstance(node, Value):
        return not isinstance(node.value, (list, tuple, set))
    return not isinstance(node, (peewee.Node, list, tuple, set, dict))


def _constant(node: Any) -> Any:
    return node.value if isinstance(node, Value) else node


def _org_of_row(row: Any, columns: list[str | None], table: str) -> uuid.UUID:
    if isinstance(row, dict):
        for column, value in row.items():
            if _column_name(column) == ORG_COLUMN:
                return require_org(_constant(value), f"INSERT INTO {table}")
    elif isinstance(row, (list, tuple)) and ORG_COLUMN in columns:
        return require_org(_constant(row[columns.index(ORG_COLUMN)]), f"INSERT INTO {table}")
    raise MissingOrgError(f"INSERT INTO {table} needs org_id in every row")


def _subqueries(root: Any, walk: _Walk) -> list[Any]:
    """Queries nested anywhere in an expression tree (not descending into them).

    An explicit stack rather than recursive generators: this runs on every statement.
    """
    found, stack = [], [root]
    while stack:
        node = stack.pop()
        if isinstance(node, _LEAVES):  # the common case (selected columns): nothing inside
            continue
        if isinstance(node, (SelectBase, Update, Delete, Insert)):
            found.append(node)
        elif isinstance(node, SQL):
            walk.raw_text(node.sql)
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
        elif isinstance(node, Expression):
            stack += (node.lhs, node.rhs)
        elif isinstance(node, NodeList):
            stack.extend(node.nodes)
        elif isinstance(node, Function):
            stack.extend(node.arguments or ())
        elif isinstance(node, WrappedNode):
            stack.append(node.node)
        elif isinstance(node, Case):
            stack += (node.predicate, list(node.expression_tuples), node.default)
        elif isinstance(node, Value) and isinstance(node.value, (list, tuple)):
            stack.extend(node.value)
    return found
