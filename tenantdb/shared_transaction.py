"""Which threads may join a ``tenant_db`` test's transaction without being named.

Starlette's ``TestClient`` runs the application on another thread (anyio's blocking
portal), and both it and ``httpx.ASGITransport`` run ``def`` endpoints and
``run_in_threadpool`` calls on worker threads. None of those threads is the test's.

What carries over is the context: anyio copies the caller's ``contextvars`` into the task
a portal call starts (asyncio's ``call_soon_threadsafe`` copies the calling thread's
context) and into every ``to_thread.run_sync`` worker, and asyncio tasks copy theirs. So
the test sets one context variable, and the plugin's guard admits every context copied
from the test's; the database itself is pinned to the test's connection (see
``TenantDatabase.pin``), so admitted threads share its transaction, one statement at a
time. A thread started plainly (``threading.Thread``, a ``ThreadPoolExecutor``) copies
nothing, so it is still refused: nobody asked for it.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["admitted", "admit_copied_contexts"]

_admitted: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "tenantdb_test_transaction_admitted", default=False
)


def admitted() -> bool:
    """Whether this context was copied from a test sharing its transaction."""
    return _admitted.get()


@contextmanager
def admit_copied_contexts() -> Iterator[None]:
    """Inside the block, this context and every context copied from it are admitted."""
    token = _admitted.set(True)
    try:
        yield
    finally:
        _admitted.reset(token)
