"""Acting as org A never returns, changes or deletes a row of org B, on any Peewee path.

Orgs A and B hold rows with identical ids and natural keys (tests/tenancy_fixtures.py), so
a predicate that forgets the org shows up as B's row, a doubled join, or a changed B row.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import peewee
import pytest
from helpers import StatementLog
from peewee import JOIN, Table, fn
from playhouse.shortcuts import model_to_dict
from tenancy_fixtures import IDS, TwoOrgs

from tenantdb.db import TenantDatabase
from tenantdb.errors import CrossOrgError, MissingOrgError, TenancyError, UnscopedQueryError
from tenantdb.models import (
    TENANT_MODELS,
    AgentRun,
    Destination,
    Embedding,
    IdempotencyKey,
    Itinerary,
    KnowledgeItem,
    Org,
    TenantRowModel,
    User,
)
from tenantdb.tenancy import TenantModel, cross_org, execute_scoped, prefetch
from tenantdb.verifier import verify

ROW_MODELS = [m for m in TENANT_MODELS if "id" in m._meta.fields]



def descriptions(org: uuid.UUID) -> dict[uuid.UUID, Any]:
    return {d.id: d.description for d in Destination.select(org_id=org)}


def b_unchanged(twins: TwoOrgs) -> None:
    """B's destination still reads exactly as created."""
    assert descriptions(twins.b) == {IDS["destination"]: str(twins.b)}


# -- the conformance list ------------------------------------------------------------------

# Every public attribute of peewee.Model is either a tested entry point (below) or harmless:
# it runs no statement on a tenant table (add_index only records an index for create_table;
# table_exists reads the catalog).
HARMLESS = {"add_index", "bind", "bind_ctx", "clone", "coerce", "copy", "dependencies",
            "dirty_field_names", "dirty_fields", "get_id", "index", "is_alias", "is_dirty",
            "table_exists", "unwrap", "validate_model"}
ENTRY_POINTS: dict[str, str] = {}


