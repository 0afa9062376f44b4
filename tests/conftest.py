"""Shared fixtures of tenantdb's own suite (the plugin's fixtures load through pytest11).

Test modules import types and helpers from ``tenancy_fixtures`` and ``helpers``, never from
this file: pytest loads it as a plugin, and importing it again as a module would run it
twice.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from helpers import StatementLog, admin_execute
from psycopg2 import sql
from redis_cluster import RedisServer, dedicated_server
from tenancy_fixtures import TwoOrgs, make_twins

from tenantdb.orgs import create_org
from tenantdb.pytest_plugin import TestDatabase

pytest_plugins = ["pytester", "citus_support"]


@pytest.fixture
def two_orgs(tenant_db: object) -> TwoOrgs:
    """Orgs A and B in the test transaction, holding no rows yet."""
    a = create_org("Org A", f"a-{uuid.uuid4().hex[:10]}")
    b = create_org("Org B", f"b-{uuid.uuid4().hex[:10]}")
    return TwoOrgs(a.id, b.id)


@pytest.fixture
def twins(tenant_db: object) -> TwoOrgs:
    """Twin orgs A and B in the test transaction: rows with identical ids and natural keys
    in every tenant table (``tenancy_fixtures.IDS``)."""
    return make_twins()


@pytest.fixture
def committed_twins(tenantdb_committed: object) -> TwoOrgs:
    """:func:`twins`, committed (for tests that need other connections to see them)."""
    return make_twins()


@pytest.fixture
def empty_database_url(tenantdb_database: TestDatabase) -> Iterator[str]:
    """A new, empty database on the session's server, dropped after the test."""
    name = "tenantdb_empty_" + uuid.uuid4().hex[:10]
    admin_execute(tenantdb_database.url, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield urlsplit(tenantdb_database.url)._replace(path=f"/{name}").geturl()
    finally:
        admin_execute(tenantdb_database.url, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                      .format(sql.Identifier(name)))


@pytest.fixture
def sql_log() -> Iterator[StatementLog]:
    """Every statement the test's thread sends, in order."""
    logger = logging.getLogger("peewee")
    log, level = StatementLog(), logger.level
    logger.addHandler(log)
    logger.setLevel(logging.DEBUG)
    try:
        yield log
    finally:
        logger.removeHandler(log)
        logger.setLevel(level)


@pytest.fixture
def user() -> str:
    """A fresh user id (as text, the way rate-limit callers pass it)."""
    return str(uuid.uuid4())


@pytest.fixture
def dedicated_redis(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis server of this test's own, to kill or freeze; checks give up after the test
    module's ``TIMEOUT_S``."""
    with dedicated_server(tmp_path / "redis", request.module.TIMEOUT_S) as server:
        yield server
