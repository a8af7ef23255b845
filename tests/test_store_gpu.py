"""The gpu tier in the tier manager, on the host twin (`gpu_twin`): placement in a pool,
leases in place, checked copies for readers that do not map the pool, demotion to cpu on
the demoter thread, and what happens to values replaced, deleted or corrupted meanwhile.

The twin pool is a shared-memory file with the same slots and the same copy interface as
a CUDA pool; the CUDA pool itself is tested on the device (tests/e2e/test_transfer_gpu.py).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import kvstore.store as store_mod
from kvstore.codecs.container import checksum
from kvstore.config import ConfigError, ServerConfig
from kvstore.errors import DataLoss, InvalidArgument
from kvstore.store import Store
from kvstore.tiers.gpu import TwinPool

MiB = 1 << 20
NS = "llama-3-8b/bf16/tp0of1"
POOL_SLOTS = 4  # gpu_bytes=4MiB: one page of four 1 MiB slots

MakeStore = Callable[..., Store]


def key(i: int) -> bytes:
    return i.to_bytes(32, "big")


def value(i: int, n: int = MiB) -> bytes:
    return bytes([i % 251]) * 8 + os.urandom(n - 8)


def twin(store: Store) -> TwinPool:
    pool = store.pools[1]
    assert isinstance(pool, TwinPool)
    return pool


def put_gpu(store: Store, k: bytes, data: bytes) -> str:
    """A put as a same-host GPU client makes it: reserve in pool 1, write, commit."""
    res = store.reserve_in_arena(NS, k, "uint8", [len(data)], len(data), checksum(data), pool=1)
    assert res is not None and res.slot is not None
    if res.place:
        twin(store).view(res.slot, len(data))[:] = data
    else:
        assert res.buffer is not None
        res.buffer[:] = data
    res.written()
    return res.commit()


def read(store: Store, k: bytes) -> bytes | None:
    lease = store.get(NS, k)  # maps no pool: gets a checked host copy
    if lease is None:
        return None
    with lease:
        assert lease.view is not None
        return bytes(lease.view)


def tier_of(store: Store, k: bytes) -> str:
    return next(e.tier for e in store.entries(NS) if e.key == k)


def tier_stats(store: Store, name: str) -> Any:
    return next(t for t in store.stats().tiers if t.name == name)


@pytest.fixture
def make_gpu_store(make_store: MakeStore, monkeypatch: pytest.MonkeyPatch) -> MakeStore:
    """test_store's stores, with a 4 MiB gpu tier on the host twin."""
    base = make_store

    def make(*, demoter: bool = False, **overrides: Any) -> Store:
        if not demoter:  # tests that demote by hand: no demoter thread
            monkeypatch.setattr(Store, "_demote_forever", lambda self: None)
        gpu = {"tiers": "gpu,cpu,ssd", "gpu_twin": True, "gpu_bytes": "4MiB"}
        return base(**{**gpu, **overrides})

    return make


@pytest.fixture
def store(make_gpu_store: MakeStore) -> Store:
    return make_gpu_store()


def test_gpu_put_lands_in_the_pool_and_reads_back(store: Store) -> None:
    data = value(1)
    assert put_gpu(store, key(1), data) == "gpu"
    # A reader that maps pool 1 gets the slot itself, no host copy.
    lease = store.get(NS, key(1), pools={1})
    assert lease is not None
    with lease:
        assert lease.tier == "gpu" and lease.view is None and lease.pool == 1
        assert lease.offset is not None
        assert bytes(twin(store).view(store_slot(store, key(1)), MiB)) == data
    # One that does not gets a copy checked against the checksum.
    assert read(store, key(1)) == data
    st = tier_stats(store, "gpu")
    assert (st.entries, st.used_bytes, st.capacity_bytes) == (1, MiB, 4 * MiB)
    assert st.counters.hits == 2


def store_slot(store: Store, k: bytes) -> Any:
    slot = next(e.slot for e in store.entries(NS) if e.key == k)
    assert slot is not None
    return slot


def test_lease_resident_only_for_mapped_pools(store: Store) -> None:
    put_gpu(store, key(1), value(1))
    assert store.lease_resident(NS, key(1)) is None
    lease = store.lease_resident(NS, key(1), pools=(1,))
    assert lease is not None and lease.tier == "gpu"
    lease.release()


def test_full_pool_puts_land_in_cpu(store: Store) -> None:
    for i in range(POOL_SLOTS):
        assert put_gpu(store, key(i), value(i)) == "gpu"
    assert put_gpu(store, key(9), value(9)) == "cpu"  # no waiting for a demotion


def test_unknown_pool_is_refused(store: Store) -> None:
    with pytest.raises(InvalidArgument, match="gpu pool 2 does not exist"):
        store.reserve_in_arena(NS, key(1), "uint8", [16], 16, 0, pool=2)


def test_demote_moves_least_recent_values_to_cpu_intact(store: Store) -> None:
    datas = {i: value(i) for i in range(POOL_SLOTS)}
    for i, d in datas.items():
        put_gpu(store, key(i), d)
    read(store, key(0))  # key 0 is now the most recently used
    assert store.demote(1) == 2  # from 100% down to the low-water mark (70%): two values
    assert [tier_of(store, key(i)) for i in range(POOL_SLOTS)] == ["gpu", "cpu", "cpu", "gpu"]
    for i, d in datas.items():
        assert read(store, key(i)) == d
    gpu = tier_stats(store, "gpu")
    c = gpu.counters
    assert (gpu.entries, gpu.used_bytes, c.demotions, c.evictions) == (2, 2 * MiB, 2, 2)
    assert store.demote(1) == 0  # below the high-water mark now


