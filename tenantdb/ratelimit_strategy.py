"""The token bucket as a ``limits`` strategy: GCRA decided by one Lua call on Redis.

``limits`` splits strategies (the algorithm) from storages (where counts live); this module
is the strategy half for a token bucket, sync and async, on ``limits``' own Redis storages:

- :class:`TokenBucketRateLimiter` on ``limits.storage`` (``redis://``, ``redis+unix://``,
  ``redis+cluster://``, ``redis+sentinel://``);
- :class:`AsyncTokenBucketRateLimiter` on ``limits.aio.storage`` with
  ``implementation="redispy"`` (``async+redis://`` ...).

Both speak ``limits``' ``RateLimiter`` interface (``hit``, ``test``, ``get_window_stats``,
``clear``), key buckets as ``limits`` does (namespace, identifiers, amount, multiples,
granularity), and share the pure parts here: the script's arguments and its reply.
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
from importlib import resources
from typing import Any, NamedTuple

import limits.aio.storage
import limits.aio.strategies
import limits.storage
import limits.strategies
from limits import RateLimitItem
from limits.aio.storage.redis.redispy import RedispyBridge
from limits.util import WindowStats

from .errors import ConfigurationError
from .ratelimit_transport import AsyncScriptCaller, ScriptCaller
from .validation import check_int

__all__ = [
    "TOKEN_BUCKET",
    "AsyncTokenBucketRateLimiter",
    "TokenBucketRateLimiter",
    "TokenBucketState",
    "parse_reply",
    "reply_fields",
    "script_args",
]

#: The strategy's name, beside ``limits``' own (``"moving-window"`` ...).
TOKEN_BUCKET = "token-bucket"

# One name per joinpath: several at once need Python 3.11.
SCRIPT = resources.files("tenantdb").joinpath("lua").joinpath("token_bucket.lua").read_text("utf-8")
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()

_MICROSECONDS = 1_000_000
# The script's numbers are Lua doubles: below 2**52 they stay exact integers, with a bit
# to spare for a debt plus one cost.
_EXACT_LIMIT = 2**52


class TokenBucketState(NamedTuple):
    """What the script decided, all from one round trip.

    :param allowed: the tokens were (or, for a test, could be) taken.
    :param remaining: whole tokens left in the bucket.
    :param retry_after: seconds until the request would be allowed; ``0.0`` when allowed,
        ``None`` when it never can be (cost above capacity).
    :param reset_after: seconds until the bucket is full again (Redis clock).
    """

    allowed: bool
    remaining: int
    retry_after: float | None
    reset_after: float


@functools.lru_cache(maxsize=256)
def script_args(amount: int, period_s: int, cost: int, consume: bool) -> tuple[bytes, ...]:
    """The script's ``ARGV`` for a bucket of ``amount`` tokens refilled over ``period_s``.

    Time is counted in ticks of ``1/per_us`` microsecond with one token worth ``per_token``
    ticks, both reduced by their common divisor: the refill stays exact at any rate.
    Encoded once (cached) so that a call packs bytes, not numbers.

    :raises ValueError: a negative cost, or a rate too fine to count exactly.
    """
    check_int(cost, "cost", minimum=0)
    period_us = period_s * _MICROSECONDS
    common = math.gcd(period_us, amount)
    per_us, per_token = amount // common, period_us // common
    if per_token * amount >= _EXACT_LIMIT:
        raise ValueError(
            f"{amount} per {period_s} s cannot be refilled exactly: "
            "use a rounder amount (one sharing factors with the period) or a shorter period"
        )
    return tuple(str(n).encode() for n in (per_us, per_token, amount, cost, int(consume)))


def reply_fields(reply: bytes | str) -> tuple[int, int, int, int]:
    """The script's status line as integers: allowed (0/1), remaining, retry-after in
    microseconds (0 when allowed, -1: never), microseconds until full.

    The line is "<remaining> <us until full>" when allowed; a refusal adds its wait.
    """
    fields = reply.split()
    if len(fields) == 2:
        return 1, int(fields[0]), 0, int(fields[1])
    return 0, int(fields[0]), int(fields[2]), int(fields[1])


def parse_reply(reply: bytes | str) -> TokenBucketState:
    """The script's status line as a :class:`TokenBucketState`."""
    allowed, remaining, wait_us, full_us = reply_fields(reply)
    return TokenBucketState(
        allowed=allowed == 1,
        remaining=remaining,
        retry_after=None if wait_us < 0 else wait_us / _MICROSECONDS,
        reset_after=full_us / _MICROSECONDS,
    )


def _args_for(item: RateLimitItem, cost: int, consume: bool) -> tuple[bytes, ...]:
    return script_args(item.amount, item.get_expiry(), cost, consume)


def _stats(state: TokenBucketState) -> WindowStats:
    # limits reports a reset time on the application's clock; the duration is Redis's.
    return WindowStats(time.time() + state.reset_after, state.remaining)


def _redis_storage(storage: object, kind: type, scheme: str) -> Any:
    if not isinstance(storage, kind):
        raise ConfigurationError(
            f"the token bucket needs a {scheme} Redis storage, not {type(storage).__name__}:"
            f" use a {scheme}redis://, {scheme}redis+unix://, {scheme}redis+cluster:// or "
            f"{scheme}redis+sentinel:// URL"
        )
    return storage


