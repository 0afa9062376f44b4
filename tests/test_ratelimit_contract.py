"""The token bucket held to the contract of limits' own strategy tests, on every storage.

One suite, run through the named mark ``all_storages`` against a unix socket, TCP, a
sentinel and a cluster, for the sync strategy and the async one (driven to completion by
``_Blocking``): test never consumes, denied hits consume nothing, cost, independent
identifiers and items, window stats, clear, exact refill, concurrency.
"""

from __future__ import annotations

import asyncio
import inspect
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from limits import RateLimitItem, RateLimitItemPerHour, RateLimitItemPerMinute, parse
from limits.storage import storage_from_string
from redis.cluster import RedisCluster
from redis_cluster import RedisServer, free_port, redis_cluster, redis_sentinel

from tenantdb.ratelimit_strategy import (
    AsyncTokenBucketRateLimiter,
    TokenBucketRateLimiter,
    script_args,
)

STORAGE_KINDS = ["unix", "tcp", "sentinel", "cluster"]
#: The named parametrize mark of the contract: every test runs on every storage.
all_storages = pytest.mark.parametrize("storage_url", STORAGE_KINDS, indirect=True)
both_apis = pytest.mark.parametrize("api", ["sync", "async"])
CONCURRENT = 60


# STORAGES: one server (or cluster, or sentinel) per kind for the module


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """limits URLs for each storage kind, started on first use and stopped at the end."""
    stack: list[Callable[[], object]] = []
    try:
        yield _LazyUrls(stack, tmp_path_factory.mktemp("storages"))
    finally:
        for stop in reversed(stack):
            stop()


class _LazyUrls(dict[str, str]):
    """Starts a kind's servers the first time its URL is asked for."""

    def __init__(self, stack: list[Callable[[], object]], workdir: Path):
        super().__init__()
        self._stack = stack
        self._workdir = workdir

    def __missing__(self, kind: str) -> str:
        self[kind] = _start(kind, self._workdir / kind, self._stack)
        return self[kind]


def _start(kind: str, workdir: Path, stack: list[Callable[[], object]]) -> str:
    if kind in ("unix", "tcp"):
        server = RedisServer(workdir, port=free_port() if kind == "tcp" else None)
        server.start()
        stack.append(server.stop)
        return server.url
    manager: Any = redis_cluster(workdir) if kind == "cluster" else redis_sentinel(workdir)
    started = manager.__enter__()
    stack.append(lambda: manager.__exit__(None, None, None))
    if kind == "cluster":
        return f"redis+cluster://127.0.0.1:{started[0].port}"
    return str(started[1])


@pytest.fixture
def storage_url(request: pytest.FixtureRequest, servers: dict[str, str]) -> str:
    return servers[request.param]


class _Blocking:
    """An async limiter whose coroutines run to completion: one contract for both APIs."""

    def __init__(self, limiter: AsyncTokenBucketRateLimiter, loop: asyncio.AbstractEventLoop):
        self.limiter = limiter
        self.loop = loop

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.limiter, name)
        if not inspect.iscoroutinefunction(method):
            return method
        return lambda *args, **kwargs: self.loop.run_until_complete(method(*args, **kwargs))


@pytest.fixture
def limiter(storage_url: str, api: str) -> Iterator[Any]:
    """The sync or async token bucket on ``storage_url``, under a key prefix of its own."""
    prefix = f"contract-{uuid.uuid4().hex[:8]}"
    if api == "sync":
        yield TokenBucketRateLimiter(storage_from_string(storage_url, key_prefix=prefix))
        return
    loop = asyncio.new_event_loop()
    storage = storage_from_string(f"async+{storage_url}", implementation="redispy",
                                  key_prefix=prefix)
    try:
        yield _Blocking(AsyncTokenBucketRateLimiter(storage), loop)
    finally:
        loop.run_until_complete(storage.bridge.get_connection().aclose())
        loop.close()


