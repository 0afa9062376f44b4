"""The idempotency store: race-free claims, fingerprints, replay, TTL, leases, round trips."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from helpers import StatementLog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tenancy_fixtures import TwoOrgs

from tenantdb.db import TenantDatabase, database
from tenantdb.errors import MissingOrgError
from tenantdb.idempotency import (
    Claim,
    ClaimInTransactionError,
    ClaimOutcome,
    IdempotencyError,
    IdempotencyStatus,
    KeyNotClaimedError,
    UnknownUserError,
    allow_claims_in_transaction,
    begin,
    fingerprint,
    get_entry,
    idempotent,
    mark_completed,
    mark_error,
    save_result,
)
from tenantdb.models import Destination, User
from tenantdb.tenancy import execute_scoped

BODY = fingerprint({"trip": "Lisbon", "days": 3}).body_hash
OTHER_BODY = fingerprint({"trip": "Porto", "days": 3}).body_hash
BACKDATE_SQL = (
    "UPDATE idempotency_key SET {column} = tenantdb_clock() - interval '1 second' "
    "WHERE org_id = %s AND user_id = %s AND key = %s"
)
RAW_ROW_SQL = (
    "SELECT status, body_hash, response_status, response_body, ttl_until, updated_at "
    "FROM idempotency_key WHERE org_id = %s AND user_id = %s AND key = %s"
)
THREADS = 8


# HELPERS


def make_user(org_id: uuid.UUID) -> uuid.UUID:
    user = User.create(org_id=org_id, email=f"{uuid.uuid4().hex[:10]}@example.com")
    return uuid.UUID(str(user.id))


@pytest.fixture
def user_id(org_id: uuid.UUID, tenant_db: TenantDatabase) -> uuid.UUID:
    """A user of ``org_id`` inside the test transaction (where the plugin allows claims)."""
    return make_user(org_id)


@dataclass(frozen=True)
class Owner:
    org_id: uuid.UUID
    user_id: uuid.UUID


@pytest.fixture
def owner(tenantdb_committed: TenantDatabase, org_id: uuid.UUID) -> Owner:
    """A committed org and user, for tests with threads (``org_id`` after the fixture)."""
    return Owner(org_id, make_user(org_id))


def new_key() -> str:
    return f"key-{uuid.uuid4().hex}"


def backdate(org_id: uuid.UUID, user_id: uuid.UUID, key: str, column: str) -> None:
    execute_scoped(org_id, BACKDATE_SQL.format(column=column), (org_id, user_id, key))


def raw_row(org_id: uuid.UUID, user_id: uuid.UUID, key: str) -> tuple[Any, ...] | None:
    row = execute_scoped(org_id, RAW_ROW_SQL, (org_id, user_id, key)).fetchone()
    return None if row is None else tuple(row)


def race(threads: int, work: Callable[[int], None]) -> None:
    """Run ``work(i)`` in ``threads`` threads; each returns its pooled connection."""
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)
        finally:
            database.close()

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]


# CLAIMS


def test_begin_on_a_new_key_is_started(org_id: uuid.UUID, user_id: uuid.UUID) -> None:
    key = new_key()
    claim = begin(key, org_id=org_id, user_id=user_id, body_hash=BODY, headers_hash="h")
    assert (claim.outcome, claim.took_over) == (ClaimOutcome.STARTED, False)
    entry = claim.entry
    assert (entry.key, entry.org_id, entry.user_id) == (key, org_id, user_id)
    assert (entry.status, entry.body_hash, entry.headers_hash) == (
        IdempotencyStatus.PENDING, BODY, "h")
    assert entry.locked_until is not None
    lease = entry.locked_until - entry.created_at
    assert lease == timedelta(seconds=90)
    assert entry.ttl_until - entry.created_at == timedelta(hours=24)


def test_begin_while_pending_is_in_progress(org_id: uuid.UUID, user_id: uuid.UUID) -> None:
    key = new_key()
    first = begin(key, org_id=org_id, user_id=user_id, body_hash=BODY)
    second = begin(key, org_id=org_id, user_id=user_id, body_hash=BODY)
    assert second.outcome is ClaimOutcome.IN_PROGRESS
    assert second.entry == first.entry


def test_begin_after_completion_replays_the_stored_result(org_id: uuid.UUID,
                                                          user_id: uuid.UUID) -> None:
    key = new_key()
    begin(key, org_id=org_id, user_id=user_id, body_hash=BODY)
    body = {"id": 7, "legs": [{"from": "LIS", "to": "OPO"}], "price": 12.5, "note": None}
    mark_completed(key, org_id=org_id, user_id=user_id, body_hash=BODY,
                   response_status=201, response_body=body)
    claim = begin(key, org_id=org_id, user_id=user_id, body_hash=BODY)
    assert claim.outcome is ClaimOutcome.REPLAY
    assert (claim.entry.response_status, claim.entry.response_body) == (201, body)
    assert claim.entry.status is IdempotencyStatus.COMPLETED
    assert claim.entry.locked_until is None


@pytest.mark.parametrize("complete", [False, True], ids=["pending", "completed"])
def test_begin_with_another_body_is_mismatch_and_leaves_the_row(
    org_id: uuid.UUID, user_id: uuid.UUID, complete: bool
) -> None:
    key = new_key()
    begin(key, org_id=org_id, user_id=user_id, body_hash=BODY)
    if complete:
        mark_completed(key, org_id=org_id, user_id=user_id, body_hash=BODY,
                       response_status=200, response_body={"ok": True})
    before = raw_row(org_id, user_id, key)
    claim = begin(key, org_id=org_id, user_id=user_id, body_hash=OTHER_BODY)
    assert claim.outcome is ClaimOutcome.MISMATCH
    assert claim.entry.body_hash == BODY
    assert raw_row(org_id, user_id, key) == before


def test_same_key_under_another_user_or_org_is_independent(two_orgs: TwoOrgs) -> None:
    key = new_key()
    alice, bob, carol = make_user(two_orgs.a), make_user(two_orgs.a), make_user(two_orgs.b)
    with allow_claims_in_transaction():
        begin(key, org_id=two_orgs.a, user_id=alice, body_hash=BODY)
        mark_completed(key, org_id=two_orgs.a, user_id=alice, body_hash=BODY,
                       response_status=201, response_body={"owner": "alice"})
        claims = [begin(key, org_id=two_orgs.a, user_id=bob, body_hash=OTHER_BODY),
                  begin(key, org_id=two_orgs.b, user_id=carol, body_hash=OTHER_BODY)]
    assert [c.outcome for c in claims] == [ClaimOutcome.STARTED] * 2
    assert all(c.entry.response_body is None for c in claims)
    assert get_entry(key, org_id=two_orgs.b, user_id=alice) is None
    entry = get_entry(key, org_id=two_orgs.a, user_id=alice)
    assert entry is not None and entry.response_body == {"owner": "alice"}


def test_begin_for_a_user_of_another_org_raises_unknown_user(two_orgs: TwoOrgs,
                                                             tenant_db: TenantDatabase) -> None:
    outsider = make_user(two_orgs.b)
    with pytest.raises(UnknownUserError, match="not a user of org"), tenant_db.atomic():
        begin(new_key(), org_id=two_orgs.a, user_id=outsider, body_hash=BODY,
              allow_transaction=True)


def test_tenant_db_fixture_allows_claims_inside_its_transaction(
    org_id: uuid.UUID, tenant_db: TenantDatabase
) -> None:
    assert tenant_db.in_transaction()
    user = make_user(org_id)
    claim = begin(new_key(), org_id=org_id, user_id=user, body_hash=BODY)
    assert claim.outcome is ClaimOutcome.STARTED


def test_begin_inside_a_transaction_is_refused_unless_allowed(owner: Owner) -> None:
    with database.atomic():
        with pytest.raises(ClaimInTransactionError, match=r"before database\.atomic"):
            begin(new_key(), org_id=owner.org_id, user_id=owner.user_id, body_hash=BODY)
        claim = begin(new_key(), org_id=owner.org_id, user_id=owner.user_id, body_hash=BODY,
                      allow_transaction=True)
    assert claim.outcome is ClaimOutcome.STARTED


def test_begin_outside_a_transaction_is_not_refused(owner: Owner) -> None:
    assert not database.in_transaction()
    claim = begin(new_key(), org_id=owner.org_id, user_id=owner.user_id, body_hash=BODY)
    assert claim.outcome is ClaimOutcome.STARTED
    with database.atomic(), pytest.raises(ClaimInTransactionError):
        begin(new_key(), org_id=owner.org_id, user_id=owner.user_id, body_hash=BODY)


# TTL AND LEASES


def test_get_entry_treats_an_expired_entry_as_missing(org_id: uuid.UUID,
                                                     user_id: uuid.UUID) -> None:
    key = new_key()
    begin(key, org_id=org_id, user_id=user_id, body_hash=BODY)
    assert get_entry(key, org_id=org_id, user_id=user_id) is not None
    backdate(org_id, user_id, key, "ttl_until")
    assert get_entry(key, org_id=org_id, user_id=user_id) is None


def test_begin_after_expiry_starts_fresh(org_id: uuid.UUID, user_id: uuid.UUID) -> None:
    key = new_key()
    begin(key, org_id=org_id, user_id=user_id, body_hash=BODY)
    mark_completed(key, org_id=org_id, user_id=user_id, body_hash=BODY,
                   response_status=201, response_body={"old": True})
    backdate(org_id, user_id, key, "ttl_until")
    claim = begin(key, org_id=org_id, user_id=user_id, body_hash=OTHER_BODY)
    assert (claim.outcome, claim.took_over) == (ClaimOutcome.STARTED, True)
    assert claim.entry.status is IdempotencyStatus.PENDING
    assert (claim.entry.response_status, claim.entry.response_body) == (None, None)
    assert claim.entry.body_hash == OTHER_BODY


def test_short_ttl_replays_until_expiry_then_starts(org_id: uuid.UUID,
                                                   user_id: uuid.UUID) -> None:
    key, ttl = new_key(), timedelta(seconds=1)
    begin(key, org_id=org_id, user_id=user_id, body_hash=BODY, ttl=ttl,
          lease=timedelta(milliseconds=500))
    entry = mark_completed(key, org_id=org_id, user_id=user_id, body_hash=BODY,
                           response_status=200)
    outcomes = []
    while (now := _db_now()) < entry.ttl_until - timedelta(milliseconds=100):
        outcomes.append(begin(key, org_id=org_id, user_id=user_id, body_hash=BODY, ttl=ttl,
                              lease=timedelta(milliseconds=500)).outcome)
        time.sleep(0.05)
    assert outcomes and set(outcomes) == {ClaimOutcome.REPLAY}
    time.sleep(max(0.0, (entry.ttl_until - now).total_seconds()) + 0.05)
    assert get_entry(key, org_id=org_id, user_id=user_id) is None
    assert begin(key, org_id=org_id, user_id=user_id, body_hash=BODY).outcome is (
        ClaimOutcome.STARTED)


def test_a_stale_lease_is_taken_over(org_id: uuid.UUID, user_id: uuid.UUID) -> None:
    key = new_key()
    begin(key, org_id=org_id, user_id=user_id, body_hash=BODY)
    backdate(org_id, user_id, key, "locked_until")
    claim = begin(key, org_id=org_id, user_id=user_id, body_hash=BODY)
    assert (claim.outcome, claim.took_over) == (ClaimOutcome.STARTED, True)
    assert claim.entry.locked_until is not None
    assert claim.entry.locked_until > _db_now()


def test_a_stale_lease_with_another_body_is_mismatch(org_id: uuid.UUID,
                                                     user_id: uuid.UUID) -> None:
    key = new_key()
    begin(key, org_id=org_id, user_id=user_id, body_hash=BODY)
    backdate(org_id, user_id, key, "locked_until")
    assert begin(key, org_id=org_id, user_id=user_id, body_hash=OTHER_BODY).outcome is (
        ClaimOutcome.MISMATCH)


def test_a_live_lease_is_never_taken_over(org_id: uuid.UUID, user_id: uuid.UUID) -> None:
    key = new_key()
    lease = timedelta(milliseconds=400)
    held = begin(key, org_id=org_id, user_id=user_id, body_hash=BODY, lease=lease).entry
    assert held.locked_until is not None
    outcomes = []
    while _db_now() < held.locked_until - timedelta(milliseconds=50):
        outcomes.append(begin(key, org_id=org_id, user_id=user_id, body_hash=BODY).outcome)
        time.sleep(0.02)
    assert outcomes and set(outcomes) == {ClaimOutcome.IN_PROGRESS}
    time.sleep(0.1)
    assert begin(key, org_id=org_id, user_id=user_id, body_hash=BODY).took_over


# COMPLETION AND ERRORS


def test_mark_error_makes_the_key_retryable(org_id: uuid.UUID, user_id: uuid.UUID) -> None:
    key = new_key()
    begin(key, org_id=org_id, user_id=user_id, body_hash=BODY)
    assert mark_error(key, org_id=org_id, user_id=user_id) is True
    entry = get_entry(key, org_id=org_id, user_id=user_id)
    assert entry is not None and entry.status is IdempotencyStatus.ERROR
    claim = begin(key, org_id=org_id, user_id=user_id, body_hash=BODY)
    assert (claim.outcome, claim.took_over) == (ClaimOutcome.STARTED, True)


def test_mark_error_leaves_a_completed_result(org_id: uuid.UUID, user_id: uuid.UUID) -> None:
    key = new_key()
    begin(key, org_id=org_id, user_id=user_id, body_hash=BODY)
    mark_completed(key, org_id=org_id, user_id=user_id, body_hash=BODY, response_status=201)
    assert mark_error(key, org_id=org_id, user_id=user_id) is False
    assert mark_error(new_key(), org_id=org_id, user_id=user_id) is False
    assert begin(key, org_id=org_id, user_id=user_id, body_hash=BODY).outcome is (
        ClaimOutcome.REPLAY)


def test_mark_completed_without_a_claim_raises(org_id: uuid.UUID, user_id: uuid.UUID) -> None:
    with pytest.raises(KeyNotClaimedError, match="no such key"):
        mark_completed(new_key(), org_id=org_id, user_id=user_id, body_hash=BODY)


def test_mark_completed_with_another_body_raises_and_keeps_the_claim(
    org_id: uuid.UUID, user_id: uuid.UUID
) -> None:
    key = new_key()
    begin(key, org_id=org_id, user_id=user_id, body_hash=BODY)
    with pytest.raises(KeyNotClaimedError, match="differs"):
        mark_completed(key, org_id=org_id, user_id=user_id, body_hash=OTHER_BODY)
    entry = get_entry(key, org_id=org_id, user_id=user_id)
    assert entry is not None and entry.status is IdempotencyStatus.PENDING


@pytest.mark.parametrize("state", ["completed", "error", "expired"])
def test_mark_completed_of_a_settled_key_raises(org_id: uuid.UUID, user_id: uuid.UUID,
                                               state: str) -> None:
    key = new_key()
    begin(key, org_id=org_id, user_id=user_id, body_hash=BODY)
    if state == "completed":
        mark_completed(key, org_id=org_id, user_id=user_id, body_hash=BODY, response_status=200)
    elif state == "error":
        mark_error(key, org_id=org_id, user_id=user_id)
    else:
        backdate(org_id, user_id, key, "ttl_until")
    before = raw_row(org_id, user_id, key)
    with pytest.raises(KeyNotClaimedError, match="expired" if state == "expired" else state):
        mark_completed(key, org_id=org_id, user_id=user_id, body_hash=BODY, response_status=500)
    assert raw_row(org_id, user_id, key) == before


def test_mark_completed_rolled_back_with_the_work_leaves_the_claim(
    org_id: uuid.UUID, user_id: uuid.UUID, tenant_db: TenantDatabase
) -> None:
    key = new_key()
    begin(key, org_id=org_id, user_id=user_id, body_hash=BODY)
    with pytest.raises(RuntimeError), tenant_db.atomic():
        Destination.create(org_id=org_id, name="Lisbon")
        mark_completed(key, org_id=org_id, user_id=user_id, body_hash=BODY, response_status=201)
        raise RuntimeError("the work fails after storing its result")
    entry = get_entry(key, org_id=org_id, user_id=user_id)
    assert entry is not None and entry.status is IdempotencyStatus.PENDING


TEXT = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)))
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | TEXT
    | st.floats(allow_nan=False, allow_infinity=False, min_value=-1e15, max_value=1e15),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=JSON.filter(lambda v: v is not None))
def test_a_json_body_round_trips_exactly(org_id: uuid.UUID, user_id: uuid.UUID,
                                         body: Any) -> None:
    key = new_key()
    begin(key, org_id=org_id, user_id=user_id, body_hash=BODY)
    stored = mark_completed(key, org_id=org_id, user_id=user_id, body_hash=BODY,
                            response_status=200, response_body=body)
    replayed = begin(key, org_id=org_id, user_id=user_id, body_hash=BODY).entry
    assert stored.response_body == body
    assert replayed.response_body == body
    assert type(replayed.response_body) is type(body)


def test_a_body_with_nul_is_refused_before_sql(org_id: uuid.UUID, user_id: uuid.UUID,
                                              sql_log: StatementLog) -> None:
    with pytest.raises(ValueError, match="U\\+0000"):
        mark_completed(new_key(), org_id=org_id, user_id=user_id, body_hash=BODY,
                       response_body={"a": "x\x00y"})
    assert sql_log.statements == []


# THE CHECKLIST'S UPSERT


def test_save_result_creates_then_overwrites_an_entry(org_id: uuid.UUID,
                                                     user_id: uuid.UUID) -> None:
    key, ttl_until = new_key(), datetime.now(timezone.utc) + timedelta(hours=1)
    first = save_result(key, user_id=user_id, org_id=org_id, status="completed", body_hash=BODY,
                        headers_hash="h1", ttl_until=ttl_until, response_status=201,
                        response_body=["a"])
    assert get_entry(key, org_id=org_id, user_id=user_id) == first
    assert begin(key, org_id=org_id, user_id=user_id, body_hash=BODY).entry == first
    second = save_result(key, user_id=user_id, org_id=org_id,
                         status=IdempotencyStatus.PENDING, body_hash=OTHER_BODY,
                         headers_hash="h2", ttl_until=ttl_until)
    assert (second.status, second.body_hash, second.response_body) == (
        IdempotencyStatus.PENDING, OTHER_BODY, None)
    assert second.locked_until is not None and second.created_at == first.created_at
    assert begin(key, org_id=org_id, user_id=user_id, body_hash=OTHER_BODY).outcome is (
        ClaimOutcome.IN_PROGRESS)


def test_save_result_in_the_past_is_an_expired_entry(org_id: uuid.UUID,
                                                     user_id: uuid.UUID) -> None:
    key = new_key()
    save_result(key, user_id=user_id, org_id=org_id, status="completed", body_hash=BODY,
                headers_hash="", ttl_until=datetime.now(timezone.utc) - timedelta(seconds=1))
    assert get_entry(key, org_id=org_id, user_id=user_id) is None


# BAD INPUT: REFUSED BEFORE ANY SQL

BAD_KEYS = ["", "k" * 256, "clé", "line\nbreak", "tab\there", "del\x7f", None, 42]
ValidCall = Callable[..., object]


def _calls(org: Any, user: Any, key: Any) -> list[ValidCall]:
    ttl_until = datetime.now(timezone.utc) + timedelta(hours=1)
    return [
        lambda: begin(key, org_id=org, user_id=user, body_hash=BODY),
        lambda: get_entry(key, org_id=org, user_id=user),
        lambda: mark_completed(key, org_id=org, user_id=user, body_hash=BODY),
        lambda: mark_error(key, org_id=org, user_id=user),
        lambda: save_result(key, user_id=user, org_id=org, status="pending", body_hash=BODY,
                            headers_hash="", ttl_until=ttl_until),
        lambda: idempotent(key, org_id=org, user_id=user, body={}).__enter__(),
    ]


@pytest.mark.parametrize("key", BAD_KEYS, ids=repr)
def test_a_bad_key_raises_before_sql(org_id: uuid.UUID, user_id: uuid.UUID, key: Any,
                                     sql_log: StatementLog) -> None:
    for call in _calls(org_id, user_id, key):
        with pytest.raises(ValueError, match="printable ASCII"):
            call()
    assert sql_log.statements == []


def test_a_key_of_255_printable_characters_is_accepted(org_id: uuid.UUID,
                                                      user_id: uuid.UUID) -> None:
    key = "".join(chr(0x20 + i % 95) for i in range(255))
    assert begin(key, org_id=org_id, user_id=user_id, body_hash=BODY).outcome is (
        ClaimOutcome.STARTED)


@pytest.mark.parametrize("org", [None, "", 0, "not-a-uuid"], ids=repr)
def test_a_bad_org_raises_before_sql(user_id: uuid.UUID, org: Any,
                                     sql_log: StatementLog) -> None:
    for call in _calls(org, user_id, new_key()):
        with pytest.raises(MissingOrgError):
            call()
    assert sql_log.statements == []


@pytest.mark.parametrize("user", [None, "", "not-a-uuid", 7], ids=repr)
def test_a_bad_user_raises_before_sql(org_id: uuid.UUID, user: Any,
                                      sql_log: StatementLog) -> None:
    for call in _calls(org_id, user, new_key()):
        with pytest.raises(ValueError, match="user_id"):
            call()
    assert sql_log.statements == []


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"ttl": timedelta(0)}, "ttl"),
        ({"ttl": timedelta(seconds=-1)}, "ttl"),
        ({"ttl": 60}, "ttl"),
        ({"lease": timedelta(0)}, "lease"),
        ({"lease": 1.5}, "lease"),
        ({"lease": timedelta(hours=2), "ttl": timedelta(hours=1)}, "outlives"),
        ({"body_hash": ""}, "body_hash"),
        ({"body_hash": None}, "body_hash"),
        ({"headers_hash": None}, "headers_hash"),
    ],
)
def test_bad_claim_arguments_raise_before_sql(org_id: uuid.UUID, user_id: uuid.UUID,
                                              sql_log: StatementLog,
                                              arguments: dict[str, Any], message: str) -> None:
    call: dict[str, Any] = {"org_id": org_id, "user_id": user_id, "body_hash": BODY,
                            **arguments}
    with pytest.raises(ValueError, match=message):
        begin(new_key(), **call)
    assert sql_log.statements == []


@pytest.mark.parametrize(
    ("arguments", "message"),
    [({"response_status": 99}, "response_status"), ({"response_status": True}, "status"),
     ({"response_body": {1, 2}}, "not JSON"), ({"response_body": float("nan")}, "not JSON")],
)
def test_bad_results_raise_before_sql(org_id: uuid.UUID, user_id: uuid.UUID,
                                      sql_log: StatementLog,
                                      arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mark_completed(new_key(), org_id=org_id, user_id=user_id, body_hash=BODY, **arguments)
    assert sql_log.statements == []


def test_save_result_needs_an_aware_ttl_and_a_known_status(
    org_id: uuid.UUID, user_id: uuid.UUID, sql_log: StatementLog
) -> None:
    naive = datetime.now() + timedelta(hours=1)  # naive: the mistake under test
    with pytest.raises(ValueError, match="timezone-aware"):
        save_result(new_key(), user_id=user_id, org_id=org_id, status="completed",
                    body_hash=BODY, headers_hash="", ttl_until=naive)
    with pytest.raises(ValueError, match="status"):
        save_result(new_key(), user_id=user_id, org_id=org_id, status="done", body_hash=BODY,
                    headers_hash="", ttl_until=naive.astimezone(timezone.utc))
    assert sql_log.statements == []


# ROUND TRIPS


def test_begin_is_one_statement_whatever_the_outcome(org_id: uuid.UUID, user_id: uuid.UUID,
                                                    sql_log: StatementLog) -> None:
    key = new_key()
    outcomes = [begin(key, org_id=org_id, user_id=user_id, body_hash=BODY).outcome,
                begin(key, org_id=org_id, user_id=user_id, body_hash=BODY).outcome,
                begin(key, org_id=org_id, user_id=user_id, body_hash=OTHER_BODY).outcome]
    assert len(sql_log.statements) == 3
    mark_completed(key, org_id=org_id, user_id=user_id, body_hash=BODY, response_status=201)
    assert len(sql_log.statements) == 4
    outcomes.append(begin(key, org_id=org_id, user_id=user_id, body_hash=BODY).outcome)
    assert len(sql_log.statements) == 5
    assert outcomes == [ClaimOutcome.STARTED, ClaimOutcome.IN_PROGRESS, ClaimOutcome.MISMATCH,
                        ClaimOutcome.REPLAY]


@pytest.mark.parametrize("call", ["mark_completed", "mark_error", "get_entry"])
def test_each_store_call_is_one_statement(org_id: uuid.UUID, user_id: uuid.UUID,
                                          sql_log: StatementLog, call: str) -> None:
    key = new_key()
    begin(key, org_id=org_id, user_id=user_id, body_hash=BODY)
    sql_log.statements.clear()
    if call == "mark_completed":
        mark_completed(key, org_id=org_id, user_id=user_id, body_hash=BODY,
                       response_status=201, response_body={"id": 1})
    elif call == "mark_error":
        mark_error(key, org_id=org_id, user_id=user_id)
    else:
        get_entry(key, org_id=org_id, user_id=user_id)
    assert len(sql_log.statements) == 1


def test_a_statement_sets_the_org_in_the_same_round_trip(org_id: uuid.UUID, user_id: uuid.UUID,
                                                         sql_log: StatementLog) -> None:
    begin(new_key(), org_id=org_id, user_id=user_id, body_hash=BODY)
    (statement,) = sql_log.statements
    assert "set_config('tenantdb.org_id'" in statement
    assert "INSERT INTO idempotency_key" in statement


# FINGERPRINTS


def test_fingerprint_ignores_key_order_and_whitespace() -> None:
    as_text = '{ "b": [1, 2, {"y": 1, "x": 2}],\n  "a": "é" }'
    as_bytes = as_text.encode()
    as_value = {"a": "é", "b": [1, 2, {"x": 2, "y": 1}]}
    hashes = {fingerprint(body).body_hash for body in (as_text, as_bytes, as_value)}
    assert len(hashes) == 1
    assert len(next(iter(hashes))) == 64 and int(next(iter(hashes)), 16) >= 0


@pytest.mark.parametrize(
    ("left", "right"),
    [({"a": 1}, {"a": 2}), ([1, 2], [2, 1]), ({"a": 1}, {"a": "1"}), ("plain", "plain "),
     (None, {}), (b"\xff", b"\xfe")],
)
def test_fingerprint_tells_different_bodies_apart(left: Any, right: Any) -> None:
    assert fingerprint(left).body_hash != fingerprint(right).body_hash


def test_fingerprint_counts_only_the_named_headers_case_insensitively() -> None:
    include = ["Content-Type", "x-tenant"]
    base = fingerprint({}, {"content-type": "application/json", "X-Tenant": "a"}, include)
    same = fingerprint({}, [("X-TENANT", " a "), ("Content-Type", "application/json"),
                            ("X-Request-Id", "123")], include)
    other = fingerprint({}, {"content-type": "application/json", "X-Tenant": "b"}, include)
    assert base == same
    assert base.body_hash == other.body_hash and base.headers_hash != other.headers_hash
    assert fingerprint({}, {"X-Tenant": "a"}).headers_hash == ""


def test_fingerprint_refuses_what_is_not_json() -> None:
    with pytest.raises(ValueError, match="not JSON"):
        fingerprint({"when": datetime.now(timezone.utc)})


# THE CONTEXT MANAGER


def test_idempotent_runs_once_then_replays(org_id: uuid.UUID, user_id: uuid.UUID) -> None:
    key, runs = new_key(), []
    for _ in range(3):
        with idempotent(key, org_id=org_id, user_id=user_id, body={"trip": 1}) as call:
            if call.outcome is ClaimOutcome.STARTED:
                runs.append(1)
                call.complete(201, {"trip_id": 9})
        assert (call.entry.response_status, call.entry.response_body) == (201, {"trip_id": 9})
    assert runs == [1]
    with idempotent(key, org_id=org_id, user_id=user_id, body={"trip": 2}) as call:
        assert call.outcome is ClaimOutcome.MISMATCH
        with pytest.raises(IdempotencyError, match="not the caller's"):
            call.complete(200)


def test_idempotent_marks_an_error_and_the_retry_runs(org_id: uuid.UUID,
                                                      user_id: uuid.UUID) -> None:
    key = new_key()
    with pytest.raises(RuntimeError), idempotent(key, org_id=org_id, user_id=user_id) as call:
        assert call.outcome is ClaimOutcome.STARTED
        raise RuntimeError("the operation failed")
    entry = get_entry(key, org_id=org_id, user_id=user_id)
    assert entry is not None and entry.status is IdempotencyStatus.ERROR
    with idempotent(key, org_id=org_id, user_id=user_id) as call:
        assert call.outcome is ClaimOutcome.STARTED


def test_idempotent_without_complete_stores_no_response(org_id: uuid.UUID,
                                                       user_id: uuid.UUID) -> None:
    key = new_key()
    with idempotent(key, org_id=org_id, user_id=user_id) as call:
        assert call.outcome is ClaimOutcome.STARTED
    with idempotent(key, org_id=org_id, user_id=user_id) as call:
        assert call.outcome is ClaimOutcome.REPLAY
        assert (call.entry.response_status, call.entry.response_body) == (None, None)


# RACES: REAL THREADS, SEPARATE CONNECTIONS, REAL COMMITS


def test_racing_begins_start_exactly_once(owner: Owner, caplog: pytest.LogCaptureFixture) -> None:
    trials = 40
    keys = [new_key() for _ in range(trials)]
    claims: list[list[Claim]] = [[] for _ in range(trials)]
    start, done = threading.Barrier(THREADS), threading.Barrier(THREADS)

    def racer(_: int) -> None:
        for trial, key in enumerate(keys):
            start.wait(timeout=30)
            claim = begin(key, org_id=owner.org_id, user_id=owner.user_id, body_hash=BODY)
            claims[trial].append(claim)
            # Half the trials complete at once, so late racers see the result (REPLAY).
            if claim.outcome is ClaimOutcome.STARTED and trial % 2:
                mark_completed(key, org_id=owner.org_id, user_id=owner.user_id, body_hash=BODY,
                               response_status=201, response_body={"trial": trial})
            done.wait(timeout=30)

    with caplog.at_level(logging.DEBUG, logger="tenantdb.idempotency"):
        race(THREADS, racer)
    tally: Counter[ClaimOutcome] = Counter()
    for trial, results in enumerate(claims):
        outcomes = Counter(c.outcome for c in results)
        assert outcomes[ClaimOutcome.STARTED] == 1, (trial, outcomes)
        assert sum(outcomes.values()) == THREADS
        assert set(outcomes) <= {ClaimOutcome.STARTED, ClaimOutcome.IN_PROGRESS,
                                 ClaimOutcome.REPLAY}
        replays = [c for c in results if c.outcome is ClaimOutcome.REPLAY]
        assert all(c.entry.response_body == {"trial": trial} for c in replays)
        tally.update(outcomes)
    retries = sum("lost a race" in r.getMessage() for r in caplog.records)
    print(f"\n{trials} trials x {THREADS} threads: {dict(tally)}; "
          f"statements retried after a racer's insert: {retries}")


@pytest.mark.parametrize("column", ["locked_until", "ttl_until"], ids=["stale-lease", "expired"])
def test_racing_takeover_of_a_dead_claim_happens_once(
    owner: Owner, column: str
) -> None:
    trials = 10
    keys = [new_key() for _ in range(trials)]
    for key in keys:
        begin(key, org_id=owner.org_id, user_id=owner.user_id, body_hash=BODY)
        backdate(owner.org_id, owner.user_id, key, column)  # the holder crashed long ago
    claims: list[list[Claim]] = [[] for _ in range(trials)]
    start = threading.Barrier(THREADS)

    def racer(_: int) -> None:
        for trial, key in enumerate(keys):
            start.wait(timeout=30)
            claims[trial].append(begin(key, org_id=owner.org_id, user_id=owner.user_id,
                                       body_hash=BODY))

    race(THREADS, racer)
    for results in claims:
        started = [c for c in results if c.outcome is ClaimOutcome.STARTED]
        assert len(started) == 1 and started[0].took_over
        assert {c.outcome for c in results} - {ClaimOutcome.STARTED} == {
            ClaimOutcome.IN_PROGRESS}


@pytest.mark.parametrize("complete_first", [False, True],
                         ids=["completes-at-the-end", "completes-then-keeps-working"])
def test_a_racer_gets_in_progress_fast_while_the_work_runs(owner: Owner,
                                                           complete_first: bool) -> None:
    """The claim is committed before the work, so the work's transaction holds nothing a
    racer waits on; even a completion that holds the key's row lock does not block it."""
    key = new_key()
    working, finished = threading.Event(), threading.Event()
    results: dict[str, Any] = {}

    def complete() -> None:
        mark_completed(key, org_id=owner.org_id, user_id=owner.user_id, body_hash=BODY,
                       response_status=201)

    def holder(_: int) -> None:
        results["holder"] = begin(key, org_id=owner.org_id, user_id=owner.user_id,
                                  body_hash=BODY)
        with database.atomic():
            Destination.create(org_id=owner.org_id, name="booked")  # the work's own writes
            if complete_first:
                complete()
            working.set()
            time.sleep(1.0)
            if not complete_first:
                complete()
        finished.set()

    def racer(_: int) -> None:
        assert working.wait(timeout=10)
        started = time.perf_counter()
        results["racer"] = begin(key, org_id=owner.org_id, user_id=owner.user_id,
                                 body_hash=BODY)
        results["latency"] = time.perf_counter() - started
        results["holder_done_then"] = finished.is_set()

    race(2, lambda i: (holder if i == 0 else racer)(i))
    assert results["holder"].outcome is ClaimOutcome.STARTED
    assert results["racer"].outcome is ClaimOutcome.IN_PROGRESS
    assert results["latency"] < 0.1, results["latency"]
    assert results["holder_done_then"] is False
    assert begin(key, org_id=owner.org_id, user_id=owner.user_id, body_hash=BODY).outcome is (
        ClaimOutcome.REPLAY)


