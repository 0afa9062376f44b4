"""tenantdb.fastapi over real PostgreSQL and Redis: requests through Starlette's TestClient
and httpx.ASGITransport run inside the test's transaction; idempotent routes, rate limits,
request scope and the error handlers."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from tenantdb import cross_org
from tenantdb.db import TenantDatabase, database
from tenantdb.fastapi import (
    IdempotentRequest,
    RequestScope,
    header_resolver,
    idempotency,
    install,
    rate_limit,
    request_scope,
    run_db,
)
from tenantdb.idempotency import IdempotencyStatus, begin, get_entry
from tenantdb.models import Destination, Org, User
from tenantdb.orgs import create_org
from tenantdb.pytest_plugin import TestDatabase, TestRedis
from tenantdb.settings import override_settings
from tenantdb.web import request_fingerprint

scope = request_scope(header_resolver())
idempotent = idempotency(scope, required=True)
app = FastAPI()
install(app)
calls: dict[str, int] = {}


@app.get("/orgs/{slug}")
def org_by_slug(slug: str) -> dict[str, Any]:
    with cross_org(reason="test: an org by its slug"):
        return {"name": Org.get(Org.slug == slug).name}


@app.post("/destinations/{name}", status_code=201)
async def add_destination(name: str, who: RequestScope = Depends(scope)) -> dict[str, Any]:
    row = await run_db(Destination.create, org_id=who.org_id, name=name)
    return {"id": str(row.id)}


@app.get("/destinations/{dest_id}")
async def get_destination(dest_id: uuid.UUID, who: RequestScope = Depends(scope)) -> Any:
    row = await run_db(Destination.get, Destination.id == dest_id, org_id=who.org_id)
    return {"name": row.name}


@app.post("/items")
async def create_item(body: dict[str, Any], idem: IdempotentRequest = Depends(idempotent)) -> Any:
    def handler() -> Any:
        calls[body["tag"]] = calls.get(body["tag"], 0) + 1
        Destination.create(org_id=idem.scope.org_id, name=body["tag"])
        if body.get("fail") == "status" and calls[body["tag"]] == 1:
            return JSONResponse({"error": "upstream"}, status_code=502)
        if body.get("fail") == "raise" and calls[body["tag"]] == 1:
            raise RuntimeError("handler crashed")
        response = JSONResponse({"tag": body["tag"], "n": calls[body["tag"]]}, status_code=201)
        response.set_cookie("session", "secret")
        response.headers["X-Trip"] = "kept"
        return response
    return await idem.arespond(handler)


@app.get("/agent", dependencies=[Depends(rate_limit("agent", scope))])
async def agent_call() -> dict[str, str]:
    return {"ok": "yes"}


@app.get("/crud", dependencies=[Depends(rate_limit("crud", scope))])
async def crud_call() -> dict[str, str]:
    return {"ok": "yes"}


@app.get("/sleep")
async def sleep_in_database() -> dict[str, float]:
    started = time.perf_counter()
    await run_db(database.execute_sql, "SELECT pg_sleep(0.5)")
    return {"slept": time.perf_counter() - started}


@app.get("/ping")
async def ping() -> dict[str, str]:
    return {"pong": "yes"}


@app.get("/spawn-thread")
def spawn_thread() -> dict[str, str]:
    """A thread the request starts by hand: nobody admitted it."""
    errors: list[str] = []
    worker = threading.Thread(target=lambda: _try_count(errors))
    worker.start()
    worker.join()
    return {"thread": errors[0] if errors else "admitted"}


def _try_count(errors: list[str]) -> None:
    try:
        database.execute_sql("SELECT 1")
    except RuntimeError as exc:
        errors.append(str(exc))


@pytest.fixture
def client(tenant_db: TenantDatabase, tenantdb_redis: TestRedis) -> Iterator[TestClient]:
    calls.clear()
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def member(org_id: uuid.UUID) -> dict[str, str]:
    user = User.create(org_id=org_id, email="member@example.com")
    return {"X-Org-Id": str(org_id), "X-User-Id": str(user.id)}


# THE TEST'S TRANSACTION, SHARED WITH REQUESTS


def test_request_sees_the_tests_uncommitted_rows(client: TestClient) -> None:
    create_org("Visible", "visible-org")
    assert client.get("/orgs/visible-org").json() == {"name": "Visible"}


def test_test_sees_the_requests_rows(client: TestClient, member: dict[str, str],
                                     org_id: uuid.UUID) -> None:
    created = client.post("/destinations/Lisbon", headers=member)
    assert created.status_code == 201
    assert Destination.get(Destination.name == "Lisbon", org_id=org_id).id == uuid.UUID(
        created.json()["id"])


def test_asgi_transport_requests_share_the_transaction(tenant_db: TenantDatabase,
                                                       member: dict[str, str],
                                                       org_id: uuid.UUID) -> None:
    async def scenario() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            made = await http.post("/destinations/Porto", headers=member)
            read = await http.get(f"/destinations/{made.json()['id']}", headers=member)
            return [made.status_code, read.status_code]

    assert asyncio.run(scenario()) == [201, 200]
    assert Destination.get(Destination.name == "Porto", org_id=org_id).name == "Porto"


def test_threads_nobody_asked_for_are_still_refused(client: TestClient) -> None:
    assert "tenantdb_committed" in client.get("/spawn-thread").json()["thread"]
    with ThreadPoolExecutor(1) as pool, pytest.raises(RuntimeError, match="tenant_db"):
        pool.submit(database.execute_sql, "SELECT 1").result()


def test_async_endpoint_does_not_block_the_loop(tenant_db: TenantDatabase) -> None:
    async def scenario() -> tuple[float, float]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            slow = asyncio.create_task(http.get("/sleep"))
            await asyncio.sleep(0.1)
            started = time.perf_counter()
            await http.get("/ping")
            ping = time.perf_counter() - started
            return ping, (await slow).json()["slept"]

    ping, slept = asyncio.run(scenario())
    assert slept >= 0.5
    assert ping < 0.25  # answered while the database call was still sleeping


# ROLLBACK AT THE END OF THE TEST (an inner session: test 2 must not see test 1's rows)

INNER_SUITE = '''
import asyncio
import httpx
from fastapi import FastAPI
from fastapi.testclient import TestClient
from tenantdb import cross_org
from tenantdb.models import Org
from tenantdb.orgs import create_org

app = FastAPI()

@app.post("/orgs/{slug}")
def make(slug: str):
    create_org("from a request", slug)
    return {"ok": True}

def test_1_requests_write(tenant_db):
    assert TestClient(app).post("/orgs/sync-{marker}").status_code == 200
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as http:
            return (await http.post("/orgs/async-{marker}")).status_code
    assert asyncio.run(go()) == 200
    with cross_org(reason="test: count orgs"):
        assert Org.select().where(Org.slug.endswith("{marker}")).count() == 2

def test_2_rolled_back(tenant_db):
    with cross_org(reason="test: count orgs"):
        assert Org.select().where(Org.slug.endswith("{marker}")).count() == 0
'''


def test_request_writes_are_rolled_back_with_the_test(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
    tenantdb_database: TestDatabase, tenantdb_redis: TestRedis,
) -> None:
    monkeypatch.setenv("TENANTDB_TEST_DATABASE_URL", tenantdb_database.url)
    monkeypatch.setenv("TENANTDB_TEST_REDIS_URL", tenantdb_redis.url)
    pytester.makepyfile(test_inner=INNER_SUITE.replace("{marker}", uuid.uuid4().hex[:8]))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "ignore")
    result.assert_outcomes(passed=2)


# IDEMPOTENT ROUTES


def _post(client: TestClient, headers: dict[str, str], key: str, body: dict[str, Any]) -> Any:
    return client.post("/items", json=body, headers={**headers, "Idempotency-Key": f'"{key}"'})


def test_replay_returns_stored_status_headers_and_body_without_cookies(
    client: TestClient, member: dict[str, str], org_id: uuid.UUID
) -> None:
    first = _post(client, member, "a", {"tag": "t1"})
    second = _post(client, member, "a", {"tag": "t1"})
    assert first.status_code == second.status_code == 201
    assert second.json() == first.json() == {"tag": "t1", "n": 1}
    assert second.headers["X-Trip"] == "kept" and second.headers["Idempotent-Replayed"] == "true"
    assert "set-cookie" in first.headers and "set-cookie" not in second.headers
    assert calls["t1"] == 1
    assert Destination.select(org_id=org_id).count() == 1


def test_5xx_response_leaves_the_key_retryable_and_rolls_back(
    client: TestClient, member: dict[str, str], org_id: uuid.UUID
) -> None:
    assert _post(client, member, "b", {"tag": "t2", "fail": "status"}).status_code == 502
    assert Destination.select(org_id=org_id).count() == 0
    retried = _post(client, member, "b", {"tag": "t2", "fail": "status"})
    assert retried.status_code == 201 and retried.json()["n"] == 2
    assert Destination.select(org_id=org_id).count() == 1


def test_exception_leaves_the_key_retryable(client: TestClient, member: dict[str, str],
                                            org_id: uuid.UUID) -> None:
    user = uuid.UUID(member["X-User-Id"])
    with pytest.raises(RuntimeError, match="handler crashed"):
        _post(client, member, "c", {"tag": "t3", "fail": "raise"})
    entry = get_entry("c", org_id=org_id, user_id=user)
    assert entry is not None and entry.status is IdempotencyStatus.ERROR
    assert _post(client, member, "c", {"tag": "t3", "fail": "raise"}).status_code == 201


def test_in_flight_is_409_and_other_payload_422(client: TestClient, member: dict[str, str],
                                               org_id: uuid.UUID) -> None:
    body = {"tag": "t4"}
    pending = request_fingerprint("POST", "/items", body)
    begin("d", org_id=org_id, user_id=member["X-User-Id"], body_hash=pending.body_hash)
    busy = _post(client, member, "d", body)
    assert busy.status_code == 409
    assert busy.headers["content-type"] == "application/problem+json"
    assert _post(client, member, "d", {"tag": "other"}).status_code == 422
    assert "t4" not in calls


def test_deep_json_body_is_400_not_500(client: TestClient, member: dict[str, str]) -> None:
    deep = '{"tag":' + "[" * 10_000 + "]" * 10_000 + "}"
    response = client.post("/items", content=deep, headers={
        **member, "Idempotency-Key": '"deep"', "Content-Type": "application/json"})
    assert response.status_code in (400, 422)
    assert response.status_code != 500


# REQUEST SCOPE AND ERRORS


def test_scope_errors(client: TestClient, member: dict[str, str]) -> None:
    assert client.get("/agent", headers={"X-User-Id": member["X-User-Id"]}).status_code == 400
    assert client.get("/agent", headers={**member, "X-Org-Id": "nope"}).status_code == 400
    assert client.get("/agent", headers={"X-Org-Id": member["X-Org-Id"]}).status_code == 400
    stranger = {**member, "X-User-Id": str(uuid.uuid4())}
    refused = client.get("/agent", headers=stranger)
    assert refused.status_code == 403
    assert refused.headers["content-type"] == "application/problem+json"


def test_another_orgs_row_is_a_404_like_a_missing_one(client: TestClient,
                                                      member: dict[str, str]) -> None:
    other = create_org("B", f"b-{uuid.uuid4().hex[:8]}")
    theirs = Destination.create(org_id=other.id, name="Hidden")
    hidden = client.get(f"/destinations/{theirs.id}", headers=member)
    missing = client.get(f"/destinations/{uuid.uuid4()}", headers=member)
    assert hidden.status_code == missing.status_code == 404
    assert hidden.json() == missing.json()


# RATE LIMITS OVER HTTP


def test_rate_limit_headers_on_allowed_and_refused(client: TestClient,
                                                   member: dict[str, str]) -> None:
    answers = [client.get("/agent", headers=member) for _ in range(6)]
    assert [a.status_code for a in answers] == [200] * 5 + [429]
    assert answers[0].headers["RateLimit-Policy"] == '"agent";q=5;w=60'
    assert answers[4].headers["RateLimit"].startswith('"agent";r=0;')
    assert int(answers[5].headers["Retry-After"]) >= 1
    assert answers[5].headers["content-type"] == "application/problem+json"


def test_redis_down_fail_closed_is_503_and_fail_open_is_marked(
    client: TestClient, member: dict[str, str]
) -> None:
    with override_settings(redis_url="redis://127.0.0.1:9/0", redis_socket_timeout_s=0.2):
        closed = client.get("/agent", headers=member)
        opened = client.get("/crud", headers=member)
    assert closed.status_code == 503 and int(closed.headers["Retry-After"]) >= 1
    assert opened.status_code == 200
    assert opened.headers["RateLimit-Degraded"] == "fail-open"
    for answer in (closed, opened):
        assert all("None" not in value for value in answer.headers.values())


# A REAL RACE: two requests with one key, the first still running (real commits, threads)

gate = {"started": threading.Event(), "release": threading.Event()}


@app.post("/slow")
async def slow_create(body: dict[str, Any], idem: IdempotentRequest = Depends(idempotent)) -> Any:
    def handler() -> Any:
        gate["started"].set()
        gate["release"].wait(10)
        row = Destination.create(org_id=idem.scope.org_id, name=body["name"])
        return {"id": str(row.id)}
    return await idem.arespond(handler, status_code=201)


def test_concurrent_same_key_gets_409_then_replay(tenantdb_committed: TenantDatabase,
                                                  tenantdb_redis: TestRedis) -> None:
    org = create_org("Race", f"race-{uuid.uuid4().hex[:8]}").id
    user = User.create(org_id=org, email="race@example.com").id
    headers = {"X-Org-Id": str(org), "X-User-Id": str(user), "Idempotency-Key": '"race"'}
    gate["started"].clear()
    gate["release"].clear()
    answers: dict[str, Any] = {}

    def first() -> None:
        with TestClient(app) as own:
            answers["first"] = own.post("/slow", json={"name": "once"}, headers=headers)

    worker = threading.Thread(target=first)
    worker.start()
    try:
        assert gate["started"].wait(10)
        with TestClient(app) as second:
            answers["busy"] = second.post("/slow", json={"name": "once"}, headers=headers)
    finally:
        gate["release"].set()
        worker.join(15)
    with TestClient(app) as third:
        answers["replay"] = third.post("/slow", json={"name": "once"}, headers=headers)
    assert answers["busy"].status_code == 409
    assert answers["first"].status_code == answers["replay"].status_code == 201
    assert answers["replay"].json() == answers["first"].json()
    assert answers["replay"].headers["Idempotent-Replayed"] == "true"
    assert Destination.select(org_id=org).count() == 1


@pytest.mark.anyio
async def test_async_test_with_asgi_transport_shares_the_transaction(
    tenant_db: TenantDatabase, member: dict[str, str], org_id: uuid.UUID
) -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        made = await http.post("/destinations/Faro", headers=member)
    assert made.status_code == 201
    assert Destination.get(Destination.name == "Faro", org_id=org_id).name == "Faro"


def test_body_over_the_limit_is_413(client: TestClient, member: dict[str, str]) -> None:
    big = {"tag": "x" * (1024 * 1024 + 10)}
    response = client.post("/items", json=big, headers={**member, "Idempotency-Key": '"big"'})
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"


def test_database_unreachable_is_503_problem(tenantdb_committed: TenantDatabase) -> None:
    saved = dict(tenantdb_committed.connect_params)
    tenantdb_committed.close_all()
    # New connections go to a closed port: the server is down as far as the app can tell.
    tenantdb_committed.connect_params = {**saved, "host": "127.0.0.1", "port": 9}
    try:
        with TestClient(app) as http:
            answer = http.get(f"/destinations/{uuid.uuid4()}", headers={
                "X-Org-Id": str(uuid.uuid4()), "X-User-Id": str(uuid.uuid4())})
    finally:
        tenantdb_committed.close_all()
        tenantdb_committed.connect_params = saved
    assert answer.status_code == 503
    assert answer.headers["content-type"] == "application/problem+json"
    assert int(answer.headers["Retry-After"]) >= 1
    assert "127.0.0.1" not in answer.text  # nothing about the server leaks
