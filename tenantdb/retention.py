"""Retention: select stale rows per policy, and purge them in batches.

Four policies (:class:`RetentionPolicy`): agent runs, their tool logs (scrubbed, the run
kept), itineraries and idempotency entries. Each is one rule in ``_RULES`` (model, age
column, window setting, extra condition, action), and that rule alone builds the selector's
filter, the summary's counts and the purge's batches; an application's policies
(:mod:`tenantdb.table_retention`) become rules of the same kind.

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
import functools
import logging
import operator
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any

from peewee import SQL, fn
from psycopg2 import sql

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
# One batch per statement. {batch} is the policy's selection (the selectors' filter, for one
# org or every org) of up to LIMIT stale rows' keys, oldest first, FOR UPDATE SKIP LOCKED:
# rows another purge (or any writer) holds are skipped, so concurrent purges split the work
# instead of deadlocking. Then {steps} act on exactly those rows. The count comes back as a
# row, whatever the driver's rowcount reports for a multi-statement call.
BATCH_SQL = """
WITH batch AS (
    {batch}
){steps}
SELECT count(*) FROM done
"""
# A policy's children unlinked from the batch's rows in the same statement, before those
# are deleted (V01_07: the key is plain, since Citus refuses ON DELETE SET NULL (column)).
# The key is checked at the end of the statement, after both. A writer linking a new child
# to a locked row waits for the row lock, then fails on the key: never a dangling link.
UNLINK_SQL = """, {name} AS (
    UPDATE {child} c SET {column} = NULL FROM batch
    WHERE c.org_id = batch.org_id AND c.{column} = batch.{target}
    RETURNING 1
)"""
DELETE_SQL = """, done AS (
    DELETE FROM {table} t USING batch WHERE {match}
    RETURNING 1
)"""
# A scrub leaves updated_at alone: it records the last change a user or agent made, and
# scrubbing a log is neither.
SCRUB_SQL = """, done AS (
    UPDATE {table} t SET {assignments} FROM batch WHERE {match}
    RETURNING 1
)"""

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


# Rule, select_stale, purge_rule, org_scope, resolve_now, cutoff_of and
# unknown_policy_error are shared with tenantdb.table_retention (the application tables'
# policies run the same code); they are not in __all__, not the public API.
@dataclass(frozen=True, eq=False)  # eq=False: peewee fields compare into expressions
class Rule:
    """One retention policy, the single source of its selector, counts and purge batches.

    A row of ``model`` is stale once its ``age_column`` is older than the window (at or
    before the cutoff with ``at_cutoff``, for a deadline column), unless ``keep`` holds at
    ``now``; a scrub policy also needs one of its ``scrub_columns`` still set (nothing is
    left to scrub otherwise, and it matches partial indexes such as
    ``agent_run_tool_log_created_at_idx``).
    """

    name: str
    model: type[TenantModel]
    age_column: str
    #: ``"delete"`` the rows, or ``"scrub"`` their ``scrub_columns`` to NULL.
    action: str = "delete"
    scrub_columns: tuple[str, ...] = ()
    #: The Settings attribute holding the window, counted in ``unit``; ``None``: ``window``.
    setting: str | None = None
    unit: str = "days"
    window: timedelta = timedelta(0)
    at_cutoff: bool = False
    keep: Callable[[datetime], Any] | None = None
    #: Nullable foreign keys of other tables to these rows, set to NULL before a delete.
    unlink: tuple[Any, ...] = ()

    def default_window(self) -> timedelta:
        """The window a run uses unless the caller passes one."""
        if self.setting is None:
            return self.window
        return timedelta(**{self.unit: getattr(get_settings(), self.setting)})

    def predicate(self, cutoff: datetime, now: datetime) -> Any:
        """Stale at ``cutoff`` (derived from ``now``): the filter every use shares."""
        age = getattr(self.model, self.age_column)
        term = (age <= cutoff) if self.at_cutoff else (age < cutoff)
        if self.scrub_columns:
            term = term & functools.reduce(operator.or_, (
                getattr(self.model, name).is_null(False) for name in self.scrub_columns))
        if self.keep is not None:
            term = term & ~self.keep(now)
        return term


def _live_lease(now: datetime) -> Any:
    """A pending idempotency entry whose holder's lease is live: it is still working."""
    key = IdempotencyKey
    return (key.status == "pending") & key.locked_until.is_null(False) & (
        key.locked_until > now)


