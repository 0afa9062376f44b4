"""``pytest --citus``: the suite's Citus run, on a real three-node cluster.

With ``--citus`` a coordinator and two workers start on loopback (tenantdb.citus_dev) before
the session, the plugin's per-session database is created on every node through the
coordinator, and ``tenantdb migrate`` distributes it; only :data:`ON_CITUS` files run, minus
:data:`NOT_ON_CITUS`. Without a PostgreSQL that has Citus, every test is skipped with the
reason. Without ``--citus``, tests marked ``citus`` are skipped (``make test-citus``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tenantdb import citus_dev
from tenantdb.settings import get_settings, reset_settings

#: Files of the suite that run against the cluster.
ON_CITUS = {
    "test_citus.py", "test_tenancy.py", "test_tenancy_concurrency.py", "test_rls.py",
    "test_idempotency.py", "test_retention.py", "test_knowledge.py",
}
#: Tests of those files that do not apply to a Citus cluster, with the reason.
_ONE_STRING = ("asserts the org goes in the statement's own string; on Citus it goes as a "
               "propagated SET LOCAL first (tenantdb.scoping, bench/citus_scoping.py)")
_MIXED_LOGINS = ("cross_org after scoped writes in one transaction: Citus refuses to read "
                 "shards another login modified in the transaction (the admin pool runs "
                 "cross_org on a connection of its own)")
_SET_NULL = ("deletes a destination itineraries still point at: on Citus the key has no "
             "ON DELETE SET NULL (Citus refuses it), unlink first (README)")
_OWNER_HARNESS = ("asserts row-level security inside tenant_db: on a Citus coordinator the "
                  "test's transaction keeps the owner's role (one worker connection per role "
                  "in a distributed transaction); the committed and raw app-login tests prove "
                  "the workers' policies")
_COORDINATOR_SETTING = "raw set_config on the coordinator; on Citus see test_citus.py"
_COORDINATOR_EXPLAIN = ("the coordinator's EXPLAIN shows the Citus scan; the index is used on "
                        "the shard")
NOT_ON_CITUS: dict[str, str] = {
    "test_library_works_as_the_app_role": _OWNER_HARNESS,
    "test_raw_needs_an_org_and_rls_hides_other_orgs": _OWNER_HARNESS,
    "test_execute_sql_on_tenant_tables_is_refused": _OWNER_HARNESS,
    "test_legacy_ef_search_applies_on_a_fresh_connection": _COORDINATOR_SETTING,
    "test_iterative_scan_applies_on_a_fresh_connection_and_stays_local": _COORDINATOR_SETTING,
    "test_explain_shows_the_iterative_hnsw_scan_for_a_large_org": _COORDINATOR_EXPLAIN,
    "test_iterative_scan_stopped_by_its_bound_falls_back_to_exact": _ONE_STRING,
    "test_small_org_pays_one_round_trip_once_its_size_is_known": _ONE_STRING,
    "test_text_search_refuses_an_embedder_of_another_model_before_searching": _ONE_STRING,
    "test_begin_is_one_statement_whatever_the_outcome": _ONE_STRING,
    "test_each_store_call_is_one_statement": _ONE_STRING,
    "test_a_statement_sets_the_org_in_the_same_round_trip": _ONE_STRING,
    "test_short_hnsw_result_falls_back_to_exact": _ONE_STRING,
    "test_hnsw_ef_search_applies_on_a_fresh_connection":
        "raw set_config on the coordinator; on Citus see test_citus.py",
    "test_raw_sql_as_app_role_with_org_sees_only_that_org":
        "raw set_config on the coordinator; on Citus see test_citus.py",
    "test_hnsw_statement_uses_the_index_and_exact_does_not":
        "the coordinator's EXPLAIN shows the Citus scan; the index is used on the shard",
    "test_every_selector_uses_an_index":
        "the coordinator's EXPLAIN shows the Citus scan; the index is used on the shard",
    "test_large_org_gets_exactly_k_hits_through_hnsw":
        "asserts the HNSW path; on Citus the shards' size is cached for 60 s, so a table "
        "filled within the test is sized from an earlier reading (the k hits are checked)",
    "test_a_racer_gets_in_progress_fast_while_the_work_runs":
        "its 0.1 s bound is for one round trip; on Citus a claim takes three (0.24-0.33 s "
        "measured on a loaded machine, never blocked by the holder)",
    "test_every_purge_batch_uses_an_index":
        "explains the across-orgs batch, which Citus never runs (purges go org by org)",
    "test_check_flags_an_app_role_that_bypasses_rls": "GRANT ... WITH INHERIT: PostgreSQL 16",
    "test_selector_returns_exactly_the_stale_rows_of_every_org": _MIXED_LOGINS,
    "test_selector_returns_an_unexecuted_query": _MIXED_LOGINS,
    "test_tool_log_selector_skips_runs_without_a_log": _MIXED_LOGINS,
    "test_pending_entry_with_live_lease_is_never_selected": _MIXED_LOGINS,
    "test_window_argument_overrides_the_setting": _MIXED_LOGINS,
    "test_windows_default_to_settings": _MIXED_LOGINS,
    "test_summary_counts_every_policy_against_one_now": _MIXED_LOGINS,
    "test_summary_per_org_breaks_counts_down": _MIXED_LOGINS,
    "test_dry_run_inside_a_transaction_is_allowed": _MIXED_LOGINS,
    "test_cross_org_sees_all_orgs_and_is_gone_after": _MIXED_LOGINS,
    "test_cross_org_statements_run_as_the_bypass_role": _MIXED_LOGINS,
    "test_set_and_delete_by_id_are_scoped": _SET_NULL,
    "test_save_updates_own_row_and_org_cannot_change": _SET_NULL,
    "test_delete_instance_deletes_only_own_row": _SET_NULL,
    "test_bulk_update_changes_only_own_org":
        "Citus cannot plan bulk_update's CASE (uuid = boolean): a limit in the README",
}

_cluster_home: Path | None = None
_skip_reason: str | None = None


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--citus", action="store_true",
                     help="run the Citus tests on a coordinator + two workers started here")


def pytest_configure(config: pytest.Config) -> None:
    global _cluster_home, _skip_reason
    config.addinivalue_line("markers", "citus: needs a Citus cluster (pytest --citus)")
    if not config.getoption("--citus"):
        return
    pg_bin = get_settings().pg_bin
    if citus_dev.find_pg_bin(pg_bin) is None:
        if os.environ.get("TENANTDB_REQUIRE_CITUS"):  # CI: the tests must run
            raise pytest.UsageError(citus_dev.NO_CITUS)
        _skip_reason = citus_dev.NO_CITUS
        return
    _cluster_home = Path(tempfile.mkdtemp(prefix="tenantdb-citus-"))
    cluster = citus_dev.start(_cluster_home, pg_bin)
    # The plugin creates its session database through this URL (on every node).
    os.environ["TENANTDB_TEST_DATABASE_URL"] = cluster.url(database="postgres")
    os.environ["TENANTDB_TEST_CITUS_PORTS"] = ",".join(str(p) for p in cluster.ports.values())
    reset_settings()


def pytest_unconfigure(config: pytest.Config) -> None:
    if _cluster_home is not None:
        citus_dev.stop(_cluster_home)
        shutil.rmtree(_cluster_home, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--citus"):
        skip = pytest.mark.skip(reason="needs a Citus cluster: make test-citus "
                                       "(pytest --citus)")
        for item in items:
            if item.get_closest_marker("citus"):
                item.add_marker(skip)
        return
    if _skip_reason is not None:
        for item in items:
            item.add_marker(pytest.mark.skip(reason=_skip_reason))
        return
    keep, drop = [], []
    for item in items:
        (keep if item.path.name in ON_CITUS else drop).append(item)
        for name, reason in NOT_ON_CITUS.items():
            if name in item.nodeid:
                item.add_marker(pytest.mark.skip(reason=f"not on Citus: {reason}"))
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
