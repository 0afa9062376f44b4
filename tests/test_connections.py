"""Connections as production meets them: borrowed per statement, replaced when dead, errors
that say what to do, and the three logins. Real servers, real threads, fault injection."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import peewee
import psycopg2
import psycopg2.errors
import pytest
from helpers import PYTHON, cli_env
from playhouse.pool import MaxConnectionsExceeded
from tenancy_fixtures import TwoOrgs

from tenantdb import db, embedded, migrate
from tenantdb.errors import (
    ConnectionLostError,
    DatabaseUnavailableError,
    NotConnectedError,
    PoolExhaustedError,
    StatementTimeoutError,
    TenancyError,
    TenantDBError,
    UnscopedQueryError,
)
from tenantdb.models import Destination, Org
from tenantdb.pytest_plugin import TestDatabase, admit_all_threads, admit_threads
from tenantdb.settings import override_settings
from tenantdb.tenancy import cross_org

DEAD_URL = "postgresql://tenantdb_app:s3cret-pw@127.0.0.1:1/nowhere_db"
COUNT_APP_SQL = ("SELECT count(*) FROM pg_stat_activity "
                 "WHERE datname = %s AND usename = 'tenantdb_app'")
TERMINATE_APP_SQL = ("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                     "WHERE datname = %s AND usename = 'tenantdb_app'")


@contextlib.contextmanager
def bound(app_url: str, admin_url: str, **settings: Any) -> Iterator[db.TenantDatabase]:
    """``db.database`` connected with these settings; the previous binding comes back."""
    previous_app, previous_admin = db.database_url(), db.admin_database_url()
    try:
        with override_settings(**settings):
            yield db.connect(app_url, admin_url=admin_url)
    finally:
        db.connect(previous_app, admin_url=previous_admin)


def owner_conn(url: str) -> psycopg2.extensions.connection:
    conn = psycopg2.connect(url)
    conn.autocommit = True
    return conn


def scalar(conn: psycopg2.extensions.connection, query: str, *params: object) -> Any:
    with conn.cursor() as cur:
        cur.execute(query, params)
        return cur.fetchone()[0]


def run_threads(count: int, target: Callable[[int], None]) -> None:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
        assert not thread.is_alive(), "a worker hung"


# -- borrowed per statement ---------------------------------------------------------------


def test_fifty_threads_share_a_pool_of_five_without_close(
        committed_twins: TwoOrgs, tenantdb_database: TestDatabase) -> None:
    errors: list[BaseException] = []
    peak = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        conn = owner_conn(tenantdb_database.url)
        try:
            while not done.is_set():
                peak = max(peak, scalar(conn, COUNT_APP_SQL, tenantdb_database.name))
                time.sleep(0.002)
        finally:
            conn.close()

    def worker(index: int) -> None:
        org = committed_twins[index % 2]
        for _ in range(40):  # 50 x 40 = 2,000 scoped statements, never a close()
            try:
                assert {d.org_id for d in Destination.select(org_id=org)} == {org}
            except BaseException as exc:  # counted below
                errors.append(exc)

    with bound(tenantdb_database.app_url, tenantdb_database.url, pool_size=5,
               pool_timeout_s=30):
        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            run_threads(50, worker)
        finally:
            done.set()
            watcher.join()
        in_use = len(db.database._in_use)
    print(f"50 threads, pool of 5: {len(errors)} errors, peak {peak} server connections")
    assert errors == []
    assert 1 <= peak <= 5
    assert in_use == 0  # every connection went back to the pool


def test_a_thread_that_never_closes_holds_no_connection_between_statements(
        committed_twins: TwoOrgs, tenantdb_database: TestDatabase) -> None:
    ran, release = threading.Event(), threading.Event()

    def idle_thread() -> None:
        Destination.select(org_id=committed_twins[0]).count()
        ran.set()
        release.wait(30)  # alive, never calls close()

    with bound(tenantdb_database.app_url, tenantdb_database.url, pool_size=1,
               pool_timeout_s=2):
        worker = threading.Thread(target=idle_thread)
        worker.start()
        try:
            assert ran.wait(30)
            started = time.monotonic()
            assert Destination.select(org_id=committed_twins[1]).count() == 1
            assert time.monotonic() - started < 1.5  # no wait for the pool's only connection
        finally:
            release.set()
            worker.join()


def test_a_transaction_keeps_its_connection_until_it_ends(
        committed_twins: TwoOrgs, tenantdb_database: TestDatabase) -> None:
    with bound(tenantdb_database.app_url, tenantdb_database.url, pool_size=2):
        database = db.database
        with database.atomic():
            first = database.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
            Destination.create(org_id=committed_twins[0], name="Porto")
            assert database.execute_sql("SELECT pg_backend_pid()").fetchone()[0] == first
            assert len(database._in_use) == 1
        assert len(database._in_use) == 0
        database.begin()  # a manual transaction holds its connection too
        try:
            pid = database.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
            assert database.execute_sql("SELECT pg_backend_pid()").fetchone()[0] == pid
        finally:
            database.rollback()
        assert len(database._in_use) == 0
    porto = Destination.select(org_id=committed_twins.a).where(Destination.name == "Porto")
    assert porto.count() == 1


# -- dead connections ---------------------------------------------------------------------


def test_terminated_backends_mid_load_cost_at_most_the_statements_in_flight(
        committed_twins: TwoOrgs, tenantdb_database: TestDatabase) -> None:
    failures: list[BaseException] = []
    finals: list[bool] = []
    terminated = 0
    stop = threading.Event()

    def worker(index: int) -> None:
        org = committed_twins[index % 2]
        while not stop.is_set():
            try:
                if index % 3 == 0:  # writes outside a transaction are never retried
                    Destination.create(org_id=org, name=f"w{index}-{uuid.uuid4().hex[:8]}")
                else:
                    assert Destination.select(org_id=org).count() >= 1
            except ConnectionLostError as exc:
                failures.append(exc)
            except BaseException as exc:  # anything else is a bug
                failures.append(exc)
                raise
        finals.append(Destination.select(org_id=org).count() >= 1)

    with bound(tenantdb_database.app_url, tenantdb_database.url, pool_size=4,
               pool_timeout_s=30):
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
        for thread in threads:
            thread.start()
        killer = owner_conn(tenantdb_database.url)
        try:
            for _ in range(8):
                time.sleep(0.15)
                terminated += scalar(killer, TERMINATE_APP_SQL, tenantdb_database.name)
        finally:
            stop.set()
            killer.close()
            for thread in threads:
                thread.join(60)
    print(f"terminated {terminated} backends; {len(failures)} call(s) failed")
    assert terminated >= 8
    assert all(isinstance(f, ConnectionLostError) for f in failures), failures[:3]
    # Each termination can fail only a statement running on that backend at that moment.
    assert len(failures) <= terminated
    assert finals == [True] * 12  # every thread recovered


def test_idle_connections_killed_in_the_pool_are_replaced_without_an_error(
        committed_twins: TwoOrgs, tenantdb_database: TestDatabase) -> None:
    with bound(tenantdb_database.app_url, tenantdb_database.url, pool_size=3):
        warm = threading.Barrier(3)

        def warm_up(_: int) -> None:
            with db.database.atomic():
                Destination.select(org_id=committed_twins[0]).count()
                warm.wait(10)  # three connections open at once, then all back in the pool

        run_threads(3, warm_up)
        killer = owner_conn(tenantdb_database.url)
        try:
            assert scalar(killer, TERMINATE_APP_SQL, tenantdb_database.name) == 3
        finally:
            killer.close()
        time.sleep(0.2)
        # Writes are not retried: these succeed because the dead ones are never handed out.
        for n in range(5):
            Destination.create(org_id=committed_twins[1], name=f"after-{n}")


def test_a_connection_lost_in_a_transaction_fails_that_transaction_only(
        committed_twins: TwoOrgs, tenantdb_database: TestDatabase) -> None:
    with bound(tenantdb_database.app_url, tenantdb_database.url, pool_size=2):
        database = db.database
        killer = owner_conn(tenantdb_database.url)
        try:
            with pytest.raises(ConnectionLostError) as caught, database.atomic():
                pid = database.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
                Destination.create(org_id=committed_twins[0], name="lost")
                scalar(killer, "SELECT pg_terminate_backend(%s)", pid)
                time.sleep(0.1)
                Destination.create(org_id=committed_twins[0], name="lost too")
        finally:
            killer.close()
        assert isinstance(caught.value, peewee.OperationalError)
        assert isinstance(caught.value, peewee.InterfaceError)
        assert isinstance(caught.value.__cause__, psycopg2.Error)
        assert "retry the transaction" in str(caught.value)
        assert Destination.select(org_id=committed_twins[0]).where(
            Destination.name.startswith("lost")).count() == 0
        assert not database.in_transaction() and len(database._in_use) == 0


# -- our own server: restart and freeze ---------------------------------------------------


@pytest.fixture(scope="module")
def own_server() -> Iterator[embedded.EmbeddedUrls]:
    home = Path(tempfile.mkdtemp(prefix="tdb-conn-"))
    try:
        urls = embedded.start(home)
        migrate.migrate(urls.owner_database_url)
        yield urls
    finally:
        embedded.stop(home)
        shutil.rmtree(home, ignore_errors=True)


def postmaster(urls: embedded.EmbeddedUrls) -> tuple[int, Path, Path]:
    """The postmaster's pid, its data directory and the pg_ctl next to it."""
    with owner_conn(urls.owner_database_url) as conn:
        data = Path(scalar(conn, "SHOW data_directory"))
    conn.close()
    pid = int((data / "postmaster.pid").read_text().split()[0])
    return pid, data, Path(os.readlink(f"/proc/{pid}/exe")).parent / "pg_ctl"


