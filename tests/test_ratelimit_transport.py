"""The lean EVALSHA path under the checks: idle connections kept, replies never crossed.

``tenantdb.ratelimit_transport`` keeps connections of its own beside the client's pool;
these tests hold it to what the pool guarantees: a connection the server closed is
replaced, a reply never reaches the wrong caller (threads, a timeout, an error reply, a
cancelled task, a forked child), and the loop's connections close with its clients.
Every check is compared with the bucket's true state, read afresh.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid

import pytest
import redis
from limits.storage import storage_from_string
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis_cluster import RedisServer

from tenantdb import ratelimit
from tenantdb.pytest_plugin import TestRedis
from tenantdb.ratelimit import (
    BucketSpec,
    TokenBucketRateLimiter,
    acheck_rate_limit,
    aclose_rate_limits,
    check_rate_limit,
)
from tenantdb.ratelimit_strategy import (
    SCRIPT,
    SCRIPT_SHA,
    TOKEN_BUCKET,
    reply_fields,
    script_args,
)
from tenantdb.ratelimit_transport import ScriptCaller
from tenantdb.settings import get_settings

ORG = str(uuid.uuid4())
# A day to refill: no token comes back while a test runs.
WIDE = BucketSpec("wide", limit=10_000, period_s=86_400)
TIMEOUT_S = 0.2




def _true_remaining(user_id: str, spec: BucketSpec = WIDE) -> int:
    """The bucket's tokens now, read by a limiter of its own (fresh connections)."""
    settings = get_settings()
    storage = storage_from_string(settings.redis_url, key_prefix=settings.redis_key_prefix)
    limiter = TokenBucketRateLimiter(storage)
    return limiter.get_window_stats(spec.item(), f"{{{ORG}:{user_id}}}", spec.name).remaining


def _server_clients(client: redis.Redis) -> int:
    return len(client.client_list())  # type: ignore[arg-type]


# THREADS AND SERVER-SIDE CLOSES


@pytest.mark.usefixtures("tenantdb_redis")
def test_threads_each_get_their_own_reply() -> None:
    threads, calls = 12, 40
    barrier = threading.Barrier(threads)
    seen: dict[str, list[int | None]] = {}

    def work(user_id: str) -> None:
        barrier.wait()
        seen[user_id] = [check_rate_limit(user_id, WIDE, org_id=ORG).remaining
                         for _ in range(calls)]

    users = [str(uuid.uuid4()) for _ in range(threads)]
    workers = [threading.Thread(target=work, args=(u,)) for u in users]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    # A thread reading a reply meant for another would see that user's bucket: each
    # thread's sequence counts down its own bucket, one token a call.
    countdown = list(range(WIDE.limit - 1, WIDE.limit - 1 - calls, -1))
    assert seen == dict.fromkeys(users, countdown)
    assert [_true_remaining(u) for u in users] == [WIDE.limit - calls] * threads


def test_connections_closed_by_the_server_are_replaced(
    tenantdb_redis: TestRedis, user: str
) -> None:
    first = check_rate_limit(user, WIDE, org_id=ORG)
    # Every other client's connection, the idle one kept for checks included.
    tenantdb_redis.client.client_kill_filter(_type="normal", skipme=True)
    after = check_rate_limit(user, WIDE, org_id=ORG)
    assert (after.degraded, after.remaining) == (False, first.remaining - 1)  # type: ignore[operator]


def test_an_error_reply_leaves_the_connection_in_step(tenantdb_redis: TestRedis) -> None:
    client = redis.Redis.from_url(tenantdb_redis.url.replace("redis+unix://", "unix://"),
                                  retry=Retry(NoBackoff(), 0))
    call = ScriptCaller(client, SCRIPT, SCRIPT_SHA)
    args = script_args(5, 60, 1, True)
    wrong = f"{tenantdb_redis.prefix}:a-list"
    client.rpush(wrong, "x")  # the script's GET fails on it: WRONGTYPE
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        call(wrong, args)
    key = f"{tenantdb_redis.prefix}:bucket"
    assert [reply_fields(call(key, args))[:2] for _ in range(3)] == [(1, 4), (1, 3), (1, 2)]
    client.close()


@pytest.mark.parametrize("retries", [0, 2])
def test_lean_and_client_paths_reply_alike_and_reload_the_script(
    tenantdb_redis: TestRedis, retries: int
) -> None:
    # Retries switched on send through the client's own path (it must retry).
    client = redis.Redis.from_url(tenantdb_redis.url.replace("redis+unix://", "unix://"),
                                  retry=Retry(NoBackoff(), retries))
    call = ScriptCaller(client, SCRIPT, SCRIPT_SHA)
    key = f"{tenantdb_redis.prefix}:bucket-{retries}"
    args = script_args(5, 60, 1, True)
    replies = [reply_fields(call(key, args))[:2] for _ in range(2)]
    client.script_flush()
    replies.append(reply_fields(call(key, args))[:2])
    assert replies == [(1, 4), (1, 3), (1, 2)]
    client.close()


