"""Per-user rate limits on Redis: a token bucket decided in one round trip, built on limits.

:func:`check_rate_limit` takes one token from a user's bucket. The default buckets are
``agent`` (5 a minute, fails closed) and ``crud`` (60 a minute, fails open); their limits
come from :class:`~tenantdb.settings.Settings`. A bucket is a token bucket (GCRA): it holds
``limit`` tokens and refills them continuously over ``period_s`` seconds, so "5 a minute"
is a burst of 5, then one more every 12 s.

The token bucket is :class:`TokenBucketRateLimiter`, a :class:`limits.strategies.RateLimiter`
that runs on any ``limits`` Redis storage (``redis://``, ``redis+unix://``,
``redis+cluster://``, ``redis+sentinel://``). A :class:`BucketSpec` may name one of
``limits``' own strategies instead (``"moving-window"`` …), at the price of a second round
trip and the application's clock.

When Redis is down or hung a check returns within ``redis_socket_timeout_s``, in the
bucket's failure mode, with ``degraded=True``; it never raises a Redis error.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import re
import threading
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any
from uuid import UUID

import redis
from limits import RateLimitItem, RateLimitItemPerSecond
from limits.errors import ConfigurationError as LimitsConfigurationError
from limits.storage import RedisStorage, StorageTypes, storage_from_string
from limits.strategies import STRATEGIES, RateLimiter
from limits.util import WindowStats
from redis.backoff import NoBackoff
from redis.retry import Retry

from .errors import ConfigurationError
from .settings import Settings, get_settings

__all__ = [
    "TOKEN_BUCKET",
    "BucketSpec",
    "RateLimitResult",
    "TokenBucketRateLimiter",
    "TokenBucketState",
    "bucket_spec",
    "check_rate_limit",
    "reset_rate_limit",
]

logger = logging.getLogger(__name__)

#: Strategy name of :class:`TokenBucketRateLimiter`; the others are ``limits``' own.
TOKEN_BUCKET = "token-bucket"

# Keys are "<prefix>:rl:{<user_id>}:<bucket>"; the braces are a Redis Cluster hash tag,
# so all of one user's buckets live in one slot.
KEY_NAMESPACE = "rl"
_BUCKET_NAME = re.compile(r"[A-Za-z0-9_.-]+")

# Declared failure modes: CRUD keeps the app usable through an outage, while agent runs
# are expensive enough that an unmetered burst costs more than a refusal.
_FAIL_OPEN = {"agent": False, "crud": True}

# Errors that mean "Redis is unreachable or misbehaving"; cluster discovery failures
# are not RedisError subclasses.
_REDIS_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException)

_MICROSECONDS = 1_000_000
_WARN_EVERY_S = 10.0


def _read_lua(name: str) -> str:
    return resources.files("tenantdb").joinpath("lua", name).read_text(encoding="utf-8")


# PUBLIC TYPES


@dataclass(frozen=True)
class RateLimitResult:
    """The outcome of one :func:`check_rate_limit`.

    :param allowed: the call may go ahead.
    :param limit: tokens in a full bucket.
    :param remaining: tokens left after this call; ``None`` when degraded.
    :param retry_after_seconds: whole seconds until a denied call would be allowed
        (rounded up); ``None`` when allowed, when it can never be, or when degraded.
    :param degraded: Redis could not be asked; ``allowed`` is the bucket's failure mode.
    """

    allowed: bool
    limit: int
    remaining: int | None
    retry_after_seconds: int | None
    degraded: bool = False


@dataclass(frozen=True)
class BucketSpec:
    """A named limit: how many calls per period, by which strategy, and how it fails.

    :param name: the bucket's name, part of its Redis key (letters, digits, ``_.-``).
    :param limit: calls allowed per period; for a token bucket also the burst.
    :param period_s: seconds in which a token bucket refills completely (or the window).
    :param strategy: ``"token-bucket"``, or one of ``limits``' strategies
        (``"fixed-window"``, ``"moving-window"``, ``"sliding-window-counter"``).
    :param fail_open: allow calls (``True``) or deny them (``False``) when Redis is down.
    :raises ValueError: a bad name, a non-positive limit or period, an unknown strategy.
    """

    name: str
    limit: int
    period_s: int = 60
    strategy: str = TOKEN_BUCKET
    fail_open: bool = False

    def __post_init__(self) -> None:
        if not _BUCKET_NAME.fullmatch(self.name):
            raise ValueError(f"bucket name {self.name!r}: use letters, digits, '_', '.', '-'")
        if self.limit < 1 or self.period_s < 1:
            raise ValueError(
                f"bucket {self.name!r}: limit ({self.limit}) and period_s ({self.period_s})"
                " must be positive"
            )
        if self.strategy != TOKEN_BUCKET and self.strategy not in STRATEGIES:
            known = ", ".join([TOKEN_BUCKET, *STRATEGIES])
            raise ValueError(
                f"bucket {self.name!r}: unknown strategy {self.strategy!r}: use {known}"
            )

    def item(self) -> RateLimitItem:
        """The ``limits`` item for this spec; its namespace keeps strategies' keys apart."""
        return RateLimitItemPerSecond(self.limit, self.period_s, namespace=self.strategy)


