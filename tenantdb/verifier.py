"""The execute-time verifier: no query object reaches PostgreSQL unscoped.

:func:`verify` walks a Peewee query before it becomes SQL: FROM lists, joins, subqueries in
any clause, CTEs, compound selects, UPDATE/DELETE targets and ``INSERT ... SELECT``. Every
reference to a tenant table must be constrained by an AND-ed ``org_id = <value>`` (in WHERE,
or in a join's ON where the join type lets ON filter that table) or by ``org_id`` equality to
a table that already is. An ``OR`` above the org predicate, a join that forgets the org, or
two different orgs in one statement are refused. Rewriting queries elsewhere is a
convenience; this walk is the boundary.

``org`` is the tenant root: its org column is ``id``, so ``Org.select().where(Org.id == A)``
is scoped to A like any tenant table; rows of ``org`` are never inserted or deleted by a
verified statement (:func:`tenantdb.orgs.create_org` and :func:`tenantdb.orgs.delete_org` do
that as admin work). Functions that change settings or roles (``set_config``) are refused
anywhere in a query, and a CTE may not take a tenant table's name.

Raw SQL cannot be parsed here; :func:`mentions_tenant_table` finds tenant table names in its
text so that callers can refuse it, and :func:`check_raw_sql` refuses the statements that
could change the role or the org setting (row-level security is the database's second wall).
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
    Entity,
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

from . import peewee_internals as pi
from .context import require_org
from .errors import CrossOrgError, MissingOrgError, UnscopedQueryError

__all__ = [
    "ALLOWED_SETTINGS",
    "ORG_COLUMN",
    "ROOT_TABLE",
    "TENANT_TABLES",
    "Verdict",
    "check_raw_sql",
    "mentions_tenant_table",
    "org_column",
    "register_tenant_table",
    "tenant_tables_version",
    "verify",
]

ORG_COLUMN = "org_id"
#: The tenant root: each of its rows is an org, whose id is the row's ``id``.
ROOT_TABLE = "org"
#: Names of the tables whose rows belong to one org (filled as tenant models are defined).
TENANT_TABLES: set[str] = set()
# The org column of tables where it is not ORG_COLUMN (the root's is its id).
_ORG_COLUMNS: dict[str, str] = {}
_tenant_table_re: re.Pattern[str] | None = None

#: Settings raw SQL may change with ``set_config(name, value, true)``: planner knobs only,
#: never ``role``, ``session_authorization`` or ``tenantdb.*``.
ALLOWED_SETTINGS = frozenset({"hnsw.ef_search", "hnsw.iterative_scan", "hnsw.max_scan_tuples",
                              "ivfflat.probes", "ivfflat.iterative_scan", "enable_sort"})
# Functions a query may never call: they change settings, and so the role or the org.
_DENIED_FUNCTIONS = frozenset({"set_config"})
# Statements raw SQL may run for one org (execute_scoped): reads and writes that row-level
# security binds. Anything else (SET, RESET, transaction control, DO, PREPARE/EXECUTE, DDL)
# could change the role, the org setting, or what a later statement sees.
_SCOPED_STATEMENTS = frozenset({"SELECT", "WITH", "INSERT", "UPDATE", "DELETE", "VALUES",
                                "TABLE", "EXPLAIN", "SHOW", "COPY"})
# Statements refused on an application connection whatever the org (execute_sql).
_DENIED_STATEMENTS = frozenset({"SET", "RESET", "DO", "PREPARE", "EXECUTE", "LOAD", "ALTER",
                                "GRANT", "REVOKE", "CALL", "CREATE", "DROP", "SECURITY"})
_STRINGS_AND_COMMENTS = re.compile(
    r"--[^\n]*|/\*.*?\*/|'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|(\$\w*\$).*?\1", re.DOTALL)
_SET_CONFIG = re.compile(r"set_config", re.IGNORECASE)
_ALLOWED_SET_CONFIG = re.compile(r"(?<![\w$.\"])set_config\(\s*'([a-z_.]+)'\s*,", re.IGNORECASE)
_UNICODE_ESCAPE = re.compile(r"\bU&[\"']", re.IGNORECASE)
_FIRST_WORD = re.compile(r"\s*\(*\s*([A-Za-z]+)")
# The one SET a raw statement may run: a planner setting of ALLOWED_SETTINGS, for the
# transaction only (knowledge search puts its index settings back this way).
_ALLOWED_SET_LOCAL = re.compile(r"\s*SET\s+LOCAL\s+([a-z_.]+)\s+(?:TO|=)\s+DEFAULT\s*$",
                                re.IGNORECASE)


@dataclass(frozen=True)
class Verdict:
    """What a verified statement touches: tenant tables or not, and the one org if so.

    Nothing here grants admin rights: whether a statement runs as admin is decided when it
    runs, by :func:`~tenantdb.context.cross_org_reason`, never by the query object."""

    tenant: bool
    org: uuid.UUID | None


_tables_version = 0


def tenant_tables_version() -> int:
    """A number that changes whenever a tenant table is registered (verdicts remembered by
    :mod:`tenantdb.verdicts` are then stale)."""
    return _tables_version


def register_tenant_table(name: str, org_column_name: str = ORG_COLUMN) -> None:
    """Declare ``name`` a tenant table (done by every concrete ``TenantModel``), whose org
    is the column ``org_column_name`` (``id`` for the root table ``org``)."""
    global _tenant_table_re, _tables_version
    TENANT_TABLES.add(name)
    _tables_version += 1
    if org_column_name != ORG_COLUMN:
        _ORG_COLUMNS[name] = org_column_name
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


def org_column(table: str) -> str:
    """The column holding the org of ``table``'s rows (``org_id``; ``id`` for ``org``)."""
    return _ORG_COLUMNS.get(table, ORG_COLUMN)


