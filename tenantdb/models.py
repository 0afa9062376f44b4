"""The schema's models. They mirror ``tenantdb/migrations`` and never create tables.

``tests/test_models.py`` compares them with the migrated schema, so the two cannot drift.
Relations are :class:`~tenantdb.tenancy.TenantForeignKey` columns (``itinerary.user_id``,
with ``itinerary.user`` and ``user.itineraries``): the database holds them as composite
``(org_id, x_id)`` keys, which Peewee's ``ForeignKeyField`` cannot express.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from peewee import BooleanField, CompositeKey, DateField, IntegerField, TextField, UUIDField
from pgvector.peewee import VectorField
from playhouse.postgres_ext import BinaryJSONField, DateTimeTZField

from .tenancy import BaseModel, TenantForeignKey, TenantModel, TenantRootModel
from .verifier import register_tenant_table

__all__ = [
    "ALL_MODELS",
    "EMBEDDING_DIMENSIONS",
    "TENANT_MODELS",
    "AgentRun",
    "Destination",
    "Embedding",
    "IdempotencyKey",
    "Itinerary",
    "KnowledgeItem",
    "Org",
    "RefreshToken",
    "TenantRowModel",
    "User",
]

EMBEDDING_DIMENSIONS = 1536


def utcnow() -> datetime:
    """Timezone-aware now, the default of every ``timestamptz`` column."""
    return datetime.now(timezone.utc)


class _Timestamped:
    """``save()`` of an existing row refreshes its ``updated_at``."""

    def save(self, force_insert: bool = False, only: Any = None) -> int:
        if not force_insert and "updated_at" in self._meta.fields:  # type: ignore[attr-defined]
            self.updated_at = utcnow()
            if only is not None:
                only = [*only, "updated_at"]
        return super().save(force_insert=force_insert, only=only)  # type: ignore[misc,no-any-return]


class Org(_Timestamped, TenantRootModel):
    """The tenant root: every tenant row belongs to one org.

    ``Org.select(org_id=A)`` (or any query pinning ``Org.id``) reads org A only; create and
    delete orgs with :func:`tenantdb.orgs.create_org` / :func:`tenantdb.orgs.delete_org`.
    """

    id = UUIDField(primary_key=True, default=uuid.uuid4)
    name = TextField()
    slug = TextField(unique=True)
    created_at = DateTimeTZField(default=utcnow)
    updated_at = DateTimeTZField(default=utcnow)


# The org's own column of the root is its id: the verifier pins org rows by it.
register_tenant_table(Org._meta.table_name, "id")


class TenantRowModel(_Timestamped, TenantModel):
    """A tenant table keyed ``(org_id, id)``: two orgs may hold rows with the same ``id``."""

    _tenantdb_abstract = True
    id = UUIDField(default=uuid.uuid4)

    class Meta:
        primary_key = CompositeKey("org_id", "id")


class User(TenantRowModel):
    email = TextField()
    display_name = TextField(null=True)
    role = TextField(default="member")
    password_hash = TextField(null=True)
    is_active = BooleanField(default=True)
    created_at = DateTimeTZField(default=utcnow)
    updated_at = DateTimeTZField(default=utcnow)

    class Meta:
        table_name = "app_user"


class RefreshToken(TenantRowModel):
    user_id = TenantForeignKey(User, backref="refresh_tokens")
    token_hash = TextField()
    expires_at = DateTimeTZField()
    revoked_at = DateTimeTZField(null=True)
    created_at = DateTimeTZField(default=utcnow)


class Destination(TenantRowModel):
    name = TextField()
    country = TextField(null=True)
    description = TextField(null=True)
    metadata = BinaryJSONField(default=dict)
    created_at = DateTimeTZField(default=utcnow)
    updated_at = DateTimeTZField(default=utcnow)


class KnowledgeItem(TenantRowModel):
    destination_id = TenantForeignKey(Destination, backref="knowledge_items", null=True)
    title = TextField()
    content = TextField()
    source_url = TextField(null=True)
    metadata = BinaryJSONField(default=dict)
    created_at = DateTimeTZField(default=utcnow)
    updated_at = DateTimeTZField(default=utcnow)


class Embedding(TenantRowModel):
    knowledge_item_id = TenantForeignKey(KnowledgeItem, backref="embeddings")
    chunk_index = IntegerField(default=0)
    content = TextField()
    vector = VectorField(EMBEDDING_DIMENSIONS)
    model = TextField()
    created_at = DateTimeTZField(default=utcnow)


class AgentRun(TenantRowModel):
    user_id = TenantForeignKey(User, backref="agent_runs")
    status = TextField(default="queued")
    intent = BinaryJSONField(default=dict)
    plan_snapshot = BinaryJSONField(null=True)
    tool_log = BinaryJSONField(null=True)
    error = TextField(null=True)
    started_at = DateTimeTZField(null=True)
    finished_at = DateTimeTZField(null=True)
    created_at = DateTimeTZField(default=utcnow)
    updated_at = DateTimeTZField(default=utcnow)


class Itinerary(TenantRowModel):
    user_id = TenantForeignKey(User, backref="itineraries")
    agent_run_id = TenantForeignKey(AgentRun, backref="itineraries", null=True)
    destination_id = TenantForeignKey(Destination, backref="itineraries", null=True)
    title = TextField()
    status = TextField(default="draft")
    data = BinaryJSONField(default=dict)
    start_date = DateField(null=True)
    end_date = DateField(null=True)
    created_at = DateTimeTZField(default=utcnow)
    updated_at = DateTimeTZField(default=utcnow)


class IdempotencyKey(_Timestamped, TenantModel):
    """An idempotency key, unique per (org, user): never global (see DESIGN.md)."""

    user_id = TenantForeignKey(User, backref="idempotency_keys")
    key = TextField()
    status = TextField(default="pending")
    body_hash = TextField()
    headers_hash = TextField(default="")
    response_status = IntegerField(null=True)
    response_body = BinaryJSONField(null=True)
    locked_until = DateTimeTZField(null=True)
    ttl_until = DateTimeTZField()
    created_at = DateTimeTZField(default=utcnow)
    updated_at = DateTimeTZField(default=utcnow)

    class Meta:
        primary_key = CompositeKey("org_id", "user_id", "key")


TENANT_MODELS: tuple[type[TenantModel], ...] = (
    User, RefreshToken, Destination, KnowledgeItem, Embedding, AgentRun, Itinerary,
    IdempotencyKey,
)
ALL_MODELS: tuple[type[BaseModel], ...] = (Org, *TENANT_MODELS)
