"""Retention: exact selection at each cutoff, batched restartable purges, indexes, the CLI.

Times are pinned by passing ``now`` and backdating rows relative to it: Postgres keeps its
own clock, so a patched Python clock would prove nothing.
"""

from __future__ import annotations

import subprocess
import threading
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from helpers import PYTHON, admin_execute, cli_env
from tenancy_fixtures import TwoOrgs

from tenantdb import retention
from tenantdb.db import TenantDatabase, database
from tenantdb.errors import MissingOrgError
from tenantdb.models import AgentRun, IdempotencyKey, Itinerary, User
from tenantdb.orgs import create_org
from tenantdb.pytest_plugin import TestDatabase
from tenantdb.retention import (
    PurgeInTransactionError,
    RetentionPolicy,
    get_retention_summary,
    get_stale_agent_run_tool_logs,
    get_stale_agent_runs,
    get_stale_idempotency_entries,
    get_stale_itineraries,
    purge,
)
from tenantdb.settings import override_settings
from tenantdb.table_retention import get_stale_rows
from tenantdb.tenancy import cross_org, execute_scoped

EDGE = timedelta(seconds=5)
RUN_WINDOW = timedelta(days=30)
LOG_WINDOW = timedelta(hours=24)
ITINERARY_WINDOW = timedelta(days=90)
LOG = {"calls": [{"tool": "search", "ms": 12}]}
BODY_HASH = "0" * 64
Row = tuple[uuid.UUID, Any]


# HELPERS


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def make_org(name: str = "Org") -> uuid.UUID:
    org: uuid.UUID = create_org(name, f"ret-{uuid.uuid4().hex[:12]}").id
    return org


def make_user(org: uuid.UUID) -> uuid.UUID:
    user: uuid.UUID = User.create(org_id=org, email=f"{uuid.uuid4().hex[:8]}@ret.test").id
    return user


def make_run(org: uuid.UUID, user: uuid.UUID, created_at: datetime,
             tool_log: Any = None) -> Row:
    run = AgentRun.create(org_id=org, user_id=user, created_at=created_at, tool_log=tool_log)
    return run.org_id, run.id


def make_itinerary(org: uuid.UUID, user: uuid.UUID, created_at: datetime,
                   agent_run_id: uuid.UUID | None = None) -> Row:
    row = Itinerary.create(org_id=org, user_id=user, title="Trip", created_at=created_at,
                           agent_run_id=agent_run_id)
    return row.org_id, row.id


def make_entry(org: uuid.UUID, user: uuid.UUID, ttl_until: datetime, *,
               status: str = "completed", locked_until: datetime | None = None) -> Row:
    key = f"key-{uuid.uuid4().hex}"
    IdempotencyKey.insert(org_id=org, user_id=user, key=key, status=status,
                          body_hash=BODY_HASH, ttl_until=ttl_until,
                          locked_until=locked_until).execute()
    return org, key


def keys(query: Any) -> set[Row]:
    if query.model is IdempotencyKey:
        return {(row.org_id, row.key) for row in query}
    return {(row.org_id, row.id) for row in query}


def across(query: Any) -> set[Row]:
    """Run an across-org selection where it may run: inside cross_org."""
    with cross_org(reason="test: across-org selection"):
        return keys(query)


def all_keys(model: Any) -> set[Row]:
    with cross_org(reason="test: read every row"):
        return keys(model.select())


def logged_runs() -> set[Row]:
    with cross_org(reason="test: runs with tool logs"):
        return keys(AgentRun.select().where(AgentRun.tool_log.is_null(False)))


@dataclass(frozen=True)
class World:
    """Rows 5 s either side of every cutoff, in two orgs, against one ``now``."""

    now: datetime
    a: uuid.UUID
    b: uuid.UUID
    stale: dict[RetentionPolicy, set[Row]]
    fresh: dict[RetentionPolicy, set[Row]]

    def stale_in(self, policy: RetentionPolicy, org: uuid.UUID) -> set[Row]:
        return {row for row in self.stale[policy] if row[0] == org}