def check_raw_sql(sql: str, *, scoped: bool) -> None:
    """Refuse raw SQL that could change the role or the org setting of its connection.

    ``set_config`` is allowed only for :data:`ALLOWED_SETTINGS` (written literally, as
    ``set_config('hnsw.ef_search', ...)``), and so is ``SET LOCAL <one of them> TO DEFAULT``;
    other ``SET``s, ``RESET``/``DO``/``PREPARE``/``EXECUTE``
    and DDL are refused; with ``scoped`` (``execute_scoped``) every statement must be a read
    or a write (``SELECT``, ``WITH``, ``INSERT``, ``UPDATE``, ``DELETE``, ...), so transaction
    control (``ROLLBACK TO SAVEPOINT`` would restore an earlier org) is refused too.
    Cautious on purpose: the text is matched, not parsed, so an unusual spelling of an
    allowed statement may be refused; such work belongs in ``cross_org`` or a migration.

    :raises UnscopedQueryError: the text could change the role or the org setting.
    """
    for match in _SET_CONFIG.finditer(sql):
        allowed = _ALLOWED_SET_CONFIG.match(sql, match.start())
        if allowed is None or allowed.group(1).lower() not in ALLOWED_SETTINGS:
            raise UnscopedQueryError(
                "raw SQL may not call set_config() except for "
                f"{', '.join(sorted(ALLOWED_SETTINGS))}: the role and tenantdb.org_id are "
                "set by the library (use execute_scoped(org_id, ...) or cross_org(reason))")
    if _UNICODE_ESCAPE.search(sql):
        raise UnscopedQueryError("raw SQL may not use U& escapes (they can spell any name): "
                                 "write the identifier or string plainly")
    code = _STRINGS_AND_COMMENTS.sub(" ", sql)
    for statement in code.split(";"):
        first = _FIRST_WORD.match(statement)
        if first is None:
            continue
        word = first.group(1).upper()
        if word == "SET" and _planner_reset(statement):
            continue
        if word in _DENIED_STATEMENTS or (scoped and word not in _SCOPED_STATEMENTS):
            raise UnscopedQueryError(
                f"raw SQL may not run {word} on an application connection: it could change "
                "the role or the org of later statements (settings are the library's; "
                "administration runs in migrations or cross_org(reason))")


def _planner_reset(statement: str) -> bool:
    allowed = _ALLOWED_SET_LOCAL.match(statement)
    return allowed is not None and allowed.group(1).lower() in ALLOWED_SETTINGS


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
    return Verdict(walk.tenant, next(iter(walk.orgs), None))


# -- the walk -----------------------------------------------------------------------------

