"""The pytest plugin: per-test rollback, nested atomic blocks, guarded access, Redis keys."""

from __future__ import annotations

import threading
import uuid

import pytest

from tenantdb.context import cross_org
from tenantdb.db import TenantDatabase
from tenantdb.models import Destination, Org
from tenantdb.orgs import create_org
from tenantdb.pytest_plugin import TestDatabase, TestRedis

INNER_SUITE = '''
import uuid
import pytest
from tenantdb.models import Org
from tenantdb.orgs import create_org
from tenantdb.tenancy import cross_org

SLUG = "leak-check-{marker}"

def test_1_writes_then_fails(tenant_db):
    create_org("leak", SLUG)
    with cross_org(reason="test"):
        assert Org.get_or_none(Org.slug == SLUG) is not None
    raise AssertionError("this test fails on purpose")

def test_2_sees_nothing_of_test_1(tenant_db):
    with cross_org(reason="test"):
        assert Org.get_or_none(Org.slug == SLUG) is None

def test_3_redis_keys_from_one_test(tenantdb_redis):
    tenantdb_redis.client.set(tenantdb_redis.prefix + ":k", "v")
    pytest.shared_prefix = tenantdb_redis.prefix

def test_4_redis_keys_are_gone(tenantdb_redis):
    assert tenantdb_redis.prefix != pytest.shared_prefix
    assert list(tenantdb_redis.client.scan_iter(match=pytest.shared_prefix + "*")) == []

def test_5_no_access_without_fixture(tenantdb_database):
    with pytest.raises(RuntimeError, match="use the `tenant_db` fixture"):
        Org.select(org_id=uuid.uuid4()).count()
'''


def test_rollback_isolates_tests_even_when_one_fails(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    tenantdb_database: TestDatabase,
    tenantdb_redis: TestRedis,
) -> None:
    """A plain application suite (no configuration) gets the fixtures from the entry point."""
    # Reuse this session's servers; the inner session creates its own fresh database.
    monkeypatch.setenv("TENANTDB_TEST_DATABASE_URL", tenantdb_database.url)
    monkeypatch.setenv("TENANTDB_TEST_REDIS_URL", tenantdb_redis.url)
    pytester.makepyfile(test_app=INNER_SUITE.replace("{marker}", uuid.uuid4().hex[:8]))

    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")

    result.assert_outcomes(passed=4, failed=1)
    result.stdout.fnmatch_lines(["*this test fails on purpose*"])


def test_nested_atomic_blocks_work_inside_the_test_transaction(org_id: uuid.UUID,
                                                               tenant_db: TenantDatabase) -> None:
    with tenant_db.atomic():
        Destination.create(org_id=org_id, name="kept")
        with pytest.raises(RuntimeError), tenant_db.atomic():
            Destination.create(org_id=org_id, name="rolled back to the savepoint")
            raise RuntimeError("inner block fails")
    names = {d.name for d in Destination.select(org_id=org_id)}
    assert names == {"kept"}
    assert tenant_db.transaction_depth() == 1  # still inside the test's own transaction


def test_other_threads_are_refused_during_tenant_db(tenant_db: TenantDatabase) -> None:
    errors: list[BaseException] = []

    def other_thread() -> None:
        try:
            Org.select(org_id=uuid.uuid4()).count()
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    worker = threading.Thread(target=other_thread)
    worker.start()
    worker.join()
    assert len(errors) == 1 and "tenantdb_committed" in str(errors[0])


def test_committed_fixture_allows_threads_and_empties_tables(
    tenantdb_committed: TenantDatabase,
) -> None:
    slug = f"committed-{uuid.uuid4().hex[:8]}"

    def writer() -> None:
        create_org("from a thread", slug)
        tenantdb_committed.close()

    worker = threading.Thread(target=writer)
    worker.start()
    worker.join()
    with cross_org(reason="test"):
        assert Org.get_or_none(Org.slug == slug) is not None


def test_committed_rows_are_gone_in_the_next_test(tenant_db: TenantDatabase) -> None:
    with cross_org(reason="test"):
        assert Org.get_or_none(Org.slug.startswith("committed-")) is None


def test_org_id_fixture_gives_a_fresh_org(org_id: uuid.UUID, tenant_db: TenantDatabase) -> None:
    assert Org.get_by_id(org_id).slug.startswith("test-")


def test_redis_fixture_sets_prefix_and_url_in_settings(tenantdb_redis: TestRedis) -> None:
    from tenantdb.settings import get_settings

    assert get_settings().redis_key_prefix == tenantdb_redis.prefix
    assert get_settings().redis_url == tenantdb_redis.url
    assert tenantdb_redis.client.ping() is True