@dataclass(frozen=True)
class TokenBucketState:
    """What the token bucket script decided, all from one round trip.

    :param allowed: the tokens were (or, for a test, could be) taken.
    :param remaining: tokens left in the bucket.
    :param retry_after: seconds until the request would be allowed; ``0.0`` when allowed,
        ``None`` when it never can be (cost above capacity).
    :param full_at: Redis time (epoch seconds) at which the bucket is full again.
    """

    allowed: bool
    remaining: int
    retry_after: float | None
    full_at: float


# THE TOKEN BUCKET STRATEGY


class TokenBucketRateLimiter(RateLimiter):
    """A token bucket (GCRA) for ``limits``' Redis storages, decided by one Lua call.

    A bucket holds ``item.amount`` tokens and refills them evenly over
    ``item.get_expiry()`` seconds, timed by Redis ``TIME``. Its key is the storage prefix
    plus the identifiers joined by ``:``, so callers choose the Redis Cluster hash tag;
    the key expires once the bucket is full again.

    :param storage: a ``limits`` Redis storage (plain, unix socket, cluster or sentinel).
    :raises ConfigurationError: the storage is not a Redis storage.
    """

    SCRIPT = _read_lua("token_bucket.lua")

    def __init__(self, storage: StorageTypes) -> None:
        if not isinstance(storage, RedisStorage):
            raise ConfigurationError(
                f"the token bucket needs a Redis storage, not {type(storage).__name__}: "
                "use a redis://, redis+unix://, redis+cluster:// or redis+sentinel:// URL"
            )
        super().__init__(storage)
        self._redis_storage = storage
        self._client: Any = storage.get_connection()
        self._sha = hashlib.sha1(self.SCRIPT.encode()).hexdigest()

    def acquire(self, item: RateLimitItem, *identifiers: str, cost: int = 1) -> TokenBucketState:
        """Take ``cost`` tokens if all are there; a denied call takes nothing.

        :param item: capacity (``amount``) and refill period (``get_expiry()``).
        :param identifiers: joined by ``:`` into the key.
        :param cost: tokens to take.
        :raises ValueError: ``cost`` is negative.
        """
        return self._run(item, identifiers, cost, consume=True)

    def hit(self, item: RateLimitItem, *identifiers: str, cost: int = 1) -> bool:
        """Take ``cost`` tokens; see :meth:`acquire`."""
        return self.acquire(item, *identifiers, cost=cost).allowed

    def test(self, item: RateLimitItem, *identifiers: str, cost: int = 1) -> bool:
        """Whether ``cost`` tokens could be taken now, without taking them."""
        return self._run(item, identifiers, cost, consume=False).allowed

    def get_window_stats(self, item: RateLimitItem, *identifiers: str) -> WindowStats:
        """The time the bucket is full again (Redis clock) and the tokens left now."""
        state = self._run(item, identifiers, 0, consume=False)
        return WindowStats(state.full_at, state.remaining)

    def clear(self, item: RateLimitItem, *identifiers: str) -> None:
        """Refill the bucket by deleting its key."""
        self._redis_storage.clear(self.key_for(*identifiers))

    def key_for(self, *identifiers: str) -> str:
        """The bucket's key before the storage prefix: the identifiers joined by ``:``."""
        return ":".join(identifiers)

    def _run(
        self, item: RateLimitItem, identifiers: tuple[str, ...], cost: int, *, consume: bool
    ) -> TokenBucketState:
        if cost < 0:
            raise ValueError(f"cost must be zero or more, not {cost}")
        key = self._redis_storage.prefixed_key(self.key_for(*identifiers))
        reply = self._evalsha(key, item.amount, item.get_expiry() * _MICROSECONDS, cost,
                              int(consume))
        allowed, remaining, wait_us, tat_us = (int(field) for field in reply.split())
        return TokenBucketState(
            allowed=bool(allowed),
            remaining=remaining,
            retry_after=None if wait_us < 0 else wait_us / _MICROSECONDS,
            full_at=tat_us / _MICROSECONDS,
        )


    def _evalsha(self, key: str, *args: int) -> Any:
        # EVALSHA, loading the script on NOSCRIPT (a restarted server, a new cluster node).
        # Written out rather than redis-py's Script object, whose call re-imports and
        # re-packs its arguments each time: 5-6 us of a ~100 us check, measured.
        try:
            reply = self._client.evalsha(self._sha, 1, key, *args)
        except redis.exceptions.NoScriptError:
            self._sha = self._client.script_load(self.SCRIPT)
            reply = self._client.evalsha(self._sha, 1, key, *args)
        return reply