_Scope = dict[object, uuid.UUID]  # a source (model, alias, table or CTE name) -> its org
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
        # The org of each CTE whose rows' org_id is known (by name: Peewee's union_all()
        # makes a new CTE object, and the recursive term refers to the old one).
        self.cte_orgs: dict[str, uuid.UUID] = {}

    def query(self, query: Any, outer: _Scope) -> _Scope:
        if isinstance(query, NoopModelSelect):  # SELECT 0 WHERE 0: reads no table
            return outer
        if isinstance(query, CompoundSelectQuery):
            self.ctes(query, outer)
            self.query(query.lhs, outer)
            return self.query(query.rhs, outer)
        if isinstance(query, Select):
            return self.select(query, outer)
        if isinstance(query, Update):
            return self.update(query, outer)
        if isinstance(query, Delete):
            _refuse_root_write(query.table, "DELETE")
            return self.write(query, query.table, [], outer)
        if isinstance(query, Insert):
            return self.insert(query, outer)
        if isinstance(query, RawQuery):
            self.raw_text(pi.raw_sql(query))
            return outer
        raise UnscopedQueryError(f"cannot verify a {type(query).__name__}: use cross_org()")

    # -- statements --

    def select(self, query: Any, outer: _Scope) -> _Scope:
        self.ctes(query, outer)
        sources: list[_Source] = []
        predicates = [_Predicate(e, _ANY) for e in _and_terms(pi.where(query))]
        derived: list[Any] = []
        for item in pi.from_list(query):
            self.collect(item, sources, predicates, derived)
        scope = self.solve(sources, predicates, outer)
        # Derived tables are walked with the solved scope: a LATERAL one may be pinned by
        # its correlation to a scoped table (org_id = base.org_id).
        for sub in derived:
            self.query(sub, scope)
        # The predicates hold WHERE's and every ON's terms.
        clauses = (*pi.select_clauses(query), [p.expr for p in predicates])
        self.subqueries(clauses, scope)
        return scope

    def update(self, query: Any, outer: _Scope) -> _Scope:
        column = _org_column_of(query.table)
        for target in pi.update_values(query):
            if _column_name(target) == column:
                raise CrossOrgError(f"an UPDATE cannot change {column}: rows never move "
                                    "between orgs (insert a copy under the other org instead)")
        scope = self.write(query, query.table, pi.update_from(query), outer)
        self.subqueries([list(pi.update_values(query).values())], scope)
        return scope

    def write(self, query: Any, table: Any, extra: list[Any], outer: _Scope) -> _Scope:
        self.ctes(query, outer)
        sources: list[_Source] = []
        predicates = [_Predicate(e, _ANY) for e in _and_terms(pi.where(query))]
        derived: list[Any] = []
        for item in [table, *extra]:
            self.collect(item, sources, predicates, derived)
        scope = self.solve(sources, predicates, outer)
        for sub in derived:
            self.query(sub, scope)
        self.subqueries((pi.where(query), pi.returning(query), [p.expr for p in predicates]),
                        scope)
        return scope

    def insert(self, query: Any, outer: _Scope) -> _Scope:
        _refuse_root_write(query.table, "INSERT")
        self.ctes(query, outer)
        table = _tenant_table(query.table)
        rows = pi.insert_rows(query)
        if isinstance(rows, SelectBase):
            scope = self.query(rows, outer)
            if table is not None:
                self.tenant = True
                self.orgs.add(self.inserted_org_of_select(query, rows, scope, table))
        else:
            if table is not None:
                self.tenant = True
                for org in self.inserted_orgs(query, rows, table):
                    self.orgs.add(org)
            self.subqueries([_row_values(rows)], outer)  # INSERT ... VALUES ((SELECT ...))
        self.subqueries([pi.returning(query)], outer)
        conflict = pi.on_conflict(query)
        if conflict is not None:
            update = pi.conflict_update(conflict)
            if any(_column_name(c) == ORG_COLUMN for c in update):
                raise CrossOrgError("an upsert cannot change org_id")
            self.subqueries([list(update.values()), *pi.conflict_clauses(conflict)], outer)
        return outer

    def inserted_orgs(self, query: Any, rows: Any, table: str) -> Iterator[uuid.UUID]:
        if isinstance(rows, dict):
            rows = [rows]
        if not isinstance(rows, (list, tuple)):
            raise UnscopedQueryError(f"INSERT INTO {table}: pass the rows as a list so their "
                                     "org can be checked")
        columns = [_column_name(c) for c in pi.insert_columns(query)]
        for row in rows:
            yield _org_of_row(row, columns, table)

    def inserted_org_of_select(self, query: Any, select: Any, scope: _Scope,
                               table: str) -> uuid.UUID:
        columns = [_column_name(c) for c in pi.insert_columns(query)]
        if ORG_COLUMN not in columns or not isinstance(select, Select):  # not a UNION
            raise MissingOrgError(f"INSERT INTO {table} ... SELECT must insert org_id")
        source = pi.returning(select)[columns.index(ORG_COLUMN)]
        key = _org_column_key(source)
        if key is not None and key in scope:
            return scope[key]
        if _is_constant(source):
            return require_org(_constant(source), f"INSERT INTO {table}")
        raise UnscopedQueryError(f"INSERT INTO {table} ... SELECT: org_id must be a constant "
                                 "or the org_id of a scoped table")

    # -- CTEs --

    def ctes(self, query: Any, outer: _Scope) -> None:
        for cte in pi.ctes(query):
            name = pi.alias(cte)
            if name.lower() in TENANT_TABLES:
                raise UnscopedQueryError(
                    f"a CTE named {name} would hide the tenant table {name} from the rest of "
                    "the statement: give the CTE another name")
            org = self.cte_query(pi.cte_query(cte), outer, cte, name)
            if org is not None:
                self.cte_orgs[name] = org

    def cte_query(self, query: Any, outer: _Scope, cte: Any, name: str) -> uuid.UUID | None:
        """Walk a CTE's query; return the org of its rows' ``org_id`` column if known."""
        if isinstance(query, CompoundSelectQuery):
            self.ctes(query, outer)
            left = self.cte_query(query.lhs, outer, cte, name)
            if left is not None and pi.is_recursive(cte):
                self.cte_orgs[name] = left  # the recursive term reads the anchor's rows
            right = self.cte_query(query.rhs, outer, cte, name)
            return left if left == right else None
        if isinstance(query, Select):
            scope = self.select(query, outer)
            return _output_org(query, scope, pi.cte_columns(cte))
        self.query(query, outer)
        return None

    # -- sources and predicates --

    def collect(self, item: Any, sources: list[_Source], predicates: list[_Predicate],
                derived: list[Any]) -> frozenset[object]:
        """Add ``item``'s sources; returns their keys (for join ON applicability)."""
        if isinstance(item, Join):
            on = pi.join_on(item)
            left = self.collect(item.lhs, sources, predicates, derived)
            right = self.collect(item.rhs, sources, predicates, derived)
            applies = _join_applies(item.join_type, left, right)
            terms = _and_terms(on) if isinstance(on, peewee.Node) else []
            predicates.extend(_Predicate(t, applies) for t in terms)
            return left | right
        if isinstance(item, SelectBase):
            derived.append(item)
            return frozenset()
        if isinstance(item, SQL):
            self.raw_text(item.sql)
            return frozenset()
        if isinstance(item, CTE):
            key = _cte_key(_alias_of(item))
            sources.append(_Source(key, None))
            return frozenset([key])
        if isinstance(item, Entity):
            self.entity(item)
            return frozenset()
        if isinstance(item, str):
            self.raw_text(item)
            return frozenset()
        if not _is_source(item):  # a table function, VALUES list, ...: check what it holds
            self.subqueries([item], {})
            return frozenset()
        table = _tenant_table(item)
        sources.append(_Source(item, table))
        if table is not None:
            self.tenant = True
        return frozenset([item])

    def solve(self, sources: list[_Source], predicates: list[_Predicate],
              outer: _Scope) -> _Scope:
        scope = dict(outer)
        for source in sources:
            # A table in this query's own FROM is a new scan of it, whatever the enclosing
            # query pinned under the same key (Peewee names a model the same in both).
            scope.pop(source.key, None)
            if isinstance(source.key, tuple) and source.key[1] in self.cte_orgs:
                scope[source.key] = self.cte_orgs[source.key[1]]
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
                column = org_column(source.table)
                raise UnscopedQueryError(
                    f"{source.table} is read or written without its org: add "
                    f"{source.table}.{column} == <org> (AND-ed, not OR-ed; for joins, in ON), "
                    "or use cross_org(reason) for admin work"
                )
            self.orgs.add(scope[source.key])
        return scope

    def pin(self, predicate: _Predicate, scope: _Scope
            ) -> tuple[object, object, _Predicate] | None:
        """Apply an ``org_id = <constant>`` predicate to ``scope``; return an
        ``org_id = org_id`` predicate as a link for :meth:`solve` to follow."""
        expr = predicate.expr
        if isinstance(expr, Expression) and expr.op == OP.OR:
            # (t.org_id = A OR t.org_id IS NULL): org_id is NOT NULL in every tenant table,
            # so only a row an outer join null-extended passes the second arm; it holds no
            # row of t. This is how a RIGHT or FULL join from a scoped query keeps its rows.
            expr = _null_tolerant(expr)
            if expr is None:
                return None
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
        if ";" in _STRINGS_AND_COMMENTS.sub(" ", sql):
            raise UnscopedQueryError("an SQL(...) fragment may not end its statement (;): "
                                     "run separate statements separately")
        check_raw_sql(sql, scoped=False)

    def entity(self, node: Any) -> None:
        path = pi.entity_path(node)
        names = [part.strip('"').lower() for part in path]
        hit = next((n for n in names if n in TENANT_TABLES), None)
        if hit is not None:
            raise UnscopedQueryError(f"Entity({', '.join(path)}) names the tenant table "
                                     f"{hit}, which cannot be verified: use its model")

    def function(self, node: Any) -> None:
        name = str(node.name).strip('"').lower().rsplit(".", 1)[-1]
        if name in _DENIED_FUNCTIONS:
            raise UnscopedQueryError(
                f"{node.name}() changes settings (the role, or the org row-level security "
                "checks) and is refused in queries: the library sets them per statement")


