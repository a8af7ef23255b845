"""Fixtures that run a real `kvstore-server` process and talk to it only over its socket."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvstore.client import KVClient
from kvstore.errors import KVStoreError, Unauthenticated
from kvstore.tiers.host import SHM_DIR, default_arena_path

NAMESPACE = "test/model-a"
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def smollm2() -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct (float32) and its tokenizer. Without the model the test skips,
    unless KVSTORE_REQUIRE_MODELS=1 (scripts/test.sh sets it), which makes it a failure."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    import _realkv
    import torch

    try:
        return _realkv.load_smollm2(torch.float32)
    except (_realkv.MissingModelDependency, FileNotFoundError) as exc:
        if os.environ.get("KVSTORE_REQUIRE_MODELS") == "1":
            pytest.fail(f"KVSTORE_REQUIRE_MODELS=1 but SmolLM2 cannot load: {exc}")
        pytest.skip(f"SmolLM2 not available: {exc}")


_LIMITED = (
    "import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "n = int(sys.argv[1]); resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)


class ServerProcess:
    """One `kvstore-server` on a data directory; can be stopped and started again."""

    def __init__(self, data_dir: Path, *flags: str) -> None:
        self.data_dir = data_dir
        self.flags = list(flags)
        self.socket = data_dir / "kvstore.sock"
        self.address = f"unix://{self.socket}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}-server.log"
        # The largest file the server may write (RLIMIT_FSIZE, SIGXFSZ ignored: a write past
        # it fails as on a full disk), for fault tests; None: no limit.
        self.file_size_limit: int | None = None

    def launch(self) -> subprocess.Popen[bytes]:
        """Start the process without waiting for it to serve (see `start`)."""
        log = self.log_path.open("ab")
        command = [
            sys.executable,
            "-m",
            "kvstore.server_cli",
            "--data-dir",
            str(self.data_dir),
            "--grace-seconds",
            "5",
            *self.flags,
        ]
        if self.file_size_limit is not None:
            # Set by a Python that then execs the server, not by a preexec_fn: with one,
            # Popen forks this process, whose gRPC threads then restart their poller in the
            # child after close_fds and abort it on EBADF now and then (grpc/grpc#43055).
            command = [sys.executable, "-c", _LIMITED, str(self.file_size_limit), *command]
        self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()  # the child holds its own copy
        return self.proc

    def start(self, timeout: float = 30.0) -> ServerProcess:
        self.launch()
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            if self.socket.exists():
                try:
                    with KVClient(self.address, NAMESPACE, timeout=2) as c:
                        c.stats()
                    return self
                except Unauthenticated:  # run with --auth-tokens: up, and asking for one
                    return self
                except KVStoreError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"server did not come up in {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout)
        self.proc = None
        return rc

    def restart(self) -> ServerProcess:
        self.stop()
        return self.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self, namespace: str = NAMESPACE, **kw: object) -> KVClient:
        return KVClient(self.address, namespace, **kw)  # type: ignore[arg-type]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator:
    """`start_server(*flags, name="srv")` starts a server; all are stopped at teardown."""
    started: list[ServerProcess] = []

    def start(*flags: str, name: str = "srv") -> ServerProcess:
        srv = ServerProcess(tmp_path / name, *flags)
        started.append(srv)
        return srv.start()

    yield start
    for srv in started:
        if srv.alive():
            srv.stop()
        # A server the test killed leaves its shared-memory arena behind (the next start
        # on its data directory would reuse it): none comes after the test.
        for arena in SHM_DIR.glob(f"{default_arena_path(srv.data_dir).name}*"):
            arena.unlink(missing_ok=True)


@pytest.fixture
def server(start_server) -> ServerProcess:  # type: ignore[no-untyped-def]
    """A server with small tiers: 64 MiB cpu, 256 MiB ssd."""
    return start_server("--cpu-bytes", "64MiB", "--ssd-bytes", "256MiB")


@pytest.fixture
def client(server: ServerProcess) -> Iterator[KVClient]:
    with server.client() as c:
        yield c
