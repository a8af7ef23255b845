"""Calls cut short by their deadline, signals during start-up, and a bad --socket path.

Each test here failed before its fix:
- a Get or Put whose client deadline expired while the server's worker thread was fetching the
  value or reserving room leaked the lease, the staging budget or the reserved cpu slot;
- a SIGTERM or SIGINT during start-up (while the arena was being populated) killed the process
  and left the shared-memory arena behind;
- `--socket` naming a regular file deleted that file.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import TypeVar

import pytest
import torch

from kvstore.client import KVClient
from kvstore.errors import KVStoreError
from kvstore.tiers.host import default_arena_path

from .conftest import NAMESPACE, ServerProcess

MiB = 1 << 20
BIG = 48 * MiB
SETTLE_S = 10.0
# Deadlines short enough that most calls are cancelled while the server is still working on
# them; a spread, so some land inside the worker thread whatever this machine's speed.
SHORT_TIMEOUTS = (0.002, 0.005, 0.005, 0.01, 0.02, 0.04)

T = TypeVar("T")


def key(i: int) -> bytes:
    return b"R" + i.to_bytes(4, "little") + bytes(27)


def value(i: int, nbytes: int = BIG) -> torch.Tensor:
    g = torch.Generator().manual_seed(5000 + i)
    return torch.randint(0, 256, (nbytes,), generator=g, dtype=torch.uint8)


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = SETTLE_S) -> T:
    """Poll `probe` until it returns something other than None (or False)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            got = probe()
        except KVStoreError as exc:  # e.g. staging still busy with an orphaned call
            got, last = None, exc
        if got is not None and got is not False:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s (last error: {last!r})")
        time.sleep(0.05)


def cpu_used(c: KVClient) -> int:
    return c.stats().tiers["cpu"].used_bytes


def gets_with_short_deadlines(srv: ServerProcess, k: bytes, want: torch.Tensor) -> None:
    for t in SHORT_TIMEOUTS:
        with KVClient(srv.address, NAMESPACE, timeout=t) as fast:
            try:
                got = fast.get(k)
            except KVStoreError:
                continue  # DEADLINE_EXCEEDED, or a busy server: both fine
            # None: refused by back-pressure, which a read reports as a miss (an earlier
            # get cut off by its deadline may still hold its staged copy while it decodes)
            assert got is None or torch.equal(got, want)


def puts_with_short_deadlines(srv: ServerProcess, keys: list[bytes], v: torch.Tensor) -> list[bool]:
    """Put `v` under each key with a short deadline; which of them reported success."""
    ok = []
    for k, t in zip(keys, SHORT_TIMEOUTS * len(keys), strict=False):
        with KVClient(srv.address, NAMESPACE, timeout=t) as fast:
            try:
                fast.put(k, v)
                ok.append(True)
            except KVStoreError:
                ok.append(False)
    return ok


def get_exact(c: KVClient, k: bytes, want: torch.Tensor) -> bool:
    got = c.get(k)
    assert got is not None and torch.equal(got, want)
    return True


def get_exact_when_staged(c: KVClient, k: bytes, want: torch.Tensor) -> bool | None:
    """`get_exact` for `wait_for`: None while the read is refused by back-pressure.

    A get cut off by its deadline can still hold its staged copy after the leases are back,
    and the server reports a read it refuses for full staging buffers as a miss; a value that
    never comes back still fails, by `wait_for`'s timeout.
    """
    got = c.get(k)
    if got is None:
        return None
    assert torch.equal(got, want)
    return True


# ---------------------------------------------------------------- deadlines


