"""Keyset pagination: newest first by (created_at, id), one org only, stable under inserts."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest
from tenancy_fixtures import TwoOrgs

from tenantdb.errors import MissingOrgError
from tenantdb.models import Destination
from tenantdb.pagination import MAX_PAGE_SIZE, decode_cursor, encode_cursor, newest_first

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _all_pages(org: uuid.UUID, limit: int) -> list[str]:
    names, cursor = [], None
    while True:
        page = newest_first(Destination, org, limit=limit, cursor=cursor)
        names += [d.name for d in page.items]
        if page.next_cursor is None:
            return names
        cursor = page.next_cursor


def test_pages_cover_one_org_newest_first_with_ties(two_orgs: TwoOrgs) -> None:
    for n in range(12):
        # Pairs share a timestamp: the id must break the tie without loss or repeat.
        Destination.create(org_id=two_orgs.a, name=f"a{n}", created_at=T0 + timedelta(
            seconds=n // 2))
        Destination.create(org_id=two_orgs.b, name=f"b{n}", created_at=T0)
    names = _all_pages(two_orgs.a, limit=5)
    assert sorted(names) == sorted(f"a{n}" for n in range(12)) and len(set(names)) == 12
    expected = [d.name for d in Destination.select(org_id=two_orgs.a).order_by(
        Destination.created_at.desc(), Destination.id.desc())]
    assert names == expected


def test_rows_added_after_the_first_page_do_not_shift_the_next(org_id: uuid.UUID) -> None:
    for n in range(6):
        Destination.create(org_id=org_id, name=f"d{n}", created_at=T0 + timedelta(seconds=n))
    first = newest_first(Destination, org_id, limit=3)
    Destination.create(org_id=org_id, name="newer", created_at=T0 + timedelta(hours=1))
    second = newest_first(Destination, org_id, limit=3, cursor=first.next_cursor)
    assert [d.name for d in first.items] == ["d5", "d4", "d3"]
    assert [d.name for d in second.items] == ["d2", "d1", "d0"]
    assert second.next_cursor is None


def test_another_orgs_cursor_reveals_nothing(two_orgs: TwoOrgs) -> None:
    Destination.create(org_id=two_orgs.b, name="theirs", created_at=T0)
    cursor = encode_cursor(T0 + timedelta(days=1), uuid.uuid4())
    assert newest_first(Destination, two_orgs.a, cursor=cursor).items == []


@pytest.mark.parametrize("cursor", ["", "nope", "e30", encode_cursor(T0, uuid.uuid4())[:-3],
                                    "x" * 500])
def test_bad_cursor_raises_before_sql(org_id: uuid.UUID, cursor: str) -> None:
    with pytest.raises(ValueError, match="not a page cursor"):
        newest_first(Destination, org_id, cursor=cursor)


def test_cursor_round_trip_and_naive_time_refused() -> None:
    ident = uuid.uuid4()
    assert decode_cursor(encode_cursor(T0, ident)) == (T0, ident)
    with pytest.raises(ValueError):
        decode_cursor(encode_cursor(T0.replace(tzinfo=None), ident))


def test_bad_limit_org_or_model(org_id: uuid.UUID) -> None:
    for limit in (0, MAX_PAGE_SIZE + 1, True, "5"):
        with pytest.raises(ValueError, match="limit"):
            newest_first(Destination, org_id, limit=limit)  # type: ignore[arg-type]
    with pytest.raises(MissingOrgError):
        newest_first(Destination, None)  # type: ignore[arg-type]