# -- helpers ------------------------------------------------------------------------------

# Nodes that can hold no query: columns, plain values, names.
_LEAVES = (Field, Column, str, int, float, uuid.UUID, type(None))


def _and_terms(expr: Any) -> list[Any]:
    if expr is None:
        return []
    if isinstance(expr, Expression) and expr.op == OP.AND:
        return _and_terms(expr.lhs) + _and_terms(expr.rhs)
    return [expr]


def _null_tolerant(expr: Any) -> Any:
    """``t.org_id = A`` if ``expr`` is ``t.org_id = A OR t.org_id IS NULL``, else None."""
    for eq, null in ((expr.lhs, expr.rhs), (expr.rhs, expr.lhs)):
        if (isinstance(eq, Expression) and eq.op == OP.EQ and isinstance(null, Expression)
                and null.op == OP.IS and null.rhs is None):
            key = _org_column_key(null.lhs)
            if key is not None and key is _org_column_key(eq.lhs) and _is_constant(eq.rhs):
                return eq
    return None


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


def _table_name(source: Any) -> str | None:
    if isinstance(source, ModelAlias):
        source = source.model
    if isinstance(source, Table):
        return str(source.__name__)
    if isinstance(source, type) and hasattr(source, "_meta"):
        return str(source._meta.table_name)
    return None


