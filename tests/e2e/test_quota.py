"""Per-namespace-group quotas (`--quota`) against a real server: filling one group past its
quota evicts its own entries, never another group's, and Stats reports each group's use."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from rich.console import Console

from kvstore.admin_cli import stats_view

from .conftest import ServerProcess
from .helpers import key, random_tensor
from .test_bad_input import same_bytes
from .test_metrics import free_port, scrape, value

pytestmark = pytest.mark.timeout(180)

MiB = 1 << 20


def test_filling_one_group_past_its_quota_never_evicts_the_other(
    start_server: Callable[..., ServerProcess],
) -> None:
    metrics = free_port()
    srv = start_server(
        "--cpu-bytes", "64MiB", "--ssd-bytes", "256MiB",
        "--quota", "cpu[tenant-a/*]=8MiB", "--quota", "ssd[tenant-a/*]=16MiB",
        "--quota", "cpu[tenant-b/*]=8MiB",
        "--metrics-listen", f"127.0.0.1:{metrics}",
    )  # fmt: skip
    b_values = {key(100 + i): random_tensor((MiB,), torch.uint8, seed=100 + i) for i in range(6)}
    with srv.client("tenant-b/llama", timeout=30) as b:
        for k, t in b_values.items():
            assert b.put(k, t) == "cpu"
    a_values = {key(i): random_tensor((MiB,), torch.uint8, seed=i) for i in range(40)}
    with srv.client("tenant-a/llama", timeout=30) as a:
        for k, t in a_values.items():
            a.put(k, t)  # 40 MiB into 8 MiB of cpu and 16 MiB of ssd
        stats = a.stats()
        entries = {e.header.key: e for e in a.entries("tenant-a/llama")}
        # The newest 8 in cpu, the 16 before them demoted to ssd, the oldest gone.
        assert [entries[key(i)].tier for i in range(32, 40)] == ["cpu"] * 8
        assert all(entries[key(i)].tier == "ssd" for i in range(16, 32))
        assert not any(key(i) in entries for i in range(16))
        for i in range(32, 40):
            assert same_bytes(a.get(key(i)), a_values[key(i)])
    # Usage in Stats matches what the entries hold; tenant B is untouched.
    assert stats.quotas == {
        "cpu[tenant-a/*]": (8 * MiB, 8 * MiB),
        "ssd[tenant-a/*]": (16 * MiB, 16 * MiB),
        "cpu[tenant-b/*]": (6 * MiB, 8 * MiB),
    }
    with srv.client("tenant-b/llama", timeout=30) as b:
        assert {e.header.key: e.tier for e in b.entries("tenant-b/llama")} == {
            k: "cpu" for k in b_values
        }
        for k, t in b_values.items():
            assert same_bytes(b.get(k), t)
    shown = Console(record=True, width=120)
    shown.print(stats_view(stats))
    assert "quota cpu[tenant-b/*]: 6.0 MiB of 8.0 MiB" in shown.export_text()
    samples = scrape(metrics)
    labels = {"tier": "cpu", "namespaces": "tenant-b/*"}
    assert value(samples, "kvstore_quota_used_bytes", **labels) == 6 * MiB
    assert value(samples, "kvstore_quota_bytes", **labels) == 8 * MiB
