"""The baseline of bench/web_load.py: the example's read and write routes on plain Peewee,
``limits`` through slowapi, no tenantdb. What an app written without the package does:
an org filter by hand, no verifier, no row-level security (connects as the owner), no
idempotency store, a synchronous rate limiter (slowapi blocks the loop in async routes,
so the routes are ``def``: FastAPI runs them on its thread pool), Peewee's
``connection_context()`` per request so the pool's connections go back.

Configured by the environment: PLAIN_DATABASE_URL, PLAIN_REDIS_URL.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import peewee
from fastapi import FastAPI, HTTPException, Request
from playhouse.db_url import parse as parse_db_url
from playhouse.pool import PooledPostgresqlDatabase
from pydantic import BaseModel
from slowapi import Limiter, _rate_limit_exceeded_handler
from slowapi.errors import RateLimitExceeded

_kwargs = parse_db_url(os.environ["PLAIN_DATABASE_URL"])
database = PooledPostgresqlDatabase(_kwargs.pop("database"), max_connections=10, timeout=10,
                                    **_kwargs)
limiter = Limiter(key_func=lambda request: request.headers.get("X-User-Id", ""),
                  storage_uri=os.environ["PLAIN_REDIS_URL"])
app = FastAPI()
app.state.limiter = limiter
app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]
LIMIT = "100000/minute"


class _Base(peewee.Model):
    class Meta:
        database = database


class AppUser(_Base):
    id = peewee.UUIDField()
    org_id = peewee.UUIDField()
    is_active = peewee.BooleanField()

    class Meta:
        table_name = "app_user"
        primary_key = peewee.CompositeKey("org_id", "id")


class Destination(_Base):
    id = peewee.UUIDField()
    org_id = peewee.UUIDField()
    name = peewee.TextField()
    created_at = peewee.DateTimeField()

    class Meta:
        primary_key = peewee.CompositeKey("org_id", "id")


class Itinerary(_Base):
    id = peewee.UUIDField(default=uuid.uuid4)
    org_id = peewee.UUIDField()
    user_id = peewee.UUIDField()
    title = peewee.TextField()
    status = peewee.TextField(default="draft")

    class Meta:
        primary_key = peewee.CompositeKey("org_id", "id")


class TripIn(BaseModel):
    title: str


def _scope(request: Request) -> tuple[uuid.UUID, uuid.UUID]:
    try:
        org, user = (uuid.UUID(request.headers[h]) for h in ("X-Org-Id", "X-User-Id"))
    except (KeyError, ValueError):
        raise HTTPException(400, "X-Org-Id and X-User-Id") from None
    member = AppUser.select().where(AppUser.org_id == org, AppUser.id == user,
                                    AppUser.is_active).exists()
    if not member:
        raise HTTPException(403, "not a member")
    return org, user


@app.post("/trips", status_code=201)
@limiter.limit(LIMIT)
def create_trip(request: Request, trip: TripIn) -> dict[str, Any]:
    with database.connection_context():
        org, user = _scope(request)
        row = Itinerary.create(org_id=org, user_id=user, title=trip.title)
        return {"id": str(row.id), "title": row.title, "status": row.status}


@app.get("/destinations")
@limiter.limit(LIMIT)
def list_destinations(request: Request, limit: int = 20) -> dict[str, Any]:
    with database.connection_context():
        org, _ = _scope(request)
        rows = (Destination.select().where(Destination.org_id == org)
                .order_by(Destination.created_at.desc(), Destination.id.desc()).limit(limit))
        return {"items": [{"id": str(d.id), "name": d.name} for d in rows]}