def _is_source(item: Any) -> bool:
    return isinstance(item, (ModelAlias, Table)) or (
        isinstance(item, type) and hasattr(item, "_meta"))


def _tenant_table(source: Any) -> str | None:
    name = _table_name(source)
    return name if name in TENANT_TABLES else None


def _org_column_of(source: Any) -> str:
    name = _table_name(source)
    return org_column(name) if name is not None else ORG_COLUMN


def _refuse_root_write(table: Any, statement: str) -> None:
    if _table_name(table) == ROOT_TABLE:
        fix = "create_org()" if statement == "INSERT" else "delete_org(org_id, reason=...)"
        raise UnscopedQueryError(f"{statement} on {ROOT_TABLE} is admin work: use {fix} "
                                 "(the application role has no such right)")


def _cte_key(name: str) -> tuple[str, str]:
    return ("cte", str(name))


def _org_column_key(node: Any) -> object | None:
    """The source whose org column (``org_id``; ``id`` of ``org``) ``node`` is, else None."""
    source: object = None
    if isinstance(node, FieldAlias):
        if node.field.column_name == _org_column_of(node.source):
            source = node.source
    elif isinstance(node, Field):
        model = getattr(node, "model", None)
        if model is not None and node.column_name == _org_column_of(model):
            source = model
    elif isinstance(node, Column):
        if isinstance(node.source, CTE):
            return _cte_key(_alias_of(node.source)) if node.name == ORG_COLUMN else None
        if node.name == _org_column_of(node.source):
            source = node.source
    return source


