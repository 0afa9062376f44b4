"""Migrations: additive, re-runnable, undoable, one runner at a time."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.errors
import pytest
from helpers import PYTHON, cli_env

from tenantdb import migrate
from tenantdb.errors import MigrationError
from tenantdb.migrate import (
    HISTORY_TABLE,
    MIGRATIONS_DIR,
    UNDO_DIR,
    find_destructive_statements,
    local_migrations,
    parse_version,
)

RELEASED = json.loads((Path(__file__).parent / "released_migrations.json").read_text())

SCHEMA_SNAPSHOT_SQL = {
    "columns": """
        SELECT table_name, column_name, data_type, udt_name, is_nullable, column_default
        FROM information_schema.columns WHERE table_schema = 'public' AND table_name <> %s
        ORDER BY 1, 2""",
    "indexes": """
        SELECT tablename, indexname, indexdef FROM pg_indexes
        WHERE schemaname = 'public' AND tablename <> %s ORDER BY 1, 2""",
    "constraints": """
        SELECT c.conrelid::regclass::text, c.conname, pg_get_constraintdef(c.oid)
        FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
        WHERE n.nspname = 'public' AND c.conrelid::regclass::text <> %s ORDER BY 1, 2""",
}


def snapshot(url: str) -> dict[str, list[tuple[Any, ...]]]:
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        result = {}
        for name, query in SCHEMA_SNAPSHOT_SQL.items():
            cur.execute(query, (HISTORY_TABLE,))
            result[name] = cur.fetchall()
        return result


def history(url: str) -> list[tuple[str, str]]:
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT version, name FROM {HISTORY_TABLE} ORDER BY installed_rank")
        return cur.fetchall()


# -- the files ----------------------------------------------------------------------------


@pytest.mark.parametrize("migration", local_migrations(), ids=lambda m: m.name)
def test_forward_migration_has_no_destructive_statement(migration: migrate.MigrationFile) -> None:
    assert find_destructive_statements(migration.path.read_text()) == []


@pytest.mark.parametrize(
    ("statement", "kind"),
    [
        ("DROP TABLE org;", "DROP TABLE"),
        ("alter table org drop column slug;", "DROP COLUMN"),
        ("ALTER TABLE org DROP CONSTRAINT org_slug_key;", "ALTER ... DROP"),
        ("TRUNCATE itinerary;", "TRUNCATE"),
        ("ALTER TABLE org RENAME TO tenant;", "RENAME"),
        ("ALTER TABLE org ALTER COLUMN name TYPE varchar(10);", "type change"),
    ],
)
def test_destructive_check_fires_on_each_kind(statement: str, kind: str) -> None:
    assert kind in find_destructive_statements(f"CREATE TABLE x (a int);\n{statement}")


def test_destructive_check_ignores_comments_and_strings() -> None:
    script = """-- DROP TABLE org; (a comment)
    /* TRUNCATE org */
    COMMENT ON TABLE org IS 'never DROP TABLE this';
    DO $$ BEGIN RAISE NOTICE 'RENAME'; END $$;
    """
    assert find_destructive_statements(script) == []


def test_migration_file_names_are_valid_for_pyway() -> None:
    names = sorted(p.name for p in MIGRATIONS_DIR.iterdir())
    assert names and [m.name for m in local_migrations()] == names


def test_invalid_file_name_is_refused(tmp_path: Path) -> None:
    (tmp_path / "V1__too_short.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"V1__too_short\.sql"):
        local_migrations(tmp_path)


def test_every_migration_has_an_undo_script() -> None:
    assert [m.name for m in local_migrations()] == sorted(p.name for p in UNDO_DIR.iterdir())


def test_released_migrations_are_unchanged() -> None:
    current = {m.name: m.checksum for m in local_migrations()}
    assert current == RELEASED, (
        "a released migration was edited (or a new one is not recorded in "
        "tests/released_migrations.json): add a new version instead of editing"
    )


def test_parse_version_normalises() -> None:
    assert parse_version("1.1") == "01.01"
    assert parse_version("01_02") == "01.02"
    assert parse_version("0") == "0"
    with pytest.raises(ValueError, match="not a migration version"):
        parse_version("latest")


# -- against PostgreSQL -------------------------------------------------------------------


def test_migrate_twice_changes_nothing(empty_database_url: str) -> None:
    assert migrate.migrate(empty_database_url) == [m.name for m in local_migrations()]
    first = snapshot(empty_database_url)
    assert migrate.migrate(empty_database_url) == []
    assert snapshot(empty_database_url) == first
    assert len(history(empty_database_url)) == len(local_migrations())


def test_down_to_zero_then_up_gives_identical_schema(empty_database_url: str) -> None:
    migrate.migrate(empty_database_url)
    before = snapshot(empty_database_url)
    assert before["columns"]

    undone = migrate.down_to("0", empty_database_url)

    assert undone == [m.name for m in reversed(local_migrations())]
    assert snapshot(empty_database_url) == {"columns": [], "indexes": [], "constraints": []}
    migrate.migrate(empty_database_url)
    assert snapshot(empty_database_url) == before


def test_info_lists_pending_then_applied(empty_database_url: str) -> None:
    assert {row.state for row in migrate.info(empty_database_url)} == {"pending"}
    migrate.migrate(empty_database_url)
    assert {row.state for row in migrate.info(empty_database_url)} == {"applied"}


def test_edited_applied_migration_fails_validation(empty_database_url: str) -> None:
    migrate.migrate(empty_database_url)
    with psycopg2.connect(empty_database_url) as conn, conn.cursor() as cur:
        cur.execute(f"UPDATE {HISTORY_TABLE} SET checksum = 'DEADBEEF'")
    assert {row.state for row in migrate.info(empty_database_url)} == {"changed"}
    with pytest.raises(MigrationError, match="diff script"):
        migrate.migrate(empty_database_url)


def test_three_concurrent_migrate_commands_apply_each_version_once(
    empty_database_url: str,
) -> None:
    env = cli_env(TENANTDB_DATABASE_URL=empty_database_url)
    runners = [
        subprocess.Popen([PYTHON, "-m", "tenantdb", "migrate"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [runner.communicate(timeout=120) for runner in runners]

    assert [runner.returncode for runner in runners] == [0, 0, 0], outputs
    applied_lines = [line for out, _ in outputs for line in out.splitlines()
                     if line.startswith("applied")]
    assert len(applied_lines) == len(local_migrations())
    versions = [version for version, _ in history(empty_database_url)]
    assert sorted(versions) == sorted(m.version for m in local_migrations())


def test_cli_migrate_info_and_down_to(empty_database_url: str) -> None:
    env = cli_env(TENANTDB_DATABASE_URL=empty_database_url)

    def run(*args: str) -> str:
        done = subprocess.run([PYTHON, "-m", "tenantdb", "migrate", *args], env=env,
                              capture_output=True, text=True, timeout=120, check=True)
        return done.stdout

    assert "pending" in run("--info")
    run()
    assert "applied" in run("--info")
    assert "undone" in run("--down-to", "0")
    assert history_table_gone(empty_database_url)


def history_table_gone(url: str) -> bool:
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NULL", (HISTORY_TABLE,))
        row = cur.fetchone()
        return bool(row and row[0])


def test_plain_pyway_migrate_from_repo_root_uses_the_shipped_conf(empty_database_url: str) -> None:
    repo = Path(__file__).resolve().parents[1]
    env = cli_env(TENANTDB_DATABASE_URL=empty_database_url)
    pgenv = subprocess.run([PYTHON, "-m", "tenantdb", "pgenv"], env=env, capture_output=True,
                           text=True, timeout=60, check=True).stdout
    for line in pgenv.splitlines():
        name, value = line.removeprefix("export ").split("=", 1)
        env[name] = value.strip("'")

    subprocess.run([PYTHON, "-m", "pyway.scripts.main", "migrate"], cwd=repo, env=env,
                   capture_output=True, text=True, timeout=120, check=True)

    assert [v for v, _ in history(empty_database_url)] == [m.version for m in local_migrations()]
    assert migrate.migrate(empty_database_url) == []


# -- a killed runner: its work dies with it, and a rerun converges ------------------------

APP_LOCATION = Path(__file__).parent / "app_schema" / "trip_notes"
WAITING_PYWAY_SQL = """
    SELECT pid FROM pg_stat_activity
    WHERE datname = current_database() AND application_name = %s AND wait_event_type = 'Lock'
