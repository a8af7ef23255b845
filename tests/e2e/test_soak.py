"""The load soak of `benchmarks/soak_load.py`, for 60 seconds (issue 9): 64 clients of mixed
traffic with eviction churn against a real server; every value read back is checked, and the
server's memory, descriptors, leases and shared-memory segments must not leak."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"

pytestmark = pytest.mark.timeout(600)


def test_sixty_seconds_of_64_clients_leak_nothing_and_read_no_wrong_byte(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    args = ["--duration", "60", "--clients", "64", "--json", str(out)]
    run = subprocess.run(
        [sys.executable, str(BENCHMARKS / "soak_load.py"), *args],
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert out.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    figures = json.loads(out.read_text())
    failed = [name for name, ok in figures["checks"].items() if not ok]
    assert not failed and run.returncode == 0, (failed, run.stdout[-3000:])
    assert figures["clients"] == 64 and figures["seconds"] >= 60
    # Every kind of operation ran, and reads found values as well as misses.
    assert all(v["n"] > 0 for v in figures["latency_ms"].values()), figures["latency_ms"]
    assert figures["hits"] > 0 and figures["misses"] > 0
