"""Idempotency keys: run an operation once per key, however often and concurrently it is retried.

A key belongs to one user of one org (primary key ``(org_id, user_id, key)``), so one
tenant's key can never collide with, or replay, another's. The flow:

1. :func:`begin` claims the key in one committed statement and says what to do
   (:class:`ClaimOutcome`): ``STARTED`` (run the operation), ``REPLAY`` (return the stored
   result), ``IN_PROGRESS`` (another request holds it: HTTP 409) or ``MISMATCH`` (same key,
   different body: HTTP 422).
2. The owner runs the operation, then :func:`mark_completed` stores the result for replay,
   or :func:`mark_error` frees the key for a retry.

:func:`idempotent` wraps the three steps in a ``with`` block. A claim carries a lease
(``locked_until``): a pending key whose holder crashed is taken over, by exactly one caller,
once its lease has lapsed. An entry lives until ``ttl_until``; past it, the key is missing
and a new request starts afresh. Every time comes from the database's clock.
"""

from __future__ import annotations

import contextvars
import logging
import re
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

import peewee
from psycopg2.extras import Json

from .citus import violated_constraint
from .context import OrgLike, require_org
from .db import database
from .errors import (
    ClaimInTransactionError,
    IdempotencyError,
    KeyNotClaimedError,
    UnknownUserError,
)
from .fingerprint import MAX_JSON_BYTES, MAX_JSON_DEPTH, Fingerprint, canonical_json, fingerprint
from .scoping import execute_scoped
from .validation import (
    check_aware_datetime,
    check_int,
    check_positive_timedelta,
    check_text,
    check_uuid,
)

__all__ = [
    "DEFAULT_LEASE",
    "DEFAULT_TTL",
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "Claim",
    "ClaimInTransactionError",
    "ClaimOutcome",
    "Fingerprint",
    "IdempotencyEntry",
    "IdempotencyError",
    "IdempotencyStatus",
    "IdempotentCall",
    "KeyNotClaimedError",
    "UnknownUserError",
    "allow_claims_in_transaction",
    "begin",
    "fingerprint",
    "get_entry",
    "idempotent",
    "mark_completed",
    "mark_error",
    "save_result",
]

log = logging.getLogger(__name__)

#: How long an entry (and its stored result) is kept, as Stripe does.
DEFAULT_TTL = timedelta(hours=24)
#: How long a claim is held before another request may take it over (a crashed worker).
DEFAULT_LEASE = timedelta(seconds=90)

KEY_MAX_LENGTH = 255
# The schema's CHECK constraint, checked in Python first so a bad key never reaches SQL.
_KEY_PATTERN = re.compile(r"[\x20-\x7e]{1,255}")
# jsonb cannot hold U+0000; json.dumps writes it as \u0000 after an even run of backslashes.
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
# The only statement that can lose a race to a concurrent insert is begin's; see _claim().
_CLAIM_ATTEMPTS = 2

