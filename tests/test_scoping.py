"""The engine strategies of tenantdb.scoping and the Citus hooks, on plain PostgreSQL.

The cluster side runs in tests/test_citus.py (``make test-citus``).
"""

from __future__ import annotations

import uuid

import peewee
import psycopg2
import pytest

from tenantdb import citus
from tenantdb.db import APP_ROLE, SCOPE_PREFIX_SQL, TenantDatabase
from tenantdb.models import AgentRun, Itinerary, User
from tenantdb.pytest_plugin import TestDatabase
from tenantdb.scoping import scope_statements

ORG = uuid.uuid4()


def test_plain_postgres_sends_the_org_in_the_statement_string() -> None:
    plan = scope_statements(ORG, citus=False, in_transaction=False, role=APP_ROLE)
    assert (plan.prefix, plan.prefix_params) == (SCOPE_PREFIX_SQL, (APP_ROLE, str(ORG)))
    assert plan.setup is None and not plan.commit


def test_citus_sends_set_local_alone_and_opens_a_transaction_when_none_is_open() -> None:
    plan = scope_statements(ORG, {"hnsw.ef_search": "400"}, citus=True,
                            in_transaction=False, role=APP_ROLE)
    assert plan.setup == ("BEGIN; SET LOCAL citus.propagate_set_commands = 'local'; "
                          "SET LOCAL hnsw.ef_search = %s; SET LOCAL tenantdb.org_id = %s")
    assert plan.setup_params == ("400", str(ORG))
    assert plan.commit
    # The role stays on the coordinator, in the statement's own string.
    assert plan.prefix == "SELECT set_config('role', %s, true); "
    inside = scope_statements(ORG, citus=True, in_transaction=True)
    assert inside.setup is not None and not inside.setup.startswith("BEGIN")
    assert not inside.commit and inside.prefix == ""


def test_citus_refuses_a_setting_it_cannot_set_local() -> None:
    with pytest.raises(ValueError, match="cannot SET LOCAL work_mem"):
        scope_statements(ORG, {"work_mem": "1GB"}, citus=True, in_transaction=True)
    with pytest.raises(ValueError, match="not a setting name"):
        scope_statements(ORG, {"x'); DROP TABLE org; --": "1"}, citus=False,
                         in_transaction=True)


def test_scoped_statements_set_extra_settings_for_their_transaction_only(
        tenant_db: TenantDatabase, org_id: uuid.UUID) -> None:
    row = tenant_db.execute_scoped_sql(
        org_id, "SELECT current_setting('hnsw.ef_search'), current_setting('tenantdb.org_id')",
        settings={"hnsw.ef_search": "123"}).fetchone()
    assert row == ("123", str(org_id))


def test_plain_postgres_is_no_coordinator_and_distribution_does_nothing(
        tenantdb_database: TestDatabase) -> None:
    conn = psycopg2.connect(tenantdb_database.url)
    try:
        assert not citus.is_coordinator(conn)
        assert citus.distribute(conn) == []
        assert citus.distribution_issues(conn) == []
        with conn.cursor() as cur:
            assert citus.table_rows(cur, "embedding") is None
    finally:
        conn.close()


def test_a_run_with_itineraries_is_deleted_only_after_unlinking(
        tenant_db: TenantDatabase, org_id: uuid.UUID) -> None:
    # V01_07: the key no longer clears the link itself (Citus refuses SET NULL (col)).
    user = User.create(org_id=org_id, email="u@example.com")
    run = AgentRun.create(org_id=org_id, user_id=user.id)
    Itinerary.create(org_id=org_id, user_id=user.id, agent_run_id=run.id, title="t")
    with pytest.raises(peewee.IntegrityError, match="itinerary_agent_run_fkey"), \
            tenant_db.atomic():
        AgentRun.delete(org_id=org_id).where(AgentRun.id == run.id).execute()
    Itinerary.update(agent_run_id=None, org_id=org_id).execute()
    assert AgentRun.delete(org_id=org_id).where(AgentRun.id == run.id).execute() == 1


def test_the_idempotency_clock_is_stable_and_reads_the_clock(tenant_db: TenantDatabase) -> None:
    row = tenant_db.execute_sql(
        "SELECT provolatile, tenantdb_clock() <= clock_timestamp() FROM pg_proc "
        "WHERE proname = 'tenantdb_clock'").fetchone()
    assert row == ("s", True)


@pytest.mark.parametrize(
    ("message", "name"),
    [('insert or update on table "idempotency_key_102042" violates foreign key constraint '
      '"idempotency_key_user_fkey_102042"', "idempotency_key_user_fkey"),
     ('duplicate key value violates unique constraint "org_slug_key"', "org_slug_key"),
     ("division by zero", None)],
)
def test_violated_constraint_reads_a_shard_error(message: str, name: str | None) -> None:
    assert citus.violated_constraint(Exception(message)) == name

