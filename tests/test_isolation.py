"""Tenant isolation, round two: one test per class and example of the attack list.

Twin orgs A and B hold rows with identical ids (tests/tenancy_fixtures.py). Every test acts
as A (or as nobody) and checks that B's rows never appear, change or vanish. The raw and
role-escalation paths are run again on a connection logged in as the application role with
no Python layer in between (`app_login`): the database wall alone must stop them.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlsplit

import psycopg2
import pytest
from helpers import admin_execute
from peewee import JOIN, SQL, Entity, Function, Value, fn
from playhouse.postgres_ext import ServerSide
from playhouse.shortcuts import update_model_from_dict
from tenancy_fixtures import IDS, TwoOrgs

from tenantdb import migrate
from tenantdb.check import check_schema
from tenantdb.context import cross_org, cross_org_reason
from tenantdb.db import APP_ROLE, TenantDatabase
from tenantdb.errors import CrossOrgError, MissingOrgError, UnscopedQueryError
from tenantdb.models import (
    AgentRun,
    Destination,
    Itinerary,
    KnowledgeItem,
    Org,
    User,
)
from tenantdb.orgs import create_org, delete_org
from tenantdb.pytest_plugin import TestDatabase
from tenantdb.retention import get_stale_agent_runs
from tenantdb.tenancy import execute_scoped


@pytest.fixture
def app_login(tenantdb_database: TestDatabase) -> Iterator[Any]:
    """A cursor on a raw connection logged in as the application role itself (no Python
    layer, no owner login behind it: RESET ROLE has nowhere to go)."""
    parts = urlsplit(tenantdb_database.url)
    host = parts.netloc.rsplit("@", 1)[-1]
    conn = psycopg2.connect(parts._replace(netloc=f"{APP_ROLE}@{host}").geturl())
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT session_user, current_user")
            assert cur.fetchone() == (APP_ROLE, APP_ROLE)
            yield cur
    finally:
        conn.close()


def as_org(cur: Any, org: uuid.UUID) -> None:
    cur.execute("SELECT set_config('tenantdb.org_id', %s, false)", (str(org),))


def b_destination(twins: TwoOrgs) -> str:
    with cross_org(reason="test: read B's twin"):
        row = Destination.get(Destination.org_id == twins.b, Destination.id == IDS["destination"])
    return str(row.name)


# -- 1. the org table ---------------------------------------------------------------------


def test_org_select_without_an_org_is_refused(twins: TwoOrgs) -> None:
    with pytest.raises(UnscopedQueryError, match="org"):
        list(Org.select())
    with pytest.raises(UnscopedQueryError):
        Org.get(Org.slug.startswith("twin-"))


def test_org_select_with_an_org_reads_that_org_only(twins: TwoOrgs) -> None:
    assert [o.id for o in Org.select(org_id=twins.a)] == [twins.a]
    assert Org.get_by_id(twins.a).id == twins.a
    joined = (Destination.select(Destination.id, Org.name, org_id=twins.a)
              .join(Org, on=(Destination.org_id == Org.id)).tuples())
    assert list(joined) == [(IDS["destination"], "Twin A")]


def test_org_update_unscoped_is_refused_scoped_renames_one(twins: TwoOrgs) -> None:
    with pytest.raises(UnscopedQueryError):
        Org.update(name="renamed").execute()
    with pytest.raises(UnscopedQueryError):
        Org.update(name="renamed").where(Org.name == "Twin B").execute()
    assert Org.update(name="A2").where(Org.id == twins.a).execute() == 1
    assert Org.get_by_id(twins.b).name == "Twin B"


@pytest.mark.parametrize("write", ["delete", "delete_instance", "create", "insert"])
def test_org_insert_and_delete_are_refused(twins: TwoOrgs, write: str) -> None:
    with pytest.raises(UnscopedQueryError, match="admin work"):
        if write == "delete":
            Org.delete().where(Org.id == twins.b).execute()
        elif write == "delete_instance":
            Org.get_by_id(twins.b).delete_instance()
        elif write == "create":
            Org.create(name="new", slug=f"new-{uuid.uuid4().hex[:8]}")
        else:
            Org.insert(name="new", slug=f"new-{uuid.uuid4().hex[:8]}").execute()
    assert b_destination(twins) == "Lisbon"


def test_app_login_sees_only_its_org_and_cannot_create_or_delete_orgs(
        committed_twins: TwoOrgs, app_login: Any) -> None:
    a, b = committed_twins.a, committed_twins.b
    as_org(app_login, a)
    app_login.execute("SELECT id FROM org")
    assert [uuid.UUID(str(r[0])) for r in app_login.fetchall()] == [a]
    app_login.execute("UPDATE org SET name = 'hit' WHERE id = %s", (str(b),))
    assert app_login.rowcount == 0
    for statement in ("DELETE FROM org WHERE id = %s", "DELETE FROM org WHERE id <> %s"):
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            app_login.execute(statement, (str(b),))
    with pytest.raises(psycopg2.errors.InsufficientPrivilege):
        app_login.execute("INSERT INTO org (id, name, slug) VALUES (%s, 'x', 'x')",
                          (str(uuid.uuid4()),))
    as_org(app_login, b)
    app_login.execute("SELECT count(*) FROM destination WHERE id = %s",
                      (str(IDS["destination"]),))
    assert app_login.fetchone() == (1,)  # B's twin is still there


# -- 2. the application role cannot become the admin role ----------------------------------


@pytest.mark.parametrize("column", [
    lambda b: fn.set_config("role", "tenantdb_admin", True),
    lambda b: fn.set_config("tenantdb.org_id", str(b), True),
    lambda b: fn.SET_CONFIG("role", "tenantdb_admin", False),
    lambda b: Function("pg_catalog.set_config", ("role", "tenantdb_admin", True)),
    lambda b: Function('"set_config"', ("role", "tenantdb_admin", True)),
    lambda b: SQL("set_config('role', 'tenantdb_admin', true)"),
    lambda b: SQL("pg_catalog.set_config(%s, %s, true)", ["tenantdb.org_id", str(b)]),
], ids=["role", "org", "upper", "pg_catalog", "quoted", "sql-fragment", "sql-pg_catalog"])
def test_scoped_query_cannot_change_settings(twins: TwoOrgs, column: Any) -> None:
    query = Destination.select(Destination.id, column(twins.b), org_id=twins.a)
    with pytest.raises(UnscopedQueryError):
        list(query)
    where = Destination.select(org_id=twins.a).where(column(twins.b).is_null(False))
    with pytest.raises(UnscopedQueryError):
        list(where)


def test_sql_fragment_cannot_add_a_statement(twins: TwoOrgs) -> None:
    query = Destination.select(Destination.id, SQL("1; SET ROLE tenantdb_admin; SELECT 1"),
                               org_id=twins.a)
    with pytest.raises(UnscopedQueryError):
        list(query)


@pytest.mark.parametrize("statement", [
    "SELECT set_config('tenantdb.org_id', %s, true); SELECT count(*) FROM destination",
    "SELECT pg_catalog.set_config('role', 'tenantdb_admin', true)",
    "SELECT set_config('ROLE', 'tenantdb_admin', true)",
    "SET ROLE tenantdb_admin",
    "SET LOCAL tenantdb.org_id = 'x'",
    "RESET ROLE",
    "RESET ALL",
    "SELECT 1; SET SESSION AUTHORIZATION DEFAULT",
    "ROLLBACK TO SAVEPOINT s1",
    "COMMIT",
    "DO $$ BEGIN PERFORM 1; END $$",
    "PREPARE p AS SELECT 1",
    "SELECT U&\"\\0073et_config\"('role', 'tenantdb_admin', true)",
], ids=lambda s: s[:30])
def test_execute_scoped_refuses_setting_changes(twins: TwoOrgs, statement: str) -> None:
    with pytest.raises(UnscopedQueryError):
        execute_scoped(twins.a, statement, (str(twins.b),) if "%s" in statement else ())


@pytest.mark.parametrize("statement", [
    "SET LOCAL role TO DEFAULT",
    "SET LOCAL tenantdb.org_id TO DEFAULT",
    "SET LOCAL hnsw.ef_search = 1000",
    "SET hnsw.ef_search TO DEFAULT",
    "SET LOCAL hnsw.ef_search TO DEFAULT; SET ROLE tenantdb_admin",
], ids=lambda s: s[:36])
def test_execute_sql_allows_only_planner_settings_back_to_default(
        tenant_db: TenantDatabase, statement: str) -> None:
    with pytest.raises(UnscopedQueryError):
        tenant_db.execute_sql(statement)


def test_execute_sql_puts_planner_settings_back_to_default(tenant_db: TenantDatabase) -> None:
    tenant_db.execute_sql("SELECT set_config('hnsw.ef_search', '321', true)")
    tenant_db.execute_sql("SET LOCAL hnsw.ef_search TO DEFAULT; SET LOCAL enable_sort TO DEFAULT")
    assert tenant_db.execute_sql("SHOW hnsw.ef_search").fetchone() != ("321",)


def test_model_raw_cannot_set_the_org_itself(twins: TwoOrgs) -> None:
    forged = ("SELECT set_config('tenantdb.org_id', %s, true); "
              "SELECT * FROM destination")
    with pytest.raises(UnscopedQueryError):
        list(Destination.raw(forged, str(twins.b), org_id=twins.a))


@pytest.mark.parametrize("statement", [
    "SET ROLE tenantdb_admin",
    "SELECT set_config('role', 'tenantdb_admin', false)",
    "SELECT set_config('tenantdb.org_id', 'x', false)",
    "RESET ROLE",
    "SET SESSION AUTHORIZATION DEFAULT",
    "select 1; reset role",
    "ALTER ROLE tenantdb_app SET role = 'tenantdb_admin'",
])
def test_execute_sql_refuses_setting_changes(tenant_db: TenantDatabase, statement: str) -> None:
    with pytest.raises(UnscopedQueryError):
        tenant_db.execute_sql(statement)


def test_allowed_planner_setting_and_plain_sql_still_run(twins: TwoOrgs,
                                                         tenant_db: TenantDatabase) -> None:
    cursor = execute_scoped(twins.a, "SELECT set_config('hnsw.ef_search', '50', true); "
                            "SELECT count(*) FROM destination")
    assert cursor.fetchone() == (1,)
    assert tenant_db.execute_sql("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("statement", [
    "SET ROLE tenantdb_admin",
    "SELECT set_config('role', 'tenantdb_admin', false)",
    "SET SESSION AUTHORIZATION tenantdb_admin",
    "SET ROLE postgres",
])
def test_app_login_cannot_take_a_bypassing_role(app_login: Any, statement: str) -> None:
    with pytest.raises(psycopg2.Error):
        app_login.execute(statement)
    app_login.execute("SELECT current_user, session_user")
    assert app_login.fetchone() == (APP_ROLE, APP_ROLE)


def test_app_login_savepoint_and_copy_stay_in_the_org(committed_twins: TwoOrgs,
                                                       app_login: Any) -> None:
    app_login.execute("BEGIN")
    app_login.execute("SELECT set_config('tenantdb.org_id', %s, true)",
                      (str(committed_twins.a),))
    app_login.execute("SAVEPOINT s1")
    with pytest.raises(psycopg2.Error):
        app_login.execute("SELECT set_config('role', 'tenantdb_admin', true)")
    app_login.execute("ROLLBACK TO SAVEPOINT s1")
    app_login.execute("SELECT current_user")
    assert app_login.fetchone() == (APP_ROLE,)
    copied = io.StringIO()
    app_login.copy_expert("COPY (SELECT org_id FROM destination) TO STDOUT", copied)
    assert {uuid.UUID(line) for line in copied.getvalue().split()} == {committed_twins.a}
    app_login.execute("ROLLBACK")


def test_app_login_reset_role_goes_nowhere(committed_twins: TwoOrgs, app_login: Any) -> None:
    app_login.execute("RESET ROLE")
    app_login.execute("SELECT current_user, rolsuper, rolbypassrls FROM pg_roles "
                      "WHERE rolname = current_user")
    assert app_login.fetchone() == (APP_ROLE, False, False)
    as_org(app_login, committed_twins.a)
    app_login.execute("SELECT DISTINCT org_id FROM destination")
    assert [uuid.UUID(str(r[0])) for r in app_login.fetchall()] == [committed_twins.a]
    app_login.execute("SELECT pg_has_role(current_user, 'tenantdb_admin', 'MEMBER')")
    assert app_login.fetchone() == (False,)


def _current_user(database: TenantDatabase) -> str:
    return str(database.execute_sql("SELECT current_user").fetchone()[0])


def test_cross_org_inside_atomic_leaves_the_app_connection_as_the_app(
        committed_twins: TwoOrgs, tenantdb_committed: TenantDatabase) -> None:
    # The library's own paths of class 2: cross_org work inside the application's
    # transaction, then ROLLBACK TO SAVEPOINT, begin(), and a raw DB-API cursor (COPY).
    database = tenantdb_committed
    with database.atomic():
        with database.atomic() as savepoint:
            with cross_org(reason="test: admin work inside the app's transaction"):
                assert Destination.select().count() == 2
            savepoint.rollback()  # ROLLBACK TO SAVEPOINT on the application connection
        assert _current_user(database) == APP_ROLE
        raw = database.connection().cursor()
        copied = io.StringIO()
        raw.copy_expert("COPY (SELECT current_user) TO STDOUT", copied)
        assert copied.getvalue().strip() == APP_ROLE
        assert Destination.select(org_id=committed_twins.a).count() == 1
    database.begin()
    try:
        with cross_org(reason="test: admin work after begin()"):
            assert Destination.select().count() == 2
        assert _current_user(database) == APP_ROLE
        raw = database.connection().cursor()
        with pytest.raises(psycopg2.Error):  # no org set on this transaction: refused
            raw.execute("SELECT count(*) FROM destination")
    finally:
        database.rollback()


# -- 3. no permission travels with a query -------------------------------------------------


def test_query_built_inside_cross_org_is_refused_outside(twins: TwoOrgs) -> None:
    with cross_org(reason="test: build only"):
        query = Destination.select()
        assert query.count() == 2
    with pytest.raises(UnscopedQueryError):
        list(query)
    with pytest.raises(UnscopedQueryError):
        list(query.where(Destination.id == IDS["destination"]))


def test_retention_selector_rewritten_reads_no_other_org(twins: TwoOrgs) -> None:
    tomorrow = datetime.now(timezone.utc) + timedelta(days=1)
    stale = get_stale_agent_runs(0.001, all_orgs=True, now=tomorrow)
    rewritten = stale.select(User.email, User.password_hash).from_(AgentRun, User)
    with pytest.raises(UnscopedQueryError):
        list(rewritten)
    with pytest.raises(UnscopedQueryError):
        list(stale.where(AgentRun.user_id == IDS["user"]))
    with pytest.raises(MissingOrgError):
        get_stale_agent_runs()  # neither org_id= nor all_orgs=True
    with cross_org(reason="test: explicit"):
        assert {r.org_id for r in stale} == {twins.a, twins.b}


def test_statement_nesting_a_cross_org_query_is_verified_whole(twins: TwoOrgs) -> None:
    with cross_org(reason="test: build only"):
        inner = Destination.select(Destination.id)
    outer = Destination.select(org_id=twins.a).where(Destination.id.in_(inner))
    with pytest.raises(UnscopedQueryError):
        list(outer)
    hidden = Destination.select(org_id=twins.a).where(
        Destination.id.in_(inner.from_(Entity("destination"))))
    with pytest.raises(UnscopedQueryError):
        list(hidden)


def _suspended_generator() -> Iterator[Any]:
    with cross_org(reason="test: generator"):
        yield from Destination.select().where(Destination.id == IDS["destination"])


def test_generator_suspended_inside_cross_org_grants_nothing_to_its_consumer(
        twins: TwoOrgs, tenant_db: TenantDatabase) -> None:
    rows = _suspended_generator()
    first = next(rows)
    assert first.id == IDS["destination"]
    assert cross_org_reason() is None
    with pytest.raises(MissingOrgError):
        list(User.select())
    with pytest.raises(UnscopedQueryError):
        tenant_db.execute_sql("SELECT count(*) FROM destination")
    assert len([first, *rows]) == 2  # the generator itself, resumed, still holds it
    with pytest.raises(MissingOrgError):
        User.select()


def test_generator_inside_the_consumers_own_block_does_not_hide_it(twins: TwoOrgs) -> None:
    with cross_org(reason="test: consumer"):
        rows = _suspended_generator()
        next(rows)
        assert User.select().count() == 2
        rows.close()
    assert cross_org_reason() is None


def test_thread_pool_job_after_an_open_generator_has_no_permission(twins: TwoOrgs) -> None:
    def leave_generator_open() -> Any:
        generator = _reason_generator()
        return next(generator), generator

    def next_job() -> str | None:
        return cross_org_reason()

    def select_users() -> bool:
        with pytest.raises(MissingOrgError):
            User.select()
        return True

    with ThreadPoolExecutor(1) as pool:
        reason, generator = pool.submit(leave_generator_open).result()
        assert reason == "test: thread generator"
        assert pool.submit(next_job).result() is None
        with cross_org(reason="test: not handed over"):
            assert pool.submit(next_job).result() is None
            assert pool.submit(select_users).result()
    generator.close()


def _reason_generator() -> Iterator[str | None]:
    with cross_org(reason="test: thread generator"):
        yield cross_org_reason()


def test_to_thread_and_tasks_do_not_inherit_the_block(tenant_db: TenantDatabase) -> None:
    async def child() -> str | None:
        await asyncio.sleep(0)
        return cross_org_reason()

    async def main() -> tuple[Any, ...]:
        with cross_org(reason="test: async"):
            task = asyncio.create_task(child())
            in_thread = await asyncio.to_thread(cross_org_reason)
            own = cross_org_reason()
            inside = await task
        late = asyncio.create_task(child())
        return in_thread, own, inside, await late

    assert asyncio.run(main()) == (None, "test: async", None, None)


def test_task_granted_its_own_block_has_it() -> None:
    async def job() -> str | None:
        with cross_org(reason="test: the job's own block"):
            await asyncio.sleep(0)
            return cross_org_reason()

    assert asyncio.run(job()) == "test: the job's own block"


def test_nested_blocks_and_exceptions_restore_the_outer_state() -> None:
    with cross_org(reason="outer"):
        with cross_org(reason="inner"):
            assert cross_org_reason() == "inner"
        assert cross_org_reason() == "outer"
        with pytest.raises(KeyError), cross_org(reason="failing"):
            raise KeyError("x")
        assert cross_org_reason() == "outer"
    assert cross_org_reason() is None
    with pytest.raises(ValueError, match="reason"):
        cross_org(reason=" ")


def test_permission_reaches_callees_of_the_block(twins: TwoOrgs) -> None:
    def helper() -> int:
        return int(Destination.select().count())

    with cross_org(reason="test: callee"):
        assert helper() == 2


# -- 4. rows keep their org ----------------------------------------------------------------


def test_partial_load_remembers_its_org(twins: TwoOrgs) -> None:
    row = (Destination.select(Destination.id, Destination.name, org_id=twins.a)
           .where(Destination.id == IDS["destination"]).get())
    assert row.org_id is None  # not selected
    with pytest.raises(CrossOrgError):
        update_model_from_dict(row, {"org_id": str(twins.b)})
    row.name = "Porto"
    assert row.save() == 1
    assert Destination.get_by_id(IDS["destination"], org_id=twins.a).name == "Porto"
    assert b_destination(twins) == "Lisbon"


def test_partial_load_with_org_set_in_data_cannot_write_elsewhere(twins: TwoOrgs) -> None:
    row = (Destination.select(Destination.id, Destination.name, org_id=twins.a)
           .where(Destination.id == IDS["destination"]).get())
    row.__data__["org_id"] = twins.b  # around the accessor, as a careless helper might
    row.name = "Porto"
    with pytest.raises(CrossOrgError):
        row.save()
    assert b_destination(twins) == "Lisbon"


def test_joined_rows_remember_the_org(twins: TwoOrgs) -> None:
    trip = (Itinerary.select(Itinerary.id, Itinerary.user_id, User.id, User.email,
                             org_id=twins.a).join(User).get())
    with pytest.raises(CrossOrgError):
        trip.user.org_id = twins.b


# -- 5. verifier positions -----------------------------------------------------------------


def unscoped_names() -> Any:
    alias = Destination.alias()
    return alias.select(alias.name).limit(1)


def test_subquery_in_insert_values_is_verified(twins: TwoOrgs) -> None:
    with pytest.raises(UnscopedQueryError):
        Destination.insert(org_id=twins.a, name=unscoped_names()).execute()
    with pytest.raises(UnscopedQueryError):
        Destination.insert_many([{"org_id": twins.a, "name": unscoped_names()}],
                                org_id=twins.a).execute()


def test_subquery_in_returning_is_verified(twins: TwoOrgs) -> None:
    query = Destination.insert(org_id=twins.a, name="x").returning(
        Destination.id, unscoped_names().alias("leak"))
    with pytest.raises(UnscopedQueryError):
        list(query.execute())


def test_subquery_in_on_conflict_where_is_verified(twins: TwoOrgs) -> None:
    query = Destination.insert(org_id=twins.a, id=IDS["destination"], name="x").on_conflict(
        conflict_target=[Destination.org_id, Destination.id],
        update={Destination.description: "hit"},
        where=Destination.name.in_(unscoped_names()))
    with pytest.raises(UnscopedQueryError):
        query.execute()
    query = Destination.insert(org_id=twins.a, id=IDS["destination"], name="x").on_conflict(
        conflict_target=[Destination.org_id, Destination.id],
        update={Destination.description: unscoped_names()})
    with pytest.raises(UnscopedQueryError):
        query.execute()


def test_subquery_in_window_partition_is_verified(twins: TwoOrgs) -> None:
    window = fn.ROW_NUMBER().over(partition_by=[unscoped_names()])
    with pytest.raises(UnscopedQueryError):
        list(Destination.select(Destination.id, window, org_id=twins.a))
    ordered = fn.ROW_NUMBER().over(order_by=[unscoped_names()])
    with pytest.raises(UnscopedQueryError):
        list(Destination.select(Destination.id, ordered, org_id=twins.a))


def test_compound_query_cte_list_is_verified(twins: TwoOrgs) -> None:
    alias = Destination.alias()
    cte = alias.select(alias.id).cte("leak")
    union = (Destination.select(Destination.id, org_id=twins.a)
             | Destination.select(Destination.id, org_id=twins.a)).with_cte(cte)
    with pytest.raises(UnscopedQueryError):
        list(union)


def test_cte_named_like_a_tenant_table_is_refused(twins: TwoOrgs) -> None:
    cte = Destination.select(Destination.id, org_id=twins.a).cte("destination")
    alias = Destination.alias()
    query = (alias.select(alias.id).join(cte, on=(alias.id == cte.c.id))
             .where(alias.org_id == twins.a).with_cte(cte))
    with pytest.raises(UnscopedQueryError, match="CTE named destination"):
        list(query)


@pytest.mark.parametrize("entity", [("destination",), ("public", "destination"),
                                    ('"destination"',), ("app_user",)])
def test_entity_sources_naming_tenant_tables_are_refused(twins: TwoOrgs,
                                                         entity: tuple[str, ...]) -> None:
    query = Destination.select(SQL("1"), org_id=twins.a).from_(Entity(*entity))
    with pytest.raises(UnscopedQueryError):
        list(query)


# -- the refused-but-legitimate paths -----------------------------------------------------


@pytest.fixture
def lonely(twins: TwoOrgs) -> uuid.UUID:
    """A destination of A with no itinerary; B gets one too."""
    ident = uuid.uuid4()
    for org in (twins.a, twins.b):
        Destination.create(org_id=org, id=ident, name="Alone")
    return ident


def test_right_join_from_a_scoped_query(twins: TwoOrgs, lonely: uuid.UUID) -> None:
    rows = list(Itinerary.select(Itinerary.id, Destination.id, Destination.org_id,
                                 org_id=twins.a)
                .join(Destination, JOIN.RIGHT_OUTER,
                      on=(Itinerary.destination_id == Destination.id)).tuples())
    assert sorted(rows, key=str) == sorted([(IDS["itinerary"], IDS["destination"], twins.a),
                                            (None, lonely, twins.a)], key=str)


def test_full_join_from_a_scoped_query(twins: TwoOrgs, lonely: uuid.UUID) -> None:
    rows = list(Itinerary.select(Itinerary.org_id, Destination.org_id, Destination.id,
                                 org_id=twins.a)
                .join(Destination, JOIN.FULL_OUTER,
                      on=(Itinerary.destination_id == Destination.id)).tuples())
    assert len(rows) == 2
    assert {org for row in rows for org in row[:2]} - {None} == {twins.a}


def test_lateral_join_correlated_by_org(twins: TwoOrgs) -> None:
    item = KnowledgeItem.alias()
    latest = (item.select(item.title)
              .where((item.org_id == Destination.org_id)
                     & (item.destination_id == Destination.id))
              .order_by(item.created_at.desc()).limit(1))
    query = (Destination.select(Destination.name, latest.c.title, org_id=twins.a)
             .join(latest, JOIN.LEFT_LATERAL, on=SQL("true")))
    assert list(query.tuples()) == [("Lisbon", "Trams")]


def test_recursive_cte_idiom(twins: TwoOrgs) -> None:
    base_alias = Destination.alias()
    base = (base_alias.select(base_alias.org_id, base_alias.id, Value(1).alias("level"))
            .where(base_alias.org_id == twins.a)
            .cte("walk", recursive=True, columns=("org_id", "id", "level")))
    step = Destination.alias()
    recursive = (step.select(step.org_id, step.id, (base.c.level + 1))
                 .join(base, on=((step.org_id == base.c.org_id) & (step.id == base.c.id)))
                 .where(base.c.level < 3))
    walk = base.union_all(recursive)
    rows = list(walk.select_from(walk.c.org_id, walk.c.level).tuples())
    assert sorted(rows) == [(twins.a, 1), (twins.a, 2), (twins.a, 3)]


def test_recursive_cte_idiom_on_scoped_queries(twins: TwoOrgs) -> None:
    base = (Destination.select(Destination.org_id, Destination.id, Value(1).alias("level"),
                               org_id=twins.a)
            .cte("walk", recursive=True, columns=("org_id", "id", "level")))
    recursive = (Destination.select(Destination.org_id, Destination.id, base.c.level + 1,
                                    org_id=twins.a)
                 .join(base, on=(Destination.id == base.c.id)).where(base.c.level < 2))
    walk = base.union_all(recursive)
    rows = list(walk.select_from(walk.c.org_id, walk.c.level).tuples())
    assert sorted(rows) == [(twins.a, 1), (twins.a, 2)]


def test_recursive_cte_whose_org_column_is_not_scoped_is_refused(twins: TwoOrgs) -> None:
    source = Destination.alias()
    base = (source.select(Value(str(twins.b)).alias("org_id"), source.id)
            .where(source.org_id == twins.a).cte("walk", recursive=True))
    step = Destination.alias()
    recursive = (step.select(step.org_id, step.id)
                 .join(base, on=((step.org_id == base.c.org_id) & (step.id == base.c.id))))
    walk = base.union_all(recursive)
    with pytest.raises((UnscopedQueryError, CrossOrgError)):
        list(walk.select_from(walk.c.id))


def test_left_join_without_a_match_keeps_the_foreign_key(twins: TwoOrgs) -> None:
    trip = (Itinerary.select(Itinerary, User, org_id=twins.a)
            .join(User, JOIN.LEFT_OUTER,
                  on=(Itinerary.user_id == User.id) & (User.email == "nobody"))
            .get())
    assert trip.user_id == IDS["user"]
    trip.title = "Renamed"
    trip.save()
    assert Itinerary.get_by_id(IDS["itinerary"], org_id=twins.a).user_id == IDS["user"]


def test_server_side_cursor_is_server_side(twins: TwoOrgs, tenant_db: TenantDatabase) -> None:
    with tenant_db.atomic():
        rows = ServerSide(Destination.select(org_id=twins.a))
        first = next(rows)
        (declared,) = tenant_db.execute_sql("SELECT count(*) FROM pg_cursors").fetchone()
        rest = list(rows)
    assert declared == 1
    assert {r.org_id for r in [first, *rest]} == {twins.a}


def test_get_or_create_with_org_in_defaults(twins: TwoOrgs) -> None:
    row, created = Destination.get_or_create(org_id=twins.a, name="Faro",
                                             defaults={"org_id": twins.a})
    assert created and row.org_id == twins.a
    with pytest.raises(CrossOrgError):
        Destination.get_or_create(org_id=twins.a, name="Evora",
                                  defaults={"org_id": str(twins.b)})


# -- create_org / delete_org ---------------------------------------------------------------


def test_create_org_validates_before_sql(tenantdb_database: TestDatabase) -> None:
    for name, slug in (("", "x"), ("x", " "), (None, "x")):
        with pytest.raises(ValueError):
            create_org(name, slug)  # type: ignore[arg-type]


def test_delete_org_purges_children_first_and_counts(twins: TwoOrgs) -> None:
    with cross_org(reason="test: count before"):
        before = {m._meta.table_name: m.select().where(m.org_id == twins.b).count()
                  for m in (User, Destination, KnowledgeItem, Itinerary, AgentRun)}
    counts = delete_org(twins.b, reason="test: offboarding", batch_size=1)
    assert counts["org"] == 1
    assert all(counts[table] == n for table, n in before.items())
    assert sum(counts.values()) == 9  # one row in each of 8 tables, and the org
    assert Destination.select(org_id=twins.a).count() == 1
    with cross_org(reason="test: count after"):
        assert Destination.select().where(Destination.org_id == twins.b).count() == 0
    again = delete_org(twins.b, reason="test: rerun")
    assert set(again.values()) == {0}


def test_delete_org_is_restartable_after_a_failure(committed_twins: TwoOrgs,
                                                   tenantdb_committed: TenantDatabase,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from tenantdb import orgs

    real = orgs._delete_rows
    done: list[str] = []

    def crash_on_third(table: str, org: uuid.UUID, batch_size: int) -> int:
        if len(done) == 2:
            raise KeyboardInterrupt
        done.append(table)
        return real(table, org, batch_size)

    monkeypatch.setattr(orgs, "_delete_rows", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        delete_org(committed_twins.b, reason="test: interrupted")
    monkeypatch.setattr(orgs, "_delete_rows", real)
    rest = delete_org(committed_twins.b, reason="test: finish")
    assert all(rest[t] == 0 for t in done)
    assert rest["org"] == 1 and sum(rest.values()) == 9 - len(done)
    assert Destination.select(org_id=committed_twins.a).count() == 1


def test_delete_org_refuses_bad_input_before_sql(tenantdb_database: TestDatabase) -> None:
    with pytest.raises(ValueError, match="reason"):
        delete_org(uuid.uuid4(), reason="")
    with pytest.raises(MissingOrgError):
        delete_org("", reason="x")
    with pytest.raises(ValueError, match="batch_size"):
        delete_org(uuid.uuid4(), reason="x", batch_size=0)


def test_org_row_read_as_one_org_cannot_be_saved_as_another(twins: TwoOrgs) -> None:
    org = Org.select(org_id=twins.a).get()
    update_model_from_dict(org, {"id": str(twins.b), "name": "hijacked"})
    with pytest.raises(CrossOrgError):
        org.save()
    assert Org.get_by_id(twins.b).name == "Twin B"


def test_cross_org_as_a_decorator_grants_each_call(twins: TwoOrgs) -> None:
    @cross_org(reason="test: decorated")
    def count_all() -> int:
        return int(Destination.select().count())

    assert count_all() == 2
    assert cross_org_reason() is None


def test_exit_stack_enters_the_block_for_its_caller() -> None:
    with contextlib.ExitStack() as stack:
        stack.enter_context(cross_org(reason="test: exit stack"))
        assert cross_org_reason() == "test: exit stack"
    assert cross_org_reason() is None


def test_contextmanager_yielding_inside_the_block_grants_nothing() -> None:
    @contextlib.contextmanager
    def admin() -> Iterator[None]:
        with cross_org(reason="test: yielded"):
            yield

    with admin():
        assert cross_org_reason() is None


# -- tenantdb check: the application login cannot reach a bypassing role ------------------


def test_check_finds_every_way_the_app_login_could_reach_a_bypassing_role(
        empty_database_url: str) -> None:
    migrate.migrate(empty_database_url)
    name = urlsplit(empty_database_url).path[1:]
    suffix = uuid.uuid4().hex[:8]
    mid, bypass = f"tdb_mid_{suffix}", f"tdb_bypass_{suffix}"
    admin_execute(empty_database_url, f"""
        CREATE ROLE {mid} NOLOGIN; GRANT tenantdb_admin TO {mid}; GRANT {mid} TO {APP_ROLE};
        CREATE ROLE {bypass} NOLOGIN BYPASSRLS; GRANT {bypass} TO {APP_ROLE};
        CREATE TABLE app_owned (id int); ALTER TABLE app_owned OWNER TO {mid};
        ALTER ROLE {APP_ROLE} IN DATABASE {name} SET role = 'tenantdb_admin';
    """)
    try:
        problems = {str(v) for v in check_schema(empty_database_url)}
    finally:
        # Roles belong to the whole cluster: put the wall back for every other test.
        admin_execute(empty_database_url, f"""
            ALTER ROLE {APP_ROLE} IN DATABASE {name} RESET role;
            DROP TABLE app_owned; REVOKE {mid} FROM {APP_ROLE};
            REVOKE {bypass} FROM {APP_ROLE}; DROP ROLE {mid}; DROP ROLE {bypass};
        """)
    assert any(p.startswith(f"{APP_ROLE}: is a member of tenantdb_admin") for p in problems)
    assert any(p.startswith(f"{APP_ROLE}: is a member of {bypass} (BYPASSRLS)")
               for p in problems)
    assert any(p.startswith("app_owned: owned by") for p in problems)
    assert any("default role=tenantdb_admin" in p for p in problems)
    assert check_schema(empty_database_url) == []


def test_check_flags_an_unprotected_org_table(empty_database_url: str) -> None:
    migrate.migrate(empty_database_url)
    admin_execute(empty_database_url, "ALTER TABLE org NO FORCE ROW LEVEL SECURITY")
    problems = {str(v) for v in check_schema(empty_database_url)}
    assert "org: row-level security is not forced (the owner bypasses it)" in problems


def test_bulk_update_of_partial_rows_writes_their_own_org(twins: TwoOrgs) -> None:
    rows = list(Destination.select(Destination.id, Destination.name, org_id=twins.a))
    for row in rows:
        row.name = "Bulk"
    assert Destination.bulk_update(rows, fields=[Destination.name]) == 1
    with pytest.raises(CrossOrgError):
        Destination.bulk_update(rows, fields=[Destination.name], org_id=twins.b)
    assert b_destination(twins) == "Lisbon"