# SQL
# Column order of every statement that returns entries; _entry() reads rows in this order.
_ENTRY_FIELDS = (
    "key", "org_id", "user_id", "status", "body_hash", "headers_hash", "response_status",
    "response_body", "ttl_until", "locked_until", "created_at",
)
ENTRY_COLUMNS = ", ".join(f"k.{name}" for name in _ENTRY_FIELDS)
# One statement claims a key or reports who holds it. `existing` reads the row as this
# statement's snapshot sees it; a settled row (completed, or pending under a live lease)
# skips the INSERT, so replays and IN_PROGRESS answers are pure reads: no row lock, no
# commit to flush. Otherwise the INSERT takes a free key, and its DO UPDATE takes over an
# expired entry, an errored one, or a pending one whose lease has lapsed (same body only: a
# different body is the client's mistake, so it gets MISMATCH). ON CONFLICT judges the
# newest committed version under a row lock, which is what makes one caller win. The clock
# is read once: EXCLUDED.created_at is that clock inside DO UPDATE.
CLAIM_SQL = f"""
WITH clock AS (SELECT tenantdb_clock() AS now),
existing AS (
    SELECT {ENTRY_COLUMNS},
           k.ttl_until <= clock.now
           OR k.status = 'error'
           OR (k.status = 'pending' AND k.body_hash = %s
               AND (k.locked_until IS NULL OR k.locked_until <= clock.now)) AS free
    FROM idempotency_key k, clock
    WHERE k.org_id = %s AND k.user_id = %s AND k.key = %s
),
claimed AS (
    INSERT INTO idempotency_key AS k
        (org_id, user_id, key, status, body_hash, headers_hash,
         locked_until, ttl_until, created_at, updated_at)
    SELECT %s, %s, %s, 'pending', %s, %s, clock.now + %s, clock.now + %s, clock.now, clock.now
    FROM clock
    WHERE NOT EXISTS (SELECT 1 FROM existing WHERE NOT existing.free)
    ON CONFLICT (org_id, user_id, key) DO UPDATE SET
        status = 'pending', body_hash = EXCLUDED.body_hash,
        headers_hash = EXCLUDED.headers_hash, response_status = NULL, response_body = NULL,
        locked_until = EXCLUDED.locked_until, ttl_until = EXCLUDED.ttl_until,
        created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at
    WHERE k.ttl_until <= EXCLUDED.created_at
       OR k.status = 'error'
       OR (k.status = 'pending' AND k.body_hash = EXCLUDED.body_hash
           AND (k.locked_until IS NULL OR k.locked_until <= EXCLUDED.created_at))
    RETURNING {ENTRY_COLUMNS}, true AS claimed, (k.xmax = 0) AS inserted, false AS free
)
SELECT * FROM claimed
UNION ALL
SELECT {', '.join(_ENTRY_FIELDS)}, false, false, free
FROM existing WHERE NOT EXISTS (SELECT 1 FROM claimed)
"""
GET_ENTRY_SQL = f"""
SELECT {ENTRY_COLUMNS} FROM idempotency_key k
WHERE k.org_id = %s AND k.user_id = %s AND k.key = %s AND k.ttl_until > tenantdb_clock()
"""
# Completes only the claim it names: pending, unexpired, same body. When nothing matches,
# the second branch returns the row as it is, to say why.
MARK_COMPLETED_SQL = f"""
WITH clock AS (SELECT tenantdb_clock() AS now),
done AS (
    UPDATE idempotency_key AS k SET
        status = 'completed', response_status = %s, response_body = %s,
        headers_hash = COALESCE(%s, k.headers_hash), locked_until = NULL, updated_at = clock.now
    FROM clock
    WHERE k.org_id = %s AND k.user_id = %s AND k.key = %s
      AND k.status = 'pending' AND k.body_hash = %s AND k.ttl_until > clock.now
    RETURNING {ENTRY_COLUMNS}, true AS updated, false AS expired
)
SELECT * FROM done
UNION ALL
SELECT {ENTRY_COLUMNS}, false, k.ttl_until <= clock.now
FROM idempotency_key k, clock
WHERE k.org_id = %s AND k.user_id = %s AND k.key = %s AND NOT EXISTS (SELECT 1 FROM done)
"""
MARK_ERROR_SQL = """
UPDATE idempotency_key SET status = 'error', locked_until = NULL, updated_at = tenantdb_clock()
WHERE org_id = %s AND user_id = %s AND key = %s AND status = 'pending'
RETURNING 1
"""
# The checklist's plain upsert: it overwrites whatever is stored (begin() is the safe claim).
SAVE_RESULT_SQL = f"""
WITH clock AS (SELECT tenantdb_clock() AS now)
INSERT INTO idempotency_key AS k
    (org_id, user_id, key, status, body_hash, headers_hash, response_status, response_body,
     locked_until, ttl_until, created_at, updated_at)
SELECT %s, %s, %s, %s, %s, %s, %s, %s,
       CASE WHEN %s = 'pending' THEN clock.now + %s END, %s, clock.now, clock.now
FROM clock
ON CONFLICT (org_id, user_id, key) DO UPDATE SET
    status = EXCLUDED.status, body_hash = EXCLUDED.body_hash,
    headers_hash = EXCLUDED.headers_hash, response_status = EXCLUDED.response_status,
    response_body = EXCLUDED.response_body, locked_until = EXCLUDED.locked_until,
    ttl_until = EXCLUDED.ttl_until, updated_at = EXCLUDED.updated_at
RETURNING {ENTRY_COLUMNS}
"""
USER_FK = "idempotency_key_user_fkey"

# Set by allow_claims_in_transaction(); a contextvar, so threads and tasks are unaffected.
_allow_in_transaction: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "tenantdb_idempotency_allow_in_transaction", default=False
)


# PUBLIC TYPES


class IdempotencyStatus(str, Enum):
    """The stored state of a key (the ``status`` column)."""

    PENDING = "pending"
    COMPLETED = "completed"
    ERROR = "error"