def test_concurrent_inserts_seen_late_are_retried_not_lost(
    owner: Owner, caplog: pytest.LogCaptureFixture
) -> None:
    """The race begin() retries: a racer's insert commits after this statement's snapshot.

    A second connection inserts the key and holds its transaction open; our begin blocks on
    the conflict, then sees the row only through ON CONFLICT, not through its snapshot.
    """
    key = new_key()
    inserted, release = threading.Event(), threading.Event()

    def slow_inserter(_: int) -> None:
        with database.atomic():
            save_result(key, user_id=owner.user_id, org_id=owner.org_id, status="pending",
                        body_hash=BODY, headers_hash="",
                        ttl_until=datetime.now(timezone.utc) + timedelta(hours=1))
            inserted.set()
            assert release.wait(timeout=10)

    results: list[Claim] = []

    def claimer(_: int) -> None:
        assert inserted.wait(timeout=10)
        threading.Timer(0.2, release.set).start()  # commit while begin() waits on the row
        results.append(begin(key, org_id=owner.org_id, user_id=owner.user_id, body_hash=BODY))

    with caplog.at_level(logging.DEBUG, logger="tenantdb.idempotency"):
        race(2, lambda i: (slow_inserter if i == 0 else claimer)(i))
    assert [c.outcome for c in results] == [ClaimOutcome.IN_PROGRESS]
    assert any("lost a race" in r.getMessage() for r in caplog.records)


def _db_now() -> datetime:
    now: datetime = database.execute_sql("SELECT clock_timestamp()").fetchone()[0]
    return now