def _alias_of(node: Any) -> str:
    """A CTE's or an alias's name."""
    return pi.alias(node)


def _output_org(select: Any, scope: _Scope, columns: Any) -> uuid.UUID | None:
    """The org of the ``org_id`` column ``select`` returns, if it is a scoped org column."""
    names = [_column_name(c) for c in columns] if columns else None
    for index, node in enumerate(pi.returning(select)):
        if names is not None:
            named = names[index] if index < len(names) else None
        else:
            named = _alias_of(node) if isinstance(node, peewee.Alias) else _column_name(node)
        if named != ORG_COLUMN:
            continue
        inner = node.node if isinstance(node, peewee.Alias) else node
        key = _org_column_key(inner)
        if key is not None:
            return scope.get(key)
        return require_org(_constant(inner), "CTE org_id") if _is_constant(inner) else None
    return None


def _column_name(column: Any) -> str | None:
    if isinstance(column, str):
        return column
    if isinstance(column, FieldAlias):
        return str(column.field.column_name)
    if isinstance(column, Field):
        return str(column.column_name)
    if isinstance(column, Column):
        return str(column.name)
    if isinstance(column, Entity):
        return pi.entity_path(column)[-1]
    return None


def _is_constant(node: Any) -> bool:
    if isinstance(node, Value):
        return not isinstance(node.value, (list, tuple, set))
    return not isinstance(node, (peewee.Node, list, tuple, set, dict))


def _constant(node: Any) -> Any:
    return node.value if isinstance(node, Value) else node


def _row_values(rows: Any) -> list[Any]:
    if isinstance(rows, dict):
        return list(rows.values())
    if isinstance(rows, (list, tuple)):
        return [list(r.values()) if isinstance(r, dict) else r for r in rows]
    return [rows]


def _org_of_row(row: Any, columns: list[str | None], table: str) -> uuid.UUID:
    if isinstance(row, dict):
        for column, value in row.items():
            if _column_name(column) == ORG_COLUMN:
                return require_org(_constant(value), f"INSERT INTO {table}")
    elif isinstance(row, (list, tuple)) and ORG_COLUMN in columns:
        return require_org(_constant(row[columns.index(ORG_COLUMN)]), f"INSERT INTO {table}")
    raise MissingOrgError(f"INSERT INTO {table} needs org_id in every row")


def _subqueries(root: Any, walk: _Walk) -> list[Any]:
    """Queries nested anywhere in an expression tree (not descending into them); checks the
    functions, raw fragments and entities met on the way.

    An explicit stack rather than recursive generators: this runs on every statement.
    """
    found, stack = [], [root]
    while stack:
        node = stack.pop()
        if isinstance(node, _LEAVES):  # the common case (selected columns): nothing inside
            continue
        if isinstance(node, (SelectBase, Update, Delete, Insert)):
            found.append(node)
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
        elif isinstance(node, Expression):
            stack += (node.lhs, node.rhs)
        elif isinstance(node, Function):
            walk.function(node)
            stack.extend(node.arguments or ())
            stack += pi.function_clauses(node)
        elif isinstance(node, NodeList):
            stack.extend(node.nodes)
        elif isinstance(node, WrappedNode):
            stack.append(node.node)
        else:
            stack.extend(_other_children(node, walk))
    return found


def _other_children(node: Any, walk: _Walk) -> list[Any]:
    """What the less common nodes hold (checking raw fragments and entities on the way)."""
    if isinstance(node, SQL):
        walk.raw_text(node.sql)
        return list(node.params or ())
    if isinstance(node, Case):
        return [node.predicate, list(node.expression_tuples), node.default]
    if isinstance(node, Value):
        return list(node.value) if isinstance(node.value, (list, tuple)) else []
    if isinstance(node, Entity):
        walk.entity(node)
        return []
    if isinstance(node, dict):
        return list(node.values())
    if isinstance(node, ValuesList):
        return pi.values_rows(node)
    if isinstance(node, peewee.Node) and not _is_source(node) and not isinstance(node, CTE):
        # Any other node (a window's PARTITION BY, ...): every attribute may hold a query.
        return [v for v in vars(node).values()
                if isinstance(v, (peewee.Node, list, tuple, dict))]
    return []
