"""An application's own tables: migrated from a location, protected, checked, isolated.

The test application lives in ``tests/app_schema`` (its migrations in ``trip_notes/``, undo
scripts in ``trip_notes_undo/``, models, seeds). This module migrates it into the session's
database with ``tenantdb migrate --location`` and undoes it at the end.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import peewee
import psycopg2
import psycopg2.errors
import pytest
from app_schema.models import LOCATION, SEEDS, TripBoard, TripNote
from helpers import PYTHON, cli_env
from tenancy_fixtures import TwoOrgs

from tenantdb import migrate
from tenantdb.check import table_violations
from tenantdb.db import TenantDatabase, database
from tenantdb.errors import CrossOrgError, MigrationError, MissingOrgError, UnscopedQueryError
from tenantdb.models import Destination
from tenantdb.orgs import create_org
from tenantdb.pytest_plugin import TestDatabase
from tenantdb.report import org_summary
from tenantdb.retention import purge
from tenantdb.seeds import load_seeds
from tenantdb.table_retention import (
    get_stale_rows,
    register_retention_policy,
    registered_retention_policies,
)
from tenantdb.tenancy import cross_org, execute_scoped, prefetch

APP_HISTORY = "tenantdb_schema_history_trip_notes"
POLICIES_SQL = """
    SELECT policyname, permissive, roles, cmd, qual, with_check FROM pg_policies
    WHERE tablename = %s ORDER BY policyname
"""


def cli(url: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "tenantdb", *args],
                          env=cli_env(TENANTDB_DATABASE_URL=url), capture_output=True,
                          text=True, timeout=180, check=check)


def owner_rows(url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(query, params)
        return cur.fetchall()


@pytest.fixture(scope="module", autouse=True)
def app_schema(tenantdb_database: TestDatabase) -> Iterator[str]:
    """The test application's tables in the session database, for this module only."""
    url = tenantdb_database.url
    done = cli(url, "migrate", "--location", str(LOCATION))
    assert "applied trip_notes/V01_01__trip_notes.sql" in done.stdout
    try:
        yield url
    finally:
        cli(url, "migrate", "--location", str(LOCATION), "--down-to", "trip_notes:0")


@pytest.fixture
def twin_notes(two_orgs: TwoOrgs) -> dict[str, uuid.UUID]:
    """Orgs A and B holding a destination, a board and a note with the same ids."""
    ids = {"dest": uuid.uuid4(), "board": uuid.uuid4(), "note": uuid.uuid4()}
    for org, tag in ((two_orgs.a, "A"), (two_orgs.b, "B")):
        Destination.create(org_id=org, id=ids["dest"], name="Porto")
        TripBoard.create(org_id=org, id=ids["board"], title=f"Summer {tag}")
        TripNote.create(org_id=org, id=ids["note"], board_id=ids["board"],
                        destination_id=ids["dest"], body=f"note of {tag}")
    return ids


# -- migrated, recorded apart, checked ----------------------------------------------------


def test_location_has_its_own_history(app_schema: str) -> None:
    assert owner_rows(app_schema, f"SELECT version, name FROM {APP_HISTORY}") == [
        ("01.01", "V01_01__trip_notes.sql")]
    package = owner_rows(app_schema, f"SELECT version FROM {migrate.HISTORY_TABLE}")
    assert "01.01" in {v for (v,) in package}  # the same version number, kept apart


def test_check_covers_the_application_tables(app_schema: str) -> None:
    done = cli(app_schema, "check", "--location", str(LOCATION))
    assert "schema ok" in done.stdout
    assert "trip_note" not in done.stdout


def test_info_lists_every_location(app_schema: str) -> None:
    rows = migrate.info(app_schema, [LOCATION])
    assert {(r.location, r.version, r.state) for r in rows if r.location == "trip_notes"} == {
        ("trip_notes", "01.01", "applied")}
    assert {r.state for r in rows} == {"applied"}
    assert "trip_notes   01.01" in cli(app_schema, "migrate", "--info", "--location",
                                         str(LOCATION)).stdout


