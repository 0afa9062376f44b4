"""The package's one Peewee database: pooled, bound by :func:`connect`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from playhouse.db_url import parse as parse_db_url
from playhouse.postgres_ext import PooledPostgresqlExtDatabase

from .errors import ConfigurationError
from .settings import Settings, get_settings

__all__ = ["TenantDatabase", "close", "connect", "database", "database_url", "is_connected"]

_SCHEMES = ("postgres", "postgresql")
NOT_CONFIGURED = (
    "no database configured: set TENANTDB_DATABASE_URL (or DATABASE_URL) to a PostgreSQL "
    "URL with pgvector, or run `tenantdb dev up` for the embedded servers"
)


class TenantDatabase(PooledPostgresqlExtDatabase):  # type: ignore[misc]
    """A pooled PostgreSQL database that can refuse access while a guard says so.

    The guard exists for the pytest plugin: outside its fixtures a test gets a clear error
    instead of writing to the shared session database.
    """

    access_guard: Callable[[], None] | None = None

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        if self.access_guard is not None:
            self.access_guard()
        return super().cursor(*args, **kwargs)


database = TenantDatabase(None)


def database_url(settings: Settings | None = None) -> str:
    """The URL :func:`connect` uses: the configured one, else the running embedded server.

    :raises ConfigurationError: nothing is configured and no embedded server is running.
    """
    settings = settings or get_settings()
    if settings.database_url:
        return settings.database_url
    from .embedded import running_urls

    urls = running_urls(settings.home)
    if urls is None:
        raise ConfigurationError(NOT_CONFIGURED)
    return urls.database_url


def connect(url: str | None = None, /) -> TenantDatabase:
    """Bind :data:`database` to ``url`` (default: :func:`database_url`) and return it.

    Connections are opened lazily and pooled (``TENANTDB_POOL_SIZE``); every session runs
    with ``statement_timeout`` from Settings.

    :raises ConfigurationError: no URL anywhere, or a URL that is not PostgreSQL.
    """
    settings = get_settings()
    url = url or database_url(settings)
    if urlsplit(url).scheme not in _SCHEMES:
        raise ConfigurationError(f"{url!r} is not a postgresql:// URL")
    kwargs = parse_db_url(url, unquote_password=True, unquote_user=True)
    name = kwargs.pop("database", None)
    if not name:
        raise ConfigurationError(f"{url!r} names no database: postgresql://host/DBNAME")
    close()
    database.init(
        name,
        max_connections=settings.pool_size,
        timeout=settings.pool_timeout_s,
        connect_timeout=settings.connect_timeout_s,
        options=f"-c statement_timeout={settings.statement_timeout_ms}",
        **kwargs,
    )
    return database


def is_connected() -> bool:
    """Whether :func:`connect` has bound the database."""
    return not database.deferred


def close() -> None:
    """Close every pooled connection (idle and, in this thread, in use)."""
    if not database.deferred:
        database.close_all()
