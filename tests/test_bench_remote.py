"""The remote tier benchmark runs end to end (`--quick`): a real 3-master Redis Cluster, two
kvstore-servers sharing it, and every method's figures (each read checked against what was
written, inside the benchmark). Without `redis-server` the test fails under CI (see
`require_redis_server`) and is skipped elsewhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import require_redis_server, run_benchmark


@pytest.mark.parametrize("codec", ["", "remote=int8"])
def test_quick_run_reports_every_method(tmp_path: Path, codec: str) -> None:
    require_redis_server()
    out = tmp_path / "remote.json"
    proc = run_benchmark("bench_remote.py", "--quick", "--codec", codec, "--json", str(out))
    report = json.loads(out.read_text())
    assert report["codec"] == codec and report["masters"] == 3
    sizes = [r["size"] for r in report["sizes"]]
    assert sizes == [64 << 10, 1 << 20]
    for row in report["sizes"]:
        assert set(row["GBps"]) == {"remote", "redis_get", "redis_pipeline", "local_cpu"}
        assert all(v > 0 for v in row["GBps"].values()), row
        assert row["remote_over_redis_get"] == pytest.approx(
            row["GBps"]["remote"] / row["GBps"]["redis_get"]
        )
        # B's reads went to the cluster: its remote batches took time in every round.
        assert all(s > 0 for s in row["seconds"]["fetch_batches"]), row
    assert "remote / GET" in proc.stdout