def test_app_tables_get_the_package_policies(app_schema: str) -> None:
    def policies(table: str) -> list[tuple[Any, ...]]:
        return owner_rows(app_schema, POLICIES_SQL, table)

    assert policies("trip_note") == policies("destination")
    assert policies("trip_board") == policies("destination")
    forced = owner_rows(app_schema, "SELECT relname, relrowsecurity, relforcerowsecurity "
                                    "FROM pg_class WHERE relname IN ('trip_note', 'trip_board')")
    assert all(enabled and force for _, enabled, force in forced)


def test_protect_is_idempotent(app_schema: str) -> None:
    with psycopg2.connect(app_schema) as conn, conn.cursor() as cur:
        before = owner_rows(app_schema, POLICIES_SQL, "trip_note")
        cur.execute("SELECT tenantdb_protect('trip_note')")
        cur.execute("SELECT tenantdb_protect('trip_note')")
        cur.execute(POLICIES_SQL, ("trip_note",))
        assert cur.fetchall() == before
        conn.rollback()


# -- twin orgs, identical ids: nothing crosses --------------------------------------------


def test_model_reads_stay_in_their_org(tenant_db: TenantDatabase, two_orgs: TwoOrgs,
                                       twin_notes: dict[str, uuid.UUID]) -> None:
    a, b = two_orgs.a, two_orgs.b
    assert [n.body for n in TripNote.select(org_id=a)] == ["note of A"]
    note = TripNote.get_by_id(twin_notes["note"], org_id=b)
    assert note.body == "note of B"
    assert note.board.title == "Summer B"  # app table -> app table
    assert note.destination.org_id == b  # app table -> package table
    board = TripBoard.get_by_id(twin_notes["board"], org_id=a)
    assert [n.body for n in board.notes] == ["note of A"]
    dest = Destination.get_by_id(twin_notes["dest"], org_id=a)
    assert [n.body for n in dest.trip_notes] == ["note of A"]
    boards = prefetch(TripBoard.select(org_id=a), TripNote)
    assert [[n.body for n in bd.notes] for bd in boards] == [["note of A"]]
    joined = (TripNote.select(TripNote.body, TripBoard.title, org_id=a)
              .join(TripBoard, on=(TripNote.board_id == TripBoard.id)).tuples())
    assert list(joined) == [("note of A", "Summer A")]


def test_model_writes_stay_in_their_org(tenant_db: TenantDatabase, two_orgs: TwoOrgs,
                                        twin_notes: dict[str, uuid.UUID]) -> None:
    a, b = two_orgs.a, two_orgs.b
    TripNote.update({TripNote.body: "changed"}, org_id=a).execute()
    note = TripNote.get_by_id(twin_notes["note"], org_id=a)
    note.body = "saved"
    note.save()
    assert TripNote.get_by_id(twin_notes["note"], org_id=b).body == "note of B"
    TripNote.get_by_id(twin_notes["note"], org_id=a).delete_instance()
    assert TripNote.get_by_id(twin_notes["note"], org_id=b).body == "note of B"
    TripBoard.delete(org_id=a).execute()
    assert TripBoard.select(org_id=b).count() == 1
    assert TripNote.select(org_id=b).count() == 1


def test_model_entry_points_refuse_a_missing_or_foreign_org(
        tenant_db: TenantDatabase, two_orgs: TwoOrgs, twin_notes: dict[str, uuid.UUID]) -> None:
    with pytest.raises(MissingOrgError):
        TripNote.select()
    with pytest.raises(UnscopedQueryError):
        database.execute_sql("SELECT count(*) FROM trip_note")
    note = TripNote.get_by_id(twin_notes["note"], org_id=two_orgs.a)
    with pytest.raises(CrossOrgError):
        note.board = TripBoard.get_by_id(twin_notes["board"], org_id=two_orgs.b)
    with pytest.raises(CrossOrgError):
        note.org_id = two_orgs.b


