"""Per-user rate limits within an org, on Redis: a token bucket decided in one round trip.

:func:`check_rate_limit` takes one token from a user's bucket; :func:`acheck_rate_limit`
is the same check for ``async`` code, awaited on redis-py's asyncio client so the event
loop never blocks. The default buckets are ``agent`` (5 a minute, fails closed) and
``crud`` (60 a minute, fails open); their limits come from
:class:`~tenantdb.settings.Settings`. A token bucket (GCRA) holds ``limit`` tokens and
refills them continuously over ``period_s`` seconds: "5 a minute" is a burst of 5, then one
more every 12 s.

A user id is unique only within its org, so a bucket is keyed by org, user, bucket name and
the limit itself, as ``limits`` keys its items::

    <prefix>:rl:<strategy>/{<org_id>:<user_id>}/<bucket>/<amount>/<multiples>/<granularity>

The braces are a Redis Cluster hash tag: one user's buckets share a slot.

The algorithm is :class:`~tenantdb.ratelimit_strategy.TokenBucketRateLimiter`, a ``limits``
strategy on any ``limits`` Redis storage (``redis://``, ``redis+unix://``,
``redis+cluster://``, ``redis+sentinel://``). A :class:`BucketSpec` may name one of
``limits``' own strategies instead (``"moving-window"`` ...), at the price of a second round
trip and the application's clock.

The script goes out as one pre-packed EVALSHA on connections kept for it
(:mod:`tenantdb.ratelimit_transport`): redis-py's generic command path cost more than the
round trip.

When Redis is down or hung a check returns within ``redis_socket_timeout_s`` in the bucket's
failure mode, marked ``reason=REDIS_UNAVAILABLE`` (``degraded``); it never raises a Redis
error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import functools
import logging
import math
import re
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from uuid import UUID

import redis
import redis.asyncio.retry
from limits import (
    RateLimitItem,
    RateLimitItemPerDay,
    RateLimitItemPerHour,
    RateLimitItemPerMinute,
    RateLimitItemPerSecond,
)
from limits.aio.strategies import STRATEGIES as ASYNC_STRATEGIES
from limits.errors import ConfigurationError as LimitsConfigurationError
from limits.storage import storage_from_string
from limits.strategies import STRATEGIES
from limits.util import WindowStats
from redis.backoff import NoBackoff
from redis.retry import Retry

from .context import OrgLike, require_org
from .errors import ConfigurationError
from .ratelimit_strategy import (
    TOKEN_BUCKET,
    AsyncTokenBucketRateLimiter,
    TokenBucketRateLimiter,
    TokenBucketState,
    script_args,
)
from .settings import Settings, get_settings
from .validation import check_int, check_uuid

__all__ = [
    "TOKEN_BUCKET",
    "BucketSpec",
    "RateLimitReason",
    "RateLimitResult",
    "TokenBucketRateLimiter",
    "TokenBucketState",
    "acheck_rate_limit",
    "aclose_rate_limits",
    "areset_rate_limit",
    "bucket_spec",
    "check_rate_limit",
    "reset_rate_limit",
]

logger = logging.getLogger(__name__)

#: First part of every rate-limit key after the prefix.
KEY_NAMESPACE = "rl"
_BUCKET_NAME = re.compile(r"[A-Za-z0-9_.-]+")
# A canonical UUID passes without being parsed: the common case costs one match.
_UUID_TEXT = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_CANONICAL_UUID = re.compile(_UUID_TEXT)
# Org and user both canonical: one match over the hash tag they make.
_CANONICAL_TAG = re.compile(rf"\{{{_UUID_TEXT}:{_UUID_TEXT}\}}")
# Tags that matched: a user's next check skips the pattern. Only canonical tags go in, and
# a canonical tag splits into org and user one way only (one ':' at a fixed place), so a
# hit vouches for both. Bounded: cleared when full.
_CHECKED_TAGS: dict[str, None] = {}
_MAX_CHECKED_TAGS = 4096

# The default buckets' limits per minute, by Settings field.
_LIMIT_SETTINGS = {"agent": "rate_limit_agent_per_minute", "crud": "rate_limit_crud_per_minute"}
# Declared failure modes: CRUD keeps the app usable through an outage, while agent runs
# are expensive enough that an unmetered burst costs more than a refusal.
_FAIL_OPEN = {"agent": False, "crud": True}

# Errors that mean "Redis is unreachable or misbehaving"; cluster discovery failures
# are not RedisError subclasses.
_REDIS_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException)

_WARN_EVERY_S = 10.0
_MICROSECONDS = 1_000_000
# Largest first: "5 per 60 s" is keyed 5/1/minute, as limits' own "5/minute" would be.
_GRANULARITIES: tuple[tuple[int, type[RateLimitItem]], ...] = (
    (86_400, RateLimitItemPerDay),
    (3_600, RateLimitItemPerHour),
    (60, RateLimitItemPerMinute),
    (1, RateLimitItemPerSecond),
)
# Stands for the org/user hash tag while a bucket's key template is built.
_TAG_MARK = "\x00"
_MAX_CLIENTS_PER_LOOP = 16
_MAX_PLANS = 256


# PUBLIC TYPES


class RateLimitReason(str, enum.Enum):
    """Why a check came out as it did; a ``str``, so it renders as its value."""

    #: Redis answered and the call fits in the bucket.
    WITHIN_LIMIT = "within_limit"
    #: Redis answered and the client is over its limit (HTTP 429).
    OVER_LIMIT = "over_limit"
    #: Redis could not be asked: ``allowed`` is the bucket's failure mode (a refusal is an
    #: outage, HTTP 503, not the client's fault).
    REDIS_UNAVAILABLE = "redis_unavailable"


class RateLimitResult(NamedTuple):
    """The outcome of one check; every field renders as a rate-limit header value.

    Immutable, a named tuple like ``limits``' ``WindowStats`` (cheaper to build than a
    frozen dataclass, on a path that costs microseconds); read it by field name.

    :param allowed: the call may go ahead.
    :param limit: tokens in a full bucket: the burst (IETF ``RateLimit-Policy`` ``q``).
    :param window_seconds: seconds in which an empty bucket refills (``RateLimit-Policy``
        ``w``).
    :param policy: the bucket's name (the policy item's name).
    :param remaining: whole tokens left after this call (``RateLimit`` ``r``); ``None``
        when degraded.
    :param reset_after_seconds: whole seconds, rounded up, until the bucket is full again
        (``RateLimit`` ``t``); ``None`` when degraded.
    :param retry_after_seconds: whole seconds, rounded up and at least 1, until a denied
        call would be allowed (``Retry-After``); ``None`` when allowed, when it never can
        be, or when degraded.
    :param reason: :class:`RateLimitReason`: within the limit, over it, or Redis
        unavailable (then ``allowed`` is the bucket's failure mode).
    """

    allowed: bool
    limit: int
    window_seconds: int
    policy: str
    remaining: int | None
    reset_after_seconds: int | None
    retry_after_seconds: int | None
    reason: RateLimitReason

    @property
    def degraded(self) -> bool:
        """Redis could not be asked: a fail-open pass or a fail-closed refusal."""
        return self.reason is RateLimitReason.REDIS_UNAVAILABLE


# Read once: an enum member's class attribute lookup costs a call on every check.
_WITHIN_LIMIT = RateLimitReason.WITHIN_LIMIT
_new_result = tuple.__new__


@dataclass(frozen=True)
class BucketSpec:
    """A named limit: how many calls per period, by which strategy, and how it fails.

    :param name: the bucket's name, part of its Redis key (letters, digits, ``_.-``).
    :param limit: calls allowed per period; for a token bucket also the burst.
    :param period_s: seconds in which a token bucket refills completely (or the window).
    :param strategy: ``"token-bucket"``, or one of ``limits``' strategies
        (``"fixed-window"``, ``"moving-window"``, ``"sliding-window-counter"``).
    :param fail_open: allow calls (``True``) or deny them (``False``) when Redis is down.
    :raises ValueError: a bad name, a limit or period that is not a positive integer, an
        unknown strategy, a token bucket too fine to refill exactly.
    """

    name: str
    limit: int
    period_s: int = 60
    strategy: str = TOKEN_BUCKET
    fail_open: bool = False
    _item: RateLimitItem = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _BUCKET_NAME.fullmatch(self.name):
            raise ValueError(f"bucket name {self.name!r}: use letters, digits, '_', '.', '-'")
        where = f"bucket {self.name!r}"
        object.__setattr__(self, "limit", check_int(self.limit, "limit", minimum=1, where=where))
        object.__setattr__(self, "period_s",
                           check_int(self.period_s, "period_s", minimum=1, where=where))
        if self.strategy != TOKEN_BUCKET and self.strategy not in STRATEGIES:
            known = ", ".join([TOKEN_BUCKET, *STRATEGIES])
            raise ValueError(
                f"bucket {self.name!r}: unknown strategy {self.strategy!r}: use {known}"
            )
        if self.strategy == TOKEN_BUCKET:
            script_args(self.limit, self.period_s, 1, True)  # raises if not exact
        object.__setattr__(self, "_item", _limit_item(self))

    def item(self) -> RateLimitItem:
        """The ``limits`` item; its namespace (``rl:<strategy>``) keeps strategies apart."""
        return self._item


# PUBLIC API


def bucket_spec(name: str) -> BucketSpec:
    """The configured spec of a default bucket (``agent`` or ``crud``).

    :raises ValueError: the bucket is unknown, or its configured limit is not positive.
    """
    setting = _LIMIT_SETTINGS.get(name) if isinstance(name, str) else None
    if setting is None:
        known = ", ".join(repr(n) for n in _LIMIT_SETTINGS)
        raise ValueError(f"unknown rate-limit bucket {name!r}: use {known}, or pass a BucketSpec")
    return _default_spec(name, getattr(get_settings(), setting))


def check_rate_limit(
    user_id: UUID | str,
    bucket: str | BucketSpec,
    limit_per_minute: int | None = None,
    *,
    org_id: OrgLike,
) -> RateLimitResult:
    """Take one token from the bucket of ``user_id`` in ``org_id``: one Redis round trip.

    Blocks the calling thread for the round trip (up to ``redis_socket_timeout_s``); in
    ``async`` code use :func:`acheck_rate_limit`.

    :param user_id: whose bucket: a UUID, or its text.
    :param bucket: a default bucket's name (``agent``, ``crud``) or a :class:`BucketSpec`.
    :param limit_per_minute: overrides the limit, with a 60 s period.
    :param org_id: the user's org: users of two orgs never share a bucket.
    :returns: the decision; if Redis is down or hung (no answer within
        ``redis_socket_timeout_s``) the bucket's failure mode, ``reason=REDIS_UNAVAILABLE``.
    :raises MissingOrgError: ``org_id`` is missing or not a UUID (before any Redis call).
    :raises ValueError: a bad user id, an unknown bucket, a non-positive limit (before any
        Redis call).
    :raises ConfigurationError: no Redis URL is configured, or ``limits`` rejects it.
    """
    spec, tag = _request(user_id, bucket, limit_per_minute, org_id, "check_rate_limit()")
    backend = _sync_backend(get_settings())
    try:
        return backend.decide(spec, tag)
    except _REDIS_ERRORS as exc:
        return backend.degrade(spec, exc)


async def acheck_rate_limit(
    user_id: UUID | str,
    bucket: str | BucketSpec,
    limit_per_minute: int | None = None,
    *,
    org_id: OrgLike,
) -> RateLimitResult:
    """:func:`check_rate_limit`, awaited: the event loop runs other tasks meanwhile.

    The same script, key and single round trip, on redis-py's asyncio client (one per
    event loop; :func:`aclose_rate_limits` closes them). Same arguments, result, errors and
    failure modes.
    """
    spec, tag = _request(user_id, bucket, limit_per_minute, org_id, "acheck_rate_limit()")
    backend = _async_backend(get_settings())
    try:
        return await backend.decide(spec, tag)
    except _REDIS_ERRORS as exc:
        return backend.degrade(spec, exc)


def reset_rate_limit(
    user_id: UUID | str,
    bucket: str | BucketSpec,
    *,
    org_id: OrgLike,
    limit_per_minute: int | None = None,
) -> bool:
    """Refill the bucket of ``user_id`` in ``org_id`` (delete its key).

    :param limit_per_minute: the override the checks used: a bucket's key names its limit.
    :returns: ``False`` if Redis could not be reached (the failure is logged).
    :raises MissingOrgError: ``org_id`` is missing or not a UUID.
    :raises ValueError: a bad user id or an unknown bucket.
    :raises ConfigurationError: no Redis URL is configured, or ``limits`` rejects it.
    """
    spec, tag = _request(user_id, bucket, limit_per_minute, org_id, "reset_rate_limit()")
    backend = _sync_backend(get_settings())
    try:
        backend.reset(spec, tag)
    except _REDIS_ERRORS as exc:
        return _reset_failed(spec, exc)
    return True


async def areset_rate_limit(
    user_id: UUID | str,
    bucket: str | BucketSpec,
    *,
    org_id: OrgLike,
    limit_per_minute: int | None = None,
) -> bool:
    """:func:`reset_rate_limit`, awaited on redis-py's asyncio client."""
    spec, tag = _request(user_id, bucket, limit_per_minute, org_id, "areset_rate_limit()")
    backend = _async_backend(get_settings())
    try:
        await backend.reset(spec, tag)
    except _REDIS_ERRORS as exc:
        return _reset_failed(spec, exc)
    return True