class ClaimOutcome(str, Enum):
    """What :func:`begin` tells the caller to do."""

    #: The caller owns the key: run the operation, then mark it completed or errored.
    STARTED = "started"
    #: Completed earlier with the same body: return ``claim.entry``'s stored response.
    REPLAY = "replay"
    #: Another request holds a live lease on the key (HTTP 409).
    IN_PROGRESS = "in_progress"
    #: The key was used with a different body (HTTP 422); the stored entry is unchanged.
    MISMATCH = "mismatch"


@dataclass(frozen=True)
class IdempotencyEntry:
    """One stored key, as the database holds it.

    :param response_status: the stored status code (``None`` until completed, or if none).
    :param response_body: the stored JSON body, as Python values (``None``: no body).
    :param locked_until: the end of the holder's lease while pending, else ``None``.
    :param ttl_until: past this instant the entry counts as missing.
    """

    key: str
    org_id: uuid.UUID
    user_id: uuid.UUID
    status: IdempotencyStatus
    body_hash: str
    headers_hash: str
    response_status: int | None
    response_body: Any
    ttl_until: datetime
    locked_until: datetime | None
    created_at: datetime


@dataclass(frozen=True)
class Claim:
    """The answer of :func:`begin`.

    :param outcome: what to do (:class:`ClaimOutcome`).
    :param entry: the entry after the claim: the caller's own pending entry when
        ``STARTED``; the stored result when ``REPLAY``; the holder's or the conflicting
        entry when ``IN_PROGRESS`` or ``MISMATCH``.
    :param took_over: ``STARTED`` on an expired, errored or lapsed entry, not a new one.
    """

    outcome: ClaimOutcome
    entry: IdempotencyEntry
    took_over: bool = False


# PUBLIC API

def begin(
    key: str,
    /,
    *,
    org_id: OrgLike,
    user_id: uuid.UUID | str,
    body_hash: str,
    headers_hash: str = "",
    ttl: timedelta = DEFAULT_TTL,
    lease: timedelta = DEFAULT_LEASE,
    allow_transaction: bool = False,
) -> Claim:
    """Claim ``key`` for one request, in one statement that commits before the work starts.

    Racing callers of one key get exactly one ``STARTED``. The others get ``IN_PROGRESS``
    while the owner's lease lasts, ``REPLAY`` once it completed with the same body hash, and
    ``MISMATCH`` for any other body hash (also while the owner runs). An entry past ``ttl``
    or marked with :func:`mark_error` is free again, for any body; a pending one whose lease
    lapsed (a crashed holder) is taken over by one caller with the same body hash. Times
    are the database's ``clock_timestamp()`` (through ``tenantdb_clock()``, V01_07).

    One statement, one round trip. A caller that had to wait for a racer's uncommitted
    insert of the same key sends it a second time: the first statement's snapshot predates
    the racer's commit, so it cannot read the row it conflicted with (READ COMMITTED).

    Inside an open transaction the claim would stay invisible until that transaction ends:
    racers would block on it instead of getting a fast ``IN_PROGRESS``, and a rollback
    would drop it. So ``begin`` refuses there unless ``allow_transaction=True`` or
    :func:`allow_claims_in_transaction` (tests under the ``tenant_db`` fixture), where the
    claim simply joins the caller's transaction. Call it before ``database.atomic()``, and
    :func:`mark_completed` inside the work's transaction, so that result and work commit
    together.

    :param key: the client's key: 1 to 255 printable ASCII characters.
    :param body_hash: the request's fingerprint (:func:`fingerprint`); compared on replay.
    :param headers_hash: recorded with the entry, not compared.
    :param ttl: how long the entry (and its result) is kept; at least ``lease``.
    :param lease: how long the owner may run before a retry may take the key over.
    :raises ValueError: a bad key, user id, hash, ttl or lease (before any SQL).
    :raises MissingOrgError: no org, or not a UUID (before any SQL).
    :raises ClaimInTransactionError: called inside a transaction without the opt-out.
    :raises UnknownUserError: ``user_id`` is not a user of ``org_id``.
    """
    org, user = _check_owner(key, org_id, user_id, "begin()")
    _check_hash(body_hash, "body_hash")
    _check_hash(headers_hash, "headers_hash", allow_empty=True)
    check_positive_timedelta(ttl, "ttl", where="begin()")
    check_positive_timedelta(lease, "lease", where="begin()")
    if lease > ttl:
        raise ValueError(f"begin(): lease={lease} outlives ttl={ttl}; the key would expire "
                         "while held, and a retry would run the operation again")
    if database.in_transaction() and not (allow_transaction or _allow_in_transaction.get()):
        raise ClaimInTransactionError(
            "begin() inside an open transaction: racers would wait for it to end instead of "
            "getting IN_PROGRESS, and a rollback would drop the claim; call begin() before "
            "database.atomic(), or pass allow_transaction=True (tests under tenant_db)"
        )
    params = (body_hash, org, user, key, org, user, key, body_hash, headers_hash, lease, ttl)
    return _claim(org, user, body_hash, params)


