"""Retention policies for an application's own tenant tables.

The package's four policies live in :mod:`tenantdb.retention`; an application registers its
own here, once, next to its models::

    register_retention_policy("trip_notes", TripNote, time_column="created_at",
                              window=timedelta(days=90))                 # delete
    register_retention_policy("trip_note_places", TripNote, time_column="created_at",
                              window=timedelta(days=7), action="scrub",
                              scrub_columns=("destination_id",))         # set to NULL

Then ``get_stale_rows("trip_notes", org_id=...)`` selects and
``tenantdb.retention.purge("trip_notes", ...)`` purges them, with the package's rules: one
cutoff per run from one ``now``, batches of ``FOR UPDATE SKIP LOCKED`` rows each committed
on its own, one org or every org (as ``cross_org``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any

import peewee

from .context import OrgLike
from .db import database
from .errors import PurgeInTransactionError
from .retention import (
    RetentionPolicy,
    _across,
    _cutoff,
    _execute,
    _org,
    _purge_arguments,
    _resolve_now,
)
from .tenancy import TenantModel, TenantSelect
from .validation import check_positive_timedelta

__all__ = [
    "TableRetentionPolicy",
    "get_stale_rows",
    "purge_table_policy",
    "register_retention_policy",
    "registered_retention_policies",
]

log = logging.getLogger(__name__)

# Placeholders: {table}, {time}, {keys} (the primary key columns), {match} (batch rows to
# table rows), {action} (DELETE ... USING batch / UPDATE ... FROM batch), {extra}, {org}.
# Values: the cutoff, the org (only with {org}), the batch size. Same shape as the package's
# policies in retention.py: lock a batch oldest first, skip locked rows, act, count.
TABLE_BATCH_SQL = """
WITH batch AS (
    SELECT {keys} FROM {table}
    WHERE {time} < %s {extra} {org}
    ORDER BY {time} LIMIT %s
    FOR UPDATE SKIP LOCKED
), done AS (
    {action} WHERE {match}
    RETURNING 1
)
SELECT count(*) FROM done
"""
DELETE_SQL = "DELETE FROM {table} t USING batch"
SCRUB_SQL = "UPDATE {table} t SET {assignments} FROM batch"
ORG_SQL = "AND org_id = %s"
# Identifiers come from model metadata checked against this pattern, so quoting them in
# double quotes cannot be escaped out of.
_IDENTIFIER_RE = re.compile(r"^[a-z_][a-z0-9_]*$")
_ACTIONS = ("delete", "scrub")


@dataclass(frozen=True)
class TableRetentionPolicy:
    """A registered policy: rows of ``model`` whose ``time_column`` is older than
    ``window`` are deleted, or (``scrub``) have ``scrub_columns`` set to NULL."""

    name: str
    model: type[TenantModel]
    time_column: str
    window: timedelta
    action: str
    scrub_columns: tuple[str, ...]
    batch_sql: str


_REGISTRY: dict[str, TableRetentionPolicy] = {}


def register_retention_policy(
    name: str, model: type[TenantModel], *, time_column: str, window: timedelta,
    action: str = "delete", scrub_columns: tuple[str, ...] = (),
) -> TableRetentionPolicy:
    """Register a retention policy for an application's tenant table.

    :param name: the policy's name for :func:`tenantdb.retention.purge` (not one of the
        package's, not taken).
    :param time_column: a timestamp field of ``model``; rows older than ``window`` are stale.
    :param window: a positive ``timedelta``.
    :param action: ``"delete"`` the rows, or ``"scrub"`` their ``scrub_columns`` to NULL.
    :raises ValueError: any of the above is wrong (nothing is registered then).
    """
    _check_name(name)
    if not (isinstance(model, type) and issubclass(model, TenantModel)):
        raise ValueError(f"retention policy {name!r}: {model!r} is not a TenantModel")
    fields = model._meta.fields
    column = fields.get(time_column)
    if not isinstance(column, peewee.DateTimeField):
        raise ValueError(f"retention policy {name!r}: {model.__name__}.{time_column} is not a "
                         "timestamp field")
    check_positive_timedelta(window, "window", where=f"retention policy {name!r}")
    if action not in _ACTIONS:
        raise ValueError(f"retention policy {name!r}: action must be 'delete' or 'scrub', "
                         f"got {action!r}")
    scrub = tuple(scrub_columns)
    if (action == "scrub") != bool(scrub):
        raise ValueError(f"retention policy {name!r}: scrub_columns go with action='scrub' "
                         "(and it needs at least one)")
    keys = [f.column_name for f in _primary_key(model)]
    for col in scrub:
        fld = fields.get(col)
        if fld is None or not fld.null or fld.column_name in (*keys, time_column):
            raise ValueError(f"retention policy {name!r}: {model.__name__}.{col} is not a "
                             "nullable, non-key field to scrub")
    policy = TableRetentionPolicy(name, model, time_column, window, action, scrub,
                                  _batch_sql(model, time_column, action, scrub, keys))
    _REGISTRY[name] = policy
    return policy


def registered_retention_policies() -> Mapping[str, TableRetentionPolicy]:
    """The application's policies, by name."""
    return MappingProxyType(_REGISTRY)


