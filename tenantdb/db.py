"""The package's one Peewee database: two pooled logins, bound by :func:`connect`.

Connections (see README "Connections"): outside a transaction a statement borrows a pooled
connection and gives it back as soon as it has run (psycopg2's client-side cursors hold
their rows, so the cursor stays usable); a transaction keeps its connection until it ends.
Threads therefore share a small pool without ever calling ``close()``.

Logins (README "Logins"): :data:`database` logs in as the application login, which
row-level security binds; statements and transactions inside
:func:`~tenantdb.context.cross_org` run on a second pool, logged in as the admin login.
Which pool a statement uses is decided when it runs, by :func:`cross_org_reason`.
"""

from __future__ import annotations

import functools
import heapq
import re
import select
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import peewee
import psycopg2
import psycopg2.extensions
from peewee import BaseQuery, RawQuery, SelectBase
from playhouse.db_url import parse as parse_db_url
from playhouse.pool import PoolConnection
from playhouse.postgres_ext import (
    FetchManyCursor,
    PooledPostgresqlExtDatabase,
    PostgresqlExtDatabase,
)
from psycopg2 import sql

from .context import cross_org_reason, scope_of
from .errors import (
    ConfigurationError,
    ConnectionLostError,
    DatabaseUnavailableError,
    NotConnectedError,
    PoolExhaustedError,
    StatementTimeoutError,
    TenantDBError,
    UnscopedQueryError,
)
from .scoping import run_scoped
from .settings import Settings, get_settings
from .verdicts import verify_statement
from .verifier import Verdict, check_raw_sql, mentions_tenant_table

__all__ = [
    "ADMIN_ROLE",
    "APP_ROLE",
    "LoginPool",
    "TenantDatabase",
    "admin_database_url",
    "close",
    "connect",
    "database",
    "database_url",
    "execute_once",
    "is_connected",
    "owner_database_url",
    "with_login",
]

#: The application login's role (no superuser, no BYPASSRLS: row-level security holds).
APP_ROLE = "tenantdb_app"
#: The role whose policy admits every org (the admin login's, through membership).
ADMIN_ROLE = "tenantdb_admin"
# Only on a connection pinned by the test harness (logged in as the owner): the role is
# switched per statement, transaction-locally, in the same round trip. Scoped statements
# carry their org through tenantdb.scoping (one round trip on plain PostgreSQL).
SCOPE_PREFIX_SQL = (
    "SELECT set_config('role', %s, true), set_config('tenantdb.org_id', %s, true); "
)
ROLE_PREFIX_SQL = "SELECT set_config('role', %s, true); "
# A scoped statement's org on plain PostgreSQL, transaction-local, in the same round trip
# (outside a transaction block the two run as one implicit transaction). A utility SET costs
# the server less than a SELECT of set_config(): no plan, no row sent back (bench/
# tenancy_overhead.py measured 5-10 % of a get-by-id between the two).
ORG_PREFIX_SQL = "SET LOCAL tenantdb.org_id = %s; "
# Nothing may precede these: in an aborted transaction only they run.
_TRANSACTION_CONTROL = re.compile(
    r"\s*(ROLLBACK|COMMIT|END|ABORT|SAVEPOINT|RELEASE|BEGIN|START)\b", re.IGNORECASE)
# SQLSTATEs meaning the server ended the session: admin_shutdown, crash_shutdown,
# cannot_connect_now; class 08 is "connection exception".
_SESSION_ENDED = frozenset({"57P01", "57P02", "57P03"})
_QUERY_CANCELED = "57014"
_IDLE = psycopg2.extensions.TRANSACTION_STATUS_IDLE

_SCHEMES = ("postgres", "postgresql")
NOT_CONFIGURED = (
    "no database configured: set TENANTDB_DATABASE_URL (or DATABASE_URL) to the application "
    "login's PostgreSQL URL, or run `tenantdb dev up` for the embedded servers"
)
NOT_CONNECTED = (
    "tenantdb is not connected: call tenantdb.connect() once at start-up (it reads "
    "TENANTDB_DATABASE_URL), or use the tenant_db / tenantdb_committed fixtures in tests"
)
NO_ADMIN = (
    "cross_org() work needs the admin login: set TENANTDB_ADMIN_DATABASE_URL (in development "
    "`tenantdb dev up` exports it), or pass connect(admin_url=...)"
)
NO_OWNER = (
    "no owner login configured: set TENANTDB_OWNER_DATABASE_URL to the login that owns the "
    "schema (or run `tenantdb dev up` for the embedded servers)"
)


