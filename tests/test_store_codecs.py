"""The ssd tier storing values through codecs: `--codec` rules by namespace, demotion
encodes, promotion decodes, the index rebuilt from encoded records, damage detected."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from kvstore.codecs import decode_header
from kvstore.codecs.container import checksum
from kvstore.codecs.values import tensor_bytes
from kvstore.config import ConfigError, ServerConfig
from kvstore.dtypes import dtype_name
from kvstore.errors import DataLoss
from kvstore.store import Store
from kvstore.tiers.ssd import record_key
from tests.conftest import MakeStore

MiB = 1 << 20
NS = "llama-3-8b/bf16/tp0of1"
OTHER = "mistral-7b/bf16/tp0of1"
CPU_SLOTS = 4  # cpu_bytes=4MiB holds four 1 MiB values


def key(i: int) -> bytes:
    return i.to_bytes(32, "big")


def kv_value(i: int) -> torch.Tensor:
    """1 MiB of bf16 KV, [layers, 2, tokens, heads, head_dim], smooth enough to compress."""
    g = torch.Generator().manual_seed(i)
    base = torch.randn(4, 2, 1, 4, 64, generator=g)
    return (base + 0.01 * torch.randn(4, 2, 256, 4, 64, generator=g)).to(torch.bfloat16)


def put(store: Store, k: bytes, t: torch.Tensor, ns: str = NS) -> str:
    data = bytes(tensor_bytes(t))
    dtype = dtype_name(t)
    res = store.begin_put(ns, k, dtype, list(t.shape), len(data), checksum(data))
    res.write(data)
    return res.commit()


def read(store: Store, k: bytes, ns: str = NS) -> torch.Tensor | None:
    lease = store.get(ns, k)
    if lease is None:
        return None
    with lease:
        assert lease.view is not None
        dt = getattr(torch, lease.header.dtype)
        return torch.frombuffer(bytearray(lease.view), dtype=dt).view(lease.header.shape)


def stored_header(store: Store, k: bytes, ns: str = NS):  # type: ignore[no-untyped-def]
    assert store.ssd is not None
    with store.ssd.env.begin(db=store.ssd._meta) as txn:
        raw = txn.get(record_key(ns, k))
    assert raw is not None
    return decode_header(raw)[0]


def fill_past_cpu(store: Store, ns: str = NS) -> dict[int, torch.Tensor]:
    """Put CPU_SLOTS + 2 values: the first two are demoted to ssd."""
    values = {i: kv_value(i) for i in range(CPU_SLOTS + 2)}
    for i, t in values.items():
        put(store, key(i), t, ns)
    return values


def test_zstd_rule_encodes_demoted_values_and_they_read_back_exact(
    make_store: MakeStore,
) -> None:
    store = make_store(codec=("ssd=zstd",))
    values = fill_past_cpu(store)
    h = stored_header(store, key(0))
    assert h.codec == 1 and h.param_dict() == {"level": "1", "shuffle": "1"}
    assert h.payload_len < 0.8 * h.value_len  # smaller on disk than in memory
    assert h.value_checksum == checksum(tensor_bytes(values[0]))  # lossless: same value
    for i, t in values.items():
        assert torch.equal(read(store, key(i)), t)


def test_rules_pick_the_codec_by_namespace(make_store: MakeStore) -> None:
    store = make_store(codec=("ssd=raw", "ssd[llama-*]=zstd:level=1"))
    fill_past_cpu(store, NS)
    fill_past_cpu(store, OTHER)  # evicts the rest of NS too
    assert stored_header(store, key(0), NS).codec == 1
    assert stored_header(store, key(0), OTHER).codec == 0


def test_index_rebuilds_from_encoded_records(make_store: MakeStore) -> None:
    store = make_store(codec=("ssd=zstd",))
    values = fill_past_cpu(store)
    store.persist(lambda: False)
    store.close()
    again = make_store(codec=())  # decoding needs no rule: the record names its codec
    for i, t in values.items():
        assert torch.equal(read(again, key(i)), t)


def test_corrupt_encoded_record_is_dropped_not_served(make_store: MakeStore) -> None:
    store = make_store(codec=("ssd=zstd",))
    fill_past_cpu(store)
    assert store.ssd is not None
    rkey = record_key(NS, key(0))
    with store.ssd.env.begin(write=True, db=store.ssd._data) as txn:
        data = bytearray(txn.get(rkey))
        data[len(data) // 2] ^= 0x40
        txn.put(rkey, bytes(data))
    with pytest.raises(DataLoss):
        read(store, key(0))
    assert store.exists(NS, [key(0)]) == [False]
    assert torch.equal(read(store, key(1)), kv_value(1))


def test_bad_rules_are_refused_at_start(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for rule, match in (
        ("cpu=zstd", "memory tiers keep values raw"),
        ("ssd=lz4", "unknown codec"),
        ("ssd=zstd:level=99", "1-19"),
        ("ssd", "TIER=SPEC"),
    ):
        with pytest.raises(ConfigError, match=match):
            ServerConfig(data_dir=tmp_path, codec=(rule,))


def test_lossy_rule_serves_the_decoded_value_and_checks_it(make_store: MakeStore) -> None:
    store = make_store(codec=("ssd[llama-*]=int8",))
    values = fill_past_cpu(store)
    h = stored_header(store, key(0))
    assert h.codec == 2 and h.payload_len < 0.6 * h.value_len
    assert h.value_checksum != checksum(tensor_bytes(values[0]))  # the decoded value's
    for i in (0, 1):  # demoted: what int8 gives back, checked against its own checksum
        got = read(store, key(i))
        assert got is not None and not torch.equal(got, values[i])
        err = (got.float() - values[i].float()).norm() / values[i].float().norm()
        assert err < 0.02
    store.persist(lambda: False)
    store.close()
    again = make_store(codec=("ssd[llama-*]=int8",))
    assert read(again, key(5)) is not None  # rebuilt entries carry the decoded checksum


def test_values_a_lossy_codec_cannot_take_are_stored_raw(make_store: MakeStore) -> None:
    store = make_store(codec=("ssd=kivi:bits=2",))
    flat = {i: torch.arange(MiB // 2, dtype=torch.int16) + i for i in range(CPU_SLOTS + 2)}
    for i, t in flat.items():
        put(store, key(i), t)
    assert stored_header(store, key(0)).codec == 0
    for i, t in flat.items():
        assert torch.equal(read(store, key(i)), t)


class SlowDecode:
    """`kvstore.store.decode_stored` that says when it starts and waits to be let go."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import kvstore.store as st

        self.started, self.go = threading.Event(), threading.Event()
        self.decoding = 0  # how many have started
        real = st.decode_stored

        def slow(*args: object) -> None:
            self.decoding += 1
            self.started.set()
            assert self.go.wait(10)
            real(*args)  # type: ignore[arg-type]

        monkeypatch.setattr(st, "decode_stored", slow)


