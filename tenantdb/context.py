"""Org values and the cross-org escape hatch: the pieces every other module shares.

There is deliberately no ambient "current org": every tenant call names its org, so no org
can outlive the request that chose it. The one context-local state is :func:`cross_org`,
and it holds only within the dynamic extent of its ``with`` block (see :class:`cross_org`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import sys
import threading
import uuid
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any, NamedTuple, TypeVar, cast

from .errors import MissingOrgError
from .validation import parse_uuid

__all__ = [
    "OrgLike",
    "Scope",
    "cross_org",
    "cross_org_reason",
    "org_unless_cross_org",
    "require_org",
    "scope_of",
    "with_scope",
]

OrgLike = uuid.UUID | str
_F = TypeVar("_F", bound=Callable[..., Any])

log = logging.getLogger("tenantdb.tenancy")


class _Grant:
    """One ``cross_org`` block: its reason, the frame that entered it, and that frame's thread.

    A frame is on the call stack exactly while its code runs; the block's extent is that
    frame's ``with`` statement, so "the frame is on this thread's stack and the block has not
    exited" is the dynamic extent of the block, whatever contextvars were copied to.
    """

    __slots__ = ("frame", "previous", "reason", "thread")

    def __init__(self, reason: str, frame: FrameType, thread: int,
                 previous: _Grant | None) -> None:
        self.reason = reason
        self.frame: FrameType | None = frame
        self.thread = thread
        # The grant this block shadows: a generator suspended inside its own block must not
        # hide the block its consumer is in.
        self.previous = previous


_current: contextvars.ContextVar[_Grant | None] = contextvars.ContextVar(
    "tenantdb_cross_org", default=None
)


def require_org(org_id: object, where: str) -> uuid.UUID:
    """Return ``org_id`` as a UUID, or refuse: tenant work never runs without a real org.

    :param where: what needs the org, for the message (``"Destination.select()"``).
    :raises MissingOrgError: ``None``, ``""``, ``0``, or anything that is not a UUID.
    """
    org = parse_uuid(org_id)
    if org is not None:
        return org
    if isinstance(org_id, str) and org_id:
        raise MissingOrgError(f"{where}: org_id={org_id!r} is not a UUID")
    raise MissingOrgError(
        f"{where} needs org_id=...: pass the org, or use cross_org(reason) for admin work"
        + ("" if org_id is None else f" (got {org_id!r})")
    )


def org_unless_cross_org(org_id: object, where: str) -> uuid.UUID | None:
    """The org a call names; ``None`` when it names none inside :func:`cross_org`.

    ``None`` builds an unscoped query: no permission travels with it, and whether it may
    run is decided when it runs (inside the block, as admin; outside, refused).

    :raises MissingOrgError: no org (or not a UUID) outside a ``cross_org`` block.
    """
    if org_id is None and cross_org_reason() is not None:
        return None
    return require_org(org_id, where)


class Scope(NamedTuple):
    """The org a query object was built for, carried by the query (Peewee's clones copy it).
    Immutable (a named tuple: built once per query, so cheaper than a frozen dataclass).

    :param org: the org its rows belong to, and remember when loaded.
    :param term: the WHERE term that pins its base table to ``org`` (``None`` for raw SQL,
        whose text the org setting scopes).
    """

    org: uuid.UUID
    term: Any = None


def scope_of(query: object) -> Scope | None:
    """The :class:`Scope` ``query`` was built with, if any."""
    scope = getattr(query, "_tenantdb_scope", None)
    return scope if isinstance(scope, Scope) else None


_Q = TypeVar("_Q")


def with_scope(query: _Q, scope: Scope) -> _Q:
    """``query``, carrying ``scope`` (in its ``__dict__``, which Peewee's ``clone`` copies)."""
    query.__dict__["_tenantdb_scope"] = scope
    return query


class cross_org:  # noqa: N801 - used as a function: ``with cross_org(reason=...)``
    """Allow work across orgs inside the block: the one explicit, logged escape hatch.

    The permission holds only within the dynamic extent of the block: for code the block's
    own frame calls, on its own thread, until the block exits. It is bound to the frame that
    entered the block and checked against the call stack when a statement runs, so it does
    not reach the consumer of a generator suspended inside the block, a thread-pool job or
    ``asyncio.to_thread`` call (even one that copied the context), an asyncio task created
    inside the block, or anything that runs after the block exited. A job that needs it
    enters its own ``cross_org(reason)`` block (or is decorated with ``@cross_org(reason)``):
    each grant is explicit and logged. For the same reason a ``@contextmanager`` that yields
    inside ``cross_org`` grants nothing to its ``with`` body: return ``cross_org(reason)``
    from a helper instead (``ExitStack.enter_context`` works).

    :raises ValueError: an empty reason.
    """

    __slots__ = ("_grant", "_token", "reason")

    def __init__(self, reason: str) -> None:
        if not isinstance(reason, str) or not reason.strip():
            raise ValueError("cross_org() needs a reason, e.g. cross_org(reason='retention "
                             "purge')")
        self.reason = reason
        self._grant: _Grant | None = None
        self._token: contextvars.Token[_Grant | None] | None = None

    def __enter__(self) -> None:
        if self._grant is not None:
            raise RuntimeError("a cross_org() object is entered once: write a new block")
        log.info("cross_org entered: %s", self.reason)
        frame = sys._getframe(1)
        # ExitStack.enter_context(cross_org(...)) enters from contextlib's frame: the block
        # is its caller's.
        while frame.f_code.co_filename == contextlib.__file__ and frame.f_back is not None:
            frame = frame.f_back
        self._grant = _Grant(self.reason, frame, threading.get_ident(), _current.get())
        self._token = _current.set(self._grant)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        grant, token = self._grant, self._token
        if grant is not None:
            grant.frame = None  # dead for good, in every context that copied it
        if token is not None:
            # ValueError: exited in another context (a generator closed elsewhere); the grant
            # is dead anyway.
            with contextlib.suppress(ValueError):
                _current.reset(token)


    def __call__(self, func: _F) -> _F:
        """Use as a decorator: each call of ``func`` runs in a block of its own."""
        reason = self.reason

        @functools.wraps(func)
        def granted(*args: Any, **kwargs: Any) -> Any:
            with cross_org(reason):
                return func(*args, **kwargs)

        return cast(_F, granted)


def cross_org_reason() -> str | None:
    """The reason of the :func:`cross_org` block in force here and now, if any.

    ``None`` unless the block's frame is on the current thread's call stack and the block
    has not exited. The stack is walked only when a grant is present.
    """
    grant = _current.get()
    while grant is not None:
        if grant.frame is not None and grant.thread == threading.get_ident():
            current: FrameType | None = sys._getframe(1)
            while current is not None:
                if current is grant.frame:
                    return grant.reason
                current = current.f_back
        grant = grant.previous
    return None
