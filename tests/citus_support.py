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
NOT_ON_CITUS: dict[str, str] = {}

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
