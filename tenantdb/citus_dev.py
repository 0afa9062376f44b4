"""A Citus cluster for development and tests: a coordinator and two workers on loopback.

``tenantdb dev up --citus`` runs :func:`start`: three PostgreSQL servers from a PostgreSQL
that has Citus installed (``TENANTDB_PG_BIN``, else ``pg_config``/``postgres`` on ``PATH``,
else ``/usr/lib/postgresql/15/bin``), each listening on 127.0.0.1 only, with trust
authentication (a development cluster; production nodes authenticate each other with
passwords, see the README). ``initdb`` and ``postgres`` refuse to run as root, so as root
they run as the ``postgres`` OS user, which then owns the data folders. The ``tenantdb``
database is created on every node with the ``citus`` extension, and the workers are
registered with the coordinator (:func:`tenantdb.citus.create_database`).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .db import APP_ROLE, with_login
from .errors import ConfigurationError

__all__ = [
    "NODE_NAMES",
    "CitusCluster",
    "find_pg_bin",
    "running_cluster",
    "start",
    "status",
    "stop",
]

NODE_NAMES = ("coordinator", "worker1", "worker2")
APP_DATABASE = "tenantdb"
DEFAULT_PG_BIN = Path("/usr/lib/postgresql/15/bin")
_STATE_FILE = "cluster.json"
_OS_USER = "postgres"  # the OS user Debian's package creates; postgres refuses root
_START_TIMEOUT_S = 60
_STOP_TIMEOUT_S = 15.0
# Development settings: durability off (a crash loses a dev cluster's last commits, never
# its consistency), prepared transactions on (Citus commits multi-node writes with 2PC),
# 8 shards per table instead of 32 (distribution and DDL touch a quarter of the shards).
_NODE_CONFIG = """
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{socket_dir}'
shared_preload_libraries = 'citus'
max_connections = 300
max_prepared_transactions = 300
fsync = off
synchronous_commit = off
full_page_writes = off
citus.shard_count = 8
log_min_messages = warning
"""
NO_CITUS = (
    "no PostgreSQL with Citus found: set TENANTDB_PG_BIN to the bin folder of a PostgreSQL "
    "that has the citus extension (on these machines run ../shared/engines/install-citus.sh "
    "as root: it installs /usr/lib/postgresql/15/bin with Citus 13.2 and pgvector 0.8.1)"
)


@dataclass(frozen=True)
class CitusCluster:
    """A running development cluster.

    :param ports: each node's TCP port on 127.0.0.1, by name (``coordinator`` first).
    :param user: the superuser every node trusts on loopback.
    """

    ports: dict[str, int]
    user: str = "postgres"

    def url(self, node: str = "coordinator", database: str = APP_DATABASE) -> str:
        """A libpq URL of ``database`` on ``node``."""
        return f"postgresql://{self.user}@127.0.0.1:{self.ports[node]}/{database}"

    @property
    def database_url(self) -> str:
        """The coordinator's ``tenantdb`` database: what the application connects to."""
        return self.url()

    def exports(self) -> list[str]:
        """Shell lines pointing tenantdb and psql at the coordinator: the application login
        for ``connect()``, the owner for migrations and (in development) admin work."""
        values = {
            "TENANTDB_DATABASE_URL": with_login(self.database_url, APP_ROLE),
            "TENANTDB_ADMIN_DATABASE_URL": self.database_url,
            "TENANTDB_OWNER_DATABASE_URL": self.database_url,
            "PGHOST": "127.0.0.1",
            "PGPORT": str(self.ports["coordinator"]),
            "PGDATABASE": APP_DATABASE,
            "PGUSER": self.user,
        }
        return [f"export {name}='{value}'" for name, value in values.items()]


def find_pg_bin(configured: Path | None = None) -> Path | None:
    """The bin folder of a PostgreSQL with Citus installed, or ``None``.

    Looked for in ``configured`` (``TENANTDB_PG_BIN``), then beside ``pg_config`` or
    ``postgres`` on ``PATH``, then :data:`DEFAULT_PG_BIN`.
    """
    candidates: list[Path] = []
    if configured is not None:
        candidates.append(configured)
    for tool in ("pg_config", "postgres"):
        found = shutil.which(tool)
        if found:
            candidates.append(Path(found).resolve().parent)
    candidates.append(DEFAULT_PG_BIN)
    for bin_dir in candidates:
        if _has_citus(bin_dir):
            return bin_dir
    return None