def cpu(store: Store):  # type: ignore[no-untyped-def]
    return next(t for t in store.stats().tiers if t.name == "cpu")


def tier(store: Store, k: bytes) -> str:
    return next(e.tier for e in store.entries(NS) if e.key == k)


def hits(store: Store) -> dict[str, int]:
    return {t.name: t.counters.hits for t in store.stats().tiers}


def reading(store: Store, k: bytes) -> tuple[threading.Thread, list[object]]:
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(read(store, k)))
    t.start()
    return t, got


def test_a_value_decodes_from_ssd_outside_the_store_lock(
    make_store: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A codec takes milliseconds a value (cachegen-x ~100): while one decodes, the store
    serves everything else, and the promoted value is what the codec gives back."""
    store = make_store(codec=("ssd=zstd",))
    values = fill_past_cpu(store)
    slow = SlowDecode(monkeypatch)
    promotions = cpu(store).counters.promotions
    t, got = reading(store, key(0))
    assert slow.started.wait(10)
    assert store._lock.acquire(timeout=1)  # not held across the decode
    store._lock.release()
    assert torch.equal(read(store, key(5)), values[5])  # other reads and writes go on
    put(store, key(99), kv_value(99))
    slow.go.set()
    t.join(10)
    assert torch.equal(got[0], values[0])  # type: ignore[arg-type]
    assert cpu(store).counters.promotions == promotions + 1
    assert tier(store, key(0)) == "cpu"


def test_a_value_deleted_or_replaced_while_it_decodes(
    make_store: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read that was decoding answers what the store holds once it is done (nothing, or
    the new value), and what it took for the promotion is given back; a read that ends a
    miss counts one, not the ssd hit it started as."""
    store = make_store(codec=("ssd=zstd",))
    fill_past_cpu(store)
    slow = SlowDecode(monkeypatch)
    before = {t.name: (t.counters.hits, t.counters.misses) for t in store.stats().tiers}
    t, got = reading(store, key(0))
    assert slow.started.wait(10)
    assert store.delete(NS, [key(0)]) == 1
    slow.go.set()
    t.join(10)
    assert got == [None]
    assert cpu(store).used_bytes == cpu(store).entries * MiB  # its slot went back
    after = {t.name: (t.counters.hits, t.counters.misses) for t in store.stats().tiers}
    assert after == {name: (h, m + 1) for name, (h, m) in before.items()}  # a miss everywhere

    slow.go.clear(), slow.started.clear()
    before = hits(store)
    t, got = reading(store, key(1))
    assert slow.started.wait(10)
    put(store, key(1), kv_value(77))  # replaced while the old one decodes
    slow.go.set()
    t.join(10)
    assert torch.equal(got[0], kv_value(77))  # type: ignore[arg-type]
    # One get, one hit: the read started again (it finds the new value in cpu) is not
    # counted a second time.
    assert hits(store) == {**before, "ssd": before["ssd"] + 1}


def test_two_readers_promote_a_value_once(
    make_store: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(codec=("ssd=zstd",))
    values = fill_past_cpu(store)
    slow = SlowDecode(monkeypatch)
    before = cpu(store).counters.promotions
    found = hits(store)
    readers = [reading(store, key(0)) for _ in range(2)]
    deadline = time.monotonic() + 10
    while slow.decoding < 2 and time.monotonic() < deadline:  # both read it from ssd
        time.sleep(0.01)
    assert slow.decoding == 2
    slow.go.set()
    for t, got in readers:
        t.join(10)
        assert torch.equal(got[0], values[0])  # type: ignore[arg-type]
    assert cpu(store).counters.promotions == before + 1
    # Both found it on ssd; the one whose promotion came second reads the cpu copy the
    # other made without counting that get again.
    assert hits(store) == {**found, "ssd": found["ssd"] + 2}
    assert tier(store, key(0)) == "cpu"
