"""The test application's models: TenantModel subclasses like the package's own."""

from __future__ import annotations

from pathlib import Path

from peewee import TextField
from playhouse.postgres_ext import DateTimeTZField

from tenantdb.models import Destination, TenantRowModel, utcnow
from tenantdb.tenancy import TenantForeignKey

__all__ = ["LOCATION", "SEEDS", "TripBoard", "TripNote"]

LOCATION = Path(__file__).parent / "trip_notes"
SEEDS = Path(__file__).parent / "seeds"


class TripBoard(TenantRowModel):
    title = TextField()
    created_at = DateTimeTZField(default=utcnow)


class TripNote(TenantRowModel):
    board_id = TenantForeignKey(TripBoard, backref="notes")
    destination_id = TenantForeignKey(Destination, backref="trip_notes", null=True)
    body = TextField()
    created_at = DateTimeTZField(default=utcnow)