async def aclose_rate_limits() -> None:
    """Close the running event loop's Redis clients for rate limits (at shutdown)."""
    global _last_async
    _last_async = _NO_ASYNC  # a later check on this loop builds new clients
    for backend in _ASYNC_BACKENDS.pop(asyncio.get_running_loop(), {}).values():
        await backend.aclose()


# ARGUMENTS: checked before any Redis call, shared by the sync and async paths


def _request(
    user_id: object, bucket: str | BucketSpec, limit_per_minute: int | None,
    org_id: object, where: str,
) -> tuple[BucketSpec, str]:
    # The hash tag names org and user: a user id is unique only within its org.
    if type(org_id) is str and type(user_id) is str:
        tag = f"{{{org_id}:{user_id}}}"
        if tag in _CHECKED_TAGS:
            return _resolve(bucket, limit_per_minute), tag
        if _CANONICAL_TAG.fullmatch(tag):
            if len(_CHECKED_TAGS) >= _MAX_CHECKED_TAGS:
                _CHECKED_TAGS.clear()
            _CHECKED_TAGS[tag] = None
            return _resolve(bucket, limit_per_minute), tag
    tag = f"{{{_org_text(org_id, where)}:{_user_text(user_id, where)}}}"
    return _resolve(bucket, limit_per_minute), tag