def test_server_restart_mid_load_every_thread_recovers(
        own_server: embedded.EmbeddedUrls, tenantdb_committed: db.TenantDatabase) -> None:
    owner = own_server.owner_database_url
    org = uuid.uuid4()
    execute = db.execute_once
    execute(owner, f"INSERT INTO org (id, name, slug) VALUES ('{org}', 'R', 'r-{org.hex[:8]}')")
    execute(owner, f"INSERT INTO destination (org_id, name) VALUES ('{org}', 'x')")
    failures: list[BaseException] = []
    finals: list[int] = []
    stop = threading.Event()

    def worker(index: int) -> None:
        while not stop.is_set():
            try:
                if index % 2:
                    Destination.select(org_id=org).count()
                else:
                    Destination.create(org_id=org, name=f"t{index}-{uuid.uuid4().hex[:8]}")
            except (ConnectionLostError, DatabaseUnavailableError) as exc:
                failures.append(exc)
                time.sleep(0.05)  # the server is still coming back
        finals.append(Destination.select(org_id=org).count())

    _, data, pg_ctl = postmaster(own_server)
    with bound(own_server.database_url, owner, pool_size=4, pool_timeout_s=30):
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        time.sleep(0.3)
        # As the data directory's owner (pgserver runs the server as its own user under
        # root); a log file keeps the new postmaster off our pipes.
        restart = subprocess.run(
            [str(pg_ctl), "restart", "-D", str(data), "-m", "fast", "-w",
             "-l", str(data / "restart.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, timeout=60, check=False,
            user=data.stat().st_uid if os.geteuid() == 0 else None)
        time.sleep(0.5)
        stop.set()
        for thread in threads:
            thread.join(60)
    assert restart.returncode == 0, restart.stderr
    lost = [f for f in failures if isinstance(f, ConnectionLostError)]
    print(f"restart: {len(lost)} lost in flight, {len(failures) - len(lost)} refused while "
          "the server was down")
    assert len(lost) <= 4  # at most one statement in flight per pooled connection
    assert len(finals) == 8 and all(n >= 1 for n in finals)  # every thread recovered


def test_frozen_server_each_connecting_thread_fails_within_its_own_timeout(
        own_server: embedded.EmbeddedUrls, tenantdb_committed: db.TenantDatabase) -> None:
    pid, _, _ = postmaster(own_server)
    timeout = 2  # libpq's minimum
    elapsed: list[float] = []
    errors: list[BaseException] = []
    gate = threading.Barrier(4)

    def worker(_: int) -> None:
        gate.wait(10)
        started = time.monotonic()
        try:
            db.database.execute_sql("SELECT 1")
        except BaseException as exc:  # collected
            errors.append(exc)
        elapsed.append(time.monotonic() - started)

    with bound(own_server.database_url, own_server.owner_database_url, pool_size=4,
               connect_timeout_s=timeout, pool_timeout_s=30):
        os.kill(pid, signal.SIGSTOP)
        try:
            begun = time.monotonic()
            run_threads(4, worker)
            wall = time.monotonic() - begun
        finally:
            os.kill(pid, signal.SIGCONT)
        assert db.database.execute_sql("SELECT 1").fetchone() == (1,)  # back after SIGCONT
    print(f"frozen server: {sorted(round(e, 2) for e in elapsed)} s, wall {wall:.2f} s")
    assert len(errors) == 4 and all(isinstance(e, DatabaseUnavailableError) for e in errors)
    assert max(elapsed) < timeout * 1.9, elapsed  # not 2, 4, 6, 8 s
    assert wall < timeout * 2.5, wall


# -- errors that say what to do -----------------------------------------------------------


def test_rebinding_keeps_nothing_of_the_previous_url(tenantdb_committed: db.TenantDatabase,
                                                     tenantdb_database: TestDatabase) -> None:
    first = "postgresql://someone:s3cret@127.0.0.1:6543/first_db"
    with bound(first, first):
        pass
    with bound("postgresql://other@localhost/second_db", tenantdb_database.url) as database:
        params = dict(database.connect_params)
    assert params.get("user") == "other" and params.get("host") == "localhost"
    assert "port" not in params and "password" not in params


def test_unavailable_database_names_host_and_database_never_the_password(
        tenantdb_committed: db.TenantDatabase, tenantdb_database: TestDatabase) -> None:
    with bound(DEAD_URL, tenantdb_database.url, connect_timeout_s=2), \
            pytest.raises(DatabaseUnavailableError) as caught:
        Org.select(org_id=uuid.uuid4()).count()
    error = caught.value
    assert isinstance(error, peewee.OperationalError) and isinstance(error, TenantDBError)
    assert isinstance(error.__cause__, psycopg2.OperationalError)
    text = str(error)
    assert "127.0.0.1" in text and "nowhere_db" in text and "TENANTDB_DATABASE_URL" in text
    assert "s3cret" not in text


def test_cross_org_on_a_dead_admin_login_names_the_admin_setting(
        tenantdb_committed: db.TenantDatabase, tenantdb_database: TestDatabase) -> None:
    with bound(tenantdb_database.app_url, DEAD_URL, connect_timeout_s=2), \
            pytest.raises(DatabaseUnavailableError, match="TENANTDB_ADMIN_DATABASE_URL"), \
            cross_org(reason="test: dead admin login"):
        Org.select().count()


def test_pool_exhausted_names_the_settings_and_the_usual_cause(
        committed_twins: TwoOrgs, tenantdb_database: TestDatabase) -> None:
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with db.database.atomic():
            Destination.select(org_id=committed_twins[0]).count()
            holding.set()
            release.wait(30)

    with bound(tenantdb_database.app_url, tenantdb_database.url, pool_size=1,
               pool_timeout_s=1):
        worker = threading.Thread(target=hold)
        worker.start()
        try:
            assert holding.wait(30)
            with pytest.raises(PoolExhaustedError) as caught:
                Destination.select(org_id=committed_twins[1]).count()
        finally:
            release.set()
            worker.join()
        assert Destination.select(org_id=committed_twins[1]).count() == 1  # free again
    assert isinstance(caught.value, MaxConnectionsExceeded)
    text = str(caught.value)
    assert "TENANTDB_POOL_SIZE=1" in text and "TENANTDB_POOL_TIMEOUT" in text
    assert "transaction" in text


def test_statement_timeout_names_the_setting(
        tenantdb_committed: db.TenantDatabase, tenantdb_database: TestDatabase) -> None:
    with bound(tenantdb_database.app_url, tenantdb_database.url, statement_timeout_ms=200):
        with pytest.raises(StatementTimeoutError) as caught:
            db.database.execute_sql("SELECT pg_sleep(2)")
        assert db.database.execute_sql("SELECT 1").fetchone() == (1,)
    assert isinstance(caught.value, peewee.OperationalError)
    assert isinstance(caught.value.__cause__, psycopg2.errors.QueryCanceled)
    assert "TENANTDB_STATEMENT_TIMEOUT_MS=200" in str(caught.value)


def test_forgetting_connect_says_to_call_it() -> None:
    unbound = db.TenantDatabase(None)
    def across() -> None:
        with cross_org(reason="test: not connected"):
            unbound.execute_sql("SELECT 1")

    for call in (lambda: unbound.execute_sql("SELECT 1"), unbound.connect,
                 lambda: unbound.atomic().__enter__(), across):
        with pytest.raises(NotConnectedError, match=r"tenantdb\.connect\(\)") as caught:
            call()
        assert isinstance(caught.value, peewee.InterfaceError)


@pytest.mark.parametrize("command", ["check", "report", "seed", "migrate"])
def test_cli_against_a_dead_url_prints_one_line(command: str, tmp_path: Path) -> None:
    env = cli_env(TENANTDB_DATABASE_URL=DEAD_URL, TENANTDB_OWNER_DATABASE_URL=DEAD_URL,
                  TENANTDB_HOME=str(tmp_path), TENANTDB_CONNECT_TIMEOUT="2")
    args = [command, str(tmp_path)] if command == "seed" else [command]
    done = subprocess.run([PYTHON, "-m", "tenantdb", *args], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "s3cret" not in done.stderr + done.stdout


# -- three logins -------------------------------------------------------------------------


def test_application_connections_log_in_as_the_application_login(
        tenantdb_committed: db.TenantDatabase) -> None:
    database = tenantdb_committed
    assert database.execute_sql("SELECT current_user, session_user").fetchone() == (
        "tenantdb_app", "tenantdb_app")
    with pytest.raises(UnscopedQueryError, match="RESET"):
        database.execute_sql("RESET ROLE")  # the Python layer refuses it first
    with database.atomic():
        cur = database.connection().cursor()  # the raw driver: the database wall alone
        cur.execute("RESET ROLE")
        cur.execute("SELECT current_user")
        assert cur.fetchone() == ("tenantdb_app",)
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            cur.execute("SET ROLE postgres")


def test_cross_org_runs_on_the_admin_login_and_its_transactions_too(
        committed_twins: TwoOrgs, tenantdb_committed: db.TenantDatabase,
        tenantdb_database: TestDatabase) -> None:
    database = tenantdb_committed
    admin_user = psycopg2.extensions.parse_dsn(tenantdb_database.admin_url).get("user") or (
        "postgres")
    with database.atomic():
        app_pid = database.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
        with cross_org(reason="test: admin login"):
            pid, user = database.execute_sql("SELECT pg_backend_pid(), session_user").fetchone()
            assert Destination.select().count() == 2
            assert not database.in_transaction()  # the app's transaction is not the admin's
        assert (pid != app_pid, user) == (True, admin_user)
    with cross_org(reason="test: admin transaction"), database.atomic():
        first = database.execute_sql("SELECT pg_backend_pid(), session_user").fetchone()
        assert database.admin.in_transaction() and database.in_transaction()
        Destination.create(org_id=committed_twins[1], name="admin-written")
        assert database.execute_sql("SELECT pg_backend_pid()").fetchone()[0] == first[0]
    assert first[1] == admin_user
    assert Destination.select(org_id=committed_twins[1]).count() == 2
    assert len(database.admin._in_use) == 0


# -- the pinned test transaction ----------------------------------------------------------


def test_tenant_db_admits_threads_the_test_allows(org_id: uuid.UUID,
                                                 tenant_db: db.TenantDatabase) -> None:
    Destination.create(org_id=org_id, name="uncommitted")
    seen: list[object] = []

    def request() -> None:
        try:
            seen.append(Destination.select(org_id=org_id).count())
        except RuntimeError as exc:
            seen.append(exc)

    refused = threading.Thread(target=request)
    refused.start()
    refused.join()
    with admit_all_threads():
        run_threads(3, lambda _: request())
    admitted = threading.Thread(target=request)
    with admit_threads(threading.get_ident()):
        pass
    admitted.start()
    admitted.join()

    def self_admitted() -> None:
        with admit_threads():
            request()

    run_threads(1, lambda _: self_admitted())
    assert isinstance(seen[0], RuntimeError) and "tenantdb_committed" in str(seen[0])
    assert seen[1:4] == [1, 1, 1]  # they see the test's uncommitted row
    assert isinstance(seen[4], RuntimeError)
    assert seen[5] == 1


def test_tenant_db_takes_the_role_per_statement(org_id: uuid.UUID,
                                               tenant_db: db.TenantDatabase) -> None:
    assert tenant_db.execute_sql("SELECT current_user").fetchone() == ("tenantdb_app",)
    with cross_org(reason="test: pinned admin"):
        assert tenant_db.execute_sql("SELECT current_user").fetchone() == ("tenantdb_admin",)
    assert tenant_db.execute_sql("SELECT current_user").fetchone() == ("tenantdb_app",)


def test_rows_stay_readable_after_the_connection_went_back_and_was_reused(
        committed_twins: TwoOrgs, tenantdb_database: TestDatabase) -> None:
    with bound(tenantdb_database.app_url, tenantdb_database.url, pool_size=1):
        cursor = db.database.execute_sql("SELECT generate_series(1, 500)")
        assert len(db.database._in_use) == 0  # given back before the rows are read

        def other() -> None:
            for _ in range(20):
                Destination.select(org_id=committed_twins[1]).count()

        run_threads(2, lambda _: other())
        assert [n for (n,) in cursor.fetchall()] == list(range(1, 501))


def test_a_query_built_inside_cross_org_runs_without_it_outside(
        committed_twins: TwoOrgs, tenantdb_committed: db.TenantDatabase) -> None:
    with cross_org(reason="test: built here"):
        query = Destination.select(Destination.org_id)
        assert {d.org_id for d in query} == set(committed_twins)
    # Run outside the block: the application login, whose row-level security wants an org.
    with pytest.raises((peewee.DatabaseError, TenancyError)):
        list(query.clone())


def test_a_held_connection_killed_between_statements_is_replaced(
        committed_twins: TwoOrgs, tenantdb_database: TestDatabase) -> None:
    with bound(tenantdb_database.app_url, tenantdb_database.url, pool_size=2):
        database = db.database
        database.connect()  # the old model: the thread holds one connection
        try:
            pid = database.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
            killer = owner_conn(tenantdb_database.url)
            try:
                scalar(killer, "SELECT pg_terminate_backend(%s)", pid)
            finally:
                killer.close()
            time.sleep(0.2)
            Destination.create(org_id=committed_twins[0], name="after the kill")  # no error
            assert database.execute_sql("SELECT pg_backend_pid()").fetchone()[0] != pid
        finally:
            database.close()