def get_stale_rows(name: str, *, org_id: OrgLike | None = None,
                   now: datetime | None = None, all_orgs: bool = False) -> TenantSelect:
    """The stale rows of the registered policy ``name``: an unexecuted query, for one org,
    or every org (``all_orgs=True``, or called inside ``cross_org``; the query then runs
    only inside ``cross_org``: no permission travels with it).

    :raises ValueError: an unknown policy, or a naive ``now`` (before any SQL).
    :raises MissingOrgError: no org and no ``all_orgs=True`` outside ``cross_org``, or an
        ``org_id`` that is not a UUID (before any SQL).
    """
    policy = _policy(name)
    org = _org(org_id, all_orgs, f"get_stale_rows({name!r})")
    when = _resolve_now(now)
    predicate = _predicate(policy, _cutoff(when, policy.window))
    if org is not None:
        return policy.model.select(org_id=org).where(predicate)
    model = policy.model
    return TenantSelect(model, model._meta.sorted_fields, is_default=True).where(predicate)


def purge_table_policy(
    name: str, batch_size: int = 1000, dry_run: bool = False, *,
    org_id: OrgLike | None = None, now: datetime | None = None,
    max_batches: int | None = None, on_batch: Callable[[int], None] | None = None,
    all_orgs: bool = False,
) -> int:
    """:func:`tenantdb.retention.purge` for a registered policy (which calls this)."""
    policy = _policy(name)
    org = _purge_arguments(batch_size, max_batches, org_id, all_orgs, now)
    if dry_run:
        with _across(org):
            would = int(get_stale_rows(name, org_id=org, now=now, all_orgs=org is None).count())
        return would if max_batches is None else min(would, max_batches * batch_size)
    if database.in_transaction():
        raise PurgeInTransactionError(
            f"purge({name!r}) inside an open transaction: its batches could not commit on "
            "their own; call purge() outside database.atomic() (or pass dry_run=True)")
    cutoff = _cutoff(_resolve_now(now), policy.window)
    sql = policy.batch_sql.replace("{org}", ORG_SQL if org is not None else "")
    params: tuple[Any, ...] = (cutoff, *((org,) if org is not None else ()), batch_size)
    total = batches = 0
    while max_batches is None or batches < max_batches:
        with database.atomic():
            affected = int(_execute(sql, params, org).fetchone()[0])
        total, batches = total + affected, batches + 1
        if on_batch is not None:
            on_batch(affected)
        if affected < batch_size:
            break
    log.info("retention purge of %s (%s): %d row(s) in %d batch(es), cutoff %s", name,
             org or "every org", total, batches, cutoff.isoformat())
    return total


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _IDENTIFIER_RE.match(name):
        raise ValueError(f"retention policy name {name!r}: lower-case letters, digits and _")
    if name in {p.value for p in RetentionPolicy}:
        raise ValueError(f"retention policy {name!r} is one of tenantdb's own")
    if name in _REGISTRY:
        raise ValueError(f"retention policy {name!r} is already registered")


def _policy(name: str) -> TableRetentionPolicy:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        known = ", ".join([p.value for p in RetentionPolicy] + list(_REGISTRY))
        raise ValueError(f"unknown retention policy {name!r}: use one of {known}") from None


def _primary_key(model: type[TenantModel]) -> list[peewee.Field]:
    pk: Any = model._meta.primary_key
    if isinstance(pk, peewee.CompositeKey):
        return [model._meta.fields[name] for name in pk.field_names]
    return [pk]


def _quote(name: str) -> str:
    if not _IDENTIFIER_RE.match(name):
        raise ValueError(f"{name!r}: retention policies need lower-case table and column names")
    return f'"{name}"'


def _batch_sql(model: type[TenantModel], time_column: str, action: str,
               scrub: tuple[str, ...], keys: list[str]) -> str:
    table = _quote(model._meta.table_name)
    fields = model._meta.fields
    scrub_cols = [_quote(fields[c].column_name) for c in scrub]
    if action == "delete":
        act, extra = DELETE_SQL.format(table=table), ""
    else:
        act = SCRUB_SQL.format(table=table,
                               assignments=", ".join(f"{c} = NULL" for c in scrub_cols))
        extra = "AND (" + " OR ".join(f"{c} IS NOT NULL" for c in scrub_cols) + ")"
    quoted = [_quote(k) for k in keys]
    return TABLE_BATCH_SQL.format(
        table=table, time=_quote(fields[time_column].column_name), keys=", ".join(quoted),
        match=" AND ".join(f"t.{k} = batch.{k}" for k in quoted), action=act, extra=extra,
        org="{org}")


def _predicate(policy: TableRetentionPolicy, cutoff: datetime) -> Any:
    model = policy.model
    stale = getattr(model, policy.time_column) < cutoff
    if policy.action == "scrub":
        kept = [getattr(model, c).is_null(False) for c in policy.scrub_columns]
        any_kept = kept[0]
        for term in kept[1:]:
            any_kept = any_kept | term
        stale = stale & any_kept
    return stale
