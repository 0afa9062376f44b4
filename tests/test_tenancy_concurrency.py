"""Orgs stay apart under concurrency: threads and asyncio tasks over a small pool."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tenantdb import db
from tenantdb.errors import MissingOrgError
from tenantdb.models import Destination
from tenantdb.orgs import create_org
from tenantdb.pytest_plugin import TestDatabase
from tenantdb.settings import override_settings
from tenantdb.tenancy import cross_org, cross_org_reason, execute_scoped

ROUNDS = 25


@pytest.fixture
def small_pool(tenantdb_committed: db.TenantDatabase,
               tenantdb_database: TestDatabase) -> Iterator[list[uuid.UUID]]:
    """Four orgs with 3 rows each (same names everywhere), served by a pool of 3."""
    orgs = []
    for n in range(4):
        org = create_org(f"Org {n}", f"c{n}-{uuid.uuid4().hex[:8]}").id
        Destination.insert_many([{"name": f"d{i}"} for i in range(3)], org_id=org).execute()
        orgs.append(org)
    db.close()
    with override_settings(pool_size=3, pool_timeout_s=30):
        db.connect(tenantdb_database.app_url)
    try:
        yield orgs
    finally:
        db.connect(tenantdb_database.app_url)


def observe(org: uuid.UUID) -> set[uuid.UUID]:
    """Every org this caller can see through the ORM and through forgetful raw SQL."""
    try:
        seen = {d.org_id for d in Destination.select(org_id=org)}
        raw = execute_scoped(org, "SELECT org_id FROM destination").fetchall()
        return seen | {uuid.UUID(str(o)) for (o,) in raw}
    finally:
        db.database.close()


def test_threads_alternating_orgs_never_see_another_org(small_pool: list[uuid.UUID]) -> None:
    leaks: list[tuple[uuid.UUID, set[uuid.UUID]]] = []

    def worker(index: int) -> None:
        for turn in range(ROUNDS):
            org = small_pool[(index + turn) % len(small_pool)]
            seen = observe(org)
            if seen != {org}:
                leaks.append((org, seen))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert leaks == []


def test_asyncio_tasks_alternating_orgs_never_see_another_org(
    small_pool: list[uuid.UUID],
) -> None:
    async def task(index: int) -> set[uuid.UUID]:
        org = small_pool[index % len(small_pool)]
        seen = await asyncio.to_thread(observe, org)
        return seen - {org}

    async def main() -> list[set[uuid.UUID]]:
        return await asyncio.gather(*(task(i) for i in range(100)))

    assert all(not extra for extra in asyncio.run(main()))


def test_checkouts_carry_no_org_under_a_thread_pool(small_pool: list[uuid.UUID]) -> None:
    def run(org: uuid.UUID) -> str | None:
        observe(org)
        try:
            (value,) = db.database.execute_sql(
                "SELECT current_setting('tenantdb.org_id', true)").fetchone()
            return value  # type: ignore[no-any-return]
        finally:
            db.database.close()

    with ThreadPoolExecutor(max_workers=6) as pool:
        settings = list(pool.map(run, small_pool * 10))
    assert set(settings) <= {None, ""}


def test_cross_org_does_not_leak_to_other_threads_or_tasks(small_pool: list[uuid.UUID]) -> None:
    entered, release = threading.Event(), threading.Event()
    outcome: list[object] = []

    def admin() -> None:
        with cross_org(reason="test: long admin job"):
            entered.set()
            release.wait(10)

    def tenant() -> None:
        try:
            Destination.select().count()
            outcome.append("unscoped query ran")
        except MissingOrgError as exc:
            outcome.append(exc)
        finally:
            db.database.close()

    admin_thread = threading.Thread(target=admin)
    admin_thread.start()
    entered.wait(10)
    tenant_thread = threading.Thread(target=tenant)
    tenant_thread.start()
    tenant_thread.join()
    release.set()
    admin_thread.join()
    assert len(outcome) == 1 and isinstance(outcome[0], MissingOrgError)

    async def main() -> tuple[str | None, str | None]:
        gate = asyncio.Event()

        async def inside() -> str | None:
            with cross_org(reason="test: task"):
                await gate.wait()
                return cross_org_reason()

        async def outside() -> str | None:
            await asyncio.sleep(0)
            reason = cross_org_reason()
            gate.set()
            return reason

        first, second = await asyncio.gather(inside(), outside())
        return first, second

    assert asyncio.run(main()) == ("test: task", None)
    assert cross_org_reason() is None
