"""HTTP semantics without a framework: Idempotency-Key, RateLimit headers, problem details.

Everything here returns plain data, :class:`HTTPResponse` (status, headers, body bytes),
which an adapter (``tenantdb.fastapi``) turns into its framework's response. Nothing here
imports a web framework.

- :func:`parse_idempotency_key`: the ``Idempotency-Key`` header, a structured-field string
  (IETF draft "The Idempotency-Key HTTP Header Field"); malformed → 400.
- :func:`request_fingerprint`: method, path, body and the headers named, hashed.
- :func:`run_idempotent`: claim, run the handler in the transaction that stores its
  response, replay, 409 while in flight, 422 for another payload; a 5xx or an exception
  leaves the key retryable.
- :func:`rate_limit_headers` / :func:`rate_limit_refusal`: ``RateLimit-Policy`` and
  ``RateLimit`` (IETF RateLimit header fields draft), 429 or 503 with ``Retry-After``.
- :func:`error_response`: the one table mapping tenancy and database errors to statuses.
- :func:`problem`: RFC 9457 ``application/problem+json`` bodies.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from http import HTTPStatus
from typing import Any

import peewee

from .context import OrgLike
from .errors import (
    ClaimInTransactionError,
    ConnectionLostError,
    CrossOrgError,
    DatabaseUnavailableError,
    MissingOrgError,
    NotConnectedError,
    PoolExhaustedError,
    StatementTimeoutError,
    UnknownUserError,
    UnscopedQueryError,
)
from .fingerprint import Fingerprint, fingerprint
from .idempotency import (
    KEY_MAX_LENGTH,
    ClaimOutcome,
    IdempotencyEntry,
    begin,
    mark_completed,
    mark_error,
)
from .ratelimit import RateLimitResult

__all__ = [
    "DEGRADED_RETRY_AFTER_S",
    "ERROR_STATUS",
    "HOP_BY_HOP",
    "IDEMPOTENCY_KEY_HEADER",
    "PROBLEM_JSON",
    "REPLAYED_HEADER",
    "ErrorRule",
    "HTTPResponse",
    "IdempotencyKeyError",
    "RateDecision",
    "RateLimitState",
    "error_response",
    "json_response",
    "parse_idempotency_key",
    "problem",
    "rate_decision",
    "rate_limit_headers",
    "rate_limit_refusal",
    "request_fingerprint",
    "run_idempotent",
    "run_in_transaction",
]

IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
#: Added to a replayed response (the name Stripe uses; the draft leaves it open).
REPLAYED_HEADER = "Idempotent-Replayed"
PROBLEM_JSON = "application/problem+json"
#: Not stored for replay: connection-level (RFC 9110 §7.6.1) or per-response headers.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "transfer-encoding", "upgrade", "proxy-connection", "set-cookie",
    "content-length", "date", "server",
})
#: Retry-After of a fail-closed refusal while Redis is unreachable (an outage, not a quota).
DEGRADED_RETRY_AFTER_S = 5
# Marks a response whose rate limit could not be checked (a tenantdb extension header).
DEGRADED_HEADER = "RateLimit-Degraded"
# The RateLimit draft's problem type for a quota refusal.
QUOTA_EXCEEDED_TYPE = "https://iana.org/assignments/http-problem-types#quota-exceeded"
_PROBLEM_BASE = "tag:tenantdb,2026:problem:"
# Version tag of the stored replay envelope (response_body of the idempotency entry).
_ENVELOPE = "tenantdb.http/1"

Headers = Sequence[tuple[str, str]]


# RESPONSES AND PROBLEMS


@dataclass(frozen=True)
class HTTPResponse:
    """A response as plain data: what an adapter renders.

    :param headers: name/value pairs in order (a name may repeat).
    :param body: the encoded body.
    """

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or ``None``."""
        wanted = name.lower()
        return next((v for k, v in self.headers if k.lower() == wanted), None)

    def with_headers(self, extra: Iterable[tuple[str, str]]) -> HTTPResponse:
        """A copy with ``extra`` headers appended."""
        return HTTPResponse(self.status, (*self.headers, *extra), self.body)