#: The package's policies. FOR UPDATE re-checks an idempotency entry's predicate on a row a
#: concurrent begin() took over after the statement's snapshot (new ttl, new lease), so a
#: freshly claimed key is never deleted.
_RULES: Mapping[RetentionPolicy, Rule] = MappingProxyType({
    RetentionPolicy.AGENT_RUNS: Rule(
        "agent_runs", AgentRun, "created_at", setting="retention_agent_run_days",
        unlink=(Itinerary.agent_run_id,)),
    RetentionPolicy.AGENT_RUN_TOOL_LOGS: Rule(
        "agent_run_tool_logs", AgentRun, "created_at", action="scrub",
        scrub_columns=("tool_log",), setting="retention_tool_log_hours", unit="hours"),
    RetentionPolicy.ITINERARIES: Rule(
        "itineraries", Itinerary, "created_at", setting="retention_itinerary_days"),
    RetentionPolicy.IDEMPOTENCY_ENTRIES: Rule(
        "idempotency_entries", IdempotencyKey, "ttl_until", at_cutoff=True, keep=_live_lease),
})


# PUBLIC API
#
# Every selector returns an unexecuted query of one policy's stale rows. They share:
#   org_id: one org's rows; all_orgs: every org's instead (the query then runs only inside
#   cross_org; called inside cross_org, org_id=None means the same); now: a timezone-aware
#   time, None: the database's now(), read once.
#   ValueError: a non-positive window or a naive now; MissingOrgError: no org and no
#   all_orgs=True outside cross_org, or an org_id that is not a UUID (both before any SQL).


def get_stale_agent_runs(
    retention_days: float | None = None, *, org_id: OrgLike | None = None,
    now: datetime | None = None, all_orgs: bool = False,
) -> TenantSelect:
    """Agent runs created more than ``retention_days`` (``None``:
    ``Settings.retention_agent_run_days``) before ``now``. Other parameters: see above."""
    return _selector(RetentionPolicy.AGENT_RUNS, retention_days, org_id, now, all_orgs)


def get_stale_agent_run_tool_logs(
    retention_hours: float | None = None, *, org_id: OrgLike | None = None,
    now: datetime | None = None, all_orgs: bool = False,
) -> TenantSelect:
    """Agent runs older than ``retention_hours`` (``None``:
    ``Settings.retention_tool_log_hours``) whose ``tool_log`` is still set."""
    return _selector(RetentionPolicy.AGENT_RUN_TOOL_LOGS, retention_hours, org_id, now,
                     all_orgs)


def get_stale_itineraries(
    retention_days: float | None = None, *, org_id: OrgLike | None = None,
    now: datetime | None = None, all_orgs: bool = False,
) -> TenantSelect:
    """Itineraries created more than ``retention_days`` (``None``:
    ``Settings.retention_itinerary_days``) before ``now``."""
    return _selector(RetentionPolicy.ITINERARIES, retention_days, org_id, now, all_orgs)