def test_get_cancelled_by_deadline_returns_staging_budget(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server(
        "--tiers",
        "ssd",
        "--ssd-bytes",
        "512MiB",
        "--max-value-bytes",
        "64MiB",
        "--staging-bytes",
        "64MiB",
    )
    v = value(1)
    with srv.client() as c:
        assert c.put(key(1), v) == "ssd"
    gets_with_short_deadlines(srv, key(1), v)
    with srv.client(timeout=30) as c:
        wait_for("leases back to 0", lambda: c.stats().leases == 0)
        # One leaked staged lease holds 48 of the 64 MiB staging budget forever, and every
        # later get of the value fails with "staging buffers are full".
        wait_for("a normal get of the staged value", lambda: get_exact_when_staged(c, key(1), v))
        assert c.stats().leases == 0


def test_get_cancelled_by_deadline_releases_cpu_lease(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server(
        "--cpu-bytes", "256MiB", "--ssd-bytes", "512MiB", "--max-value-bytes", "64MiB"
    )
    v = value(2)
    with srv.client(timeout=30) as c:
        before = cpu_used(c)
        assert c.put(key(2), v) == "cpu"
        gets_with_short_deadlines(srv, key(2), v)
        wait_for("leases back to 0", lambda: c.stats().leases == 0)
        wait_for("a normal get of the cpu value", lambda: get_exact_when_staged(c, key(2), v))
        assert c.delete([key(2)]) == 1
        # A leaked lease keeps the deleted value's slot allocated.
        wait_for("cpu tier back to its size before the put", lambda: cpu_used(c) == before)
        assert c.stats().leases == 0


def test_batch_get_cancelled_by_deadline_gives_back_what_it_read_ahead(start_server) -> None:  # type: ignore[no-untyped-def]
    """A BatchGet of values on ssd takes the next keys' leases while it sends one: cut off
    by its deadline, it leaves no lease, cpu slot or staged byte behind."""
    srv = start_server(
        "--cpu-bytes", "64MiB", "--ssd-bytes", "512MiB", "--max-value-bytes", "64MiB",
        "--staging-bytes", "64MiB",
    )  # fmt: skip
    keys = [key(10 + i) for i in range(8)]
    values = [value(10 + i, 8 * MiB) for i in range(8)]
    with srv.client(timeout=30) as c:
        c.batch_put(keys, values)
        for i in range(8):  # push them down to ssd
            c.put(key(40 + i), value(40 + i, 8 * MiB))
        where = {e.header.key: e.tier for e in c.entries(NAMESPACE)}
        assert sum(where[k] == "ssd" for k in keys) >= 4
    for t in (*SHORT_TIMEOUTS, 0.08, 0.16):
        with KVClient(srv.address, NAMESPACE, timeout=t) as fast:
            try:
                got = fast.batch_get(keys)
            except KVStoreError:
                continue
            assert all(g is None or torch.equal(g, v) for g, v in zip(got, values, strict=True))
    with srv.client(timeout=30) as c:
        wait_for("leases back to 0", lambda: c.stats().leases == 0)
        got = wait_for("a whole batch read", lambda: c.batch_get(keys))
        assert all(torch.equal(g, v) for g, v in zip(got, values, strict=True))
        assert c.stats().leases == 0


def test_put_cancelled_by_deadline_leaves_nothing_behind(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server("--cpu-bytes", "256MiB", "--ssd-bytes", "1GiB", "--max-value-bytes", "64MiB")
    v = value(3)
    with srv.client(timeout=30) as c:
        # With room in cpu: nothing stays reserved. A put whose deadline expired may still
        # have been committed (its Commit reached the server first; as with any RPC the
        # outcome is unknown to the caller), but then the value is whole and deleting it
        # frees its slot; a put that did not commit leaves no reservation behind.
        before = cpu_used(c)
        keys = [key(100 + i) for i in range(len(SHORT_TIMEOUTS))]
        ok = puts_with_short_deadlines(srv, keys, v)
        for k, good in zip(keys, ok, strict=True):
            if good or c.exists([k]) == [True]:
                assert get_exact(c, k, v)
        c.delete(keys)
        wait_for("cpu tier back to its size before the puts", lambda: cpu_used(c) == before)
        assert c.exists(keys) == [False] * len(keys)

        # With the cpu tier full, reserving room means demoting a value to ssd first, which
        # takes long enough for the deadline to expire while the worker thread reserves.
        fillers = [key(200 + i) for i in range(4)]
        for k in fillers:
            assert c.put(k, v) == "cpu"
        keys = [key(300 + i) for i in range(len(SHORT_TIMEOUTS))]
        for i, (k, t) in enumerate(zip(keys, SHORT_TIMEOUTS, strict=True)):
            with KVClient(srv.address, NAMESPACE, timeout=t) as fast, suppress(KVStoreError):
                fast.put(k, v)
            fillers.append(key(400 + i))  # fill cpu again, so the next put must demote
            wait_for("a filler put", lambda k=fillers[-1]: c.put(k, v))  # type: ignore[misc]
        wait_for("leases back to 0", lambda: c.stats().leases == 0)
        c.delete(fillers + keys)
        # A leaked reservation keeps its cpu slot allocated with nothing in the index.
        wait_for("cpu tier empty", lambda: cpu_used(c) == 0)
        assert c.exists(fillers + keys) == [False] * (len(fillers) + len(keys))
        assert c.put(key(1), v) == "cpu"
        assert get_exact(c, key(1), v)


# ---------------------------------------------------------------- signals during start-up


@pytest.fixture
def starting_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server with a 3 GiB arena, whose population takes a while; cleaned up whatever
    happens (a server killed by a signal leaves its arena in /dev/shm)."""
    srv = ServerProcess(tmp_path.resolve() / "srv", "--cpu-bytes", "3GiB", "--ssd-bytes", "64MiB")
    yield srv
    if srv.proc is not None and srv.proc.poll() is None:
        srv.proc.kill()
        srv.proc.wait(30)
    default_arena_path(srv.data_dir).unlink(missing_ok=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_start_up_exits_cleanly(
    starting_server: ServerProcess, sig: signal.Signals
) -> None:
    srv = starting_server
    arena = default_arena_path(srv.data_dir)
    proc = srv.launch()
    # The arena file appears when the store starts populating it: start-up is under way.
    deadline = time.monotonic() + 20
    while not arena.exists():
        assert proc.poll() is None, f"server exited early:\n{srv.log()}"
        assert time.monotonic() < deadline, f"no arena after 20s:\n{srv.log()}"
        time.sleep(0.005)
    assert not srv.socket.exists(), "the server was already serving; start-up too fast?"
    proc.send_signal(sig)
    try:
        rc = proc.wait(60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"server did not exit within 60s of {sig.name}:\n{srv.log()}")
    log = srv.log()
    assert rc == 0, f"exit code {rc} after {sig.name}:\n{log}"
    assert "Traceback" not in log, log
    assert "serving on" not in log, log  # the signal did arrive during start-up
    assert not arena.exists(), f"{arena} left behind"
    assert not srv.socket.exists()


# ---------------------------------------------------------------- bad --socket


def test_socket_path_that_is_a_regular_file_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "srv"
    sock = tmp_path / "precious.txt"
    sock.write_text("do not delete me\n")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvstore.server_cli",
            "--data-dir",
            str(data_dir),
            "--socket",
            str(sock),
            "--cpu-bytes",
            "64MiB",
            "--ssd-bytes",
            "64MiB",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"server started on a regular file instead of refusing:\n{err.decode()}")
    finally:
        default_arena_path(data_dir).unlink(missing_ok=True)
    text = (out + err).decode(errors="replace")
    assert proc.returncode != 0, text
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and "not a socket" in lines[0], text
    assert "Traceback" not in text
    assert sock.read_text() == "do not delete me\n"
