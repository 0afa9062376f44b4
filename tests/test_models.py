"""The models mirror the migrated schema, and TenantModel's entry points need an org."""

from __future__ import annotations

import uuid
from typing import Any

import peewee
import pytest
from pgvector.peewee import VectorField
from playhouse.postgres_ext import BinaryJSONField, DateTimeTZField
from tenancy_fixtures import TwoOrgs

from tenantdb.db import TenantDatabase
from tenantdb.errors import MissingOrgError
from tenantdb.models import ALL_MODELS, Destination, IdempotencyKey
from tenantdb.orgs import create_org
from tenantdb.tenancy import BaseModel, cross_org

PG_TYPES: dict[type[peewee.Field], str] = {
    peewee.UUIDField: "uuid",
    peewee.TextField: "text",
    peewee.IntegerField: "int4",
    peewee.BooleanField: "bool",
    DateTimeTZField: "timestamptz",
    peewee.DateField: "date",
    BinaryJSONField: "jsonb",
    VectorField: "vector",
}

# Columns the server computes (GENERATED ALWAYS ... STORED) have no model field: nobody
# writes them, and selecting them with every row would fetch them for nothing.
COLUMNS_SQL = """
    SELECT column_name, udt_name, is_nullable = 'YES'
    FROM information_schema.columns WHERE table_schema = 'public' AND table_name = %s
      AND is_generated = 'NEVER'
"""
GENERATED_SQL = """
    SELECT table_name, column_name FROM information_schema.columns
    WHERE table_schema = 'public' AND is_generated <> 'NEVER'
"""
PRIMARY_KEY_SQL = """
    SELECT a.attname FROM pg_index i
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
    WHERE i.indrelid = %s::regclass AND i.indisprimary
"""
TABLES_SQL = """
    SELECT table_name FROM information_schema.tables
    WHERE table_schema = 'public' AND table_name <> 'tenantdb_schema_history'
"""


def pg_type(field: peewee.Field) -> str:
    for cls in type(field).__mro__:
        if cls in PG_TYPES:
            return PG_TYPES[cls]
    raise AssertionError(f"no PostgreSQL type known for {type(field).__name__}")


def rows(db: TenantDatabase, query: str, *params: Any) -> list[tuple[Any, ...]]:
    return list(db.execute_sql(query, params).fetchall())


def test_every_table_has_a_model(tenant_db: TenantDatabase) -> None:
    tables = {name for (name,) in rows(tenant_db, TABLES_SQL)}
    assert tables == {model._meta.table_name for model in ALL_MODELS}


@pytest.mark.parametrize("model", ALL_MODELS, ids=lambda m: m.__name__)
def test_model_matches_migrated_table(tenant_db: TenantDatabase, model: type[BaseModel]) -> None:
    table = model._meta.table_name
    in_db = {name: (udt, nullable) for name, udt, nullable in rows(tenant_db, COLUMNS_SQL, table)}
    in_model = {f.column_name: (pg_type(f), f.null) for f in model._meta.sorted_fields}
    assert in_model == in_db

    pk_db = {name for (name,) in rows(tenant_db, PRIMARY_KEY_SQL, table)}
    pk = model._meta.primary_key
    pk_model = set(pk.field_names) if isinstance(pk, peewee.CompositeKey) else {pk.column_name}
    assert pk_model == pk_db


def test_the_only_generated_column_is_the_quantized_vector(tenant_db: TenantDatabase) -> None:
    # V01_09's vector_bits (knowledge search); any other would escape the comparison above.
    assert rows(tenant_db, GENERATED_SQL) == [("embedding", "vector_bits")]


@pytest.mark.parametrize("bad", [None, "", 0, "not-a-uuid", 42, b"bytes"])
def test_select_without_valid_org_raises(tenant_db: TenantDatabase, bad: Any) -> None:
    with pytest.raises(MissingOrgError):
        Destination.select(org_id=bad)