def get_stale_idempotency_entries(
    *, org_id: OrgLike | None = None, now: datetime | None = None, all_orgs: bool = False,
) -> TenantSelect:
    """Idempotency entries with ``ttl_until <= now``, except pending ones whose lease
    (``locked_until``) is still live: their holder is still working."""
    return _selector(RetentionPolicy.IDEMPOTENCY_ENTRIES, None, org_id, now, all_orgs)


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
    org = org_scope(org_id, all_orgs, "get_retention_summary()")
    if org is None and cross_org_reason() is None:
        with cross_org(reason=SUMMARY_REASON):
            return get_retention_summary(now=now, per_org=per_org)
    when = resolve_now(now)
    cutoffs = {policy: cutoff_of(when, _RULES[policy].default_window())
               for policy in RetentionPolicy}
    queries = {policy: select_stale(_RULES[policy], cutoffs[policy], when, org)
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
    from .table_retention import registered_retention_policies, table_rule

    if isinstance(policy, str) and policy in registered_retention_policies():
        rule = table_rule(policy)  # an application table's policy, same rules
    else:
        rule = _RULES[_policy(policy)]
    return purge_rule(rule, batch_size, dry_run, org_id=org_id, now=now,
                       max_batches=max_batches, on_batch=on_batch, all_orgs=all_orgs)


# PRIVATE HELPERS (tenantdb.table_retention runs an application's policies through them)


def _selector(policy: RetentionPolicy, window: float | None, org_id: OrgLike | None,
              now: datetime | None, all_orgs: bool) -> TenantSelect:
    """A public selector's work: arguments checked in order, before any SQL."""
    rule = _RULES[policy]
    chosen = rule.default_window() if rule.setting is None else _window(
        window, getattr(get_settings(), rule.setting), f"retention_{rule.unit}", rule.unit)
    org = org_scope(org_id, all_orgs, f"get_stale_{policy.value}()")
    when = resolve_now(now)
    return select_stale(rule, cutoff_of(when, chosen), when, org)


def select_stale(rule: Rule, cutoff: datetime, now: datetime, org: uuid.UUID | None,
                  *fields: Any) -> TenantSelect:
    """The stale rows of ``rule`` (``org`` None: every org's; validated by the caller)."""
    return _scoped_select(rule.model, org, *fields).where(rule.predicate(cutoff, now))


def _scoped_select(model: type[TenantModel], org: uuid.UUID | None,
                   *fields: Any) -> TenantSelect:
    if org is not None:
        return model.select(*fields, org_id=org)
    # Unscoped, and carrying no permission: it runs only inside a cross_org block.
    return TenantSelect(model, list(fields) or model._meta.sorted_fields, is_default=not fields)


def _counts_per_org(queries: Mapping[RetentionPolicy, TenantSelect]
                    ) -> dict[uuid.UUID, Mapping[RetentionPolicy, int]]:
    found: dict[uuid.UUID, dict[RetentionPolicy, int]] = {}
    for policy, query in queries.items():
        model = _RULES[policy].model
        grouped = query.select(model.org_id, fn.COUNT(SQL("*"))).group_by(model.org_id)
        for org, count in grouped.tuples():
            found.setdefault(org, dict.fromkeys(RetentionPolicy, 0))[policy] = int(count)
    return {org: MappingProxyType(counts) for org, counts in found.items()}


def purge_rule(rule: Rule, batch_size: int, dry_run: bool, *, org_id: OrgLike | None,
                now: datetime | None, max_batches: int | None,
                on_batch: Callable[[int], None] | None, all_orgs: bool) -> int:
    """:func:`purge` of one rule, the package's or an application's."""
    org = _purge_arguments(batch_size, max_batches, org_id, all_orgs, now)
    window = rule.default_window()
    if dry_run:
        with _across(org):
            when = resolve_now(now)
            would = int(select_stale(rule, cutoff_of(when, window), when, org).count())
        return would if max_batches is None else min(would, max_batches * batch_size)
    if database.in_transaction():
        raise PurgeInTransactionError(
            f"purge({rule.name!r}) inside an open transaction: its batches could not commit "
            "on their own and every locked row would stay locked until the caller ends it; "
            "call purge() outside database.atomic() (or pass dry_run=True to only count)"
        )
    when = resolve_now(now)
    run = _Run(rule, cutoff_of(when, window), when, batch_size, on_batch)
    if org is not None:
        return _org_batches(run, org, max_batches)[0]
    # Across orgs, org by org: a FOR UPDATE spanning shards is refused on Citus, and each
    # org's batches are then router statements. The orgs are those with stale rows at the
    # start; rows of an org that gets some later are left for the next run.
    total = batches = 0
    for one in _orgs_with_stale_rows(run):
        left = None if max_batches is None else max_batches - batches
        done, used = _org_batches(run, one, left)
        total, batches = total + done, batches + used
        if max_batches is not None and batches >= max_batches:
            break
    return total


@dataclass(frozen=True, eq=False)
class _Run:
    """One purge run: a rule, its cutoff and ``now`` (fixed once), and its batch size."""

    rule: Rule
    cutoff: datetime
    now: datetime
    batch_size: int
    on_batch: Callable[[int], None] | None


def _orgs_with_stale_rows(run: _Run) -> list[uuid.UUID]:
    """The orgs holding stale rows of the run's policy (no lock: the batches lock)."""
    model = run.rule.model
    with cross_org(reason=PURGE_REASON):
        query = select_stale(run.rule, run.cutoff, run.now, None, model.org_id)
        return [row[0] for row in query.distinct().order_by(model.org_id).tuples()]


def _org_batches(run: _Run, org: uuid.UUID, max_batches: int | None) -> tuple[int, int]:
    total = batches = 0
    while max_batches is None or batches < max_batches:
        with database.atomic():
            statement, params = _batch_statement(run.rule, run.cutoff, run.now, org,
                                                 run.batch_size)
            affected = int(execute_scoped(org, statement, params).fetchone()[0])
        total, batches = total + affected, batches + 1
        if run.on_batch is not None:
            run.on_batch(affected)
        if affected < run.batch_size:  # nothing more this run can lock
            break
    log.info("retention purge of %s (%s): %d row(s) in %d batch(es), cutoff %s",
             run.rule.name, org, total, batches, run.cutoff.isoformat())
    return total, batches


def _batch_statement(rule: Rule, cutoff: datetime, now: datetime, org: uuid.UUID | None,
                     batch_size: int) -> tuple[str, tuple[Any, ...]]:
    """One batch of ``rule`` as SQL and parameters: the selectors' query, locked and
    limited, with the rule's action around it (rendered on the current connection, which
    quotes the identifiers)."""
    model = rule.model
    meta: Any = model._meta  # peewee's stubs leave get_primary_keys untyped
    keys: tuple[Any, ...] = meta.get_primary_keys()
    batch = (select_stale(rule, cutoff, now, org, *keys)
             .order_by(getattr(model, rule.age_column)).limit(batch_size)
             .for_update(skip_locked=True))
    batch_sql, params = batch.sql()
    steps = [_unlink_step(index, fk) for index, fk in enumerate(rule.unlink)]
    steps.append(_action_step(rule, [key.column_name for key in keys]))
    statement = sql.SQL(BATCH_SQL).format(batch=sql.SQL(batch_sql), steps=sql.Composed(steps))
    return statement.as_string(database.connection()), tuple(params)


def _unlink_step(index: int, foreign_key: Any) -> sql.Composable:
    return sql.SQL(UNLINK_SQL).format(
        name=sql.Identifier(f"unlinked_{index}"),
        child=sql.Identifier(foreign_key.model._meta.table_name),
        column=sql.Identifier(foreign_key.column_name),
        target=sql.Identifier(foreign_key.rel_model.id.column_name))  # a TenantForeignKey


def _action_step(rule: Rule, keys: list[str]) -> sql.Composable:
    table = sql.Identifier(rule.model._meta.table_name)
    match = sql.SQL(" AND ").join(
        sql.SQL("t.{key} = batch.{key}").format(key=sql.Identifier(key)) for key in keys)
    if rule.action == "delete":
        return sql.SQL(DELETE_SQL).format(table=table, match=match)
    columns = [getattr(rule.model, name).column_name for name in rule.scrub_columns]
    assignments = sql.SQL(", ").join(
        sql.SQL("{} = NULL").format(sql.Identifier(column)) for column in columns)
    return sql.SQL(SCRUB_SQL).format(table=table, assignments=assignments, match=match)


def _across(org: uuid.UUID | None) -> contextlib.AbstractContextManager[None]:
    """``cross_org`` for work across every org (``org`` is ``None``), else nothing: whether a
    statement runs with admin rights is decided where it runs."""
    return cross_org(reason=SELECT_REASON) if org is None else contextlib.nullcontext()


def _policy(value: RetentionPolicy | str) -> RetentionPolicy:
    try:
        return RetentionPolicy(value)
    except ValueError:
        raise unknown_policy_error(value) from None


def unknown_policy_error(value: object) -> ValueError:
    """The error for a policy name that is not known, naming every known one."""
    from .table_retention import registered_retention_policies

    names = ", ".join([p.value for p in RetentionPolicy] + list(registered_retention_policies()))
    return ValueError(f"unknown retention policy {value!r}: use one of {names}")


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
    """Check a purge's arguments before any SQL; returns its org, ``None`` for every org."""
    _check_count(batch_size, "batch_size")
    if max_batches is not None:
        _check_count(max_batches, "max_batches")
    org = org_scope(org_id, all_orgs, "purge()")
    if now is not None:
        _check_aware(now)  # before the dry run's or the batches' first statement
    return org


def org_scope(org_id: OrgLike | None, all_orgs: bool, where: str) -> uuid.UUID | None:
    """The org of a call, or ``None`` for every org, which a call must say explicitly."""
    if all_orgs:
        if org_id is not None:
            raise ValueError(f"{where}: pass org_id=... or all_orgs=True, not both")
        return None
    if org_id is None and cross_org_reason() is not None:
        return None  # inside cross_org: every org, as the block says
    return require_org(org_id, where)


def resolve_now(now: datetime | None) -> datetime:
    """``now`` once checked, else the database's clock (the one SQL this may run)."""
    if now is not None:
        _check_aware(now)
        return now
    value: datetime = database.execute_sql(NOW_SQL).fetchone()[0]
    return value


def cutoff_of(now: datetime, window: timedelta) -> datetime:
    try:
        return now - window
    except OverflowError:
        raise ValueError(f"a retention window of {window} reaches before year 1") from None