def build_world(a: uuid.UUID, b: uuid.UUID) -> World:
    now = utcnow()
    stale: dict[RetentionPolicy, set[Row]] = {p: set() for p in RetentionPolicy}
    fresh: dict[RetentionPolicy, set[Row]] = {p: set() for p in RetentionPolicy}
    for org in (a, b):
        user = make_user(org)
        run_cut, log_cut, trip_cut = now - RUN_WINDOW, now - LOG_WINDOW, now - ITINERARY_WINDOW
        old_run = make_run(org, user, run_cut - EDGE, tool_log=LOG)
        stale[RetentionPolicy.AGENT_RUNS].add(old_run)
        stale[RetentionPolicy.AGENT_RUN_TOOL_LOGS].add(old_run)
        fresh[RetentionPolicy.AGENT_RUNS].add(make_run(org, user, run_cut + EDGE))
        stale[RetentionPolicy.AGENT_RUN_TOOL_LOGS].add(make_run(org, user, log_cut - EDGE, LOG))
        fresh[RetentionPolicy.AGENT_RUN_TOOL_LOGS].add(make_run(org, user, log_cut + EDGE, LOG))
        make_run(org, user, log_cut - EDGE)  # old enough, but no log to scrub
        stale[RetentionPolicy.ITINERARIES].add(make_itinerary(org, user, trip_cut - EDGE))
        fresh[RetentionPolicy.ITINERARIES].add(make_itinerary(org, user, trip_cut + EDGE))
        entries = stale[RetentionPolicy.IDEMPOTENCY_ENTRIES]
        entries.add(make_entry(org, user, now - EDGE))
        entries.add(make_entry(org, user, now - EDGE, status="error"))
        entries.add(make_entry(org, user, now - EDGE, status="pending",
                               locked_until=now - EDGE))  # its holder crashed
        entries.add(make_entry(org, user, now - EDGE, status="pending"))
        kept = fresh[RetentionPolicy.IDEMPOTENCY_ENTRIES]
        kept.add(make_entry(org, user, now + EDGE))
        # Past its ttl, but its holder's lease is live: still working, never selected.
        kept.add(make_entry(org, user, now - EDGE, status="pending", locked_until=now + EDGE))
    return World(now, a, b, stale, fresh)


SELECTORS: dict[RetentionPolicy, Callable[..., Any]] = {
    RetentionPolicy.AGENT_RUNS: get_stale_agent_runs,
    RetentionPolicy.AGENT_RUN_TOOL_LOGS: get_stale_agent_run_tool_logs,
    RetentionPolicy.ITINERARIES: get_stale_itineraries,
    RetentionPolicy.IDEMPOTENCY_ENTRIES: get_stale_idempotency_entries,
}
MODELS: dict[RetentionPolicy, Any] = {
    RetentionPolicy.AGENT_RUNS: AgentRun,
    RetentionPolicy.AGENT_RUN_TOOL_LOGS: AgentRun,
    RetentionPolicy.ITINERARIES: Itinerary,
    RetentionPolicy.IDEMPOTENCY_ENTRIES: IdempotencyKey,
}
every_policy = pytest.mark.parametrize("policy", list(RetentionPolicy), ids=str)


@pytest.fixture
def world(two_orgs: TwoOrgs) -> World:
    return build_world(two_orgs.a, two_orgs.b)


@pytest.fixture
def committed_world(tenantdb_committed: TenantDatabase) -> World:
    return build_world(make_org("A"), make_org("B"))


def stale_count(policy: RetentionPolicy, now: datetime) -> int:
    """Counted in a fresh thread, so on another pooled connection: committed rows only."""
    def count() -> int:
        try:
            with cross_org(reason="test: count stale rows"):
                return int(SELECTORS[policy](now=now, all_orgs=True).count())
        finally:
            database.close()  # give the thread's pooled connection back

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(count).result()


def make_stale_runs(org: uuid.UUID, count: int, now: datetime) -> None:
    user = make_user(org)
    rows = [{"user_id": user, "created_at": now - RUN_WINDOW - timedelta(minutes=i + 1)}
            for i in range(count)]
    AgentRun.insert_many(rows, org_id=org).execute()


