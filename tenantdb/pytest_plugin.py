"""pytest fixtures for applications built on tenantdb (registered through ``pytest11``).

Nothing to configure: a session gets a fresh, migrated database on
``TENANTDB_TEST_DATABASE_URL``'s server, or on an embedded server in a temporary folder, and
a Redis (``TENANTDB_TEST_REDIS_URL`` or embedded). Fixtures:

- ``tenant_db``: one transaction per test, rolled back at its end (fast; one thread).
- ``tenantdb_committed``: real commits, for tests with threads or several connections;
  every table is emptied afterwards (slower).
- ``tenantdb_redis``: a Redis with a per-test key prefix, cleaned after the test.
- ``org_id``: a fresh org in the test's database.

Outside ``tenant_db``/``tenantdb_committed`` the database refuses access with an error
naming them, so no test writes to the shared session database by accident.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
from psycopg2 import sql

from . import citus, db, embedded, migrate
from .db import execute_once
from .idempotency import allow_claims_in_transaction
from .models import Org
from .redis_client import redis_client
from .settings import get_settings, override_settings

__all__ = ["TestDatabase", "TestRedis"]

NO_ACCESS = (
    "database access outside a tenantdb fixture: use the `tenant_db` fixture (rolled back "
    "after the test) or `tenantdb_committed` (real commits, tables emptied after)"
)
TRUNCATE_ALL_SQL = "TRUNCATE org CASCADE"
TEST_DB_PREFIX = "tenantdb_test_"


@dataclass(frozen=True)
class TestDatabase:
    """The session's database: its URL (owner role) and name."""

    __test__ = False  # not a test class, whatever its name says
    url: str
    name: str


@dataclass(frozen=True)
class TestRedis:
    """A Redis for one test: keys under ``prefix`` are deleted after it."""

    __test__ = False
    url: str
    client: redis.Redis
    prefix: str


class _Access:
    """Who may use the database now: nobody, one thread (``tenant_db``), or everyone."""

    def __init__(self) -> None:
        self.everyone = False
        self.thread: int | None = None

    def check(self) -> None:
        if not (self.everyone or self.thread == threading.get_ident()):
            __tracebackhide__ = True
            raise RuntimeError(NO_ACCESS)


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
        yield _Servers(settings.test_database_url or urls.database_url,
                       settings.test_redis_url or urls.redis_url)
    finally:
        embedded.stop(home)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def tenantdb_database(_tenantdb_servers: _Servers) -> Iterator[TestDatabase]:
    """Session scope: a fresh database, migrated with tenantdb's migrations, bound to
    :data:`tenantdb.db.database` and dropped at the end (~0.3 s once per session)."""
    server_url = _tenantdb_servers.postgres_url
    name = TEST_DB_PREFIX + uuid.uuid4().hex[:12]
    # On a Citus coordinator the database is created on every node (Citus does not
    # propagate CREATE DATABASE); elsewhere this is a plain CREATE DATABASE.
    citus.create_database(server_url, name)
    url = _with_database(server_url, name)
    access = _Access()
    try:
        migrate.migrate(url)
        with override_settings(database_url=url, redis_url=_tenantdb_servers.redis_url):
            db.connect(url)
            db.database.access_guard = access.check
            yield TestDatabase(url, name)
    finally:
        db.database.access_guard = None
        db.close()
        citus.drop_database(server_url, name)


@pytest.fixture
def tenant_db(tenantdb_database: TestDatabase) -> Iterator[db.TenantDatabase]:
    """Function scope: the test runs inside one transaction, rolled back at its end.

    Code under test may open its own (nested) ``atomic()`` blocks: they become savepoints,
    and idempotency claims are allowed inside the transaction. Only the test's own thread may
    use the database; for threads use ``tenantdb_committed``.
    """
    access = _guard()
    access.thread = threading.get_ident()
    database = db.database
    database.connect(reuse_if_open=True)
    outer = database.transaction()
    outer.__enter__()
    try:
        # Claims inside the test's transaction are what the test wants to exercise.
        with allow_claims_in_transaction():
            yield database
    finally:
        # Leaving the outermost transaction with an exception is peewee's rollback path.
        outer.__exit__(_RollbackSignal, _RollbackSignal(), None)
        access.thread = None
        database.close()


@pytest.fixture
def tenantdb_committed(tenantdb_database: TestDatabase) -> Iterator[db.TenantDatabase]:
    """Function scope: real commits from any thread; every table is emptied afterwards."""
    access = _guard()
    access.everyone = True
    try:
        yield db.database
    finally:
        db.close()
        execute_once(tenantdb_database.url, sql.SQL(TRUNCATE_ALL_SQL))
        access.everyone = False


@pytest.fixture
def org_id(request: pytest.FixtureRequest) -> uuid.UUID:
    """A fresh org, created in whichever of ``tenant_db``/``tenantdb_committed`` the test
    uses (``tenant_db`` if neither is requested)."""
    if "tenantdb_committed" not in request.fixturenames:
        request.getfixturevalue("tenant_db")
    org = Org.create(name="Test org", slug=f"test-{uuid.uuid4().hex[:12]}")
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


def _guard() -> _Access:
    check = db.database.access_guard
    access = getattr(check, "__self__", None)
    if not isinstance(access, _Access):
        raise RuntimeError("tenantdb_database is not set up")
    return access


def _with_database(url: str, name: str) -> str:
    return urlsplit(url)._replace(path=f"/{name}").geturl()
