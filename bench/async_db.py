"""Benchmark: the two async database paths for ``async def`` endpoints, side by side.

Usage: ``python bench/async_db.py [--rounds 5] [--ops 1000] [--concurrency 50]``.

Each round runs ``--ops`` lookups of one destination by id in its org, from
``--concurrency`` asyncio tasks over a pool of 10 connections, once per option
(interleaved, order alternating):

- ``thread``: tenantdb's path, ``await run_db(Destination.get, ..., org_id=org)``: a worker
  thread (anyio) running the synchronous, verified, row-level-secured statement;
- ``pwasyncio``: Peewee 4's ``playhouse.pwasyncio`` on asyncpg, the same query as a plain
  (unverified) Peewee model, as the table owner: no org setting, no role, no RLS;
- ``pwasyncio+rls``: what pwasyncio needs to carry the walls: asyncpg prepares one
  statement at a time, so the org and role ``set_config`` cannot ride in front of the
  query in one round trip as tenantdb does; they need their own statement inside an
  explicit transaction (BEGIN, set_config, SELECT, COMMIT).

Prints operations per second and p50 / p95 latency per option (medians over rounds), and
the per-round ratio to ``thread`` (median).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import peewee
from _scratch import scratch_database
from playhouse.db_url import parse as parse_db_url
from playhouse.pwasyncio import AsyncPostgresqlDatabase

from tenantdb import db, migrate
from tenantdb.fastapi import run_db
from tenantdb.models import Destination
from tenantdb.orgs import create_org
from tenantdb.settings import override_settings

ROWS = 200
SCOPE_SQL = "SELECT set_config('role', %s, true), set_config('tenantdb.org_id', %s, true)"


class PlainDestination(peewee.Model):
    id = peewee.UUIDField()
    org_id = peewee.UUIDField()
    name = peewee.TextField()

    class Meta:
        table_name = "destination"
        primary_key = peewee.CompositeKey("org_id", "id")


def seed() -> tuple[uuid.UUID, list[uuid.UUID]]:
    org = create_org("bench", f"bench-{uuid.uuid4().hex[:8]}").id
    ids = [Destination.create(org_id=org, name=f"d{n}").id for n in range(ROWS)]
    return org, ids


async def drive(op: Callable[[uuid.UUID], Awaitable[Any]], ids: list[uuid.UUID], ops: int,
                concurrency: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    queue = [random.choice(ids) for _ in range(ops)]

    async def worker() -> None:
        while queue:
            ident = queue.pop()
            started = time.perf_counter()
            await op(ident)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ops / (time.perf_counter() - started), latencies


async def run(url: str, rounds: int, ops: int, concurrency: int) -> None:
    org, ids = seed()
    kwargs = parse_db_url(url)
    name = kwargs.pop("database")
    adb = AsyncPostgresqlDatabase(name, pool_size=10, **kwargs)
    PlainDestination.bind(adb)

    async def thread(ident: uuid.UUID) -> Any:
        return await run_db(Destination.get, Destination.id == ident, org_id=org)

    async def pwasyncio(ident: uuid.UUID) -> Any:
        return await adb.get(PlainDestination.select().where(
            PlainDestination.org_id == org, PlainDestination.id == ident))

    async def pwasyncio_rls(ident: uuid.UUID) -> Any:
        async with adb.atomic():
            await adb.aexecute_sql(SCOPE_SQL, (db.APP_ROLE, str(org)))
            return await adb.get(PlainDestination.select().where(
                PlainDestination.org_id == org, PlainDestination.id == ident))

    options: dict[str, Callable[[uuid.UUID], Awaitable[Any]]] = {
        "thread": thread, "pwasyncio": pwasyncio, "pwasyncio+rls": pwasyncio_rls}
    for op in options.values():  # warm pools, prepared statements, threads
        await drive(op, ids, 100, concurrency)
    results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in options}
    for n in range(rounds):
        names = list(options) if n % 2 == 0 else list(reversed(options))
        for key in names:
            rate, lat = await drive(options[key], ids, ops, concurrency)
            lat.sort()
            results[key].append((rate, lat[len(lat) // 2] * 1e3, lat[int(len(lat) * .95)] * 1e3))
    await adb.close_pool()
    report(results)


def report(results: dict[str, list[tuple[float, float, float]]]) -> None:
    base = results["thread"]
    print(f"{'option':<15} {'ops/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'x thread ops/s':>15}")
    for key, rows in results.items():
        ratio = statistics.median(r[0] / b[0] for r, b in zip(rows, base, strict=True))
        print(f"{key:<15} {statistics.median(r[0] for r in rows):>8.0f} "
              f"{statistics.median(r[1] for r in rows):>8.2f} "
              f"{statistics.median(r[2] for r in rows):>8.2f} {ratio:>15.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ops", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    with scratch_database() as url, override_settings(pool_size=10):
        migrate.migrate(url)
        db.connect(url)
        asyncio.run(run(url, args.rounds, args.ops, args.concurrency))


if __name__ == "__main__":
    main()
