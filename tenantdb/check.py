"""``tenantdb check``: lint a live schema against the tenancy rules.

Every tenant table (a table with an ``org_id`` column) must have ``org_id NOT NULL``, a
primary key and unique keys that include ``org_id``, composite foreign keys to other tenant
tables, row-level security enabled and forced (``org`` too) with a policy for the
application role, and that role's grants; a table without ``org_id`` may not reference a
tenant table. An unmigrated (or partly migrated) database is a violation too: each missing
table and each pending migration is named. Application tables are covered like the
package's: every table of the schema is checked. The application login must not be able to
reach a role that bypasses row-level security: it is neither superuser nor ``BYPASSRLS``,
is a member (directly or through other roles) of no superuser, ``BYPASSRLS`` or admin role
(``SET ROLE`` would reach it), owns no table, can log in as itself, and has no default
``role`` setting (``RESET ROLE`` returns to the session's default: it must be itself).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import psycopg2.extensions

from .db import ADMIN_ROLE, APP_ROLE
from .db import owner_database_url as database_url

__all__ = ["TENANT_TABLE_NAMES_SQL", "Violation", "check_schema", "table_violations"]

# Where the tenant tables are found: every table of the schema with an ``org_id`` column.
_TENANT_TABLES_FROM_SQL = """
    FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'org_id' AND NOT a.attisdropped
    WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p')
    ORDER BY c.relname
"""
#: The tenant tables: every table of the schema with an ``org_id`` column (an application's
#: too); read by check, by Citus's distribution and by ``delete_org``.
TENANT_TABLE_NAMES_SQL = "SELECT c.relname" + _TENANT_TABLES_FROM_SQL
TENANT_TABLES_SQL = (
    "SELECT c.relname, a.attnotnull, c.relrowsecurity, c.relforcerowsecurity"
    + _TENANT_TABLES_FROM_SQL)
# Primary, unique and foreign keys of each table, with their column names.
KEYS_SQL = """
    SELECT c.conname, c.contype, t.relname,
           -- In key order: a foreign key pairs its columns position by position.
           array(SELECT a.attname FROM unnest(c.conkey) WITH ORDINALITY k(num, pos)
                 JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.num
                 ORDER BY k.pos) AS columns,
           r.relname AS referenced,
           array(SELECT a.attname FROM unnest(c.confkey) WITH ORDINALITY k(num, pos)
                 JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.num
                 ORDER BY k.pos) AS ref_columns
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
# Tenant tables without a policy that applies to the application role.
NO_APP_POLICY_SQL = """
    SELECT c.relname FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = current_schema() AND c.relname = ANY(%(tables)s)
      AND NOT EXISTS (SELECT 1 FROM pg_policies p
                      WHERE p.schemaname = n.nspname AND p.tablename = c.relname
                        AND %(role)s = ANY(p.roles))
    ORDER BY c.relname
"""
# Privileges the application role lacks on tenant tables (nothing if the role is missing:
# that is reported on its own).
MISSING_GRANTS_SQL = """
    SELECT c.relname, string_agg(p.priv, ', ' ORDER BY p.ord)
    FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    CROSS JOIN unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE'])
        WITH ORDINALITY AS p(priv, ord)
    WHERE n.nspname = current_schema() AND c.relname = ANY(%(tables)s)
      AND EXISTS (SELECT 1 FROM pg_roles WHERE rolname = %(role)s)
      AND NOT has_table_privilege(%(role)s, c.oid, p.priv)
    GROUP BY c.relname ORDER BY c.relname
"""
EXISTING_TABLES_SQL = """
    SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p')
"""
ROLE_SQL = "SELECT rolsuper, rolbypassrls, rolcanlogin FROM pg_roles WHERE rolname = %s"
# Every role the application role belongs to, through any chain of grants, inheritable or
# not: SET ROLE can take any of them.
REACHABLE_ROLES_SQL = """
    WITH RECURSIVE reach(oid) AS (
        SELECT oid FROM pg_roles WHERE rolname = %s
        UNION
        SELECT m.roleid FROM pg_auth_members m JOIN reach r ON m.member = r.oid
    )
    SELECT ro.rolname, ro.rolsuper, ro.rolbypassrls
    FROM reach JOIN pg_roles ro ON ro.oid = reach.oid
    WHERE ro.rolname <> %s
    ORDER BY ro.rolname
"""
# Tables of the schema owned by the application role or a role it belongs to.
OWNED_TABLES_SQL = """
    WITH RECURSIVE reach(oid) AS (
        SELECT oid FROM pg_roles WHERE rolname = %s
        UNION
        SELECT m.roleid FROM pg_auth_members m JOIN reach r ON m.member = r.oid
    )
    SELECT c.relname, pg_get_userbyid(c.relowner)
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
      AND c.relowner IN (SELECT oid FROM reach)
    ORDER BY c.relname
"""
# Per-role (or per-role-and-database) defaults: a default role would be where RESET ROLE
# goes, and a default session_authorization is no better.
ROLE_DEFAULTS_SQL = """
    SELECT unnest(s.setconfig)
    FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole
    WHERE r.rolname = %s
"""
ROOT_RLS_SQL = """
    SELECT c.relrowsecurity, c.relforcerowsecurity FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = current_schema() AND c.relname = 'org'
"""


@dataclass(frozen=True)
class Violation:
    """One broken rule: where, and what."""

    where: str
    problem: str

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}"