def test_composite_keys_refuse_a_reference_to_another_org(
        tenant_db: TenantDatabase, two_orgs: TwoOrgs) -> None:
    b_board = TripBoard.create(org_id=two_orgs.b, title="only in B")
    with pytest.raises(peewee.IntegrityError), database.atomic():
        TripNote.create(org_id=two_orgs.a, board_id=b_board.id, body="points at B")


def test_raw_sql_under_row_level_security(tenant_db: TenantDatabase, two_orgs: TwoOrgs,
                                          twin_notes: dict[str, uuid.UUID]) -> None:
    a, b = two_orgs.a, two_orgs.b
    # No org predicate on purpose: row-level security is the wall.
    rows = execute_scoped(a, "SELECT body FROM trip_note WHERE id = %s",
                          [twin_notes["note"]]).fetchall()
    assert rows == [("note of A",)]
    execute_scoped(a, "UPDATE trip_note SET body = 'raw' WHERE id = %s", [twin_notes["note"]])
    execute_scoped(a, "DELETE FROM trip_board WHERE id = %s", [twin_notes["board"]])
    assert TripNote.get_by_id(twin_notes["note"], org_id=b).body == "note of B"
    assert TripBoard.select(org_id=b).count() == 1
    with pytest.raises(peewee.DatabaseError, match="row-level security"), database.atomic():
        execute_scoped(a, "INSERT INTO trip_board (org_id, title) VALUES (%s, 'sneaky')", [b])


# -- seeds, report ------------------------------------------------------------------------


def test_app_tables_seed_by_table_name(tenant_db: TenantDatabase) -> None:
    first = load_seeds(SEEDS)
    second = load_seeds(SEEDS)
    assert first.tables["trip_note"].created == 2 and first.tables["trip_board"].created == 2
    assert second.created == 0
    summary = {s.slug: s.counts for s in org_summary()}
    assert summary["trip-org-a"]["trip_note"] == 1
    assert summary["trip-org-b"]["trip_board"] == 1
    with cross_org(reason="test: read seeded notes"):
        bodies = sorted((n.org_id == uuid.UUID("ef7aabab-e8d9-49cb-aa85-eefd28a8b7e6"), n.body)
                        for n in TripNote.select())
    assert bodies == [(False, "B: river cruise"), (True, "A: port cellars")]


# -- tenantdb_protect refuses a table that breaks the rules -------------------------------

NEGATIVE_TABLES_SQL = """
CREATE TABLE bad_parent (org_id uuid NOT NULL, id uuid NOT NULL, PRIMARY KEY (org_id, id),
                         CONSTRAINT bad_parent_id_key UNIQUE (id));
CREATE TABLE bad_note (
    id uuid PRIMARY KEY,
    code text CONSTRAINT bad_note_code_key UNIQUE,
    parent_id uuid CONSTRAINT bad_note_parent_fkey REFERENCES bad_parent (id)
);
CREATE UNIQUE INDEX bad_note_lower_code_idx ON bad_note (lower(code));
"""


def test_protect_names_every_violation(app_schema: str) -> None:
    with psycopg2.connect(app_schema) as conn, conn.cursor() as cur:
        cur.execute(NEGATIVE_TABLES_SQL)
        with pytest.raises(psycopg2.errors.InvalidTableDefinition) as raised:
            cur.execute("SELECT tenantdb_protect('bad_note')")
        conn.rollback()
    message = str(raised.value)
    assert "5 violation(s)" in message
    for expected in ("no org_id column", "primary key bad_note_pkey (id) lacks org_id",
                     "unique key bad_note_code_key (code) lacks org_id",
                     "unique index bad_note_lower_code_idx (<expression>) lacks org_id",
                     "foreign key bad_note_parent_fkey (parent_id) to tenant table bad_parent "
                     "does not pair org_id"):
        assert expected in message