def _org_text(org_id: object, where: str) -> str:
    if type(org_id) is str and _CANONICAL_UUID.fullmatch(org_id):
        return org_id
    return str(require_org(org_id, where))


def _user_text(user_id: object, where: str) -> str:
    if type(user_id) is str and _CANONICAL_UUID.fullmatch(user_id):
        return user_id
    # Every accepted spelling (upper case, braces, no dashes) keys one bucket.
    return str(check_uuid(user_id, "user_id", where=where))


# Specs are immutable and checked on creation: build each once per limit.
@functools.lru_cache(maxsize=64)
def _default_spec(name: str, limit: int) -> BucketSpec:
    return BucketSpec(name, limit, fail_open=_FAIL_OPEN[name])


@functools.lru_cache(maxsize=256)
def _with_limit(spec: BucketSpec, limit_per_minute: int) -> BucketSpec:
    return dataclasses.replace(spec, limit=limit_per_minute, period_s=60)


def _resolve(bucket: str | BucketSpec, limit_per_minute: int | None) -> BucketSpec:
    spec = bucket if isinstance(bucket, BucketSpec) else bucket_spec(bucket)
    if limit_per_minute is None:
        return spec
    limit = check_int(limit_per_minute, "limit_per_minute", minimum=1,
                      where=f"bucket {spec.name!r}")
    return _with_limit(spec, limit)