# SELECTION


@every_policy
def test_selector_returns_exactly_the_stale_rows_of_every_org(
        world: World, policy: RetentionPolicy) -> None:
    assert across(SELECTORS[policy](now=world.now, all_orgs=True)) == world.stale[policy]


@every_policy
def test_selector_for_one_org_returns_only_its_stale_rows(
        world: World, policy: RetentionPolicy) -> None:
    assert keys(SELECTORS[policy](org_id=world.a, now=world.now)) == world.stale_in(
        policy, world.a)


@every_policy
def test_selector_returns_an_unexecuted_query(
        world: World, policy: RetentionPolicy) -> None:
    query = SELECTORS[policy](now=world.now, all_orgs=True)
    user, long_ago = make_user(world.a), world.now - timedelta(days=365)
    if policy is RetentionPolicy.IDEMPOTENCY_ENTRIES:
        added = make_entry(world.a, user, long_ago)
    elif policy is RetentionPolicy.ITINERARIES:
        added = make_itinerary(world.a, user, long_ago)
    else:
        added = make_run(world.a, user, long_ago, LOG)
    assert added in across(query)  # rows inserted after the call are seen: nothing ran yet


def test_cross_org_selection_does_not_leak_the_escape_hatch(world: World) -> None:
    get_stale_agent_runs(now=world.now, all_orgs=True)
    with pytest.raises(MissingOrgError):
        AgentRun.select()


def test_tool_log_selector_skips_runs_without_a_log(world: World) -> None:
    selected = across(get_stale_agent_run_tool_logs(now=world.now, all_orgs=True))
    assert selected <= logged_runs()


def test_pending_entry_with_live_lease_is_never_selected(tenant_db: TenantDatabase,
                                                         org_id: uuid.UUID) -> None:
    now, user = utcnow(), make_user(org_id)
    held = make_entry(org_id, user, now - timedelta(days=7), status="pending",
                      locked_until=now + timedelta(seconds=1))
    assert held not in keys(get_stale_idempotency_entries(org_id=org_id, now=now))
    assert held in keys(get_stale_idempotency_entries(org_id=org_id,
                                                      now=now + timedelta(seconds=2)))


def test_window_argument_overrides_the_setting(tenant_db: TenantDatabase,
                                               org_id: uuid.UUID) -> None:
    now, user = utcnow(), make_user(org_id)
    week_old = make_run(org_id, user, now - timedelta(days=7) - EDGE, LOG)
    assert keys(get_stale_agent_runs(7, org_id=org_id, now=now)) == {week_old}
    assert keys(get_stale_agent_runs(org_id=org_id, now=now)) == set()
    assert keys(get_stale_agent_run_tool_logs(24 * 7, org_id=org_id, now=now)) == {week_old}
    assert keys(get_stale_itineraries(retention_days=1, org_id=org_id, now=now)) == set()


def test_windows_default_to_settings(tenant_db: TenantDatabase, org_id: uuid.UUID) -> None:
    now, user = utcnow(), make_user(org_id)
    run = make_run(org_id, user, now - timedelta(days=2) - EDGE, LOG)
    trip = make_itinerary(org_id, user, now - timedelta(days=2) - EDGE)
    with override_settings(retention_agent_run_days=2, retention_tool_log_hours=48,
                           retention_itinerary_days=2):
        assert keys(get_stale_agent_runs(org_id=org_id, now=now)) == {run}
        assert keys(get_stale_agent_run_tool_logs(org_id=org_id, now=now)) == {run}
        assert keys(get_stale_itineraries(org_id=org_id, now=now)) == {trip}
        assert get_retention_summary(org_id=org_id, now=now).counts == {
            "agent_runs": 1, "agent_run_tool_logs": 1, "itineraries": 1,
            "idempotency_entries": 0}


