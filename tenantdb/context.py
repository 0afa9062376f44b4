"""Org values and the cross-org escape hatch: the pieces every other module shares.

There is deliberately no ambient "current org": every tenant call names its org, so no org
can outlive the request that chose it. The one context-local state is :func:`cross_org`.
"""

from __future__ import annotations

import contextvars
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import MissingOrgError

__all__ = ["OrgLike", "cross_org", "cross_org_reason", "parse_uuid", "require_org"]

OrgLike = uuid.UUID | str

log = logging.getLogger("tenantdb.tenancy")
_cross_org: contextvars.ContextVar[str | None] = contextvars.ContextVar(
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


def parse_uuid(value: object) -> uuid.UUID | None:
    """``value`` as a UUID (a UUID, or its text form), else ``None``."""
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str):
        try:
            return uuid.UUID(value)
        except ValueError:
            return None
    return None


@contextmanager
def cross_org(reason: str) -> Iterator[None]:
    """Allow work across orgs inside the block: the one explicit, logged escape hatch.

    Context-local (a contextvar): other threads and asyncio tasks are unaffected, and the
    previous state comes back in ``finally`` whatever happens. Statements run under the
    database's bypass role. A task *created* inside the block copies the context, as
    contextvars do, and keeps the permission.

    :raises ValueError: an empty reason.
    """
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError("cross_org() needs a reason, e.g. cross_org(reason='retention purge')")
    log.info("cross_org entered: %s", reason)
    token = _cross_org.set(reason)
    try:
        yield
    finally:
        _cross_org.reset(token)


def cross_org_reason() -> str | None:
    """The reason of the :func:`cross_org` block in force in this context, if any."""
    return _cross_org.get()
