"""Creating and deleting orgs: admin work, never the application role's.

The application role cannot insert or delete ``org`` rows (it has no such right, and a
cascading delete from ``org`` would reach every tenant table past row-level security).
:func:`create_org` and :func:`delete_org` run inside :func:`~tenantdb.context.cross_org`
themselves. :func:`delete_org` is an explicit, logged purge: children before parents, in
batches, each batch committed on its own (inside a caller's transaction each batch is a
savepoint and the caller's commit decides), so an interrupted run keeps what it did and a
rerun finishes the rest; the counts are exact because no cascade is left to do any work.
"""

from __future__ import annotations

import graphlib
import logging
import uuid
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from psycopg2 import sql

from .check import TENANT_TABLE_NAMES_SQL
from .context import OrgLike, cross_org, require_org
from .db import database
from .models import Org
from .validation import check_int, check_text
from .verifier import ORG_COLUMN, ROOT_TABLE

__all__ = ["DEFAULT_BATCH_SIZE", "create_org", "delete_org"]

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 1000
# (referencing table, referenced table) for every foreign key of the schema.
FOREIGN_KEYS_SQL = """
    SELECT t.relname, r.relname
    FROM pg_constraint k
    JOIN pg_class t ON t.oid = k.conrelid
    JOIN pg_class r ON r.oid = k.confrelid
    JOIN pg_namespace n ON n.oid = t.relnamespace
    WHERE k.contype = 'f' AND n.nspname = current_schema()
"""
PRIMARY_KEY_SQL = """
    SELECT a.attname
    FROM pg_index x
    JOIN pg_class c ON c.oid = x.indrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = ANY(x.indkey)
    WHERE x.indisprimary AND n.nspname = current_schema() AND c.relname = %s
    ORDER BY array_position(x.indkey, a.attnum)
"""
# One batch: the org's rows by primary key, at most LIMIT of them.
DELETE_BATCH_SQL = sql.SQL(
    "DELETE FROM {table} WHERE ({key}) IN "
    "(SELECT {key} FROM {table} WHERE {org} = %s LIMIT %s)"
)
DELETE_ORG_ROW_SQL = "DELETE FROM org WHERE id = %s"


def create_org(name: str, slug: str, *, org_id: OrgLike | None = None) -> Org:
    """Create an org (admin work, run inside its own ``cross_org`` block) and return it.

    :param name: the display name.
    :param slug: the unique short name.
    :param org_id: the new org's id; default a random UUID.
    :raises ValueError: an empty ``name`` or ``slug`` (before any SQL).
    :raises MissingOrgError: ``org_id`` given but not a UUID.
    """
    check_text(name, "name", where="create_org()")
    check_text(slug, "slug", where="create_org()")
    values: dict[str, Any] = {"name": name, "slug": slug}
    if org_id is not None:
        values["id"] = require_org(org_id, "create_org()")
    with cross_org(reason=f"create_org {slug}"):
        org = Org.create(**values)
    log.info("org created: %s (%s)", org.id, slug)
    return org


def delete_org(org_id: OrgLike, *, reason: str,
               batch_size: int = DEFAULT_BATCH_SIZE) -> Mapping[str, int]:
    """Delete an org and every row it owns; returns the rows deleted per table.

    Tables are emptied children first (the order of their foreign keys), in batches of
    ``batch_size`` rows, each batch in its own transaction; the ``org`` row goes last (key
    ``"org"``). Restartable: a rerun after an interruption deletes what is left and counts
    only that. Logged with ``reason``.

    :param reason: why, for the log (required).
    :raises ValueError: an empty reason or a batch size below 1 (before any SQL).
    :raises MissingOrgError: ``org_id`` is not a UUID.
    :raises graphlib.CycleError: the schema's foreign keys form a cycle between tables.
    """
    org = require_org(org_id, "delete_org()")
    check_text(reason, "reason", where="delete_org()", hint="say why, for the log")
    check_int(batch_size, "batch_size", minimum=1, where="delete_org()")
    counts: dict[str, int] = {}
    with cross_org(reason=f"delete_org {org}: {reason}"):
        log.warning("delete_org %s started: %s", org, reason)
        for table in _children_first():
            counts[table] = _delete_rows(table, org, batch_size)
        with database.atomic():
            counts[ROOT_TABLE] = database.execute_sql(DELETE_ORG_ROW_SQL, (org,)).rowcount
    log.warning("delete_org %s done (%s): %s", org, reason,
                ", ".join(f"{t}={n}" for t, n in counts.items()))
    return MappingProxyType(counts)


def _children_first() -> list[str]:
    """The org's tables, each after every table that references it."""
    tables = {row[0] for row in database.execute_sql(TENANT_TABLE_NAMES_SQL).fetchall()}
    referencing: dict[str, set[str]] = {t: set() for t in tables}
    for child, parent in database.execute_sql(FOREIGN_KEYS_SQL).fetchall():
        if child in tables and parent in tables and child != parent:
            referencing[parent].add(child)
    return list(graphlib.TopologicalSorter(referencing).static_order())


def _delete_rows(table: str, org: uuid.UUID, batch_size: int) -> int:
    key_columns = [row[0] for row in database.execute_sql(PRIMARY_KEY_SQL, (table,))]
    key = sql.SQL(", ").join(map(sql.Identifier, key_columns or ["ctid"]))
    statement = DELETE_BATCH_SQL.format(table=sql.Identifier(table), key=key,
                                        org=sql.Identifier(ORG_COLUMN))
    text = statement.as_string(database.connection())
    total = 0
    while True:
        with database.atomic():
            deleted = int(database.execute_sql(text, (org, batch_size)).rowcount)
        total += deleted
        if deleted < batch_size:
            break
    if total:
        log.info("delete_org %s: %d row(s) of %s", org, total, table)
    return total

