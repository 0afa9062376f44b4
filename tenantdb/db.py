"""The package's one Peewee database: pooled, bound by :func:`connect`."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import psycopg2
from peewee import BaseQuery, RawQuery
from playhouse.db_url import parse as parse_db_url
from playhouse.postgres_ext import PooledPostgresqlExtDatabase
from psycopg2 import sql

from .context import cross_org_reason
from .errors import ConfigurationError, UnscopedQueryError
from .scoping import run_scoped
from .settings import Settings, get_settings
from .verifier import Verdict, mentions_tenant_table, verify

__all__ = [
    "ADMIN_ROLE",
    "APP_ROLE",
    "TenantDatabase",
    "close",
    "connect",
    "database",
    "database_url",
    "execute_once",
    "is_connected",
]

#: The role the library works as (no superuser, no BYPASSRLS: row-level security holds).
APP_ROLE = "tenantdb_app"
#: The role cross_org() statements take, for their transaction only.
ADMIN_ROLE = "tenantdb_admin"
# Scoped statements restate the role (tenantdb.scoping) because a cross_org statement
# earlier in the same transaction may have switched it. This is the plain-PostgreSQL form.
SCOPE_PREFIX_SQL = (
    "SELECT set_config('role', %s, true), set_config('tenantdb.org_id', %s, true); "
)
ROLE_PREFIX_SQL = "SELECT set_config('role', %s, true); "
# Nothing may precede these: in an aborted transaction only they run.
_TRANSACTION_CONTROL = re.compile(
    r"\s*(ROLLBACK|COMMIT|END|ABORT|SAVEPOINT|RELEASE|BEGIN|START)\b", re.IGNORECASE)

_SCHEMES = ("postgres", "postgresql")
NOT_CONFIGURED = (
    "no database configured: set TENANTDB_DATABASE_URL (or DATABASE_URL) to a PostgreSQL "
    "URL with pgvector, or run `tenantdb dev up` for the embedded servers"
)


class TenantDatabase(PooledPostgresqlExtDatabase):  # type: ignore[misc]
    """A pooled PostgreSQL database that verifies every statement's org before it runs.

    Each query object is checked by :func:`tenantdb.verifier.verify`; the statement is then
    sent in the same round trip as a transaction-local ``set_config`` of the org (what
    row-level security checks) and of the role: the application role for scoped work, the
    bypass role inside :func:`~tenantdb.context.cross_org`. Nothing is set for the session,
    so a pooled connection never carries an org or a role into its next transaction.
    """

    #: The pytest plugin's guard: outside its fixtures a test gets a clear error.
    access_guard: Callable[[], None] | None = None

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        if self.access_guard is not None:
            self.access_guard()
        return super().cursor(*args, **kwargs)

    def execute(self, query: Any, **context_options: Any) -> Any:
        """Verify ``query``'s org scope, then run it with the org set for its transaction.

        :raises UnscopedQueryError: a tenant table without its org predicate.
        :raises CrossOrgError: several orgs in one statement.
        """
        ctx = self.get_sql_context(**context_options)
        sql, params = ctx.sql(query).query()
        if cross_org_reason() or getattr(query, "_tenantdb_cross_org", None):
            return self._run(sql, params, admin=True)
        verdict = _statement_verdict(query, sql)
        return self._run(sql, params, org=verdict.org, admin=verdict.cross)

    def execute_sql(self, sql: str, params: Any = None) -> Any:
        """Run raw SQL; SQL naming a tenant table is refused outside ``cross_org``.

        :raises UnscopedQueryError: the text names a tenant table (use ``execute_scoped``).
        """
        if cross_org_reason() is not None:
            return self._run(sql, params, admin=mentions_tenant_table(sql) is not None)
        table = mentions_tenant_table(sql)
        if table is not None:
            raise UnscopedQueryError(
                f"execute_sql() cannot verify raw SQL on {table}: use "
                "execute_scoped(org_id, sql, params) or cross_org(reason)"
            )
        return self._run(sql, params)

    def execute_scoped_sql(self, org: uuid.UUID, sql: str, params: Any = None, *,
                           settings: Mapping[str, str] | None = None) -> Any:
        """Run raw ``sql`` with ``org`` (and ``settings``, e.g. ``hnsw.ef_search``) set for
        its transaction (row-level security holds)."""
        return self._run(sql, params, org=org, settings=settings)

    def _run(self, sql: str, params: Any, *, org: uuid.UUID | None = None,
             admin: bool = False, settings: Mapping[str, str] | None = None) -> Any:
        state = self._state.__dict__
        if admin:
            sql, params = ROLE_PREFIX_SQL + sql, (ADMIN_ROLE, *(params or ()))
            # SET LOCAL lasts until the transaction ends: remember to take the role back.
            state["tenantdb_admin_role"] = self.in_transaction()
        elif org is not None:
            state["tenantdb_admin_role"] = False
            # The one hook of tenantdb.scoping: how the org (and settings) reach every node
            # that runs the statement (Citus workers included).
            return run_scoped(self, super().execute_sql, sql, params, org,
                              settings=settings, role=APP_ROLE)
        elif state.get("tenantdb_admin_role") and not _TRANSACTION_CONTROL.match(sql):
            sql, params = ROLE_PREFIX_SQL + sql, (APP_ROLE, *(params or ()))
            state["tenantdb_admin_role"] = False
        return super().execute_sql(sql, params)

    def _connect(self) -> Any:
        try:
            return super()._connect()
        except psycopg2.OperationalError as exc:
            if 'parameter "role"' in str(exc):
                raise ConfigurationError(
                    f"the login cannot take the application role {APP_ROLE}: run `tenantdb "
                    f"migrate` (it creates the role) and grant {APP_ROLE} to the login"
                ) from exc
            raise


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


def connect(url: str | None = None, /, *, role: str | None = APP_ROLE) -> TenantDatabase:
    """Bind :data:`database` to ``url`` (default: :func:`database_url`) and return it.

    Connections are opened lazily and pooled (``TENANTDB_POOL_SIZE``); every session runs
    with ``statement_timeout`` from Settings, as ``role``: by default the application role,
    which row-level security binds (the login stays the owner that migrates). ``None``
    keeps the login's own role.

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
        # Startup options cost no round trip, unlike a SET on every pooled checkout.
        options=f"-c statement_timeout={settings.statement_timeout_ms}"
        + (f" -c role={role}" if role else ""),
        **kwargs,
    )
    return database


def execute_once(url: str, statement: str | sql.Composable, /) -> None:
    """Run one statement on a connection of its own, outside any transaction, as the URL's
    login: administration the pool must not do (``CREATE DATABASE``, ``TRUNCATE``)."""
    conn = psycopg2.connect(url)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(statement)
    finally:
        conn.close()


def is_connected() -> bool:
    """Whether :func:`connect` has bound the database."""
    return not database.deferred


def close() -> None:
    """Close every pooled connection (idle and, in this thread, in use)."""
    if not database.deferred:
        database.close_all()


def _statement_verdict(query: Any, sql: str) -> Verdict:
    """What ``query`` touches and the org it is pinned to, or refuse."""
    trusted = getattr(query, "_tenantdb_org", None)
    if isinstance(query, RawQuery) and trusted is not None:
        return Verdict(True, trusted)  # Model.raw(org_id=...): row-level security holds it
    if isinstance(query, BaseQuery):
        return verify(query)
    table = mentions_tenant_table(sql)
    if table is not None:
        raise UnscopedQueryError(f"cannot verify a {type(query).__name__} on {table}: "
                                 "use cross_org(reason)")
    return Verdict(False, None)
