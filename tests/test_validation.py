"""tenantdb.validation: each rule alone, then every entry point that uses it refusing bad
input before any SQL (outside a database fixture a statement raises RuntimeError or
NotConnectedError, so a ValueError proves the check ran first)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from typing import Any

import numpy as np
import pytest

from tenantdb import validation as v
from tenantdb.validation import (
    SHOWN_CHARS,
    check_aware_datetime,
    check_int,
    check_optional_uuid,
    check_positive_number,
    check_positive_timedelta,
    check_text,
    check_uuid,
    check_vector,
    parse_aware_datetime,
    parse_date,
    parse_uuid,
)

ORG = uuid.UUID("12345678-1234-5678-9abc-123456789abc")
NAIVE = datetime(2026, 5, 1, 9, 0)
AWARE = datetime(2026, 5, 1, 9, 0, tzinfo=timezone.utc)


# -- integers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [True, False, np.bool_(True)])
def test_check_int_refuses_bool(value: object) -> None:
    with pytest.raises(ValueError, match=r"limit must be an integer, got"):
        check_int(value, "limit")


@pytest.mark.parametrize("value", [1.0, 2.5, "3", None, Decimal(3), Fraction(3), b"3", [3]])
def test_check_int_refuses_non_integers(value: object) -> None:
    with pytest.raises(ValueError, match="k must be an integer from 1 to 10"):
        check_int(value, "k", minimum=1, maximum=10)


def test_check_int_bounds_are_inclusive() -> None:
    assert check_int(1, "k", minimum=1, maximum=10) == 1
    assert check_int(10, "k", minimum=1, maximum=10) == 10
    for outside in (0, 11, -1, 10**30):
        with pytest.raises(ValueError, match=rf"got {outside}$"):
            check_int(outside, "k", minimum=1, maximum=10)


@pytest.mark.parametrize("minimum, maximum, rule", [
    (1, None, "an integer of at least 1"),
    (None, 5, "an integer of at most 5"),
    (None, None, "an integer"),
])
def test_check_int_message_states_the_range(minimum: int | None, maximum: int | None,
                                            rule: str) -> None:
    with pytest.raises(ValueError) as raised:
        check_int("x", "n", minimum=minimum, maximum=maximum, where="f()", hint="a count")
    assert str(raised.value) == f"f(): n must be {rule}, got 'x': a count"


def test_check_int_gives_numpy_integers_back_as_int() -> None:
    value = check_int(np.int64(7), "k", minimum=1)
    assert value == 7 and type(value) is int
    with pytest.raises(ValueError):
        check_int(np.int64(0), "k", minimum=1)


# -- positive numbers and periods -------------------------------------------------------------

def test_check_positive_number_accepts_ints_and_floats() -> None:
    assert check_positive_number(3, "days") == 3.0
    assert check_positive_number(0.5, "days") == 0.5
    assert check_positive_number(np.float64(2.0), "days") == 2.0


@pytest.mark.parametrize("value", [0, -1, 0.0, float("nan"), float("inf"), -float("inf"),
                                   True, "1", None, Decimal(1)])
def test_check_positive_number_refuses(value: object) -> None:
    with pytest.raises(ValueError, match="retention_days must be a positive number of days"):
        check_positive_number(value, "retention_days", unit="days")


def test_check_positive_number_refuses_an_int_beyond_float_range() -> None:
    with pytest.raises(ValueError, match="within a float's range"):
        check_positive_number(10**400, "days")


def test_check_positive_timedelta() -> None:
    assert check_positive_timedelta(timedelta(seconds=1), "ttl") == timedelta(seconds=1)
    for bad in (timedelta(0), timedelta(seconds=-1), 60, None):
        with pytest.raises(ValueError, match="ttl must be a positive timedelta"):
            check_positive_timedelta(bad, "ttl")


# -- times ------------------------------------------------------------------------------------

def test_check_aware_datetime() -> None:
    assert check_aware_datetime(AWARE, "now") is AWARE
    for bad in (NAIVE, date(2026, 5, 1), "2026-05-01T09:00:00+00:00", 0, None):
        with pytest.raises(ValueError, match="now must be a timezone-aware datetime"):
            check_aware_datetime(bad, "now")


def test_check_aware_datetime_message_says_why() -> None:
    with pytest.raises(ValueError, match="read in the server's zone"):
        check_aware_datetime(NAIVE, "now", where="purge()")


@pytest.mark.parametrize("text, expected", [
    ("2026-05-01T09:00:00+00:00", AWARE),
    ("2026-05-01T09:00:00Z", AWARE),
    ("2026-05-01 11:00+02:00", AWARE),
    ("2026-05-01T04:30:00-04:30", AWARE),
    ("2026-05-01T09:00:00.5+00:00", AWARE.replace(microsecond=500000)),
    ("2026-05-01T09:00:00.123456+00:00", AWARE.replace(microsecond=123456)),
])
def test_parse_aware_datetime(text: str, expected: datetime) -> None:
    parsed = parse_aware_datetime(text, "t")
    assert parsed == expected and parsed.utcoffset() is not None


@pytest.mark.parametrize("text", [
    "2026-05-01T09:00:00",           # naive
    "2026-05-01",                    # a date
    "2026-13-01T09:00:00Z",          # no such month
    "2026-02-30T09:00:00Z",          # no such day
    "2026-05-01T24:00:00Z",          # no such hour
    "2026-05-01T09:00:00+24:00",     # no such offset
    "2026-05-01T09:00:00+01:60",
    "\uff12\uff10\uff12\uff16-05-01T09:00:00Z",  # fullwidth digits
    " 2026-05-01T09:00:00Z",
    "2026-05-01T09:00:00Z\n",
    "",
])
def test_parse_aware_datetime_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="t must be an ISO 8601 time with its offset"):
        parse_aware_datetime(text, "t")


@pytest.mark.parametrize("value", [AWARE, 0, None, b"2026-05-01T09:00:00Z"])
def test_parse_aware_datetime_takes_text_only(value: object) -> None:
    with pytest.raises(ValueError):
        parse_aware_datetime(value, "t")


def test_parse_date() -> None:
    assert parse_date("2026-05-01", "day") == date(2026, 5, 1)
    for bad in ("2026-02-30", "20260501", "2026-05-01T00:00", 20260501, None):
        with pytest.raises(ValueError, match="day must be an ISO 8601 date"):
            parse_date(bad, "day")


# -- UUIDs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "12345678-1234-5678-9abc-123456789abc",
    "12345678-1234-5678-9ABC-123456789ABC",
    "12345678123456789abc123456789abc",
    "{12345678-1234-5678-9abc-123456789abc}",
    "urn:uuid:12345678-1234-5678-9abc-123456789abc",
])
def test_parse_uuid_accepts_the_usual_spellings(text: str) -> None:
    assert parse_uuid(text) == ORG
    assert check_uuid(text, "org") == ORG


# Texts uuid.UUID() itself accepts (it drops hyphens and hands the rest to int(..., 16)).
LAX = {
    "0x prefix": "0x" + ORG.hex[2:],
    "underscore": ORG.hex[:1] + "_" + ORG.hex[2:],
    "plus sign": "+" + ORG.hex[1:],
    "spaces": " " + ORG.hex[1:-1] + " ",
    "fullwidth digits": "\uff11\uff12" + ORG.hex[2:],
    "stray hyphens": ORG.hex[:1] + "-" + ORG.hex[1:] + "-",
}


@pytest.mark.parametrize("name", sorted(LAX))
def test_parse_uuid_refuses_what_only_int_syntax_allows(name: str) -> None:
    uuid.UUID(LAX[name])  # the standard library takes it
    assert parse_uuid(LAX[name]) is None


@pytest.mark.parametrize("value", [
    None, "", "nope", 5, ORG.int, ORG.bytes, str(ORG).encode(), [str(ORG)], 1.5,
    f" {ORG} ", f"{ORG}\n", "{" + str(ORG), str(ORG) + "}", str(ORG)[:-1] + "g",
    str(ORG)[:-1], "urn:uuid:" + "{" + str(ORG) + "}", *LAX.values(),
])
def test_parse_uuid_refuses(value: object) -> None:
    assert parse_uuid(value) is None
    with pytest.raises(ValueError, match="user_id must be a UUID"):
        check_uuid(value, "user_id")


def test_parse_uuid_returns_a_uuid_unchanged() -> None:
    assert parse_uuid(ORG) is ORG


def test_check_optional_uuid() -> None:
    assert check_optional_uuid(None, "destination_id") is None
    assert check_optional_uuid(str(ORG), "destination_id") == ORG
    with pytest.raises(ValueError, match=r"destination_id must be a UUID .* or None"):
        check_optional_uuid("", "destination_id")


# -- vectors ----------------------------------------------------------------------------------

def test_check_vector_gives_the_float32_values() -> None:
    stored = check_vector(np.full(4, 0.5), "q", dimensions=4)
    assert stored.typecode == "f" and list(stored) == [0.5] * 4
    assert list(check_vector([1, 0, 0], "q", dimensions=3)) == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("value, message", [
    ("abc", "must be a sequence of 3 floats"),
    (b"abc", "must be a sequence of 3 floats"),
    (3.0, "must be a sequence of 3 floats"),
    ([1.0, "2", 3.0], "holds a str"),
    ([1.0, None, 3.0], "holds a NoneType"),
    ([1.0, 2.0], "has 2 dimensions, not 3"),
    ([0.0, 0.0, 0.0], "all zeros"),
    ([1.0, float("nan"), 0.0], "NaN or infinite"),
    ([1.0, 1e39, 0.0], "NaN or infinite"),          # beyond float32
    ([1e-30, 0.0, 0.0], "too small"),
    ([3e38, 3e38, 0.0], "too large"),
])
def test_check_vector_refuses(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_vector(value, "q", dimensions=3)


# -- text and messages ------------------------------------------------------------------------

def test_check_text() -> None:
    assert check_text("x", "name") == "x"
    assert check_text("", "hash", allow_empty=True) == ""
    for bad in ("", "  \t", None, b"x", 1):
        with pytest.raises(ValueError, match="name must be a non-empty string"):
            check_text(bad, "name")
    with pytest.raises(ValueError, match="hash must be a string"):
        check_text(None, "hash", allow_empty=True)


def test_messages_cut_long_values_short() -> None:
    with pytest.raises(ValueError) as raised:
        check_uuid("x" * 10_000_000, "user_id")
    shown = str(raised.value).split("got ", 1)[1]
    assert len(shown) <= SHOWN_CHARS and "..." in shown


def test_messages_survive_a_broken_repr() -> None:
    class Broken:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    with pytest.raises(ValueError, match="got <Broken"):
        check_int(Broken(), "n")


def test_every_public_helper_is_documented() -> None:
    for name in v.__all__:
        helper = getattr(v, name)
        if callable(helper):
            assert helper.__doc__, name


# -- the entry points that use them, before any SQL -------------------------------------------

def _entry_points() -> dict[str, Callable[[], Any]]:
    from tenantdb import idempotency, knowledge, orgs, pagination, repository, retention
    from tenantdb.embedder import HashingEmbedder
    from tenantdb.models import Destination
    from tenantdb.ratelimit import BucketSpec
    from tenantdb.table_retention import register_retention_policy

    user = uuid.uuid4()
    owner = {"org_id": ORG, "user_id": user, "body_hash": "h"}
    return {
        "search k bool": lambda: knowledge.search_knowledge(ORG, "q", True),
        "search k too big": lambda: knowledge.search_knowledge(ORG, "q", knowledge.MAX_K + 1),
        "search destination bytes": lambda: knowledge.search_knowledge(
            ORG, "q", destination_id=ORG.bytes),
        "add destination int": lambda: knowledge.add_knowledge(ORG, "t", "c",
                                                               destination_id=ORG.int),
        "page limit bool": lambda: pagination.newest_first(Destination, ORG, limit=True),
        "page limit 0": lambda: pagination.newest_first(Destination, ORG, limit=0),
        "list limit float": lambda: repository.scoped_list(Destination, ORG, limit=5.0),
        "list offset -1": lambda: repository.scoped_list(Destination, ORG, offset=-1),
        "delete_org batch bool": lambda: orgs.delete_org(ORG, reason="r", batch_size=True),
        "delete_org blank reason": lambda: orgs.delete_org(ORG, reason="  "),
        "create_org blank name": lambda: orgs.create_org(" ", "slug"),
        "purge batch bool": lambda: retention.purge("agent_runs", True, org_id=ORG),
        "purge naive now": lambda: retention.purge("agent_runs", org_id=ORG, now=NAIVE),
        "stale window nan": lambda: retention.get_stale_agent_runs(float("nan"), org_id=ORG),
        "begin bad user": lambda: idempotency.begin("k", **{**owner, "user_id": "0x1"}),
        "begin ttl zero": lambda: idempotency.begin("k", **owner, ttl=timedelta(0)),
        "begin hash blank": lambda: idempotency.begin("k", **{**owner, "body_hash": ""}),
        "complete status bool": lambda: idempotency.mark_completed(
            "k", **owner, response_status=True),
        "complete status 600": lambda: idempotency.mark_completed(
            "k", **owner, response_status=600),
        "save naive ttl_until": lambda: idempotency.save_result(
            "k", **owner, status="completed", ttl_until=NAIVE),
        "bucket limit bool": lambda: BucketSpec("b", True),
        "bucket period 0": lambda: BucketSpec("b", 10, period_s=0),
        "embedder dimensions bool": lambda: HashingEmbedder(True),
        "policy window zero": lambda: register_retention_policy(
            "p", Destination, time_column="created_at", window=timedelta(0)),
    }


@pytest.mark.parametrize("name", sorted(_entry_points()))
def test_entry_point_refuses_bad_input_before_sql(name: str) -> None:
    with pytest.raises(ValueError):
        _entry_points()[name]()


def test_a_valid_call_outside_a_database_fixture_reaches_sql() -> None:
    """The control: had any statement run, the refusals above would not be ValueErrors (the
    database is either not bound in this test or closed to it outside ``tenant_db``)."""
    from tenantdb.errors import NotConnectedError
    from tenantdb.models import Destination
    from tenantdb.repository import scoped_list

    with pytest.raises((RuntimeError, NotConnectedError)) as raised:
        scoped_list(Destination, ORG, limit=5)
    assert not isinstance(raised.value, ValueError)
