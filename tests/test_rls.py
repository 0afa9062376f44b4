"""The database's own wall: row-level security, roles, and `tenantdb check`."""

from __future__ import annotations

import subprocess
import uuid

import psycopg2
import pytest
from helpers import PYTHON, admin_execute, cli_env
from tenancy_fixtures import TwoOrgs

from tenantdb import migrate
from tenantdb.check import check_schema
from tenantdb.db import APP_ROLE, TenantDatabase
from tenantdb.models import Destination
from tenantdb.pytest_plugin import TestDatabase
from tenantdb.tenancy import cross_org


def app_connection(url: str) -> psycopg2.extensions.connection:
    conn = psycopg2.connect(url)  # the application login itself
    conn.autocommit = True
    return conn


def test_raw_sql_as_app_role_without_org_errors(
    committed_twins: TwoOrgs, tenantdb_database: TestDatabase
) -> None:
    conn = app_connection(tenantdb_database.app_url)
    try:
        with conn.cursor() as cur:
            with pytest.raises(psycopg2.Error, match=r"tenantdb\.org_id"):
                cur.execute("SELECT count(*) FROM destination")
            # Once a transaction has set and cleared it, the empty value errors too.
            cur.execute("BEGIN; SELECT set_config('tenantdb.org_id', %s, true); COMMIT",
                        (str(committed_twins[0]),))
            with pytest.raises(psycopg2.Error, match="uuid"):
                cur.execute("SELECT count(*) FROM destination")
    finally:
        conn.close()


def test_raw_sql_as_app_role_with_org_sees_only_that_org(
    committed_twins: TwoOrgs, tenantdb_database: TestDatabase
) -> None:
    a, b = committed_twins
    conn = app_connection(tenantdb_database.app_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT set_config('tenantdb.org_id', %s, false)", (str(a),))
            cur.execute("SELECT DISTINCT org_id FROM destination")
            assert [uuid.UUID(str(org)) for (org,) in cur.fetchall()] == [a]
            with pytest.raises(psycopg2.Error, match="row-level security"):
                cur.execute("INSERT INTO destination (org_id, name) VALUES (%s, 'x')", (str(b),))
            cur.execute("UPDATE destination SET description = 'hit' WHERE org_id = %s", (str(b),))
            assert cur.rowcount == 0
    finally:
        conn.close()


def test_library_works_as_the_app_role(tenant_db: TenantDatabase) -> None:
    (user,) = tenant_db.execute_sql("SELECT current_user").fetchone()
    (superuser, bypass) = tenant_db.execute_sql(
        "SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user").fetchone()
    assert (user, superuser, bypass) == (APP_ROLE, False, False)


def test_pooled_checkout_after_commit_or_rollback_carries_no_org(
    committed_twins: TwoOrgs, tenantdb_committed: TenantDatabase
) -> None:
    a, _ = committed_twins
    with tenantdb_committed.atomic():
        assert Destination.select(org_id=a).count() == 1
    tenantdb_committed.close()
    assert _org_setting(tenantdb_committed) in (None, "")
    with pytest.raises(RuntimeError), tenantdb_committed.atomic():
        Destination.select(org_id=a).count()
        raise RuntimeError("roll back")
    tenantdb_committed.close()
    assert _org_setting(tenantdb_committed) in (None, "")
    (role,) = tenantdb_committed.execute_sql("SELECT current_user").fetchone()
    assert role == APP_ROLE


def test_cross_org_role_does_not_outlive_its_statement_in_a_transaction(
    committed_twins: TwoOrgs, tenantdb_committed: TenantDatabase
) -> None:
    a, _ = committed_twins
    with tenantdb_committed.atomic():
        with cross_org(reason="test: admin statement"):
            assert Destination.select().count() == 2
        (role,) = tenantdb_committed.execute_sql("SELECT current_user").fetchone()
        assert role == APP_ROLE
        assert Destination.select(org_id=a).count() == 1


def _org_setting(db: TenantDatabase) -> str | None:
    (value,) = db.execute_sql("SELECT current_setting('tenantdb.org_id', true)").fetchone()
    return value  # type: ignore[no-any-return]


# -- tenantdb check -----------------------------------------------------------------------


def test_check_passes_on_the_migrated_schema(tenantdb_database: TestDatabase) -> None:
    assert check_schema(tenantdb_database.url) == []


def test_check_reports_every_violation(empty_database_url: str) -> None:
    migrate.migrate(empty_database_url)
    admin_execute(empty_database_url, """
        CREATE TABLE leaky (org_id uuid, id uuid PRIMARY KEY, email text UNIQUE,
                            destination_id uuid);
        ALTER TABLE leaky ADD CONSTRAINT leaky_dest_fkey FOREIGN KEY (org_id, destination_id)
            REFERENCES destination (org_id, id);
        CREATE TABLE pointer (org_id uuid NOT NULL, id uuid, ref uuid,
                              PRIMARY KEY (org_id, id));
        ALTER TABLE pointer ADD CONSTRAINT pointer_ref_fkey FOREIGN KEY (id)
            REFERENCES leaky (id);
        ALTER TABLE destination NO FORCE ROW LEVEL SECURITY;
    """)

    problems = {str(v) for v in check_schema(empty_database_url)}

    assert "leaky: org_id is nullable" in problems
    assert "leaky: row-level security is not enabled" in problems
    assert any(p.startswith("leaky.leaky_pkey: primary key (id) lacks org_id") for p in problems)
    assert any(p.startswith("leaky.leaky_email_key: unique key") for p in problems)
    assert any(p.startswith("pointer.pointer_ref_fkey") for p in problems)
    assert "destination: row-level security is not forced (the owner bypasses it)" in problems


def test_check_flags_an_app_role_that_bypasses_rls(empty_database_url: str) -> None:
    migrate.migrate(empty_database_url)
    # PostgreSQL 16 keeps inheritance per grant: re-grant the bypass role inheritably.
    admin_execute(empty_database_url, f"ALTER ROLE {APP_ROLE} BYPASSRLS INHERIT; "
                  f"GRANT tenantdb_admin TO {APP_ROLE} WITH INHERIT TRUE")
    try:
        problems = {str(v) for v in check_schema(empty_database_url)}
    finally:
        # Roles belong to the whole cluster: put the wall back for every other test.
        admin_execute(empty_database_url, f"ALTER ROLE {APP_ROLE} NOBYPASSRLS NOINHERIT; "
                      f"REVOKE tenantdb_admin FROM {APP_ROLE}")
    assert f"{APP_ROLE}: has BYPASSRLS: row-level security does not bind it" in problems
    assert any("is a member of tenantdb_admin" in p for p in problems)


def test_check_command_exit_codes(empty_database_url: str) -> None:
    env = cli_env(TENANTDB_DATABASE_URL=empty_database_url)
    migrate.migrate(empty_database_url)
    ok = subprocess.run([PYTHON, "-m", "tenantdb", "check"], env=env, capture_output=True,
                        text=True, timeout=60, check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    admin_execute(empty_database_url, "ALTER TABLE itinerary DISABLE ROW LEVEL SECURITY")
    bad = subprocess.run([PYTHON, "-m", "tenantdb", "check"], env=env, capture_output=True,
                         text=True, timeout=60, check=False)
    assert bad.returncode == 1
    assert "itinerary: row-level security is not enabled" in bad.stdout