def test_now_defaults_to_the_database_clock(tenant_db: TenantDatabase,
                                            org_id: uuid.UUID) -> None:
    user, python_now = make_user(org_id), utcnow()
    stale = make_run(org_id, user, python_now - RUN_WINDOW - timedelta(minutes=1))
    make_run(org_id, user, python_now - RUN_WINDOW + timedelta(minutes=1))
    assert keys(get_stale_agent_runs(org_id=org_id)) == {stale}


# SUMMARY


def test_summary_counts_every_policy_against_one_now(world: World) -> None:
    summary = get_retention_summary(now=world.now, all_orgs=True)
    assert summary.now == world.now and summary.org_id is None and summary.per_org is None
    assert dict(summary.counts) == {p: len(world.stale[p]) for p in RetentionPolicy}
    assert summary.total == sum(len(rows) for rows in world.stale.values())
    assert summary.cutoffs[RetentionPolicy.AGENT_RUNS] == world.now - RUN_WINDOW
    assert summary.cutoffs[RetentionPolicy.AGENT_RUN_TOOL_LOGS] == world.now - LOG_WINDOW
    assert summary.cutoffs[RetentionPolicy.ITINERARIES] == world.now - ITINERARY_WINDOW
    assert summary.cutoffs[RetentionPolicy.IDEMPOTENCY_ENTRIES] == world.now


def test_summary_per_org_breaks_counts_down(world: World) -> None:
    summary = get_retention_summary(now=world.now, per_org=True, all_orgs=True)
    assert summary.per_org is not None
    for org in (world.a, world.b):
        assert dict(summary.per_org[org]) == {
            p: len(world.stale_in(p, org)) for p in RetentionPolicy}
    assert dict(summary.counts) == {p: len(world.stale[p]) for p in RetentionPolicy}


def test_summary_for_one_org_counts_only_it(world: World) -> None:
    summary = get_retention_summary(org_id=world.b, now=world.now, per_org=True)
    assert summary.org_id == world.b
    assert dict(summary.counts) == {p: len(world.stale_in(p, world.b)) for p in RetentionPolicy}
    assert summary.per_org is not None and set(summary.per_org) == {world.b}


# PURGE


@every_policy
def test_purge_affects_exactly_the_stale_rows(committed_world: World,
                                              policy: RetentionPolicy) -> None:
    w = committed_world
    before = all_keys(MODELS[policy])
    assert purge(policy, batch_size=2, now=w.now, all_orgs=True) == len(w.stale[policy])
    assert across(SELECTORS[policy](now=w.now, all_orgs=True)) == set()
    if policy is RetentionPolicy.AGENT_RUN_TOOL_LOGS:
        assert all_keys(AgentRun) == before  # scrubbed, not deleted
        assert logged_runs() == w.fresh[policy]
    else:
        assert all_keys(MODELS[policy]) == before - w.stale[policy]
        assert w.fresh[policy] <= all_keys(MODELS[policy])


@every_policy
def test_purge_for_one_org_leaves_other_orgs_alone(committed_world: World,
                                                   policy: RetentionPolicy) -> None:
    w = committed_world
    purged = purge(policy, org_id=w.a, now=w.now)
    assert purged == len(w.stale_in(policy, w.a))
    assert across(SELECTORS[policy](now=w.now, all_orgs=True)) == w.stale_in(policy, w.b)


def test_purge_accepts_policy_names(committed_world: World) -> None:
    assert purge("itineraries", now=committed_world.now, all_orgs=True) == 2


def test_tool_logs_are_scrubbed_and_runs_kept(tenantdb_committed: TenantDatabase) -> None:
    org, now = make_org(), utcnow()
    user = make_user(org)
    old = make_run(org, user, now - LOG_WINDOW - EDGE, LOG)
    updated_at = AgentRun.get_by_id(old[1], org_id=org).updated_at
    assert purge(RetentionPolicy.AGENT_RUN_TOOL_LOGS, now=now, org_id=org) == 1
    run = AgentRun.get_by_id(old[1], org_id=org)
    assert run.tool_log is None and run.updated_at == updated_at


