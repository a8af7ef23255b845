"""The store with a remote tier: two stores (two nodes) sharing a real Redis Cluster."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _redis_cluster import LocalCluster
from redis.crc import key_slot

from kvstore.codecs.container import CODEC_RAW, ValueHeader, checksum
from kvstore.config import ServerConfig
from kvstore.remote_writes import PendingWrite, WriteQueue
from kvstore.store import Store
from kvstore.tiers.remote import header_key
from tests.test_store import NS, key, put, read
from tests.test_store_gpu import put_gpu

KiB = 1 << 10
MakeNode = Callable[..., Store]


@pytest.fixture
def make_node(tmp_path: Path, redis_cluster: LocalCluster) -> MakeNode:
    """`make_node(name, **settings)`: a store with a cpu tier and the remote tier on the
    shared cluster; every node's remote records are gone after the test."""
    opened: list[Store] = []

    def make(name: str, **overrides: object) -> Store:
        settings: dict[str, object] = {
            "data_dir": tmp_path / name,
            "tiers": ("cpu", "remote"),
            "cpu_bytes": "4MiB",
            "remote": tuple(redis_cluster.urls),
            "remote_piece_bytes": "4KiB",
            "remote_backoff": 0.5,
        }
        settings.update(overrides)
        s = Store(ServerConfig(**settings))  # type: ignore[arg-type]
        opened.append(s)
        return s

    yield make  # type: ignore[misc]
    for s in opened:
        s.close()
    for node in redis_cluster.nodes:
        if node.proc is not None:
            with node.client() as c:
                c.flushall()