def _limit_item(spec: BucketSpec) -> RateLimitItem:
    namespace = f"{KEY_NAMESPACE}:{spec.strategy}"
    for seconds, item_type in _GRANULARITIES:
        if spec.period_s % seconds == 0:
            return item_type(spec.limit, spec.period_s // seconds, namespace=namespace)
    raise AssertionError("every period is a whole number of seconds")  # pragma: no cover


# RESULTS: pure, shared by the sync and async paths


def _bucket_result(spec: BucketSpec, reply: bytes) -> RateLimitResult:
    # The script's line: "<remaining> <us until full>", plus the wait on a refusal (see
    # ratelimit_strategy.reply_fields), read here without the 4-tuple: the hot path.
    fields = reply.split()
    # Whole seconds, rounded up: -(-a // b) is ceil in integers. A refusal waits >= 1 us.
    reset = -(-int(fields[1]) // _MICROSECONDS)
    if len(fields) == 2:
        # tuple.__new__ builds the named tuple without its generated __new__'s extra call.
        return _new_result(RateLimitResult, (True, spec.limit, spec.period_s, spec.name,
                                             int(fields[0]), reset, None, _WITHIN_LIMIT))
    wait_us = int(fields[2])
    retry = None if wait_us < 0 else -(-wait_us // _MICROSECONDS)
    return _result(spec, False, int(fields[0]), reset, retry)


def _window_result(spec: BucketSpec, allowed: bool, stats: WindowStats) -> RateLimitResult:
    # limits' own strategies: the stats come from a second read, on the application's clock.
    reset = max(0, math.ceil(stats.reset_time - time.time()))
    retry = None if allowed else max(1, reset)
    return _result(spec, allowed, max(0, stats.remaining), reset, retry)


def _result(
    spec: BucketSpec, allowed: bool, remaining: int, reset: int, retry: int | None
) -> RateLimitResult:
    return RateLimitResult(
        allowed=allowed, limit=spec.limit, window_seconds=spec.period_s, policy=spec.name,
        remaining=remaining, reset_after_seconds=reset, retry_after_seconds=retry,
        reason=RateLimitReason.WITHIN_LIMIT if allowed else RateLimitReason.OVER_LIMIT,
    )


def _degraded_result(spec: BucketSpec) -> RateLimitResult:
    return RateLimitResult(
        allowed=spec.fail_open, limit=spec.limit, window_seconds=spec.period_s,
        policy=spec.name, remaining=None, reset_after_seconds=None, retry_after_seconds=None,
        reason=RateLimitReason.REDIS_UNAVAILABLE,
    )


def _reset_failed(spec: BucketSpec, exc: Exception) -> bool:
    logger.warning("rate limit %s: reset failed, Redis unavailable: %r", spec.name, exc)
    return False


# BACKENDS: one limits storage, its limiters and key templates per (URL, prefix, timeout)


@dataclass(frozen=True)
class _Plan:
    """A bucket's key around its hash tag, and its script arguments (token bucket only)."""

    spec: BucketSpec
    limiter: Any
    head: str
    tail: str
    args: tuple[bytes, ...] | None

    def key(self, tag: str) -> str:
        return self.head + tag + self.tail


def _storage_options(url: str, prefix: str, timeout: float, retry: object) -> dict[str, Any]:
    # redis-py retries 3 times with up to 10 s of backoff by default: a hung Redis would
    # hold the caller far past the timeout. One attempt, then the bucket's failure mode.
    options: dict[str, Any] = {
        "key_prefix": prefix,
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": retry,
    }
    if "sentinel" in url.partition("://")[0]:
        options["sentinel_kwargs"] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    return options


def _new_storage(url: str, **options: Any) -> Any:
    try:
        return storage_from_string(url, **options)
    except LimitsConfigurationError as exc:
        message = f"rate limits cannot use Redis URL {url!r}: {exc}"
        raise ConfigurationError(message) from exc


class _Backend:
    """What the sync and async backends share: key templates and outage logging."""

    def __init__(self, url: str, prefix: str, timeout: float) -> None:
        self._args = (url, prefix, timeout)
        self._storage: Any = None
        self._limiters: dict[str, Any] = {}
        # By the spec's identity: hashing a spec's fields on every call costs more.
        self._plans: dict[int, _Plan] = {}
        self._lock = threading.Lock()
        # An outage logs one warning per interval, not one per request.
        self._warned_at = -math.inf
        self._quiet_failures = 0

    def degrade(self, spec: BucketSpec, exc: Exception) -> RateLimitResult:
        warn, quiet = self._warn_now()
        mode = "open" if spec.fail_open else "closed"
        if warn:
            logger.warning(
                "rate limit %s failing %s: Redis unavailable (%d quiet failures before): %r",
                spec.name, mode, quiet, exc,
            )
        else:
            logger.debug("rate limit %s failing %s: Redis unavailable: %r", spec.name, mode, exc)
        return _degraded_result(spec)

    def _plan(self, spec: BucketSpec) -> _Plan:
        plan = self._plans.get(id(spec))
        if plan is None or plan.spec is not spec:
            plan = self._new_plan(spec, self._limiter(spec.strategy))
        return plan

    def _new_plan(self, spec: BucketSpec, limiter: Any) -> _Plan:
        # The limiter's own key for (tag, name), cut at the tag: the key a call builds is
        # the one limits' API (clear, get_window_stats) uses.
        full = self._storage_key(spec.item().key_for(_TAG_MARK, spec.name))
        head, tail = full.split(_TAG_MARK)
        token_bucket = isinstance(limiter, TokenBucketRateLimiter | AsyncTokenBucketRateLimiter)
        args = script_args(spec.limit, spec.period_s, 1, True) if token_bucket else None
        if len(self._plans) >= _MAX_PLANS:  # specs built per call must not pile up
            self._plans.clear()
        plan = self._plans[id(spec)] = _Plan(spec, limiter, head, tail, args)
        return plan

    def _limiter(self, strategy: str) -> Any:
        raise NotImplementedError

    def _storage_key(self, key: str) -> str:
        return f"{self._args[1]}:{key}"

    def _keep_storage(self, storage: Any) -> Any:
        # Built outside the lock, so concurrent callers each wait one timeout, not one per
        # caller ahead of them; the first one built is kept.
        with self._lock:
            if self._storage is None:
                self._storage = storage
            return self._storage

    def _warn_now(self) -> tuple[bool, int]:
        # Whether this failure gets the interval's warning, and how many went to DEBUG
        # since the last one.
        now = time.monotonic()
        with self._lock:
            if now - self._warned_at < _WARN_EVERY_S:
                self._quiet_failures += 1
                return False, 0
            quiet, self._quiet_failures, self._warned_at = self._quiet_failures, 0, now
            return True, quiet


class _SyncBackend(_Backend):
    def decide(self, spec: BucketSpec, tag: str) -> RateLimitResult:
        plan = self._plan(spec)
        if plan.args is not None:
            return _bucket_result(spec, plan.limiter.evaluate(plan.key(tag), plan.args))
        allowed = plan.limiter.hit(spec.item(), tag, spec.name)
        stats = plan.limiter.get_window_stats(spec.item(), tag, spec.name)
        return _window_result(spec, allowed, stats)

    def reset(self, spec: BucketSpec, tag: str) -> None:
        self._limiter(spec.strategy).clear(spec.item(), tag, spec.name)

    def _limiter(self, strategy: str) -> Any:
        limiter = self._limiters.get(strategy)
        if limiter is None:
            # Built on first use, not in __init__: a cluster client connects while it is
            # built, and that failure must take the failure mode like any other.
            storage = self._storage or self._keep_storage(self._build())
            make = TokenBucketRateLimiter if strategy == TOKEN_BUCKET else STRATEGIES[strategy]
            # Two threads may both build one; setdefault keeps a single winner.
            limiter = self._limiters.setdefault(strategy, make(storage))
        return limiter

    def _build(self) -> Any:
        url, prefix, timeout = self._args
        return _new_storage(url, **_storage_options(url, prefix, timeout, Retry(NoBackoff(), 0)))


class _AsyncBackend(_Backend):
    async def decide(self, spec: BucketSpec, tag: str) -> RateLimitResult:
        plan = self._plan(spec)
        if plan.args is not None:
            return _bucket_result(spec, await plan.limiter.evaluate(plan.key(tag), plan.args))
        allowed = await plan.limiter.hit(spec.item(), tag, spec.name)
        stats = await plan.limiter.get_window_stats(spec.item(), tag, spec.name)
        return _window_result(spec, allowed, stats)

    async def reset(self, spec: BucketSpec, tag: str) -> None:
        await self._limiter(spec.strategy).clear(spec.item(), tag, spec.name)

    async def aclose(self) -> None:
        for limiter in self._limiters.values():
            if isinstance(limiter, AsyncTokenBucketRateLimiter):
                await limiter.aclose()  # its own idle connections, beside the pool's
        if self._storage is None:
            return
        bridge = self._storage.bridge
        # A sentinel's master client shares a pool it did not create, so it would leave
        # it open; the sentinels' own clients are closed too.
        sentinels = getattr(getattr(bridge, "sentinel", None), "sentinels", [])
        for client in (bridge.get_connection(), *sentinels):
            if isinstance(client, redis.asyncio.Redis):
                await client.aclose(close_connection_pool=True)
            else:
                await client.aclose()

    def _limiter(self, strategy: str) -> Any:
        limiter = self._limiters.get(strategy)
        if limiter is None:
            # redis.asyncio connects lazily, on the first command: building cannot hang.
            storage = self._storage or self._keep_storage(self._build())
            make: Any = (AsyncTokenBucketRateLimiter if strategy == TOKEN_BUCKET
                         else ASYNC_STRATEGIES[strategy])
            limiter = self._limiters.setdefault(strategy, make(storage))
        return limiter

    def _build(self) -> Any:
        url, prefix, timeout = self._args
        retry = redis.asyncio.retry.Retry(NoBackoff(), 0)
        options = _storage_options(url, prefix, timeout, retry)
        return _new_storage(f"async+{url}", implementation="redispy", **options)


def _backend_key(settings: Settings) -> tuple[str, str, float]:
    if not settings.redis_url:
        raise ConfigurationError(
            "rate limits need Redis: set TENANTDB_REDIS_URL (or REDIS_URL), "
            "e.g. redis://localhost:6379/0"
        )
    return (settings.redis_url, settings.redis_key_prefix, settings.redis_socket_timeout_s)


# The settings object seen last and its backend: the common case skips the cache lookup.
_last_sync: tuple[Settings | None, _SyncBackend | None] = (None, None)


def _sync_backend(settings: Settings) -> _SyncBackend:
    global _last_sync
    seen, backend = _last_sync
    if seen is not settings or backend is None:
        backend = _sync_backend_for(*_backend_key(settings))
        _last_sync = (settings, backend)
    return backend


# Bounded: a test suite with a fresh key prefix per test must not keep every client.
@functools.lru_cache(maxsize=16)
def _sync_backend_for(url: str, prefix: str, timeout: float) -> _SyncBackend:
    return _SyncBackend(url, prefix, timeout)


# asyncio clients belong to the loop they first ran on: one set per loop, dropped with it.
_ASYNC_BACKENDS: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[tuple[str, str, float], _AsyncBackend]
] = weakref.WeakKeyDictionary()


# The loop and settings seen last and their backend, as _last_sync. Weak references: a
# finished loop's clients must still go with the loop, not live on here.
_AsyncSeen = tuple[
    "weakref.ref[asyncio.AbstractEventLoop] | None", Settings | None,
    "weakref.ref[_AsyncBackend] | None",
]
_NO_ASYNC: _AsyncSeen = (None, None, None)
_last_async: _AsyncSeen = _NO_ASYNC


def _async_backend(settings: Settings) -> _AsyncBackend:
    global _last_async
    loop = asyncio.get_running_loop()
    seen_loop, seen, seen_backend = _last_async
    if seen is settings and seen_loop is not None and seen_loop() is loop:
        backend = seen_backend() if seen_backend is not None else None
        if backend is not None:
            return backend
    key = _backend_key(settings)
    backends = _ASYNC_BACKENDS.setdefault(loop, {})
    backend = backends.get(key)
    if backend is None:
        if len(backends) >= _MAX_CLIENTS_PER_LOOP:
            backends.pop(next(iter(backends)))
        backend = backends[key] = _AsyncBackend(*key)
    _last_async = (weakref.ref(loop), settings, weakref.ref(backend))
    return backend