def test_protect_names_a_nullable_org_and_a_missing_key(app_schema: str) -> None:
    with psycopg2.connect(app_schema) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE loose (org_id uuid, id uuid)")
        with pytest.raises(psycopg2.errors.InvalidTableDefinition) as raised:
            cur.execute("SELECT tenantdb_protect('loose')")
        conn.rollback()
    assert "org_id is nullable" in str(raised.value)
    assert "no primary key" in str(raised.value)


def test_a_foreign_key_pairing_org_id_with_id_is_refused(app_schema: str) -> None:
    # Composite, and naming org_id on both sides, but org_id -> destination.id: each row could
    # point at another org's destination. Columns must be compared in key order.
    with psycopg2.connect(app_schema) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE crossed (org_id uuid NOT NULL, id uuid NOT NULL, "
                    "dest_id uuid, PRIMARY KEY (org_id, id), CONSTRAINT crossed_dest_fkey "
                    "FOREIGN KEY (org_id, dest_id) REFERENCES destination (id, org_id))")
        violations = [str(v) for v in table_violations(cur)]
        conn.rollback()
    assert ("crossed.crossed_dest_fkey: foreign key to tenant table destination does not "
            "pair org_id") in violations
    assert not any(v.startswith(("destination.", "itinerary.")) for v in violations)


# -- migrate refuses to record an unprotected location ------------------------------------

UNPROTECTED_SQL = """
CREATE TABLE IF NOT EXISTS loose_note (
    org_id uuid NOT NULL REFERENCES org (id),
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    body text,
    CONSTRAINT loose_note_pkey PRIMARY KEY (org_id, id)
);
"""


