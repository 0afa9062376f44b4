"""One Lua script sent by EVALSHA on a lean path: bytes packed once, idle connections kept.

redis-py's generic command path (a pool checkout with a lock and a readiness probe,
observability hooks on checkout, release and every command, a retry wrapper, argument
encoding, response callbacks) costs more on a fast local Redis than the round trip
itself: a bare EVALSHA sent through it measured ~2.5x one sent on a connection directly
(``bench/ratelimit.py`` prints both). A rate-limit check sends one command shape again
and again, so :class:`ScriptCaller` and :class:`AsyncScriptCaller` keep:

- the command's bytes: everything but the key packed once per argument tuple;
- their own idle connections, made by the client's pool (so with its socket, timeout,
  sentinel and TLS settings) and reused by whichever thread or task comes next; a
  connection that has become readable while idle (the server closed it, or sent
  something unasked) is reconnected before use, as the pool's own checkout would;
- redis-py's connection ``send``/``read``: its timeouts, error types, health checks and
  sentinel failover. A connection is kept only after a whole reply was read (an error
  reply included); after anything else it is disconnected, so no reply is ever read by
  the wrong caller.

The lean path needs a plain ``redis.Redis`` (TCP, unix socket, a sentinel's master) with
retries switched off, as tenantdb's own rate-limit clients are. Any other client (Redis
Cluster routes by slot; a client with retries must retry) goes through its
``execute_command``.
"""

from __future__ import annotations

import os
import select
from typing import Any

import redis
import redis.asyncio
from redis.exceptions import NoScriptError, ResponseError

__all__ = ["AsyncScriptCaller", "ScriptCaller"]

# Idle connections kept per caller: more than the threads that ever check at once is
# waste; a burst beyond it closes its extra connections rather than hoarding them.
_MAX_IDLE = 64
# Packed argument tuples kept per caller (one per bucket shape in use).
_MAX_SHAPES = 256


def _lean_pool(client: object, client_type: type) -> Any:
    """The client's pool if the lean path may use it, else ``None``."""
    if type(client) is not client_type or getattr(client, "connection", None) is not None:
        return None  # a subclass may override commands; a single-connection client is locked
    pool = client.connection_pool  # type: ignore[attr-defined]
    if getattr(pool, "cache", None) is not None:
        return None  # client-side caching wraps each connection in a proxy of its own
    retry = pool.connection_kwargs.get("retry")
    if retry is None or retry.get_retries() != 0:
        return None  # the client would retry: keep its semantics
    return pool


class _Packing:
    """EVALSHA's bytes for one script and one key: all but the key packed once."""

    def __init__(self, script: str, sha: str, pool: Any) -> None:
        self.script = script
        self.sha = sha
        self._sha = sha.encode()
        self._shapes: dict[tuple[bytes, ...], tuple[bytes, bytes]] = {}
        encoder = pool.get_encoder() if pool is not None else None
        self._encoding = encoder.encoding if encoder else "utf-8"
        self._errors = encoder.encoding_errors if encoder else "strict"

    def command(self, key: str, args: tuple[bytes, ...]) -> bytes:
        shape = self._shapes.get(args)
        if shape is None:
            shape = self._shape(args)
        head, tail = shape
        raw = key.encode(self._encoding, self._errors)
        return b"%s$%d\r\n%s\r\n%s" % (head, len(raw), raw, tail)

    def _shape(self, args: tuple[bytes, ...]) -> tuple[bytes, bytes]:
        # RESP: an array of bulk strings, EVALSHA <sha> 1 <key> <args...>.
        head = b"*%d\r\n$7\r\nEVALSHA\r\n$%d\r\n%s\r\n$1\r\n1\r\n" % (
            4 + len(args), len(self._sha), self._sha)
        tail = b"".join(b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in args)
        if len(self._shapes) >= _MAX_SHAPES:
            self._shapes.clear()
        shape = self._shapes[args] = (head, tail)
        return shape


# Bumped in a forked child: its callers drop the parent's connections (their sockets are
# the parent's too) without a getpid() system call on every check.
_forks = [0]
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: _forks.__setitem__(0, _forks[0] + 1))


def _probe(sock: Any) -> Any:
    """A ``poll`` object watching ``sock`` for input, made once per socket.

    An idle connection that turns readable has EOF (the server closed it) or bytes nobody
    asked for; ``Connection.can_read``, which the pool's checkout uses, finds out through
    a non-blocking ``recv`` and an exception, several times the cost of one ``poll(0)``.
    """
    if not hasattr(select, "poll"):  # pragma: no cover - platforms without poll
        return None
    probe = select.poll()
    probe.register(sock, select.POLLIN)
    return probe


