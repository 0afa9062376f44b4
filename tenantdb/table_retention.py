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

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any

import peewee

from .context import OrgLike
from .retention import (
    RetentionPolicy,
    Rule,
    cutoff_of,
    org_scope,
    purge_rule,
    resolve_now,
    select_stale,
    unknown_policy_error,
)
from .tenancy import TenantModel, TenantSelect
from .validation import check_positive_timedelta

__all__ = [
    "TableRetentionPolicy",
    "get_stale_rows",
    "purge_table_policy",
    "register_retention_policy",
    "registered_retention_policies",
    "table_rule",
]

# Policy names are CLI arguments and log fields: kept plain.
_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]*$")
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
    if not isinstance(model._meta.fields.get(time_column), peewee.DateTimeField):
        raise ValueError(f"retention policy {name!r}: {model.__name__}.{time_column} is not a "
                         "timestamp field")
    check_positive_timedelta(window, "window", where=f"retention policy {name!r}")
    if action not in _ACTIONS:
        raise ValueError(f"retention policy {name!r}: action must be 'delete' or 'scrub', "
                         f"got {action!r}")
    scrub = tuple(scrub_columns)
    _check_scrub(name, model, time_column, action, scrub)
    policy = TableRetentionPolicy(name, model, time_column, window, action, scrub)
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
    rule = table_rule(name)
    org = org_scope(org_id, all_orgs, f"get_stale_rows({name!r})")
    when = resolve_now(now)
    return select_stale(rule, cutoff_of(when, rule.window), when, org)


def purge_table_policy(
    name: str, batch_size: int = 1000, dry_run: bool = False, *,
    org_id: OrgLike | None = None, now: datetime | None = None,
    max_batches: int | None = None, on_batch: Callable[[int], None] | None = None,
    all_orgs: bool = False,
) -> int:
    """:func:`tenantdb.retention.purge` for a registered policy, by the same rules."""
    return purge_rule(table_rule(name), batch_size, dry_run, org_id=org_id, now=now,
                       max_batches=max_batches, on_batch=on_batch, all_orgs=all_orgs)


def table_rule(name: str) -> Rule:
    """The retention rule of the registered policy ``name`` (what selects and purges it).

    :raises ValueError: no policy of that name is registered (a package policy's name
        included: its selector is in :mod:`tenantdb.retention`).
    """
    policy = _REGISTRY.get(name) if isinstance(name, str) else None
    if policy is None and name in {p.value for p in RetentionPolicy}:
        raise ValueError(f"retention policy {name!r} is one of tenantdb's own: use its "
                         f"selector, tenantdb.retention.get_stale_{name}()")
    if policy is None:
        raise unknown_policy_error(name)
    return Rule(policy.name, policy.model, policy.time_column, action=policy.action,
                 scrub_columns=policy.scrub_columns, window=policy.window)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"retention policy name {name!r}: lower-case letters, digits and _")
    if name in {p.value for p in RetentionPolicy}:
        raise ValueError(f"retention policy {name!r} is one of tenantdb's own")
    if name in _REGISTRY:
        raise ValueError(f"retention policy {name!r} is already registered")


def _check_scrub(name: str, model: type[TenantModel], time_column: str, action: str,
                 scrub: tuple[str, ...]) -> None:
    if (action == "scrub") != bool(scrub):
        raise ValueError(f"retention policy {name!r}: scrub_columns go with action='scrub' "
                         "(and it needs at least one)")
    fields = model._meta.fields
    meta: Any = model._meta  # peewee's stubs leave get_primary_keys untyped
    keys = {field.name for field in meta.get_primary_keys()}
    for col in scrub:
        fld = fields.get(col)
        if fld is None or not fld.null or col in (*keys, time_column):
            raise ValueError(f"retention policy {name!r}: {model.__name__}.{col} is not a "
                             "nullable, non-key field to scrub")