def start(home: Path, pg_bin: Path | None = None) -> CitusCluster:
    """Start (or find running) the cluster under ``home/citus``; idempotent.

    :raises ConfigurationError: no PostgreSQL with Citus, no ``postgres`` OS user when
        running as root, or a node that does not start (its log is named).
    """
    bin_dir = find_pg_bin(pg_bin)
    if bin_dir is None:
        raise ConfigurationError(NO_CITUS)
    root = _cluster_root(home)
    state = root / _STATE_FILE
    ports = (json.loads(state.read_text()) if state.exists()
             else dict(zip(NODE_NAMES, _free_ports(len(NODE_NAMES)), strict=True)))
    cluster = CitusCluster(ports)
    fresh = [name for name in NODE_NAMES if not (root / name / "PG_VERSION").exists()]
    _run_all([[str(bin_dir / "initdb"), "-D", str(root / name), "-U", cluster.user,
               "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions"]
              for name in fresh], root)
    for name in fresh:
        with (root / name / "postgresql.conf").open("a") as conf:
            conf.write(_NODE_CONFIG.format(port=ports[name], socket_dir=root / name))
    state.write_text(json.dumps(ports))
    down = [name for name in NODE_NAMES if _node_pid(root / name) is None]
    _run_all([[str(bin_dir / "pg_ctl"), "-D", str(root / name), "-l",
               str(root / f"{name}.log"), "-w", "-t", str(_START_TIMEOUT_S), "start"]
              for name in down], root)
    from .citus import create_database, register_workers

    # The maintenance database is a coordinator too: a test server URL pointing at it can
    # then create further databases on every node (tenantdb.citus.create_database).
    register_workers(cluster.url(database="postgres"),
                     [("127.0.0.1", ports[name]) for name in NODE_NAMES[1:]])
    create_database(cluster.url(database="postgres"), APP_DATABASE)
    return cluster


def running_cluster(home: Path) -> CitusCluster | None:
    """The cluster under ``home`` if every node runs, else ``None``."""
    root = home.resolve() / "citus"
    state = root / _STATE_FILE
    if not state.exists() or any(_node_pid(root / name) is None for name in NODE_NAMES):
        return None
    return CitusCluster(json.loads(state.read_text()))


def status(home: Path) -> list[tuple[str, int | None, Path]]:
    """Each node's name, pid (``None`` when stopped) and data folder."""
    root = home.resolve() / "citus"
    return [(name, _node_pid(root / name), root / name) for name in NODE_NAMES]


def stop(home: Path) -> list[tuple[str, int | None, Path]]:
    """Stop every node (fast shutdown); returns what was running. Idempotent."""
    was = status(home)
    for _, pid, _ in was:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)  # PostgreSQL's fast shutdown
    for _, pid, _ in was:
        if pid is not None:
            _wait_gone(pid)
    return was


# -- helpers ------------------------------------------------------------------------------


def _has_citus(bin_dir: Path) -> bool:
    if not (bin_dir / "postgres").exists() or not (bin_dir / "initdb").exists():
        return False
    pg_config = bin_dir / "pg_config"
    if pg_config.exists():
        try:
            lib = subprocess.run([str(pg_config), "--pkglibdir"], capture_output=True,
                                 text=True, check=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            lib = ""
        if lib:
            return (Path(lib) / "citus.so").exists()
    # Debian's layout: /usr/lib/postgresql/15/{bin,lib}.
    return (bin_dir.parent / "lib" / "citus.so").exists()


def _cluster_root(home: Path) -> Path:
    """``home/citus``, made usable by the OS user the servers run as."""
    root = home.resolve() / "citus"
    root.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam(_OS_USER)
        except KeyError:
            raise ConfigurationError(
                f"running as root, and there is no {_OS_USER!r} OS user to run PostgreSQL "
                "(it refuses root): create one, or run as an ordinary user") from None
        # The servers need to reach their folder: every parent must be searchable.
        for parent in [root.parent, *root.parent.parents]:
            mode = parent.stat().st_mode
            if not mode & 0o001:
                parent.chmod(mode | 0o001)
        os.chown(root, user.pw_uid, user.pw_gid)
    return root


def _as_server_user(args: list[str]) -> list[str]:
    return ["runuser", "-u", _OS_USER, "--", *args] if os.geteuid() == 0 else args


def _run_all(commands: list[list[str]], root: Path) -> None:
    """Run ``commands`` in parallel (as the server's OS user); all must succeed."""
    procs = [subprocess.Popen(_as_server_user(cmd), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, cwd=root)
             for cmd in commands]
    failures = []
    for cmd, proc in zip(commands, procs, strict=True):
        out, _ = proc.communicate(timeout=_START_TIMEOUT_S + 10)
        if proc.returncode != 0:
            failures.append(f"{Path(cmd[0]).name} failed ({out.strip()[-300:]}){_log_tail(cmd)}; "
                            f"see the logs in {root}")
    if failures:
        raise ConfigurationError("; ".join(failures))


def _log_tail(cmd: list[str]) -> str:
    """The last line a node logged, when ``cmd`` named a log (``pg_ctl -l``): the reason.
    A Citus built for a newer minor release fails here with "undefined symbol": upgrade
    the server package (apt-get install postgresql-15)."""
    if "-l" not in cmd:
        return ""
    with contextlib.suppress(OSError, IndexError):
        return ": " + Path(cmd[cmd.index("-l") + 1]).read_text().strip().splitlines()[-1]
    return ""


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _node_pid(data_dir: Path) -> int | None:
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