class ScriptCaller:
    """Runs a Lua script with one key on a sync redis-py client, loading it on NOSCRIPT.

    :param client: the ``redis.Redis`` (or cluster client) to run it on.
    :param script: the script's source, loaded when the server does not know its SHA.
    :param sha: its SHA1, hex.
    """

    def __init__(self, client: Any, script: str, sha: str) -> None:
        self._client = client
        self._pool = _lean_pool(client, redis.Redis)
        self._packing = _Packing(script, sha, self._pool)
        # Idle connections, each with the socket it had when put back and that socket's
        # probe: (connection, socket, probe).
        self._idle: list[tuple[Any, Any, Any]] = []
        self._forks = _forks[0]

    def __call__(self, key: str, args: tuple[bytes, ...]) -> Any:
        """The script's reply for ``key`` and ``args`` (the server's ``ARGV``)."""
        try:
            return self._send(key, args)
        except NoScriptError:  # a restarted server, a flushed cache, a failover
            self._client.script_load(self._packing.script)
            return self._send(key, args)

    def _send(self, key: str, args: tuple[bytes, ...]) -> Any:
        if self._pool is None:
            return self._client.execute_command("EVALSHA", self._packing.sha, 1, key, *args)
        command = [self._packing.command(key, args)]
        conn, sock, probe = self._checkout()
        try:
            if conn._sock is None:  # redis-py's socket: None until connected
                # connect() itself, not send's implicit connect: a sentinel's connection
                # asks the sentinels for the master only in connect().
                conn.connect()
            conn.send_packed_command(command)
            reply = conn.read_response()
        except ResponseError:
            self._checkin(conn, sock, probe)  # an error reply was read whole: in step
            raise
        except BaseException:
            # A timeout or an interruption may leave a reply in flight: never reuse the
            # socket. The connection object is kept, disconnected: through an outage the
            # checks reuse it rather than have the pool make one per check.
            conn.disconnect()
            self._checkin(conn, None, None)
            raise
        self._checkin(conn, sock, probe)
        return reply

    def _checkout(self) -> tuple[Any, Any, Any]:
        if self._forks != _forks[0]:
            # A forked child must not share its parent's sockets: start afresh.
            self._idle, self._forks = [], _forks[0]
        try:
            conn, sock, probe = self._idle.pop()  # atomic: no two threads get one
        except IndexError:
            return self._pool.make_connection(), None, None
        if sock is not None and (probe.poll(0) if probe is not None else conn.can_read()):
            conn.disconnect()
        return conn, sock, probe

    def _checkin(self, conn: Any, sock: Any, probe: Any) -> None:
        current = conn._sock
        if current is not sock:  # connected, reconnected or disconnected during this call
            sock, probe = current, None if current is None else _probe(current)
        if len(self._idle) < _MAX_IDLE:
            self._idle.append((conn, sock, probe))
        else:
            conn.disconnect()


def _areadable(conn: Any) -> bool:
    """An idle asyncio connection's stream saw EOF or holds unread bytes."""
    reader = getattr(conn, "_reader", None)
    if reader is None:
        return False
    return bool(reader.at_eof() or len(getattr(reader, "_buffer", b"")))


class AsyncScriptCaller:
    """:class:`ScriptCaller` for a ``redis.asyncio`` client; use within one event loop.

    :meth:`aclose` disconnects its idle connections.
    """

    def __init__(self, client: Any, script: str, sha: str) -> None:
        self._client = client
        self._pool = _lean_pool(client, redis.asyncio.Redis)
        self._packing = _Packing(script, sha, self._pool)
        self._idle: list[Any] = []

    async def __call__(self, key: str, args: tuple[bytes, ...]) -> Any:
        """See :meth:`ScriptCaller.__call__`."""
        try:
            return await self._send(key, args)
        except NoScriptError:
            await self._client.script_load(self._packing.script)
            return await self._send(key, args)

    async def aclose(self) -> None:
        """Disconnect the idle connections (the pool's own are the client's to close)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.disconnect()

    async def _send(self, key: str, args: tuple[bytes, ...]) -> Any:
        if self._pool is None:
            return await self._client.execute_command(
                "EVALSHA", self._packing.sha, 1, key, *args)
        command = [self._packing.command(key, args)]
        conn = await self._checkout()
        try:
            if not conn.is_connected:
                await conn.connect()  # see ScriptCaller._send
            await conn.send_packed_command(command)
            reply = await conn.read_response()
        except ResponseError:
            await self._checkin(conn)
            raise
        except BaseException:
            # Cancelled or timed out between send and reply: the reply may still come.
            # Kept disconnected, as in ScriptCaller._send.
            await conn.disconnect(nowait=True)
            await self._checkin(conn)
            raise
        await self._checkin(conn)
        return reply

    async def _checkout(self) -> Any:
        try:
            conn = self._idle.pop()
        except IndexError:
            return self._pool.make_connection()
        if _areadable(conn):
            await conn.disconnect()
        return conn

    async def _checkin(self, conn: Any) -> None:
        if len(self._idle) < _MAX_IDLE:
            self._idle.append(conn)
        else:
            await conn.disconnect()
