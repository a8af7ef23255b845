"""A throwaway Redis Cluster on loopback: `local_cluster()` starts `masters` redis-server
processes with `--cluster-enabled yes`, assigns each an equal share of the 16384 slots
(CLUSTER ADDSLOTSRANGE, MEET, from redis-py), waits for `cluster_state:ok` everywhere and
stops them all on exit.

Persistence is off (`--save ""`, no AOF): a master that is killed and restarted comes back
empty, keeping its slots (its `nodes.conf` survives). `cluster-require-full-coverage no`
keeps the live masters serving while one is down, which is what a remote tier needs from
its cluster (see the README's remote tier section).

Used by the remote tier's tests (`tests/tiers/test_remote.py`, `tests/e2e/test_remote.py`)
and `bench_remote.py`; both put this directory on `sys.path`.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

SLOTS = 16384
START_TIMEOUT_S = 30.0


def redis_server_binary() -> str | None:
    """`redis-server` (or `valkey-server`) on PATH, or None."""
    return shutil.which("redis-server") or shutil.which("valkey-server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ClusterNode:
    """One master: its port, directory and process (None while stopped)."""

    port: int
    bus_port: int  # the cluster bus
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def client(self, timeout: float = 2.0) -> redis.Redis:
        return redis.Redis("127.0.0.1", self.port, socket_timeout=timeout)


@dataclass
class LocalCluster:
    binary: str
    workdir: Path
    nodes: list[ClusterNode] = field(default_factory=list)
    extra_args: tuple[str, ...] = ()
    cluster_enabled: bool = True  # False: one plain (non-cluster) redis-server

    @property
    def urls(self) -> list[str]:
        """Seed URLs, one per master (a client needs any one of them)."""
        return [n.url for n in self.nodes]

    def start_node(self, node: ClusterNode) -> None:
        node.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [
            self.binary,
            "--port", str(node.port),
            "--bind", "127.0.0.1",
            "--dir", str(node.workdir),
            "--save", "",
            "--appendonly", "no",
            *self.extra_args,
        ]  # fmt: skip
        if self.cluster_enabled:
            cmd += [
                "--cluster-enabled", "yes",
                "--cluster-port", str(node.bus_port),
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "2000",
                "--cluster-require-full-coverage", "no",
            ]  # fmt: skip
        log = (node.workdir / "redis.log").open("ab")
        node.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with node.client(0.5) as c:
                    c.ping()
                return
            except redis.RedisError:
                if node.proc.poll() is not None or time.monotonic() > deadline:
                    tail = (node.workdir / "redis.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(
                        f"redis-server on port {node.port} did not start:\n{tail}"
                    ) from None
                time.sleep(0.05)

    def kill(self, index: int) -> None:
        """SIGKILL master `index` (a crash: no goodbye to the cluster)."""
        node = self.nodes[index]
        if node.proc is not None:
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait()
            node.proc = None

    def pause(self, index: int) -> None:
        """SIGSTOP master `index`: a master that hangs (connections open, no answers).
        Returns once the kernel shows it stopped: the signal lands asynchronously, and a
        request sent right after it was sometimes still answered."""
        proc = self.nodes[index].proc
        assert proc is not None
        proc.send_signal(signal.SIGSTOP)
        stat = Path(f"/proc/{proc.pid}/stat")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                state = stat.read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                return
            if state in ("T", "t"):
                return
            time.sleep(0.001)

    def resume(self, index: int) -> None:
        proc = self.nodes[index].proc
        assert proc is not None
        proc.send_signal(signal.SIGCONT)

    def restart(self, index: int) -> None:
        """Start a killed master again on its port; it rejoins with its slots, empty."""
        node = self.nodes[index]
        self.start_node(node)
        if self.cluster_enabled:
            self.wait_ok()

    def stop(self) -> None:
        for node in self.nodes:
            if node.proc is not None:
                node.proc.terminate()
        for node in self.nodes:
            if node.proc is not None:
                try:
                    node.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    node.proc.kill()
                    node.proc.wait()
                node.proc = None

    def create(self) -> None:
        """Give each master an equal range of slots and introduce them to each other."""
        n = len(self.nodes)
        for i, node in enumerate(self.nodes):
            lo, hi = i * SLOTS // n, (i + 1) * SLOTS // n - 1
            with node.client() as c:
                c.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", lo, hi)
        with self.nodes[0].client() as c:
            for other in self.nodes[1:]:
                c.execute_command("CLUSTER", "MEET", "127.0.0.1", other.port, other.bus_port)
        self.wait_ok()

    def wait_ok(self) -> None:
        """Until every running master says `cluster_state:ok` and knows all the others."""
        deadline = time.monotonic() + START_TIMEOUT_S
        want = len(self.nodes)
        while True:
            states = []
            for node in self.nodes:
                if node.proc is None:
                    continue
                try:
                    with node.client() as c:
                        info = c.execute_command("CLUSTER", "INFO")
                except redis.RedisError as exc:
                    states.append(str(exc))
                    continue
                text = info.decode() if isinstance(info, bytes) else str(info)
                fields = dict(line.split(":", 1) for line in text.split() if ":" in line)
                good = (
                    fields.get("cluster_state") == "ok"
                    and int(fields.get("cluster_known_nodes", 0)) == want
                    and int(fields.get("cluster_slots_ok", 0)) == SLOTS
                )
                states.append("ok" if good else " ".join(text.split())[:200])
            if all(s == "ok" for s in states):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis cluster did not become ok: {states}")
            time.sleep(0.1)

    def owner(self, slot: int) -> int:
        """Index of the master that owns `slot`."""
        return min(slot * len(self.nodes) // SLOTS, len(self.nodes) - 1)


@contextlib.contextmanager
def local_cluster(
    workdir: Path, masters: int = 3, binary: str | None = None, extra_args: tuple[str, ...] = ()
) -> Iterator[LocalCluster]:
    """A running `masters`-master cluster under `workdir`; stopped on exit."""
    binary = binary or redis_server_binary()
    if binary is None:
        raise RuntimeError("redis-server is not on PATH (apt-get install redis-server)")
    cluster = LocalCluster(binary, Path(workdir), extra_args=extra_args)
    try:
        for i in range(masters):
            node = ClusterNode(_free_port(), _free_port(), Path(workdir) / f"node{i}")
            cluster.nodes.append(node)
            cluster.start_node(node)
        cluster.create()
        yield cluster
    finally:
        cluster.stop()


@contextlib.contextmanager
def local_redis(
    workdir: Path, binary: str | None = None, port: int | None = None
) -> Iterator[LocalCluster]:
    """One plain (non-cluster) redis-server on loopback (on `port`, or a free one), as a
    one-node `LocalCluster`."""
    binary = binary or redis_server_binary()
    if binary is None:
        raise RuntimeError("redis-server is not on PATH (apt-get install redis-server)")
    server = LocalCluster(binary, Path(workdir), cluster_enabled=False)
    try:
        node = ClusterNode(port or _free_port(), 0, Path(workdir) / "plain")
        server.nodes.append(node)
        server.start_node(node)
        yield server
    finally:
        server.stop()
