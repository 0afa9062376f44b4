"""The scoped hot paths' shortcuts keep every guarantee of the long way round.

``get_by_id`` runs SQL built once per model (:mod:`tenantdb.planned`); a statement whose SQL
was verified before reuses its verdict when its org places agree (:mod:`tenantdb.verdicts`);
loaded rows are built without the model's keyword handling. Each test would fail if the
shortcut served another org, skipped a check, or changed what a row looks like.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import peewee
import pytest
from peewee import Table, fn
from tenancy_fixtures import IDS, TwoOrgs

from tenantdb import peewee_internals as pi
from tenantdb import planned, tenancy, verdicts
from tenantdb.db import TenantDatabase
from tenantdb.errors import CrossOrgError, UnscopedQueryError
from tenantdb.models import TENANT_MODELS, Destination, Itinerary, KnowledgeItem
from tenantdb.tenancy import cross_org
from tenantdb.verifier import register_tenant_table

ROW_MODELS = [m for m in TENANT_MODELS if "id" in m._meta.fields]


@pytest.fixture
def walks(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """The queries the verifier walks (not those whose verdict was reused)."""
    verdicts.clear()
    walked: list[Any] = []
    verify = verdicts.verify

    def counting(query: Any) -> Any:
        walked.append(query)
        return verify(query)

    monkeypatch.setattr(verdicts, "verify", counting)
    yield walked
    verdicts.clear()


# -- get_by_id: SQL built once per model -----------------------------------------------------


@pytest.mark.parametrize("model", ROW_MODELS, ids=lambda m: m.__name__)
def test_get_by_id_reads_the_row_of_its_org_only(twins: TwoOrgs, model: Any) -> None:
    key = IDS[{"RefreshToken": "token", "KnowledgeItem": "item", "AgentRun": "run"}.get(
        model.__name__, model.__name__.lower())]
    for org in (twins.a, twins.b, twins.a):
        row = model.get_by_id(key, org_id=org)
        assert (row.org_id, row.id) == (org, key)
    with pytest.raises(model.DoesNotExist, match="does not exist"):
        model.get_by_id(uuid.uuid4(), org_id=twins.a)


def test_get_by_id_rows_equal_select_rows_clean_and_bound_to_their_org(twins: TwoOrgs) -> None:
    fast = Itinerary.get_by_id(IDS["itinerary"], org_id=twins.a)
    slow = Itinerary.select(org_id=twins.a).where(Itinerary.id == IDS["itinerary"]).get()
    assert fast.__data__ == slow.__data__
    assert not fast.is_dirty()
    assert fast.destination.description == str(twins.a)  # relations resolve in its org
    fast.title = "Renamed"
    fast.save()
    assert Itinerary.get_by_id(IDS["itinerary"], org_id=twins.b).title == "Trip"
    with pytest.raises(CrossOrgError):
        fast.org_id = twins.b


def test_get_by_id_builds_no_sql_after_the_first_call(twins: TwoOrgs,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    Destination.get_by_id(IDS["destination"], org_id=twins.a)
    built: list[object] = []
    context = TenantDatabase.get_sql_context

    def counting(self: TenantDatabase, **options: Any) -> Any:
        built.append(options)
        return context(self, **options)

    monkeypatch.setattr(TenantDatabase, "get_sql_context", counting)
    for org in (twins.a, twins.b):
        assert Destination.get_by_id(IDS["destination"], org_id=org).description == str(org)
    assert built == []
    statement = planned.by_id_statement(Destination)
    assert statement is planned.by_id_statement(Destination)
    assert '"org_id" = %s' in statement.sql and '"id" = %s' in statement.sql


def test_a_model_with_its_own_select_gets_by_id_through_it(twins: TwoOrgs) -> None:
    hidden = ["Nothing"]

    class ListedDestination(Destination):
        """Hides, from every read, the destinations named as the list says at the time."""

        class Meta:
            table_name = "destination"

        @classmethod
        def select(cls, *fields: Any, org_id: Any = None) -> Any:
            return super().select(*fields, org_id=org_id).where(cls.name != hidden[0])

    assert ListedDestination.get_by_id(IDS["destination"], org_id=twins.a).name == "Lisbon"
    hidden[0] = "Lisbon"
    with pytest.raises(ListedDestination.DoesNotExist):
        ListedDestination.get_by_id(IDS["destination"], org_id=twins.a)


def test_get_by_id_inside_cross_org_reads_the_named_org(twins: TwoOrgs) -> None:
    with cross_org("support looks at one org"):
        assert Destination.get_by_id(IDS["destination"], org_id=twins.b).description == \
            str(twins.b)


def test_get_by_id_refuses_a_bad_key_as_the_long_way_does(twins: TwoOrgs,
                                                          tenant_db: TenantDatabase) -> None:
    with pytest.raises(peewee.DataError), tenant_db.atomic():
        Destination.get(Destination.id == "not-a-uuid", org_id=twins.a)
    with pytest.raises(peewee.DataError), tenant_db.atomic():
        Destination.get_by_id("not-a-uuid", org_id=twins.a)


def test_get_by_id_from_many_threads_each_gets_its_own_org(committed_twins: TwoOrgs) -> None:
    twins = committed_twins
    planned._statements.clear()  # the first use races too
    wrong: list[tuple[uuid.UUID, object]] = []

    def reader(org: uuid.UUID) -> None:
        for _ in range(40):
            row = Destination.get_by_id(IDS["destination"], org_id=org)
            if row.description != str(org):
                wrong.append((org, row.description))

    threads = [threading.Thread(target=reader, args=(org,)) for org in [twins.a, twins.b] * 4]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []


# -- verdicts reused by SQL text -------------------------------------------------------------


def test_a_reused_verdict_takes_the_org_of_the_new_statement(twins: TwoOrgs,
                                                              walks: list[Any]) -> None:
    for org in (twins.a, twins.b, twins.a, twins.b):
        assert [d.description for d in Destination.select(org_id=org)] == [str(org)]
    assert len(walks) == 1


def test_the_same_sql_with_two_orgs_is_walked_and_refused(twins: TwoOrgs,
                                                          walks: list[Any]) -> None:
    same = Destination.select(org_id=twins.a).where(Destination.org_id == twins.a)
    assert len(list(same)) == 1
    mixed = Destination.select(org_id=twins.a).where(Destination.org_id == twins.b)
    with pytest.raises(CrossOrgError):
        list(mixed)
    assert len(walks) == 2


def test_a_value_that_happened_to_equal_the_org_does_not_pin_its_place(
        twins: TwoOrgs, walks: list[Any]) -> None:
    Destination.create(org_id=twins.a, id=twins.a, name="Named after its org")
    walks.clear()
    query = Destination.select(org_id=twins.a)
    assert [d.name for d in query.where(Destination.id == twins.a)] == ["Named after its org"]
    assert [d.name for d in query.where(Destination.id == IDS["destination"])] == ["Lisbon"]
    assert len(walks) == 2


def test_registering_a_tenant_table_forgets_the_verdicts(tenant_db: TenantDatabase,
                                                         walks: list[Any]) -> None:
    shelf = Table("tenantdb_test_shelf", ["id"])
    query = shelf.select(shelf.id).bind(tenant_db)
    assert walks == [] and verdicts.verify_statement(query, "SELECT 1", ()).tenant is False
    verdicts.verify_statement(query, "SELECT 1", ())
    assert len(walks) == 1
    register_tenant_table("destination")  # already one: the registry changes all the same
    verdicts.verify_statement(query, "SELECT 1", ())
    assert len(walks) == 2


def test_the_remembered_shapes_are_bounded(twins: TwoOrgs, walks: list[Any],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verdicts, "MAX_SHAPES", 3)
    for size in range(1, 8):
        list(Destination.select(org_id=twins.a).limit(size))
    assert 1 <= len(verdicts._shapes) <= 3


def test_an_unscoped_query_is_refused_whatever_ran_before(twins: TwoOrgs,
                                                          walks: list[Any]) -> None:
    assert len(list(Destination.select(org_id=twins.a))) == 1
    with cross_org("a query built here runs outside"):
        unscoped = Destination.select()
    with pytest.raises(UnscopedQueryError):
        list(unscoped)


# -- default column lists replayed -------------------------------------------------------------


def _shapes(a: uuid.UUID) -> list[Any]:
    """Queries whose default column lists render in different places and aliases."""
    items = KnowledgeItem.select(org_id=a)
    dests = Destination.select(org_id=a)
    cte = Destination.select(org_id=a).cte("d")
    return [
        dests,
        dests.order_by(Destination.created_at.desc()).limit(20),
        items.join(Destination),  # two models: the joined one gets "t2"
        Destination.select(org_id=a).where(Destination.id.in_(
            KnowledgeItem.select(KnowledgeItem.destination_id, org_id=a))),
        dests | Destination.select(org_id=a).where(Destination.name == "x"),
        cte.select_from(cte.c.id).with_cte(cte),
        Destination.select(org_id=a).with_cte(cte).where(Destination.id.in_(
            cte.select_from(cte.c.id))),
        Destination.select(Destination.id, org_id=a),  # named columns: Peewee renders them
    ]


def test_replayed_column_lists_are_peewees_own_sql(twins: TwoOrgs, tenant_db: TenantDatabase,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    context = tenant_db.get_sql_context
    replayed = [context().sql(q).query() for q in _shapes(twins.a) for _ in (1, 2)]
    assert tenancy._selections  # something was remembered
    monkeypatch.setattr(tenancy.TenantSelect, "__sql_selection__",
                        peewee.ModelSelect.__sql_selection__)
    tenancy._selections.clear()
    own = [context().sql(q).query() for q in _shapes(twins.a) for _ in (1, 2)]
    assert tenancy._selections == {}
    assert replayed == own


def test_replayed_column_lists_read_the_right_rows(twins: TwoOrgs) -> None:
    for _ in range(2):
        for query in _shapes(twins.a)[:4]:
            rows = list(query)
            assert rows and all(row.org_id == twins.a for row in rows)


# -- loaded rows built without a setattr per field ------------------------------------------------


def test_loaded_rows_equal_rows_built_by_the_model(twins: TwoOrgs) -> None:
    fast = Destination.select(org_id=twins.a).get()
    slow = Destination(**{pi.NO_DEFAULT: 1}, **fast.__data__)
    assert fast.__data__ == slow.__data__ and not fast.is_dirty()
    assert fast.__rel__ == {}
    fast.name = "Changed"
    assert fast.dirty_fields == [Destination.name]
    with pytest.raises(CrossOrgError):
        fast.org_id = twins.b


def test_selected_expressions_land_as_attributes_not_columns(twins: TwoOrgs) -> None:
    (row,) = Destination.select(Destination.id, fn.LENGTH(Destination.name).alias("size"),
                                org_id=twins.a)
    # (Peewee converts a function of a text column as text.)
    assert int(row.size) == len("Lisbon") and "size" not in row.__data__
    assert row.id == IDS["destination"] and row.org_id is None  # not selected
    row.name = "Porto"
    row.save()  # remembers its org although org_id was not loaded
    assert Destination.get_by_id(IDS["destination"], org_id=twins.a).name == "Porto"
    assert Destination.get_by_id(IDS["destination"], org_id=twins.b).name == "Lisbon"


def test_a_model_whose_accessors_do_more_is_built_by_them(twins: TwoOrgs) -> None:
    class Linked(Destination):
        class Meta:
            table_name = "destination"

    Linked._meta.add_field("self_ref", peewee.ForeignKeyField(
        Linked, column_name="id", field="id", null=True, lazy_load=False))
    assert not tenancy._stores_columns_as_given(Linked)
    assert tenancy._stores_columns_as_given(Destination)
