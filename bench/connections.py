"""What borrowing a pooled connection per statement costs, against a thread-held connection.

tenantdb gives a connection back to the pool after every statement outside a transaction,
so threads never need ``close()``. This measures that borrow against the older model (one
connection held by the thread, ``database.connect()`` once), on the same statements: a
scoped get-by-id through the ORM, and a bare ``SELECT 1`` (where the borrow weighs most).
Rounds interleave the two in random order; the figure is the median of per-round ratios.

    python bench/connections.py [--rounds 15] [--ops 300] [--quick]

Uses TENANTDB_OWNER_DATABASE_URL's (or TENANTDB_DATABASE_URL's) server if set (a scratch
database is created and dropped), else an embedded server in a temporary folder.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

from _scratch import scratch_database
from tenancy_overhead import load

from tenantdb import db, migrate
from tenantdb.models import Destination


def per_round_ratios(ops: Callable[[], None], rounds: int, per_round: int
                     ) -> tuple[float, float, float]:
    """(borrowed us/op, held us/op, median of per-round borrowed/held ratios)."""
    database = db.database
    borrowed: list[float] = []
    held: list[float] = []
    rng = random.Random(11)
    for _ in range(rounds):
        for mode in rng.sample(["borrowed", "held"], 2):
            if mode == "held":
                database.connect()  # the thread keeps this connection for the round
            start = time.perf_counter()
            for _ in range(per_round):
                ops()
            elapsed = (time.perf_counter() - start) / per_round * 1e6
            if mode == "held":
                database.close()
                held.append(elapsed)
            else:
                borrowed.append(elapsed)
    ratios = [b / h for b, h in zip(borrowed, held, strict=True)]
    return statistics.median(borrowed), statistics.median(held), statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--ops", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="5 rounds of 100 operations")
    args = parser.parse_args()
    rounds, ops = (5, 100) if args.quick else (args.rounds, args.ops)
    with scratch_database() as url:
        migrate.migrate(url)
        keys = load(url, 1000, 10)  # 10 orgs of 100 destinations
        db.connect(db.with_login(url, db.APP_ROLE), admin_url=url)
        rng = random.Random(3)

        def get_by_id() -> None:
            org, key = rng.choice(keys)
            Destination.get_by_id(key, org_id=org)

        def select_one() -> None:
            db.database.execute_sql("SELECT 1").fetchone()

        per_round_ratios(get_by_id, 2, 50)  # warm caches and connections
        print(f"median of {rounds} rounds x {ops} statements (microseconds per statement)")
        for label, op in (("get by id", get_by_id), ("SELECT 1", select_one)):
            borrowed, held, ratio = per_round_ratios(op, rounds, ops)
            print(f"{label:<10} borrowed {borrowed:7.1f}  thread-held {held:7.1f}   "
                  f"borrowed/held {ratio:.3f}x  (+{borrowed - held:.1f} us)")


if __name__ == "__main__":
    main()
