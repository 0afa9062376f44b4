"""The FastAPI / Starlette adapter over :mod:`tenantdb.web` (``pip install "tenantdb[fastapi]"``).

::

    from tenantdb.fastapi import (header_resolver, idempotency, install, rate_limit,
                                  request_scope, run_db)

    scope = request_scope(header_resolver("X-Org-Id", "X-User-Id"))
    agent_limit = rate_limit("agent", scope)
    idempotent = idempotency(scope, required=True)
    install(app)                       # problem+json handlers for tenancy/database errors

    @app.post("/trips", status_code=201)
    async def create_trip(body: TripIn, idem: IdempotentRequest = Depends(idempotent)):
        return await idem.arespond(lambda: new_trip(idem.scope, body), status_code=201)

Dependencies are small async callables; the database work runs on worker threads through
:func:`run_db`, so ``async def`` endpoints never block the event loop.
"""

from __future__ import annotations

import functools
import inspect
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio.to_thread
import peewee
from playhouse.pool import MaxConnectionsExceeded
from starlette.requests import Request
from starlette.responses import Response

from . import ratelimit, web
from .context import require_org
from .db import database
from .errors import ClaimInTransactionError, TenancyError, TenantDBError, UnknownUserError
from .fingerprint import MAX_JSON_BYTES, Fingerprint
from .models import User
from .validation import parse_uuid

__all__ = [
    "IdempotentRequest",
    "ProblemError",
    "RequestScope",
    "ScopeResolver",
    "header_resolver",
    "idempotency",
    "install",
    "rate_limit",
    "request_scope",
    "run_db",
    "to_response",
]

_T = TypeVar("_T")
log = logging.getLogger(__name__)
#: What an app's resolver returns: the raw org and user of a request (any form
#: ``require_org``/``parse_uuid`` accept), from headers, a token claim, a session ...
ScopeResolver = Callable[[Request], "tuple[object, object] | Awaitable[tuple[object, object]]"]
# Headers the rate-limit dependencies computed for this request, added to every response.
_STATE_HEADERS = "tenantdb_headers"


class ProblemError(Exception):
    """Raised by the dependencies to send a :class:`tenantdb.web.HTTPResponse` as it is
    (rendered by the handler :func:`install` registers)."""

    def __init__(self, response: web.HTTPResponse) -> None:
        super().__init__(response.status)
        self.response = response


@dataclass(frozen=True)
class RequestScope:
    """Who is asking: the org and the user (a checked member of the org)."""

    org_id: uuid.UUID
    user_id: uuid.UUID


# THE ASYNC DATABASE PATH


