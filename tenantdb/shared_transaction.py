"""One test transaction for the test and the requests it makes (``tenant_db`` + test clients).

Starlette's ``TestClient`` runs the application on another thread (anyio's blocking
portal), and both it and ``httpx.ASGITransport`` run ``def`` endpoints and
``run_in_threadpool`` calls on worker threads. None of those threads is the test's, so
Peewee (one connection per thread) would give each a connection of its own, outside the
test's transaction, and the plugin's guard refuses them.

What carries over is the context: anyio copies the caller's ``contextvars`` into the task
a portal call starts (asyncio's ``call_soon_threadsafe`` copies the calling thread's
context) and into every ``to_thread.run_sync`` worker, and asyncio tasks copy theirs. So
the test sets one context variable, :data:`_shared`, holding its connection state; every
context copied from the test's carries it, and :class:`_StateRouter` hands those contexts
the test's connection and transaction stack instead of their thread's own. A thread
started plainly (``threading.Thread``, a ``ThreadPoolExecutor``) copies nothing, so it is
still refused: nobody asked for it.

Requests then run on the test's one connection. Run them one at a time (as a test
normally does): overlapping requests would interleave their statements and savepoints in
one transaction.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import peewee

__all__ = ["admitted", "share_transaction"]

_shared: contextvars.ContextVar[peewee._ConnectionState | None] = contextvars.ContextVar(
    "tenantdb_shared_test_transaction", default=None
)


def admitted() -> bool:
    """Whether this context was copied from a test sharing its transaction."""
    return _shared.get() is not None


@contextmanager
def share_transaction(database: Any) -> Iterator[None]:
    """Inside the block, this context and every context copied from it use one connection
    state (connection, transaction stack) on ``database``, whatever thread they run on.

    Enter it before opening the test's connection and transaction; leave it after closing
    them.
    """
    # CAUTION: Database._state is Peewee's private per-thread connection state (a
    # threading.local); this swap is the only read of it here.
    original = database._state
    router = _StateRouter(original)
    database._state = router
    token = _shared.set(peewee._ConnectionState())
    try:
        yield
    finally:
        _shared.reset(token)
        database._state = original


class _StateRouter:
    """Stands in for ``Database._state``: the shared state in an admitted context, else the
    thread's own."""

    __slots__ = ("_local",)

    def __init__(self, local: Any) -> None:
        object.__setattr__(self, "_local", local)

    def _target(self) -> Any:
        shared = _shared.get()
        return self._local if shared is None else shared

    @property
    def __dict__(self) -> dict[str, Any]:  # type: ignore[override]  # tenantdb's own flags
        return self._target().__dict__  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._target(), name, value)

    def reset(self) -> None:
        self._target().reset()

    def set_connection(self, conn: Any) -> None:
        self._target().set_connection(conn)
