"""The test application's models: TenantModel subclasses like the package's own."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from peewee import TextField
from playhouse.postgres_ext import DateTimeTZField

from tenantdb.models import Destination, TenantRowModel, utcnow
from tenantdb.table_retention import register_retention_policy
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


# Notes go after 30 days; which destination a note was about is forgotten after 7.
register_retention_policy("trip_notes", TripNote, time_column="created_at",
                          window=timedelta(days=30))
register_retention_policy("trip_note_places", TripNote, time_column="created_at",
                          window=timedelta(days=7), action="scrub",
                          scrub_columns=("destination_id",))
