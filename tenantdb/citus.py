"""Citus: detect a coordinator, distribute the schema, verify the distribution.

Nothing here runs on plain PostgreSQL beyond one detection query (cached per database).
On a Citus coordinator, :func:`distribute` (called by ``tenantdb migrate`` after the
migrations) turns ``org`` into a reference table (a copy on every node) and every tenant
table (a table with ``org_id``) into a hash-distributed table on ``org_id``, all in one
colocation group, so one org's rows of every table live in the same shard group and every
scoped statement, join included, runs on one worker. Rules Citus 13.2 enforces, and how the
step meets them:

- a foreign key from a local (not yet distributed) table to a distributed one, or from a
  distributed table to a local one, is refused: ``org`` becomes a reference table first,
  then tenant tables are distributed parents first (a table whose tenant-table foreign keys
  all point at distributed tables can be distributed with its keys in place);
- ``ON DELETE SET NULL (col)`` on a key that includes ``org_id`` is refused: migration
  V01_07 replaced the one the schema had;
- ``ALTER TABLE ... SET STORAGE`` is refused on a distributed table: the migrations set
  storage before this step runs, and the shards copy the table's column settings.

Each ``create_distributed_table`` commits on its own, so an interrupted run leaves some
tables distributed and a rerun distributes the rest; the migration lock serialises runs.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from .check import TENANT_TABLE_NAMES_SQL, Violation
from .errors import ConfigurationError, MigrationError

__all__ = [
    "DISTRIBUTION_COLUMN",
    "REFERENCE_TABLES",
    "SHARD_ROWS_TTL_S",
    "DistributionIssue",
    "cached_table_rows",
    "create_database",
    "distribute",
    "distribution_issues",
    "drop_database",
    "forget_engines",
    "is_coordinator",
    "register_workers",
    "violated_constraint",
    "table_rows",
]

DISTRIBUTION_COLUMN = "org_id"
#: Tables every node holds a full copy of (tenant tables reference them).
REFERENCE_TABLES = ("org",)

# SQL
IS_COORDINATOR_SQL = """
    SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus')
"""
CITUS_ROLE_SQL = "SELECT citus_is_coordinator()"
# What Citus knows of each table: 'h' hash-distributed (with its column), 'n' reference or
# Citus-local (replication model 't' is a reference table), and the colocation group.
PARTITIONS_SQL = """
    SELECT c.relname, p.partmethod, p.repmodel, p.colocationid,
           CASE WHEN p.partmethod = 'h'
                THEN column_to_column_name(p.logicalrelid, p.partkey) END
    FROM pg_dist_partition p
    JOIN pg_class c ON c.oid = p.logicalrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = current_schema()
"""
# Foreign keys from or to the given tables, with their definitions, to drop and re-add.
KEYS_TOUCHING_SQL = """
    SELECT t.relname, k.conname, pg_get_constraintdef(k.oid)
    FROM pg_constraint k
    JOIN pg_class t ON t.oid = k.conrelid
    JOIN pg_class r ON r.oid = k.confrelid
    JOIN pg_namespace n ON n.oid = t.relnamespace
    WHERE k.contype = 'f' AND n.nspname = current_schema()
      AND (t.relname = ANY(%s) OR r.relname = ANY(%s))
    ORDER BY t.relname, k.conname
"""
DROP_KEY_SQL = "ALTER TABLE {} DROP CONSTRAINT {}"
ADD_KEY_SQL = "ALTER TABLE {} ADD CONSTRAINT {} {}"
_SET_ACTION = re.compile(r"\s+ON DELETE SET (NULL|DEFAULT)(\s*\([^)]*\))?", re.IGNORECASE)
_CONSTRAINT_IN_MESSAGE = re.compile(r'violates (?:foreign key|unique|check) constraint "([^"]+)"')
_SHARD_SUFFIX = re.compile(r"_\d+$")
SEQUENTIAL_SQL = "SET LOCAL citus.multi_shard_modify_mode TO 'sequential'"
CREATE_REFERENCE_SQL = "SELECT create_reference_table(%s)"
CREATE_DISTRIBUTED_SQL = "SELECT create_distributed_table(%s, %s, colocate_with => %s)"
# The first distributed table starts a group of its own; the others join it.
COLOCATE_FIRST = "none"
# Shard statistics, summed over the shards of one distributed table: the planner row
# estimate each worker keeps (pg_class.reltuples of the shard; -1 before any ANALYZE).
SHARD_ROWS_SQL = """
    SELECT coalesce(sum(greatest(result::float8, 0)), 0), bool_and(result::float8 < 0)
    FROM run_command_on_shards(%s, $$SELECT reltuples FROM pg_class
                                     WHERE oid = '%%s'::regclass$$)
    WHERE success
