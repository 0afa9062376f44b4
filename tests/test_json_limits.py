"""Bounded JSON: 10,000-deep and oversized bodies are refused with a ValueError naming the
limit (never RecursionError), before any hashing or SQL, in every idempotency entry point."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from tenantdb.fingerprint import (
    MAX_JSON_BYTES,
    MAX_JSON_DEPTH,
    canonical_json,
    fingerprint,
    parse_json,
)
from tenantdb.idempotency import (
    IdempotencyStatus,
    begin,
    get_entry,
    idempotent,
    mark_completed,
    save_result,
)
from tenantdb.idempotency import (
    fingerprint as idempotency_fingerprint,
)
from tenantdb.models import IdempotencyKey, User
from tenantdb.web import request_fingerprint

DEEP = 10_000


def deep_value(depth: int = DEEP) -> Any:
    value: Any = []
    for n in range(depth - 1):
        value = [value] if n % 2 else {"k": value}
    return value


DEEP_TEXT = "[" * DEEP + "]" * DEEP
DEEP_OBJECTS = '{"a":' * DEEP + "1" + "}" * DEEP


def test_old_import_path_still_works() -> None:
    assert idempotency_fingerprint is fingerprint


@pytest.mark.parametrize("body", [DEEP_TEXT, DEEP_TEXT.encode(), DEEP_OBJECTS,
                                  bytearray(DEEP_OBJECTS.encode()), deep_value()])
def test_fingerprint_refuses_deep_bodies(body: Any) -> None:
    with pytest.raises(ValueError, match=f"MAX_JSON_DEPTH={MAX_JSON_DEPTH}"):
        fingerprint(body)
    with pytest.raises(ValueError, match="MAX_JSON_DEPTH"):
        request_fingerprint("POST", "/trips", body)


def test_depth_at_the_limit_is_accepted_and_one_more_refused() -> None:
    fingerprint("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH)
    fingerprint(deep_value(MAX_JSON_DEPTH))
    with pytest.raises(ValueError, match="MAX_JSON_DEPTH"):
        fingerprint("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1))
    with pytest.raises(ValueError, match="MAX_JSON_DEPTH"):
        fingerprint(deep_value(MAX_JSON_DEPTH + 1))


def test_brackets_inside_strings_do_not_count() -> None:
    text = json.dumps({"note": "[" * 5000})
    assert fingerprint(text) == fingerprint({"note": "[" * 5000})


def test_oversized_bodies_are_refused() -> None:
    big = json.dumps(["x" * 1000] * (MAX_JSON_BYTES // 1000 + 1))
    with pytest.raises(ValueError, match="MAX_JSON_BYTES"):
        fingerprint(big)
    with pytest.raises(ValueError, match="MAX_JSON_BYTES"):
        fingerprint(json.loads(big))
    with pytest.raises(ValueError, match="MAX_JSON_BYTES"):
        parse_json(big)


def test_parse_json_and_canonical_json_refuse_depth() -> None:
    with pytest.raises(ValueError, match="MAX_JSON_DEPTH"):
        parse_json(DEEP_TEXT)
    with pytest.raises(ValueError, match="MAX_JSON_DEPTH"):
        canonical_json(deep_value())
    assert parse_json('{"a": [1, 2]}') == {"a": [1, 2]}


@pytest.fixture
def user(org_id: uuid.UUID) -> uuid.UUID:
    return User.create(org_id=org_id, email="deep@example.com").id


def test_mark_completed_refuses_deep_response_and_writes_nothing(
    org_id: uuid.UUID, user: uuid.UUID
) -> None:
    body_hash = fingerprint({"a": 1}).body_hash
    begin("deep-1", org_id=org_id, user_id=user, body_hash=body_hash)
    with pytest.raises(ValueError, match="MAX_JSON_DEPTH"):
        mark_completed("deep-1", org_id=org_id, user_id=user, body_hash=body_hash,
                       response_status=201, response_body=deep_value())
    entry = get_entry("deep-1", org_id=org_id, user_id=user)
    assert entry is not None and entry.status is IdempotencyStatus.PENDING
    assert entry.response_body is None


def test_save_result_refuses_deep_response(org_id: uuid.UUID, user: uuid.UUID) -> None:
    with pytest.raises(ValueError, match="MAX_JSON_DEPTH"):
        save_result("deep-2", org_id=org_id, user_id=user, status="completed", body_hash="h",
                    ttl_until=datetime.now(timezone.utc) + timedelta(hours=1),
                    response_status=200, response_body=deep_value())
    assert IdempotencyKey.select(org_id=org_id).count() == 0


@pytest.mark.parametrize("body", [DEEP_TEXT, deep_value()])
def test_idempotent_refuses_deep_body_before_claiming(
    org_id: uuid.UUID, user: uuid.UUID, body: Any
) -> None:
    ran = False
    with pytest.raises(ValueError, match="MAX_JSON_DEPTH"), \
            idempotent("deep-3", org_id=org_id, user_id=user, body=body):
        ran = True
    assert not ran
    assert IdempotencyKey.select(org_id=org_id).count() == 0
