"""acheck_rate_limit / areset_rate_limit: the same checks, awaited, never blocking the loop."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from redis_cluster import RedisServer, command_calls, free_port, redis_sentinel

from tenantdb.errors import ConfigurationError, MissingOrgError
from tenantdb.pytest_plugin import TestRedis
from tenantdb.ratelimit import (
    BucketSpec,
    RateLimitReason,
    RateLimitResult,
    acheck_rate_limit,
    aclose_rate_limits,
    areset_rate_limit,
    check_rate_limit,
)
from tenantdb.settings import override_settings

ORG = str(uuid.uuid4())
TIMEOUT_S = 0.3
SLACK_S = 0.1
T = TypeVar("T")


def run(work: Callable[[], Awaitable[T]]) -> T:
    """Run ``work`` on a fresh event loop, closing the loop's rate-limit clients after."""

    async def main() -> T:
        try:
            return await work()
        finally:
            await aclose_rate_limits()

    return asyncio.run(main())


async def burst(user: str, bucket: str | BucketSpec, count: int) -> list[RateLimitResult]:
    return [await acheck_rate_limit(user, bucket, org_id=ORG) for _ in range(count)]



# SEMANTICS: the sync path's, through the async client


@pytest.mark.usefixtures("tenantdb_redis")
def test_async_burst_counts_down_then_denies(user: str) -> None:
    results = run(lambda: burst(user, "agent", 6))
    assert [r.remaining for r in results] == [4, 3, 2, 1, 0, 0]
    assert [r.reason for r in results] == [RateLimitReason.WITHIN_LIMIT] * 5 + [
        RateLimitReason.OVER_LIMIT]
    assert results[5].retry_after_seconds is not None
    assert 0 < results[5].retry_after_seconds <= 12


@pytest.mark.usefixtures("tenantdb_redis")
def test_async_and_sync_checks_share_one_bucket(user: str) -> None:
    check_rate_limit(user, "agent", org_id=ORG)
    result = run(lambda: acheck_rate_limit(uuid.UUID(user), "agent", org_id=uuid.UUID(ORG)))
    assert result.remaining == 3
    assert check_rate_limit(user, "agent", org_id=ORG).remaining == 2


@pytest.mark.usefixtures("tenantdb_redis")
def test_async_twin_orgs_and_items_are_independent(user: str) -> None:
    async def work() -> list[int | None]:
        await burst(user, "agent", 5)
        twin = await acheck_rate_limit(user, "agent", org_id=str(uuid.uuid4()))
        other_item = await acheck_rate_limit(user, "agent", limit_per_minute=10, org_id=ORG)
        same = await acheck_rate_limit(user, "agent", org_id=ORG)
        return [twin.remaining, other_item.remaining, same.remaining]

    assert run(work) == [4, 9, 0]


@pytest.mark.usefixtures("tenantdb_redis")
def test_async_reset_refills(user: str) -> None:
    async def work() -> tuple[bool, int | None]:
        await burst(user, "agent", 5)
        reset = await areset_rate_limit(user, "agent", org_id=ORG)
        return reset, (await acheck_rate_limit(user, "agent", org_id=ORG)).remaining

    assert run(work) == (True, 4)


@pytest.mark.usefixtures("tenantdb_redis")
def test_async_moving_window_uses_limits_async_strategy(user: str) -> None:
    spec = BucketSpec("window", limit=2, strategy="moving-window")
    results = run(lambda: burst(user, spec, 3))
    assert [r.allowed for r in results] == [True, True, False]
    assert results[2].retry_after_seconds is not None


def test_async_check_sends_exactly_one_redis_command(tenantdb_redis: TestRedis, user: str) -> None:
    async def work() -> dict[str, int]:
        await acheck_rate_limit(user, "crud", org_id=ORG)  # connect, load the script
        before = command_calls(tenantdb_redis.client)
        for _ in range(10):
            await acheck_rate_limit(user, "crud", org_id=ORG)
        after = command_calls(tenantdb_redis.client)
        return {name: n - before.get(name, 0) for name, n in after.items()}

    delta = {name: n for name, n in run(work).items() if n}
    script = {"cmdstat_time": 10, "cmdstat_get": 10, "cmdstat_set": 10}
    assert delta == {"cmdstat_evalsha": 10, **script}


def test_async_script_reloads_after_script_flush(tenantdb_redis: TestRedis, user: str) -> None:
    async def work() -> RateLimitResult:
        await acheck_rate_limit(user, "agent", org_id=ORG)
        tenantdb_redis.client.script_flush()
        return await acheck_rate_limit(user, "agent", org_id=ORG)

    result = run(work)
    assert (result.allowed, result.remaining, result.degraded) == (True, 3, False)


# CONCURRENCY


@pytest.fixture
def patient_redis(tenantdb_redis: TestRedis) -> Iterator[TestRedis]:
    """The test Redis with a timeout long enough that a cold pool opening a connection per
    gathered check on a loaded machine is never taken for an outage."""
    with override_settings(redis_socket_timeout_s=10.0):
        yield tenantdb_redis


@pytest.mark.usefixtures("patient_redis")
def test_gathered_checks_allow_exactly_the_burst(user: str) -> None:
    async def work() -> list[RateLimitResult]:
        checks = (acheck_rate_limit(user, "agent", org_id=ORG) for _ in range(50))
        return list(await asyncio.gather(*checks))

    results = run(work)
    assert not any(r.degraded for r in results)
    assert sum(r.allowed for r in results) == 5
    assert sorted(r.remaining or 0 for r in results if r.allowed) == [0, 1, 2, 3, 4]


