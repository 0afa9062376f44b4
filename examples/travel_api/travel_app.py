"""The travel planner's API on tenantdb: FastAPI, tenant-scoped, idempotent, rate-limited.

Run it: ``uvicorn travel_app:app --app-dir examples/travel_api`` (with ``tenantdb dev up``
or the TENANTDB_* URLs set). Every request names its org and user in ``X-Org-Id`` and
``X-User-Id``; the user must be an active member of the org.

- ``POST /trips``: create a trip (an itinerary); needs an ``Idempotency-Key``.
- ``GET /trips/{id}``: one of the org's trips (another org's is a 404, like a missing one).
- ``POST /agent-runs``: queue an agent run, on the ``agent`` bucket (5 a minute).
- ``GET /destinations?limit=&cursor=``: the org's destinations, newest first, keyset pages.
- ``POST /knowledge/search``: the org's knowledge nearest to a text.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from pydantic import BaseModel, Field

import tenantdb
from tenantdb.fastapi import (
    IdempotentRequest,
    ProblemError,
    RequestScope,
    header_resolver,
    idempotency,
    install,
    rate_limit,
    request_scope,
    run_db,
)
from tenantdb.knowledge import search_knowledge
from tenantdb.models import AgentRun, Destination, Itinerary
from tenantdb.pagination import newest_first
from tenantdb.web import problem

scope = request_scope(header_resolver("X-Org-Id", "X-User-Id"))
crud_limit = rate_limit("crud", scope)
agent_limit = rate_limit("agent", scope)
idempotent = idempotency(scope, required=True)


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    if not tenantdb.db.is_connected():  # under the test plugin it already is
        tenantdb.connect()
    yield


app = FastAPI(title="Travel planner", lifespan=lifespan)
install(app)


class TripIn(BaseModel):
    title: str = Field(min_length=1, max_length=200)
    destination_id: uuid.UUID | None = None
    start_date: dt.date | None = None
    end_date: dt.date | None = None


class AgentRunIn(BaseModel):
    intent: dict[str, Any]


class SearchIn(BaseModel):
    query: str = Field(min_length=1, max_length=2000)
    k: int = Field(default=5, ge=1, le=50)


@app.post("/trips", status_code=201, dependencies=[Depends(crud_limit)])
async def create_trip(trip: TripIn, idem: IdempotentRequest = Depends(idempotent)) -> Any:
    def create() -> dict[str, Any]:
        row = Itinerary.create(org_id=idem.scope.org_id, user_id=idem.scope.user_id,
                               title=trip.title, destination_id=trip.destination_id,
                               start_date=trip.start_date, end_date=trip.end_date)
        return _trip(row)
    return await idem.arespond(create, status_code=201)


@app.get("/trips/{trip_id}", dependencies=[Depends(crud_limit)])
async def get_trip(trip_id: uuid.UUID, who: RequestScope = Depends(scope)) -> dict[str, Any]:
    row = await run_db(Itinerary.get, Itinerary.id == trip_id, org_id=who.org_id)
    return _trip(row)


@app.post("/agent-runs", status_code=202, dependencies=[Depends(agent_limit)])
async def start_agent_run(run: AgentRunIn, who: RequestScope = Depends(scope)) -> Any:
    row = await run_db(AgentRun.create, org_id=who.org_id, user_id=who.user_id,
                       intent=run.intent)
    return {"id": row.id, "status": row.status}


@app.get("/destinations", dependencies=[Depends(crud_limit)])
async def list_destinations(limit: int = 20, cursor: str | None = None,
                            who: RequestScope = Depends(scope)) -> dict[str, Any]:
    try:
        page = await run_db(newest_first, Destination, who.org_id, limit=limit, cursor=cursor)
    except ValueError as exc:
        raise ProblemError(problem(400, "Invalid page", str(exc))) from None
    items = [{"id": d.id, "name": d.name, "country": d.country, "created_at": d.created_at}
             for d in page.items]
    return {"items": items, "next_cursor": page.next_cursor}


@app.post("/knowledge/search", dependencies=[Depends(crud_limit)])
async def search(body: SearchIn, who: RequestScope = Depends(scope)) -> dict[str, Any]:
    # Embedded with the embedder the org's knowledge was stored with (by its name).
    hits = await run_db(search_knowledge, who.org_id, body.query, body.k)
    return {"hits": [{"title": h.item.title, "chunk": h.embedding.content,
                      "distance": round(h.distance, 4)} for h in hits]}


def _trip(row: Itinerary) -> dict[str, Any]:
    return {"id": str(row.id), "title": row.title, "status": row.status,
            "destination_id": str(row.destination_id) if row.destination_id else None,
            "start_date": str(row.start_date) if row.start_date else None,
            "end_date": str(row.end_date) if row.end_date else None}