def check_schema(url: str | None = None,
                 locations: Iterable[Path | str] = ()) -> list[Violation]:
    """Every violation of the tenancy rules in the database at ``url`` (default: settings),
    pending migrations of the package and of ``locations`` (and of
    ``TENANTDB_MIGRATION_LOCATIONS``) included."""
    from .migrate import info  # migrate imports this module

    url = url or database_url()
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            found = [*_missing_tables(cur), *table_violations(cur), *_role_violations(cur),
                     *_distribution_violations(conn)]
    finally:
        conn.close()
    for row in info(url, locations):
        where = row.name if row.location == "tenantdb" else f"{row.location}/{row.name}"
        if row.state == "pending":
            found.append(Violation(where, "migration not applied (run tenantdb migrate)"))
        elif row.state == "changed":
            found.append(Violation(where, "edited after it was applied: add a new version"))
    return found


def _missing_tables(cur: psycopg2.extensions.cursor) -> Iterator[Violation]:
    from .models import ALL_MODELS

    cur.execute(EXISTING_TABLES_SQL)
    existing = {name for (name,) in cur.fetchall()}
    for model in ALL_MODELS:
        name = model._meta.table_name
        if name not in existing:
            yield Violation(name, "table is missing (run tenantdb migrate)")


def table_violations(cur: psycopg2.extensions.cursor) -> Iterator[Violation]:
    """The rules each table breaks (what ``tenantdb_protect()`` checks and sets up)."""
    cur.execute(TENANT_TABLES_SQL)
    tables = {name: (not_null, rls, forced) for name, not_null, rls, forced in cur.fetchall()}
    for name, (not_null, rls, forced) in tables.items():
        if not not_null:
            yield Violation(name, "org_id is nullable")
        if not rls:
            yield Violation(name, "row-level security is not enabled")
        if not forced:
            yield Violation(name, "row-level security is not forced (the owner bypasses it)")
    yield from _key_violations(cur, set(tables))
    yield from _policy_violations(cur, set(tables))


def _key_violations(cur: psycopg2.extensions.cursor, tables: set[str]) -> Iterator[Violation]:
    cur.execute(KEYS_SQL)
    keys = cur.fetchall()
    with_pk = {table for _, kind, table, *_ in keys if kind == "p"}
    for table in sorted(set(tables) - with_pk):
        yield Violation(table, "no primary key")
    for name, kind, table, columns, referenced, ref_columns in keys:
        if table not in tables:
            if kind == "f" and referenced in tables:
                yield Violation(f"{table}.{name}", f"references tenant table {referenced} but "
                                                   f"{table} has no org_id column")
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


def _policy_violations(cur: psycopg2.extensions.cursor, tables: set[str]
                       ) -> Iterator[Violation]:
    names = {"tables": sorted(tables), "role": APP_ROLE}
    cur.execute(NO_APP_POLICY_SQL, names)
    for (table,) in cur.fetchall():
        yield Violation(table, f"no row-level security policy for {APP_ROLE} "
                               f"(SELECT tenantdb_protect('{table}'))")
    cur.execute(MISSING_GRANTS_SQL, names)
    for table, privileges in cur.fetchall():
        yield Violation(table, f"{APP_ROLE} lacks {privileges} "
                               f"(SELECT tenantdb_protect('{table}'))")


def _composite(columns: list[str], ref_columns: list[str]) -> bool:
    return any(c == "org_id" and r == "org_id"
               for c, r in zip(columns, ref_columns, strict=False))


def _role_violations(cur: psycopg2.extensions.cursor) -> Iterator[Violation]:
    cur.execute(ROLE_SQL, (APP_ROLE,))
    row = cur.fetchone()
    if row is None:
        yield Violation(APP_ROLE, "role does not exist (run tenantdb migrate)")
        return
    superuser, bypass, can_login = row
    if superuser:
        yield Violation(APP_ROLE, "is a superuser: row-level security does not bind it")
    if bypass:
        yield Violation(APP_ROLE, "has BYPASSRLS: row-level security does not bind it")
    if not can_login:
        yield Violation(APP_ROLE, "cannot log in: the application must log in as itself, "
                                  "or RESET ROLE returns to a more privileged login")
    cur.execute(REACHABLE_ROLES_SQL, (APP_ROLE, APP_ROLE))
    for name, role_super, role_bypass in cur.fetchall():
        if role_super or role_bypass or name == ADMIN_ROLE:
            what = "superuser" if role_super else "BYPASSRLS" if role_bypass else "admin"
            yield Violation(APP_ROLE, f"is a member of {name} ({what}): SET ROLE {name} "
                                      f"switches the wall off; REVOKE {name} FROM {APP_ROLE}")
    cur.execute(OWNED_TABLES_SQL, (APP_ROLE,))
    for table, owner in cur.fetchall():
        yield Violation(f"{table}", f"owned by {owner}, which {APP_ROLE} can act as: owners "
                                    "can disable row-level security")
    cur.execute(ROLE_DEFAULTS_SQL, (APP_ROLE,))
    for (setting,) in cur.fetchall():
        if str(setting).split("=", 1)[0].lower() in ("role", "session_authorization"):
            yield Violation(APP_ROLE, f"has the default {setting}: RESET ROLE would go there")
    yield from _root_violations(cur)


def _root_violations(cur: psycopg2.extensions.cursor) -> Iterator[Violation]:
    cur.execute(ROOT_RLS_SQL)
    row = cur.fetchone()
    if row is None:
        return
    if not row[0]:
        yield Violation("org", "row-level security is not enabled (every org is visible)")
    elif not row[1]:
        yield Violation("org", "row-level security is not forced (the owner bypasses it)")


def _distribution_violations(conn: psycopg2.extensions.connection) -> Iterator[Violation]:
    """On a Citus coordinator: tenant tables distributed by org_id, colocated; org a
    reference table. Nothing on plain PostgreSQL."""
    from .citus import distribution_issues

    yield from distribution_issues(conn)