def wait_for(what: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def data(n: int) -> bytes:
    return os.urandom(n)


def test_a_put_on_one_node_is_served_by_another(make_node: MakeNode) -> None:
    a, b = make_node("a"), make_node("b")
    values = {key(i): data(10 * KiB + i) for i in range(6)}
    for k, v in values.items():
        put(a, k, v)
    assert a.remote is not None and b.remote is not None
    wait_for(lambda: all(a.remote.exists_many(NS, list(values))))  # type: ignore[union-attr]
    assert b.lookup_tiers(NS, list(values)) == ["remote"] * 6
    assert b.lookup(NS, [*values, key(99)]) == 6
    assert b.exists(NS, [key(0), key(99)]) == [True, False]
    assert read(b, key(0)) is None  # get alone reads local tiers; fetch_remote brings them
    assert b.fetch_remote(NS, [*values, key(99)]) == 6
    for k, v in values.items():
        assert read(b, k) == v
    assert b.lookup_tiers(NS, list(values)) == ["cpu"] * 6
    assert all(e.on_remote for e in b.entries(NS))
    # Events and `kvstore ls` name local copies only: every node "holds" the shared tier.
    assert all(e.tiers == ("cpu",) for e in b.entries(NS))
    time.sleep(0.3)
    assert b.stats().remote.counters.values_written == 0  # type: ignore[union-attr]
    stats = a.stats().remote
    assert stats is not None and stats.counters.values_written == 6 and stats.connected


def test_lookup_continues_the_local_prefix_through_remote(make_node: MakeNode) -> None:
    a, b = make_node("a"), make_node("b")
    keys = [key(i) for i in range(5)]
    for k in keys:
        put(a, k, data(KiB))
    wait_for(lambda: all(a.remote.exists_many(NS, keys)))  # type: ignore[union-attr]
    put(b, keys[0], data(KiB))
    put(b, keys[1], data(KiB))
    put(b, keys[3], data(KiB))
    assert b.lookup_tiers(NS, keys) == ["cpu", "cpu", "remote", "remote", "remote"]
    assert b.lookup_tiers(NS, [*keys[:2], key(50), *keys[2:]]) == ["cpu", "cpu"]


def test_delete_through_a_node_deletes_the_remote_copy(make_node: MakeNode) -> None:
    a, b = make_node("a"), make_node("b")
    put(a, key(1), data(KiB))
    wait_for(lambda: a.remote.exists_many(NS, [key(1)]) == [True])  # type: ignore[union-attr]
    assert b.delete(NS, [key(1), key(2)]) == 1  # only remote held it
    assert a.remote.exists_many(NS, [key(1)]) == [False]  # type: ignore[union-attr]
    assert a.delete(NS, [key(1)]) == 1  # a's local copy


def test_evict_mode_writes_only_values_leaving_the_node(make_node: MakeNode) -> None:
    a = make_node("a", remote_write="evict")
    big = 1 << 20  # the 4 MiB arena holds four
    values = [data(big) for _ in range(6)]
    for i, v in enumerate(values[:4]):
        put(a, key(i), v)
    time.sleep(0.5)
    assert a.remote is not None
    assert a.remote.exists_many(NS, [key(i) for i in range(4)]) == [False] * 4
    for i, v in enumerate(values[4:], start=4):
        put(a, key(i), v)  # evicts the two least recent: key(0), key(1)
    wait_for(lambda: a.remote.exists_many(NS, [key(0), key(1)]) == [True, True])  # type: ignore[union-attr]
    assert a.remote.exists_many(NS, [key(i) for i in range(2, 6)]) == [False] * 4
    assert a.fetch_remote(NS, [key(0)]) == 1  # fetched back (evicting key(2), written back)
    assert read(a, key(0)) == values[0]
    wait_for(lambda: a.remote.exists_many(NS, [key(2)]) == [True])  # type: ignore[union-attr]
    written = a.stats().remote.counters.values_written  # type: ignore[union-attr]
    for i in range(6, 10):  # evicts key(0) again: it came from remote, so not written
        put(a, key(i), data(big))
    wait_for(lambda: a.stats().remote.counters.values_written >= written + 3)  # type: ignore[union-attr]
    time.sleep(0.3)
    assert a.stats().remote.counters.values_written == written + 3  # type: ignore[union-attr]


def test_remote_codec_rule_encodes_what_remote_stores(make_node: MakeNode) -> None:
    a = make_node("a", codec=("remote=zstd",))
    b = make_node("b")
    v = bytes(64 * KiB)  # compresses well
    put(a, key(7), v)
    assert a.remote is not None and b.remote is not None
    wait_for(lambda: a.remote.exists_many(NS, [key(7)]) == [True])
    [stored] = b.remote.get_many(NS, [key(7)])
    assert stored is not None and stored.header.codec != CODEC_RAW
    assert stored.header.payload_len < len(v) // 10
    assert b.fetch_remote(NS, [key(7)]) == 1
    assert read(b, key(7)) == v


@pytest.mark.parametrize("mode", ["through", "evict"])
def test_the_newest_chunk_of_a_sequence_is_coded_finer_on_remote(
    make_node: MakeNode, mode: str
) -> None:
    """Written through at put, or captured from the cpu tier on eviction: a value put as
    the newest of its sequence goes through the codec's `for_newest()` (level 0 here)."""
    from tests.test_store_codecs import kv_value

    a = make_node("a", codec=("remote=cachegen:level=3,newest=0",), remote_write=mode)
    for i in range(2):
        t = kv_value(i)
        raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        res = a.begin_put(
            NS, key(i), "bfloat16", list(t.shape), len(raw), checksum(raw), newest=i == 1
        )  # fmt: skip
        res.write(raw)
        res.commit()
    if mode == "evict":
        for i in range(2, 8):  # 6 MiB more through the 4 MiB cpu tier: 0 and 1 leave it
            put(a, key(i), data(1 << 20))
    assert a.remote is not None
    wait_for(lambda: a.remote.exists_many(NS, [key(0), key(1)]) == [True, True])
    levels = [a.remote.get_many(NS, [key(i)])[0].header.param_dict()["level"] for i in (0, 1)]
    assert levels == ["3", "0"]


def test_a_batch_of_encoded_values_decodes_and_drops_the_one_that_does_not(
    make_node: MakeNode,
) -> None:
    """Encoded values fetched in one batch decode in parallel into their reservations; one
    whose pieces are intact but whose payload does not decode is dropped, here and on the
    cluster, and the others land."""
    a = make_node("a", codec=("remote=zstd",), cpu_bytes="16MiB")
    b = make_node("b", cpu_bytes="16MiB")
    assert a.remote is not None and b.remote is not None
    values = {key(40 + i): bytes([i]) * (64 * KiB) + data(KiB) for i in range(12)}
    for k, v in values.items():
        put(a, k, v)
    wait_for(lambda: all(a.remote.exists_many(NS, list(values))))  # type: ignore[union-attr]
    garbage = data(4 * KiB)  # intact pieces, but no zstd frame
    value = data(65 * KiB)  # the others' size class: its reservation finds room
    header = ValueHeader(
        "uint8", (len(value),), len(value), checksum(value),
        codec=1, payload_len=len(garbage), payload_checksum=checksum(garbage),
    )  # fmt: skip
    assert b.remote.put_many([(NS, key(60), header, garbage)]) == [True]
    assert b.fetch_remote(NS, [*values, key(60)]) == len(values)
    for k, v in values.items():
        assert read(b, k) == v
    assert b.exists(NS, [key(60)], remote=False) == [False]  # dropped here and remotely
    assert b.remote.exists_many(NS, [key(60)]) == [False]
    assert b.corrupt["remote"] == 1


def test_a_value_this_server_cannot_decode_stays_on_the_cluster(
    make_node: MakeNode,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A cachegen-x value fetched by a server that has not loaded its cross-layer maps is
    intact, not corrupt: it is not stored here, and it stays on the cluster for the
    servers that can decode it (it used to be deleted from the cluster); the server warns
    about that once per reason, not once per value."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "codecs"))
    from cross_fixture import LayeredKV

    from kvstore.codecs import cachegen_profile as cp

    world = LayeredKV(4, 2, 64, seed=7)
    profile = world.profile_file(tmp_path / "p.json")
    a = make_node("a", codec=(f"remote=cachegen:level=1,profile={profile}",), cpu_bytes="16MiB")
    b = make_node("b", cpu_bytes="16MiB")
    assert a.remote is not None and b.remote is not None
    t = world.tensor(256, 0, seed=3)
    raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    res = a.begin_put(NS, key(70), "float16", list(t.shape), len(raw), checksum(raw), position=0)
    res.write(raw)
    res.commit()
    wait_for(lambda: a.remote.exists_many(NS, [key(70)]) == [True])  # type: ignore[union-attr]
    stored = a.remote.get_many(NS, [key(70)])[0].header
    assert stored.codec != CODEC_RAW

    monkeypatch.setattr(cp, "_registry", {})  # b's process has not loaded the maps
    with caplog.at_level(logging.DEBUG, logger="kvstore.store"):
        assert b.fetch_remote(NS, [key(70)]) == 0
        assert b.fetch_remote(NS, [key(70)]) == 0  # again: not warned about again
    kept = [r for r in caplog.records if "kept" in r.getMessage()]
    assert [r.levelno for r in kept] == [logging.WARNING, logging.DEBUG]
    assert b.exists(NS, [key(70)], remote=False) == [False]
    assert b.remote.exists_many(NS, [key(70)]) == [True]  # kept on the cluster
    assert b.corrupt["remote"] == 0

    monkeypatch.undo()  # with the maps loaded it decodes (to what the codec gives back)
    assert b.fetch_remote(NS, [key(70)]) == 1
    got = read(b, key(70))
    assert got is not None and checksum(got) == stored.value_checksum


def test_remote_write_off_only_reads(make_node: MakeNode) -> None:
    a, b = make_node("a"), make_node("b", remote_write="off")
    put(b, key(3), data(KiB))
    time.sleep(0.5)
    assert b.remote is not None and b.remote.exists_many(NS, [key(3)]) == [False]
    put(a, key(4), data(KiB))
    wait_for(lambda: b.remote.exists_many(NS, [key(4)]) == [True])  # type: ignore[union-attr]
    assert b.fetch_remote(NS, [key(4)]) == 1


def test_write_queue_drops_the_oldest_when_full() -> None:
    q = WriteQueue(10 * KiB)
    for i in range(5):
        q.push(PendingWrite(NS, key(i), 3 * KiB))
    assert q.depth == 3 and q.dropped == 2 and q.queued_bytes == 9 * KiB
    q.push(PendingWrite(NS, key(9), 11 * KiB))  # larger than the whole queue
    assert q.dropped == 3
    q.discard(NS, {key(3)})
    assert [i.key for i in q.take(1 << 30, 0)] == [key(2), key(4)]
    assert q.take(1 << 30, 0) == []


def test_fetched_value_is_checked_against_its_checksum(make_node: MakeNode) -> None:
    a, b = make_node("a"), make_node("b")
    v = data(9 * KiB)
    put(a, key(5), v)
    wait_for(lambda: a.remote.exists_many(NS, [key(5)]) == [True])  # type: ignore[union-attr]
    assert b.fetch_remote(NS, [key(5)]) == 1
    e = next(e for e in b.entries(NS) if e.key == key(5))
    assert e.checksum == checksum(v)


def test_a_hung_master_costs_the_deadline_and_leaks_no_room(
    make_node: MakeNode, redis_cluster: LocalCluster
) -> None:
    """Reads from a master that stops answering give up at the deadline, the other
    masters' keys are served, and nothing is left reserved."""
    a = make_node("a")
    b = make_node("b", remote_timeout=0.5)
    values = {key(i): data(64 * KiB) for i in range(24)}
    for k, v in values.items():
        put(a, k, v)
    wait_for(lambda: all(a.remote.exists_many(NS, list(values))))  # type: ignore[union-attr]
    assert b.remote is not None
    hung = [redis_cluster.owner(key_slot(header_key(b.remote.prefix, NS, k))) == 2 for k in values]
    assert 0 < sum(hung) < len(values)
    redis_cluster.pause(2)
    try:
        started = time.monotonic()
        placed = b.fetch_remote(NS, list(values))
        assert time.monotonic() - started < 3 * 0.5 + 0.5
        assert placed == len(values) - sum(hung)
    finally:
        redis_cluster.resume(2)
    for (k, v), gone in zip(values.items(), hung, strict=True):
        assert read(b, k) == (None if gone else v)
    cpu = next(t for t in b.stats().tiers if t.name == "cpu")
    assert cpu.entries == len(values) - sum(hung)
    wait_for(lambda: b.fetch_remote(NS, list(values)) >= 0 and b.lookup(NS, list(values)) == 24)
    assert b.lookup_tiers(NS, list(values)) == ["cpu"] * 24  # served again after the backoff
    for k, v in values.items():
        assert read(b, k) == v
    assert b._staging_used == 0 and b.stats().leases == 0


def test_write_through_reads_a_value_from_a_gpu_pool(make_node: MakeNode) -> None:
    """A value a GPU client put in a pool (the host twin here) is written through from
    the pool; another node reads it back."""
    a = make_node("a", tiers=("gpu", "cpu", "remote"), gpu_twin=True, gpu_bytes="4MiB")
    b = make_node("b")
    v = data(20 * KiB)
    assert put_gpu(a, key(11), v) == "gpu"
    wait_for(lambda: a.remote.exists_many(NS, [key(11)]) == [True])  # type: ignore[union-attr]
    assert b.fetch_remote(NS, [key(11)]) == 1
    assert read(b, key(11)) == v
