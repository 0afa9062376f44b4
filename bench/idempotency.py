"""Benchmark: idempotency claims against a plain INSERT into the same table, same connection.

Usage: ``python bench/idempotency.py [--rounds 9] [--ops 400]``. Migrates a scratch
database on the configured server if set, else on an embedded one (bench/_scratch.py).
Prints, in one run:

- round trips per call, counted twice: statements peewee sends (its DEBUG log) and
  ``cursor.execute`` calls on the psycopg2 connection (each is one request/response);
- operations per second (median over rounds) and the ratio to the baseline (the median of
  the per-round ratios: every round runs each operation in turn), a plain
  ``INSERT`` of a fresh key sent through ``execute_scoped`` (the org set in the same
  round trip, as every tenant statement is).

Target: ``begin`` and ``mark_completed`` are one round trip each.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2.extensions
from _scratch import scratch_database

from tenantdb import db, migrate
from tenantdb.idempotency import (
    ClaimOutcome,
    begin,
    fingerprint,
    get_entry,
    mark_completed,
    mark_error,
)
from tenantdb.models import User
from tenantdb.orgs import create_org, delete_org
from tenantdb.scoping import execute_scoped

PLAIN_INSERT_SQL = """
INSERT INTO idempotency_key (org_id, user_id, key, status, body_hash, ttl_until)
VALUES (%s, %s, %s, 'pending', %s, now() + interval '1 day')
"""
BODY_HASH = fingerprint({"trip": "Lisbon", "travellers": 2}).body_hash
RESPONSE = {"itinerary_id": "6f1c", "legs": [{"from": "LIS", "to": "OPO", "day": 1}]}


class CountingCursor(psycopg2.extensions.cursor):
    """A driver cursor that counts its ``execute`` calls: one round trip each."""

    executes = 0

    def execute(self, query: Any, vars: Any = None) -> None:  # psycopg2's own parameter name
        CountingCursor.executes += 1
        super().execute(query, vars)


class PeeweeStatements(logging.Handler):
    """Counts the statements peewee logs (one per ``execute_sql``)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


@contextlib.contextmanager
def database_url() -> Iterator[str]:
    """A migrated scratch database (bench/_scratch.py), dropped afterwards."""
    with scratch_database() as url:
        migrate.migrate(url)
        yield url


@contextlib.contextmanager
def bench_owner() -> Iterator[tuple[uuid.UUID, uuid.UUID]]:
    """A fresh org and user, deleted (with their keys) afterwards."""
    org = create_org("bench", f"bench-{uuid.uuid4().hex[:12]}")
    user = User.create(org_id=org.id, email="bench@example.com")
    try:
        yield org.id, user.id
    finally:
        delete_org(org.id, reason="benchmark cleanup")


def count_round_trips(org: uuid.UUID, user: uuid.UUID) -> dict[str, tuple[int, int]]:
    """(peewee statements, driver executes) of each call, on every path of begin()."""
    peewee_log, logger = PeeweeStatements(), logging.getLogger("peewee")
    logger.addHandler(peewee_log)
    logger.setLevel(logging.DEBUG)
    db.database.connection().cursor_factory = CountingCursor
    key, failed = f"rt-{uuid.uuid4().hex}", f"rt-{uuid.uuid4().hex}"
    calls: list[tuple[str, Callable[[], object], object]] = [
        ("begin -> started", lambda: begin(key, org_id=org, user_id=user,
                                           body_hash=BODY_HASH).outcome, ClaimOutcome.STARTED),
        ("begin -> in_progress", lambda: begin(key, org_id=org, user_id=user,
                                               body_hash=BODY_HASH).outcome,
         ClaimOutcome.IN_PROGRESS),
        ("begin -> mismatch", lambda: begin(key, org_id=org, user_id=user,
                                            body_hash="other").outcome, ClaimOutcome.MISMATCH),
        ("mark_completed", lambda: mark_completed(
            key, org_id=org, user_id=user, body_hash=BODY_HASH, response_status=201,
            response_body=RESPONSE).response_body, RESPONSE),
        ("begin -> replay", lambda: begin(key, org_id=org, user_id=user,
                                          body_hash=BODY_HASH).outcome, ClaimOutcome.REPLAY),
        ("get_entry", lambda: get_entry(key, org_id=org, user_id=user) is not None, True),
        ("begin (second key) -> started", lambda: begin(failed, org_id=org, user_id=user,
                                                        body_hash=BODY_HASH).outcome,
         ClaimOutcome.STARTED),
        ("mark_error", lambda: mark_error(failed, org_id=org, user_id=user), True),
        ("begin after mark_error -> started", lambda: begin(
            failed, org_id=org, user_id=user, body_hash=BODY_HASH).outcome,
         ClaimOutcome.STARTED),
    ]
    counts: dict[str, tuple[int, int]] = {}
    try:
        for name, call, expected in calls:
            before = (peewee_log.count, CountingCursor.executes)
            result = call()
            if result != expected:
                raise RuntimeError(f"{name}: got {result!r}, expected {expected!r}")
            counts[name] = (peewee_log.count - before[0], CountingCursor.executes - before[1])
    finally:
        logger.removeHandler(peewee_log)
        db.database.connection().cursor_factory = psycopg2.extensions.cursor
    return counts