def test_purged_run_leaves_its_itinerary_unlinked(tenantdb_committed: TenantDatabase) -> None:
    org, now = make_org(), utcnow()
    user = make_user(org)
    run = make_run(org, user, now - RUN_WINDOW - EDGE)
    trip = make_itinerary(org, user, now, agent_run_id=run[1])
    assert purge(RetentionPolicy.AGENT_RUNS, now=now, org_id=org) == 1
    assert Itinerary.get_by_id(trip[1], org_id=org).agent_run_id is None


def test_dry_run_counts_and_changes_nothing(committed_world: World) -> None:
    w = committed_world
    before = {p: all_keys(MODELS[p]) for p in RetentionPolicy}
    for policy in RetentionPolicy:
        assert purge(policy, dry_run=True, now=w.now, all_orgs=True) == len(w.stale[policy])
        assert purge(policy, 1, True, org_id=w.b, now=w.now, max_batches=1) == 1
    assert {p: all_keys(MODELS[p]) for p in RetentionPolicy} == before
    assert logged_runs() == (w.stale[RetentionPolicy.AGENT_RUN_TOOL_LOGS]
                             | w.fresh[RetentionPolicy.AGENT_RUN_TOOL_LOGS])


def test_every_batch_is_bounded_and_committed_on_its_own(
        tenantdb_committed: TenantDatabase) -> None:
    now = utcnow()
    make_stale_runs(make_org(), 35, now)
    sizes: list[int] = []
    seen_elsewhere: list[int] = []

    def after_batch(affected: int) -> None:
        sizes.append(affected)
        seen_elsewhere.append(stale_count(RetentionPolicy.AGENT_RUNS, now))

    assert purge(RetentionPolicy.AGENT_RUNS, 10, now=now, on_batch=after_batch, all_orgs=True) == 35
    assert sizes == [10, 10, 10, 5]
    assert seen_elsewhere == [25, 15, 5, 0]


def test_purge_interrupted_after_k_batches_keeps_them_and_rerun_finishes(
        tenantdb_committed: TenantDatabase) -> None:
    now = utcnow()
    make_stale_runs(make_org(), 35, now)
    assert purge(RetentionPolicy.AGENT_RUNS, 10, now=now, max_batches=2, all_orgs=True) == 20
    assert stale_count(RetentionPolicy.AGENT_RUNS, now) == 15
    assert purge(RetentionPolicy.AGENT_RUNS, 10, now=now, all_orgs=True) == 15
    assert stale_count(RetentionPolicy.AGENT_RUNS, now) == 0


def test_purge_killed_by_an_error_keeps_committed_batches(
        tenantdb_committed: TenantDatabase) -> None:
    now = utcnow()
    make_stale_runs(make_org(), 35, now)
    batches: list[int] = []

    def crash_after_two(affected: int) -> None:
        batches.append(affected)
        if len(batches) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        purge(RetentionPolicy.AGENT_RUNS, 10, now=now, on_batch=crash_after_two, all_orgs=True)
    assert stale_count(RetentionPolicy.AGENT_RUNS, now) == 15
    assert purge(RetentionPolicy.AGENT_RUNS, 10, now=now, all_orgs=True) == 15
    assert stale_count(RetentionPolicy.AGENT_RUNS, now) == 0


@pytest.mark.parametrize("org_scoped", [False, True], ids=["all-orgs", "one-org"])
def test_concurrent_purges_split_the_rows_without_deadlock(
        tenantdb_committed: TenantDatabase, org_scoped: bool) -> None:
    now, org = utcnow(), make_org()
    make_stale_runs(org, 600, now)
    start = threading.Barrier(2)

    def run() -> int:
        start.wait()
        try:
            return purge(RetentionPolicy.AGENT_RUNS, 25, now=now,
                         org_id=org if org_scoped else None, all_orgs=not org_scoped)
        finally:
            database.close()  # give the thread's pooled connection back

    with ThreadPoolExecutor(2) as pool:
        results = [f.result(timeout=60) for f in [pool.submit(run), pool.submit(run)]]
    assert sum(results) == 600
    assert stale_count(RetentionPolicy.AGENT_RUNS, now) == 0


