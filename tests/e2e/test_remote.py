"""Two `kvstore-server` processes sharing a real 3-master Redis Cluster (the remote tier)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from _redis_cluster import LocalCluster, _free_port
from redis.crc import key_slot

from kvstore.client import AsyncKVClient, KVClient, PrefixTiers
from kvstore.tiers.remote import DEFAULT_PREFIX, decode_record, header_key, piece_key

from .conftest import NAMESPACE, ServerProcess
from .helpers import key, random_tensor
from .test_cli import admin_cli, server_cli
from .test_metrics import free_port, scrape
from .test_metrics import value as metric

StartServer = Callable[..., ServerProcess]


@pytest.fixture
def start_node(
    start_server: StartServer, redis_cluster: LocalCluster
) -> Iterator[Callable[..., ServerProcess]]:
    """`start_node(name, *flags)`: a server with cpu and the shared remote tier."""

    def start(name: str, *flags: str) -> ServerProcess:
        return start_server(
            "--tiers", "cpu,remote",
            "--cpu-bytes", "64MiB",
            "--remote", ",".join(redis_cluster.urls),
            "--remote-piece-bytes", "64KiB",
            "--remote-timeout", "0.5",
            "--remote-backoff", "0.5",
            *flags,
            name=name,
        )  # fmt: skip

    yield start
    for node in redis_cluster.nodes:
        if node.proc is not None:
            with node.client() as c:
                c.flushall()


def wait_written(c: KVClient, n: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        remote = c.stats().remote
        assert remote is not None
        if remote.values_written >= n:
            return
        assert time.monotonic() < deadline, f"only {remote.values_written} of {n} written"
        time.sleep(0.05)


def chunks(n: int, seed: int = 0) -> list[torch.Tensor]:
    # 200 KiB each: several pieces of 64 KiB and a partial one.
    return [random_tensor((2, 4, 100, 128), torch.float16, seed + i) for i in range(n)]


def same(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    """Byte-equal (random float bytes hold NaNs, which torch.equal calls unequal)."""
    return (
        a is not None
        and a.dtype == b.dtype
        and a.shape == b.shape
        and bytes(a.contiguous().view(torch.uint8).numpy())
        == bytes(b.contiguous().view(torch.uint8).numpy())
    )


def owner(cluster: LocalCluster, k: bytes) -> int:
    return cluster.owner(key_slot(header_key(DEFAULT_PREFIX, NAMESPACE, k)))


def test_a_prefix_put_through_node_a_is_served_by_node_b(start_node: StartServer) -> None:
    a, b = start_node("a"), start_node("b")
    values = chunks(8)
    keys = [key(i) for i in range(8)]
    with a.client() as ca, b.client() as cb:
        for k, v in zip(keys, values, strict=True):
            ca.put(k, v)
        wait_written(ca, 8)
        assert cb.lookup(keys) == 8
        hit = cb.lookup_tiers([*keys, key(99)])
        assert hit.tiers == ("remote",) * 8 and hit.local == 0
        assert cb.exists([keys[0], key(99)]) == [True, False]
        assert ca.lookup_tiers(keys).tiers == ("cpu",) * 8

        async def async_lookup() -> PrefixTiers:
            async with AsyncKVClient(b.address, NAMESPACE) as ac:
                return await ac.lookup_tiers([*keys[:3], key(99)])

        assert asyncio.run(async_lookup()) == PrefixTiers(("remote",) * 3)

        got = cb.get(keys[0])  # Get
        assert got is not None and same(got, values[0])
        batch = cb.batch_get(keys[1:3])  # BatchGet
        assert all(same(g, v) for g, v in zip(batch, values[1:3], strict=True))  # type: ignore[arg-type]
        out = [torch.empty_like(v) for v in values[3:]]  # same-host, shared memory
        assert cb.get_into(keys[3:], out).wait() == [True] * 5
        assert all(same(o, v) for o, v in zip(out, values[3:], strict=True))

        assert cb.lookup_tiers(keys).tiers == ("cpu",) * 8  # promoted on node B
        stats = cb.stats()
        assert stats.remote is not None and stats.remote.connected
        assert stats.remote.hits == 8 and stats.remote.values_written == 0  # never written back
        assert cb.delete(keys[:2]) == 2  # B's copy and the remote one
    with a.client() as ca:
        assert ca.lookup_tiers(keys).tiers[:2] == ("cpu", "cpu")  # A keeps its own
    with start_node("c").client() as cc:
        assert cc.lookup(keys) == 0  # the remote copy of keys[0] is gone
        assert cc.lookup(keys[2:]) == 6


def test_a_killed_master_turns_its_keys_into_misses(
    start_node: StartServer, redis_cluster: LocalCluster
) -> None:
    a, b = start_node("a"), start_node("b")
    keys = [key(i) for i in range(30)]
    values = chunks(30, seed=100)
    lost = [owner(redis_cluster, k) == 1 for k in keys]
    assert 0 < sum(lost) < len(keys)
    with a.client() as ca:
        for k, v in zip(keys, values, strict=True):
            ca.put(k, v)
        wait_written(ca, 30)
    redis_cluster.kill(1)
    try:
        with b.client() as cb:
            started = time.monotonic()
            got = cb.batch_get(keys)
            assert time.monotonic() - started < 5.0  # deadline 0.5s, not a hang
            for g, v, gone in zip(got, values, lost, strict=True):
                if gone:
                    assert g is None
                else:
                    assert g is not None and same(g, v)
            first_lost = keys[lost.index(True)]
            started = time.monotonic()
            assert cb.get(first_lost) is None  # skipped at once while it is backing off
            assert cb.lookup([first_lost]) == 0
            assert time.monotonic() - started < 2.0
            remote = cb.stats().remote
            assert remote is not None and remote.errors >= 1 and remote.corrupt == 0
    finally:
        redis_cluster.restart(1)


def test_a_corrupted_piece_is_detected_and_dropped(
    start_node: StartServer, redis_cluster: LocalCluster
) -> None:
    port = free_port()
    a, b = start_node("a"), start_node("b", "--metrics-listen", f"127.0.0.1:{port}")
    value = chunks(1, seed=7)[0]
    with a.client() as ca:
        ca.put(key(1), value)
        wait_written(ca, 1)
    hkey = header_key(DEFAULT_PREFIX, NAMESPACE, key(1))
    with redis_cluster.nodes[owner(redis_cluster, key(1))].client() as r:
        rec = decode_record(r.get(hkey))
        pkey = piece_key(DEFAULT_PREFIX, NAMESPACE, key(1), rec.generation, 1)
        damaged = bytearray(r.get(pkey))
        damaged[100] ^= 0x40
        r.set(pkey, bytes(damaged))
    with b.client() as cb:
        assert cb.get(key(1)) is None
        remote = cb.stats().remote
        assert remote is not None and remote.corrupt == 1 and remote.hits == 0
    samples = scrape(port)
    assert metric(samples, "kvstore_remote_corrupt_dropped_total") == 1
    assert metric(samples, "kvstore_corrupt_dropped_total", tier="remote") == 1
    assert metric(samples, "kvstore_remote_connected") == 1
    assert metric(samples, "kvstore_remote_misses_total") >= 1
    with redis_cluster.nodes[owner(redis_cluster, key(1))].client() as r:
        assert r.exists(hkey, pkey) == 0


def test_evict_mode_writes_back_only_what_leaves_the_node(start_node: StartServer) -> None:
    a = start_node("a", "--remote-write", "evict", "--cpu-bytes", "4MiB")
    mib = [torch.full((1 << 20,), i, dtype=torch.uint8) for i in range(6)]
    with a.client() as ca:
        for i in range(4):  # the 4 MiB arena holds four
            ca.put(key(i), mib[i])
        time.sleep(1.0)
        remote = ca.stats().remote
        assert remote is not None and remote.values_written == 0
        ca.put(key(4), mib[4])
        ca.put(key(5), mib[5])  # key(0) and key(1) leave the node
        wait_written(ca, 2)
        time.sleep(0.5)
        remote = ca.stats().remote
        assert remote is not None and remote.values_written == 2
    with start_node("b").client() as cb:
        assert cb.lookup_tiers([key(0), key(1), key(2)]).tiers == ("remote", "remote")
        got = cb.get(key(0))
        assert got is not None and same(got, mib[0])


def test_server_starts_with_the_remote_down_and_serves_locally(
    start_server: StartServer,
) -> None:
    port = _free_port()
    srv = start_server(
        "--tiers", "cpu,remote", "--remote", f"redis://127.0.0.1:{port}",
        "--remote-timeout", "0.2",
    )  # fmt: skip
    with srv.client() as c:
        v = chunks(1)[0]
        c.put(key(1), v)
        got = c.get(key(1))
        assert got is not None and same(got, v)
        started = time.monotonic()
        assert c.get(key(2)) is None
        assert c.lookup([key(1), key(2)]) == 1
        assert time.monotonic() - started < 1.0
        remote = c.stats().remote
        assert remote is not None and not remote.connected
    assert "no cluster node answers" in srv.log()
    r = admin_cli("--address", srv.address, "stats", cwd=srv.data_dir.parent)
    assert r.returncode == 0 and "remote NOT CONNECTED" in r.stdout, r.stdout + r.stderr
    r = admin_cli("--address", srv.address, "stats", "--json", cwd=srv.data_dir.parent)
    assert r.returncode == 0, r.stderr
    remote = json.loads(r.stdout)["remote"]
    assert remote["connected"] is False and remote["misses"] >= 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--tiers", "cpu,remote", "--remote", "http://10.0.0.5:6379"), "not a Redis URL"),
        (("--tiers", "cpu,remote"), "give the cluster's URLs"),
        (("--remote", "redis://10.0.0.5:6379"), "tiers do not include remote"),
        (("--tiers", "cpu,remote", "--remote", "redis://h:1", "--remote-write", "x"), "invalid"),
    ],
)
def test_bad_remote_flags_are_clear_cli_errors(
    tmp_path: Path, flags: tuple[str, ...], message: str
) -> None:
    r = server_cli("--data-dir", str(tmp_path / "d"), *flags, cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr
