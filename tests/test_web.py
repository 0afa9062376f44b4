"""tenantdb.web: the framework-free HTTP core (keys, fingerprints, rate-limit headers,
problem details, the error table)."""

from __future__ import annotations

import json
import uuid

import peewee
import pytest

from tenantdb.errors import CrossOrgError, MissingOrgError, UnknownUserError
from tenantdb.models import Destination
from tenantdb.orgs import create_org
from tenantdb.ratelimit import RateLimitReason, RateLimitResult
from tenantdb.web import (
    PROBLEM_JSON,
    IdempotencyKeyError,
    RateLimitState,
    error_response,
    parse_idempotency_key,
    problem,
    rate_decision,
    rate_limit_headers,
    rate_limit_refusal,
    request_fingerprint,
)

WITHIN = RateLimitReason.WITHIN_LIMIT
OVER = RateLimitReason.OVER_LIMIT
DOWN = RateLimitReason.REDIS_UNAVAILABLE


@pytest.mark.parametrize(("header", "key"), [
    ('"abc-123"', "abc-123"),
    ('  "8e03978e-40d5-43e8-bc93-6894a57f9324"\t', "8e03978e-40d5-43e8-bc93-6894a57f9324"),
    (r'"a\"b\\c"', 'a"b\\c'),
    ('"' + "x" * 255 + '"', "x" * 255),
])
def test_key_parsed_as_structured_field_string(header: str, key: str) -> None:
    assert parse_idempotency_key(header, required=True) == key


@pytest.mark.parametrize("header", [
    "abc", '"abc', 'abc"', '""', '"' + "x" * 256 + '"', '"a"b"', r'"a\nb"', '"caf\u00e9"',
    '"a";p=1', '"tab\there"', "", '"',
])
def test_malformed_key_is_400(header: str) -> None:
    with pytest.raises(IdempotencyKeyError) as caught:
        parse_idempotency_key(header, required=False)
    assert caught.value.response.status == 400
    assert caught.value.response.header("content-type") == PROBLEM_JSON


def test_missing_key_is_400_only_when_required() -> None:
    assert parse_idempotency_key(None, required=False) is None
    with pytest.raises(IdempotencyKeyError, match="needs an Idempotency-Key"):
        parse_idempotency_key(None, required=True)


def test_fingerprint_covers_method_path_body_and_named_headers() -> None:
    base = request_fingerprint("POST", "/trips", b'{"a": 1, "b": 2}')
    assert request_fingerprint("post", "/trips", '{"b":2,"a":1}') == base
    assert request_fingerprint("PUT", "/trips", b'{"a": 1, "b": 2}') != base
    assert request_fingerprint("POST", "/trips/2", b'{"a": 1, "b": 2}') != base
    assert request_fingerprint("POST", "/trips", b'{"a": 1, "b": 3}') != base
    one = request_fingerprint("POST", "/t", b"", {"X-Tz": "UTC"}, include=["x-tz"])
    two = request_fingerprint("POST", "/t", b"", {"x-tz": "CET"}, include=["X-Tz"])
    assert one.headers_hash != two.headers_hash


def test_allowed_result_gets_policy_and_remaining() -> None:
    decision = rate_decision(RateLimitResult(True, 60, 60, "crud", 59, 1, None, WITHIN))
    headers = dict(rate_limit_headers(decision))
    assert headers == {"RateLimit-Policy": '"crud";q=60;w=60', "RateLimit": '"crud";r=59;t=1'}
    assert rate_limit_refusal(decision) is None


def test_denied_result_is_429_with_retry_after() -> None:
    decision = rate_decision(RateLimitResult(False, 5, 60, "agent", 0, 12, 12, OVER))
    refusal = rate_limit_refusal(decision)
    assert refusal is not None and refusal.status == 429
    assert refusal.header("Retry-After") == "12"
    assert refusal.header("RateLimit") == '"agent";r=0;t=12'
    body = json.loads(refusal.body)
    assert body["type"].endswith("#quota-exceeded") and body["status"] == 429


def test_degraded_fail_open_is_allowed_marked_and_never_renders_none() -> None:
    decision = rate_decision(RateLimitResult(True, 60, 60, "crud", None, None, None, DOWN))
    assert decision.state is RateLimitState.FAIL_OPEN
    assert rate_limit_refusal(decision) is None
    headers = rate_limit_headers(decision)
    assert ("RateLimit-Degraded", "fail-open") in headers
    assert all("None" not in value for _, value in headers)
    assert "RateLimit" not in dict(headers)


def test_degraded_fail_closed_is_503_not_429() -> None:
    decision = rate_decision(RateLimitResult(False, 5, 60, "agent", None, None, None, DOWN))
    refusal = rate_limit_refusal(decision)
    assert refusal is not None and refusal.status == 503
    assert refusal.header("Retry-After") is not None
    assert all("None" not in value for _, value in refusal.headers)
    assert b"None" not in refusal.body


def test_problem_details_shape() -> None:
    response = problem(409, detail="busy", kind="idempotency-key-in-use")
    assert response.header("content-type") == PROBLEM_JSON
    assert json.loads(response.body) == {
        "type": "tag:tenantdb,2026:problem:idempotency-key-in-use", "title": "Conflict",
        "status": 409, "detail": "busy"}


@pytest.mark.parametrize(("error", "status"), [
    (MissingOrgError("x"), 400),
    (CrossOrgError("x"), 403),
    (UnknownUserError("x"), 403),
    (Destination.DoesNotExist("x"), 404),
    (peewee.OperationalError("server closed the connection"), 503),
    (peewee.InterfaceError("connection already closed"), 503),
])
def test_error_table(error: BaseException, status: int) -> None:
    response = error_response(error)
    assert response is not None and response.status == status
    assert b'"x"' not in response.body  # the exception's own text is never sent


def test_unrelated_errors_are_not_mapped() -> None:
    assert error_response(ValueError("bug")) is None
    assert error_response(KeyError("bug")) is None


def test_unique_conflict_is_409_and_missing_reference_404(tenant_db: object) -> None:
    org = create_org("A", "same-slug").id
    with pytest.raises(peewee.IntegrityError) as unique, tenant_db.atomic():  # type: ignore[attr-defined]
        create_org("B", "same-slug")
    conflict = error_response(unique.value)
    assert conflict is not None and conflict.status == 409
    from tenantdb.models import Itinerary

    with pytest.raises(peewee.IntegrityError) as dangling, tenant_db.atomic():  # type: ignore[attr-defined]
        Itinerary.create(org_id=org, user_id=uuid.uuid4(), title="t")
    missing = error_response(dangling.value)
    assert missing is not None and missing.status == 404


def test_5xx_response_rolls_back_the_handlers_writes(tenant_db: object,
                                                     org_id: uuid.UUID) -> None:
    from tenantdb.db import database
    from tenantdb.web import HTTPResponse, run_in_transaction

    def handler(status: int) -> HTTPResponse:
        Destination.create(org_id=org_id, name=f"s{status}")
        return HTTPResponse(status)

    stored: list[int] = []
    assert run_in_transaction(lambda: handler(503), database.atomic,
                              on_success=lambda r: stored.append(r.status)).status == 503
    assert run_in_transaction(lambda: handler(201), database.atomic,
                              on_success=lambda r: stored.append(r.status)).status == 201
    assert [d.name for d in Destination.select(org_id=org_id)] == ["s201"]
    assert stored == [201]