class _State(peewee._ConnectionLocal):
    """Peewee's per-thread connection state, plus whether the connection is only borrowed
    (given back after each statement) or held (an explicit ``connect()``)."""

    borrowed: bool

    def reset(self) -> None:
        super().reset()
        self.borrowed = False


class _SharedState(peewee._ConnectionState):
    """One state for every thread: a connection pinned by the test harness."""

    borrowed: bool

    def reset(self) -> None:
        super().reset()
        self.borrowed = False


class _Pin:
    """A connection every admitted thread uses, one statement at a time."""

    def __init__(self, conn: Any) -> None:
        from .citus import is_coordinator

        self.conn = conn
        self.lock = threading.RLock()
        self.state = _SharedState()
        self.state.set_connection(conn)
        # Citus opens one worker connection per role within a distributed transaction, and
        # one role's uncommitted rows are invisible to the other's (an org created by admin
        # work, then a row of it written as the application): on a coordinator the test's
        # transaction keeps the owner's role, and row-level security is proven by the tests
        # that use the real logins.
        self.switch_roles = not is_coordinator(conn)


class LoginPool(PooledPostgresqlExtDatabase):  # type: ignore[misc]
    """One login's pool: connections are borrowed per statement and held per transaction.

    Built on Peewee's pool (its heap of idle connections, check-in, ``close_all``); what is
    written by hand here, and why:

    - checkout: Peewee connects while holding the pool's lock (and ``Database.connect``
      holds the database's), so with the server not answering, N callers fail after N
      connect timeouts; here the lock covers only the bookkeeping;
    - liveness: Peewee checks a pooled connection with a ``SELECT 1`` round trip per
      checkout, too dear per statement; a dead idle connection is seen without one (its
      socket is readable: the server's goodbye or EOF) and replaced;
    - errors: driver errors are wrapped once, here, into tenantdb errors that say what to do.
    """

    #: The setting named in messages about this login and its pool.
    url_setting = "TENANTDB_DATABASE_URL"
    size_setting = "TENANTDB_POOL_SIZE"
    #: The pytest plugin's guard: outside its fixtures a test gets a clear error.
    access_guard: Callable[[], None] | None = None
    #: The pool whose ``access_guard`` applies to this one (the admin pool's is the app's).
    guarded_by: LoginPool | None = None

    def __init__(self, database: str | None, **kwargs: Any) -> None:
        super().__init__(database, **kwargs)
        self._state: _State | _SharedState = _State()
        self._connecting = 0  # connects in progress, counted against the pool's size
        self._waiting = 0  # callers waiting for a connection to come back
        self._pin: _Pin | None = None
        self._statement_timeout_ms = 0

    def init(self, database: str | None, **kwargs: Any) -> None:
        # Peewee's init() merges into the previous binding's parameters: a URL without a
        # port or a password would inherit the last one's. A binding is the URL's alone.
        self.connect_params: dict[str, Any] = {}
        super().init(database, **kwargs)
        # Whether the server is a Citus coordinator, asked once per binding (None: not yet).
        self._citus: bool | None = None

    def on_citus(self) -> bool:
        """Whether this pool's server is a Citus coordinator (asked once, then cached)."""
        if self._citus is None:
            from .citus import is_coordinator

            self._citus = is_coordinator(self.connection())
        return self._citus

    # -- peewee private internals: every read of them is in this section -----------------

    def _take_idle(self) -> Any:
        """An idle pooled connection that is still alive, or ``None`` (pool lock held).

        Peewee's own loop in ``PooledDatabase._connect`` over ``_connections`` (a heap of
        ``(timestamp, counter, conn)``) and ``_in_use`` (``conn_key -> PoolConnection``)."""
        while self._connections:
            ts, _counter, conn = heapq.heappop(self._connections)
            if self._is_closed(conn):
                # Dropped, not closed: a thread may still be reading rows from a cursor of
                # it (close() would invalidate them); it closes when the last one goes.
                continue
            if self._stale_timeout and self._is_stale(ts):
                self._close_raw(conn)
                continue
            self._in_use[self.conn_key(conn)] = PoolConnection(ts, conn, time.time())
            return conn
        return None

    def _has_room(self) -> bool:
        """Whether one more connection may be opened (pool lock held)."""
        return not self._max_connections or (
            len(self._in_use) + self._connecting < self._max_connections)

    def _register(self, conn: Any) -> None:
        """Count a newly opened connection as in use (pool lock held)."""
        now = time.time()
        self._in_use[self.conn_key(conn)] = PoolConnection(now, conn, now)

    def _wait_for_release(self, seconds: float) -> None:
        # Peewee's condition, notified by its check-in (PooledDatabase._close) and by ours.
        self._waiting += 1
        try:
            self._pool_available.wait(timeout=seconds)
        finally:
            self._waiting -= 1

    def _put_back(self, conn: Any) -> None:
        """Peewee's check-in of a live, idle connection, without its per-call logging and
        reuse checks (the caller saw it idle): the borrow's hot path (pool lock held)."""
        pool_conn = self._in_use.pop(self.conn_key(conn), None)
        if pool_conn is None:
            return  # close_all() closed it meanwhile
        self._heap_counter += 1
        heapq.heappush(self._connections, (pool_conn.timestamp, self._heap_counter, conn))
        if self._waiting:
            self._pool_available.notify()

    def _notify_waiters(self) -> None:
        self._pool_available.notify_all()

    # -- connections -----------------------------------------------------------------------

    def _is_closed(self, conn: Any) -> bool:
        """Dead or dirty, judged without a round trip."""
        if conn.closed or conn.info.transaction_status != _IDLE:
            return True
        return _has_input(conn)

    def connect(self, reuse_if_open: bool = False) -> bool:
        """Give this thread a connection of its own until :meth:`close` (Peewee's API).

        Statements need no ``connect()``: they borrow one. Replaces Peewee's version, which
        holds the database's lock while connecting (see the class docstring).
        """
        if self.deferred:
            raise NotConnectedError(NOT_CONNECTED)
        state = self._state
        if not state.closed:
            if reuse_if_open:
                return False
            raise peewee.OperationalError("Connection already opened.")
        conn = self._checkout()
        state.reset()
        state.set_connection(conn)
        if self.server_version is None:
            self._set_server_version(conn)
        return True

    def _checkout(self) -> Any:
        deadline = time.monotonic() + self._wait_timeout
        with self._pool_lock:
            while True:
                conn = self._take_idle()
                if conn is not None:
                    return conn
                if self._has_room():
                    self._connecting += 1
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise PoolExhaustedError(self._exhausted_message())
                self._wait_for_release(min(remaining, 1.0))
        conn = None
        try:
            # Outside the lock: a server that does not answer costs each caller its own
            # connect timeout, not everyone's in turn.
            conn = PostgresqlExtDatabase._connect(self)
        except psycopg2.Error as exc:
            raise DatabaseUnavailableError(self._unavailable_message(exc)) from exc
        finally:
            with self._pool_lock:
                self._connecting -= 1
                if conn is not None:
                    self._register(conn)
                else:
                    self._notify_waiters()
        return conn

    def _release(self) -> None:
        """Give this thread's connection back to the pool (a dead one is closed)."""
        state = self._state
        conn = state.conn
        state.reset()
        if conn is not None:
            self._close(conn)  # Peewee's check-in: rolls back a dirty one, drops a dead one

    def _release_if_idle(self) -> None:
        """Give back a borrowed connection once no transaction needs it."""
        state = self._state
        conn = state.conn
        if not state.borrowed or conn is None or state.transactions:
            return
        if conn.closed or self._stale_timeout:
            self._release()
        elif conn.info.transaction_status == _IDLE:
            # Hot path, once per statement: no transaction was open, so the state's lists
            # are empty and only the connection needs clearing.
            state.conn, state.closed, state.borrowed = None, True, False
            with self._pool_lock:
                self._put_back(conn)

    def _ensure_connection(self) -> bool:
        """Make sure this thread has a connection; returns whether it is borrowed."""
        if self.deferred:
            raise NotConnectedError(NOT_CONNECTED)
        state = self._state
        if not state.closed and not state.transactions and not state.borrowed and (
                state.conn.closed or (state.conn.info.transaction_status == _IDLE
                                      and _has_input(state.conn))):
            # A held connection died between statements: replace it, keep holding.
            borrowed = state.borrowed
            self._release()
            self.connect()
            state.borrowed = borrowed
            return borrowed
        if state.closed:
            conn = self._checkout()
            state.conn, state.closed, state.borrowed = conn, False, True
            if self.server_version is None:
                self._set_server_version(conn)
            return True
        return bool(state.borrowed)

    def close(self) -> bool:
        """Give back this thread's held connection (Peewee's API; never needed otherwise)."""
        if self.deferred:
            raise NotConnectedError(NOT_CONNECTED)
        if self._pin is not None:
            return False
        if self._state.transactions:
            raise peewee.OperationalError(
                "Attempting to close database while transaction is open.")
        if self._state.closed:
            return False
        self._release()
        return True

    def close_all(self) -> None:
        if not self.deferred:
            super().close_all()

    def cursor(self, named_cursor: Any = None) -> Any:
        guard = (self.guarded_by or self).access_guard
        if guard is not None:
            guard()
        # Borrowed: given back by the thread's next statement, commit or rollback.
        self._ensure_connection()
        return super().cursor(named_cursor)

    def connection(self) -> Any:
        self._ensure_connection()
        return self._state.conn

    # -- statements and transactions -------------------------------------------------------

    def execute_sql(self, sql: str, params: Any = None, named_cursor: Any = None) -> Any:
        return self._statement(sql, params, named_cursor)

    def _statement(self, sql: str, params: Any, named_cursor: Any = None,
                   retry: bool = False) -> Any:
        pin = self._pin
        if pin is not None:
            with pin.lock:
                try:
                    return PostgresqlExtDatabase.execute_sql(self, sql, params, named_cursor)
                except (peewee.OperationalError, peewee.InterfaceError) as exc:
                    raise self._wrap(exc) from _driver_error(exc)
        for attempt in (1, 2):
            borrowed = self._ensure_connection()
            try:
                return PostgresqlExtDatabase.execute_sql(self, sql, params, named_cursor)
            except (peewee.OperationalError, peewee.InterfaceError) as exc:
                wrapped = self._wrap(exc)
                if not (isinstance(wrapped, ConnectionLostError) and retry and attempt == 1
                        and borrowed and not self._state.transactions):
                    raise wrapped from _driver_error(exc)
                # A read outside a transaction: safe to send once more on a new connection.
            finally:
                self._release_if_idle()
        raise AssertionError("unreachable")  # pragma: no cover

    def begin(self) -> None:
        self._ensure_connection()
        self._control("BEGIN")

    def commit(self) -> None:
        try:
            self._control("COMMIT")
        finally:
            self._release_if_idle()

    def rollback(self) -> None:
        state = self._state
        if not state.closed and state.conn.closed and self._pin is None:
            # The server ended the session, and with it the transaction: nothing to undo.
            self._release()
            return
        try:
            self._control("ROLLBACK")
        finally:
            self._release_if_idle()

    def _control(self, statement: str) -> None:
        if self._state.closed:
            raise peewee.InterfaceError(f"Cannot {statement.lower()}: no connection open.")
        lock = self._pin.lock if self._pin is not None else _NO_LOCK
        with lock:
            try:
                self._state.conn.cursor().execute(statement)
            except psycopg2.Error as exc:
                wrapped = self._wrap(exc)
                if wrapped is exc:
                    raise
                raise wrapped from exc

    # -- errors ----------------------------------------------------------------------------

    def _wrap(self, exc: BaseException) -> BaseException:
        """The tenantdb error for ``exc``, or ``exc`` itself when it needs no advice."""
        if isinstance(exc, TenantDBError):
            return exc
        driver = _driver_error(exc)
        code = getattr(driver, "pgcode", None)
        if code == _QUERY_CANCELED and "statement timeout" in str(driver):
            return StatementTimeoutError(
                f"the statement ran longer than TENANTDB_STATEMENT_TIMEOUT_MS="
                f"{self._statement_timeout_ms} and was cancelled: narrow or index the query, "
                "or raise the setting")
        conn = self._state.conn
        if (code in _SESSION_ENDED or (code or "").startswith("08")
                or isinstance(driver, psycopg2.InterfaceError)
                or (conn is not None and conn.closed)):
            return ConnectionLostError(
                f"lost the connection to {self._where()} during the statement "
                f"({_first_line(driver or exc)}): it was discarded and the next call opens a "
                "new one; a statement in a transaction did not commit, retry the transaction")
        return exc

    def _where(self) -> str:
        params = self.connect_params
        host = params.get("host") or "localhost"
        port = f":{params['port']}" if params.get("port") else ""
        return f"database {self.database!r} on {host}{port}"

    def _unavailable_message(self, exc: psycopg2.Error) -> str:
        user = self.connect_params.get("user")
        login = f" as {user!r}" if user else ""
        return (f"cannot connect to {self._where()}{login}: {_first_line(exc)}; check "
                f"{self.url_setting} and that the server is running and accepts this login")

    def _exhausted_message(self) -> str:
        return (f"no database connection free after {self._wait_timeout} s: all "
                f"{self.size_setting}={self._max_connections} are in use. Usually a "
                "transaction (or a connection taken with connect()) is held too long or "
                f"left open; keep transactions short, or raise {self.size_setting} / "
                "TENANTDB_POOL_TIMEOUT")


