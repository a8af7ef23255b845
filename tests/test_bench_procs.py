"""The benchmarks' server handling: a benchmark stopped by SIGTERM stops its server too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import BENCHMARKS

SCRIPT = """
import sys, tempfile, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from _procs import running_kvstore
with tempfile.TemporaryDirectory(dir=sys.argv[2]) as tmp:
    with running_kvstore(Path(tmp), "--tiers", "cpu", "--cpu-bytes", "16MiB") as address:
        print(address, flush=True)
        time.sleep(600)
"""


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc: no procps needed)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # gone meanwhile
            continue
        if int(text.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_to_a_benchmark_stops_its_server_and_frees_its_arena(tmp_path: Path) -> None:
    bench = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(BENCHMARKS), str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert bench.stdout is not None
        address = bench.stdout.readline().strip()
        assert address.startswith("unix://"), bench.stderr.read() if bench.stderr else ""
        data_dir = Path(address.removeprefix("unix://")).parent
        (server_pid,) = _children(bench.pid)  # the server
        from kvstore.tiers.host import default_arena_path

        arena = default_arena_path(data_dir)
        assert arena.exists()
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30
        while _alive(server_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(server_pid), "the server outlived its benchmark"
        assert not arena.exists(), f"{arena} was left in shared memory"
        assert not data_dir.exists(), "the benchmark's temporary directory was left"
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