async def run_db(func: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
    """Run synchronous database work on a worker thread; the event loop keeps serving.

    The worker runs in a copy of the caller's context (anyio copies ``contextvars``), so the
    test plugin's admission carries over; a ``cross_org`` block does not (it holds only in
    the frames that entered it: enter it inside ``func``). A connection is held only while
    a statement or a transaction needs it.
    """
    # Statements borrow a pooled connection and return it themselves (a transaction keeps
    # one until it ends), so the worker thread holds nothing once the work is done.
    return await anyio.to_thread.run_sync(functools.partial(func, *args, **kwargs))


# REQUEST SCOPE


def header_resolver(org_header: str = "X-Org-Id",
                    user_header: str = "X-User-Id") -> ScopeResolver:
    """A resolver reading the org and the user from two request headers."""
    def resolve(request: Request) -> tuple[object, object]:
        return request.headers.get(org_header), request.headers.get(user_header)
    return resolve


def request_scope(resolver: ScopeResolver) -> Callable[[Request], Awaitable[RequestScope]]:
    """A dependency giving the request's :class:`RequestScope`.

    ``resolver`` names the org and the user; the user's membership (an active user of that
    org) is checked in one query. Create it once per app and reuse it: FastAPI then
    resolves it once per request, however many dependencies need it.

    Responses: no or invalid org → 400 (``MissingOrgError``); no or invalid user → 400;
    not an active member of the org → 403.
    """
    async def scope_dependency(request: Request) -> RequestScope:
        raw = resolver(request)
        org_raw, user_raw = await raw if inspect.isawaitable(raw) else raw
        org = require_org(org_raw, "the request")
        user = parse_uuid(user_raw)
        if user is None:
            raise ProblemError(web.problem(400, "Missing user", "the request names no user, "
                                           "or not a valid user id", kind="missing-user"))
        if not await run_db(_is_member, org, user):
            raise ProblemError(web.problem(403, None, "the user is not a member of this org",
                                           kind="not-a-member"))
        return RequestScope(org, user)
    return scope_dependency


def _is_member(org: uuid.UUID, user: uuid.UUID) -> bool:
    query = User.select(User.id, org_id=org).where(User.id == user, User.is_active)
    return bool(query.exists())


# RATE LIMITS


def rate_limit(
    bucket: str, scope: Callable[..., Awaitable[RequestScope]]
) -> Callable[..., Awaitable[ratelimit.RateLimitResult]]:
    """A dependency taking one token from the user's ``bucket`` (without blocking the loop).

    Over quota: 429 with ``Retry-After``; Redis down and the bucket fails closed: 503 with
    ``Retry-After``; fails open: allowed, marked ``RateLimit-Degraded: fail-open``. Every
    response of the request (errors too) carries ``RateLimit-Policy`` / ``RateLimit``.
    """
    from fastapi import Depends

    ratelimit.bucket_spec(bucket)  # an unknown bucket fails where the route is declared

    async def rate_limit_dependency(
        request: Request, response: Response, who: RequestScope = Depends(scope)
    ) -> ratelimit.RateLimitResult:
        result = await _check_rate_limit(who, bucket)
        decision = web.rate_decision(result)
        refusal = web.rate_limit_refusal(decision)
        if refusal is not None:
            raise ProblemError(refusal)
        headers = web.rate_limit_headers(decision)
        for name, value in headers:
            response.headers.append(name, value)
        _state_headers(request).extend(headers)
        return result
    return rate_limit_dependency


def _state_headers(request: Request) -> list[tuple[str, str]]:
    headers: list[tuple[str, str]] | None = getattr(request.state, _STATE_HEADERS, None)
    if headers is None:
        headers = []
        setattr(request.state, _STATE_HEADERS, headers)
    return headers


async def _check_rate_limit(who: RequestScope, bucket: str) -> ratelimit.RateLimitResult:
    # The awaitable check: the same script, key and single round trip on an async client.
    return await ratelimit.acheck_rate_limit(who.user_id, bucket, org_id=who.org_id)


# IDEMPOTENCY


class IdempotentRequest:
    """What :func:`idempotency` gives a handler: the key (``None`` when optional and
    absent), the request's scope and fingerprint, and :meth:`respond`."""

    def __init__(self, key: str | None, scope: RequestScope, request: Request,
                 fingerprint: Fingerprint) -> None:
        self.key = key
        self.scope = scope
        self.fingerprint = fingerprint
        self._request = request

    def respond(self, handler: Callable[[], Any], *, status_code: int = 200) -> Response:
        """Run ``handler`` once per key, in the transaction that stores its response.

        ``handler`` returns a Starlette ``Response``, a :class:`tenantdb.web.HTTPResponse`
        or a JSON-able value (sent with ``status_code``). Synchronous: call it from a
        ``def`` endpoint, or use :meth:`arespond`.
        """
        def render() -> web.HTTPResponse:
            return _to_http(handler(), status_code)

        if self.key is None:
            http = web.run_in_transaction(render, database.atomic)
        else:
            http = web.run_idempotent(
                self.key, org_id=self.scope.org_id, user_id=self.scope.user_id,
                request=self.fingerprint, handler=render, atomic=database.atomic)
        return to_response(http, self._request)

    async def arespond(self, handler: Callable[[], Any], *, status_code: int = 200) -> Response:
        """:meth:`respond` on a worker thread (for ``async def`` endpoints)."""
        return await run_db(self.respond, handler, status_code=status_code)


def idempotency(
    scope: Callable[..., Awaitable[RequestScope]],
    *,
    required: bool = True,
    include_headers: Iterable[str] = (),
) -> Callable[..., Awaitable[IdempotentRequest]]:
    """A dependency reading ``Idempotency-Key`` and fingerprinting the request.

    :param required: a missing key is a 400 (else the handler runs without one).
    :param include_headers: headers that count in the fingerprint besides method, path
        and body (e.g. ``("Content-Type",)``).

    Responses: malformed (or missing, where required) key → 400; a body over the JSON
    limits → 413 / 400.
    """
    from fastapi import Depends

    names = tuple(include_headers)

    async def idempotency_dependency(
        request: Request, who: RequestScope = Depends(scope)
    ) -> IdempotentRequest:
        try:
            key = web.parse_idempotency_key(request.headers.get(web.IDEMPOTENCY_KEY_HEADER),
                                            required=required)
        except web.IdempotencyKeyError as exc:
            raise ProblemError(exc.response) from None
        body = await request.body()
        if len(body) > MAX_JSON_BYTES:
            raise ProblemError(web.problem(413, None, f"the body is over {MAX_JSON_BYTES} "
                                           "bytes", kind="body-too-large"))
        try:
            print_ = web.request_fingerprint(request.method, request.url.path, body,
                                             request.headers.items(), names)
        except ValueError as exc:
            raise ProblemError(web.problem(400, "Invalid body", str(exc),
                                           kind="invalid-body")) from None
        return IdempotentRequest(key, who, request, print_)
    return idempotency_dependency


# RESPONSES AND HANDLERS


def to_response(http: web.HTTPResponse, request: Request | None = None) -> Response:
    """A Starlette ``Response`` from a :class:`tenantdb.web.HTTPResponse` (plus the rate
    limit headers computed for ``request``)."""
    response = Response(content=http.body, status_code=http.status)
    for name, value in http.headers:
        response.headers.append(name, value)
    if request is not None:
        for name, value in getattr(request.state, _STATE_HEADERS, None) or ():
            response.headers.append(name, value)
    return response


def install(app: Any) -> None:
    """Register the exception handlers: :class:`ProblemError` as it is, and the errors of
    :data:`tenantdb.web.ERROR_STATUS` (tenancy, not found, conflicts, database
    unavailable) as problem details."""
    app.add_exception_handler(ProblemError, _error_handler)
    for error in _HANDLED:
        app.add_exception_handler(error, _error_handler)


# The classes whose errors ERROR_STATUS maps (a handler per class: Starlette re-raises
# whatever reaches its catch-all handler for Exception).
_HANDLED: tuple[type[Exception], ...] = (
    TenantDBError, TenancyError, UnknownUserError, ClaimInTransactionError, peewee.DoesNotExist,
    peewee.DatabaseError, peewee.InterfaceError, MaxConnectionsExceeded,
)


async def _error_handler(request: Request, exc: Exception) -> Response:
    if isinstance(exc, ProblemError):
        return to_response(exc.response, request)
    http = web.error_response(exc)
    if http is None or http.status >= 500:
        # The client gets a generic problem; the operator gets the traceback.
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    if http is None:
        http = web.problem(500, None, "the server could not process the request",
                           kind="server-error")
    return to_response(http, request)


def _to_http(value: Any, status_code: int) -> web.HTTPResponse:
    if isinstance(value, web.HTTPResponse):
        return value
    if isinstance(value, Response):
        headers = tuple((k.decode("latin-1"), v.decode("latin-1"))
                        for k, v in value.raw_headers if k.lower() != b"content-length")
        return web.HTTPResponse(value.status_code, headers, bytes(value.body))
    from fastapi.encoders import jsonable_encoder

    return web.json_response(status_code, jsonable_encoder(value))