def test_purge_inside_a_transaction_is_refused(tenant_db: TenantDatabase,
                                               org_id: uuid.UUID) -> None:
    with pytest.raises(PurgeInTransactionError, match=r"outside database\.atomic\(\)"):
        purge(RetentionPolicy.AGENT_RUNS, org_id=org_id)


def test_dry_run_inside_a_transaction_is_allowed(world: World) -> None:
    assert purge(RetentionPolicy.ITINERARIES, dry_run=True, now=world.now, all_orgs=True) == 2


# BAD INPUT: no fixture grants database access, so any SQL would raise RuntimeError instead


NAIVE = datetime(2024, 1, 1, 12, 0)


@pytest.mark.parametrize("call", [
    lambda: get_stale_agent_runs(now=NAIVE, all_orgs=True),
    lambda: get_stale_agent_run_tool_logs(now=NAIVE, all_orgs=True),
    lambda: get_stale_itineraries(now=NAIVE, all_orgs=True),
    lambda: get_stale_idempotency_entries(now=NAIVE, all_orgs=True),
    lambda: get_retention_summary(now=NAIVE, all_orgs=True),
    lambda: purge(RetentionPolicy.AGENT_RUNS, now=NAIVE, all_orgs=True),
    lambda: purge(RetentionPolicy.AGENT_RUNS, dry_run=True, now=NAIVE, all_orgs=True),
], ids=["runs", "tool_logs", "itineraries", "idempotency", "summary", "purge", "dry_run"])
def test_naive_now_is_refused_before_sql(tenantdb_database: TestDatabase,
                                         call: Callable[[], Any]) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        call()


@pytest.mark.parametrize("window", [0, -1, -0.5, float("nan"), float("inf"), True, "30"])
@pytest.mark.parametrize("selector", [get_stale_agent_runs, get_stale_agent_run_tool_logs,
                                      get_stale_itineraries])
def test_bad_window_is_refused_before_sql(tenantdb_database: TestDatabase,
                                          selector: Callable[..., Any], window: Any) -> None:
    with pytest.raises(ValueError, match="positive number"):
        selector(window, now=utcnow())
    with pytest.raises(ValueError, match="positive number"):
        selector(window)  # not even the clock is read


def test_window_beyond_the_calendar_is_a_value_error(tenantdb_database: TestDatabase) -> None:
    with pytest.raises(ValueError):
        get_stale_agent_runs(10**12, now=utcnow())
    with pytest.raises(ValueError):
        get_stale_agent_runs(999_999_000, now=utcnow())