def _routed(name: str) -> Any:
    """A ``TenantDatabase`` method that runs :class:`LoginPool`'s ``name`` on the pool of the
    context, decided per call: this one, or :attr:`TenantDatabase.admin` inside
    ``cross_org``."""
    own = getattr(LoginPool, name)

    def method(self: TenantDatabase, *args: Any, **kwargs: Any) -> Any:
        side = self._side()
        return own(self, *args, **kwargs) if side is self else getattr(side, name)(*args,
                                                                                 **kwargs)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = own.__doc__
    return method


class TenantDatabase(LoginPool):
    """The application login's pool, verifying every statement's org before it runs.

    Each query object is checked by :func:`tenantdb.verifier.verify`; a scoped statement is
    sent in the same round trip as a transaction-local ``set_config`` of its org (what
    row-level security checks). Inside :func:`~tenantdb.context.cross_org`, statements and
    transactions opened there run on :attr:`admin`, the admin login's own pool. A cross_org
    statement issued while this thread has an application transaction open runs on an admin
    connection *outside* that transaction.
    """

    def __init__(self, database: str | None, **kwargs: Any) -> None:
        super().__init__(database, **kwargs)
        #: The admin login's pool: cross_org work only.
        self.admin = LoginPool(None)
        self.admin.url_setting = "TENANTDB_ADMIN_DATABASE_URL"
        self.admin.size_setting = "TENANTDB_ADMIN_POOL_SIZE"
        self.admin.guarded_by = self  # one access guard for both logins

    def _side(self) -> LoginPool:
        """The pool this statement or transaction belongs to, decided now."""
        if self._pin is not None or cross_org_reason() is None:
            return self
        if self.deferred:
            raise NotConnectedError(NOT_CONNECTED)
        if self.admin.deferred:
            raise ConfigurationError(NO_ADMIN)
        return self.admin

    # -- statements ------------------------------------------------------------------------

    def execute(self, query: Any, named_cursor: bool = False, array_size: int | None = None,
                **context_options: Any) -> Any:
        """Verify ``query``'s org scope, then run it with the org set for its transaction.

        Whether it runs as admin is decided here, by the ``cross_org`` block in force (its
        dynamic extent), never by the query object. ``named_cursor`` (``ServerSide(...)``)
        streams the rows through a server-side cursor.

        :raises UnscopedQueryError: a tenant table without its org predicate.
        :raises CrossOrgError: several orgs in one statement.
        """
        ctx = self.get_sql_context(**context_options)
        sql, params = ctx.sql(query).query()
        if cross_org_reason() is not None:
            admin, org = True, None
        else:
            admin, org = False, _statement_verdict(query, sql, params).org
        if named_cursor:
            cursor = self._run_server_side(sql, params, org=org, admin=admin)
            return FetchManyCursor(cursor, array_size)
        # Only a read is sent twice after a lost connection: a write may have committed.
        return self._run(sql, params, org=org, admin=admin, retry=isinstance(query, SelectBase))

    def execute_verified(self, sql: str, params: Any, org: uuid.UUID) -> Any:
        """Run a read whose SQL was verified, when it was built, to be pinned to the org
        in its parameters, now ``org`` (:mod:`tenantdb.planned`); routed as :meth:`execute`
        routes a query."""
        if cross_org_reason() is not None:
            return self._run(sql, params, admin=True, retry=True)
        return self._run(sql, params, org=org, retry=True)

    def execute_sql(self, sql: str, params: Any = None, named_cursor: Any = None) -> Any:
        """Run raw SQL; SQL naming a tenant table is refused outside ``cross_org``, and so is
        SQL that could change the role or the org setting
        (:func:`~tenantdb.verifier.check_raw_sql`).

        :raises UnscopedQueryError: the text names a tenant table (use ``execute_scoped``),
            or could change a setting.
        """
        if cross_org_reason() is not None:
            return self._run(sql, params, admin=True)
        table = mentions_tenant_table(sql)
        if table is not None:
            raise UnscopedQueryError(
                f"execute_sql() cannot verify raw SQL on {table}: use "
                "execute_scoped(org_id, sql, params) or cross_org(reason)"
            )
        check_raw_sql(sql, scoped=False)
        return self._run(sql, params)

    def execute_scoped_sql(self, org: uuid.UUID, sql: str, params: Any = None, *,
                           settings: Mapping[str, str] | None = None) -> Any:
        """Run raw ``sql`` with ``org`` (and ``settings``, e.g. ``hnsw.ef_search``) set for
        its transaction (row-level security holds).

        :raises UnscopedQueryError: ``sql`` could change the role or the org setting, or is
            not a read or a write (:func:`~tenantdb.verifier.check_raw_sql`).
        """
        check_raw_sql(sql, scoped=True)
        return self._run(sql, params, org=org, admin=cross_org_reason() is not None,
                         settings=settings)

    def _run(self, sql: str, params: Any, *, org: uuid.UUID | None = None,
             admin: bool = False, retry: bool = False,
             settings: Mapping[str, str] | None = None) -> Any:
        if self._pin is not None:
            # Test harness: one owner connection, the role taken per statement.
            role = (ADMIN_ROLE if admin else APP_ROLE) if self._pin.switch_roles else None
            if org is not None:
                return run_scoped(self, self._statement, sql, params, org,
                                  settings=settings, role=role)
            if role is not None and not _TRANSACTION_CONTROL.match(sql):
                sql, params = ROLE_PREFIX_SQL + sql, (role, *(params or ()))
            return self._statement(sql, params)
        side = self._side() if admin else self
        if org is None:
            return side._statement(sql, params, retry=retry)
        if not settings and not side.on_citus():
            # The hot path on plain PostgreSQL: the plan tenantdb.scoping would make, without
            # building it per statement (one round trip, the org in the statement's string).
            return side._statement(ORG_PREFIX_SQL + sql, (str(org), *(params or ())),
                                   retry=retry)
        # The one hook of tenantdb.scoping: how the org (and settings) reach every node that
        # runs the statement (Citus workers included).
        send = functools.partial(side._statement, retry=retry)
        return run_scoped(side, send, sql, params, org, settings=settings)

    def _run_server_side(self, sql: str, params: Any, *, org: uuid.UUID | None = None,
                         admin: bool = False) -> Any:
        """``_run`` through a server-side cursor (``ServerSide(...)``, inside a transaction).
        A named cursor declares one statement, so the settings go first, on their own: a
        server-side cursor lives in a transaction, and they hold for it."""
        self._run("SELECT 1", (), org=org, admin=admin)
        side = self._side() if admin else self
        return side._statement(sql, params, named_cursor=True)

    # -- transactions and connections, routed to the pool of the context -------------------
    # Peewee's atomic() asks these while entering and leaving its block, so a transaction
    # opened inside cross_org is an admin transaction, and one opened outside it is not.

    transaction = _routed("transaction")
    savepoint = _routed("savepoint")
    manual_commit = _routed("manual_commit")
    in_transaction = _routed("in_transaction")
    transaction_depth = _routed("transaction_depth")
    top_transaction = _routed("top_transaction")
    begin = _routed("begin")
    commit = _routed("commit")
    rollback = _routed("rollback")
    after_commit = _routed("after_commit")
    cursor = _routed("cursor")
    connection = _routed("connection")

    def close(self) -> bool:
        """Give back this thread's held connections, application and admin."""
        closed = super().close()
        if not self.admin.deferred:
            closed = self.admin.close() or closed
        return closed

    def close_all(self) -> None:
        super().close_all()
        self.admin.close_all()

    # -- the test harness ------------------------------------------------------------------

    def pin(self, conn: Any) -> None:
        """Route every statement of both logins, from every thread, to ``conn`` (an owner
        connection in autocommit mode), taking the role per statement; one statement at a
        time. The pytest plugin's ``tenant_db`` does this; :meth:`unpin` undoes it."""
        if self._pin is not None:
            raise RuntimeError("the database is already pinned to a connection")
        pin = _Pin(conn)
        self._unpinned_state = self._state
        self._pin, self._state = pin, pin.state

    def unpin(self) -> None:
        """Back to the pools; the pinned connection is left to its owner."""
        if self._pin is not None:
            self._state = self._unpinned_state
            self._pin = None


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_LOCK = _NoLock()