def get_entry(
    key: str, /, *, org_id: OrgLike, user_id: uuid.UUID | str
) -> IdempotencyEntry | None:
    """The stored entry of ``key``, or ``None`` if there is none or it has expired.

    :raises ValueError: a bad key or user id (before any SQL).
    :raises MissingOrgError: no org, or not a UUID (before any SQL).
    """
    org, user = _check_owner(key, org_id, user_id, "get_entry()")
    row = execute_scoped(org, GET_ENTRY_SQL, (org, user, key)).fetchone()
    return None if row is None else _entry(row)


def mark_completed(
    key: str,
    /,
    *,
    org_id: OrgLike,
    user_id: uuid.UUID | str,
    body_hash: str,
    headers_hash: str | None = None,
    response_status: int | None = None,
    response_body: Any = None,
) -> IdempotencyEntry:
    """Store the result of the claimed operation for replay, in one statement.

    Only a pending, unexpired claim with the same ``body_hash`` is completed, so a result
    can never be stored over another request's key. Run it inside the operation's
    transaction to commit the result with the work.

    :param headers_hash: replaces the stored one; ``None`` keeps it.
    :param response_status: an HTTP status code (100-599), or ``None``.
    :param response_body: any JSON value; ``None`` stores no body (SQL NULL). It comes back
        equal (jsonb keeps neither key order nor duplicate keys).
    :returns: the completed entry.
    :raises ValueError: bad arguments, or a body that is not JSON (before any SQL).
    :raises MissingOrgError: no org, or not a UUID (before any SQL).
    :raises KeyNotClaimedError: no pending claim of ``key`` (missing, expired, already
        completed or errored) or one with another body hash.
    """
    org, user = _check_owner(key, org_id, user_id, "mark_completed()")
    _check_hash(body_hash, "body_hash")
    if headers_hash is not None:
        _check_hash(headers_hash, "headers_hash", allow_empty=True)
    _check_response_status(response_status)
    body = _json_param(response_body)
    params = (response_status, body, headers_hash, org, user, key, body_hash, org, user, key)
    row = execute_scoped(org, MARK_COMPLETED_SQL, params).fetchone()
    if row is None or not row[-2]:
        raise KeyNotClaimedError(_not_claimed_reason(key, body_hash, row))
    return _entry(row)


def mark_error(key: str, /, *, org_id: OrgLike, user_id: uuid.UUID | str) -> bool:
    """Free a pending key after its operation failed: the next :func:`begin` is ``STARTED``.

    Never raises for the key's state, because it usually runs in an exception handler
    where a second error would hide the first. A completed key keeps its result.

    :returns: whether a pending entry was marked.
    :raises ValueError: a bad key or user id (before any SQL).
    :raises MissingOrgError: no org, or not a UUID (before any SQL).
    """
    org, user = _check_owner(key, org_id, user_id, "mark_error()")
    return execute_scoped(org, MARK_ERROR_SQL, (org, user, key)).fetchone() is not None


def save_result(
    key: str,
    /,
    *,
    user_id: uuid.UUID | str,
    org_id: OrgLike,
    status: IdempotencyStatus | str,
    body_hash: str,
    headers_hash: str = "",
    ttl_until: datetime,
    response_status: int | None = None,
    response_body: Any = None,
    lease: timedelta = DEFAULT_LEASE,
) -> IdempotencyEntry:
    """Write an entry whatever is stored (the checklist's upsert), in one statement.

    Not a claim: it overwrites a concurrent request's entry. Use :func:`begin` for requests;
    this is for imports, repairs and tests. ``created_at`` of an existing entry is kept.
    Arguments are the checklist's, keyword-only: two positional UUIDs are easy to swap.

    :param status: the entry's status; a ``pending`` one gets a lease of ``lease``.
    :param ttl_until: a timezone-aware instant; may be in the past (an expired entry).
    :raises ValueError: bad arguments (before any SQL).
    :raises MissingOrgError: no org, or not a UUID (before any SQL).
    :raises UnknownUserError: ``user_id`` is not a user of ``org_id``.
    """
    org, user = _check_owner(key, org_id, user_id, "save_result()")
    state = _check_status(status)
    _check_hash(body_hash, "body_hash")
    _check_hash(headers_hash, "headers_hash", allow_empty=True)
    check_positive_timedelta(lease, "lease", where="save_result()")
    check_aware_datetime(ttl_until, "ttl_until", where="save_result()")
    _check_response_status(response_status)
    body = _json_param(response_body)
    params = (org, user, key, state.value, body_hash, headers_hash, response_status, body,
              state.value, lease, ttl_until)
    with _unknown_user_as_error(org, user):
        row = execute_scoped(org, SAVE_RESULT_SQL, params).fetchone()
    return _entry(row)


