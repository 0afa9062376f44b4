"""Shared fixtures of tenantdb's own suite (the plugin's fixtures load through pytest11)."""

from __future__ import annotations

import logging
import os
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest
from psycopg2 import sql

from tenantdb.db import execute_once as admin_execute
from tenantdb.orgs import create_org
from tenantdb.pytest_plugin import TestDatabase

pytest_plugins = ["pytester", "citus_support"]


@dataclass(frozen=True)
class TwoOrgs:
    a: uuid.UUID
    b: uuid.UUID


@pytest.fixture
def two_orgs(tenant_db: object) -> TwoOrgs:
    """Orgs A and B in the test transaction."""
    a = create_org("Org A", f"a-{uuid.uuid4().hex[:10]}")
    b = create_org("Org B", f"b-{uuid.uuid4().hex[:10]}")
    return TwoOrgs(a.id, b.id)


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


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a `python -m tenantdb` subprocess: no inherited tenantdb URLs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TENANTDB_", "PG"))}
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    env.update(extra)
    return env


PYTHON = sys.executable


class StatementLog(logging.Handler):
    """The statements peewee sends from this thread (peewee logs each at DEBUG)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.thread = threading.get_ident()
        self.statements: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.statements.append(str(record.msg))


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