database = TenantDatabase(None)


def _has_input(conn: Any) -> bool:
    """Whether an idle connection's socket has something to read: nothing is expected on an
    idle session, so it is the server's goodbye (a FATAL message, or EOF)."""
    try:
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError, psycopg2.Error):
        return True


def _driver_error(exc: BaseException) -> BaseException | None:
    """The psycopg2 error behind ``exc`` (Peewee re-raises driver errors as its own)."""
    if isinstance(exc, psycopg2.Error):
        return exc
    inner = exc.__cause__ or exc.__context__
    return inner if isinstance(inner, psycopg2.Error) else exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- URLs and connect() -------------------------------------------------------------------


def database_url(settings: Settings | None = None) -> str:
    """The application login's URL: the configured one, else the running embedded server's.

    :raises ConfigurationError: nothing is configured and no embedded server is running.
    """
    settings = settings or get_settings()
    if settings.database_url:
        return settings.database_url
    urls = _embedded(settings)
    if urls is None:
        raise ConfigurationError(NOT_CONFIGURED)
    return str(urls.database_url)


def admin_database_url(settings: Settings | None = None) -> str | None:
    """The admin login's URL: ``TENANTDB_ADMIN_DATABASE_URL``, else the owner's
    (``TENANTDB_OWNER_DATABASE_URL``: a development setup), else the running embedded
    server's, else ``TENANTDB_DATABASE_URL`` (one login for everything: if that is the
    application login, row-level security refuses cross-org work rather than allow it);
    ``None`` if none is set."""
    settings = settings or get_settings()
    if settings.admin_database_url or settings.owner_database_url:
        return settings.admin_database_url or settings.owner_database_url
    urls = _embedded(settings)
    if urls is not None:
        return str(urls.admin_database_url)
    return settings.database_url


