"""A per-org summary of what the database holds (``tenantdb report``)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from peewee import fn

from .context import cross_org
from .db import database
from .models import Org
from .seeds import seed_tables
from .tenancy import TenantModel

__all__ = ["OrgSummary", "org_summary"]


@dataclass(frozen=True)
class OrgSummary:
    """One org and its row count in every tenant table."""

    org_id: uuid.UUID
    name: str
    slug: str
    counts: dict[str, int]


def org_summary() -> list[OrgSummary]:
    """Every org with its row counts per tenant table, ordered by name (one query per table).

    The tables are the package's and those of every application model imported so far
    whose table exists (a model may be imported where its migrations were not applied).
    """
    existing = set(database.get_tables())
    models = [model for model in seed_tables().values()
              if issubclass(model, TenantModel) and model._meta.table_name in existing]
    with cross_org(reason="org summary report"):
        per_table: dict[str, dict[uuid.UUID, int]] = {
            model._meta.table_name: dict(
                model.select(model.org_id, fn.COUNT(model.org_id))
                .group_by(model.org_id)
                .tuples()
            )
            for model in models
        }
        orgs = list(Org.select().order_by(Org.name, Org.id))
    return [
        OrgSummary(org.id, org.name, org.slug,
                   {table: counts.get(org.id, 0) for table, counts in per_table.items()})
        for org in orgs
    ]
