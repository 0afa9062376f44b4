"""Benchmark: the example API under load, against the same routes on plain Peewee + slowapi.

Usage: ``python bench/web_load.py [--rounds 3] [--requests 400] [--concurrency 50]``.

Uses bench/_scratch.py's servers (the configured ones, else embedded ones in a temporary
folder), migrates a scratch database,
seeds one org (a user, 100 destinations), and runs two servers side by side under
uvicorn (2 workers each, pool of 10 connections per worker, loopback only):

- ``tenantdb``: ``examples/travel_api/travel_app.py`` (async routes, verified and
  RLS-bound statements on worker threads, a membership check, the ``crud`` token bucket,
  ``POST /trips`` through the idempotency store with a fresh key each);
- ``plain``: ``bench/_plain_travel_app.py`` (sync routes on plain Peewee as the owner,
  slowapi's synchronous limiter, no idempotency store).

Each round sends ``--requests`` requests (3 in 4 ``GET /destinations``, 1 in 4
``POST /trips``) from ``--concurrency`` concurrent clients to each server, interleaved,
order alternating. Prints errors (non-2xx or failed), p50 / p95 latency and requests per
second per server (medians over rounds) and the per-round throughput ratio (median).
Every request is bounded by a 30 s timeout; the servers are stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
from _scratch import scratch_database, scratch_redis

from tenantdb import db, migrate
from tenantdb.models import Destination, User
from tenantdb.orgs import create_org

ROOT = Path(__file__).resolve().parent.parent
APPS = {
    "tenantdb": (ROOT / "examples" / "travel_api", "travel_app:app"),
    "plain": (ROOT / "bench", "_plain_travel_app:app"),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def servers() -> Iterator[tuple[str, str, str]]:
    """A migrated scratch database and a Redis: (owner URL, application URL, Redis URL)."""
    with scratch_database() as owner, scratch_redis() as redis_url:
        migrate.migrate(owner)
        yield owner, db.with_login(owner, db.APP_ROLE), redis_url


def seed(url: str, app_url: str) -> dict[str, str]:
    db.connect(app_url, admin_url=url)
    org = create_org("Load", f"load-{uuid.uuid4().hex[:8]}").id
    user = User.create(org_id=org, email="load@example.com").id
    for n in range(100):
        Destination.create(org_id=org, name=f"Destination {n}")
    db.close()
    return {"X-Org-Id": str(org), "X-User-Id": str(user)}


@contextlib.contextmanager
def uvicorn(app_dir: Path, target: str, env: dict[str, str]) -> Iterator[str]:
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", target, "--app-dir", str(app_dir),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
               "--log-level", "warning", "--no-access-log"]
    process = subprocess.Popen(command, env={**os.environ, **env}, start_new_session=True)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


async def wait_ready(base: str, headers: dict[str, str]) -> None:
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient(base_url=base, timeout=5) as http:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get("/destinations", headers=headers)).status_code == 200:
                    return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{base} did not become ready in 60 s")


async def load(base: str, headers: dict[str, str], requests: int,
               concurrency: int) -> tuple[int, list[float], float]:
    """(errors, latencies, requests per second) of one round."""
    plan = ["post" if n % 4 == 3 else "get" for n in range(requests)]
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as http:
        async def client() -> None:
            nonlocal errors
            while plan:
                kind = plan.pop()
                started = time.perf_counter()
                try:
                    if kind == "get":
                        answer = await http.get("/destinations", headers=headers)
                    else:
                        answer = await http.post("/trips", json={"title": "Lisbon"}, headers={
                            **headers, "Idempotency-Key": f'"{uuid.uuid4()}"'})
                    errors += not answer.is_success
                except httpx.HTTPError:
                    errors += 1
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return errors, latencies, requests / elapsed


async def bench(bases: dict[str, str], headers: dict[str, str], args: argparse.Namespace
                ) -> dict[str, list[tuple[int, float, float, float]]]:
    for base in bases.values():
        await wait_ready(base, headers)
        await load(base, headers, 100, args.concurrency)  # warm up workers and pools
    results: dict[str, list[tuple[int, float, float, float]]] = {k: [] for k in bases}
    for n in range(args.rounds):
        order = list(bases) if n % 2 == 0 else list(reversed(bases))
        for name in order:
            errors, lat, rate = await load(bases[name], headers, args.requests, args.concurrency)
            lat.sort()
            results[name].append((errors, lat[len(lat) // 2] * 1e3,
                                  lat[int(len(lat) * 0.95)] * 1e3, rate))
    return results


def report(results: dict[str, list[tuple[int, float, float, float]]]) -> None:
    plain = results["plain"]
    print(f"{'app':<10} {'errors':>7} {'p50 ms':>8} {'p95 ms':>8} {'req/s':>7} {'x plain':>8}")
    for name, rows in results.items():
        ratio = statistics.median(r[3] / p[3] for r, p in zip(rows, plain, strict=True))
        print(f"{name:<10} {sum(r[0] for r in rows):>7} "
              f"{statistics.median(r[1] for r in rows):>8.1f} "
              f"{statistics.median(r[2] for r in rows):>8.1f} "
              f"{statistics.median(r[3] for r in rows):>7.0f} {ratio:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    with servers() as (url, app_url, redis_url):
        headers = seed(url, app_url)
        env = {"TENANTDB_DATABASE_URL": app_url, "TENANTDB_ADMIN_DATABASE_URL": url,
               "TENANTDB_REDIS_URL": redis_url,
               "TENANTDB_POOL_SIZE": "10", "TENANTDB_RATE_LIMIT_CRUD": "100000",
               "TENANTDB_REDIS_KEY_PREFIX": f"web-load-{uuid.uuid4().hex[:8]}",
               "PLAIN_DATABASE_URL": url, "PLAIN_REDIS_URL": redis_url}
        with contextlib.ExitStack() as stack:
            bases = {name: stack.enter_context(uvicorn(app_dir, target, env))
                     for name, (app_dir, target) in APPS.items()}
            results = asyncio.run(bench(bases, headers, args))
        print(f"{args.requests} requests x {args.rounds} rounds, concurrency "
              f"{args.concurrency}, uvicorn 2 workers each, pool 10 per worker")
        report(results)


if __name__ == "__main__":
    main()