def owner_database_url(settings: Settings | None = None) -> str:
    """The owner login's URL (migrations, ``check``, ``seed``): ``TENANTDB_OWNER_DATABASE_URL``,
    else the running embedded server's, else ``TENANTDB_DATABASE_URL`` (one login for
    everything, as before three logins; ``tenantdb check`` then reports it).

    :raises ConfigurationError: none of them.
    """
    settings = settings or get_settings()
    if settings.owner_database_url:
        return settings.owner_database_url
    urls = _embedded(settings)
    if urls is not None:
        return str(urls.owner_database_url)
    if settings.database_url:
        return settings.database_url
    raise ConfigurationError(NO_OWNER)


def _embedded(settings: Settings) -> Any:
    from .embedded import running_urls

    return running_urls(settings.home)


def with_login(url: str, user: str, password: str | None = None) -> str:
    """``url`` with another login (and its password, or none): the same server and
    database as another user, e.g. the application login next to the owner's URL."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    auth = quote(user, safe="") + (f":{quote(password, safe='')}" if password else "")
    netloc = f"{auth}@{host}"
    query = "&".join(p for p in parts.query.split("&")
                     if p and unquote(p.partition("=")[0]) not in ("user", "password"))
    return parts._replace(netloc=netloc, query=query).geturl()


def connect(url: str | None = None, /, *, admin_url: str | None = None) -> TenantDatabase:
    """Bind :data:`database` to ``url`` (default: :func:`database_url`) and return it.

    The application pool logs in as ``url``'s login (``TENANTDB_POOL_SIZE`` connections);
    ``cross_org`` work uses ``admin_url`` (default: :func:`admin_database_url`) on a pool of
    its own (``TENANTDB_ADMIN_POOL_SIZE``), opened only when first needed. Connections are
    borrowed per statement: nothing needs closing. Every session runs with
    ``statement_timeout`` from Settings.

    :raises ConfigurationError: no URL anywhere, or a URL that is not PostgreSQL.
    """
    settings = get_settings()
    url = url or database_url(settings)
    admin = admin_url or admin_database_url(settings)
    app_args = _pool_args(url, settings, settings.pool_size)
    admin_args = _pool_args(admin, settings, settings.admin_pool_size) if admin else None
    close()
    database.init(app_args.pop("database"), **app_args)
    database._statement_timeout_ms = settings.statement_timeout_ms
    if admin_args is not None:
        database.admin.init(admin_args.pop("database"), **admin_args)
        database.admin._statement_timeout_ms = settings.statement_timeout_ms
    else:
        database.admin.init(None)
    return database


def _pool_args(url: str, settings: Settings, size: int) -> dict[str, Any]:
    if urlsplit(url).scheme not in _SCHEMES:
        raise ConfigurationError(f"{_safe(url)!r} is not a postgresql:// URL")
    kwargs = parse_db_url(url, unquote_password=True, unquote_user=True)
    if not kwargs.get("database"):
        raise ConfigurationError(f"{_safe(url)!r} names no database: postgresql://host/DBNAME")
    kwargs.update(
        max_connections=size,
        timeout=settings.pool_timeout_s,
        connect_timeout=settings.connect_timeout_s,
        # A startup option costs no round trip, unlike a SET on every checkout.
        options=f"-c statement_timeout={settings.statement_timeout_ms}",
    )
    return dict(kwargs)


def _safe(url: str) -> str:
    """``url`` without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()


