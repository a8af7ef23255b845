"""The tier manager: reservations, leases, demotion and promotion, pins, corruption, rebuild."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import kvstore.store as store_mod
from kvstore.codecs.container import checksum
from kvstore.errors import DataLoss, InvalidArgument, ResourceExhausted
from kvstore.keys import chunk_keys
from kvstore.store import Entry, Store
from kvstore.tiers.base import TierError
from kvstore.tiers.host import default_arena_path
from kvstore.tiers.ssd import record_key

MiB = 1 << 20
NS = "llama-3-8b/bf16/tp0of1"

# With cpu_bytes=4MiB the arena is one 4 MiB page, so it holds exactly four 1 MiB values;
# with ssd_bytes=16MiB the ssd tier holds fifteen (each costs 1 MiB plus a 4 KiB page).
CPU_SLOTS = 4
SSD_SLOTS = 15

MakeStore = Callable[..., Store]


def key(i: int) -> bytes:
    return i.to_bytes(32, "big")


def value(i: int, n: int = MiB) -> bytes:
    return bytes([i % 251]) * 8 + os.urandom(n - 8)


def put(store: Store, k: bytes, data: bytes, ns: str = NS) -> str:
    res = store.begin_put(ns, k, "uint8", [len(data)], len(data), checksum(data))
    res.write(data)
    return res.commit()


def read(store: Store, k: bytes, ns: str = NS) -> bytes | None:
    lease = store.get(ns, k)
    if lease is None:
        return None
    with lease:
        return bytes(lease.view)


def entry(store: Store, k: bytes, ns: str = NS) -> Entry:
    return next(e for e in store.entries(ns) if e.key == k)


def on_ssd_disk(store: Store, k: bytes, ns: str = NS) -> bool:
    """Whether the LMDB environment holds a record for the key, whatever the index says."""
    assert store.ssd is not None
    try:
        with store.ssd.read(ns, k):
            return True
    except KeyError:
        return False


def tier_stats(store: Store, name: str) -> Any:
    return next(t for t in store.stats().tiers if t.name == name)


@pytest.fixture
def store(make_store: MakeStore) -> Store:
    return make_store()


# ---------------------------------------------------------------- put / get


def test_put_get_round_trip(store: Store) -> None:
    data = value(1)
    assert put(store, key(1), data) == "cpu"
    lease = store.get(NS, key(1))
    assert lease is not None
    with lease:
        assert lease.tier == "cpu"
        assert bytes(lease.view) == data
        assert lease.header.dtype == "uint8"
        assert lease.header.shape == (MiB,)
        assert lease.header.payload_checksum == checksum(data)
        assert store.stats().leases == 1
    assert store.stats().leases == 0
    assert store.get(NS, key(2)) is None


def test_arena_lives_in_shm_until_close(make_store: MakeStore, tmp_path: Path) -> None:
    s = make_store()
    path = default_arena_path(tmp_path / "data")
    assert path.exists()
    assert path.stat().st_size == 4 * MiB
    s.close()
    assert not path.exists()


def test_reservation_is_invisible_until_commit(store: Store) -> None:
    data = value(1, 10_000)
    res = store.begin_put(NS, key(1), "uint8", [10_000], 10_000, checksum(data))
    assert res.tier == "cpu"
    assert store.exists(NS, [key(1)]) == [False]
    assert store.get(NS, key(1)) is None
    res.write(data[:3000])
    res.write(memoryview(data)[3000:])
    assert store.lookup(NS, [key(1)]) == 0
    assert res.commit() == "cpu"
    assert store.exists(NS, [key(1)]) == [True]
    assert read(store, key(1)) == data


def test_abort_frees_the_room(store: Store) -> None:
    data = value(1)
    res = store.begin_put(NS, key(1), "uint8", [MiB], MiB, checksum(data))
    assert store.cpu is not None
    assert store.cpu.used_bytes == MiB
    res.write(data)
    res.abort()
    res.abort()
    assert store.cpu.used_bytes == 0
    assert store.exists(NS, [key(1)]) == [False]


def test_commit_with_wrong_checksum_stores_nothing(store: Store) -> None:
    data = value(1)
    res = store.begin_put(NS, key(1), "uint8", [MiB], MiB, checksum(data) ^ 1)
    res.write(data)
    with pytest.raises(DataLoss, match="checksum"):
        res.commit()
    assert store.exists(NS, [key(1)]) == [False]
    assert store.cpu is not None and store.cpu.used_bytes == 0


def test_commit_of_short_value_stores_nothing(store: Store) -> None:
    data = value(1)
    res = store.begin_put(NS, key(1), "uint8", [MiB], MiB, checksum(data))
    res.write(data[:-1])
    with pytest.raises(InvalidArgument, match="ended after"):
        res.commit()
    assert store.exists(NS, [key(1)]) == [False]
    assert store.cpu is not None and store.cpu.used_bytes == 0


def test_write_past_announced_length_is_refused(store: Store) -> None:
    res = store.begin_put(NS, key(1), "uint8", [100], 100, 0)
    with pytest.raises(InvalidArgument, match="more than the 100 bytes"):
        res.write(b"x" * 101)
    res.abort()


@pytest.mark.parametrize(
    ("ns", "k", "dtype", "shape", "nbytes", "match"),
    [
        ("bad namespace", key(1), "uint8", [4], 4, "namespace"),
        ("", key(1), "uint8", [4], 4, "namespace"),
        ("-starts-with-dash", key(1), "uint8", [4], 4, "namespace"),
        (NS, b"short", "uint8", [4], 4, "32 bytes"),
        (NS, key(1), "float16", [4], 4, "8 bytes"),
        (NS, key(1), "complex", [4], 4, "dtype"),
        (NS, key(1), "uint8", [-4], -4, "negative"),
        (NS, key(1), "uint8", [3 * MiB], 3 * MiB, "max-value-bytes"),
    ],
)
def test_begin_put_validates(
    make_store: MakeStore,
    ns: str,
    k: bytes,
    dtype: str,
    shape: list[int],
    nbytes: int,
    match: str,
) -> None:
    s = make_store(max_value_bytes="2MiB")
    with pytest.raises(InvalidArgument, match=match):
        s.begin_put(ns, k, dtype, shape, nbytes, 0)
    assert s.cpu is not None and s.cpu.used_bytes == 0


def test_key_queries_validate(make_store: MakeStore) -> None:
    s = make_store(max_keys_per_request=2)
    with pytest.raises(InvalidArgument, match="max-keys-per-request"):
        s.exists(NS, [key(1), key(2), key(3)])
    with pytest.raises(InvalidArgument, match="32 bytes"):
        s.lookup(NS, [b"x" * 31])
    with pytest.raises(InvalidArgument, match="namespace"):
        s.get("no spaces", key(1))


# ---------------------------------------------------------------- queries


def test_lookup_exists_delete(store: Store) -> None:
    keys = chunk_keys(list(range(5 * 16)), 16, NS)
    for k in keys[:3]:
        put(store, k, value(1, 4096))
    put(store, keys[4], value(4, 4096))
    assert store.lookup(NS, keys) == 3  # longest present prefix: the hole at 3 stops it
    assert store.exists(NS, keys) == [True, True, True, False, True]
    assert store.lookup("other-namespace", keys) == 0
    assert store.delete(NS, [keys[1], keys[3]]) == 1
    assert store.lookup(NS, keys) == 1
    assert store.get(NS, keys[1]) is None
    assert store.lookup(NS, []) == 0


def test_namespaces_are_separate(store: Store) -> None:
    put(store, key(1), b"a" * 4096, ns="model-a")
    put(store, key(1), b"b" * 4096, ns="model-b")
    assert read(store, key(1), ns="model-a") == b"a" * 4096
    assert read(store, key(1), ns="model-b") == b"b" * 4096
    store.delete("model-a", [key(1)])
    assert store.exists("model-b", [key(1)]) == [True]
    assert [e.namespace for e in store.entries()] == ["model-b"]


def test_pin_unpin_counts(store: Store) -> None:
    put(store, key(1), value(1, 4096))
    assert store.pin(NS, [key(1), key(2)], 1) == 1  # absent keys are not counted
    assert entry(store, key(1)).pins == 1
    assert store.stats().pinned == 1
    assert store.pin(NS, [key(1)], -1) == 1
    assert store.pin(NS, [key(1)], -1) == 0  # never below zero
    assert entry(store, key(1)).pins == 0
    assert store.stats().pinned == 0


def test_replace_value(store: Store) -> None:
    put(store, key(1), value(1))
    new = value(2)
    put(store, key(1), new)
    assert read(store, key(1)) == new
    assert len(store.entries()) == 1
    assert store.cpu is not None and store.cpu.used_bytes == MiB


def test_miss_counters(store: Store) -> None:
    assert store.get(NS, key(9)) is None
    assert tier_stats(store, "cpu").counters.misses == 1
    put(store, key(1), value(1, 4096))
    read(store, key(1))
    assert tier_stats(store, "cpu").counters.hits == 1


# ---------------------------------------------------------------- movement between tiers


def fill(store: Store, n: int, start: int = 0) -> dict[bytes, bytes]:
    vals = {key(i): value(i) for i in range(start, start + n)}
    for k, v in vals.items():
        put(store, k, v)
    return vals


def test_demotion_to_ssd_under_pressure(store: Store) -> None:
    vals = fill(store, CPU_SLOTS + 2)
    tiers = {e.key: e.tier for e in store.entries()}
    assert tiers[key(0)] == tiers[key(1)] == "ssd"  # the least recently used went down
    assert all(tiers[key(i)] == "cpu" for i in range(2, CPU_SLOTS + 2))
    cpu = tier_stats(store, "cpu")
    assert cpu.counters.demotions == 2
    assert cpu.counters.evictions == 2
    assert cpu.entries == CPU_SLOTS
    assert tier_stats(store, "ssd").entries == 2
    assert store.ssd is not None and store.ssd.count() == 2
    for k, v in vals.items():
        assert read(store, k) == v


def test_recently_read_values_stay_in_cpu(store: Store) -> None:
    fill(store, CPU_SLOTS)
    read(store, key(0))  # key(1) is now the least recently used
    put(store, key(99), value(99))
    assert entry(store, key(0)).tier == "cpu"
    assert entry(store, key(1)).tier == "ssd"


def test_promotion_on_get_keeps_the_ssd_copy(store: Store) -> None:
    vals = fill(store, CPU_SLOTS + 1)
    assert entry(store, key(0)).tier == "ssd"
    lease = store.get(NS, key(0))
    assert lease is not None
    with lease:
        assert lease.tier == "ssd"  # served from ssd, by way of a fresh cpu slot
        assert bytes(lease.view) == vals[key(0)]
    e0 = entry(store, key(0))
    assert e0.tier == "cpu"
    assert e0.on_ssd
    assert entry(store, key(1)).tier == "ssd"  # made room for the promotion
    assert tier_stats(store, "cpu").counters.promotions == 1
    assert tier_stats(store, "ssd").counters.hits == 1
    # Evicting key(0) again costs no write: its ssd copy is still there.
    for i in range(2, CPU_SLOTS + 1):
        read(store, key(i))
    demotions = tier_stats(store, "cpu").counters.demotions
    put(store, key(50), value(50))
    assert entry(store, key(0)).tier == "ssd"
    assert tier_stats(store, "cpu").counters.demotions == demotions
    assert read(store, key(0)) == vals[key(0)]


def test_value_larger_than_a_cpu_slot_goes_to_ssd(store: Store) -> None:
    big = value(7, 5 * MiB)
    assert put(store, key(7), big) == "ssd"
    lease = store.get(NS, key(7))
    assert lease is not None
    with lease:
        assert lease.tier == "ssd"
        assert bytes(lease.view) == big
    assert entry(store, key(7)).tier == "ssd"


def test_cpu_only_store_rejects_value_larger_than_a_slot(make_store: MakeStore) -> None:
    s = make_store(tiers="cpu")
    # Refused up front as a bad request: no amount of eviction could ever make room.
    with pytest.raises(InvalidArgument, match="largest cpu slot"):
        s.begin_put(NS, key(1), "uint8", [5 * MiB], 5 * MiB, 0)


def test_ssd_only_store(make_store: MakeStore) -> None:
    s = make_store(tiers="ssd")
    data = value(3, 300_000)
    assert put(s, key(3), data) == "ssd"
    lease = s.get(NS, key(3))
    assert lease is not None
    with lease:
        assert lease.tier == "ssd"
        assert bytes(lease.view) == data
    assert s.cpu is None


def test_cpu_only_store_drops_least_recently_used(make_store: MakeStore) -> None:
    s = make_store(tiers="cpu")
    vals = fill(s, CPU_SLOTS + 2)
    assert s.exists(NS, list(vals)) == [False, False] + [True] * CPU_SLOTS
    assert tier_stats(s, "cpu").counters.evictions == 2


def test_ssd_tier_drops_least_recently_used_when_full(make_store: MakeStore) -> None:
    s = make_store(tiers="ssd")
    vals = fill(s, SSD_SLOTS + 2)
    assert s.exists(NS, list(vals)) == [False, False] + [True] * SSD_SLOTS
    assert s.ssd is not None and s.ssd.used_bytes <= s.ssd.capacity_bytes


def test_staging_bound(make_store: MakeStore) -> None:
    s = make_store(tiers="ssd", max_value_bytes="2MiB", staging_bytes="2MiB")
    first = s.begin_put(NS, key(1), "uint8", [1536 * 1024], 1536 * 1024, 0)
    with pytest.raises(ResourceExhausted, match="staging"):
        s.begin_put(NS, key(2), "uint8", [MiB], MiB, 0)
    first.abort()
    assert put(s, key(2), value(2)) == "ssd"


# ---------------------------------------------------------------- pins, leases, full


def test_pinned_entry_is_never_evicted(store: Store) -> None:
    vals = fill(store, 1)
    store.pin(NS, [key(0)], 1)
    fill(store, 3 * CPU_SLOTS, start=1)
    assert entry(store, key(0)).tier == "cpu"
    assert read(store, key(0)) == vals[key(0)]
    store.pin(NS, [key(0)], -1)
    fill(store, CPU_SLOTS, start=100)
    assert entry(store, key(0)).tier == "ssd"  # evictable again once unpinned


def test_pinned_entry_survives_in_a_cpu_only_store(make_store: MakeStore) -> None:
    s = make_store(tiers="cpu")
    vals = fill(s, 1)
    s.pin(NS, [key(0)], 1)
    fill(s, 3 * CPU_SLOTS, start=1)
    assert read(s, key(0)) == vals[key(0)]


def test_pinned_entry_survives_ssd_pressure(make_store: MakeStore) -> None:
    s = make_store(tiers="ssd")
    vals = fill(s, 1)
    s.pin(NS, [key(0)], 1)
    fill(s, 2 * SSD_SLOTS, start=1)
    assert read(s, key(0)) == vals[key(0)]
    assert s.exists(NS, [key(1)]) == [False]


def test_older_values_of_another_size_age_out(make_store: MakeStore) -> None:
    """Values of a new size replace the older ones of another size, oldest first, instead
    of only each other: a cache full of 64 KiB values, then twice its size in 1 MiB
    values, keeps none of the old ones (two 64 MiB pages)."""
    s = make_store(tiers=["cpu"], cpu_bytes="128MiB")
    small = [key(i) for i in range(2048)]
    for k in small:
        put(s, k, value(1, 64 << 10))
    assert s.lookup(NS, small[-1:]) == 1
    large = {key(10_000 + i): value(i) for i in range(256)}
    for k, v in large.items():
        put(s, k, v)
    assert sum(s.exists(NS, small)) == 0
    recent = list(large)[-64:]
    assert all(s.exists(NS, recent))
    assert all(read(s, k) == large[k] for k in recent)


def test_leased_entry_is_never_evicted(store: Store) -> None:
    vals = fill(store, CPU_SLOTS)
    lease = store.get(NS, key(0))
    assert lease is not None
    fill(store, 3 * CPU_SLOTS, start=10)
    assert bytes(lease.view) == vals[key(0)]
    assert entry(store, key(0)).tier == "cpu"
    lease.release()
    lease.release()  # idempotent
    fill(store, CPU_SLOTS, start=100)
    assert entry(store, key(0)).tier == "ssd"


def test_resource_exhausted_when_cpu_only_and_all_pinned(make_store: MakeStore) -> None:
    s = make_store(tiers="cpu")
    vals = fill(s, CPU_SLOTS)
    s.pin(NS, list(vals), 1)
    with pytest.raises(ResourceExhausted, match="nothing can be evicted"):
        s.begin_put(NS, key(99), "uint8", [MiB], MiB, 0)
    with pytest.raises(ResourceExhausted):
        s.begin_put(NS, key(99), "uint8", [4096], 4096, 0)  # no other class fits either
    assert all(read(s, k) == v for k, v in vals.items())
    s.pin(NS, [key(2)], -1)
    put(s, key(99), value(99))
    assert s.exists(NS, [key(2), key(99)]) == [False, True]


def test_resource_exhausted_when_cpu_only_and_all_leased(make_store: MakeStore) -> None:
    s = make_store(tiers="cpu")
    vals = fill(s, CPU_SLOTS)
    leases = [s.get(NS, k) for k in vals]
    with pytest.raises(ResourceExhausted):
        s.begin_put(NS, key(99), "uint8", [MiB], MiB, 0)
    for lease, v in zip(leases, vals.values(), strict=True):
        assert lease is not None
        assert bytes(lease.view) == v
        lease.release()
    put(s, key(99), value(99))


def test_resource_exhausted_when_every_tier_is_pinned(store: Store) -> None:
    vals = {}
    for i in range(CPU_SLOTS + SSD_SLOTS):
        vals.update(fill(store, 1, start=i))
        store.pin(NS, [key(i)], 1)
    assert tier_stats(store, "cpu").entries == CPU_SLOTS
    assert tier_stats(store, "ssd").entries == SSD_SLOTS
    with pytest.raises(ResourceExhausted):
        put(store, key(999), value(999))
    assert store.exists(NS, [key(999)]) == [False]
    assert all(read(store, k) == v for k, v in vals.items())


# ---------------------------------------------------------------- corruption


def test_corrupt_cpu_bytes_raise_data_loss_and_drop_entry(store: Store, tmp_path: Path) -> None:
    data = value(1)
    put(store, key(1), data)
    slot = entry(store, key(1)).slot
    assert slot is not None
    # Flip a byte through the shared-memory file, as a stray client write would.
    with open(default_arena_path(tmp_path / "data"), "r+b") as fh:
        fh.seek(slot.offset + 1000)
        fh.write(bytes([data[1000] ^ 0xFF]))
    with pytest.raises(DataLoss, match="checksum"):
        store.get(NS, key(1))
    assert store.exists(NS, [key(1)]) == [False]
    assert store.corrupt == {"cpu": 1, "ssd": 0}
    assert store.cpu is not None and store.cpu.used_bytes == 0
    assert store.stats().leases == 0
    put(store, key(1), data)  # the key is usable again
    assert read(store, key(1)) == data


def _corrupt_lmdb_payload(store: Store, k: bytes) -> None:
    assert store.ssd is not None
    data_db = store.ssd.env.open_db(b"data")
    rk = record_key(NS, k)
    with store.ssd.env.begin(write=True) as txn:
        raw = bytearray(txn.get(rk, db=data_db))
        raw[len(raw) // 2] ^= 0x01
        txn.put(rk, bytes(raw), db=data_db)


def test_corrupt_lmdb_bytes_raise_data_loss_and_drop_entry(store: Store) -> None:
    vals = fill(store, CPU_SLOTS + 1)
    assert entry(store, key(0)).tier == "ssd"
    _corrupt_lmdb_payload(store, key(0))
    with pytest.raises(DataLoss, match="checksum"):
        store.get(NS, key(0))
    assert store.exists(NS, [key(0)]) == [False]
    assert store.corrupt["ssd"] == 1
    assert not on_ssd_disk(store, key(0))
    assert store.ssd is not None
    ssd_entries = tier_stats(store, "ssd").entries
    assert store.ssd.count() == ssd_entries  # key(1) went down to make room for the promotion
    assert store.ssd.used_bytes == ssd_entries * (MiB + 4096)
    # The cpu slot taken for the failed promotion was given back, nothing else was lost.
    assert store.cpu is not None
    assert store.cpu.allocator.live_slots == tier_stats(store, "cpu").entries
    for i in range(1, CPU_SLOTS + 1):
        assert read(store, key(i)) == vals[key(i)]


def test_corrupt_lmdb_bytes_in_ssd_only_store(make_store: MakeStore) -> None:
    s = make_store(tiers="ssd")
    put(s, key(0), value(0))
    _corrupt_lmdb_payload(s, key(0))
    with pytest.raises(DataLoss):
        s.get(NS, key(0))
    assert s.exists(NS, [key(0)]) == [False]
    assert s.ssd is not None and s.ssd.count() == 0


# ---------------------------------------------------------------- restart


def test_restart_drops_and_counts_records_a_crash_left_damaged(make_store: MakeStore) -> None:
    first = make_store(tiers="ssd")
    vals = {i: value(i) for i in range(3)}
    for i, v in vals.items():
        put(first, key(i), v)
    assert first.ssd is not None
    meta = first.ssd.env.open_db(b"meta")
    with first.ssd.env.begin(write=True) as txn:  # a torn header, and a torn payload
        raw = bytearray(txn.get(record_key(NS, key(0)), db=meta))
        raw[5] ^= 0xFF
        txn.put(record_key(NS, key(0)), bytes(raw), db=meta)
    _corrupt_lmdb_payload(first, key(1))
    first.close()

    second = make_store(tiers="ssd")
    # The unreadable header is gone at start; the bad payload when first read.
    assert second.corrupt == {"ssd": 1}
    assert {e.key for e in second.entries()} == {key(1), key(2)}
    with pytest.raises(DataLoss, match="checksum"):
        second.get(NS, key(1))
    assert second.corrupt == {"ssd": 2}
    assert read(second, key(2)) == vals[2]
    assert second.exists(NS, [key(0), key(1), key(2)]) == [False, False, True]


def test_rebuild_from_ssd_on_restart(make_store: MakeStore) -> None:
    first = make_store()
    vals = fill(first, CPU_SLOTS + 2)  # two demoted, four only in cpu
    assert first.persist(lambda: False) == CPU_SLOTS
    assert first.ssd is not None
    used = first.ssd.used_bytes
    first.close()

    second = make_store()
    assert {e.key for e in second.entries()} == set(vals)
    assert all(e.tier == "ssd" and e.on_ssd for e in second.entries())
    assert second.ssd is not None and second.ssd.used_bytes == used
    assert tier_stats(second, "ssd").entries == len(vals)
    e = entry(second, key(3))
    assert (e.dtype, e.shape, e.nbytes, e.checksum) == (
        "uint8",
        (MiB,),
        MiB,
        checksum(vals[key(3)]),
    )
    for k, v in vals.items():
        assert read(second, k) == v


def test_restart_loses_unpersisted_cpu_values_only(make_store: MakeStore) -> None:
    first = make_store()
    vals = fill(first, CPU_SLOTS + 1)
    first.close()
    second = make_store()
    assert second.exists(NS, list(vals)) == [True] + [False] * CPU_SLOTS
    assert read(second, key(0)) == vals[key(0)]


# ---------------------------------------------------------------- leases vs. replace/delete


def test_replacing_a_leased_value_keeps_leased_bytes_until_release(store: Store) -> None:
    old, new = value(1), value(2)
    put(store, key(1), old)
    lease = store.get(NS, key(1))
    assert lease is not None
    assert store.cpu is not None
    put(store, key(1), new)
    assert bytes(lease.view) == old
    assert read(store, key(1)) == new
    fill(store, 3 * CPU_SLOTS, start=10)  # pressure must not reuse the leased slot
    assert bytes(lease.view) == old
    live = store.cpu.allocator.live_slots
    lease.release()
    assert store.cpu.allocator.live_slots == live - 1  # the old slot is freed now


def test_deleting_a_leased_value_keeps_leased_bytes_until_release(store: Store) -> None:
    old = value(1)
    put(store, key(1), old)
    lease = store.get(NS, key(1))
    assert lease is not None
    assert store.delete(NS, [key(1)]) == 1
    assert store.exists(NS, [key(1)]) == [False]
    fill(store, 3 * CPU_SLOTS, start=10)
    assert bytes(lease.view) == old
    assert store.cpu is not None
    live = store.cpu.allocator.live_slots
    lease.release()
    assert store.cpu.allocator.live_slots == live - 1


def test_replacing_a_value_that_lives_on_ssd(store: Store) -> None:
    fill(store, CPU_SLOTS + 1)
    assert entry(store, key(0)).tier == "ssd"
    new = value(77)
    put(store, key(0), new)
    assert read(store, key(0)) == new
    # The stale ssd copy was removed, not left to resurface after a restart.
    assert not entry(store, key(0)).on_ssd
    assert not on_ssd_disk(store, key(0))


# ---------------------------------------------------------------- known bugs


def test_promotion_never_evicts_the_value_being_read(make_store: MakeStore) -> None:
    # ssd holds one 600 KiB value; cpu holds six.
    s = make_store(ssd_bytes="1MiB")
    n = 600 * 1024
    vals = {key(i): value(i, n) for i in range(7)}
    for k, v in vals.items():
        put(s, k, v)
    assert entry(s, key(0)).tier == "ssd"
    assert read(s, key(0)) == vals[key(0)]


def test_commit_after_abort_is_refused(store: Store) -> None:
    data = value(1)
    res = store.begin_put(NS, key(1), "uint8", [MiB], MiB, checksum(data))
    res.write(data)
    res.abort()
    with pytest.raises(RuntimeError, match="already done"):
        res.commit()
    assert store.exists(NS, [key(1)]) == [False]
    assert store.cpu is not None
    assert store.cpu.allocator.live_slots == 0


def test_second_commit_does_not_free_the_stored_value(store: Store) -> None:
    data = value(1)
    res = store.begin_put(NS, key(1), "uint8", [MiB], MiB, checksum(data))
    res.write(data)
    res.commit()
    with pytest.raises(RuntimeError, match="already done"):
        res.commit()
    assert store.cpu is not None
    assert store.cpu.allocator.live_slots == 1
    fill(store, CPU_SLOTS - 1, start=10)  # would land on the freed slot
    assert read(store, key(1)) == data


def test_failed_replacement_keeps_the_old_value(make_store: MakeStore) -> None:
    s = make_store(tiers="ssd")
    old = value(0)
    put(s, key(0), old)
    for i in range(1, SSD_SLOTS):
        put(s, key(i), value(i))
        s.pin(NS, [key(i)], 1)
    with pytest.raises(ResourceExhausted):
        put(s, key(0), value(0, 2 * MiB))
    assert read(s, key(0)) == old


def test_corrupt_get_racing_a_replace_keeps_the_new_value(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = value(1), value(2)
    put(store, key(1), old)
    slot = entry(store, key(1)).slot
    assert slot is not None
    with open(default_arena_path(tmp_path / "data"), "r+b") as fh:
        fh.seek(slot.offset + 10)
        fh.write(bytes([old[10] ^ 0xFF]))

    real_checksum = store_mod.checksum
    armed = [True]

    def checksum_while_another_thread_replaces(buf: Any) -> int:
        # The get verifies outside the lock; another request's put commits right then.
        if armed[0]:
            armed[0] = False
            put(store, key(1), new)
        return real_checksum(buf)

    monkeypatch.setattr(store_mod, "checksum", checksum_while_another_thread_replaces)
    with pytest.raises(DataLoss):
        store.get(NS, key(1))
    monkeypatch.undo()
    assert read(store, key(1)) == new
    store.delete(NS, [key(1)])
    assert store.cpu is not None
    assert store.cpu.allocator.live_slots == 0


# ---------------------------------------------------------------- review regressions


def test_corrupt_cpu_copy_is_served_from_the_ssd_copy(store: Store) -> None:
    vals = fill(store, CPU_SLOTS + 1)
    assert entry(store, key(0)).tier == "ssd"
    assert read(store, key(0)) == vals[key(0)]  # promoted: now on both tiers
    e = entry(store, key(0))
    assert e.slot is not None and e.on_ssd
    assert store.cpu is not None
    view = store.cpu.view(e.slot, e.nbytes)
    view[1234] ^= 0xFF  # a stray write into the shared arena
    lease = store.get(NS, key(0))
    assert lease is not None
    with lease:
        assert bytes(lease.view) == vals[key(0)]
    assert store.stats().leases == 0
    assert store.exists(NS, [key(0)]) == [True]
    assert entry(store, key(0)).on_ssd
    assert on_ssd_disk(store, key(0))
    assert read(store, key(0)) == vals[key(0)]
    # The bad cpu slot was given back, not leaked.
    assert store.cpu.allocator.live_slots == tier_stats(store, "cpu").entries
    for i in range(1, CPU_SLOTS + 1):
        assert read(store, key(i)) == vals[key(i)]


def test_replacing_a_pinned_value_keeps_it_pinned(store: Store) -> None:
    put(store, key(0), value(0))
    assert store.pin(NS, [key(0)], 1) == 1
    new = value(100)
    put(store, key(0), new)
    assert entry(store, key(0)).pins == 1
    assert store.stats().pinned == 1
    fill(store, 3 * CPU_SLOTS, start=1)
    assert entry(store, key(0)).tier == "cpu"
    assert read(store, key(0)) == new
    assert store.pin(NS, [key(0)], -1) == 1
    assert entry(store, key(0)).pins == 0


def test_replacing_a_pinned_value_on_ssd_keeps_it_pinned(make_store: MakeStore) -> None:
    s = make_store(tiers="ssd")
    put(s, key(0), value(0))
    s.pin(NS, [key(0)], 1)
    new = value(100)
    put(s, key(0), new)
    assert entry(s, key(0)).pins == 1
    fill(s, 2 * SSD_SLOTS, start=1)
    assert read(s, key(0)) == new


def test_failing_ssd_writes_never_break_puts_gets_or_persist(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    vals = fill(store, CPU_SLOTS + 2)  # key(0), key(1) on ssd
    assert store.ssd is not None

    def broken_put(*args: Any, **kwargs: Any) -> None:
        raise TierError("simulated LMDB failure")

    monkeypatch.setattr(store.ssd, "put", broken_put)
    # A put that has to demote a value: the victim cannot reach ssd, so it is dropped (a
    # cache may lose values) or the put is refused; nothing else.
    for i in range(10, 10 + CPU_SLOTS + 1):
        data = value(i)
        try:
            assert put(store, key(i), data) == "cpu"
            vals[key(i)] = data
        except ResourceExhausted:
            pass
    # A value too large for a cpu slot can only go to ssd.
    with pytest.raises(ResourceExhausted):
        put(store, key(50), value(50, 5 * MiB))
    assert store.exists(NS, [key(50)]) == [False]
    for k, v in vals.items():
        got = read(store, k)
        assert got is None or got == v
    # The values that were on ssd before the failure are still there.
    assert read(store, key(0)) == vals[key(0)]
    assert store.persist(lambda: False) == 0
    assert store.stats().leases == 0
    assert store.cpu is not None
    assert store.cpu.allocator.live_slots == tier_stats(store, "cpu").entries


def test_staged_leases_are_counted(make_store: MakeStore) -> None:
    s = make_store(tiers="ssd")
    data = value(1)
    put(s, key(1), data)
    lease = s.get(NS, key(1))
    assert lease is not None
    assert lease.tier == "ssd"
    assert s.stats().leases == 1
    assert bytes(lease.view) == data
    lease.release()
    assert s.stats().leases == 0
    lease.release()  # idempotent: counted once
    assert s.stats().leases == 0


def test_staged_lease_without_room_in_cpu_is_counted(store: Store) -> None:
    vals = fill(store, CPU_SLOTS + 1)
    assert entry(store, key(0)).tier == "ssd"
    store.pin(NS, [key(i) for i in range(1, CPU_SLOTS + 1)], 1)  # nothing can leave cpu
    lease = store.get(NS, key(0))
    assert lease is not None
    assert entry(store, key(0)).tier == "ssd"  # served from a staging copy, not promoted
    assert store.stats().leases == 1
    assert bytes(lease.view) == vals[key(0)]
    lease.release()
    assert store.stats().leases == 0


def test_lease_resident_never_waits(store: Store) -> None:
    data = value(1)
    res = store.begin_put(NS, key(1), "uint8", [MiB], MiB, checksum(data))
    res.write(data)
    res.commit()
    assert store.lease_resident(NS, key(2)) is None  # absent: the caller takes the slow path
    lease = store.lease_resident(NS, key(1))
    assert lease is not None and lease.tier == "cpu" and bytes(lease.view) == data
    assert store.stats().leases == 1 and store.stats().tiers[0].counters.hits == 1
    lease.release()
    holder_ready, done = threading.Event(), threading.Event()

    def hold_lock() -> None:
        with store._lock:
            holder_ready.set()
            done.wait(5)

    t = threading.Thread(target=hold_lock)
    t.start()
    holder_ready.wait(5)
    try:
        assert store.lease_resident(NS, key(1)) is None  # busy: refuses instead of waiting
    finally:
        done.set()
        t.join()
    assert store.stats().leases == 0