"""


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status  # a zombie nobody reaped yet has stopped running


def _wait_for(predicate: Any, what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _waiting_pyway(url: str) -> list[int]:
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(WAITING_PYWAY_SQL, (migrate.PYWAY_APPLICATION_NAME,))
        return [pid for (pid,) in cur.fetchall()]


def _history_counts(url: str, table: str) -> dict[str, int]:
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT version, count(*) FROM {table} GROUP BY version")
        return dict(cur.fetchall())


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc (Linux)")
@pytest.mark.parametrize(
    ("undo_to", "args", "table"),
    [("01.03", [], HISTORY_TABLE),
     ("trip_notes:0", ["--location", str(APP_LOCATION)], f"{HISTORY_TABLE}_trip_notes")],
    ids=["package-file", "application-file"],
)
def test_sigkill_of_migrate_mid_file_then_rerun_records_each_version_once(
    empty_database_url: str, undo_to: str, args: list[str], table: str
) -> None:
    url = empty_database_url
    migrate.migrate(url, [APP_LOCATION])
    clean = snapshot(url)
    expected = _history_counts(url, table)
    migrate.down_to(undo_to, url, [APP_LOCATION])
    env = cli_env(TENANTDB_DATABASE_URL=url)
    blocker = psycopg2.connect(url)
    try:
        with blocker.cursor() as cur:  # the next file touches destination: it will wait
            cur.execute("LOCK TABLE destination IN ACCESS EXCLUSIVE MODE")
        runner = subprocess.Popen([PYTHON, "-m", "tenantdb", "migrate", *args], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        orphan_backend = _wait_for(lambda: _waiting_pyway(url), "pyway to block")[0]
        workers = _children(runner.pid)
        assert workers, "the runner's pyway child"

        runner.kill()  # SIGKILL, the runner alone
        runner.communicate(timeout=30)

        for pid in workers:
            _wait_for(lambda pid=pid: _gone(pid), f"pyway child {pid} to die", timeout=10)
        rerun = subprocess.Popen([PYTHON, "-m", "tenantdb", "migrate", *args], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # The rerun ends the killed run's backend, then queues behind the lock itself.
        _wait_for(lambda: (w := _waiting_pyway(url)) and orphan_backend not in w,
                  "the rerun to replace the orphaned backend")
        blocker.rollback()
        out, err = rerun.communicate(timeout=120)
    finally:
        blocker.close()

    assert rerun.returncode == 0, err
    assert "applied" in out
    assert _history_counts(url, table) == expected
    assert set(expected.values()) == {1}
    assert snapshot(url) == clean


def test_history_refuses_a_version_twice(empty_database_url: str) -> None:
    migrate.migrate(empty_database_url)
    with psycopg2.connect(empty_database_url) as conn, conn.cursor() as cur, \
            pytest.raises(psycopg2.errors.UniqueViolation):
        cur.execute(f"INSERT INTO {HISTORY_TABLE} (version, extension, name, checksum) "
                    "VALUES ('01.01', 'SQL', 'again.sql', '0')")


def test_three_concurrent_runs_with_a_location_record_each_version_once(
    empty_database_url: str,
) -> None:
    env = cli_env(TENANTDB_DATABASE_URL=empty_database_url)
    runners = [
        subprocess.Popen([PYTHON, "-m", "tenantdb", "migrate", "--location", str(APP_LOCATION)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [runner.communicate(timeout=180) for runner in runners]

    assert [runner.returncode for runner in runners] == [0, 0, 0], outputs
    applied = [line for out, _ in outputs for line in out.splitlines()
               if line.startswith("applied trip_notes/")]
    assert applied == ["applied trip_notes/V01_01__trip_notes.sql"]
    assert _history_counts(empty_database_url, f"{HISTORY_TABLE}_trip_notes") == {"01.01": 1}
    assert set(_history_counts(empty_database_url, HISTORY_TABLE).values()) == {1}


def test_down_to_an_unknown_location_is_refused_before_any_sql() -> None:
    with pytest.raises(ValueError, match="no location named 'nope'"):
        migrate.down_to("nope:01.01", "postgresql://nobody@127.0.0.1:1/none", [APP_LOCATION])


def test_cli_refuses_an_unprotected_location_in_one_line(empty_database_url: str,
                                                         tmp_path: Path) -> None:
    folder = tmp_path / "careless"
    folder.mkdir()
    (folder / "V01_01__careless.sql").write_text(
        "CREATE TABLE IF NOT EXISTS careless (org_id uuid NOT NULL, id uuid NOT NULL, "
        "code text UNIQUE, PRIMARY KEY (org_id, id));")
    done = subprocess.run([PYTHON, "-m", "tenantdb", "migrate", "--location", str(folder)],
                          env=cli_env(TENANTDB_DATABASE_URL=empty_database_url),
                          capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "careless: not recorded" in done.stderr
    assert "careless.careless_code_key: unique key (code) lacks org_id" in done.stderr
    assert "row-level security is not enabled" in done.stderr