@contextmanager
def allow_claims_in_transaction() -> Iterator[None]:
    """Let :func:`begin` run inside open transactions in this context (for test suites
    whose every test runs in one transaction, such as under ``tenant_db``)."""
    token = _allow_in_transaction.set(True)
    try:
        yield
    finally:
        _allow_in_transaction.reset(token)


class IdempotentCall:
    """The handle :func:`idempotent` yields: the claim, and :meth:`complete` for the result."""

    def __init__(self, claim: Claim, key: str, org_id: uuid.UUID, user_id: uuid.UUID) -> None:
        self.claim = claim
        self._owner = (key, org_id, user_id)
        self.completed: IdempotencyEntry | None = None

    @property
    def outcome(self) -> ClaimOutcome:
        """The claim's outcome: run the operation only when ``STARTED``."""
        return self.claim.outcome

    @property
    def entry(self) -> IdempotencyEntry:
        """The result to return: the completed entry, else the claim's entry."""
        return self.completed or self.claim.entry

    def complete(self, response_status: int | None = None, response_body: Any = None) -> None:
        """Store the operation's result (call inside the work's transaction to commit both).

        :raises IdempotencyError: the claim is not ``STARTED``, or already completed.
        :raises KeyNotClaimedError: see :func:`mark_completed`.
        """
        if self.claim.outcome is not ClaimOutcome.STARTED or self.completed is not None:
            raise IdempotencyError(f"complete() on a {self.claim.outcome.value} claim that is "
                                   "not the caller's to complete (or completed already)")
        key, org, user = self._owner
        self.completed = mark_completed(
            key, org_id=org, user_id=user, body_hash=self.claim.entry.body_hash,
            response_status=response_status, response_body=response_body,
        )


@contextmanager
def idempotent(
    key: str,
    /,
    *,
    org_id: OrgLike,
    user_id: uuid.UUID | str,
    body: Any = None,
    headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    include: Iterable[str] = (),
    ttl: timedelta = DEFAULT_TTL,
    lease: timedelta = DEFAULT_LEASE,
) -> Iterator[IdempotentCall]:
    """:func:`begin`, then the block, then :func:`mark_completed` or :func:`mark_error`.

    ::

        with idempotent(key, org_id=org, user_id=user, body=payload) as call:
            if call.outcome is ClaimOutcome.STARTED:
                with database.atomic():
                    call.complete(201, create_trip(payload))
        return call.entry.response_status, call.entry.response_body  # also on REPLAY

    When ``STARTED``: an exception out of the block marks the key errored (retryable: the
    work is assumed rolled back) and propagates; leaving the block without
    :meth:`~IdempotentCall.complete` completes the key with no response, because the work
    ran and must not run again. Other outcomes leave the key alone.

    :raises: as :func:`begin` and :func:`fingerprint`, before the block runs.
    """
    body_hash, headers_hash = fingerprint(body, headers, include)
    org, user = _check_owner(key, org_id, user_id, "idempotent()")
    claim = begin(key, org_id=org, user_id=user, body_hash=body_hash,
                  headers_hash=headers_hash, ttl=ttl, lease=lease)
    call = IdempotentCall(claim, key, org, user)
    if claim.outcome is not ClaimOutcome.STARTED:
        yield call
        return
    try:
        yield call
    except BaseException:
        mark_error(key, org_id=org, user_id=user)
        raise
    if call.completed is None:
        call.complete()


# PRIVATE HELPERS


