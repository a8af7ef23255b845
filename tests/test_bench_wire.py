"""The wire benchmark runs end to end (`--quick`) and reports numbers for both systems.

It starts a real `kvstore-server` and a real `redis-server`. Without `redis-server` the test
is skipped on a developer machine and fails under CI, where a silent skip would hide that
the benchmark no longer runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_wire.py"


def _require_redis_server() -> None:
    if shutil.which("redis-server") is not None:
        return
    reason = (
        "redis-server is not on PATH; the wire benchmark compares against it "
        "(install it with `apt-get install redis-server`)"
    )
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {reason}", pytrace=False)
    pytest.skip(reason)


def test_quick_run_reports_both_systems(tmp_path: Path) -> None:
    _require_redis_server()
    out = tmp_path / "wire.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, (
        f"bench_wire.py exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    report = json.loads(out.read_text())

    rows = report["throughput"]
    assert {(r["size"], r["op"]) for r in rows} == {
        (size, op) for size in report["meta"]["sizes"] for op in ("put", "get")
    }
    for r in rows:
        assert r["kvstore_gbps"] > 0, r
        assert r["redis_gbps"] > 0, r
        assert r["memcpy_gbps"] > 0, r
    assert report["lookup"]["p99_ms"] > 0
    assert report["lookup"]["p50_ms"] <= report["lookup"]["p99_ms"]
    assert [t["target"] for t in report["targets"]] == [
        "get >= 2x redis-py",
        "same-host get >= 50% of memcpy",
        "lookup p99 < 1 ms",
    ]
    paths = report["paths"]
    assert [p["size"] for p in paths] == report["meta"]["sizes"]
    for p in paths:
        for name in ("arena_get", "arena_get_into", "tcp_get"):
            assert p[f"{name}_gbps"] > 0, p
            assert p[f"{name}_over_memcpy"] == pytest.approx(p[f"{name}_gbps"] / p["memcpy_gbps"])
    assert "targets:" in proc.stdout
