"""The Prometheus endpoint, the health-only port and JSON logs of a real server process."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpc_health.v1.health_pb2_grpc import HealthStub
from prometheus_client.parser import text_string_to_metric_families

from kvstore import __version__
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire import GRPC_OPTIONS, client_stubs

from .conftest import NAMESPACE

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "kvstore-dashboard.json"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def key(i: int) -> bytes:
    return b"M" + i.to_bytes(4, "little") + bytes(27)


def compressible(i: int) -> torch.Tensor:
    """1 MiB that zstd shrinks a lot, different for every i."""
    return (torch.arange(MiB // 2, dtype=torch.int16) % 64 + i).view(torch.uint8)


@pytest.fixture
def observed(start_server) -> Iterator[tuple]:  # type: ignore[no-untyped-def]
    metrics, health = free_port(), free_port()
    srv = start_server(
        "--cpu-bytes", "8MiB", "--ssd-bytes", "64MiB", "--codec", "ssd=zstd",
        "--metrics-listen", f"127.0.0.1:{metrics}", "--health-listen", f"127.0.0.1:{health}",
        "--log-format", "json", "--log-level", "debug",
        "--ssd-write-ahead", "0",  # each eviction writes: the counts below are exact
    )  # fmt: skip
    yield srv, metrics, health


def test_counters_move_by_what_the_workload_did(observed) -> None:  # type: ignore[no-untyped-def]
    srv, port, _ = observed
    before = scrape(port)
    assert value(before, "kvstore_build_info", version=__version__) == 1
    assert value(before, "kvstore_tier_capacity_bytes", tier="cpu") == 8 * MiB
    assert value(before, "kvstore_tier_capacity_bytes", tier="ssd") == 64 * MiB
    for codec in ("raw", "zstd"):  # present from the start, at zero
        assert before[("kvstore_codec_raw_bytes_total", (("codec", codec),))] == 0
    for tier in ("cpu", "ssd"):
        assert before[("kvstore_corrupt_dropped_total", (("tier", tier),))] == 0
    with srv.client() as c:
        for i in range(20):
            assert c.put(key(i), compressible(i)) == "cpu"
        for i in range(15, 20):  # cpu residents
            got = c.get(key(i))
            assert got is not None and torch.equal(got, compressible(i))
        got = c.get(key(0))  # on ssd only: a hit there, promoted to cpu
        assert got is not None and torch.equal(got, compressible(0))
        for i in range(100, 103):
            assert c.get(key(i)) is None
        for _ in range(7):
            assert c.lookup([key(19)]) == 1
        stats = c.stats()
    with grpc.insecure_channel(srv.address) as channel:
        lookup = client_stubs(channel)["Lookup"]
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as err:
                lookup(pb.KeysRequest(namespace=NAMESPACE, keys=[b"short"]), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # A call's counters move as its handler returns, which may be a moment after the
    # client has its answer.
    deadline = time.monotonic() + 10
    while True:
        after = scrape(port)
        counted = value(after, "kvstore_requests_total", rpc="Lookup", code="INVALID_ARGUMENT")
        if (
            counted - value(before, "kvstore_requests_total", rpc="Lookup", code="INVALID_ARGUMENT")
            >= 2
        ):
            break
        assert time.monotonic() < deadline, "the failed calls were not counted"
        time.sleep(0.05)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # 20 puts of 1 MiB into 8 MiB of cpu: 12 went down to ssd through zstd.
    assert delta("kvstore_tier_evictions_total", tier="cpu") == 12 + 1  # + 1 for the promotion
    assert delta("kvstore_tier_demotions_total", tier="cpu") == 13
    assert delta("kvstore_codec_raw_bytes_total", codec="zstd") == 13 * MiB
    # No ssd writer (--ssd-write-ahead 0): every one of them was written at its eviction.
    assert delta("kvstore_ssd_writes_total", how="at_eviction") == 13
    assert value(after, "kvstore_ssd_writes_total", how="ahead") == 0
    assert value(after, "kvstore_ssd_writer_encoded_total", on="host") == 0
    encoded = delta("kvstore_codec_encoded_bytes_total", codec="zstd")
    assert 0 < encoded < 13 * MiB / 4
    assert delta("kvstore_tier_hits_total", tier="cpu") == 5
    assert delta("kvstore_tier_hits_total", tier="ssd") == 1
    assert delta("kvstore_tier_promotions_total", tier="cpu") == 1
    assert delta("kvstore_tier_misses_total", tier="ssd") == 3
    # The cpu tier missed the three unknown keys and the one it had demoted.
    assert delta("kvstore_tier_misses_total", tier="cpu") == 4
    assert value(after, "kvstore_tier_entries", tier="cpu") == 8
    assert value(after, "kvstore_tier_entries", tier="ssd") == 13
    assert value(after, "kvstore_entries") == 20
    assert value(after, "kvstore_tier_used_bytes", tier="cpu") == stats.tiers["cpu"].used_bytes
    # Requests: counted per RPC and code; the latency histogram counts the same calls.
    assert delta("kvstore_requests_total", rpc="Lookup", code="OK") == 7
    assert delta("kvstore_requests_total", rpc="Lookup", code="INVALID_ARGUMENT") == 2
    assert delta("kvstore_request_duration_seconds_count", rpc="Lookup") == 9
    assert delta("kvstore_request_duration_seconds_bucket", rpc="Lookup", le="+Inf") == 9
    assert delta("kvstore_requests_total", rpc="Stats", code="OK") >= 1
    assert value(after, "kvstore_leases", kind="read") == 0
    assert value(after, "kvstore_leases", kind="put") == 0
    # Over the socket each put reserves arena slots, is written in place, then committed.
    assert delta("kvstore_requests_total", rpc="Reserve", code="OK") == 20
    assert delta("kvstore_requests_total", rpc="Commit", code="OK") == 20
    assert stats.codecs["zstd"][0] == 13 * MiB


def test_health_port_answers_health_and_nothing_else(observed) -> None:  # type: ignore[no-untyped-def]
    _, _, port = observed
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        for service in ("", "kvstore.v1.KVStore"):
            reply = HealthStub(channel).Check(HealthCheckRequest(service=service), timeout=10)
            assert reply.status == HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            client_stubs(channel)["Stats"](pb.StatsRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_json_logs_carry_the_request_id(observed) -> None:  # type: ignore[no-untyped-def]
    srv, _, _ = observed
    with grpc.insecure_channel(srv.address) as channel:
        with pytest.raises(grpc.RpcError):
            client_stubs(channel)["Delete"](
                pb.KeysRequest(namespace="", keys=[key(1)]),
                metadata=(("x-request-id", "req-abc-123"),),
                timeout=10,
            )
        client_stubs(channel)["Stats"](pb.StatsRequest(), timeout=10)
    srv.stop()
    records = [json.loads(line) for line in srv.log().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    failed = [r for r in records if r.get("request_id") == "req-abc-123"]
    assert failed and failed[0]["rpc"] == "Delete" and failed[0]["level"] == "info"
    assert "INVALID_ARGUMENT" in failed[0]["message"]
    stats_calls = [r for r in records if r.get("rpc") == "Stats"]
    assert stats_calls and all(len(r["request_id"]) == 16 for r in stats_calls)
    assert any("stopped" in r["message"] for r in records)


def test_dashboard_queries_only_metrics_the_server_exposes(observed) -> None:  # type: ignore[no-untyped-def]
    import re

    srv, port, _ = observed
    with srv.client() as c:
        c.put(key(1), compressible(1))
        c.lookup([key(1)])
    exposed = {name for name, _ in scrape(port)}
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [
        t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", []) if "expr" in t
    ]
    used = {m for e in exprs for m in re.findall(r"\bkvstore_[a-z_]+", e)}
    assert used, "the dashboard queries no kvstore metric"
    assert used <= exposed, sorted(used - exposed)


def test_cancelled_streams_are_counted_without_errors(start_server) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    srv = start_server("--cpu-bytes", "256MiB", "--metrics-listen", f"127.0.0.1:{port}")
    with srv.client() as c:
        c.put(key(1), torch.zeros(64 * MiB, dtype=torch.uint8))
    with grpc.insecure_channel(srv.address, options=GRPC_OPTIONS) as channel:
        get = client_stubs(channel)["Get"]
        for _ in range(3):  # the client goes away after the first of 16 pieces
            stream = get(pb.GetRequest(namespace=NAMESPACE, key=key(1), shared=False))
            next(stream)
            stream.cancel()
    deadline = time.monotonic() + 10
    while value(scrape(port), "kvstore_requests_total", rpc="Get", code="CANCELLED") < 3:
        assert time.monotonic() < deadline, "the cancelled calls were not counted"
        time.sleep(0.05)
    srv.stop()
    log = srv.log()
    # gRPC itself may log a failed write to a stream its client left (ExecuteBatchError);
    # what must not appear is an exception of ours left in a task.
    assert "never retrieved" not in log and "ValueError" not in log, log[-2000:]