def _sync_client(url: str) -> redis.Redis | RedisCluster:
    if url.startswith("redis+cluster://"):
        return RedisCluster.from_url(url.replace("redis+cluster://", "redis://"))
    storage: Any = storage_from_string(url)
    return storage.get_connection()  # type: ignore[no-any-return]


# THE CONTRACT


@all_storages
@both_apis
class TestTokenBucketContract:
    def test_hits_until_empty_then_denies(self, limiter: Any) -> None:
        item = parse("10/minute")
        assert all(limiter.hit(item) for _ in range(10))
        assert not limiter.hit(item)
        stats = limiter.get_window_stats(item)
        assert stats.remaining == 0
        assert stats.reset_time == pytest.approx(time.time() + 60, abs=1)

    def test_empty_stats_full_now(self, limiter: Any) -> None:
        stats = limiter.get_window_stats(parse("10/second"))
        assert stats.remaining == 10
        assert stats.reset_time == pytest.approx(time.time(), abs=0.5)

    def test_test_never_consumes(self, limiter: Any) -> None:
        item = RateLimitItemPerHour(2)
        assert limiter.hit(item)
        assert all(limiter.test(item) for _ in range(20))
        assert limiter.get_window_stats(item).remaining == 1
        assert limiter.hit(item)
        assert not limiter.test(item)
        assert not limiter.hit(item)

    def test_denied_hits_consume_nothing(self, limiter: Any) -> None:
        item = parse("5/minute")  # one token back every 12 s
        assert all(limiter.hit(item, "k") for _ in range(5))
        first = limiter.acquire(item, "k")
        assert not any(limiter.hit(item, "k") for _ in range(50))
        assert not any(limiter.hit(item, "k", cost=2) for _ in range(10))
        last = limiter.acquire(item, "k")
        # Had a refusal taken anything, the wait and the time to full would have grown.
        assert not last.allowed
        assert last.retry_after <= first.retry_after <= 12
        assert last.reset_after <= 60

    def test_multiple_cost(self, limiter: Any) -> None:
        item = RateLimitItemPerMinute(10, 2)
        assert not limiter.hit(item, "k1", cost=11)
        assert limiter.get_window_stats(item, "k1").remaining == 10
        assert limiter.hit(item, "k2", cost=5)
        assert limiter.get_window_stats(item, "k2").remaining == 5
        assert not limiter.test(item, "k2", cost=6)
        assert not limiter.hit(item, "k2", cost=6)
        assert limiter.hit(item, "k2", cost=5)
        assert limiter.get_window_stats(item, "k2").remaining == 0

    def test_cost_above_capacity_can_never_pass(self, limiter: Any) -> None:
        state = limiter.acquire(parse("3/minute"), "k", cost=4)
        assert (state.allowed, state.remaining, state.retry_after) == (False, 3, None)

    def test_identifiers_are_independent(self, limiter: Any) -> None:
        item = parse("2/minute")
        assert limiter.hit(item, "a", "x", cost=2)
        assert not limiter.hit(item, "a", "x")
        assert limiter.get_window_stats(item, "a", "y").remaining == 2
        assert limiter.get_window_stats(item, "b", "x").remaining == 2
        assert limiter.hit(item)  # no identifiers: a key of its own too

    def test_items_are_independent(self, limiter: Any) -> None:
        per_minute, per_second = parse("5/minute"), parse("10/second")
        assert all(limiter.hit(per_minute, "u") for _ in range(5))
        assert not limiter.hit(per_minute, "u")
        assert limiter.get_window_stats(per_second, "u").remaining == 10
        assert limiter.hit(per_second, "u")
        limiter.clear(per_second, "u")
        assert not limiter.hit(per_minute, "u")  # clearing one refills only that one

    def test_items_without_identifiers_do_not_share_a_key(self, limiter: Any) -> None:
        assert limiter.hit(parse("1/minute"))
        assert not limiter.hit(parse("1/minute"))
        assert limiter.hit(parse("1/hour"))
        assert limiter.hit(parse("2/minute"))

    def test_clear_refills(self, limiter: Any) -> None:
        item = parse("2/minute")
        assert limiter.hit(item, "k", cost=2)
        limiter.clear(item, "k")
        assert limiter.get_window_stats(item, "k").remaining == 2
        assert limiter.hit(item, "k")

    def test_refill_is_continuous_one_token_per_interval(self, limiter: Any) -> None:
        item = parse("4 per 2 seconds")  # one token back every 500 ms
        assert limiter.hit(item, "k", cost=4)
        denied = limiter.acquire(item, "k")
        assert denied.retry_after is not None
        assert 0 < denied.retry_after <= 0.5
        time.sleep(denied.retry_after + 0.01)
        # One token came back, not the whole bucket.
        assert limiter.hit(item, "k")
        assert not limiter.hit(item, "k")

    @pytest.mark.parametrize("rate", [3, 7, 300_001, 1_000_003])
    def test_refill_is_exact_at_any_rate(self, limiter: Any, rate: int) -> None:
        # Draining a bucket of `rate` per second owes exactly one second, whatever the rate
        # (a refill interval rounded to whole microseconds made 300,001/s 20 % slow).
        item = parse(f"{rate}/second")
        drained = limiter.acquire(item, "k", cost=rate)
        assert drained.allowed
        assert drained.reset_after == pytest.approx(1.0, abs=2e-6)
        denied = limiter.acquire(item, "k", cost=rate)
        assert denied.retry_after is not None
        assert 0 < denied.retry_after <= 1.0

    def test_key_is_limits_own(self, limiter: Any, storage_url: str) -> None:
        item = parse("4/minute")
        assert limiter.hit(item, "{tag}", "k")
        key = limiter.prefixed_key(item.key_for("{tag}", "k"))
        assert key.endswith(":LIMITER/{tag}/k/4/1/minute")
        client = _sync_client(storage_url)
        try:
            assert 0 < int(client.pttl(key)) <= 15_000  # type: ignore[arg-type]
        finally:
            client.close()