@pytest.mark.parametrize("kwargs", [
    {"policy": "agent_run"}, {"policy": "AGENT_RUNS"}, {"policy": None},
    {"batch_size": 0}, {"batch_size": -5}, {"batch_size": 2.5}, {"batch_size": True},
    {"max_batches": 0}, {"max_batches": -1},
], ids=str)
def test_bad_purge_arguments_are_refused_before_sql(tenantdb_database: TestDatabase,
                                                    kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {"policy": RetentionPolicy.AGENT_RUNS, **kwargs}
    with pytest.raises(ValueError):
        purge(**args)


def test_unknown_policy_names_the_known_ones(tenantdb_database: TestDatabase) -> None:
    with pytest.raises(ValueError, match="agent_runs, agent_run_tool_logs, itineraries"):
        purge("tool_logs")


@pytest.mark.parametrize("org", ["", "not-a-uuid", 0])
def test_bad_org_is_refused_before_sql(tenantdb_database: TestDatabase, org: Any) -> None:
    with pytest.raises(MissingOrgError):
        get_stale_agent_runs(org_id=org)
    with pytest.raises(MissingOrgError):
        purge(RetentionPolicy.AGENT_RUNS, org_id=org)
    with pytest.raises(MissingOrgError):
        get_retention_summary(org_id=org)


# INDEXES


BIG = 8000


@pytest.fixture
def big_tables(tenantdb_committed: TenantDatabase, tenantdb_database: TestDatabase
               ) -> tuple[datetime, uuid.UUID]:
    """~8k rows per table in two orgs, few of them stale, analyzed as the owner."""
    now = utcnow()
    org = uuid.UUID(int=0)
    for org in (make_org("Big A"), make_org("Big B")):
        user = make_user(org)
        ages = [timedelta(minutes=i % 600) if i % 100 else RUN_WINDOW * 4 for i in range(BIG)]
        _insert(AgentRun, org, [{"user_id": user, "created_at": now - age,
                                 "tool_log": LOG if i % 20 == 0 else None}
                                for i, age in enumerate(ages)])
        _insert(Itinerary, org, [{"user_id": user, "title": "t", "created_at": now - age * 3}
                                 for age in ages])
        _insert(IdempotencyKey, org, [
            {"user_id": user, "key": f"k{i}", "body_hash": BODY_HASH, "status": "completed",
             "ttl_until": now + timedelta(hours=1) - age / 100} for i, age in enumerate(ages)])
    admin_execute(tenantdb_database.url, "ANALYZE agent_run, itinerary, idempotency_key")
    return now, org


def _insert(model: Any, org: uuid.UUID, rows: list[dict[str, Any]]) -> None:
    for start in range(0, len(rows), 1000):
        model.insert_many(rows[start:start + 1000], org_id=org).execute()


def _plan(sql: str, params: Iterable[Any], org: uuid.UUID | None) -> str:
    explain = f"EXPLAIN {sql}"
    if org is not None:
        rows = execute_scoped(org, explain, tuple(params)).fetchall()
    else:
        with cross_org(reason="test: explain retention"):
            rows = database.execute_sql(explain, tuple(params)).fetchall()
    return "\n".join(row[0] for row in rows)


def _assert_indexed(plan: str, table: str) -> None:
    assert f"Seq Scan on {table}" not in plan, plan
    assert "Index" in plan, plan


SCOPES = (False, True)  # every org, one org


def test_every_selector_uses_an_index(big_tables: tuple[datetime, uuid.UUID]) -> None:
    now, org = big_tables
    for policy in RetentionPolicy:
        for scoped in SCOPES:
            query = SELECTORS[policy](org_id=org if scoped else None, now=now,
                                      all_orgs=not scoped)
            sql, params = query.sql()
            _assert_indexed(_plan(sql, params, org if scoped else None),
                            MODELS[policy]._meta.table_name)


def test_every_purge_batch_uses_an_index(big_tables: tuple[datetime, uuid.UUID]) -> None:
    now, org = big_tables
    cutoffs = get_retention_summary(now=now, all_orgs=True).cutoffs
    for policy in RetentionPolicy:
        for scoped in SCOPES:
            # The batch is joined back by primary key; a batch this much smaller than the
            # table makes that the planner's choice here, as 1000 rows do in a real table.
            sql, params = retention._batch_statement(
                retention._RULES[policy], cutoffs[policy], now, org if scoped else None, 20)
            _assert_indexed(_plan(sql, params, org if scoped else None),
                            MODELS[policy]._meta.table_name)


# CLI


def run_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "tenantdb", "retention", *args], check=False,
                          capture_output=True, text=True,
                          env=cli_env(TENANTDB_DATABASE_URL=url), timeout=120)


@pytest.fixture
def cli_rows(tenantdb_committed: TenantDatabase) -> dict[str, Any]:
    """Stale and fresh rows against the real clock (the CLI reads the database's)."""
    now, org, other = utcnow(), make_org("CLI"), make_org("Other")
    user, other_user = make_user(org), make_user(other)
    return {
        "org": org, "other": other,
        "old_run": make_run(org, user, now - timedelta(days=40), LOG),
        "new_run": make_run(org, user, now - timedelta(days=10), LOG),
        "logged_run": make_run(org, user, now - timedelta(hours=1), LOG),
        "old_trip": make_itinerary(org, user, now - timedelta(days=100)),
        "old_entry": make_entry(org, user, now - timedelta(hours=1)),
        "other_run": make_run(other, other_user, now - timedelta(days=40)),
    }