def json_response(status: int, value: Any, headers: Headers = ()) -> HTTPResponse:
    """``value`` as an ``application/json`` response."""
    body = json.dumps(value, separators=(",", ":"), default=str).encode()
    return HTTPResponse(status, (("content-type", "application/json"), *headers), body)


def problem(
    status: int,
    title: str | None = None,
    detail: str | None = None,
    *,
    kind: str | None = None,
    type_uri: str | None = None,
    headers: Headers = (),
    **extensions: Any,
) -> HTTPResponse:
    """An RFC 9457 problem details response (``application/problem+json``).

    :param title: a short summary; defaults to the status phrase.
    :param kind: a tenantdb problem name (``idempotency-key-in-use``): the ``type`` URI is
        ``tag:tenantdb,2026:problem:<kind>``; neither ``kind`` nor ``type_uri``: ``about:blank``.
    :param extensions: extra members of the problem object.
    """
    uri = type_uri or (_PROBLEM_BASE + kind if kind else "about:blank")
    body: dict[str, Any] = {"type": uri, "title": title or HTTPStatus(status).phrase,
                            "status": status}
    if detail:
        body["detail"] = detail
    body.update(extensions)
    encoded = json.dumps(body, separators=(",", ":"), default=str).encode()
    return HTTPResponse(status, (("content-type", PROBLEM_JSON), *headers), encoded)


# IDEMPOTENCY-KEY