class TokenBucketRateLimiter(limits.strategies.RateLimiter):
    """A token bucket (GCRA) on a ``limits`` Redis storage, decided by one Lua call.

    A bucket holds ``item.amount`` tokens and refills them evenly over
    ``item.get_expiry()`` seconds, timed by Redis ``TIME``; its key expires once the bucket
    is full again. Keys are ``limits``' own (``item.key_for(*identifiers)`` under the
    storage prefix): put a ``{hash tag}`` in an identifier to choose the cluster slot.

    :param storage: a ``limits`` Redis storage (plain, unix socket, cluster or sentinel).
    :raises ConfigurationError: the storage is not a Redis storage.
    """

    def __init__(self, storage: limits.storage.StorageTypes) -> None:
        redis_storage = _redis_storage(storage, limits.storage.RedisStorage, "")
        super().__init__(redis_storage)
        self.prefixed_key = redis_storage.prefixed_key
        self._client: Any = redis_storage.get_connection()
        self._call = ScriptCaller(self._client, SCRIPT, SCRIPT_SHA)

    def evaluate(self, key: str, args: tuple[bytes, ...]) -> bytes:
        """Run the script on the full ``key`` with :func:`script_args`; the raw reply.

        EVALSHA, loading the script on NOSCRIPT (a restarted server, a new cluster node),
        on :class:`~tenantdb.ratelimit_transport.ScriptCaller`'s lean path.
        """
        return self._call(key, args)  # type: ignore[no-any-return]

    def acquire(self, item: RateLimitItem, *identifiers: str, cost: int = 1) -> TokenBucketState:
        """Take ``cost`` tokens if all are there; a denied call takes nothing.

        :raises ValueError: ``cost`` is negative.
        """
        return self._state(item, identifiers, cost, consume=True)

    def hit(self, item: RateLimitItem, *identifiers: str, cost: int = 1) -> bool:
        """Take ``cost`` tokens; see :meth:`acquire`."""
        return self._state(item, identifiers, cost, consume=True).allowed

    def test(self, item: RateLimitItem, *identifiers: str, cost: int = 1) -> bool:
        """Whether ``cost`` tokens could be taken now, without taking them."""
        return self._state(item, identifiers, cost, consume=False).allowed

    def get_window_stats(self, item: RateLimitItem, *identifiers: str) -> WindowStats:
        """When the bucket is full again (epoch seconds) and the whole tokens left now."""
        return _stats(self._state(item, identifiers, 0, consume=False))

    def _state(
        self, item: RateLimitItem, identifiers: tuple[str, ...], cost: int, *, consume: bool
    ) -> TokenBucketState:
        args = _args_for(item, cost, consume)
        return parse_reply(self.evaluate(self.prefixed_key(item.key_for(*identifiers)), args))


class AsyncTokenBucketRateLimiter(limits.aio.strategies.RateLimiter):
    """:class:`TokenBucketRateLimiter` for ``limits.aio`` Redis storages, awaitable.

    The same script, keys and single round trip, on redis-py's asyncio client: build the
    storage with ``implementation="redispy"``.

    :param storage: a ``limits.aio`` Redis storage (plain, unix socket, cluster, sentinel).
    :raises ConfigurationError: the storage is not one, or does not use redis-py.
    """

    def __init__(self, storage: limits.aio.storage.Storage) -> None:
        redis_storage = _redis_storage(storage, limits.aio.storage.RedisStorage, "async+")
        if not isinstance(redis_storage.bridge, RedispyBridge):
            raise ConfigurationError(
                "the async token bucket runs on redis-py: build the storage with "
                "implementation='redispy'"
            )
        super().__init__(redis_storage)
        self.prefixed_key = redis_storage.bridge.prefixed_key
        self._client: Any = redis_storage.bridge.get_connection()
        self._call = AsyncScriptCaller(self._client, SCRIPT, SCRIPT_SHA)

    async def evaluate(self, key: str, args: tuple[bytes, ...]) -> bytes:
        """See :meth:`TokenBucketRateLimiter.evaluate`."""
        return await self._call(key, args)  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        """Disconnect the connections kept for the script (the storage's are its own)."""
        await self._call.aclose()

    async def acquire(
        self, item: RateLimitItem, *identifiers: str, cost: int = 1
    ) -> TokenBucketState:
        """See :meth:`TokenBucketRateLimiter.acquire`."""
        return await self._state(item, identifiers, cost, consume=True)

    async def hit(self, item: RateLimitItem, *identifiers: str, cost: int = 1) -> bool:
        """See :meth:`TokenBucketRateLimiter.hit`."""
        return (await self._state(item, identifiers, cost, consume=True)).allowed

    async def test(self, item: RateLimitItem, *identifiers: str, cost: int = 1) -> bool:
        """See :meth:`TokenBucketRateLimiter.test`."""
        return (await self._state(item, identifiers, cost, consume=False)).allowed

    async def get_window_stats(self, item: RateLimitItem, *identifiers: str) -> WindowStats:
        """See :meth:`TokenBucketRateLimiter.get_window_stats`."""
        return _stats(await self._state(item, identifiers, 0, consume=False))

    async def _state(
        self, item: RateLimitItem, identifiers: tuple[str, ...], cost: int, *, consume: bool
    ) -> TokenBucketState:
        args = _args_for(item, cost, consume)
        key = self.prefixed_key(item.key_for(*identifiers))
        return parse_reply(await self.evaluate(key, args))