@pytest.mark.usefixtures("patient_redis")
def test_gathered_checks_of_many_users_each_get_their_burst() -> None:
    users = [str(uuid.uuid4()) for _ in range(10)]

    async def work() -> list[RateLimitResult]:
        checks = (acheck_rate_limit(u, "agent", org_id=ORG) for u in users for _ in range(7))
        return list(await asyncio.gather(*checks))

    results = run(work)
    assert not any(r.degraded for r in results)
    assert sum(r.allowed for r in results) == 5 * len(users)


# ARGUMENTS: refused before any Redis call


@pytest.mark.parametrize("user_id", [None, b"u", 7, "not-a-uuid"])
def test_async_bad_user_id_is_refused_before_redis(
    tenantdb_redis: TestRedis, user_id: object
) -> None:
    before = command_calls(tenantdb_redis.client)
    with pytest.raises(ValueError, match="user_id must be a UUID"):
        run(lambda: acheck_rate_limit(user_id, "agent", org_id=ORG))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="user_id must be a UUID"):
        run(lambda: areset_rate_limit(user_id, "agent", org_id=ORG))  # type: ignore[arg-type]
    assert command_calls(tenantdb_redis.client) == before


@pytest.mark.parametrize("org_id", [None, "", b"o", "org"])
def test_async_missing_org_is_refused(user: str, org_id: object) -> None:
    with override_settings(redis_url=None), pytest.raises(MissingOrgError, match="acheck"):
        run(lambda: acheck_rate_limit(user, "agent", org_id=org_id))  # type: ignore[arg-type]


def test_async_missing_redis_url_raises_configuration_error(user: str) -> None:
    with override_settings(redis_url=None), pytest.raises(ConfigurationError, match="REDIS_URL"):
        run(lambda: acheck_rate_limit(user, "agent", org_id=ORG))


# FAILURE MODES: the loop keeps running while a check waits



async def _check_while_ticking(user: str, bucket: str) -> tuple[RateLimitResult, float, int]:
    """One check, timed, with a task ticking every 10 ms beside it; the ticks it got."""
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0)
    started = time.monotonic()
    try:
        result = await acheck_rate_limit(user, bucket, org_id=ORG)
    finally:
        elapsed = time.monotonic() - started
        ticker.cancel()
    return result, elapsed, ticks


def test_hung_redis_does_not_block_the_loop(dedicated_redis: RedisServer, user: str) -> None:
    async def work() -> list[tuple[RateLimitResult, float, int]]:
        assert not (await acheck_rate_limit(user, "agent", org_id=ORG)).degraded
        dedicated_redis.pause()
        try:
            return [await _check_while_ticking(user, b) for b in ("agent", "crud")]
        finally:
            dedicated_redis.resume()

    (agent, agent_s, agent_ticks), (crud, crud_s, crud_ticks) = run(work)
    assert (agent.allowed, agent.reason) == (False, RateLimitReason.REDIS_UNAVAILABLE)
    assert (crud.allowed, crud.reason) == (True, RateLimitReason.REDIS_UNAVAILABLE)
    for elapsed, ticks in ((agent_s, agent_ticks), (crud_s, crud_ticks)):
        # The check waited its whole timeout, and the other task kept ticking meanwhile.
        assert TIMEOUT_S - 0.05 <= elapsed <= TIMEOUT_S + SLACK_S
        assert ticks >= 10
    recovered = run(lambda: acheck_rate_limit(user, "crud", org_id=ORG))
    assert (recovered.allowed, recovered.degraded) == (True, False)


def test_killed_redis_fails_in_bucket_mode_then_recovers(
    dedicated_redis: RedisServer, user: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def outage() -> list[RateLimitResult]:
        dedicated_redis.stop()
        return [await acheck_rate_limit(user, b, org_id=ORG) for b in ("agent", "crud")]

    assert not run(lambda: acheck_rate_limit(user, "agent", org_id=ORG)).degraded
    with caplog.at_level(logging.DEBUG, logger="tenantdb.ratelimit"):
        agent, crud = run(outage)
        reset = run(lambda: areset_rate_limit(user, "agent", org_id=ORG))
    assert (agent.allowed, agent.remaining, agent.retry_after_seconds) == (False, None, None)
    assert (crud.allowed, crud.remaining, crud.reset_after_seconds) == (True, None, None)
    assert agent.degraded and crud.degraded
    assert reset is False
    assert not any(r.exc_info for r in caplog.records)
    dedicated_redis.start()
    recovered = run(lambda: acheck_rate_limit(user, "agent", org_id=ORG))
    assert (recovered.allowed, recovered.remaining, recovered.degraded) == (True, 4, False)


def test_unreachable_cluster_fails_in_bucket_mode(user: str) -> None:
    url = f"redis+cluster://127.0.0.1:{free_port()}"
    with override_settings(redis_url=url, redis_socket_timeout_s=TIMEOUT_S):
        started = time.monotonic()
        result = run(lambda: acheck_rate_limit(user, "agent", org_id=ORG))
        elapsed = time.monotonic() - started
    assert (result.allowed, result.degraded) == (False, True)
    assert elapsed <= TIMEOUT_S + SLACK_S


def test_sentinel_async_burst_then_denies(tmp_path: Path, user: str) -> None:
    with redis_sentinel(tmp_path) as (_master, url), override_settings(redis_url=url):
        results = run(lambda: burst(user, "agent", 6))
    assert [r.allowed for r in results] == [True] * 5 + [False]
    assert not any(r.degraded for r in results)