# PUBLIC API


def bucket_spec(name: str) -> BucketSpec:
    """The configured spec of a default bucket (``agent`` or ``crud``).

    :param name: the bucket.
    :raises ValueError: the bucket is unknown, or its configured limit is not positive.
    """
    limits_by_name = _configured_limits(get_settings())
    if name not in limits_by_name:
        known = ", ".join(repr(n) for n in limits_by_name)
        raise ValueError(f"unknown rate-limit bucket {name!r}: use {known}, or pass a BucketSpec")
    return _default_spec(name, limits_by_name[name])


def check_rate_limit(
    user_id: str | int | UUID,
    bucket: str | BucketSpec,
    limit_per_minute: int | None = None,
) -> RateLimitResult:
    """Take one token from ``user_id``'s ``bucket``: one Redis round trip for a token bucket.

    :param user_id: whose bucket; becomes the key's hash tag.
    :param bucket: a default bucket's name (``agent``, ``crud``) or a :class:`BucketSpec`.
    :param limit_per_minute: overrides the limit, with a 60 s period.
    :returns: the decision; if Redis is down or hung (no answer within
        ``redis_socket_timeout_s``) the bucket's failure mode, with ``degraded=True``.
    :raises ValueError: an unknown bucket, a non-positive limit or a bad user id
        (checked before any Redis call).
    :raises ConfigurationError: no Redis URL is configured, or ``limits`` rejects it.
    """
    spec = _resolve(bucket, limit_per_minute)
    identifiers = _identifiers(user_id, spec)
    backend = _backend_for(get_settings())
    try:
        return backend.decide(spec, identifiers)
    except _REDIS_ERRORS as exc:
        return backend.degrade(spec, exc)


def reset_rate_limit(user_id: str | int | UUID, bucket: str | BucketSpec) -> bool:
    """Refill ``user_id``'s ``bucket`` (delete its key).

    :param user_id: whose bucket.
    :param bucket: a default bucket's name or a :class:`BucketSpec`.
    :returns: ``False`` if Redis could not be reached (the failure is logged).
    :raises ValueError: an unknown bucket or a bad user id.
    :raises ConfigurationError: no Redis URL is configured, or ``limits`` rejects it.
    """
    spec = _resolve(bucket, None)
    identifiers = _identifiers(user_id, spec)
    backend = _backend_for(get_settings())
    try:
        backend.limiter(spec.strategy).clear(spec.item(), *identifiers)
    except _REDIS_ERRORS as exc:
        logger.warning("rate limit %s: reset failed, Redis unavailable: %r", spec.name, exc)
        return False
    return True


# PRIVATE HELPERS


def _configured_limits(settings: Settings) -> dict[str, int]:
    return {
        "agent": settings.rate_limit_agent_per_minute,
        "crud": settings.rate_limit_crud_per_minute,
    }


# Specs are immutable and checked on creation: build each default once per limit.
@functools.lru_cache(maxsize=64)
def _default_spec(name: str, limit: int) -> BucketSpec:
    return BucketSpec(name, limit, fail_open=_FAIL_OPEN[name])


def _resolve(bucket: str | BucketSpec, limit_per_minute: int | None) -> BucketSpec:
    spec = bucket if isinstance(bucket, BucketSpec) else bucket_spec(bucket)
    if limit_per_minute is None:
        return spec
    return dataclasses.replace(spec, limit=limit_per_minute, period_s=60)


