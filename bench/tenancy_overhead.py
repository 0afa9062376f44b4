"""What tenant scoping costs: tenantdb vs plain Peewee vs raw psycopg2, same data, one run.

Two operations, each as one org: get-by-id, and a page of 20 newest rows. tenantdb runs as
the application role (verifier, org and role set in the same round trip, row-level
security); plain Peewee maps the same table with no scoping; psycopg2 sends the bare SQL.
The rounds interleave the three so that machine noise hits them alike; the figure per
operation is the median of the rounds' mean times, and each ratio the median of the
per-round ratios (in brackets, the middle half of them: how much the machine moved).

    python bench/tenancy_overhead.py [--rows 100000] [--orgs 100] [--rounds 15] [--ops 300]
    python bench/tenancy_overhead.py --quick      # 10000 rows, 9 rounds x 200 operations

Uses TENANTDB_DATABASE_URL's server if set (a scratch database is created and dropped),
else an embedded server in a temporary folder.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import uuid
from collections.abc import Callable
from urllib.parse import urlsplit

import psycopg2
import psycopg2.extras
from _scratch import scratch_database
from peewee import CompositeKey, Model, TextField, UUIDField
from playhouse.postgres_ext import BinaryJSONField, DateTimeTZField, PooledPostgresqlExtDatabase

from tenantdb import db, migrate
from tenantdb.models import Destination


class PlainDestination(Model):
    """The same table, the same columns, as a plain Peewee model: no org scoping at all."""

    org_id = UUIDField()
    id = UUIDField()
    name = TextField()
    country = TextField(null=True)
    description = TextField(null=True)
    metadata = BinaryJSONField(default=dict)
    created_at = DateTimeTZField()
    updated_at = DateTimeTZField()

    class Meta:
        table_name = "destination"
        primary_key = CompositeKey("org_id", "id")


RAW_GET_SQL = ("SELECT org_id, id, name, country, description, metadata, created_at, "
               "updated_at FROM destination WHERE org_id = %s AND id = %s LIMIT 1")
RAW_PAGE_SQL = ("SELECT org_id, id, name, country, description, metadata, created_at, "
                "updated_at FROM destination WHERE org_id = %s ORDER BY created_at DESC "
                "LIMIT 20")


def load(url: str, rows: int, orgs: int) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """Insert ``rows`` destinations over ``orgs`` orgs as the owner; returns (org, id) pairs."""
    org_ids = [uuid.uuid4() for _ in range(orgs)]
    keys = [(org_ids[i % orgs], uuid.uuid4()) for i in range(rows)]
    conn = psycopg2.connect(url)
    with conn, conn.cursor() as cur:
        psycopg2.extras.execute_values(
            cur, "INSERT INTO org (id, name, slug) VALUES %s",
            [(str(o), f"Org {i}", f"org-{i}") for i, o in enumerate(org_ids)])
        psycopg2.extras.execute_values(
            cur, "INSERT INTO destination (org_id, id, name, created_at) VALUES %s",
            [(str(o), str(i), f"Destination {n}", "2026-01-01T00:00:00Z") for n, (o, i)
             in enumerate(keys)], template="(%s, %s, %s, %s::timestamptz + random() * "
             "interval '300 days')", page_size=5000)
        cur.execute("ANALYZE destination")
    conn.close()
    return keys


def measure(ops: dict[str, Callable[[tuple[uuid.UUID, uuid.UUID]], object]],
            keys: list[tuple[uuid.UUID, uuid.UUID]], rounds: int, per_round: int
            ) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Median time per operation of each, and the per-round ratios of tenantdb's time to
    each other's."""
    samples: dict[str, list[float]] = {name: [] for name in ops}
    rng = random.Random(7)
    for _ in range(rounds):
        batch = [rng.choice(keys) for _ in range(per_round)]
        for name in rng.sample(list(ops), len(ops)):
            start = time.perf_counter()
            for key in batch:
                ops[name](key)
            samples[name].append((time.perf_counter() - start) / per_round * 1e6)
    ratios = {name: [t / o for t, o in zip(samples["tenantdb"], values, strict=True)]
              for name, values in samples.items() if name != "tenantdb"}
    return {name: statistics.median(values) for name, values in samples.items()}, ratios


def _spread(ratios: list[float]) -> str:
    """The median of per-round ratios, and the middle half of them."""
    quarters = statistics.quantiles(ratios, n=4)
    return f"{statistics.median(ratios):.2f}x ({quarters[0]:.2f}-{quarters[2]:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--orgs", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--ops", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="a small, fast run")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.rounds, args.ops = 10_000, 9, 200
    with scratch_database() as url:
        migrate.migrate(url)
        keys = load(url, args.rows, args.orgs)
        # The application login, as production runs: row-level security binds it.
        db.connect(db.with_login(url, db.APP_ROLE), admin_url=url)
        plain = PooledPostgresqlExtDatabase(None)
        plain.init(urlsplit(url).path[1:], **_connect_kwargs(url))
        PlainDestination.bind(plain)
        raw = psycopg2.connect(url)
        raw.autocommit = True
        cur = raw.cursor()

        def raw_get(key: tuple[uuid.UUID, uuid.UUID]) -> object:
            cur.execute(RAW_GET_SQL, (str(key[0]), str(key[1])))
            return cur.fetchone()

        def raw_page(key: tuple[uuid.UUID, uuid.UUID]) -> object:
            cur.execute(RAW_PAGE_SQL, (str(key[0]),))
            return cur.fetchall()

        get_ops: dict[str, Callable[[tuple[uuid.UUID, uuid.UUID]], object]] = {
            "tenantdb": lambda k: Destination.get_by_id(k[1], org_id=k[0]),
            "peewee": lambda k: PlainDestination.get(
                (PlainDestination.org_id == k[0]) & (PlainDestination.id == k[1])),
            "psycopg2": raw_get,
        }
        page_ops: dict[str, Callable[[tuple[uuid.UUID, uuid.UUID]], object]] = {
            "tenantdb": lambda k: list(Destination.select(org_id=k[0])
                                       .order_by(Destination.created_at.desc()).limit(20)),
            "peewee": lambda k: list(PlainDestination.select()
                                     .where(PlainDestination.org_id == k[0])
                                     .order_by(PlainDestination.created_at.desc()).limit(20)),
            "psycopg2": raw_page,
        }
        measure(get_ops, keys, 2, 100)  # warm caches and connections
        measure(page_ops, keys, 2, 100)
        print(f"{args.rows} rows over {args.orgs} orgs; median of {args.rounds} rounds x "
              f"{args.ops} operations (microseconds per operation)")
        for label, ops in (("get by id", get_ops), ("page of 20", page_ops)):
            result, ratio = measure(ops, keys, args.rounds, args.ops)
            print(f"{label:<11} tenantdb {result['tenantdb']:7.1f}  peewee "
                  f"{result['peewee']:7.1f}  psycopg2 {result['psycopg2']:7.1f}   "
                  f"tenantdb/peewee {_spread(ratio['peewee'])}  "
                  f"tenantdb/psycopg2 {_spread(ratio['psycopg2'])}")
        raw.close()
        plain.close_all()


def _connect_kwargs(url: str) -> dict[str, object]:
    params = psycopg2.extensions.parse_dsn(url)
    params.pop("dbname")
    return dict(params)


if __name__ == "__main__":
    main()