def test_cli_without_purge_prints_the_summary_and_changes_nothing(
        tenantdb_database: TestDatabase, cli_rows: dict[str, Any]) -> None:
    done = run_cli(tenantdb_database.url)
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: line.split()[-1] for line in done.stdout.splitlines()[2:6]}
    assert lines == {"agent_runs": "2", "agent_run_tool_logs": "2", "itineraries": "1",
                     "idempotency_entries": "1"}
    assert "dry run: nothing changed; pass --purge" in done.stdout
    assert len(all_keys(AgentRun)) == 4 and len(all_keys(Itinerary)) == 1


def test_cli_purge_purges_in_batches_with_progress(
        tenantdb_database: TestDatabase, cli_rows: dict[str, Any]) -> None:
    done = run_cli(tenantdb_database.url, "--purge", "--batch-size", "1")
    assert done.returncode == 0, done.stderr
    assert "purged agent_runs: 2" in done.stdout
    assert "purged agent_run_tool_logs: 1" in done.stdout  # the 40-day run went first
    assert "purging agent_runs: 2/2" in done.stderr
    assert all_keys(AgentRun) == {cli_rows["new_run"], cli_rows["logged_run"]}
    assert logged_runs() == {cli_rows["logged_run"]}
    assert all_keys(Itinerary) == set() and all_keys(IdempotencyKey) == set()


def test_cli_purge_for_one_org(tenantdb_database: TestDatabase,
                               cli_rows: dict[str, Any]) -> None:
    done = run_cli(tenantdb_database.url, "--purge", "--org", str(cli_rows["other"]))
    assert done.returncode == 0, done.stderr
    assert f"org {cli_rows['other']}" in done.stdout
    assert "purged agent_runs: 1" in done.stdout
    assert cli_rows["old_run"] in all_keys(AgentRun)
    assert cli_rows["other_run"] not in all_keys(AgentRun)


@pytest.mark.parametrize("args, message", [
    (["--org", "nope"], "not a UUID"),
    (["--purge", "--batch-size", "0"], "--batch-size must be an integer of at least 1"),
])
def test_cli_bad_input_is_one_line_on_stderr(tenantdb_database: TestDatabase,
                                             cli_rows: dict[str, Any], args: list[str],
                                             message: str) -> None:
    done = run_cli(tenantdb_database.url, *args)
    assert done.returncode == 1
    assert message in done.stderr and done.stderr.count("\n") == 1
    assert len(all_keys(AgentRun)) == 4


@pytest.mark.parametrize("scoped", SCOPES, ids=["every org", "one org"])
@every_policy
def test_selector_and_purge_batch_share_one_filter(tenant_db: TenantDatabase,
                                                   org_id: uuid.UUID, policy: RetentionPolicy,
                                                   scoped: bool) -> None:
    now = utcnow()
    org = org_id if scoped else None
    selector_sql, selector_params = SELECTORS[policy](org_id=org, now=now,
                                                      all_orgs=not scoped).sql()
    cutoff = get_retention_summary(now=now, org_id=org_id).cutoffs[policy]
    batch_sql, batch_params = retention._batch_statement(retention._RULES[policy], cutoff, now,
                                                         org, 7)
    where = selector_sql.split(" WHERE ", 1)[1]
    # The batch locks what the selector selects: its WHERE, with its values, then its limit.
    assert f"WHERE {where} ORDER BY" in batch_sql and "FOR UPDATE SKIP LOCKED" in batch_sql
    assert batch_params == (*selector_params, 7)


@pytest.mark.parametrize(("name", "message"), [
    ("agent_runs", r"tenantdb's own: use its selector, tenantdb\.retention\.get_stale_agent_runs"),
    ("nope", "unknown retention policy 'nope': use one of agent_runs"),
    (7, "unknown retention policy 7"),
])
def test_table_selector_refuses_names_it_does_not_hold(tenantdb_database: TestDatabase,
                                                       name: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_stale_rows(name, all_orgs=True)
