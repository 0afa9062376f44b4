"""Two orgs, the one type for them, and twin orgs: A and B holding rows with identical ids
and identical natural keys in every tenant table, so any predicate that forgets the org
pairs or returns B's rows. The fixtures (``two_orgs``, ``twins``, ``committed_twins``) are
in conftest."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import NamedTuple

from tenantdb.models import (
    AgentRun,
    Destination,
    Embedding,
    IdempotencyKey,
    Itinerary,
    KnowledgeItem,
    RefreshToken,
    User,
)
from tenantdb.orgs import create_org

__all__ = ["IDS", "UNIT", "TwoOrgs", "fill_org", "make_twins"]

IDS = {name: uuid.uuid4() for name in (
    "user", "token", "destination", "item", "embedding", "run", "itinerary")}
UNIT = [1.0] + [0.0] * 1535


class TwoOrgs(NamedTuple):
    """Orgs A and B of a test (``twins.a``, or ``a, b = twins``)."""

    a: uuid.UUID
    b: uuid.UUID


def make_twins() -> TwoOrgs:
    a = create_org("Twin A", f"twin-a-{uuid.uuid4().hex[:8]}").id
    b = create_org("Twin B", f"twin-b-{uuid.uuid4().hex[:8]}").id
    for org in (a, b):
        fill_org(org)
    return TwoOrgs(a, b)


def fill_org(org: uuid.UUID) -> None:
    later = datetime.now(timezone.utc) + timedelta(days=1)
    User.create(org_id=org, id=IDS["user"], email="same@example.com", display_name=str(org))
    RefreshToken.create(org_id=org, id=IDS["token"], user_id=IDS["user"], token_hash="h",
                        expires_at=later)
    Destination.create(org_id=org, id=IDS["destination"], name="Lisbon", description=str(org))
    KnowledgeItem.create(org_id=org, id=IDS["item"], destination_id=IDS["destination"],
                         title="Trams", content="Tram 28")
    Embedding.create(org_id=org, id=IDS["embedding"], knowledge_item_id=IDS["item"],
                     content="Tram 28", vector=UNIT, model="test")
    AgentRun.create(org_id=org, id=IDS["run"], user_id=IDS["user"], intent={"org": str(org)})
    Itinerary.create(org_id=org, id=IDS["itinerary"], user_id=IDS["user"],
                     agent_run_id=IDS["run"], destination_id=IDS["destination"], title="Trip")
    IdempotencyKey.create(org_id=org, user_id=IDS["user"], key="same-key", body_hash="b",
                          ttl_until=later)