def execute_once(url: str, statement: str | sql.Composable, /) -> None:
    """Run one statement on a connection of its own, outside any transaction, as the URL's
    login: administration the pool must not do (``CREATE DATABASE``, ``TRUNCATE``)."""
    try:
        conn = psycopg2.connect(url)
    except psycopg2.OperationalError as exc:
        parts = urlsplit(url)
        raise DatabaseUnavailableError(
            f"cannot connect to database {parts.path.lstrip('/')!r} on "
            f"{parts.hostname or 'localhost'}: {_first_line(exc)}") from exc
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
    """Close every pooled connection of both logins (idle and in use)."""
    database.close_all()


def _statement_verdict(query: Any, sql: str, params: Any) -> Verdict:
    """What ``query`` touches and the org it is pinned to, or refuse."""
    scope = scope_of(query)
    if isinstance(query, RawQuery) and scope is not None:
        check_raw_sql(sql, scoped=True)  # it must not set the org (or the role) itself
        return Verdict(True, scope.org)  # Model.raw(org_id=...): row-level security holds it
    if isinstance(query, BaseQuery):
        return verify_statement(query, sql, params)
    table = mentions_tenant_table(sql)
    if table is not None:
        raise UnscopedQueryError(f"cannot verify a {type(query).__name__} on {table}: "
                                 "use cross_org(reason)")
    return Verdict(False, None)