"""
WORKERS_SQL = """
    SELECT nodename, nodeport FROM pg_dist_node
    WHERE groupid <> 0 AND noderole = 'primary' ORDER BY nodeid
"""
SET_COORDINATOR_SQL = "SELECT citus_set_coordinator_host(%s, %s)"
ADD_NODE_SQL = "SELECT citus_add_node(%s, %s)"
DATABASE_EXISTS_SQL = "SELECT 1 FROM pg_database WHERE datname = %s"
CREATE_EXTENSION_SQL = "CREATE EXTENSION IF NOT EXISTS citus"

_cache: dict[tuple[str | None, int | None, str | None], bool] = {}


class DistributionIssue(Violation):
    """A table not distributed the way the schema needs on Citus: a check violation."""

    @property
    def table(self) -> str:
        """The table (the violation's ``where``)."""
        return self.where


# -- detection ----------------------------------------------------------------------------


def is_coordinator(conn: psycopg2.extensions.connection) -> bool:
    """Whether ``conn``'s database is a Citus coordinator (the extension is installed and
    this node is the coordinator). Cached per host, port and database: one query per
    database per process. Runs in the connection's current transaction state."""
    info = conn.info
    key = (info.host, info.port, info.dbname)
    found = _cache.get(key)
    if found is None:
        with conn.cursor() as cur:
            cur.execute(IS_COORDINATOR_SQL)
            row = cur.fetchone()
            found = bool(row and row[0])
            if found:
                cur.execute(CITUS_ROLE_SQL)
                row = cur.fetchone()
                found = bool(row and row[0])
        _cache[key] = found
    return found


def forget_engines() -> None:
    """Forget what :func:`is_coordinator` found (a database dropped and re-created) and
    the cached table sizes."""
    _cache.clear()
    _rows_cache.clear()


# -- distribution -------------------------------------------------------------------------


def distribute(conn: psycopg2.extensions.connection) -> list[str]:
    """Distribute the schema if ``conn`` is on a Citus coordinator; returns what changed.

    One transaction: the foreign keys touching the tables still to distribute are dropped,
    ``org`` becomes a reference table, the tenant tables are distributed by ``org_id`` into
    one colocation group, and the keys are added back (Citus accepts a key between two
    tables only once both are distributed: with the keys in place, making ``org`` a
    reference table turns every table pointing at it into a Citus-local table that a
    distributed parent may not be referenced from). A failure rolls all of it back, so a
    rerun starts clean; tables already distributed as required are left alone.

    :raises MigrationError: a table is distributed differently than the schema needs (by
        another column, or in another colocation group), or Citus refuses a step (its
        message is kept, with the table).
    """
    conn.autocommit = True
    if not is_coordinator(conn):
        return []
    conn.autocommit = False
    done: list[str] = []
    try:
        with conn, conn.cursor() as cur:
            # DDL on a distributed table after a parallel operation in the same transaction
            # is refused; one connection per node for the whole step avoids that.
            cur.execute(SEQUENTIAL_SQL)
            cur.execute(TENANT_TABLE_NAMES_SQL)
            tenant = [name for (name,) in cur.fetchall()]
            known = _partitions(cur)
            wrong = [str(i) for i in _issues(tenant, known)
                     if i.table in known and known[i.table].method == "h"]
            if wrong:  # distributed, but not as required: never rewritten silently
                raise MigrationError("cannot distribute: " + "; ".join(wrong) + ": "
                                     "undistribute those tables (undistribute_table) and rerun")
            references = [t for t in REFERENCE_TABLES if _exists(cur, t)
                          and not _is_reference(known.get(t))]
            tables = [t for t in tenant if known.get(t) is None or known[t].method != "h"]
            if not references and not tables:
                return []
            keys = _foreign_keys(cur, [*references, *tables])
            for table, name, _ in keys:
                cur.execute(sql.SQL(DROP_KEY_SQL).format(sql.Identifier(table),
                                                         sql.Identifier(name)))
            for table in references:
                _citus_call(cur, CREATE_REFERENCE_SQL, (table,), table)
                done.append(f"{table}: reference table")
            group = next((t for t in tenant if t in known and known[t].method == "h"), None)
            for table in tables:
                _citus_call(cur, CREATE_DISTRIBUTED_SQL,
                            (table, DISTRIBUTION_COLUMN, group or COLOCATE_FIRST), table)
                group = group or table
                done.append(f"{table}: distributed by {DISTRIBUTION_COLUMN}")
            for table, name, original in keys:
                # The definition comes from pg_get_constraintdef: the database's own text.
                definition, dropped = _citus_key(original)
                if dropped:
                    done.append(f"{table}.{name}: {dropped} left out (Citus refuses it "
                                "on a key holding org_id): unlink before deleting the parent")
                _citus_call(cur, sql.SQL(ADD_KEY_SQL).format(
                    sql.Identifier(table), sql.Identifier(name), sql.SQL(definition)),
                    (), f"{table} (foreign key {name})")
    finally:
        conn.autocommit = True
    return done


def distribution_issues(conn: psycopg2.extensions.connection) -> list[DistributionIssue]:
    """What is not distributed as required (empty on plain PostgreSQL)."""
    if not is_coordinator(conn):
        return []
    with conn.cursor() as cur:
        cur.execute(TENANT_TABLE_NAMES_SQL)
        tenant = [name for (name,) in cur.fetchall()]
        known = _partitions(cur)
        missing_refs = [t for t in REFERENCE_TABLES if _exists(cur, t)]
    issues = list(_issues(tenant, known))
    for table in missing_refs:
        info = known.get(table)
        if info is None or info.method != "n" or info.replication != "t":
            issues.append(DistributionIssue(table, "is not a reference table (run tenantdb "
                                                   "migrate)"))
    return issues


def violated_constraint(error: BaseException) -> str | None:
    """The name of the constraint ``error`` (a psycopg2 or Peewee error) reports, as the
    schema names it. On Citus the violation happens on a shard: the driver's diagnostics
    carry no constraint name, and the message names the shard's copy (``name_102045``)."""
    orig = getattr(error, "orig", error)
    name = getattr(getattr(orig, "diag", None), "constraint_name", None)
    if name is None:
        found = _CONSTRAINT_IN_MESSAGE.search(str(orig))
        name = found.group(1) if found else None
    return None if name is None else _SHARD_SUFFIX.sub("", name)


# -- knowledge search: sizes from the shards ------------------------------------------------


def table_rows(cursor: Any, table: str) -> float | None:
    """``table``'s estimated row count from its shards' statistics, or ``None`` when the
    database is not a Citus coordinator (use ``pg_class.reltuples`` then). ``-1`` when no
    shard has been analysed yet, as ``reltuples`` says."""
    if not is_coordinator(cursor.connection):
        return None
    cursor.execute(SHARD_ROWS_SQL, (table,))
    total, never_analysed = cursor.fetchone()
    return -1.0 if never_analysed else float(total)


#: How long a size summed from the shards is reused: the search only compares an org's
#: rows with a fraction of the table, and asking every shard costs a round trip to each.
SHARD_ROWS_TTL_S = 60.0
_rows_cache: dict[tuple[str | None, int | None, str | None, str], tuple[float, float]] = {}


def cached_table_rows(conn: psycopg2.extensions.connection, table: str) -> float | None:
    """:func:`table_rows`, reused for :data:`SHARD_ROWS_TTL_S` seconds per database."""
    if not is_coordinator(conn):
        return None
    info = conn.info
    key = (info.host, info.port, info.dbname, table)
    now = time.monotonic()
    hit = _rows_cache.get(key)
    if hit is not None and now - hit[0] < SHARD_ROWS_TTL_S:
        return hit[1]
    with conn.cursor() as cur:
        rows = table_rows(cur, table)
    if rows is None:
        return None
    _rows_cache[key] = (now, rows)
    return rows


# -- databases on every node ----------------------------------------------------------------


def create_database(server_url: str, name: str,
                    workers: Sequence[tuple[str, int]] | None = None) -> None:
    """Create database ``name`` where ``server_url`` points; on a Citus coordinator, on
    every worker too, with the ``citus`` extension everywhere and the workers registered.

    Citus 13 does not propagate ``CREATE DATABASE``. The workers are ``workers`` or, by
    default, those registered in ``server_url``'s database. Idempotent.
    """
    workers = list(workers) if workers is not None else _registered_workers(server_url)
    parts = urlsplit(server_url)
    _create_if_missing(server_url, name)
    for host, port in workers:
        _create_if_missing(parts._replace(netloc=_netloc(parts, host, port)).geturl(), name)
    if workers:
        register_workers(_with_database(server_url, name), workers)


def register_workers(url: str, workers: Sequence[tuple[str, int]]) -> None:
    """Make ``url``'s database a Citus coordinator of ``workers`` (the same database name on
    each): the extension on every node, the coordinator's address, the workers. Idempotent
    (``citus_add_node`` returns the existing node)."""
    parts = urlsplit(url)
    for host, port in workers:
        _run(parts._replace(netloc=_netloc(parts, host, port)).geturl(),
             [(CREATE_EXTENSION_SQL, ())])
    _run(url, [(CREATE_EXTENSION_SQL, ()),
               (SET_COORDINATOR_SQL, (parts.hostname or "127.0.0.1", parts.port or 5432)),
               *[(ADD_NODE_SQL, (host, port)) for host, port in workers]])
    forget_engines()


def drop_database(server_url: str, name: str) -> None:
    """Drop database ``name`` where ``server_url`` points and on its registered workers."""
    workers = _registered_workers(_with_database(server_url, name), missing_ok=True)
    parts = urlsplit(server_url)
    drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
    _run(server_url, [(drop, ())])
    for host, port in workers:
        _run(parts._replace(netloc=_netloc(parts, host, port)).geturl(), [(drop, ())])
    forget_engines()


# -- helpers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Partition:
    method: str
    replication: str
    group: int
    column: str | None
    table: str


def _partitions(cur: psycopg2.extensions.cursor) -> dict[str, _Partition]:
    cur.execute(PARTITIONS_SQL)
    return {name: _Partition(method, repl, group, column, name)
            for name, method, repl, group, column in cur.fetchall()}


def _issues(tenant: Iterable[str], known: dict[str, _Partition]) -> Iterator[DistributionIssue]:
    groups: dict[int, list[str]] = {}
    for table in tenant:
        info = known.get(table)
        if info is None:
            yield DistributionIssue(table, "is not distributed (run tenantdb migrate)")
        elif info.method != "h":
            yield DistributionIssue(table, "is a reference or local table, not distributed "
                                           f"by {DISTRIBUTION_COLUMN}")
        elif info.column != DISTRIBUTION_COLUMN:
            yield DistributionIssue(table, f"is distributed by {info.column}, not "
                                           f"{DISTRIBUTION_COLUMN}")
        else:
            groups.setdefault(info.group, []).append(table)
    if len(groups) > 1:
        for group, tables in sorted(groups.items())[1:]:
            for table in tables:
                yield DistributionIssue(table, f"is in colocation group {group}, apart from "
                                               "the other tenant tables")


def _citus_key(definition: str) -> tuple[str, str | None]:
    """``definition`` without an ``ON DELETE SET NULL/SET DEFAULT (cols)`` action, which
    Citus refuses when the key holds the distribution column, and the action removed."""
    match = _SET_ACTION.search(definition)
    if match is None:
        return definition, None
    return definition[:match.start()] + definition[match.end():], match.group(0).strip()


def _is_reference(info: _Partition | None) -> bool:
    return info is not None and info.method == "n" and info.replication == "t"


def _foreign_keys(cur: psycopg2.extensions.cursor, tables: list[str]
                  ) -> list[tuple[str, str, str]]:
    cur.execute(KEYS_TOUCHING_SQL, (tables, tables))
    return [(table, name, definition) for table, name, definition in cur.fetchall()]


def _exists(cur: psycopg2.extensions.cursor, table: str) -> bool:
    cur.execute("SELECT to_regclass(%s) IS NOT NULL", (table,))
    row = cur.fetchone()
    return bool(row and row[0])


def _citus_call(cur: psycopg2.extensions.cursor, statement: str | sql.Composable,
                params: tuple[Any, ...],
                table: str) -> None:
    try:
        cur.execute(statement, params)
    except psycopg2.Error as exc:
        raise MigrationError(f"Citus refused to distribute {table}: "
                             f"{str(exc).strip()}") from exc


def _registered_workers(url: str, missing_ok: bool = False) -> list[tuple[str, int]]:
    try:
        conn = psycopg2.connect(url)
    except psycopg2.OperationalError:
        if missing_ok:
            return []
        raise
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            if not is_coordinator(conn):
                return []
            cur.execute(WORKERS_SQL)
            return [(host, int(port)) for host, port in cur.fetchall()]
    finally:
        conn.close()


def _create_if_missing(server_url: str, name: str) -> None:
    conn = _autocommit(server_url)
    try:
        with conn.cursor() as cur:
            cur.execute(DATABASE_EXISTS_SQL, (name,))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    finally:
        conn.close()


def _run(url: str, statements: list[tuple[str | sql.Composable, tuple[Any, ...]]]) -> None:
    conn = _autocommit(url)
    try:
        with conn.cursor() as cur:
            for statement, params in statements:
                cur.execute(statement, params)
    finally:
        conn.close()


def _autocommit(url: str) -> psycopg2.extensions.connection:
    try:
        conn = psycopg2.connect(url)
    except psycopg2.OperationalError as exc:
        raise ConfigurationError(f"cannot connect to {_redact(url)}: {str(exc).strip()}") from exc
    conn.autocommit = True
    return conn


def _with_database(url: str, name: str) -> str:
    return urlsplit(url)._replace(path=f"/{name}").geturl()


def _netloc(parts: Any, host: str, port: int) -> str:
    auth = parts.netloc.rpartition("@")[0]
    return f"{auth}@{host}:{port}" if auth else f"{host}:{port}"


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@"))\
            .geturl()
    return url
