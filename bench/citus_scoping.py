"""What a scoped statement costs on plain PostgreSQL and on Citus, in one run.

The same operation on both engines: one org's destination by id (``get_by_id``), through
tenantdb as the application role, alone (autocommit) and inside a transaction. Round trips
are counted client side (every ``cursor.execute``); latency is the mean per statement.
The rounds interleave the engines so that machine noise hits them alike; the figures are
the medians over rounds, ratios the median of the per-round ratios.

    python bench/citus_scoping.py [--rounds 7] [--ops 200] [--rows 2000]

Plain PostgreSQL: TENANTDB_DATABASE_URL's server if set, else an embedded one. Citus: a
coordinator and two workers started here (tenantdb.citus_dev; needs a PostgreSQL with
Citus, see the README), stopped at the end.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg2.extensions
from _scratch import scratch_database

from tenantdb import citus, citus_dev, db, migrate
from tenantdb.models import Destination
from tenantdb.settings import get_settings

COUNTS = {"executes": 0}


class CountingCursor(psycopg2.extensions.cursor):
    """Counts every statement string sent: one round trip each."""

    def execute(self, query: Any, vars: Any = None) -> Any:
        COUNTS["executes"] += 1
        return super().execute(query, vars)


@contextmanager
def citus_database() -> Iterator[str]:
    home = Path(tempfile.mkdtemp(prefix="tdb-citus-bench-"))
    try:
        cluster = citus_dev.start(home)
        name = f"tenantdb_bench_{uuid.uuid4().hex[:8]}"
        server = cluster.url(database="postgres")
        citus.create_database(server, name)
        yield cluster.url(database=name)
    finally:
        db.close()
        citus_dev.stop(home)
        shutil.rmtree(home, ignore_errors=True)


def load(url: str, rows: int, orgs: int) -> list[tuple[uuid.UUID, uuid.UUID]]:
    migrate.migrate(url)
    conn = psycopg2.connect(url)
    pairs = []
    with conn, conn.cursor() as cur:
        org_ids = [uuid.uuid4() for _ in range(orgs)]
        for org in org_ids:
            cur.execute("INSERT INTO org (id, name, slug) VALUES (%s, 'o', %s)",
                        (str(org), f"o-{org.hex[:12]}"))
        for i in range(rows):
            org, row = org_ids[i % orgs], uuid.uuid4()
            cur.execute("INSERT INTO destination (org_id, id, name) VALUES (%s, %s, %s)",
                        (str(org), str(row), f"d{i}"))
            pairs.append((org, row))
    conn.close()
    return pairs


def bind(url: str) -> None:
    db.close()
    # connect() re-initialises the database, and Peewee's init() merges the new URL's
    # parameters into the old ones: a URL without a port would keep the other engine's.
    db.database.connect_params.clear()
    db.connect(url)
    # The pool's connections count their statements (peewee passes this to psycopg2).
    db.database.connect_params["cursor_factory"] = CountingCursor


def measure(op: Callable[[], None], ops: int) -> tuple[float, float]:
    """Mean microseconds and round trips per call of ``op``."""
    op()  # a pooled connection and the engine detection, outside the timing
    COUNTS["executes"] = 0
    start = time.perf_counter()
    for _ in range(ops):
        op()
    elapsed = time.perf_counter() - start
    return elapsed / ops * 1e6, COUNTS["executes"] / ops


def operations(pairs: list[tuple[uuid.UUID, uuid.UUID]]) -> dict[str, Callable[[], None]]:
    def alone() -> None:
        org, row = random.choice(pairs)
        Destination.get_by_id(row, org_id=org)

    def in_transaction() -> None:
        org, row = random.choice(pairs)
        with db.database.atomic():
            Destination.get_by_id(row, org_id=org)
            Destination.get_by_id(row, org_id=org)

    return {"scoped select (autocommit)": alone,
            "2 scoped selects in a transaction": in_transaction}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--ops", type=int, default=200)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--orgs", type=int, default=50)
    args = parser.parse_args()
    if citus_dev.find_pg_bin(get_settings().pg_bin) is None:  # `make bench` runs every script
        print(f"skipped: {citus_dev.NO_CITUS}")
        return
    with scratch_database() as pg_url, citus_database() as citus_url:
        data = {"postgres": load(pg_url, args.rows, args.orgs),
                "citus": load(citus_url, args.rows, args.orgs)}
        urls = {"postgres": pg_url, "citus": citus_url}
        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for _ in range(args.rounds):
            for engine in ("postgres", "citus"):
                bind(urls[engine])
                for name, op in operations(data[engine]).items():
                    results.setdefault((engine, name), []).append(measure(op, args.ops))
            db.close()
        print(f"{'operation':<36} {'engine':<9} {'us/op':>8} {'round trips':>12}")
        names = list(operations(data["postgres"]))
        for name in names:
            for engine in ("postgres", "citus"):
                runs = results[(engine, name)]
                print(f"{name:<36} {engine:<9} {statistics.median(r[0] for r in runs):>8.0f} "
                      f"{statistics.median(r[1] for r in runs):>12.1f}")
            ratios = [c[0] / p[0] for p, c in zip(results[("postgres", name)],
                                                  results[("citus", name)], strict=True)]
            print(f"{'':<36} {'citus/pg':<9} {statistics.median(ratios):>8.2f}x")


if __name__ == "__main__":
    main()
