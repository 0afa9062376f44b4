"""Each of Peewee's private attributes tenantdb reads holds what tenantdb expects, in the
Peewee release installed (CI runs this file on the lowest and the highest release that
pyproject.toml allows). A rename in a new release fails here, by name."""

from __future__ import annotations

import peewee
import pytest
from peewee import CTE, SQL, Entity, Expression, Function, Table, ValuesList, fn

from tenantdb import peewee_internals as pi

T = Table("t", ["id", "org_id", "name", "n"])
U = Table("u", ["id", "org_id", "t_id"])


class Thing(peewee.Model):
    name = peewee.TextField(default="unnamed")
    size = peewee.IntegerField(default=3)


def test_where_and_set_where() -> None:
    term = T.org_id == 1
    query = T.select().where(term)
    assert pi.where(query) is term
    assert pi.where(T.select()) is None
    pi.set_where(query, T.name == "x")
    assert '"name" = ' in query.sql()[0] and '"org_id"' not in query.sql()[0].split("WHERE")[1]


def test_from_list_returning_and_select_clauses() -> None:
    window = peewee.Window(partition_by=[T.org_id])
    query = (T.select(T.id, fn.COUNT(T.n).over(window)).from_(T, U).where(T.id == U.t_id)
             .group_by(T.id).having(fn.COUNT(T.n) > 1).order_by(T.name)
             .window(window).distinct(T.id).limit(5).offset(7))
    assert pi.from_list(query) == [T, U]
    assert pi.returning(query)[0] is T.id
    having, columns, order_by, group_by, windows, distinct, limit, offset = \
        pi.select_clauses(query)
    assert isinstance(having, Expression) and having.rhs == 1
    assert columns[0] is T.id
    assert order_by[0] is T.name and group_by[0] is T.id
    assert windows == (window,) or list(windows) == [window]
    assert list(distinct) == [T.id]
    assert (limit, offset) == (5, 7)


def test_update_values_and_from() -> None:
    query = T.update({T.name: "x"}).from_(U).where(T.id == U.t_id)
    assert pi.update_values(query) == {T.name: "x"}
    assert pi.update_from(query) == [U]
    assert pi.update_values(T.update({})) == {}


def test_insert_rows_columns_and_on_conflict() -> None:
    rows = [{T.id: 1, T.org_id: 2}]
    query = T.insert(rows)
    assert pi.insert_rows(query) == rows
    assert pi.insert_columns(query) == []
    select = U.select(U.id, U.org_id)
    from_select = T.insert(select, columns=[T.id, T.org_id])
    assert pi.insert_rows(from_select) is select
    assert pi.insert_columns(from_select) == [T.id, T.org_id]
    assert pi.on_conflict(query) is None
    upsert = query.on_conflict(conflict_target=[T.id], preserve=[T.name],
                               update={T.n: 5}, where=T.n < 3)
    conflict = pi.on_conflict(upsert)
    assert pi.conflict_update(conflict) == {T.n: 5}
    where, conflict_where, target, preserve = pi.conflict_clauses(conflict)
    assert isinstance(where, Expression) and where.rhs == 3
    assert conflict_where is None
    assert list(target) == [T.id] and list(preserve) == [T.name]


def test_ctes_and_their_parts() -> None:
    base = T.select(T.id, T.org_id).where(T.org_id == 1)
    cte = base.cte("tree", recursive=True, columns=("id", "org_id"))
    query = cte.select_from(cte.c.id).with_cte(cte)
    (found,) = pi.ctes(query)
    assert found is cte and isinstance(found, CTE)
    assert pi.alias(cte) == "tree"
    assert pi.cte_query(cte).sql() == base.sql()
    assert pi.is_recursive(cte) is True
    assert pi.is_recursive(base.cte("flat")) is False
    assert tuple(pi.cte_columns(cte)) == ("id", "org_id")
    assert pi.alias(T.id.alias("renamed")) == "renamed"


def test_entity_function_values_raw_and_join_parts() -> None:
    assert pi.entity_path(Entity("public", "destination")) == ["public", "destination"]
    count = fn.COUNT(T.id).filter(T.n > 2)
    assert isinstance(count, Function)
    where, order_by = pi.function_clauses(count)
    assert isinstance(where, Expression) and where.rhs == 2 and order_by is None
    ordered = fn.array_agg(T.name).order_by(T.name)
    assert list(pi.function_clauses(ordered)[1]) == [T.name]
    assert pi.values_rows(ValuesList([(1, "a"), (2, "b")])) == [(1, "a"), (2, "b")]
    assert pi.raw_sql(Thing.raw("SELECT 1 AS name")) == "SELECT 1 AS name"
    on = T.id == U.t_id
    joined = T.select().join(U, on=on)
    (join,) = pi.from_list(joined)
    assert pi.join_on(join) is on
    assert pi.join_on(pi.from_list(T.select().join(U, peewee.JOIN.CROSS))[0]) is None


def test_join_context_and_database() -> None:
    class Other(peewee.Model):
        thing = peewee.ForeignKeyField(Thing)

    query = Thing.select().join(Other, on=(Other.thing == Thing.id))
    assert pi.join_context(query) is Other
    assert pi.join_context(query.switch(Thing)) is Thing
    database = peewee.PostgresqlDatabase(None)
    assert pi.query_database(Thing.select().bind(database)) is database


def test_loaded_rows_no_default_and_dirty() -> None:
    fresh = Thing()
    assert fresh.name == "unnamed" and fresh.is_dirty()
    loaded = Thing(**{pi.NO_DEFAULT: 1}, size=9)
    assert "name" not in loaded.__data__  # no default filled in for a loaded row
    assert loaded.dirty_fields == [Thing.size]
    pi.clear_dirty(loaded)
    assert loaded.dirty_fields == [] and not loaded.is_dirty()
    built = pi.loaded_instance(Thing, {"id": 4, "name": "n", "size": 1})
    assert (built.id, built.name, built.size) == (4, "n", 1)
    assert not built.is_dirty() and built.__rel__ == {}
    assert isinstance(built, Thing)


def test_peewee_calls_the_cursor_wrapper_hook_tenantdb_overrides() -> None:
    """TenantSelect overrides _get_cursor_wrapper: Peewee's execute must still go through
    it, and its model wrappers must still pass NO_DEFAULT (the constructor tenantdb swaps)."""
    assert callable(getattr(peewee.ModelSelect, "_get_cursor_wrapper", None))
    assert pi.NO_DEFAULT in peewee.ModelObjectCursorWrapper.process_row.__code__.co_consts


@pytest.mark.parametrize("raw", [SQL("1"), "1"])
def test_raw_sql_of_something_else_is_empty(raw: object) -> None:
    assert pi.raw_sql(raw) == ""