def test_an_outage_reuses_one_connection_rather_than_making_one_per_check(
    dedicated_redis: RedisServer, user: str
) -> None:
    check_rate_limit(user, WIDE, org_id=ORG)
    limiter = ratelimit._sync_backend(get_settings())._limiter(TOKEN_BUCKET)
    made = limiter._client.connection_pool._created_connections
    dedicated_redis.stop()
    assert all(check_rate_limit(user, WIDE, org_id=ORG).degraded for _ in range(20))
    # The pool makes connections it never gets back: one per failed check would pile up
    # through a long outage (a BlockingConnectionPool keeps a list of all it made).
    assert limiter._client.connection_pool._created_connections == made
    dedicated_redis.start()
    assert check_rate_limit(user, WIDE, org_id=ORG).remaining == WIDE.limit - 1


# A REPLY IN FLIGHT IS NEVER READ BY THE NEXT CALLER


def test_a_timed_out_reply_is_not_read_by_the_next_check(
    dedicated_redis: RedisServer, user: str
) -> None:
    check_rate_limit(user, WIDE, org_id=ORG)
    dedicated_redis.pause()
    try:
        assert check_rate_limit(user, WIDE, org_id=ORG).degraded
    finally:
        dedicated_redis.resume()
    time.sleep(0.1)  # the command sent before the timeout runs now; its reply is orphaned
    after = check_rate_limit(user, WIDE, org_id=ORG)
    assert not after.degraded
    assert after.remaining == _true_remaining(user)


def test_a_cancelled_async_check_leaves_no_reply_behind(
    dedicated_redis: RedisServer, user: str
) -> None:
    async def work() -> tuple[int | None, int | None]:
        try:
            await acheck_rate_limit(user, WIDE, org_id=ORG)
            dedicated_redis.pause()
            try:
                task = asyncio.create_task(acheck_rate_limit(user, WIDE, org_id=ORG))
                await asyncio.sleep(0.05)  # sent; waiting for the reply
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            finally:
                dedicated_redis.resume()
            await asyncio.sleep(0.1)  # the cancelled command runs now
            after = await acheck_rate_limit(user, WIDE, org_id=ORG)
            return after.remaining, await asyncio.to_thread(_true_remaining, user)
        finally:
            await aclose_rate_limits()

    reported, truth = asyncio.run(work())
    assert reported == truth


@pytest.mark.usefixtures("tenantdb_redis")
def test_a_forked_child_uses_connections_of_its_own(user: str) -> None:
    calls, other = 200, str(uuid.uuid4())
    check_rate_limit(user, WIDE, org_id=ORG)  # the parent now keeps an idle connection
    read_end, write_end = os.pipe()
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: another user's bucket, checked while the parent checks
        status = 1
        try:
            os.write(ready_write, b"!")
            seen = [check_rate_limit(other, WIDE, org_id=ORG).remaining for _ in range(calls)]
            os.write(write_end, json.dumps(seen).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    os.read(ready_read, 1)  # both start together
    mine = [check_rate_limit(user, WIDE, org_id=ORG).remaining for _ in range(calls)]
    with os.fdopen(read_end) as pipe:
        theirs = json.loads(pipe.read() or "null")
    _, status = os.waitpid(pid, 0)
    os.close(ready_read)
    os.close(ready_write)
    assert status == 0 and theirs is not None
    # On a shared socket a process would read replies about the other's bucket: each
    # sequence counts down its own bucket, one token a call.
    assert mine == list(range(WIDE.limit - 2, WIDE.limit - 2 - calls, -1))
    assert theirs == list(range(WIDE.limit - 1, WIDE.limit - 1 - calls, -1))


# CLOSING


def test_closing_the_loops_clients_closes_the_checks_connections(
    tenantdb_redis: TestRedis, user: str
) -> None:
    before = _server_clients(tenantdb_redis.client)

    async def work() -> None:
        try:
            users = [str(uuid.uuid4()) for _ in range(8)]
            await asyncio.gather(*(acheck_rate_limit(u, WIDE, org_id=ORG) for u in users))
            assert _server_clients(tenantdb_redis.client) > before
        finally:
            await aclose_rate_limits()

    asyncio.run(work())
    assert _settle(tenantdb_redis.client, before) == before


def _settle(client: redis.Redis, count: int) -> int:
    """The server's client count once it is ``count``, or after 2 s."""
    deadline = time.monotonic() + 2
    while _server_clients(client) != count and time.monotonic() < deadline:
        time.sleep(0.02)
    return _server_clients(client)


def test_a_check_after_closing_on_the_same_loop_gets_clients_closed_again(
    tenantdb_redis: TestRedis, user: str
) -> None:
    before = _server_clients(tenantdb_redis.client)

    async def work() -> list[int | None]:
        first = await acheck_rate_limit(user, WIDE, org_id=ORG)
        await aclose_rate_limits()
        try:
            again = await acheck_rate_limit(user, WIDE, org_id=ORG)
        finally:
            await aclose_rate_limits()  # closes what the second check opened, too
        assert not again.degraded
        return [first.remaining, again.remaining]

    assert asyncio.run(work()) == [WIDE.limit - 1, WIDE.limit - 2]
    assert _settle(tenantdb_redis.client, before) == before