def per_op_us(fn: Callable[[int], object], ops: int) -> float:
    start = time.perf_counter()
    for i in range(ops):
        fn(i)
    return (time.perf_counter() - start) / ops * 1e6


def operations(org: uuid.UUID, user: uuid.UUID) -> dict[str, Callable[[int], object]]:
    """The operations compared; each call of the first three writes a fresh key."""
    done = f"done-{uuid.uuid4().hex}"
    begin(done, org_id=org, user_id=user, body_hash=BODY_HASH)
    mark_completed(done, org_id=org, user_id=user, body_hash=BODY_HASH, response_status=201,
                   response_body=RESPONSE)

    def fresh() -> str:
        return uuid.uuid4().hex

    def claim_and_complete(_: int) -> object:
        key = fresh()
        begin(key, org_id=org, user_id=user, body_hash=BODY_HASH)
        return mark_completed(key, org_id=org, user_id=user, body_hash=BODY_HASH,
                              response_status=201, response_body=RESPONSE)

    return {
        "plain INSERT (baseline)": lambda _: execute_scoped(
            org, PLAIN_INSERT_SQL, (org, user, fresh(), BODY_HASH)),
        "begin -> started (new key)": lambda _: begin(
            fresh(), org_id=org, user_id=user, body_hash=BODY_HASH),
        "begin + mark_completed": claim_and_complete,
        "begin -> replay": lambda _: begin(done, org_id=org, user_id=user,
                                           body_hash=BODY_HASH),
    }


def run(rounds: int, ops: int) -> tuple[dict[str, tuple[int, int]], dict[str, list[float]]]:
    samples: dict[str, list[float]] = {}
    with database_url() as url:
        db.connect(db.with_login(url, db.APP_ROLE), admin_url=url)
        try:
            with bench_owner() as (org, user):
                counts = count_round_trips(org, user)
                ops_by_name = operations(org, user)
                for _ in range(rounds):
                    for name, fn in ops_by_name.items():
                        fn(-1)  # warm
                        samples.setdefault(name, []).append(per_op_us(fn, ops))
        finally:
            db.close()
    return counts, samples


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--ops", type=int, default=400)
    args = parser.parse_args()
    counts, samples = run(args.rounds, args.ops)
    print(f"{'round trips per call':<36} {'peewee stmts':>12} {'driver executes':>15}")
    for name, (statements, executes) in counts.items():
        print(f"{name:<36} {statements:>12} {executes:>15}")
    base = "plain INSERT (baseline)"
    median = {name: statistics.median(values) for name, values in samples.items()}
    # Each round runs every operation in turn: the ratio is the median of the rounds' own
    # ratios, which machine load moves less than a ratio of medians.
    ratio = {name: statistics.median(v / b for v, b in zip(values, samples[base], strict=True))
             for name, values in samples.items()}
    print(f"\n{'operation (median of rounds)':<36} {'us/op':>8} {'ops/s':>8} {'x baseline':>10}")
    for name, us in median.items():
        print(f"{name:<36} {us:8.1f} {1e6 / us:8.0f} {ratio[name]:10.2f}")
    claim_ratio = ratio["begin -> started (new key)"]
    print(f"\nbegin() claims/s vs plain INSERT/s: {1e6 / median['begin -> started (new key)']:.0f}"
          f" vs {1e6 / median[base]:.0f} (begin costs {claim_ratio:.2f}x an INSERT)")
    ok = all(counts[name] == (1, 1) for name in ("begin -> started", "mark_completed"))
    print("round-trip target (begin, mark_completed: 1 each):", "met" if ok else "MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