def test_demoter_thread_keeps_the_pool_below_high_water(make_gpu_store: MakeStore) -> None:
    store = make_gpu_store(demoter=True)
    datas = [value(i) for i in range(POOL_SLOTS)]
    for i, d in enumerate(datas):
        put_gpu(store, key(i), d)
    deadline = time.monotonic() + 10
    while store.pools[1].used_bytes > store_mod.GPU_HIGH_WATER * 4 * MiB:
        assert time.monotonic() < deadline, "the demoter did not make room"
        time.sleep(0.01)
    assert tier_stats(store, "gpu").counters.demotions >= 1
    assert [read(store, key(i)) for i in range(POOL_SLOTS)] == datas


def test_demoter_survives_a_failed_copy(
    make_gpu_store: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_gpu_store(demoter=True)
    pool = twin(store)
    real_wait = pool.wait
    failures = []

    def wait_once_failing() -> None:  # the demoter's first copy fails, nothing else
        if not failures and threading.current_thread().name == "kvstore-demoter":
            failures.append(1)
            raise RuntimeError("copy engine fault")
        real_wait()

    monkeypatch.setattr(pool, "wait", wait_once_failing)
    datas = [value(i) for i in range(POOL_SLOTS)]
    for i, d in enumerate(datas):
        put_gpu(store, key(i), d)
    deadline = time.monotonic() + 10
    while tier_stats(store, "gpu").counters.demotions == 0:
        assert time.monotonic() < deadline, "the demoter gave up after one failure"
        time.sleep(0.02)
    assert failures == [1]
    assert [read(store, key(i)) for i in range(POOL_SLOTS)] == datas
    assert store_cpu_live(store) == tier_stats(store, "cpu").entries  # nothing leaked


def test_leased_and_pinned_values_stay_in_the_pool(store: Store) -> None:
    for i in range(POOL_SLOTS):
        put_gpu(store, key(i), value(i))
    lease = store.get(NS, key(0), pools={1})
    store.pin(NS, [key(1)], 1)
    assert lease is not None
    with lease:
        assert store.demote(1, force=True) == 2
    assert tier_of(store, key(0)) == "gpu" and tier_of(store, key(1)) == "gpu"


def test_value_replaced_while_demoting_keeps_the_new_one(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(POOL_SLOTS):
        put_gpu(store, key(i), value(i))
    new = value(100)
    pool = twin(store)
    real_wait = pool.wait

    def wait_and_replace() -> None:
        real_wait()
        monkeypatch.setattr(pool, "wait", real_wait)
        put_gpu(store, key(0), new)  # key 0 is the first to be demoted

    monkeypatch.setattr(pool, "wait", wait_and_replace)
    cpu_live = store_cpu_live(store)
    store.demote(1)
    assert read(store, key(0)) == new
    # The pool was full, so the new value went to cpu beside the demoted key 1; the copy of
    # the old value was freed, not leaked, and so was its pool slot.
    assert tier_of(store, key(0)) == "cpu" and tier_of(store, key(1)) == "cpu"
    assert store_cpu_live(store) == cpu_live + 2
    assert twin(store).allocator.live_slots == 2


def store_cpu_live(store: Store) -> int:
    assert store.cpu is not None
    return store.cpu.allocator.live_slots


def test_corrupt_pool_copy_is_dropped_not_served(store: Store) -> None:
    put_gpu(store, key(1), value(1))
    view = twin(store).view(store_slot(store, key(1)), MiB)
    view[100] ^= 0xFF
    with pytest.raises(DataLoss, match="gpu tier"):
        read(store, key(1))
    assert store.exists(NS, [key(1)]) == [False]
    assert twin(store).allocator.live_slots == 0


def test_corrupt_value_is_not_demoted(store: Store) -> None:
    for i in range(POOL_SLOTS):
        put_gpu(store, key(i), value(i))
    view = twin(store).view(store_slot(store, key(0)), MiB)
    view[0] ^= 0xFF
    cpu_live = store_cpu_live(store)
    assert store.demote(1) == 1  # key 0 is dropped, key 1 moves
    assert store.exists(NS, [key(0), key(1)]) == [False, True]
    assert store_cpu_live(store) == cpu_live + 1


def test_deleting_a_leased_pool_value_frees_its_slot_at_release(store: Store) -> None:
    put_gpu(store, key(1), value(1))
    lease = store.get(NS, key(1), pools={1})
    assert lease is not None
    assert store.delete(NS, [key(1)]) == 1
    assert twin(store).allocator.live_slots == 1  # still being read
    lease.release()
    assert twin(store).allocator.live_slots == 0


def test_shutdown_persists_pool_values_to_ssd(make_gpu_store: MakeStore) -> None:
    store = make_gpu_store()
    datas = {i: value(i) for i in range(3)}
    for i, d in datas.items():
        put_gpu(store, key(i), d)
    assert store.persist(lambda: False) == 3
    store.close()
    again = make_gpu_store()
    for i, d in datas.items():
        assert read(again, key(i)) == d


def test_streamed_puts_start_in_cpu(store: Store) -> None:
    data = value(1)
    res = store.begin_put(NS, key(1), "uint8", [MiB], MiB, checksum(data))
    res.write(data)
    assert res.commit() == "cpu"


def test_gpu_tier_needs_cpu_below_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="demotes to the cpu tier"):
        ServerConfig(tiers="gpu,ssd", data_dir=tmp_path)
