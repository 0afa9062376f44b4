"""Settings: the one module that reads ``os.environ``.

Every other module asks :func:`get_settings`; tests swap values with
:func:`override_settings` instead of touching the environment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigurationError
from .validation import check_int, check_positive_number

__all__ = ["Settings", "get_settings", "override_settings", "reset_settings"]

_INT_VARS = {
    "pool_size": "TENANTDB_POOL_SIZE",
    "admin_pool_size": "TENANTDB_ADMIN_POOL_SIZE",
    "pool_timeout_s": "TENANTDB_POOL_TIMEOUT",
    "connect_timeout_s": "TENANTDB_CONNECT_TIMEOUT",
    "statement_timeout_ms": "TENANTDB_STATEMENT_TIMEOUT_MS",
    "rate_limit_agent_per_minute": "TENANTDB_RATE_LIMIT_AGENT",
    "rate_limit_crud_per_minute": "TENANTDB_RATE_LIMIT_CRUD",
    "retention_agent_run_days": "TENANTDB_RETENTION_AGENT_RUN_DAYS",
    "retention_tool_log_hours": "TENANTDB_RETENTION_TOOL_LOG_HOURS",
    "retention_itinerary_days": "TENANTDB_RETENTION_ITINERARY_DAYS",
}
_FLOAT_VARS = {"redis_socket_timeout_s": "TENANTDB_REDIS_SOCKET_TIMEOUT"}


@dataclass(frozen=True)
class Settings:
    """Everything tenantdb reads from the environment, parsed once.

    :param database_url: ``TENANTDB_DATABASE_URL``, else ``DATABASE_URL``: the application
        login :func:`tenantdb.connect` logs in as (row-level security binds it).
    :param admin_database_url: ``TENANTDB_ADMIN_DATABASE_URL``: the admin login, used only
        by ``cross_org`` work, on a pool of its own (``TENANTDB_ADMIN_POOL_SIZE``).
    :param owner_database_url: ``TENANTDB_OWNER_DATABASE_URL``: the owner login that
        ``tenantdb migrate`` / ``check`` / ``seed`` use.
    :param redis_url: ``TENANTDB_REDIS_URL``, else ``REDIS_URL``.
    :param test_database_url: ``TENANTDB_TEST_DATABASE_URL``: the server the pytest
        plugin creates its per-session database on (else an embedded server).
    :param test_redis_url: ``TENANTDB_TEST_REDIS_URL``: the Redis the plugin uses.
    :param home: ``TENANTDB_HOME``: where ``tenantdb dev up`` keeps its servers.
    :param migration_locations: ``TENANTDB_MIGRATION_LOCATIONS``: folders of an
        application's own migrations (separated by ``os.pathsep``), applied after the
        package's.
    :param pg_bin: ``TENANTDB_PG_BIN``: the bin folder of a PostgreSQL with Citus, for
        ``tenantdb dev up --citus``.
    """

    database_url: str | None = None
    admin_database_url: str | None = None
    owner_database_url: str | None = None
    redis_url: str | None = None
    test_database_url: str | None = None
    test_redis_url: str | None = None
    home: Path = Path(".tenantdb")
    migration_locations: tuple[Path, ...] = ()
    pg_bin: Path | None = None
    pool_size: int = 10
    admin_pool_size: int = 3
    pool_timeout_s: int = 10
    connect_timeout_s: int = 5
    statement_timeout_ms: int = 30_000
    redis_socket_timeout_s: float = 0.5
    redis_key_prefix: str = "tenantdb"
    rate_limit_agent_per_minute: int = 5
    rate_limit_crud_per_minute: int = 60
    retention_agent_run_days: int = 30
    retention_tool_log_hours: int = 24
    retention_itinerary_days: int = 90

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``environ`` (default: ``os.environ``).

        :raises ConfigurationError: a numeric variable does not parse or is not positive.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {
            "database_url": env.get("TENANTDB_DATABASE_URL") or env.get("DATABASE_URL") or None,
            "admin_database_url": env.get("TENANTDB_ADMIN_DATABASE_URL") or None,
            "owner_database_url": env.get("TENANTDB_OWNER_DATABASE_URL") or None,
            "redis_url": env.get("TENANTDB_REDIS_URL") or env.get("REDIS_URL") or None,
            "test_database_url": env.get("TENANTDB_TEST_DATABASE_URL") or None,
            "test_redis_url": env.get("TENANTDB_TEST_REDIS_URL") or None,
            "home": Path(env.get("TENANTDB_HOME") or ".tenantdb"),
            "pg_bin": Path(env["TENANTDB_PG_BIN"]) if env.get("TENANTDB_PG_BIN") else None,
            "redis_key_prefix": env.get("TENANTDB_REDIS_KEY_PREFIX") or "tenantdb",
            "migration_locations": tuple(
                Path(part) for part in
                (env.get("TENANTDB_MIGRATION_LOCATIONS") or "").split(os.pathsep) if part),
        }
        for field, var in _INT_VARS.items():
            if env.get(var):
                values[field] = _positive(var, env[var], int)
        for field, var in _FLOAT_VARS.items():
            if env.get(var):
                values[field] = _positive(var, env[var], float)
        return cls(**values)


def _positive(var: str, raw: str, kind: type[int] | type[float]) -> Any:
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigurationError(f"{var}={raw!r} is not a {kind.__name__}") from None
    try:  # float("nan") and float("inf") parse, but no setting can be either
        return check_int(value, var, minimum=1) if kind is int else check_positive_number(
            value, var)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None


_current: Settings | None = None


def get_settings() -> Settings:
    """The settings in force: read from the environment on first use."""
    global _current
    if _current is None:
        _current = Settings.from_env()
    return _current


def reset_settings() -> None:
    """Forget the parsed settings so the next :func:`get_settings` reads the environment."""
    global _current
    _current = None


@contextlib.contextmanager
def override_settings(**changes: Any) -> Iterator[Settings]:
    """Replace some settings for the duration of a ``with`` block (tests, scripts)."""
    global _current
    previous = get_settings()
    _current = dataclasses.replace(previous, **changes)
    try:
        yield _current
    finally:
        _current = previous
