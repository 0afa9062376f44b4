"""The example app's tests: every request runs inside the test's transaction (``tenant_db``)
through Starlette's TestClient, and is rolled back with it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from travel_app import app

from tenantdb.knowledge import add_knowledge
from tenantdb.models import AgentRun, Destination, Itinerary, User
from tenantdb.orgs import create_org
from tenantdb.pytest_plugin import TestRedis


@pytest.fixture
def client(tenant_db: object, tenantdb_redis: TestRedis) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def headers(org_id: uuid.UUID) -> dict[str, str]:
    user = User.create(org_id=org_id, email="ana@example.com")
    return {"X-Org-Id": str(org_id), "X-User-Id": str(user.id)}


def _trip(client: TestClient, headers: dict[str, str], key: str, **body: Any) -> Any:
    return client.post("/trips", json={"title": "Lisbon", **body},
                       headers={**headers, "Idempotency-Key": f'"{key}"'})


def test_trip_created_once_and_replayed(client: TestClient, headers: dict[str, str],
                                        org_id: uuid.UUID) -> None:
    first = _trip(client, headers, "k-1")
    again = _trip(client, headers, "k-1")
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert first.headers["RateLimit-Policy"] == again.headers["RateLimit-Policy"] == (
        '"crud";q=60;w=60')
    assert Itinerary.select(org_id=org_id).count() == 1


def test_trip_key_reused_with_another_body_is_422(client: TestClient,
                                                  headers: dict[str, str]) -> None:
    assert _trip(client, headers, "k-2").status_code == 201
    reused = _trip(client, headers, "k-2", title="Porto")
    assert reused.status_code == 422
    assert reused.headers["content-type"] == "application/problem+json"


def test_trip_without_key_is_400(client: TestClient, headers: dict[str, str]) -> None:
    response = client.post("/trips", json={"title": "Lisbon"}, headers=headers)
    assert response.status_code == 400
    assert response.json()["type"].endswith("idempotency-key-invalid")


def test_other_orgs_trip_is_404(client: TestClient, headers: dict[str, str]) -> None:
    trip = _trip(client, headers, "k-3").json()
    other = create_org("Other", f"other-{uuid.uuid4().hex[:8]}")
    stranger = User.create(org_id=other.id, email="bo@example.com")
    theirs = {"X-Org-Id": str(other.id), "X-User-Id": str(stranger.id)}
    assert client.get(f"/trips/{trip['id']}", headers=headers).status_code == 200
    assert client.get(f"/trips/{trip['id']}", headers=theirs).status_code == 404
    assert client.get(f"/trips/{uuid.uuid4()}", headers=theirs).status_code == 404


def test_user_of_another_org_is_refused(client: TestClient, headers: dict[str, str]) -> None:
    other = create_org("Other", f"other-{uuid.uuid4().hex[:8]}")
    assert client.get("/destinations", headers={**headers, "X-Org-Id": str(other.id)}
                      ).status_code == 403
    assert client.get("/destinations", headers={"X-User-Id": headers["X-User-Id"]}
                      ).status_code == 400


def test_destinations_paged_newest_first(client: TestClient, headers: dict[str, str],
                                         org_id: uuid.UUID) -> None:
    for n in range(25):
        Destination.create(org_id=org_id, name=f"D{n:02d}")
    names: list[str] = []
    cursor = None
    while True:
        params = {"limit": 10, **({"cursor": cursor} if cursor else {})}
        page = client.get("/destinations", params=params, headers=headers).json()
        names += [item["name"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert names == [f"D{n:02d}" for n in reversed(range(25))]
    bad = client.get("/destinations", params={"cursor": "nope"}, headers=headers)
    assert bad.status_code == 400


def test_agent_runs_limited_to_five_a_minute(client: TestClient, headers: dict[str, str],
                                             org_id: uuid.UUID) -> None:
    statuses = [client.post("/agent-runs", json={"intent": {"city": "Lisbon"}},
                            headers=headers) for _ in range(6)]
    assert [r.status_code for r in statuses] == [202] * 5 + [429]
    assert statuses[0].headers["RateLimit-Policy"] == '"agent";q=5;w=60'
    assert statuses[0].headers["RateLimit"].startswith('"agent";r=4;t=')
    assert int(statuses[-1].headers["Retry-After"]) >= 1
    assert AgentRun.select(org_id=org_id).count() == 5


def test_knowledge_search_by_text(client: TestClient, headers: dict[str, str],
                                  org_id: uuid.UUID) -> None:
    add_knowledge(org_id, "Lisbon trams", "Tram 28 climbs through Alfama")
    add_knowledge(org_id, "Porto wine", "Port cellars line the river in Gaia")
    response = client.post("/knowledge/search", json={"query": "tram 28 Alfama", "k": 2},
                           headers=headers)
    assert response.status_code == 200
    assert response.json()["hits"][0]["title"] == "Lisbon trams"
