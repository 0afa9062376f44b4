"""``tenantdb check``: lint a live schema against the tenancy rules.

Every tenant table (a table with an ``org_id`` column) must have ``org_id NOT NULL``, a
primary key and unique keys that include ``org_id``, composite foreign keys to other tenant
tables, and row-level security enabled and forced. The application role must be neither
superuser nor ``BYPASSRLS``, and must not inherit the bypass role's rights.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import psycopg2
import psycopg2.extensions

from .db import ADMIN_ROLE, APP_ROLE, database_url

__all__ = ["Violation", "check_schema"]

TENANT_TABLES_SQL = """
    SELECT c.relname, a.attnotnull, c.relrowsecurity, c.relforcerowsecurity
    FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'org_id' AND NOT a.attisdropped
    WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p')
    ORDER BY c.relname
"""
# Primary, unique and foreign keys of each table, with their column names.
KEYS_SQL = """
    SELECT c.conname, c.contype, t.relname,
           array(SELECT attname FROM pg_attribute
                 WHERE attrelid = c.conrelid AND attnum = ANY(c.conkey)) AS columns,
           r.relname AS referenced,
           array(SELECT attname FROM pg_attribute
                 WHERE attrelid = c.confrelid AND attnum = ANY(c.confkey)) AS ref_columns
    FROM pg_constraint c
    JOIN pg_class t ON t.oid = c.conrelid
    JOIN pg_namespace n ON n.oid = t.relnamespace
    LEFT JOIN pg_class r ON r.oid = c.confrelid
    WHERE n.nspname = current_schema() AND c.contype IN ('p', 'u', 'f')
    ORDER BY t.relname, c.conname
"""
UNIQUE_INDEXES_SQL = """
    SELECT i.relname, t.relname,
           array(SELECT attname FROM pg_attribute
                 WHERE attrelid = x.indrelid AND attnum = ANY(x.indkey))
    FROM pg_index x
    JOIN pg_class i ON i.oid = x.indexrelid
    JOIN pg_class t ON t.oid = x.indrelid
    JOIN pg_namespace n ON n.oid = t.relnamespace
    WHERE n.nspname = current_schema() AND x.indisunique AND NOT x.indisprimary
      AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = x.indexrelid)
"""
ROLE_SQL = "SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = %s"
# USAGE: whether the role *has the rights* of the other (membership with inheritance).
INHERITS_SQL = "SELECT pg_has_role(%s, %s, 'USAGE')"


@dataclass(frozen=True)
class Violation:
    """One broken rule: where, and what."""

    where: str
    problem: str

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}"


def check_schema(url: str | None = None) -> list[Violation]:
    """Every violation of the tenancy rules in the database at ``url`` (default: settings)."""
    conn = psycopg2.connect(url or database_url())
    try:
        with conn.cursor() as cur:
            return [*_table_violations(cur), *_role_violations(cur),
                    *_distribution_violations(conn)]
    finally:
        conn.close()


def _table_violations(cur: psycopg2.extensions.cursor) -> Iterator[Violation]:
    cur.execute(TENANT_TABLES_SQL)
    tables = {name: (not_null, rls, forced) for name, not_null, rls, forced in cur.fetchall()}
    for name, (not_null, rls, forced) in tables.items():
        if not not_null:
            yield Violation(name, "org_id is nullable")
        if not rls:
            yield Violation(name, "row-level security is not enabled")
        if not forced:
            yield Violation(name, "row-level security is not forced (the owner bypasses it)")
    cur.execute(KEYS_SQL)
    keys = cur.fetchall()
    with_pk = {table for _, kind, table, *_ in keys if kind == "p"}
    for table in sorted(set(tables) - with_pk):
        yield Violation(table, "no primary key")
    for name, kind, table, columns, referenced, ref_columns in keys:
        if table not in tables:
            continue
        if kind in ("p", "u") and "org_id" not in columns:
            label = "primary key" if kind == "p" else "unique key"
            yield Violation(f"{table}.{name}", f"{label} ({', '.join(columns)}) lacks org_id")
        if kind == "f" and referenced in tables and not _composite(columns, ref_columns):
            yield Violation(f"{table}.{name}",
                            f"foreign key to tenant table {referenced} does not pair org_id")
    cur.execute(UNIQUE_INDEXES_SQL)
    for index, table, columns in cur.fetchall():
        if table in tables and "org_id" not in columns:
            yield Violation(f"{table}.{index}", f"unique index ({', '.join(columns)}) "
                                                "lacks org_id")


def _composite(columns: list[str], ref_columns: list[str]) -> bool:
    return any(c == "org_id" and r == "org_id"
               for c, r in zip(columns, ref_columns, strict=False))


def _role_violations(cur: psycopg2.extensions.cursor) -> Iterator[Violation]:
    cur.execute(ROLE_SQL, (APP_ROLE,))
    row = cur.fetchone()
    if row is None:
        yield Violation(APP_ROLE, "role does not exist (run tenantdb migrate)")
        return
    superuser, bypass = row
    if superuser:
        yield Violation(APP_ROLE, "is a superuser: row-level security does not bind it")
    if bypass:
        yield Violation(APP_ROLE, "has BYPASSRLS: row-level security does not bind it")
    cur.execute(INHERITS_SQL, (APP_ROLE, ADMIN_ROLE))
    inherits = cur.fetchone()
    if inherits and inherits[0]:
        yield Violation(APP_ROLE, f"inherits {ADMIN_ROLE}, so its bypass policy always applies")


def _distribution_violations(conn: psycopg2.extensions.connection) -> Iterator[Violation]:
    """On a Citus coordinator: tenant tables distributed by org_id, colocated; org a
    reference table. Nothing on plain PostgreSQL."""
    from .citus import distribution_issues

    for issue in distribution_issues(conn):
        yield Violation(issue.table, issue.problem)