def test_migrate_refuses_an_unprotected_location_then_records_the_fix(
        empty_database_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "loose"
    folder.mkdir()
    (folder / "V01_01__loose_note.sql").write_text(UNPROTECTED_SQL)

    with pytest.raises(MigrationError) as raised:
        migrate.migrate(empty_database_url, [folder])

    message = str(raised.value)
    assert "loose: not recorded" in message
    assert "loose_note: row-level security is not enabled" in message
    assert "no row-level security policy for tenantdb_app" in message
    assert owner_rows(empty_database_url,
                      "SELECT count(*) FROM tenantdb_schema_history_loose") == [(0,)]
    (folder / "V01_01__loose_note.sql").write_text(
        UNPROTECTED_SQL + "SELECT tenantdb_protect('loose_note');\n")
    assert migrate.migrate(empty_database_url, [folder]) == ["loose/V01_01__loose_note.sql"]
    assert cli(empty_database_url, "check", "--location", str(folder)).returncode == 0


def test_destructive_statement_in_a_location_is_refused_before_any_sql(
        empty_database_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "shrinking"
    folder.mkdir()
    (folder / "V01_01__drop.sql").write_text("DROP TABLE destination;")
    with pytest.raises(MigrationError, match=r"shrinking/V01_01__drop\.sql.*DROP TABLE"):
        migrate.migrate(empty_database_url, [folder])
    assert owner_rows(empty_database_url, "SELECT to_regclass('org')") == [(None,)]


def test_two_locations_with_one_name_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a" / "notes").mkdir(parents=True)
    (tmp_path / "b" / "notes").mkdir(parents=True)
    with pytest.raises(MigrationError, match="share the name 'notes'"):
        migrate.migration_locations([tmp_path / "a" / "notes", tmp_path / "b" / "notes"])


def test_locations_from_the_environment_variable(empty_database_url: str) -> None:
    env = cli_env(TENANTDB_DATABASE_URL=empty_database_url,
                  TENANTDB_MIGRATION_LOCATIONS=f"{LOCATION}")
    done = subprocess.run([PYTHON, "-m", "tenantdb", "migrate"], env=env, capture_output=True,
                          text=True, timeout=180, check=True)
    assert "applied trip_notes/V01_01__trip_notes.sql" in done.stdout
    down = subprocess.run([PYTHON, "-m", "tenantdb", "migrate", "--down-to", "0"], env=env,
                          capture_output=True, text=True, timeout=180, check=True)
    assert down.stdout.splitlines()[0] == "undone  trip_notes/V01_01__trip_notes.sql"
    assert owner_rows(empty_database_url, "SELECT to_regclass('trip_note'), "
                                          f"to_regclass('{APP_HISTORY}')") == [(None, None)]


# -- check on an empty database; new-table ------------------------------------------------


def test_check_on_an_empty_database_names_what_is_missing(empty_database_url: str) -> None:
    done = cli(empty_database_url, "check", check=False)
    assert done.returncode == 1
    assert "destination: table is missing (run tenantdb migrate)" in done.stdout
    assert "V01_01__initial_schema.sql: migration not applied" in done.stdout
    assert "schema ok" not in done.stdout


def test_new_table_writes_a_migration_undo_and_model_that_pass(
        empty_database_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "travel"
    done = cli(empty_database_url, "new-table", "trip_photo", "--location", str(folder))
    assert done.stdout.count("wrote") == 3
    second = cli(empty_database_url, "new-table", "trip_video", "--location", str(folder))
    assert "V01_02__create_trip_video.sql" in second.stdout
    again = cli(empty_database_url, "new-table", "trip_photo", "--location", str(folder),
                check=False)
    assert again.returncode == 1 and "trip_photo_model.py already exists" in again.stderr
    assert not (folder / "V01_03__create_trip_photo.sql").exists()

    cli(empty_database_url, "migrate", "--location", str(folder))
    assert cli(empty_database_url, "check", "--location", str(folder)).returncode == 0
    model = (tmp_path / "trip_photo_model.py").read_text()
    assert "class TripPhoto(TenantRowModel):" in model
    down = cli(empty_database_url, "migrate", "--location", str(folder), "--down-to",
               "travel:01.01")
    assert "undone  travel/V01_02__create_trip_video.sql" in down.stdout
    assert owner_rows(empty_database_url, "SELECT to_regclass('trip_video'), "
                                          "to_regclass('trip_photo') IS NOT NULL") == [
        (None, True)]


# -- the pytest plugin: ini options for an application's migrations and seeds -------------

INNER_INI = """
[pytest]
tenantdb_migrations = app/trip_notes
tenantdb_seeds = app/seeds
"""
INNER_SUITE = '''
import uuid
from tenantdb.tenancy import cross_org, execute_scoped
from models import TripNote

A = uuid.UUID("ef7aabab-e8d9-49cb-aa85-eefd28a8b7e6")

def test_1_seeded_once_and_isolated(tenant_db):
    rows = execute_scoped(A, "SELECT body FROM trip_note").fetchall()
    assert rows == [("A: port cellars",)]
    TripNote.delete(org_id=A).execute()

def test_2_rolled_back(tenant_db):
    assert [n.body for n in TripNote.select(org_id=A)] == ["A: port cellars"]

def test_3_committed_empties(tenantdb_committed):
    TripNote.delete(org_id=A).execute()

def test_4_seeds_come_back(tenant_db, tenantdb_database):
    assert [n.body for n in TripNote.select(org_id=A)] == ["A: port cellars"]
    assert tenantdb_database.seed_files[0].name == "seeds"
'''


def test_plugin_migrates_and_seeds_an_application_from_its_ini(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
    tenantdb_database: TestDatabase,
) -> None:
    monkeypatch.setenv("TENANTDB_TEST_DATABASE_URL", tenantdb_database.url)
    monkeypatch.setenv("TENANTDB_TEST_REDIS_URL", "redis://127.0.0.1:1/0")  # not used
    app = pytester.path / "app"
    for folder in ("trip_notes", "trip_notes_undo", "seeds"):
        shutil.copytree(LOCATION.parent / folder, app / folder)
    shutil.copy(LOCATION.parent / "models.py", pytester.path / "models.py")
    pytester.makeini(INNER_INI)
    pytester.makepyfile(test_app=INNER_SUITE)

    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")

    result.assert_outcomes(passed=4)


# -- retention policies registered for application tables ---------------------------------


def test_registered_retention_policies_purge_per_org_and_across(
        tenantdb_committed: TenantDatabase) -> None:
    a = create_org("Org A", f"a-{uuid.uuid4().hex[:10]}").id
    b = create_org("Org B", f"b-{uuid.uuid4().hex[:10]}").id
    old, fresh = uuid.uuid4(), uuid.uuid4()
    long_ago = datetime.now(timezone.utc) - timedelta(days=40)
    for org in (a, b):
        dest = Destination.create(org_id=org, name="Porto")
        board = TripBoard.create(org_id=org, title="Summer")
        TripNote.create(org_id=org, id=old, board_id=board.id, destination_id=dest.id,
                        body="old", created_at=long_ago)
        TripNote.create(org_id=org, id=fresh, board_id=board.id, destination_id=dest.id,
                        body="fresh")

    assert [n.org_id for n in get_stale_rows("trip_notes", org_id=a)] == [a]
    assert purge("trip_notes", batch_size=1, org_id=a) == 1
    assert {n.id for n in TripNote.select(org_id=a)} == {fresh}
    assert {n.id for n in TripNote.select(org_id=b)} == {old, fresh}

    assert purge("trip_note_places", dry_run=True, all_orgs=True) == 1
    assert purge("trip_note_places", all_orgs=True) == 1  # only B's old note is left
    assert TripNote.get_by_id(old, org_id=b).destination_id is None
    assert TripNote.get_by_id(fresh, org_id=b).destination_id is not None
    assert TripNote.get_by_id(fresh, org_id=a).destination_id is not None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"time_column": "body"}, "not a timestamp field"),
     ({"window": timedelta(0)}, "positive timedelta"),
     ({"action": "archive"}, "'delete' or 'scrub'"),
     ({"action": "scrub", "scrub_columns": ("body",)}, "nullable, non-key"),
     ({"scrub_columns": ("destination_id",)}, "go with action='scrub'")],
)
def test_bad_retention_registration_is_refused(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"time_column": "created_at", "window": timedelta(days=1), **kwargs}
    with pytest.raises(ValueError, match=message):
        register_retention_policy("bad_policy", TripNote, **args)
    assert "bad_policy" not in registered_retention_policies()
    with pytest.raises(ValueError, match="already registered"):
        register_retention_policy("trip_notes", TripNote, time_column="created_at",
                                  window=timedelta(days=1))
    with pytest.raises(ValueError, match="unknown retention policy 'nope'"):
        purge("nope")