def _claim(
    org: uuid.UUID, user: uuid.UUID, body_hash: str, params: tuple[Any, ...]
) -> Claim:
    for attempt in range(1, _CLAIM_ATTEMPTS + 1):
        with _unknown_user_as_error(org, user):
            row = execute_scoped(org, CLAIM_SQL, params).fetchone()
        if row is not None:
            return _classify(row, body_hash)
        # No row: a racer's insert committed after this statement's snapshot was taken, so
        # ON CONFLICT saw the row (and left it) but the fallback SELECT could not see it.
        # A new statement takes a new snapshot and sees it.
        log.debug("begin(): lost a race to a concurrent insert (attempt %d)", attempt)
    raise IdempotencyError("begin(): the key changed under every attempt to claim it "
                           "(inserted and deleted concurrently); retry the request")


def _classify(row: tuple[Any, ...], body_hash: str) -> Claim:
    entry = _entry(row)
    claimed, inserted, free = row[-3:]
    if claimed:
        return Claim(ClaimOutcome.STARTED, entry, took_over=not inserted)
    if free:
        # The fallback read this statement's snapshot of the row, while ON CONFLICT judged
        # the newest version: a free old version means a racer has just taken the key.
        return Claim(ClaimOutcome.IN_PROGRESS, entry)
    if entry.body_hash != body_hash:
        return Claim(ClaimOutcome.MISMATCH, entry)
    if entry.status is IdempotencyStatus.COMPLETED:
        return Claim(ClaimOutcome.REPLAY, entry)
    return Claim(ClaimOutcome.IN_PROGRESS, entry)


def _entry(row: tuple[Any, ...]) -> IdempotencyEntry:
    key, org, user, status, body_hash, headers_hash, code, body, ttl, locked, created = row[:11]
    return IdempotencyEntry(
        key=key, org_id=uuid.UUID(str(org)), user_id=uuid.UUID(str(user)),
        status=IdempotencyStatus(status), body_hash=body_hash, headers_hash=headers_hash,
        response_status=code, response_body=body, ttl_until=ttl, locked_until=locked,
        created_at=created,
    )


def _not_claimed_reason(key: str, body_hash: str, row: tuple[Any, ...] | None) -> str:
    prefix = f"mark_completed({key!r})"
    if row is None:
        return f"{prefix}: no such key; claim it with begin() first"
    entry, expired = _entry(row), row[-1]
    if expired:
        return f"{prefix}: the entry expired at {entry.ttl_until}; claim it again with begin()"
    if entry.status is not IdempotencyStatus.PENDING:
        return (f"{prefix}: the key is {entry.status.value}, not pending; only the owner of a "
                "STARTED claim may complete it")
    return (f"{prefix}: body_hash {body_hash!r} differs from the claim's "
            f"{entry.body_hash!r}; complete with the hash given to begin()")


@contextmanager
def _unknown_user_as_error(org: uuid.UUID, user: uuid.UUID) -> Iterator[None]:
    try:
        yield
    except peewee.IntegrityError as exc:
        # peewee keeps the driver's error as .orig; its diag names the violated constraint
        # (on Citus only the message does, with the shard's id appended).
        if violated_constraint(exc) != USER_FK:
            raise
        raise UnknownUserError(f"user {user} is not a user of org {org}: an idempotency key "
                               "belongs to an existing user of its org") from exc


def _check_owner(
    key: object, org_id: object, user_id: object, where: str
) -> tuple[uuid.UUID, uuid.UUID]:
    _check_key(key, where)
    return require_org(org_id, where), check_uuid(user_id, "user_id", where=where,
                                                  hint="pass the user's id")


def _check_key(key: object, where: str) -> None:
    if not isinstance(key, str) or not _KEY_PATTERN.fullmatch(key):
        shown = key if not isinstance(key, str) or len(key) <= 40 else key[:40] + "..."
        raise ValueError(f"{where}: idempotency key {shown!r} must be 1 to "
                         f"{KEY_MAX_LENGTH} printable ASCII characters")


def _check_hash(value: object, name: str, *, allow_empty: bool = False) -> None:
    check_text(value, name, allow_empty=allow_empty, hint="use fingerprint()")


def _check_status(status: object) -> IdempotencyStatus:
    try:
        return IdempotencyStatus(status)
    except ValueError:
        names = ", ".join(s.value for s in IdempotencyStatus)
        raise ValueError(f"status={status!r} is not one of {names}") from None


def _check_response_status(code: object) -> None:
    if code is None:
        return
    check_int(code, "response_status", minimum=100, maximum=599, hint="an HTTP status code")


def _json_param(value: Any) -> Json | None:
    if value is None:
        return None
    text = canonical_json(value, "response_body")
    if _JSON_NUL.search(text):
        raise ValueError("response_body contains U+0000, which jsonb cannot store")
    return Json(value, dumps=lambda _: text)
