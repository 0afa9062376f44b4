"""Retention: select stale rows per policy, and purge them in batches.

Four policies, each a window from :class:`~tenantdb.settings.Settings`:

- ``agent_runs``: runs created more than ``retention_agent_run_days`` ago (deleted);
- ``agent_run_tool_logs``: runs older than ``retention_tool_log_hours`` that still carry a
  ``tool_log`` (the log is scrubbed to NULL, the run is kept);
- ``itineraries``: itineraries created more than ``retention_itinerary_days`` ago (deleted);
- ``idempotency_entries``: entries past ``ttl_until`` (deleted), never a pending entry
  whose lease is still live.

The selectors return unexecuted Peewee queries, for one org (``org_id=``) or across every
org, which a call says explicitly (``all_orgs=True``, or called inside
:func:`~tenantdb.context.cross_org`). No permission travels with the query: an across-org
selection runs only inside a ``cross_org`` block; run anywhere else it is refused like any
unscoped query. :func:`get_retention_summary` and :func:`purge` execute what they select, so
``all_orgs=True`` runs them inside a logged ``cross_org`` block of their own.
Every cutoff derives from one ``now``: the caller's, or the database's clock read once,
because Postgres keeps its own clock (a frozen Python clock would not move it).
:func:`purge` deletes (or scrubs) in batches of ``FOR UPDATE SKIP LOCKED`` rows, each batch
committed on its own, so it is restartable and safe to run twice at once.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any

from peewee import SQL, fn

from .context import OrgLike, cross_org, cross_org_reason, require_org
from .db import database
from .errors import PurgeInTransactionError
from .models import AgentRun, IdempotencyKey, Itinerary
from .scoping import execute_scoped
from .settings import get_settings
from .tenancy import TenantModel, TenantSelect
from .validation import check_aware_datetime, check_int, check_positive_number

__all__ = [
    "PURGE_ORDER",
    "PurgeInTransactionError",
    "RetentionPolicy",
    "RetentionSummary",
    "get_retention_summary",
    "get_stale_agent_run_tool_logs",
    "get_stale_agent_runs",
    "get_stale_idempotency_entries",
    "get_stale_itineraries",
    "purge",
]

log = logging.getLogger(__name__)

# SQL
# The database's clock, read once per selection or purge run: every cutoff derives from it.
NOW_SQL = "SELECT now()"
# Appended to a batch's selection for one org. Row-level security would hide other orgs'
# rows anyway; the predicate is what lets the planner use the org's index entries.
ORG_FILTER_SQL = "AND org_id = %s"
# One batch per statement: lock up to LIMIT stale rows, oldest first, skipping rows another
# purge (or any writer) holds, so concurrent purges split the work instead of deadlocking;
# then act on exactly those rows. The count comes back as a row, whatever the driver's
# rowcount reports for a multi-statement call. Placeholders: the predicate's values, the
# org (only with ORG_FILTER_SQL), the batch size.
# The batch's runs are unlinked from their itineraries in the same statement, then deleted
# (V01_07: the key is plain, since Citus refuses ON DELETE SET NULL (agent_run_id)). The key
# is checked at the end of the statement, after both. A writer linking a new itinerary to
# a locked run waits for the run's row lock, then fails on the key: never a dangling link.
PURGE_AGENT_RUNS_SQL = """
WITH batch AS (
    SELECT org_id, id FROM agent_run
    WHERE created_at < %s {org_filter}
    ORDER BY created_at LIMIT %s
    FOR UPDATE SKIP LOCKED
), unlinked AS (
    UPDATE itinerary i SET agent_run_id = NULL FROM batch
    WHERE i.org_id = batch.org_id AND i.agent_run_id = batch.id
    RETURNING 1
), done AS (
    DELETE FROM agent_run t USING batch
    WHERE t.org_id = batch.org_id AND t.id = batch.id
    RETURNING 1
)
SELECT count(*) FROM done
"""
# updated_at is left alone: it records the last change a user or agent made, and scrubbing
# a log is neither.
SCRUB_TOOL_LOGS_SQL = """
WITH batch AS (
    SELECT org_id, id FROM agent_run
    WHERE tool_log IS NOT NULL AND created_at < %s {org_filter}
    ORDER BY created_at LIMIT %s
    FOR UPDATE SKIP LOCKED
), done AS (
    UPDATE agent_run t SET tool_log = NULL FROM batch
    WHERE t.org_id = batch.org_id AND t.id = batch.id
    RETURNING 1
)
SELECT count(*) FROM done
"""
PURGE_ITINERARIES_SQL = """
WITH batch AS (
    SELECT org_id, id FROM itinerary
    WHERE created_at < %s {org_filter}
    ORDER BY created_at LIMIT %s
    FOR UPDATE SKIP LOCKED
), done AS (
    DELETE FROM itinerary t USING batch
    WHERE t.org_id = batch.org_id AND t.id = batch.id
    RETURNING 1
)
SELECT count(*) FROM done
"""
# FOR UPDATE re-checks the predicate on a row a concurrent begin() took over after this
# statement's snapshot (new ttl, new lease), so a freshly claimed key is never deleted.
PURGE_IDEMPOTENCY_SQL = """
WITH batch AS (
    SELECT org_id, user_id, key FROM idempotency_key
    WHERE ttl_until <= %s
      AND (status <> 'pending' OR locked_until IS NULL OR locked_until <= %s) {org_filter}
    ORDER BY ttl_until LIMIT %s
    FOR UPDATE SKIP LOCKED
), done AS (
    DELETE FROM idempotency_key t USING batch
    WHERE t.org_id = batch.org_id AND t.user_id = batch.user_id AND t.key = batch.key
    RETURNING 1
)
SELECT count(*) FROM done
"""

SELECT_REASON = "retention: stale rows across orgs"
SUMMARY_REASON = "retention: summary across orgs"
PURGE_REASON = "retention: purge"


class RetentionPolicy(str, enum.Enum):
    """What a retention run removes; the values are the names the CLI and ``purge`` take."""

    AGENT_RUNS = "agent_runs"
    AGENT_RUN_TOOL_LOGS = "agent_run_tool_logs"
    ITINERARIES = "itineraries"
    IDEMPOTENCY_ENTRIES = "idempotency_entries"

    # Printed and formatted as the value, as enum.StrEnum does (Python 3.11+ only).
    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


#: The order a full run purges in: children (itineraries) before their parent runs, and
#: runs before their tool logs, so no log is scrubbed from a run about to be deleted.
PURGE_ORDER: tuple[RetentionPolicy, ...] = (
    RetentionPolicy.ITINERARIES,
    RetentionPolicy.AGENT_RUNS,
    RetentionPolicy.AGENT_RUN_TOOL_LOGS,
    RetentionPolicy.IDEMPOTENCY_ENTRIES,
)


@dataclass(frozen=True)
class RetentionSummary:
    """Stale rows per policy, all counted against one ``now``.

    :param now: the time every cutoff derives from.
    :param org_id: the org counted, or ``None`` for every org.
    :param cutoffs: per policy, the time before which a row is stale (``created_at``; for
        idempotency entries ``ttl_until``, which is ``now``).
    :param counts: per policy, the stale rows (in ``org_id``, or across every org).
    :param per_org: per org with stale rows, its counts per policy (zeros included);
        ``None`` unless asked for with ``per_org=True``.
    """

    now: datetime
    org_id: uuid.UUID | None
    cutoffs: Mapping[RetentionPolicy, datetime]
    counts: Mapping[RetentionPolicy, int]
    per_org: Mapping[uuid.UUID, Mapping[RetentionPolicy, int]] | None = None

    @property
    def total(self) -> int:
        """The sum of :attr:`counts`. A run past both windows counts under ``agent_runs``
        and under ``agent_run_tool_logs``, so a full purge may touch fewer rows."""
        return sum(self.counts.values())


# PUBLIC API


def get_stale_agent_runs(
    retention_days: float | None = None, *, org_id: OrgLike | None = None,
    now: datetime | None = None, all_orgs: bool = False,
) -> TenantSelect:
    """Agent runs created more than ``retention_days`` before ``now``: an unexecuted query.

    :param retention_days: the window; ``None``: ``Settings.retention_agent_run_days``.
    :param org_id: one org's runs.
    :param all_orgs: every org's runs instead (the query then runs only inside ``cross_org``;
        called inside ``cross_org``, ``org_id=None`` means the same).
    :param now: a timezone-aware time; ``None``: the database's ``now()``, read once.
    :raises ValueError: a non-positive window or a naive ``now`` (before any SQL).
    :raises MissingOrgError: no org and no ``all_orgs=True`` outside ``cross_org``, or an
        ``org_id`` that is not a UUID (before any SQL).
    """
    window = _window(retention_days, get_settings().retention_agent_run_days,
                     "retention_days", "days")
    org = _org(org_id, all_orgs, "get_stale_agent_runs()")
    return _select_stale(RetentionPolicy.AGENT_RUNS, window, org, now)


def get_stale_agent_run_tool_logs(
    retention_hours: float | None = None, *, org_id: OrgLike | None = None,
    now: datetime | None = None, all_orgs: bool = False,
) -> TenantSelect:
    """Agent runs older than ``retention_hours`` whose ``tool_log`` is still set.

    :param retention_hours: the window; ``None``: ``Settings.retention_tool_log_hours``.
    :param org_id: one org's runs.
    :param all_orgs: every org's (run the query inside ``cross_org``).
    :param now: a timezone-aware time; ``None``: the database's ``now()``, read once.
    :raises ValueError: a non-positive window or a naive ``now`` (before any SQL).
    :raises MissingOrgError: no org and no ``all_orgs=True`` outside ``cross_org``, or an
        ``org_id`` that is not a UUID (before any SQL).
    """
    window = _window(retention_hours, get_settings().retention_tool_log_hours,
                     "retention_hours", "hours")
    org = _org(org_id, all_orgs, "get_stale_agent_run_tool_logs()")
    return _select_stale(RetentionPolicy.AGENT_RUN_TOOL_LOGS, window, org, now)


def get_stale_itineraries(
    retention_days: float | None = None, *, org_id: OrgLike | None = None,
    now: datetime | None = None, all_orgs: bool = False,
) -> TenantSelect:
    """Itineraries created more than ``retention_days`` before ``now``.

    :param retention_days: the window; ``None``: ``Settings.retention_itinerary_days``.
    :param org_id: one org's itineraries.
    :param all_orgs: every org's (run the query inside ``cross_org``).
    :param now: a timezone-aware time; ``None``: the database's ``now()``, read once.
    :raises ValueError: a non-positive window or a naive ``now`` (before any SQL).
    :raises MissingOrgError: no org and no ``all_orgs=True`` outside ``cross_org``, or an
        ``org_id`` that is not a UUID (before any SQL).
    """
    window = _window(retention_days, get_settings().retention_itinerary_days,
                     "retention_days", "days")
    org = _org(org_id, all_orgs, "get_stale_itineraries()")
    return _select_stale(RetentionPolicy.ITINERARIES, window, org, now)


def get_stale_idempotency_entries(
    *, org_id: OrgLike | None = None, now: datetime | None = None, all_orgs: bool = False,
) -> TenantSelect:
    """Idempotency entries with ``ttl_until <= now``, except pending ones whose lease
    (``locked_until``) is still live: their holder is still working.

    :param org_id: one org's entries.
    :param all_orgs: every org's (run the query inside ``cross_org``).
    :param now: a timezone-aware time; ``None``: the database's ``now()``, read once.
    :raises ValueError: a naive ``now`` (before any SQL).
    :raises MissingOrgError: no org and no ``all_orgs=True`` outside ``cross_org``, or an
        ``org_id`` that is not a UUID (before any SQL).
    """
    org = _org(org_id, all_orgs, "get_stale_idempotency_entries()")
    return _select_stale(RetentionPolicy.IDEMPOTENCY_ENTRIES, timedelta(0), org, now)


def get_retention_summary(
    *, org_id: OrgLike | None = None, now: datetime | None = None, per_org: bool = False,
    all_orgs: bool = False,
) -> RetentionSummary:
    """Count the stale rows of every policy (windows from Settings) against one ``now``.

    One ``COUNT`` per policy, grouped by org when ``per_org`` is set.

    :param org_id: count one org.
    :param all_orgs: count every org (inside a ``cross_org`` block of its own).
    :param now: a timezone-aware time; ``None``: the database's ``now()``, read once.
    :param per_org: also break the counts down per org.
    :raises ValueError: a naive ``now`` (before any SQL).
    :raises MissingOrgError: no org and no ``all_orgs=True`` outside ``cross_org``, or an
        ``org_id`` that is not a UUID (before any SQL).
    """
    org = _org(org_id, all_orgs, "get_retention_summary()")
    if org is None and cross_org_reason() is None:
        with cross_org(reason=SUMMARY_REASON):
            return get_retention_summary(now=now, per_org=per_org)
    windows = _setting_windows()
    when = _resolve_now(now)
    cutoffs = {policy: _cutoff(when, windows[policy]) for policy in RetentionPolicy}
    queries = {policy: _select_stale(policy, windows[policy], org, when)
               for policy in RetentionPolicy}
    if not per_org:
        with _across(org):
            counts = {policy: int(query.count()) for policy, query in queries.items()}
        return RetentionSummary(when, org, MappingProxyType(cutoffs), MappingProxyType(counts))
    with _across(org):
        by_org = _counts_per_org(queries)
    counts = {policy: sum(c[policy] for c in by_org.values()) for policy in RetentionPolicy}
    return RetentionSummary(when, org, MappingProxyType(cutoffs), MappingProxyType(counts),
                            MappingProxyType(by_org))


def purge(
    policy: RetentionPolicy | str,
    batch_size: int = 1000,
    dry_run: bool = False,
    *,
    org_id: OrgLike | None = None,
    now: datetime | None = None,
    max_batches: int | None = None,
    on_batch: Callable[[int], None] | None = None,
    all_orgs: bool = False,
) -> int:
    """Delete (or, for tool logs, scrub to NULL) the stale rows of ``policy``, in batches.

    The cutoff is computed once, from ``now``. Each batch locks up to ``batch_size`` stale
    rows, oldest first, with ``FOR UPDATE SKIP LOCKED``, acts on them and commits on its
    own: an interrupted purge keeps what it did and a rerun finishes the rest, and
    concurrent purges split the rows between them. Rows locked by another transaction are
    skipped and left for the next run. The run ends with the first batch smaller than
    ``batch_size``, or after ``max_batches``. Windows come from Settings.

    :param policy: a :class:`RetentionPolicy` or its value (``"agent_runs"``, ...), or the
        name of an application table's policy (:mod:`tenantdb.table_retention`).
    :param batch_size: rows per batch (and per transaction), at least 1.
    :param dry_run: count what would be affected (within ``max_batches``), change nothing;
        allowed inside a transaction.
    :param org_id: purge one org.
    :param all_orgs: purge every org (inside a ``cross_org`` block of its own).
    :param now: a timezone-aware time; ``None``: the database's ``now()``, read once.
    :param max_batches: stop after this many batches (at least 1); ``None``: no limit.
    :param on_batch: called with each batch's row count after that batch committed.
    :returns: the rows deleted or scrubbed (dry run: that would be).
    :raises ValueError: an unknown policy, a batch size or ``max_batches`` below 1, a naive
        ``now`` (all before any SQL).
    :raises MissingOrgError: no org and no ``all_orgs=True`` outside ``cross_org``, or an
        ``org_id`` that is not a UUID (before any SQL).
    :raises PurgeInTransactionError: called inside an open transaction (not a dry run).
    """
    from .table_retention import purge_table_policy, registered_retention_policies

    if isinstance(policy, str) and policy in registered_retention_policies():
        # An application table's policy (tenantdb.table_retention), same rules.
        return purge_table_policy(policy, batch_size, dry_run, org_id=org_id, now=now,
                                  max_batches=max_batches, on_batch=on_batch,
                                  all_orgs=all_orgs)
    chosen = _policy(policy)
    org = _purge_arguments(batch_size, max_batches, org_id, all_orgs, now)
    window = _setting_windows()[chosen]
    if dry_run:
        with _across(org):
            would = int(_select_stale(chosen, window, org, now).count())
        return would if max_batches is None else min(would, max_batches * batch_size)
    if database.in_transaction():
        raise PurgeInTransactionError(
            "purge() inside an open transaction: its batches could not commit on their own "
            "and every locked row would stay locked until the caller ends it; call purge() "
            "outside database.atomic() (or pass dry_run=True to only count)"
        )
    cutoff = _cutoff(_resolve_now(now), window)
    return _run_batches(chosen, cutoff, org, batch_size=batch_size, max_batches=max_batches,
                        on_batch=on_batch)


# PRIVATE HELPERS


@dataclass(frozen=True)
class _Policy:
    model: type[TenantModel]
    batch_sql: str


_POLICIES: dict[RetentionPolicy, _Policy] = {
    RetentionPolicy.AGENT_RUNS: _Policy(AgentRun, PURGE_AGENT_RUNS_SQL),
    RetentionPolicy.AGENT_RUN_TOOL_LOGS: _Policy(AgentRun, SCRUB_TOOL_LOGS_SQL),
    RetentionPolicy.ITINERARIES: _Policy(Itinerary, PURGE_ITINERARIES_SQL),
    RetentionPolicy.IDEMPOTENCY_ENTRIES: _Policy(IdempotencyKey, PURGE_IDEMPOTENCY_SQL),
}


def _select_stale(policy: RetentionPolicy, window: timedelta, org: uuid.UUID | None,
                  now: datetime | None) -> TenantSelect:
    """The stale rows of ``policy`` (``org`` None: every org's; validated by the caller)."""
    when = _resolve_now(now)
    predicate = _stale_predicate(policy, _cutoff(when, window), when)
    model = _POLICIES[policy].model
    if org is not None:
        return model.select(org_id=org).where(predicate)
    # Unscoped, and carrying no permission: it runs only inside a cross_org block.
    return TenantSelect(model, model._meta.sorted_fields, is_default=True).where(predicate)


def _stale_predicate(policy: RetentionPolicy, cutoff: datetime, now: datetime) -> Any:
    """The Peewee twin of the batch SQL's WHERE clause (tests hold the two together)."""
    if policy is RetentionPolicy.AGENT_RUNS:
        return AgentRun.created_at < cutoff
    if policy is RetentionPolicy.AGENT_RUN_TOOL_LOGS:
        # IS NOT NULL matches the partial index agent_run_tool_log_created_at_idx.
        return AgentRun.tool_log.is_null(False) & (AgentRun.created_at < cutoff)
    if policy is RetentionPolicy.ITINERARIES:
        return Itinerary.created_at < cutoff
    key = IdempotencyKey
    live_lease = (key.status == "pending") & key.locked_until.is_null(False) & (
        key.locked_until > now)
    return (key.ttl_until <= now) & ~live_lease


def _counts_per_org(queries: Mapping[RetentionPolicy, TenantSelect]
                    ) -> dict[uuid.UUID, Mapping[RetentionPolicy, int]]:
    found: dict[uuid.UUID, dict[RetentionPolicy, int]] = {}
    for policy, query in queries.items():
        model = _POLICIES[policy].model
        grouped = query.select(model.org_id, fn.COUNT(SQL("*"))).group_by(model.org_id)
        for org, count in grouped.tuples():
            found.setdefault(org, dict.fromkeys(RetentionPolicy, 0))[policy] = int(count)
    return {org: MappingProxyType(counts) for org, counts in found.items()}


def _run_batches(policy: RetentionPolicy, cutoff: datetime, org: uuid.UUID | None, *,
                 batch_size: int, max_batches: int | None,
                 on_batch: Callable[[int], None] | None) -> int:
    if org is None:
        # Across orgs, org by org: a FOR UPDATE spanning shards is refused on Citus, and
        # each org's batches are then router statements. The orgs are those with stale rows
        # at the start; rows of an org that gets some later are left for the next run.
        total = batches = 0
        for one in _orgs_with_stale_rows(policy, cutoff):
            done, used = _org_batches(policy, cutoff, one, batch_size=batch_size,
                                      max_batches=None if max_batches is None
                                      else max_batches - batches, on_batch=on_batch)
            total, batches = total + done, batches + used
            if max_batches is not None and batches >= max_batches:
                break
        return total
    return _org_batches(policy, cutoff, org, batch_size=batch_size, max_batches=max_batches,
                        on_batch=on_batch)[0]


def _orgs_with_stale_rows(policy: RetentionPolicy, cutoff: datetime) -> list[uuid.UUID]:
    """The orgs holding stale rows of ``policy`` (no lock: the batches lock)."""
    model = _POLICIES[policy].model
    with cross_org(reason=PURGE_REASON):
        # For idempotency entries the cutoff is now itself (see _batch_params).
        query = model.select(model.org_id).where(_stale_predicate(policy, cutoff, cutoff))
        return [row[0] for row in query.distinct().order_by(model.org_id).tuples()]


def _org_batches(policy: RetentionPolicy, cutoff: datetime, org: uuid.UUID | None, *,
                 batch_size: int, max_batches: int | None,
                 on_batch: Callable[[int], None] | None) -> tuple[int, int]:
    sql = _batch_statement(policy, org is not None)
    params = _batch_params(policy, cutoff, org, batch_size)
    total = batches = 0
    while max_batches is None or batches < max_batches:
        with _across(org), database.atomic():  # across orgs: an admin transaction
            affected = int(_execute(sql, params, org).fetchone()[0])
        total, batches = total + affected, batches + 1
        if on_batch is not None:
            on_batch(affected)
        if affected < batch_size:  # nothing more this run can lock
            break
    log.info("retention purge of %s (%s): %d row(s) in %d batch(es), cutoff %s", policy.value,
             org or "every org", total, batches, cutoff.isoformat())
    return total, batches


def _batch_statement(policy: RetentionPolicy, scoped: bool) -> str:
    """The batch SQL of ``policy``, for one org (``scoped``) or every org."""
    return _POLICIES[policy].batch_sql.format(org_filter=ORG_FILTER_SQL if scoped else "")


def _batch_params(policy: RetentionPolicy, cutoff: datetime, org: uuid.UUID | None,
                  batch_size: int) -> tuple[Any, ...]:
    # For idempotency entries the cutoff is now itself: it bounds ttl and lease alike.
    values: tuple[Any, ...] = (
        (cutoff, cutoff) if policy is RetentionPolicy.IDEMPOTENCY_ENTRIES else (cutoff,))
    return (*values, *((org,) if org is not None else ()), batch_size)


def _across(org: uuid.UUID | None) -> contextlib.AbstractContextManager[None]:
    """``cross_org`` for work across every org (``org`` is ``None``), else nothing: whether a
    statement runs with admin rights is decided where it runs."""
    return cross_org(reason=SELECT_REASON) if org is None else contextlib.nullcontext()


def _execute(sql: str, params: tuple[Any, ...], org: uuid.UUID | None) -> Any:
    if org is not None:
        return execute_scoped(org, sql, params)
    with cross_org(reason=PURGE_REASON):
        return database.execute_sql(sql, params)


def _policy(value: RetentionPolicy | str) -> RetentionPolicy:
    try:
        return RetentionPolicy(value)
    except ValueError:
        names = ", ".join(p.value for p in RetentionPolicy)
        raise ValueError(f"unknown retention policy {value!r}: use one of {names}") from None


def _setting_windows() -> dict[RetentionPolicy, timedelta]:
    settings = get_settings()
    return {
        RetentionPolicy.AGENT_RUNS: timedelta(days=settings.retention_agent_run_days),
        RetentionPolicy.AGENT_RUN_TOOL_LOGS: timedelta(hours=settings.retention_tool_log_hours),
        RetentionPolicy.ITINERARIES: timedelta(days=settings.retention_itinerary_days),
        RetentionPolicy.IDEMPOTENCY_ENTRIES: timedelta(0),
    }


def _window(value: float | None, default: int, name: str, unit: str) -> timedelta:
    number = check_positive_number(default if value is None else value, name, unit=unit)
    try:
        return timedelta(**{unit: number})
    except OverflowError:
        raise ValueError(f"{name}={value!r} is too long a window") from None


def _check_count(value: int, name: str) -> None:
    check_int(value, name, minimum=1, where="purge()")


def _check_aware(now: datetime) -> None:
    check_aware_datetime(now, "now")


def _purge_arguments(batch_size: int, max_batches: int | None, org_id: OrgLike | None,
                     all_orgs: bool, now: datetime | None) -> uuid.UUID | None:
    """Check a purge's arguments before any SQL (for tenantdb's policies and the
    application's); returns its org, ``None`` for every org."""
    _check_count(batch_size, "batch_size")
    if max_batches is not None:
        _check_count(max_batches, "max_batches")
    org = _org(org_id, all_orgs, "purge()")
    if now is not None:
        _check_aware(now)  # before the dry run's or the batches' first statement
    return org


def _org(org_id: OrgLike | None, all_orgs: bool, where: str) -> uuid.UUID | None:
    """The org of a call, or ``None`` for every org, which a call must say explicitly."""
    if all_orgs:
        if org_id is not None:
            raise ValueError(f"{where}: pass org_id=... or all_orgs=True, not both")
        return None
    if org_id is None and cross_org_reason() is not None:
        return None  # inside cross_org: every org, as the block says
    return require_org(org_id, where)


def _resolve_now(now: datetime | None) -> datetime:
    """``now`` once checked, else the database's clock (the one SQL this may run)."""
    if now is not None:
        _check_aware(now)
        return now
    value: datetime = database.execute_sql(NOW_SQL).fetchone()[0]
    return value


def _cutoff(now: datetime, window: timedelta) -> datetime:
    try:
        return now - window
    except OverflowError:
        raise ValueError(f"a retention window of {window} reaches before year 1") from None
