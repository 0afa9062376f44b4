"""Settings and connect(): parsed once, clear errors when something is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from tenantdb import db
from tenantdb.errors import ConfigurationError
from tenantdb.settings import Settings, override_settings


def test_settings_read_urls_with_fallbacks() -> None:
    s = Settings.from_env({"DATABASE_URL": "postgresql://h/d", "REDIS_URL": "redis://r"})
    assert (s.database_url, s.redis_url) == ("postgresql://h/d", "redis://r")
    s = Settings.from_env({"DATABASE_URL": "postgresql://h/d",
                           "TENANTDB_DATABASE_URL": "postgresql://t/d"})
    assert s.database_url == "postgresql://t/d"


def test_settings_parse_numbers_and_overrides() -> None:
    s = Settings.from_env({"TENANTDB_POOL_SIZE": "3", "TENANTDB_RATE_LIMIT_AGENT": "7",
                           "TENANTDB_REDIS_SOCKET_TIMEOUT": "0.2"})
    assert (s.pool_size, s.rate_limit_agent_per_minute, s.redis_socket_timeout_s) == (3, 7, 0.2)


@pytest.mark.parametrize("raw", ["ten", "0", "-1"])
def test_settings_reject_bad_numbers_naming_the_variable(raw: str) -> None:
    with pytest.raises(ConfigurationError, match="TENANTDB_POOL_SIZE"):
        Settings.from_env({"TENANTDB_POOL_SIZE": raw})


def test_connect_without_configuration_says_what_to_do(tmp_path: Path) -> None:
    with override_settings(database_url=None, home=tmp_path), pytest.raises(
        ConfigurationError, match=r"TENANTDB_DATABASE_URL.*tenantdb dev up"
    ):
        db.database_url()


@pytest.mark.parametrize("url", ["mysql://h/d", "postgresql://host/"])
def test_connect_rejects_urls_it_cannot_use(url: str) -> None:
    with pytest.raises(ConfigurationError):
        db.connect(url)


def test_sessions_get_the_statement_timeout(tenant_db: db.TenantDatabase) -> None:
    (value,) = tenant_db.execute_sql("SHOW statement_timeout").fetchone()
    assert value == "30s"