@all_storages
def test_concurrent_threads_take_exactly_the_burst(storage_url: str) -> None:
    limiter = TokenBucketRateLimiter(storage_from_string(storage_url, key_prefix="threads"))
    item = RateLimitItemPerMinute(5)
    key = uuid.uuid4().hex
    limiter.hit(item, uuid.uuid4().hex)  # connect before the race
    hits: list[bool] = []

    def hit() -> None:
        time.sleep(random.random() / 1000)
        hits.append(limiter.hit(item, key))

    threads = [threading.Thread(target=hit) for _ in range(CONCURRENT)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (len(hits), sum(hits)) == (CONCURRENT, 5)


@all_storages
def test_concurrent_tasks_take_exactly_the_burst(storage_url: str) -> None:
    async def race() -> list[bool]:
        storage = storage_from_string(f"async+{storage_url}", implementation="redispy",
                                      key_prefix="tasks")
        limiter = AsyncTokenBucketRateLimiter(storage)
        item, key = RateLimitItemPerMinute(5), uuid.uuid4().hex
        try:
            return list(await asyncio.gather(*(limiter.hit(item, key) for _ in range(CONCURRENT))))
        finally:
            await storage.bridge.get_connection().aclose()

    hits = asyncio.run(race())
    assert (len(hits), sum(hits)) == (CONCURRENT, 5)


# ARGUMENTS


def test_negative_cost_is_refused() -> None:
    with pytest.raises(ValueError, match="cost"):
        script_args(5, 60, -1, True)


def test_rate_too_fine_to_count_exactly_is_refused() -> None:
    item: RateLimitItem = parse("9999991/day")  # a prime: no common factor with the day
    with pytest.raises(ValueError, match="exactly"):
        script_args(item.amount, item.get_expiry(), 1, True)