def test_cli_retention_lists_and_purges_the_application_policies(
        app_schema: str, tenantdb_committed: TenantDatabase) -> None:
    org = create_org("CLI", f"cli-{uuid.uuid4().hex[:10]}").id
    board = TripBoard.create(org_id=org, title="Winter")
    long_ago = datetime.now(timezone.utc) - timedelta(days=40)
    for _ in range(2):
        TripNote.create(org_id=org, board_id=board.id, body="old", created_at=long_ago)
    TripNote.create(org_id=org, board_id=board.id, body="fresh")
    env = cli_env(TENANTDB_DATABASE_URL=app_schema, PYTHONPATH=str(LOCATION.parent.parent))
    command = [PYTHON, "-m", "tenantdb", "retention", "--org", str(org),
               "--models", "app_schema.models"]

    listed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180,
                            check=False)
    assert listed.returncode == 0, listed.stderr
    counts = {line.split()[0]: line.split()[-1] for line in listed.stdout.splitlines()[2:]
              if not line.startswith("dry run")}
    assert counts["trip_notes"] == "2" and counts["trip_note_places"] == "0"
    assert TripNote.select(org_id=org).count() == 3

    purged = subprocess.run([*command, "--purge", "--batch-size", "1"], env=env,
                            capture_output=True, text=True, timeout=180, check=False)
    assert purged.returncode == 0, purged.stderr
    assert "purged trip_notes: 2" in purged.stdout
    assert "purging trip_notes: 2/2" in purged.stderr
    assert [n.body for n in TripNote.select(org_id=org)] == ["fresh"]