class IdempotencyKeyError(ValueError):
    """A missing (where required) or malformed ``Idempotency-Key`` header: HTTP 400.

    :param response: the problem response to send.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.response = problem(400, "Invalid Idempotency-Key", message,
                                kind="idempotency-key-invalid")


def parse_idempotency_key(value: str | None, *, required: bool) -> str | None:
    """The key in an ``Idempotency-Key`` header value, per RFC 8941's sf-string.

    The value is a quoted string (``"8e03978e-40d5-43e8-bc93-6894a57f9324"``) of 1 to 255
    printable ASCII characters; ``\\"`` and ``\\\\`` are its only escapes.

    :param value: the header's value, ``None`` when absent.
    :param required: whether a missing header is an error.
    :returns: the unescaped key, or ``None`` when absent and optional.
    :raises IdempotencyKeyError: missing where required, or malformed.
    """
    if value is None:
        if required:
            raise IdempotencyKeyError(
                f"this request needs an {IDEMPOTENCY_KEY_HEADER} header, a quoted string "
                'such as Idempotency-Key: "8e03978e-40d5-43e8-bc93-6894a57f9324"')
        return None
    text = value.strip(" \t")
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        raise IdempotencyKeyError(f"{IDEMPOTENCY_KEY_HEADER} must be a quoted string "
                                  '(RFC 8941 sf-string), e.g. "8e03978e-..."')
    key = _unescape_sf_string(text[1:-1])
    if not 1 <= len(key) <= KEY_MAX_LENGTH:
        raise IdempotencyKeyError(f"{IDEMPOTENCY_KEY_HEADER} must hold 1 to "
                                  f"{KEY_MAX_LENGTH} characters")
    return key


def request_fingerprint(
    method: str,
    path: str,
    body: Any,
    headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    include: Iterable[str] = (),
) -> Fingerprint:
    """The fingerprint of a request: method, path and body (canonical JSON when it parses),
    plus the headers named in ``include``.

    :raises ValueError: a body over the JSON size or depth limits (see
        :mod:`tenantdb.fingerprint`).
    """
    body_hash, headers_hash = fingerprint(body, headers, include)
    target = f"{method.upper()} {path}\n{body_hash}".encode()
    return Fingerprint(hashlib.sha256(target).hexdigest(), headers_hash)


def run_idempotent(
    key: str,
    /,
    *,
    org_id: OrgLike,
    user_id: uuid.UUID | str,
    request: Fingerprint,
    handler: Callable[[], HTTPResponse],
    atomic: Callable[[], Any],
) -> HTTPResponse:
    """Run ``handler`` once per key; replay its stored response to retries.

    A new key (or a retryable one) is claimed in its own committed statement, then
    ``handler`` runs inside ``atomic()`` (the database's transaction), and its response is
    stored in that same transaction: the handler's writes and the stored response commit
    together or not at all. Stored: status, headers minus ``Set-Cookie`` and hop-by-hop
    ones, and body. A retry gets the stored response with ``Idempotent-Replayed: true``; a
    request while the first is running gets 409, one with another payload 422. A handler
    that returns a 5xx or raises rolls back and leaves the key retryable.

    :param request: :func:`request_fingerprint` of the request.
    :param handler: produces the response; its database work joins the transaction.
    :param atomic: opens the transaction (``tenantdb.database.atomic``).
    :raises: what ``handler`` raises (the key is then retryable); see
        :func:`tenantdb.idempotency.begin` for bad arguments.
    """
    claim = begin(key, org_id=org_id, user_id=user_id, body_hash=request.body_hash,
                  headers_hash=request.headers_hash)
    if claim.outcome is ClaimOutcome.REPLAY:
        return replay_response(claim.entry)
    if claim.outcome is ClaimOutcome.IN_PROGRESS:
        return problem(409, "Idempotency key in use", "a request with this Idempotency-Key is "
                       "still being processed; retry after it completes",
                       kind="idempotency-key-in-use", headers=(("retry-after", "1"),))
    if claim.outcome is ClaimOutcome.MISMATCH:
        return problem(422, "Idempotency key reused", "this Idempotency-Key was used with "
                       "another request (method, path or body); use a new key",
                       kind="idempotency-key-reused")
    def complete(response: HTTPResponse) -> None:
        mark_completed(key, org_id=org_id, user_id=user_id, body_hash=request.body_hash,
                       response_status=response.status, response_body=_envelope(response))

    try:
        response = run_in_transaction(handler, atomic, on_success=complete)
    except BaseException:
        mark_error(key, org_id=org_id, user_id=user_id)
        raise
    if response.status >= 500:
        mark_error(key, org_id=org_id, user_id=user_id)
    return response


def run_in_transaction(
    handler: Callable[[], HTTPResponse],
    atomic: Callable[[], Any],
    *,
    on_success: Callable[[HTTPResponse], None] | None = None,
) -> HTTPResponse:
    """Run ``handler`` inside ``atomic()``: a 5xx response (or an exception) rolls its
    writes back; otherwise ``on_success(response)`` runs in the same transaction."""
    try:
        with atomic():
            response = handler()
            if response.status >= 500:
                raise _RetryableResponse(response)
            if on_success is not None:
                on_success(response)
    except _RetryableResponse as failed:
        return failed.response
    return response


def replay_response(entry: IdempotencyEntry) -> HTTPResponse:
    """The stored response of a completed entry, marked as a replay."""
    status = entry.response_status or 204
    stored = entry.response_body
    if not (isinstance(stored, dict) and stored.get("v") == _ENVELOPE):
        # Completed by other code (mark_completed with a plain JSON body).
        response = json_response(status, stored) if stored is not None else HTTPResponse(status)
    else:
        headers = tuple((str(k), str(v)) for k, v in stored.get("headers", ()))
        response = HTTPResponse(status, headers, base64.b64decode(stored.get("body", "")))
    return response.with_headers([(REPLAYED_HEADER, "true")])


# RATE LIMITS


class RateLimitState(str, Enum):
    """What a :class:`~tenantdb.ratelimit.RateLimitResult` means for HTTP."""

    ALLOWED = "allowed"
    DENIED = "denied"              # over quota: 429
    FAIL_OPEN = "fail-open"        # Redis unreachable, bucket fails open: allowed, marked
    FAIL_CLOSED = "fail-closed"    # Redis unreachable, bucket fails closed: 503 (an outage)


@dataclass(frozen=True)
class RateDecision:
    """A rate-limit result reduced to what the headers need; never ``None`` where rendered.

    :param remaining: tokens left (``None`` only when degraded: then not rendered).
    :param reset_s: whole seconds until the bucket is full again (or until allowed).
    :param retry_after_s: whole seconds to wait before retrying (refusals only).
    """

    state: RateLimitState
    bucket: str
    limit: int
    window_s: int
    remaining: int | None = None
    reset_s: int = 0
    retry_after_s: int | None = None


def rate_decision(result: RateLimitResult) -> RateDecision:
    """Read a :class:`~tenantdb.ratelimit.RateLimitResult` (the one place that does).

    A degraded result (Redis could not be asked) carries no numbers: ``allowed`` then says
    the bucket's failure mode, and nothing ``None`` is ever rendered.
    """
    bucket, limit, window_s = result.policy, result.limit, result.window_seconds
    if result.degraded:
        if result.allowed:
            return RateDecision(RateLimitState.FAIL_OPEN, bucket, limit, window_s)
        return RateDecision(RateLimitState.FAIL_CLOSED, bucket, limit, window_s,
                            retry_after_s=DEGRADED_RETRY_AFTER_S)
    remaining = result.remaining or 0
    reset = result.reset_after_seconds or 0
    if result.allowed:
        return RateDecision(RateLimitState.ALLOWED, bucket, limit, window_s, remaining, reset)
    wait = result.retry_after_seconds if result.retry_after_seconds is not None else window_s
    return RateDecision(RateLimitState.DENIED, bucket, limit, window_s, remaining,
                        max(reset, wait), wait)


def rate_limit_headers(decision: RateDecision) -> list[tuple[str, str]]:
    """``RateLimit-Policy`` and ``RateLimit`` (IETF draft -11), plus ``Retry-After`` on a
    refusal and ``RateLimit-Degraded`` when Redis could not be asked."""
    name = _sf_string(decision.bucket)
    headers = [("RateLimit-Policy", f"{name};q={decision.limit};w={decision.window_s}")]
    if decision.remaining is not None:
        headers.append(("RateLimit", f"{name};r={decision.remaining};t={decision.reset_s}"))
    if decision.state in (RateLimitState.FAIL_OPEN, RateLimitState.FAIL_CLOSED):
        headers.append((DEGRADED_HEADER, decision.state.value))
    if decision.retry_after_s is not None:
        headers.append(("Retry-After", str(decision.retry_after_s)))
    return headers


def rate_limit_refusal(decision: RateDecision) -> HTTPResponse | None:
    """The response refusing the request (429 over quota, 503 while Redis is down and the
    bucket fails closed), or ``None`` when it may go ahead."""
    headers = rate_limit_headers(decision)
    if decision.state is RateLimitState.DENIED:
        return problem(429, "Too Many Requests",
                       f"rate limit of bucket {decision.bucket!r} exceeded: "
                       f"{decision.limit} per {decision.window_s} s; retry after "
                       f"{decision.retry_after_s} s", type_uri=QUOTA_EXCEEDED_TYPE,
                       headers=headers)
    if decision.state is RateLimitState.FAIL_CLOSED:
        return problem(503, "Rate limiter unavailable",
                       f"the rate limit of bucket {decision.bucket!r} cannot be checked "
                       "right now; retry shortly", kind="rate-limiter-unavailable",
                       headers=headers)
    return None


# ERRORS → STATUS


@dataclass(frozen=True)
class ErrorRule:
    """One row of :data:`ERROR_STATUS`: errors that ``matches`` get ``status``.

    :param detail: the public text (never the exception's own message, which may name
        another org's ids or the database's host).
    """

    matches: Callable[[BaseException], bool]
    status: int
    kind: str
    detail: str
    headers: tuple[tuple[str, str], ...] = field(default=())


def _is(*types: type[BaseException]) -> Callable[[BaseException], bool]:
    return lambda exc: isinstance(exc, types)


def _sqlstate(prefix: str) -> Callable[[BaseException], bool]:
    def matches(exc: BaseException) -> bool:
        code = getattr(getattr(exc, "orig", None) or exc.__cause__, "pgcode", None)
        return isinstance(exc, peewee.IntegrityError) and str(code or "").startswith(prefix)
    return matches


def _database_unavailable(exc: BaseException) -> bool:
    # The connection layer wraps every "cannot serve now" (unreachable server, lost
    # connection, pool exhausted, statement timeout) into these; a raw peewee
    # OperationalError / InterfaceError can still come from code using a driver directly.
    return isinstance(exc, _UNAVAILABLE)


_UNAVAILABLE = (DatabaseUnavailableError, ConnectionLostError, PoolExhaustedError,
                StatementTimeoutError, NotConnectedError, peewee.OperationalError,
                peewee.InterfaceError)


#: Errors → HTTP, first match wins. One source: the FastAPI adapter and the README read it.
ERROR_STATUS: tuple[ErrorRule, ...] = (
    ErrorRule(_is(MissingOrgError), 400, "missing-org",
              "the request names no org, or not a valid one"),
    ErrorRule(_is(CrossOrgError), 403, "cross-org",
              "the request would write to or reference another org"),
    ErrorRule(_is(UnknownUserError), 403, "not-a-member", "the user is not a member of this org"),
    # Another org's row is invisible, so it is indistinguishable from a missing one.
    ErrorRule(_is(peewee.DoesNotExist), 404, "not-found", "no such resource"),
    ErrorRule(_sqlstate("23505"), 409, "conflict", "a resource with these values exists"),
    ErrorRule(_sqlstate("23503"), 404, "not-found", "the request refers to a missing resource"),
    ErrorRule(_is(UnscopedQueryError, ClaimInTransactionError), 500, "server-error",
              "the server could not process the request"),
    ErrorRule(_database_unavailable, 503, "database-unavailable",
              "the database is unavailable; retry shortly", (("retry-after", "5"),)),
)


def error_response(exc: BaseException) -> HTTPResponse | None:
    """The problem response for ``exc`` by :data:`ERROR_STATUS`, or ``None`` (not ours)."""
    for rule in ERROR_STATUS:
        if rule.matches(exc):
            return problem(rule.status, None, rule.detail, kind=rule.kind, headers=rule.headers)
    return None


# PRIVATE HELPERS


class _RetryableResponse(Exception):  # noqa: N818 - a signal carrying the 5xx response
    def __init__(self, response: HTTPResponse) -> None:
        super().__init__(response.status)
        self.response = response


def _envelope(response: HTTPResponse) -> dict[str, Any]:
    headers = [[k, v] for k, v in response.headers if k.lower() not in HOP_BY_HOP]
    return {"v": _ENVELOPE, "headers": headers,
            "body": base64.b64encode(response.body).decode("ascii")}


def _unescape_sf_string(inner: str) -> str:
    out: list[str] = []
    chars = iter(inner)
    for char in chars:
        if char == "\\":
            escaped = next(chars, "")
            if escaped not in ('"', "\\"):
                raise IdempotencyKeyError(f"{IDEMPOTENCY_KEY_HEADER}: only \\\" and \\\\ may "
                                          "be escaped in a structured-field string")
            out.append(escaped)
        elif char == '"' or not " " <= char <= "~":
            raise IdempotencyKeyError(f"{IDEMPOTENCY_KEY_HEADER} must be printable ASCII in "
                                      'one quoted string, e.g. "8e03978e-..."')
        else:
            out.append(char)
    return "".join(out)


def _sf_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
