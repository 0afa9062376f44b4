"""pytest fixtures for applications built on tenantdb (registered through ``pytest11``).

Nothing to configure: a session gets a fresh, migrated database on
``TENANTDB_TEST_DATABASE_URL``'s server, or on an embedded server in a temporary folder, and
a Redis (``TENANTDB_TEST_REDIS_URL`` or embedded). Fixtures:

- ``tenant_db``: one transaction per test, rolled back at its end (fast). The transaction
  lives on one connection logged in as the owner; both logins of ``database`` are pinned
  to it, the role taken per statement (``tenantdb_app`` for scoped work, ``tenantdb_admin``
  inside ``cross_org``). Only the test's thread may use it, and threads it admits with
  :func:`admit_threads` / :func:`admit_all_threads` (one statement at a time).
- ``tenantdb_committed``: real commits through the real logins (application and admin
  pools), for tests with threads or several connections; every table is emptied afterwards
  (slower).
- ``tenantdb_redis``: a Redis with a per-test key prefix, cleaned after the test.
- ``org_id``: a fresh org in the test's database.

Outside ``tenant_db``/``tenantdb_committed`` the database refuses access with an error
naming them, so no test writes to the shared session database by accident.

An application with tables of its own names its migration folders in the ini option
``tenantdb_migrations`` (or ``TENANTDB_MIGRATION_LOCATIONS``) and its seed files in
``tenantdb_seeds``: the session database is migrated with them and seeded once (seeds come
back after each ``tenantdb_committed`` test empties the tables). Overriding the session
fixtures ``tenantdb_migration_locations`` / ``tenantdb_seed_files`` computes them instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg2
import pytest
import redis
from psycopg2 import sql

from . import citus, db, embedded, migrate
from .db import APP_ROLE, execute_once, with_login
from .idempotency import allow_claims_in_transaction
from .orgs import create_org
from .redis_client import redis_client
from .seeds import load_seeds
from .settings import get_settings, override_settings
from .shared_transaction import admit_copied_contexts, admitted

__all__ = ["TestDatabase", "TestRedis", "admit_all_threads", "admit_threads"]

NO_ACCESS = (
    "database access outside a tenantdb fixture: use the `tenant_db` fixture (rolled back "
    "after the test) or `tenantdb_committed` (real commits, tables emptied after)"
)
TRUNCATE_ALL_SQL = "TRUNCATE org CASCADE"
TEST_DB_PREFIX = "tenantdb_test_"


@dataclass(frozen=True)
class TestDatabase:
    """The session's database: its name and its three logins' URLs.

    :param url: the owner (the server URL's login): migrations, administration.
    :param app_url: the application login ``tenantdb_app`` (no password: the test server
        must let it in, as the embedded server's ``trust`` does).
    :param admin_url: the admin login for ``cross_org`` work (the owner, as in development).
    :param seed_files: the application's seed files loaded once for the session.
    """

    __test__ = False  # not a test class, whatever its name says
    url: str
    name: str
    app_url: str = ""
    admin_url: str = ""
    seed_files: tuple[Path, ...] = ()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("tenantdb_migrations", type="paths", default=[],
                  help="tenantdb: the application's migration folders, applied after the "
                       "package's (relative to the ini file)")
    parser.addini("tenantdb_seeds", type="paths", default=[],
                  help="tenantdb: seed files or folders loaded once per session")


@pytest.fixture(scope="session")
def tenantdb_migration_locations(pytestconfig: pytest.Config) -> list[Path]:
    """Session scope: the application's migration folders (ini ``tenantdb_migrations``;
    ``TENANTDB_MIGRATION_LOCATIONS`` adds to them). Override it to compute them."""
    return list(pytestconfig.getini("tenantdb_migrations"))


@pytest.fixture(scope="session")
def tenantdb_seed_files(pytestconfig: pytest.Config) -> list[Path]:
    """Session scope: seed files or folders loaded once into the session database
    (ini ``tenantdb_seeds``). Override it to compute them."""
    return list(pytestconfig.getini("tenantdb_seeds"))


@dataclass(frozen=True)
class TestRedis:
    """A Redis for one test: keys under ``prefix`` are deleted after it."""

    __test__ = False
    url: str
    client: redis.Redis
    prefix: str


class _Access:
    """Who may use the database now: nobody, the ``tenant_db`` test's thread and the threads
    it admits, or everyone (``tenantdb_committed``)."""

    def __init__(self) -> None:
        self.everyone = False
        self.thread: int | None = None
        self.admitted: dict[int, int] = {}  # thread id -> nesting count
        self.all_threads = 0
        self.lock = threading.Lock()

    def check(self) -> None:
        if self.everyone:
            return
        me = threading.get_ident()
        # admitted(): a context copied from the test's (a TestClient or ASGITransport
        # request); see tenantdb.shared_transaction.
        if self.thread is not None and (
                me == self.thread or self.all_threads or me in self.admitted or admitted()):
            return
        __tracebackhide__ = True
        raise RuntimeError(NO_ACCESS)

    def require_tenant_db(self) -> None:
        if self.thread is None:
            raise RuntimeError("admit_threads() works only inside a test using `tenant_db`")


_ACCESS = "_tenantdb_access"


@contextlib.contextmanager
def admit_threads(*thread_ids: int) -> Iterator[None]:
    """Let these threads (default: the calling one) use the ``tenant_db`` test's transaction
    for the block, one statement at a time: e.g. the thread an ASGI test client serves
    requests on. Call from the test, or from the thread itself.

    :raises RuntimeError: no ``tenant_db`` test is running.
    """
    access = _guard()
    access.require_tenant_db()
    ids = thread_ids or (threading.get_ident(),)
    with access.lock:
        for ident in ids:
            access.admitted[ident] = access.admitted.get(ident, 0) + 1
    try:
        yield
    finally:
        with access.lock:
            for ident in ids:
                access.admitted[ident] -= 1
                if not access.admitted[ident]:
                    del access.admitted[ident]


@contextlib.contextmanager
def admit_all_threads() -> Iterator[None]:
    """Let every thread use the ``tenant_db`` test's transaction for the block (Starlette's
    ``TestClient`` runs the app on a thread of its own); statements are serialised on the
    test's one connection, so concurrent requests interleave their statements.

    :raises RuntimeError: no ``tenant_db`` test is running.
    """
    access = _guard()
    access.require_tenant_db()
    with access.lock:
        access.all_threads += 1
    try:
        yield
    finally:
        with access.lock:
            access.all_threads -= 1


@dataclass(frozen=True)
class _Servers:
    postgres_url: str
    redis_url: str


@pytest.fixture(scope="session")
def _tenantdb_servers() -> Iterator[_Servers]:
    """The test servers: from the environment, else embedded (started once, ~1 s)."""
    settings = get_settings()
    if settings.test_database_url and settings.test_redis_url:
        yield _Servers(settings.test_database_url, settings.test_redis_url)
        return
    # Not pytest's tmp_path: pytest prunes old numbered folders, and a concurrent session
    # could delete a data directory under a running server. A short path also keeps the
    # unix sockets under their length limit.
    home = Path(tempfile.mkdtemp(prefix="tenantdb-"))
    try:
        urls = embedded.start(home)
        yield _Servers(settings.test_database_url or urls.owner_database_url,
                       settings.test_redis_url or urls.redis_url)
    finally:
        embedded.stop(home)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def tenantdb_database(_tenantdb_servers: _Servers, tenantdb_migration_locations: list[Path],
                      tenantdb_seed_files: list[Path]) -> Iterator[TestDatabase]:
    """Session scope: a fresh database, migrated with tenantdb's migrations (and the
    application's), seeded once, bound to :data:`tenantdb.db.database` (the application
    login, and the owner as admin login) and dropped at the end (~0.3 s once per session)."""
    server_url = _tenantdb_servers.postgres_url
    name = TEST_DB_PREFIX + uuid.uuid4().hex[:12]
    # On a Citus coordinator the database is created on every node (Citus does not
    # propagate CREATE DATABASE); elsewhere this is a plain CREATE DATABASE.
    citus.create_database(server_url, name)
    url = _with_database(server_url, name)
    test_db = TestDatabase(url, name, app_url=with_login(url, APP_ROLE), admin_url=url)
    access = _Access()
    try:
        migrate.migrate(url, tenantdb_migration_locations)
        with override_settings(database_url=test_db.app_url, admin_database_url=url,
                               owner_database_url=url, redis_url=_tenantdb_servers.redis_url):
            db.connect(test_db.app_url, admin_url=url)
            seeds = tuple(tenantdb_seed_files)
            _load(seeds)
            db.database.access_guard = access.check
            yield dataclasses.replace(test_db, seed_files=seeds)
    finally:
        db.database.access_guard = None
        db.database.unpin()
        _close_pinned()
        db.close()
        citus.drop_database(server_url, name)


# The owner connection tenant_db pins: one per session, replaced if it died.
_pinned: dict[str, Any] = {}


def _owner_connection(url: str) -> Any:
    conn = _pinned.get(url)
    if conn is None or conn.closed:
        # The sessions of the pools get the statement timeout; the pinned one does too.
        conn = psycopg2.connect(
            url, options=f"-c statement_timeout={get_settings().statement_timeout_ms}")
        conn.autocommit = True  # Peewee sends BEGIN itself
        _pinned[url] = conn
    return conn


def _close_pinned() -> None:
    for conn in _pinned.values():
        conn.close()
    _pinned.clear()


@pytest.fixture
def tenant_db(tenantdb_database: TestDatabase) -> Iterator[db.TenantDatabase]:
    """Function scope: the test runs inside one transaction, rolled back at its end.

    Code under test may open its own (nested) ``atomic()`` blocks: they become savepoints,
    and idempotency claims are allowed inside the transaction. The transaction lives on one
    owner connection that both logins are pinned to, with the role taken per statement
    (``tenantdb_app``, or ``tenantdb_admin`` inside ``cross_org``). Only the test's own
    thread may use it, requests made through Starlette's ``TestClient`` or
    ``httpx.ASGITransport`` (they run in contexts copied from the test's: see
    :mod:`tenantdb.shared_transaction`), and threads admitted with :func:`admit_threads` /
    :func:`admit_all_threads`; for real concurrency use ``tenantdb_committed``.
    """
    access = _guard()
    database = db.database
    database.close()  # a connection this thread held must not be used under the pin
    database.pin(_owner_connection(tenantdb_database.url))
    access.thread = threading.get_ident()
    outer = database.transaction()
    try:
        outer.__enter__()
        # Claims inside the test's transaction are what the test wants to exercise.
        with allow_claims_in_transaction(), admit_copied_contexts():
            yield database
    finally:
        try:
            # Leaving the outermost transaction with an exception is peewee's rollback path.
            outer.__exit__(_RollbackSignal, _RollbackSignal(), None)
        finally:
            access.thread = None
            database.unpin()


@pytest.fixture
def tenantdb_committed(tenantdb_database: TestDatabase) -> Iterator[db.TenantDatabase]:
    """Function scope: real commits from any thread, through the application and admin
    logins; every table is emptied afterwards."""
    access = _guard()
    access.everyone = True
    try:
        yield db.database
    finally:
        db.close()
        execute_once(tenantdb_database.url, sql.SQL(TRUNCATE_ALL_SQL))
        _load(tenantdb_database.seed_files)
        access.everyone = False


@pytest.fixture
def org_id(request: pytest.FixtureRequest) -> uuid.UUID:
    """A fresh org, created in whichever of ``tenant_db``/``tenantdb_committed`` the test
    uses (``tenant_db`` if neither is requested)."""
    if "tenantdb_committed" not in request.fixturenames:
        request.getfixturevalue("tenant_db")
    # Creating an org is admin work: the application role has no right to insert one.
    org = create_org("Test org", f"test-{uuid.uuid4().hex[:12]}")
    return org.id


@pytest.fixture
def tenantdb_redis(_tenantdb_servers: _Servers) -> Iterator[TestRedis]:
    """Function scope: Redis with a fresh key prefix in Settings; its keys go afterwards."""
    url = _tenantdb_servers.redis_url
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    client = redis_client(url)
    try:
        with override_settings(redis_url=url, redis_key_prefix=prefix):
            yield TestRedis(url, client, prefix)
    finally:
        keys = list(client.scan_iter(match=f"{prefix}*", count=500))
        if keys:
            client.delete(*keys)
        client.close()


class _RollbackSignal(Exception):  # noqa: N818 - a signal, not an error
    """Raised into the test transaction's exit so that peewee rolls it back."""


def _load(seed_files: tuple[Path, ...]) -> None:
    for path in seed_files:
        load_seeds(path)
    db.close()


def _guard() -> _Access:
    check = db.database.access_guard
    access = getattr(check, "__self__", None)
    if not isinstance(access, _Access):
        raise RuntimeError("tenantdb_database is not set up")
    return access


def _with_database(url: str, name: str) -> str:
    return urlsplit(url)._replace(path=f"/{name}").geturl()