def test_select_without_org_names_the_fix(tenant_db: TenantDatabase) -> None:
    with pytest.raises(MissingOrgError, match=r"Destination.select\(\) needs org_id=.*cross_org"):
        Destination.select()


def test_select_with_org_returns_only_that_orgs_rows(two_orgs: TwoOrgs) -> None:
    same_id = uuid.uuid4()
    Destination.create(org_id=two_orgs.a, id=same_id, name="Lisbon")
    Destination.create(org_id=two_orgs.b, id=same_id, name="Lisbon")
    Destination.create(org_id=two_orgs.b, name="Porto")

    rows_a = list(Destination.select(org_id=two_orgs.a))

    assert [(r.org_id, r.id, r.name) for r in rows_a] == [(two_orgs.a, same_id, "Lisbon")]
    assert Destination.select(org_id=str(two_orgs.b)).count() == 2


def test_get_and_get_by_id_are_scoped(two_orgs: TwoOrgs) -> None:
    dest = Destination.create(org_id=two_orgs.b, name="Kyoto")

    assert Destination.get_by_id(dest.id, org_id=two_orgs.b).name == "Kyoto"
    with pytest.raises(Destination.DoesNotExist):
        Destination.get_by_id(dest.id, org_id=two_orgs.a)
    assert Destination.get_or_none(Destination.name == "Kyoto", org_id=two_orgs.a) is None
    assert Destination.get(org_id=two_orgs.b, name="Kyoto").id == dest.id
    with pytest.raises(MissingOrgError):
        Destination.get(Destination.name == "Kyoto")


def test_create_requires_org(tenant_db: TenantDatabase) -> None:
    with pytest.raises(MissingOrgError, match=r"Destination.create\(\)"):
        Destination.create(name="Nowhere")
    with pytest.raises(MissingOrgError):
        Destination.create(org_id="", name="Nowhere")


def test_get_by_id_on_model_without_id_is_a_type_error(org_id: uuid.UUID) -> None:
    with pytest.raises(TypeError, match="no id column"):
        IdempotencyKey.get_by_id("k", org_id=org_id)


def test_cross_org_allows_unscoped_select(two_orgs: TwoOrgs) -> None:
    Destination.create(org_id=two_orgs.a, name="A-only")
    Destination.create(org_id=two_orgs.b, name="B-only")
    with cross_org(reason="test: count across orgs"):
        names = {d.name for d in Destination.select()}
    assert {"A-only", "B-only"} <= names
    with pytest.raises(MissingOrgError):
        Destination.select()


def test_cross_org_needs_a_reason() -> None:
    with pytest.raises(ValueError, match="needs a reason"), cross_org(reason="  "):
        pass


def test_save_updates_only_its_own_org_row(two_orgs: TwoOrgs) -> None:
    same_id = uuid.uuid4()
    a = Destination.create(org_id=two_orgs.a, id=same_id, name="Same")
    Destination.create(org_id=two_orgs.b, id=same_id, name="Same")

    a.description = "changed by A"
    a.save()

    assert Destination.get_by_id(same_id, org_id=two_orgs.a).description == "changed by A"
    assert Destination.get_by_id(same_id, org_id=two_orgs.b).description is None


def test_org_slug_is_unique(tenant_db: TenantDatabase) -> None:
    create_org("One", "same-slug")
    with pytest.raises(peewee.IntegrityError), tenant_db.atomic():
        create_org("Two", "same-slug")


def test_composite_foreign_key_blocks_cross_org_reference(two_orgs: TwoOrgs) -> None:
    from tenantdb.models import KnowledgeItem

    dest_b = Destination.create(org_id=two_orgs.b, name="B's")
    with pytest.raises(peewee.IntegrityError), KnowledgeItem._meta.database.atomic():
        KnowledgeItem.create(org_id=two_orgs.a, destination_id=dest_b.id, title="t", content="c")