def entry_point(*names: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    def register(test: Callable[..., None]) -> Callable[..., None]:
        for name in names:
            ENTRY_POINTS[name] = test.__name__
        return test
    return register


def test_every_peewee_entry_point_is_tested_or_harmless() -> None:
    public = {n for n in dir(peewee.Model) if not n.startswith("_")}
    class_shortcuts = {"__getitem__", "__setitem__", "__delitem__", "__contains__", "__len__",
                       "__iter__"}
    assert class_shortcuts <= set(vars(peewee.ModelBase))
    untested = (public | class_shortcuts) - HARMLESS - set(ENTRY_POINTS)
    assert untested == set(), f"new Peewee entry points without a tenancy test: {untested}"


# -- reads ---------------------------------------------------------------------------------


@entry_point("select")
@pytest.mark.parametrize("model", TENANT_MODELS, ids=lambda m: m.__name__)
def test_select_returns_only_own_org(twins: TwoOrgs, model: type[TenantModel]) -> None:
    rows = list(model.select(org_id=twins.a))
    assert len(rows) == 1 and rows[0].org_id == twins.a
    with pytest.raises(MissingOrgError):
        model.select()


@entry_point("get", "get_or_none", "get_by_id")
@pytest.mark.parametrize("model", ROW_MODELS, ids=lambda m: m.__name__)
def test_get_paths_return_own_org_row(twins: TwoOrgs, model: type[TenantModel]) -> None:
    same_id = model._meta.fields["id"]
    row_id = next(iter(model.select(org_id=twins.a))).id
    assert model.get(same_id == row_id, org_id=twins.a).org_id == twins.a
    got = model.get_or_none(same_id == row_id, org_id=twins.b)
    assert got is not None and got.org_id == twins.b
    assert model.get_by_id(row_id, org_id=twins.a).org_id == twins.a
    for call in (lambda: model.get(same_id == row_id), lambda: model.get_by_id(row_id),
                 lambda: model.get_or_none(same_id == row_id)):
        with pytest.raises(MissingOrgError):
            call()


@entry_point("get_or_create")
def test_get_or_create_finds_or_creates_in_own_org(twins: TwoOrgs) -> None:
    found, created = Destination.get_or_create(org_id=twins.a, name="Lisbon")
    assert (found.org_id, created) == (twins.a, False)
    made, created = Destination.get_or_create(org_id=twins.a, name="Porto",
                                              defaults={"country": "PT"})
    assert (made.org_id, made.country, created) == (twins.a, "PT", True)
    assert Destination.get_or_none(Destination.name == "Porto", org_id=twins.b) is None
    with pytest.raises(MissingOrgError):
        Destination.get_or_create(name="Porto")


@entry_point("filter")
def test_filter_is_scoped(twins: TwoOrgs) -> None:
    rows = list(Destination.filter(org_id=twins.a, name="Lisbon"))
    assert [r.org_id for r in rows] == [twins.a]
    with pytest.raises(MissingOrgError):
        Destination.filter(name="Lisbon")


@entry_point("__getitem__", "__setitem__", "__delitem__", "__contains__", "__len__", "__iter__")
def test_class_shortcuts_cannot_name_an_org(twins: TwoOrgs) -> None:
    shortcuts: list[Callable[[], Any]] = [
        lambda: Destination[IDS["destination"]],
        lambda: Destination.__setitem__(IDS["destination"], {"name": "x"}),
        lambda: Destination.__delitem__(IDS["destination"]),
        lambda: IDS["destination"] in Destination,
        lambda: len(Destination),
        lambda: list(Destination),
    ]
    for shortcut in shortcuts:
        with pytest.raises(MissingOrgError, match="cannot name an org"):
            shortcut()
    b_unchanged(twins)


def test_relation_accessors_stay_in_the_instance_org(twins: TwoOrgs) -> None:
    itinerary = Itinerary.get_by_id(IDS["itinerary"], org_id=twins.a)
    assert itinerary.user.org_id == twins.a
    assert itinerary.agent_run.org_id == twins.a
    assert itinerary.destination.description == str(twins.a)
    user = User.get_by_id(IDS["user"], org_id=twins.b)
    assert [i.org_id for i in user.itineraries] == [twins.b]
    assert [r.org_id for r in user.agent_runs] == [twins.b]


def test_relation_assignment_across_orgs_is_refused(twins: TwoOrgs) -> None:
    itinerary = Itinerary.get_by_id(IDS["itinerary"], org_id=twins.a)
    with pytest.raises(CrossOrgError):
        itinerary.user = User.get_by_id(IDS["user"], org_id=twins.b)


def test_prefetch_loads_children_and_parents_of_own_org(twins: TwoOrgs) -> None:
    destinations = prefetch(Destination.select(org_id=twins.a), KnowledgeItem, Itinerary)
    assert [d.org_id for d in destinations] == [twins.a]
    assert [k.org_id for k in destinations[0].knowledge_items] == [twins.a]
    assert [i.org_id for i in destinations[0].itineraries] == [twins.a]
    items = prefetch(KnowledgeItem.select(org_id=twins.a), Destination)
    assert items[0].destination.org_id == twins.a
    with pytest.raises(CrossOrgError):
        prefetch(Destination.select(org_id=twins.a), KnowledgeItem.select(org_id=twins.b))


def test_peewee_prefetch_with_a_bare_model_is_refused(twins: TwoOrgs) -> None:
    with pytest.raises(TenancyError):
        peewee.prefetch(Destination.select(org_id=twins.a), KnowledgeItem)


class _UserWithRuns(TenantRowModel):
    """``app_user`` seen through a plain Peewee foreign key, which registers a backref that
    ``model_to_dict(backrefs=True)`` follows (TenantForeignKey's accessors are not
    Peewee backrefs)."""

    _tenantdb_abstract = True  # a second model of the table: seeds and checks skip it
    email = peewee.TextField()

    class Meta:
        table_name = "app_user"


class _RunOfUser(TenantRowModel):
    _tenantdb_abstract = True
    user = peewee.ForeignKeyField(_UserWithRuns, field="id", column_name="user_id",
                                  backref="runs")

    class Meta:
        table_name = "agent_run"


def test_model_to_dict_with_backrefs_reads_nothing_of_other_orgs(
        twins: TwoOrgs, sql_log: StatementLog) -> None:
    user = _UserWithRuns.get_by_id(IDS["user"], org_id=twins.a)
    assert _UserWithRuns._meta.backrefs  # something for model_to_dict to follow
    sent = len(sql_log.statements)
    # The backref's query names no org: refused before it is sent, or B's run would come
    # back with A's (the twins share the run's id).
    with pytest.raises(MissingOrgError, match=r"_RunOfUser\.select"):
        model_to_dict(user, backrefs=True)
    assert sql_log.statements[sent:] == []
    # TenantForeignKey's backref reads the row's own org only.
    assert [(r.org_id, r.id) for r in User.get_by_id(IDS["user"], org_id=twins.a).agent_runs
            ] == [(twins.a, IDS["run"])]


@entry_point("raw")
def test_raw_needs_an_org_and_rls_hides_other_orgs(twins: TwoOrgs) -> None:
    forgetful = "SELECT * FROM destination"  # no org predicate: the database holds the line
    rows = list(Destination.raw(forgetful, org_id=twins.a))
    assert [r.org_id for r in rows] == [twins.a]
    with pytest.raises(MissingOrgError):
        Destination.raw(forgetful)


@entry_point("alias")
def test_alias_select_is_verified(twins: TwoOrgs) -> None:
    dest = Destination.alias()
    with pytest.raises(UnscopedQueryError, match="destination"):
        list(dest.select())
    rows = list(dest.select().where(dest.org_id == twins.a))
    assert [r.org_id for r in rows] == [twins.a]


def test_table_objects_are_verified(twins: TwoOrgs, tenant_db: TenantDatabase) -> None:
    table = Table("destination").bind(tenant_db)
    with pytest.raises(UnscopedQueryError):
        list(table.select())
    rows = list(table.select(table.c.org_id).where(table.c.org_id == twins.a).tuples())
    assert [uuid.UUID(str(org)) for (org,) in rows] == [twins.a]


def test_execute_sql_on_tenant_tables_is_refused(twins: TwoOrgs,
                                                 tenant_db: TenantDatabase) -> None:
    for sql in ("SELECT count(*) FROM destination", 'SELECT 1 FROM public."destination"',
                "select 1 from PUBLIC.Destination d"):
        with pytest.raises(UnscopedQueryError, match="execute_scoped"):
            tenant_db.execute_sql(sql)
    cursor = execute_scoped(twins.a, "SELECT org_id FROM destination")
    assert cursor.fetchall() == [(twins.a,)]
    assert tenant_db.execute_sql("SELECT 1").fetchone() == (1,)


@entry_point("noop")
def test_noop_reads_no_rows(twins: TwoOrgs) -> None:
    assert list(Destination.noop().tuples()) == []


# -- joins, subqueries, OR ---------------------------------------------------------------


def test_join_is_constrained_to_the_same_org(twins: TwoOrgs) -> None:
    query = (Itinerary.select(Itinerary.org_id, User.org_id, org_id=twins.a)
             .join(User, on=(Itinerary.user_id == User.id)))
    assert list(query.tuples()) == [(twins.a, twins.a)]


def test_join_without_on_uses_the_tenant_foreign_key(twins: TwoOrgs) -> None:
    query = Itinerary.select(Itinerary.org_id, User.org_id, org_id=twins.a).join(User)
    assert list(query.tuples()) == [(twins.a, twins.a)]


def test_outer_join_puts_the_org_in_on(twins: TwoOrgs) -> None:
    lonely = Destination.create(org_id=twins.a, name="Nowhere").id  # no knowledge items
    query = (Destination.select(Destination.id, KnowledgeItem.org_id, org_id=twins.a)
             .join(KnowledgeItem, JOIN.LEFT_OUTER,
                   on=(KnowledgeItem.destination_id == Destination.id)))
    # B's twin item never pairs with A's destination (the org is in ON), and the org term
    # keeps a destination without items (in WHERE it would drop the null-extended row).
    assert sorted(query.tuples(), key=str) == sorted(
        [(IDS["destination"], twins.a), (lonely, None)], key=str)


def test_unconstrained_join_through_an_alias_is_refused(twins: TwoOrgs) -> None:
    user = User.alias()
    query = (Itinerary.select(org_id=twins.a)
             .join_from(Itinerary, user, on=(Itinerary.user_id == user.id)))
    # The rewrite constrains aliases too, so this one is safe ...
    assert [i.org_id for i in query] == [twins.a]
    # ... and a query assembled without the rewrite is refused by the verifier.
    bare = (Itinerary.alias().select()
            .where(Itinerary.alias().org_id == twins.a))
    with pytest.raises(UnscopedQueryError):
        verify(bare)


def test_left_join_constrained_only_in_where_of_the_preserved_side_is_refused(
    twins: TwoOrgs,
) -> None:
    item = KnowledgeItem.alias()
    dest = Destination.alias()
    query = (dest.select(dest.id)
             .join(item, JOIN.LEFT_OUTER, on=(item.destination_id == dest.id))
             .where(dest.org_id == twins.a))
    with pytest.raises(UnscopedQueryError, match="knowledge_item"):
        list(query)
    linked = (dest.select(dest.id, item.org_id)
              .join(item, JOIN.LEFT_OUTER,
                    on=((item.destination_id == dest.id) & (item.org_id == dest.org_id)))
              .where(dest.org_id == twins.a))
    assert list(linked.tuples()) == [(IDS["destination"], twins.a)]


def test_subquery_without_org_is_refused(twins: TwoOrgs) -> None:
    item = KnowledgeItem.alias()
    inner = item.select(item.destination_id)
    query = Destination.select(org_id=twins.a).where(Destination.id.in_(inner))
    with pytest.raises(UnscopedQueryError, match="knowledge_item"):
        list(query)
    scoped = KnowledgeItem.select(KnowledgeItem.destination_id, org_id=twins.a)
    assert [d.org_id for d in Destination.select(org_id=twins.a)
            .where(Destination.id.in_(scoped))] == [twins.a]


def test_correlated_subquery_linked_by_org_is_accepted(twins: TwoOrgs) -> None:
    item = KnowledgeItem.alias()
    count = (item.select(fn.COUNT(item.id))
             .where((item.destination_id == Destination.id) & (item.org_id == Destination.org_id)))
    query = Destination.select(Destination.org_id, count.alias("n"), org_id=twins.a)
    assert list(query.tuples()) == [(twins.a, 1)]


def test_cte_and_union_are_verified(twins: TwoOrgs) -> None:
    dest = Destination.alias()
    cte = dest.select(dest.id).cte("ids")
    query = (Destination.select(org_id=twins.a).with_cte(cte)
             .where(Destination.id.in_(cte.select_from(cte.c.id))))
    with pytest.raises(UnscopedQueryError):
        list(query)
    union = Destination.select(Destination.id, org_id=twins.a) | dest.select(dest.id)
    with pytest.raises(UnscopedQueryError):
        list(union)


def test_orwhere_that_weakens_the_scope_is_refused(twins: TwoOrgs) -> None:
    with pytest.raises(UnscopedQueryError):
        Destination.select(org_id=twins.a).orwhere(Destination.name == "Lisbon")


def test_two_orgs_in_one_statement_are_refused(twins: TwoOrgs) -> None:
    query = (Destination.select(org_id=twins.a)
             .where(Destination.id.in_(KnowledgeItem.select(KnowledgeItem.destination_id,
                                                            org_id=twins.b))))
    with pytest.raises(CrossOrgError):
        list(query)


# -- writes ------------------------------------------------------------------------------


@entry_point("update")
def test_update_changes_only_own_org(twins: TwoOrgs) -> None:
    count = Destination.update(description="A was here", org_id=twins.a).execute()
    assert count == 1 and descriptions(twins.a)[IDS["destination"]] == "A was here"
    b_unchanged(twins)
    with pytest.raises(MissingOrgError):
        Destination.update(description="everyone")
    with pytest.raises(CrossOrgError):
        Destination.update({Destination.org_id: twins.b}, org_id=twins.a)


@entry_point("delete")
def test_delete_removes_only_own_org(twins: TwoOrgs) -> None:
    assert Embedding.delete(org_id=twins.a).execute() == 1
    assert Embedding.select(org_id=twins.a).count() == 0
    assert Embedding.select(org_id=twins.b).count() == 1
    with pytest.raises(MissingOrgError):
        Embedding.delete()


@entry_point("insert", "create")
def test_insert_and_create_need_the_org(twins: TwoOrgs) -> None:
    with pytest.raises(MissingOrgError):
        Destination.insert(name="Nowhere")
    with pytest.raises(MissingOrgError):
        Destination.create(name="Nowhere")
    Destination.insert(org_id=twins.a, name="Porto").execute()
    assert "Porto" in {d.name for d in Destination.select(org_id=twins.a)}
    assert "Porto" not in {d.name for d in Destination.select(org_id=twins.b)}


@entry_point("insert_many")
def test_insert_many_writes_one_org(twins: TwoOrgs) -> None:
    rows = [{"org_id": twins.a, "name": "X"}, {"org_id": twins.b, "name": "Y"}]
    with pytest.raises(CrossOrgError):
        Destination.insert_many(rows)
    with pytest.raises(CrossOrgError):
        Destination.insert_many([{"org_id": twins.b, "name": "Y"}], org_id=twins.a)
    with pytest.raises(MissingOrgError):
        Destination.insert_many([{"name": "Z"}])
    Destination.insert_many([{"name": "P"}, {"name": "Q"}], org_id=twins.a).execute()
    assert {"P", "Q"} <= {d.name for d in Destination.select(org_id=twins.a)}
    assert not {"P", "Q"} & {d.name for d in Destination.select(org_id=twins.b)}


@entry_point("insert_from")
def test_insert_from_copies_only_own_org_rows(twins: TwoOrgs) -> None:
    source = Destination.select(Destination.org_id, Destination.name.concat(" copy"),
                                org_id=twins.b)
    fields = [Destination.org_id, Destination.name]
    with pytest.raises(CrossOrgError):
        Destination.insert_from(source, fields, org_id=twins.a)
    dest = Destination.alias()
    unscoped = dest.select(dest.org_id, dest.name.concat(" copy"))
    with pytest.raises(UnscopedQueryError):
        Destination.insert_from(unscoped, fields, org_id=twins.a)
    own = Destination.select(Destination.org_id, Destination.name.concat(" copy"),
                             org_id=twins.a)
    Destination.insert_from(own, fields, org_id=twins.a).execute()
    assert "Lisbon copy" in {d.name for d in Destination.select(org_id=twins.a)}
    assert "Lisbon copy" not in {d.name for d in Destination.select(org_id=twins.b)}


@entry_point("replace", "replace_many")
def test_replace_overwrites_only_own_org_row(twins: TwoOrgs) -> None:
    Destination.replace(org_id=twins.a, id=IDS["destination"], name="Lisbon",
                        description="replaced").execute()
    assert descriptions(twins.a)[IDS["destination"]] == "replaced"
    Destination.replace_many([{"id": IDS["destination"], "name": "Lisbon",
                               "description": "again"}], org_id=twins.a).execute()
    assert descriptions(twins.a)[IDS["destination"]] == "again"
    b_unchanged(twins)
    with pytest.raises(MissingOrgError):
        Destination.replace(id=IDS["destination"], name="Lisbon")


@entry_point("set_by_id", "delete_by_id")
def test_set_and_delete_by_id_are_scoped(twins: TwoOrgs) -> None:
    Destination.set_by_id(IDS["destination"], {"description": "set"}, org_id=twins.a)
    assert descriptions(twins.a)[IDS["destination"]] == "set"
    b_unchanged(twins)
    with pytest.raises(MissingOrgError):
        Destination.set_by_id(IDS["destination"], {"description": "x"})
    assert Destination.delete_by_id(IDS["destination"], org_id=twins.a) == 1
    assert descriptions(twins.a) == {}
    b_unchanged(twins)
    with pytest.raises(MissingOrgError):
        Destination.delete_by_id(IDS["destination"])


@entry_point("bulk_update")
def test_bulk_update_changes_only_own_org(twins: TwoOrgs) -> None:
    row = Destination.get_by_id(IDS["destination"], org_id=twins.a)
    row.description = "bulk"
    assert Destination.bulk_update([row], fields=["description"]) == 1
    assert descriptions(twins.a)[IDS["destination"]] == "bulk"
    b_unchanged(twins)
    other = Destination.get_by_id(IDS["destination"], org_id=twins.b)
    with pytest.raises(CrossOrgError):
        Destination.bulk_update([row, other], fields=["description"])
    with pytest.raises(CrossOrgError):
        Destination.bulk_update([row], fields=["description"], org_id=twins.b)


@entry_point("bulk_create")
def test_bulk_create_writes_one_org(twins: TwoOrgs) -> None:
    Destination.bulk_create([Destination(name="M"), Destination(name="N")], org_id=twins.a)
    assert {"M", "N"} <= {d.name for d in Destination.select(org_id=twins.a)}
    with pytest.raises(CrossOrgError):
        Destination.bulk_create([Destination(org_id=twins.b, name="O")], org_id=twins.a)
    with pytest.raises(CrossOrgError):
        Destination.bulk_create([Destination(org_id=twins.a, name="O"),
                                 Destination(org_id=twins.b, name="O")])
    assert "O" not in {d.name for d in Destination.select(org_id=twins.b)}


@entry_point("save")
def test_save_updates_own_row_and_org_cannot_change(twins: TwoOrgs) -> None:
    row = Destination.get_by_id(IDS["destination"], org_id=twins.a)
    row.description = "saved"
    assert row.save() == 1
    b_unchanged(twins)
    with pytest.raises(CrossOrgError):
        row.org_id = twins.b
    Destination.delete_by_id(IDS["destination"], org_id=twins.a)
    with pytest.raises(Destination.DoesNotExist):
        row.save()
    fresh = Destination(org_id=twins.a, name="Fresh")
    fresh.save()
    assert Destination.get_by_id(fresh.id, org_id=twins.a).name == "Fresh"


@entry_point("delete_instance")
def test_delete_instance_deletes_only_own_row(twins: TwoOrgs) -> None:
    row = Destination.get_by_id(IDS["destination"], org_id=twins.a)
    assert row.delete_instance(recursive=True) == 1
    assert descriptions(twins.a) == {}
    b_unchanged(twins)
    assert KnowledgeItem.select(org_id=twins.b).count() == 1  # B's children untouched
    with pytest.raises(Destination.DoesNotExist):
        row.delete_instance()


@entry_point("create_table", "drop_table", "truncate_table")
@pytest.mark.parametrize("ddl", ["create_table", "drop_table", "truncate_table"])
def test_ddl_on_tenant_tables_is_refused(twins: TwoOrgs, ddl: str) -> None:
    statement: Callable[..., Any] = getattr(Destination, ddl)
    with pytest.raises(UnscopedQueryError):
        statement(**({} if ddl == "truncate_table" else {"safe": False}))
    b_unchanged(twins)


# -- cross_org ----------------------------------------------------------------------------


def test_cross_org_sees_all_orgs_and_is_gone_after(twins: TwoOrgs) -> None:
    with cross_org(reason="test: count both orgs"):
        assert Destination.select().where(Destination.id == IDS["destination"]).count() == 2
        query = Destination.select().where(Destination.id == IDS["destination"])
    with pytest.raises(UnscopedQueryError):
        query.count()  # no permission travels with the query: outside the block, refused
    with pytest.raises(MissingOrgError):
        Destination.select()


def test_cross_org_statements_run_as_the_bypass_role(twins: TwoOrgs,
                                                     tenant_db: TenantDatabase) -> None:
    with cross_org(reason="test: role"):
        (role,) = tenant_db.execute_sql("SELECT count(*) FROM destination").fetchone()
    assert role == 2
    (user,) = tenant_db.execute_sql("SELECT current_user").fetchone()
    assert user == "tenantdb_app"


def test_agent_run_json_round_trips_within_org(twins: TwoOrgs) -> None:
    run = AgentRun.get_by_id(IDS["run"], org_id=twins.b)
    assert run.intent == {"org": str(twins.b)}
    assert IdempotencyKey.get(org_id=twins.a, key="same-key").org_id == twins.a


# -- the tenant root: every Peewee entry point of Org ----------------------------------------

# Each public entry point of Org either is refused outside cross_org (unscoped reads, and
# every insert or delete: creating and deleting orgs is admin work), or is scoped by the
# org's own id (then it acts as that org).
ORG_REFUSED: dict[str, Callable[[TwoOrgs], Any]] = {
    "select": lambda t: list(Org.select()),
    "get": lambda t: Org.get(Org.slug.startswith("twin-")),
    "get_or_none": lambda t: Org.get_or_none(Org.name == "Twin B"),
    "get_or_create": lambda t: Org.get_or_create(slug="x", defaults={"name": "x"}),
    "filter": lambda t: list(Org.filter(name="Twin B")),
    "__iter__": lambda t: list(Org),
    "__len__": lambda t: len(Org),
    "raw": lambda t: list(Org.raw("SELECT * FROM org")),
    "alias": lambda t: list(Org.alias().select()),
    "update": lambda t: Org.update(name="x").execute(),
    "delete": lambda t: Org.delete().where(Org.id == t.b).execute(),
    "delete_by_id": lambda t: Org.delete_by_id(t.b),
    "__delitem__": lambda t: Org.__delitem__(t.b),
    "delete_instance": lambda t: Org.get_by_id(t.b).delete_instance(),
    "insert": lambda t: Org.insert(name="x", slug="x").execute(),
    "create": lambda t: Org.create(name="x", slug="x"),
    "insert_many": lambda t: Org.insert_many([{"name": "x", "slug": "x"}]).execute(),
    "insert_from": lambda t: Org.insert_from(
        Org.select(Org.name, Org.slug, org_id=t.a), [Org.name, Org.slug]).execute(),
    "replace": lambda t: Org.replace(id=t.b, name="x", slug="x").execute(),
    "replace_many": lambda t: Org.replace_many([{"id": t.b, "name": "x",
                                                  "slug": "x"}]).execute(),
    "bulk_create": lambda t: Org.bulk_create([Org(name="x", slug="x")]),
    "bulk_update": lambda t: Org.bulk_update([Org.get_by_id(t.b)], fields=[Org.name]),
    "create_table": lambda t: Org.create_table(safe=False),
    "drop_table": lambda t: Org.drop_table(safe=False),
    "truncate_table": lambda t: Org.truncate_table(),
}
ORG_SCOPED: dict[str, Callable[[TwoOrgs], Any]] = {
    "get_by_id": lambda t: Org.get_by_id(t.a),
    "__getitem__": lambda t: Org[t.a],
    "__contains__": lambda t: t.a in Org,
    "set_by_id": lambda t: Org.set_by_id(t.a, {"name": "A2"}),
    "__setitem__": lambda t: Org.__setitem__(t.a, {"name": "A2"}),
    "save": lambda t: Org.get_by_id(t.a).save(),
    "noop": lambda t: list(Org.noop()),
}


def test_every_org_entry_point_is_refused_scoped_or_harmless() -> None:
    public = {n for n in dir(peewee.Model) if not n.startswith("_")}
    shortcuts = {"__getitem__", "__setitem__", "__delitem__", "__contains__", "__len__",
                 "__iter__"}
    untested = (public | shortcuts) - HARMLESS - set(ORG_REFUSED) - set(ORG_SCOPED)
    assert untested == set(), f"Org entry points without a tenancy test: {untested}"


@pytest.mark.parametrize("name", sorted(ORG_REFUSED))
def test_org_entry_point_is_refused(twins: TwoOrgs, tenant_db: TenantDatabase,
                                    name: str) -> None:
    # Peewee itself refuses replace() on PostgreSQL (a ValueError, before any SQL).
    refusal = (TenancyError, ValueError) if name.startswith("replace") else TenancyError
    with pytest.raises(refusal), tenant_db.atomic():
        ORG_REFUSED[name](twins)
    with cross_org(reason="test: both orgs are intact"):
        assert {o.name for o in Org.select().where(Org.id.in_([twins.a, twins.b]))} == {
            "Twin A", "Twin B"}
    b_unchanged(twins)


@pytest.mark.parametrize("name", sorted(ORG_SCOPED))
def test_org_entry_point_is_scoped_by_the_org_id(twins: TwoOrgs, name: str) -> None:
    ORG_SCOPED[name](twins)
    assert Org.get_by_id(twins.b).name == "Twin B"
    b_unchanged(twins)


# -- tenantdb's own entry points -------------------------------------------------------------

# Every public function of these modules that runs statements, and the tests that hold it
# to its org (in this module or tests/test_isolation.py).
OWN_ENTRY_POINTS = {
    "tenantdb.orgs.create_org": "test_create_org_validates_before_sql",
    "tenantdb.orgs.delete_org": "test_delete_org_purges_children_first_and_counts",
    "tenantdb.scoping.execute_scoped": "test_execute_scoped_refuses_setting_changes",
    "tenantdb.tenancy.prefetch": "test_prefetch_loads_children_and_parents_of_own_org",
    "tenantdb.context.cross_org": "test_generator_suspended_inside_cross_org_grants_nothing_"
                                  "to_its_consumer",
    "tenantdb.retention.get_stale_agent_runs":
        "test_retention_selector_rewritten_reads_no_other_org",
    "playhouse.postgres_ext.ServerSide": "test_server_side_cursor_is_server_side",
}


def test_own_entry_points_each_have_an_isolation_test() -> None:
    import importlib

    import test_isolation

    from tenantdb import orgs

    assert set(orgs.__all__) - {"DEFAULT_BATCH_SIZE"} <= {
        name.rsplit(".", 1)[1] for name in OWN_ENTRY_POINTS}
    tests = set(vars(test_isolation)) | set(globals())
    for dotted, test in OWN_ENTRY_POINTS.items():
        module, name = dotted.rsplit(".", 1)
        assert callable(getattr(importlib.import_module(module), name))
        assert test in tests, f"{dotted}: no test {test}"
