"""Keyset pagination for newest-first lists of one org: ``(created_at, id)`` descending.

An offset page re-reads every row before it and shifts when rows arrive; a keyset page
starts strictly after the last row the client saw, so it costs the same on page 1 and
page 1,000 (with the ``(org_id, created_at DESC)`` indexes of migration V01_04) and
never repeats or skips a row that was already there. ``id`` breaks ties between rows
created in the same microsecond.

::

    page = newest_first(Destination, org, limit=20, cursor=request_cursor)
    page.items, page.next_cursor   # next_cursor is None on the last page
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from peewee import Tuple

from .context import OrgLike, require_org
from .tenancy import TenantModel
from .validation import check_int, check_uuid, parse_aware_datetime

__all__ = ["MAX_PAGE_SIZE", "Page", "decode_cursor", "encode_cursor", "newest_first"]

#: The largest page :func:`newest_first` returns.
MAX_PAGE_SIZE = 200

_M = TypeVar("_M", bound=TenantModel)


@dataclass(frozen=True)
class Page(Generic[_M]):
    """One page, newest first; ``next_cursor`` fetches the next (``None``: last page)."""

    items: list[_M]
    next_cursor: str | None


def newest_first(
    model: type[_M],
    org_id: OrgLike,
    /,
    *,
    limit: int = 20,
    cursor: str | None = None,
    where: Sequence[Any] = (),
) -> Page[_M]:
    """A page of ``model``'s rows of one org, newest first, after ``cursor``.

    :param model: a tenant model with ``created_at`` and ``id`` columns.
    :param limit: rows per page, 1 to :data:`MAX_PAGE_SIZE`.
    :param cursor: ``next_cursor`` of the previous page; ``None`` for the first page.
    :param where: extra filter expressions, AND-ed.
    :raises MissingOrgError: no org, or not a UUID.
    :raises ValueError: a bad limit, a malformed cursor, or a model without the columns.
    """
    org = require_org(org_id, f"newest_first({model.__name__})")
    limit = check_int(limit, "limit", minimum=1, maximum=MAX_PAGE_SIZE)
    fields = model._meta.fields
    if "created_at" not in fields or "id" not in fields:
        raise ValueError(f"{model.__name__} has no created_at and id columns to page by")
    created, ident = fields["created_at"], fields["id"]
    query = model.select(org_id=org)
    for expression in where:
        query = query.where(expression)
    if cursor is not None:
        after = decode_cursor(cursor)
        query = query.where(Tuple(created, ident) < Tuple(*after))
    rows = list(query.order_by(created.desc(), ident.desc()).limit(limit + 1))
    if len(rows) <= limit:
        return Page(rows, None)
    last = rows[limit - 1]
    return Page(rows[:limit], encode_cursor(last.created_at, last.id))


def encode_cursor(created_at: datetime, row_id: uuid.UUID) -> str:
    """An opaque cursor for the row ``(created_at, id)``: URL-safe base64 of JSON."""
    raw = json.dumps([created_at.isoformat(), str(row_id)], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """The ``(created_at, id)`` a cursor names.

    :raises ValueError: not a cursor of :func:`encode_cursor` (a timezone-aware time and
        a UUID).
    """
    try:
        if not isinstance(cursor, str) or len(cursor) > 200:
            raise ValueError
        padded = cursor + "=" * (-len(cursor) % 4)
        stamp, ident = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        created = parse_aware_datetime(stamp, "the cursor's time")
        row_id = check_uuid(ident, "the cursor's id")
    except (ValueError, TypeError, binascii.Error, UnicodeError):
        raise ValueError(f"cursor {cursor!r} is not a page cursor: pass next_cursor from the "
                         "previous page unchanged") from None
    return created, row_id
