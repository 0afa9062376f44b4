"""Shared fixtures of tenantdb's own suite (the plugin's fixtures load through pytest11)."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest
from psycopg2 import sql

from tenantdb.models import Org
from tenantdb.pytest_plugin import TestDatabase
from tenantdb.pytest_plugin import _admin as admin_execute  # one statement as the owner

pytest_plugins = ["pytester"]


@dataclass(frozen=True)
class TwoOrgs:
    a: uuid.UUID
    b: uuid.UUID


@pytest.fixture
def two_orgs(tenant_db: object) -> TwoOrgs:
    """Orgs A and B in the test transaction."""
    a = Org.create(name="Org A", slug=f"a-{uuid.uuid4().hex[:10]}")
    b = Org.create(name="Org B", slug=f"b-{uuid.uuid4().hex[:10]}")
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