def _identifiers(user_id: str | int | UUID, spec: BucketSpec) -> tuple[str, str, str]:
    user = str(user_id)
    # A brace inside the id would move the hash tag and split a user across slots.
    if not user or "{" in user or "}" in user:
        raise ValueError(f"user_id {user_id!r}: must be non-empty, without '{{' or '}}'")
    return (KEY_NAMESPACE, f"{{{user}}}", spec.name)


def _storage_options(url: str, prefix: str, timeout: float) -> dict[str, Any]:
    # redis.Redis() and RedisCluster retry 3 times with up to 10 s of backoff by default:
    # a hung Redis would hold the caller far past the timeout. One attempt, then the
    # bucket's failure mode.
    options: dict[str, Any] = {
        "key_prefix": prefix,
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    if "sentinel" in url.partition("://")[0]:
        options["sentinel_kwargs"] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    return options


class _Backend:
    """One ``limits`` storage and its limiters for one (URL, key prefix, timeout)."""

    def __init__(self, url: str, prefix: str, timeout: float) -> None:
        self._args = (url, prefix, timeout)
        self._storage: StorageTypes | None = None
        self._limiters: dict[str, RateLimiter] = {}
        self._lock = threading.Lock()
        # An outage logs one warning per interval, not one per request.
        self._warned_at = -math.inf
        self._quiet_failures = 0

    def limiter(self, strategy: str) -> RateLimiter:
        limiter = self._limiters.get(strategy)
        if limiter is None:
            storage = self._build_storage() if self._storage is None else self._storage
            # Two threads may both build one; setdefault keeps a single winner.
            limiter = self._limiters.setdefault(strategy, _make_limiter(strategy, storage))
        return limiter

    def decide(self, spec: BucketSpec, identifiers: tuple[str, ...]) -> RateLimitResult:
        limiter = self.limiter(spec.strategy)
        if isinstance(limiter, TokenBucketRateLimiter):
            return _from_state(spec, limiter.acquire(spec.item(), *identifiers))
        return _from_window(spec, limiter, identifiers)

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
        return RateLimitResult(spec.fail_open, spec.limit, None, None, degraded=True)

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

    def _build_storage(self) -> StorageTypes:
        # Built on first use, not in __init__: a cluster client connects while it is
        # built, and that failure must take the failure mode like any other. Built
        # outside the lock, so concurrent callers each wait one timeout, not one per
        # caller ahead of them.
        url, prefix, timeout = self._args
        try:
            storage = storage_from_string(url, **_storage_options(url, prefix, timeout))
        except LimitsConfigurationError as exc:
            message = f"rate limits cannot use Redis URL {url!r}: {exc}"
            raise ConfigurationError(message) from exc
        with self._lock:
            if self._storage is None:
                self._storage = storage
            return self._storage


def _make_limiter(strategy: str, storage: StorageTypes) -> RateLimiter:
    if strategy == TOKEN_BUCKET:
        return TokenBucketRateLimiter(storage)
    return STRATEGIES[strategy](storage)


def _from_state(spec: BucketSpec, state: TokenBucketState) -> RateLimitResult:
    retry = None if state.allowed or state.retry_after is None else math.ceil(state.retry_after)
    return RateLimitResult(state.allowed, spec.limit, state.remaining, retry)


def _from_window(
    spec: BucketSpec, limiter: RateLimiter, identifiers: tuple[str, ...]
) -> RateLimitResult:
    # limits' own strategies: hit, then a separate stats read (not atomic with the hit),
    # and a reset time from the application's clock.
    allowed = limiter.hit(spec.item(), *identifiers)
    stats = limiter.get_window_stats(spec.item(), *identifiers)
    retry = None if allowed else max(1, math.ceil(stats.reset_time - time.time()))
    return RateLimitResult(allowed, spec.limit, max(0, stats.remaining), retry)


def _backend_key(settings: Settings) -> tuple[str, str, float]:
    if not settings.redis_url:
        raise ConfigurationError(
            "rate limits need Redis: set TENANTDB_REDIS_URL (or REDIS_URL), "
            "e.g. redis://localhost:6379/0"
        )
    return (settings.redis_url, settings.redis_key_prefix, settings.redis_socket_timeout_s)


def _backend_for(settings: Settings) -> _Backend:
    return _backend(*_backend_key(settings))


# Bounded: a test suite with a fresh key prefix per test must not keep every client.
@functools.lru_cache(maxsize=16)
def _backend(url: str, prefix: str, timeout: float) -> _Backend:
    return _Backend(url, prefix, timeout)
