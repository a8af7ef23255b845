"""The ssd writer (`--ssd-write-ahead`): the cpu values eviction takes next are copied to
ssd ahead of it, encoded off the lock, so the eviction itself writes nothing; a value
deleted, replaced or evicted while it was being encoded is not written from stale bytes."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from test_store import (
    NS,
    MakeStore,
    MiB,
    entry,
    fill,
    key,
    on_ssd_disk,
    put,
    read,
    tier_stats,
    value,
)

from kvstore.codecs import checksum, codec_from_spec
from kvstore.codecs.base import ValuesRefused
from kvstore.codecs.values import encode_stored, encode_stored_many, tensor_bytes
from kvstore.store import GPU_SCRATCH_IDLE_S, Store
from kvstore.threads import GPU_ENCODE_THREADS
from tests.test_store_codecs import kv_value
from tests.test_store_codecs import put as put_kv


@pytest.fixture
def make_quiet(make_store: MakeStore, monkeypatch: pytest.MonkeyPatch) -> MakeStore:
    """Stores whose ssd writer runs only when the test calls `write_ahead`, not in the
    background as well: what each round copies is then what the test says."""
    monkeypatch.setattr(Store, "_write_ahead_forever", lambda self: None)
    return make_store


def write_ahead(store: Store) -> int:
    """Run the writer's rounds until it has nothing left to copy; how many it copied."""
    n = 0
    while (step := store.write_ahead()) > 0:
        n += step
    return n


def at_once(fn: Any) -> tuple[Any, list[int]]:
    """`fn` wrapped to hold each call 50 ms (long enough for the calls after it to start
    beside it, if they could), and a list whose one item is the most calls seen at once."""
    running, most = [0], [0]
    lock = threading.Lock()

    def wrapped(*args: Any) -> Any:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        try:
            return fn(*args)
        finally:
            with lock:
                running[0] -= 1

    return wrapped, most


def test_copies_what_eviction_takes_next_once_the_tier_fills(make_quiet: MakeStore) -> None:
    store = make_quiet(ssd_write_ahead=0.5)  # 2 of the arena's four 1 MiB slots
    vals = fill(store, 2)
    assert write_ahead(store) == 0  # half the tier free: nothing to do yet
    vals |= fill(store, 2, start=2)
    assert write_ahead(store) == 2
    writer = store.stats().writer
    assert (writer.ahead, writer.encoded_host, writer.encoded_gpu) == (2, 2, 0)
    for i in range(4):
        assert entry(store, key(i)).tiers == (("cpu", "ssd") if i < 2 else ("cpu",))
    assert tier_stats(store, "cpu").counters.demotions == 2
    assert tier_stats(store, "cpu").counters.evictions == 0
    assert read(store, key(3)) == vals[key(3)]  # served from cpu, as before
    # The next put evicts key(0), already on ssd: nothing more is written for it.
    assert store.ssd is not None
    written = store.ssd.count()
    writes: list[bytes] = []
    real_put = store.ssd.put

    def counted(ns: str, k: bytes, *args: Any) -> None:
        writes.append(k)
        real_put(ns, k, *args)

    store.ssd.put = counted  # type: ignore[method-assign]
    put(store, key(9), value(9))
    assert key(0) not in writes
    assert store.ssd.count() == written
    assert entry(store, key(0)).tiers == ("ssd",)
    assert tier_stats(store, "cpu").counters.evictions == 1
    assert store.stats().writer.at_eviction == 0  # already there: nothing written for it
    assert read(store, key(0)) == vals[key(0)]


def test_the_writer_counts_its_seconds_writing_and_waiting_for_encodes(
    make_quiet: MakeStore,
) -> None:
    """`WriterCounters.write_seconds` / `wait_seconds` (the metric
    `kvstore_ssd_writer_seconds_total{doing}`): here each value takes 100 ms to encode, on
    threads of the host pool side by side, and a write much less: the writer spends
    ~100 ms waiting, and its writes are counted apart."""
    store = make_quiet(ssd_write_ahead=1.0, codec=("ssd=zstd",))
    fill(store, 4)
    real = store._encode_ahead

    def slow(part: Any, codecs: Any) -> Any:
        time.sleep(0.1)
        return real(part, codecs)

    store._encode_ahead = slow  # type: ignore[method-assign]
    began = time.perf_counter()
    assert write_ahead(store) == 4
    elapsed = time.perf_counter() - began
    writer = store.stats().writer
    assert writer.wait_seconds >= 0.09
    assert writer.write_seconds > 0
    assert writer.wait_seconds + writer.write_seconds <= elapsed


def test_values_read_back_from_the_ssd_copy(make_quiet: MakeStore) -> None:
    store = make_quiet(ssd_write_ahead=1.0, codec=("ssd=zstd",))
    vals = fill(store, 4)
    write_ahead(store)
    assert all(on_ssd_disk(store, key(i)) for i in range(4))
    vals |= fill(store, 4, start=4)  # evicts all four: their ssd copies serve them
    for k, v in vals.items():
        assert read(store, k) == v
    assert store.stats().codecs["zstd"].raw_bytes >= 4 * MiB


def test_values_changed_while_encoded_are_not_written(make_quiet: MakeStore) -> None:
    store = make_quiet(ssd_write_ahead=1.0)
    fill(store, 4)
    fresh = value(101)
    real = store._encode_ahead

    def racing(item: Any, codec: Any) -> Any:
        coded = real(item, codec)
        e = item[0][0]  # a job of one value each: the host's encodes
        if e.key == key(0):
            store.delete(NS, [key(0)])
        elif e.key == key(1):
            put(store, key(1), fresh)  # a new value of the key
        return coded

    store._encode_ahead = racing  # type: ignore[method-assign]
    store.write_ahead()
    assert not on_ssd_disk(store, key(0))
    assert read(store, key(0)) is None
    assert not on_ssd_disk(store, key(1))  # the stale bytes were not written
    assert entry(store, key(1)).tiers == ("cpu",)
    assert read(store, key(1)) == fresh
    assert on_ssd_disk(store, key(2)) and on_ssd_disk(store, key(3))


def test_one_call_overlaps_encoding_and_writing_and_tries_each_value_once(
    make_quiet: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call copies the whole window: values are chosen and start encoding as the ones
    before them are written, never more than WRITE_AHEAD_VALUES encoding or waiting to be
    written; a value that cannot be encoded is tried once per call, not over and over."""
    monkeypatch.setattr("kvstore.store.WRITE_AHEAD_VALUES", 2)
    store = make_quiet(ssd_write_ahead=1.0, cpu_bytes="8MiB")
    fill(store, 6)
    lock = threading.Lock()
    in_flight: set[bytes] = set()
    most = 0
    encoded: list[bytes] = []
    real_encode, real_write = store._encode_ahead, store._write_job

    def encode(part: Any, codec: Any) -> Any:
        nonlocal most
        with lock:
            in_flight.update(e.key for e, _ in part)
            most = max(most, len(in_flight))
            encoded.extend(e.key for e, _ in part)
        coded = real_encode(part, codec)
        return [None if e.key == key(0) else c for (e, _), c in zip(part, coded, strict=True)]

    def write(part: Any, coded: Any) -> Any:
        done = real_write(part, coded)
        with lock:
            in_flight.difference_update(e.key for e, _ in part)
        return done

    store._encode_ahead = encode  # type: ignore[method-assign]
    store._write_job = write  # type: ignore[method-assign]
    policy = store._mem[0].policy
    walks = 0
    real_candidates = policy.candidates

    def candidates() -> Any:
        nonlocal walks
        walks += 1
        return real_candidates()

    policy.candidates = candidates  # type: ignore[method-assign]
    assert store.write_ahead() == 5
    assert walks == 2  # the window once, and once more when nothing was left: not per job
    assert sorted(encoded) == sorted(key(i) for i in range(6))  # each once, key(0) too
    assert most == 2
    assert entry(store, key(0)).tiers == ("cpu",)
    assert all(entry(store, key(i)).tiers == ("cpu", "ssd") for i in range(1, 6))
    assert tier_stats(store, "cpu").counters.demotions == 5


def test_pinned_values_are_left_alone(make_quiet: MakeStore) -> None:
    store = make_quiet(ssd_write_ahead=1.0)
    fill(store, 4)
    store.pin(NS, [key(0)], 1)  # never evicted: no reason to copy it
    write_ahead(store)
    assert entry(store, key(0)).tiers == ("cpu",)
    assert all(entry(store, key(i)).tiers == ("cpu", "ssd") for i in (1, 2, 3))


@pytest.mark.parametrize("share", [0.5, 0.0])
def test_the_background_writer(make_store: MakeStore, share: float) -> None:
    store = make_store(ssd_write_ahead=share)
    fill(store, 4)
    deadline = time.monotonic() + 10
    while share and not entry(store, key(0)).on_ssd and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    assert entry(store, key(0)).on_ssd == (share > 0)
    assert (store._ssd_writer is not None) == (share > 0)


def test_a_full_ssd_is_reported_once_and_loses_nothing(
    make_quiet: MakeStore, caplog: pytest.LogCaptureFixture
) -> None:
    """With ssd full of pinned values there is no room ahead of eviction: the writer says
    so once, however often it tries, and the cpu values stay where they are."""
    store = make_quiet(ssd_write_ahead=1.0, ssd_bytes="4MiB", cpu_bytes="8MiB")  # ssd: 3
    fill(store, 3)
    assert write_ahead(store) == 3
    store.pin(NS, [key(0), key(1), key(2)], 1)  # their ssd copies can no longer go
    vals = fill(store, 3, start=10)
    with caplog.at_level("WARNING", logger="kvstore.store"):
        for _ in range(3):
            assert store.write_ahead() == 0
    refusals = [r for r in caplog.records if "ahead of eviction" in r.getMessage()]
    assert len(refusals) == 1
    for k, v in vals.items():
        assert entry(store, k).tiers == ("cpu",)
        assert read(store, k) == v


def test_a_batch_broken_off_leaves_no_encode_reading_the_arena(make_quiet: MakeStore) -> None:
    """When ssd refuses a write the batch stops, but the values still being encoded (from
    the cpu arena, which close() unmaps next) are waited for before write_ahead returns."""
    store = make_quiet(ssd_write_ahead=1.0, ssd_bytes="4MiB", cpu_bytes="8MiB")  # ssd: 3
    fill(store, 3)
    write_ahead(store)
    store.pin(NS, [key(0), key(1), key(2)], 1)
    fill(store, 3, start=10)
    running: set[bytes] = set()
    real = store._encode_ahead

    def slow(item: Any, codec: Any) -> Any:
        k = item[0][0].key
        running.add(k)
        time.sleep(0 if k == key(10) else 0.3)  # key 10 comes back first, and is refused
        coded = real(item, codec)
        running.discard(k)
        return coded

    store._encode_ahead = slow  # type: ignore[method-assign]
    assert store.write_ahead() == 0
    assert not running


def stored_record(store: Store, k: bytes) -> tuple[Any, bytes]:
    """The ssd tier's header and payload of key k."""
    assert store.ssd is not None
    with store.ssd.read(NS, k) as (header, payload):
        return header, bytes(payload)


def host_encoded(spec: str, i: int, store: Store) -> tuple[Any, bytes]:
    """What the host encoder makes of `kv_value(i)` for the ssd tier."""
    t = kv_value(i)
    e = entry(store, key(i))
    header, payload = encode_stored(codec_from_spec(spec), e.header(), tensor_bytes(t))
    return header, bytes(payload)


def test_a_gpu_batch_that_fails_is_encoded_on_the_host(
    make_quiet: MakeStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Values whose codec encodes on the --encode-gpu GPU go there in batches; a batch the
    GPU cannot take (here: no GPU at all) is encoded value by value on the host, into the
    same records, and values of a namespace stored raw are never part of a batch."""
    spec = "cachegen:level=1"
    store = make_quiet(ssd_write_ahead=1.0, codec=(f"ssd[llama-*]={spec}",))
    for i in range(3):
        put_kv(store, key(i), kv_value(i))
    put(store, key(3), value(3), ns="raw/ns")
    store._encode_device = 0  # as --encode-gpu 0 would set it, on a machine with a GPU
    tried: list[int] = []

    def no_gpu(codec: Any, items: Any, device: int) -> Any:
        tried.append(len(items))
        raise RuntimeError("no CUDA GPU here")

    monkeypatch.setattr("kvstore.codecs.values.encode_stored_many", no_gpu)
    batches: list[list[bytes]] = []
    real = store._encode_ahead

    def seen(part: Any, codec: Any) -> Any:
        batches.append([e.key for e, _ in part])
        return real(part, codec)

    store._encode_ahead = seen  # type: ignore[method-assign]
    with caplog.at_level("INFO", logger="kvstore.store"):
        assert write_ahead(store) == 4
    assert sorted(batches) == [[key(0), key(1), key(2)], [key(3)]]
    assert tried == [3]
    assert any("encoding each on the host" in r.getMessage() for r in caplog.records)
    for i in range(3):
        assert stored_record(store, key(i)) == host_encoded(spec, i, store)


def test_the_newest_chunks_go_to_the_gpu_in_batches_of_their_own_codec(
    make_quiet: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Values put as the newest chunks of their sequences are encoded through the codec's
    `for_newest()` (here level 0), in GPU batches apart from the others (level 3)."""
    spec = "cachegen:level=3,newest=0"
    store = make_quiet(ssd_write_ahead=1.0, codec=(f"ssd={spec}",))
    for i in range(4):
        t = kv_value(i)
        data = bytes(tensor_bytes(t))
        res = store.begin_put(
            NS, key(i), "bfloat16", list(t.shape), len(data), checksum(data), newest=i in (1, 3)
        )  # fmt: skip
        res.write(data)
        res.commit()
    store._encode_device = 0  # as --encode-gpu 0 would set it, on a machine with a GPU
    batches: list[tuple[int, int]] = []  # (level, values)

    def gpu(codec: Any, items: Any, device: int) -> Any:
        batches.append((int(codec.params["level"]), len(items)))
        return encode_stored_many(codec, items, None)  # the host's bytes, as the GPU's are

    monkeypatch.setattr("kvstore.codecs.values.encode_stored_many", gpu)
    assert write_ahead(store) == 4
    assert sorted(batches) == [(0, 2), (3, 2)]
    for i in range(4):
        level = 0 if i in (1, 3) else 3
        assert stored_record(store, key(i)) == host_encoded(f"cachegen:level={level}", i, store)


def test_on_a_gpu_the_writer_chooses_several_full_batches_at_a_time(
    make_quiet: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Encoding on a GPU, the writer has up to WRITE_AHEAD_GPU_VALUES (and _AHEAD_BYTES)
    in flight, not the host threads' limits, so that what one job's writing frees is
    chosen again as whole batches."""
    spec = "cachegen:level=1"
    store = make_quiet(ssd_write_ahead=1.0, codec=(f"ssd={spec}",))
    for i in range(4):  # the arena's four slots
        put_kv(store, key(i), kv_value(i))
    store._encode_device = 0  # as --encode-gpu 0 would set it, on a machine with a GPU
    monkeypatch.setattr("kvstore.store.WRITE_AHEAD_VALUES", 1)  # the host's: batches of 1
    monkeypatch.setattr("kvstore.store.WRITE_AHEAD_GPU_VALUES", 4)
    monkeypatch.setattr("kvstore.store.WRITE_AHEAD_GPU_BYTES", 2 * kv_value(0).nbytes)
    batches: list[int] = []

    def gpu(codec: Any, items: Any, device: int) -> Any:
        batches.append(len(items))
        return encode_stored_many(codec, items, None)  # the host's bytes, as the GPU's are

    monkeypatch.setattr("kvstore.codecs.values.encode_stored_many", gpu)
    assert write_ahead(store) == 4
    assert batches == [2, 2]
    for i in range(4):
        assert stored_record(store, key(i)) == host_encoded(spec, i, store)


def two_shapes(
    store: Store, monkeypatch: pytest.MonkeyPatch, names: list[str]
) -> list[torch.Tensor]:
    """Put values named a* (64 tokens) and b* (56 tokens) in the order named (eviction
    order), and make `store` encode on a "GPU" that gives the host encoder's bytes."""
    chunks = [
        kv_value(n)[:, :, : 64 if name[0] == "a" else 56].contiguous()
        for n, name in enumerate(names)
    ]
    for n, t in enumerate(chunks):
        put_kv(store, key(n), t)
    store._encode_device = 0  # as --encode-gpu 0 would set it, on a machine with a GPU

    def gpu(codec: Any, items: Any, device: int) -> Any:
        return encode_stored_many(codec, items, None)  # the host's bytes, as the GPU's are

    monkeypatch.setattr("kvstore.codecs.values.encode_stored_many", gpu)
    return chunks


def assert_stored_as_encoded(store: Store, spec: str, chunks: list[torch.Tensor]) -> None:
    for n, t in enumerate(chunks):
        header = entry(store, key(n)).header()
        payload = encode_stored(codec_from_spec(spec), header, tensor_bytes(t))[1]
        assert stored_record(store, key(n))[1] == bytes(payload)


def test_gpu_batches_gather_values_of_their_shape_while_the_gpu_is_busy(
    make_quiet: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Values for the GPU wait in a batch of their shape until it is full, or until the GPU
    would run out of work, rather than going as what each job's writing frees (here one
    value of each shape at a time). The GPU is kept "busy" by a threshold of 0: a partial
    batch goes only once nothing else is encoding there."""
    spec = "cachegen:level=1"
    store = make_quiet(ssd_write_ahead=1.0, codec=(f"ssd={spec}",))
    names = [f"{s}{i}" for i in range(3) for s in "ab"]  # a0 b0 a1 b1 a2 b2
    chunks = two_shapes(store, monkeypatch, names)
    monkeypatch.setattr("kvstore.store.WRITE_AHEAD_GPU_VALUES", 3)
    monkeypatch.setattr("kvstore.store.WRITE_AHEAD_GPU_BYTES", 2 * chunks[0].nbytes)  # 2 each
    monkeypatch.setattr("kvstore.store.GPU_ENCODE_THREADS", 0)
    batches: list[list[str]] = []
    real = store._encode_ahead

    def seen(part: Any, codecs: Any) -> Any:
        batches.append([names[int.from_bytes(e.key, "big")] for e, _ in part])
        return real(part, codecs)

    store._encode_ahead = seen  # type: ignore[method-assign]
    assert write_ahead(store) == 6
    # Chosen three, then two, then one at a time: a0 b0 a1 | b1 a2 | b2.
    assert batches == [["a0", "a1"], ["b0", "b1"], ["a2"], ["b2"]]
    assert_stored_as_encoded(store, spec, chunks)


def test_a_gpu_batch_that_does_not_fill_goes_once_enough_values_came_after_it(
    make_quiet: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shape of its own (here one 56-token value, first in eviction order) does not wait
    in its batch behind the whole window while the GPU is busy with full batches of
    another shape: it goes once WRITE_AHEAD_GPU_GATHER_BYTES of values were chosen after
    it, before the full batches chosen later."""
    spec = "cachegen:level=1"
    store = make_quiet(ssd_write_ahead=1.0, codec=(f"ssd={spec}",))
    names = ["b0", *(f"a{i}" for i in range(6))]
    chunks = two_shapes(store, monkeypatch, names)
    a = chunks[1].nbytes
    monkeypatch.setattr("kvstore.store.WRITE_AHEAD_GPU_BYTES", 2 * a)  # two of a shape
    monkeypatch.setattr("kvstore.store.GPU_ENCODE_THREADS", 0)  # "busy": see above
    monkeypatch.setattr("kvstore.store.WRITE_AHEAD_GPU_GATHER_BYTES", 3 * a)
    submitted: list[list[str]] = []
    submit = store._submit_gpu

    def seen(job: Any, jobs: Any) -> Any:
        submitted.append([names[int.from_bytes(e.key, "big")] for e, _ in job[0]])
        return submit(job, jobs)

    store._submit_gpu = seen  # type: ignore[method-assign]
    assert write_ahead(store) == 7
    # b0's batch is overdue once a2 is chosen (b0 + three a's after its start).
    assert submitted == [["a0", "a1"], ["b0"], ["a2", "a3"], ["a4", "a5"]]
    assert_stored_as_encoded(store, spec, chunks)


def test_gpu_batches_encode_in_the_order_chosen_a_few_at_a_time(
    make_quiet: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GPU batches go to threads of their own (`kvstore.threads.gpu_encode_pool`), taken in
    the order the writer chose them, GPU_ENCODE_THREADS at a time; none waits in the host
    pool (whose threads decode reads' values)."""
    spec = "cachegen:level=1"
    store = make_quiet(ssd_write_ahead=1.0, codec=(f"ssd={spec}",))
    for i in range(4):
        put_kv(store, key(i), kv_value(i))
    store._encode_device = 0  # as --encode-gpu 0 would set it, on a machine with a GPU
    monkeypatch.setattr("kvstore.store.WRITE_AHEAD_GPU_BYTES", kv_value(0).nbytes)  # one each
    started: list[bytes] = []
    lock = threading.Lock()

    def on_gpu(codec: Any, items: Any, device: int) -> Any:
        assert threading.current_thread().name.startswith("kvstore-gpu-encode")
        return encode_stored_many(codec, items, None)  # the host's bytes, as the GPU's are

    gpu, most = at_once(on_gpu)
    real = store._encode_ahead

    def seen(part: Any, codecs: Any) -> Any:
        with lock:
            started.append(part[0][0].key)
        return real(part, codecs)

    store._encode_ahead = seen  # type: ignore[method-assign]
    monkeypatch.setattr("kvstore.codecs.values.encode_stored_many", gpu)
    assert write_ahead(store) == 4
    assert most[0] == GPU_ENCODE_THREADS
    assert started[:GPU_ENCODE_THREADS] in (
        [key(0), key(1)], [key(1), key(0)]
    ) and started[GPU_ENCODE_THREADS:] == [key(2), key(3)]  # fmt: skip
    for i in range(4):
        assert stored_record(store, key(i)) == host_encoded(spec, i, store)


def test_with_a_gpu_values_encoded_on_the_host_keep_the_host_limit(
    make_quiet: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU's larger limits choose more values at a time, but those whose codec does not
    encode on the GPU (zstd here) go to the host pool WRITE_AHEAD_VALUES at a time, as
    without a GPU: the pool's other work does not queue behind more of them."""
    store = make_quiet(ssd_write_ahead=1.0, codec=("ssd=zstd",))
    for i in range(4):
        put_kv(store, key(i), kv_value(i))
    store._encode_device = 0  # as --encode-gpu 0 would set it, on a machine with a GPU
    monkeypatch.setattr("kvstore.store.WRITE_AHEAD_VALUES", 1)
    monkeypatch.setattr("kvstore.store.WRITE_AHEAD_GPU_VALUES", 4)
    real = store._encode_ahead

    def on_host(part: Any, codecs: Any) -> Any:
        assert codecs is None  # zstd: on the host
        return real(part, codecs)

    store._encode_ahead, most = at_once(on_host)  # type: ignore[method-assign]
    assert write_ahead(store) == 4
    assert most[0] == 1
    for i in range(4):
        assert stored_record(store, key(i)) == host_encoded("zstd", i, store)


def test_the_gpu_scratch_is_given_back_when_the_store_closes(
    make_quiet: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scratch still held when the store closes (the writer busy until then) is given back."""
    store = make_quiet(ssd_write_ahead=1.0, codec=("ssd=cachegen:level=1",))
    put_kv(store, key(0), kv_value(0))
    store._encode_device = 0  # as --encode-gpu 0 would set it, on a machine with a GPU
    monkeypatch.setattr(
        "kvstore.codecs.values.encode_stored_many",
        lambda codec, items, device: encode_stored_many(codec, items, None),
    )
    released: list[int] = []
    monkeypatch.setattr("kvstore.kernels._cuda.release_memory", released.append)
    assert write_ahead(store) == 1
    assert released == []
    store.close()
    assert released == [0]


def test_a_value_the_gpu_refuses_leaves_the_rest_of_its_batch_there(
    make_quiet: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A value of a GPU batch that the codec refuses (named by ValuesRefused) is encoded on
    the host; the batch's other values go to the GPU again without it, not to the host."""
    spec = "cachegen:level=1"
    store = make_quiet(ssd_write_ahead=1.0, codec=(f"ssd={spec}",))
    for i in range(4):
        put_kv(store, key(i), kv_value(i))
    store._encode_device = 0  # as --encode-gpu 0 would set it, on a machine with a GPU
    real_many = encode_stored_many
    batches: list[int] = []

    def gpu(codec: Any, items: Any, device: int) -> Any:
        batches.append(len(items))
        if len(items) == 4:
            raise ValuesRefused("value 1: out of range (and 1 more values)", [3, 1])
        return real_many(codec, items, None)  # the host's bytes, as the GPU's are

    monkeypatch.setattr("kvstore.codecs.values.encode_stored_many", gpu)
    on_host: list[bytes] = []
    real_encoded = store._encoded

    def encoded(e: Any, value: Any, tier: str = "ssd") -> Any:
        on_host.append(e.key)
        return real_encoded(e, value, tier)

    store._encoded = encoded  # type: ignore[method-assign]
    released: list[int] = []
    monkeypatch.setattr("kvstore.kernels._cuda.release_memory", released.append)
    assert write_ahead(store) == 4
    assert batches == [4, 2]
    assert len(on_host) == 2
    store._release_idle_gpu_scratch()
    assert released == []  # kept while the writer may encode again at once
    store._gpu_used_at -= GPU_SCRATCH_IDLE_S
    store._release_idle_gpu_scratch()
    assert released == [0]  # given back once the writer has been idle that long
    store._release_idle_gpu_scratch()
    assert released == [0]  # once
    writer = store.stats().writer
    assert (writer.ahead, writer.encoded_gpu, writer.encoded_host) == (4, 2, 2)
    for i in range(4):
        assert stored_record(store, key(i)) == host_encoded(spec, i, store)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_values_encoded_on_the_gpu_are_the_hosts_bytes(
    make_quiet: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cupy

    import kvstore.kernels._cuda as cuda_helpers

    pool = cupy.get_default_memory_pool()
    cached: list[int] = []  # what CuPy's pool kept of the batch when the burst ended
    release = cuda_helpers.release_memory

    def measured(device: int) -> None:
        with cupy.cuda.Device(device):
            cached.append(pool.free_bytes())
        release(device)

    # What earlier tests in this process left cached (their GPU decoders' tables) is not
    # this store's: give back what can be given back, and count only what the store adds.
    cuda_helpers.release_memory(0)
    with cupy.cuda.Device(0):
        left_before = pool.free_bytes()
    monkeypatch.setattr(cuda_helpers, "release_memory", measured)
    spec = "cachegen:level=2"
    store = make_quiet(ssd_write_ahead=1.0, codec=(f"ssd={spec}",), encode_gpu="0")
    assert store._encode_device == 0
    vals = {key(i): kv_value(i) for i in range(4)}
    for k, t in vals.items():
        put_kv(store, k, t)
    assert write_ahead(store) == 4
    for i in range(4):
        assert stored_record(store, key(i)) == host_encoded(spec, i, store)
    assert cached == []  # kept while the writer is busy
    store._gpu_used_at -= GPU_SCRATCH_IDLE_S
    store._release_idle_gpu_scratch()
    # The batch's scratch (several times its 4 MiB) went back to the driver, not the pool;
    # only the rest of a block that stays in use (the checksum's key table) can remain.
    assert len(cached) == 1 and cached[0] > 4 * MiB
    with cupy.cuda.Device(0):
        assert pool.free_bytes() - left_before < 64 << 10
    assert make_quiet(data_dir=store.config.data_dir.parent / "b")._encode_device is None  # auto


def test_encode_gpu_names_a_gpu_that_exists(make_store: MakeStore) -> None:
    with pytest.raises(RuntimeError, match="--encode-gpu 999 names CUDA GPU 999"):
        make_store(encode_gpu="999")


def test_reads_stay_right_while_the_background_writer_races_puts_and_deletes(
    make_store: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer copies values while puts replace them, deletes remove them and evictions
    take them (two values in flight at a time, so it chooses again and again): every read
    returns the last value put under its key, or nothing after a delete, and after a
    restart ssd serves no replaced value. A soak of the whole mix: the one race it rarely
    hits is provoked on purpose in test_values_changed_while_encoded_are_not_written."""
    import random

    monkeypatch.setattr("kvstore.store.WRITE_AHEAD_VALUES", 2)
    store = make_store(
        ssd_write_ahead=1.0, cpu_bytes="8MiB", ssd_bytes="64MiB", codec=("ssd=zstd",)
    )
    rng = random.Random(7)
    expected: dict[bytes, bytes | None] = {}
    for op in range(300):
        k = key(rng.randrange(24))  # 12 MiB of values for 8 MiB of cpu: evictions too
        roll = rng.random()
        if roll < 0.45:
            data = bytes([op % 251]) * 4096 + os.urandom(MiB // 2 - 4096)
            put(store, k, data)
            expected[k] = data
        elif roll < 0.55:
            store.delete(NS, [k])
            expected[k] = None
        else:
            assert read(store, k) == expected.get(k), f"op {op}"
        if op % 50 == 0:
            time.sleep(0.02)  # let the writer catch up and copy a window
    deadline = time.monotonic() + 10
    while store.stats().writer.ahead == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.stats().writer.ahead > 0  # the writer copied values during all this
    assert tier_stats(store, "cpu").counters.evictions > 0  # and evictions took some
    for k, want in expected.items():
        assert read(store, k) == want
    # What ssd holds is what a restart serves: never a replaced value's bytes.
    store.close()
    again = make_store(ssd_write_ahead=0, cpu_bytes="8MiB", ssd_bytes="64MiB", codec=("ssd=zstd",))
    for k, want in expected.items():
        assert read(again, k) in (None, want)


@pytest.mark.parametrize("on_gpu", [False, True])
def test_cachegen_x_chunks_at_their_positions_share_a_gpu_batch(
    make_quiet: MakeStore, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, on_gpu: bool
) -> None:
    """A profile's chunks put at several positions (the newest one a level finer) go to the
    GPU in one batch, with a codec each at its position and level (`Codec.gpu_batch`), a
    shorter chunk in a batch of its own, and are stored as the host encodes each of them:
    encoded on the host in the batch's place (`on_gpu` False), or on a real GPU."""
    if on_gpu and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    sys.path.insert(0, str(Path(__file__).parent / "codecs"))
    from cross_fixture import LayeredKV

    world = LayeredKV(4, 2, 64, seed=7)
    spec = f"cachegen:level=2,profile={world.profile_file(tmp_path / 'p.json')}"
    store = make_quiet(ssd_write_ahead=1.0, codec=(f"ssd={spec}",))
    # The shorter chunk in the others' slab class (the arena is one page: another class's
    # slot would evict them).
    chunks = [world.tensor(64 if i < 3 else 56, 64 * i, seed=i) for i in range(4)]
    for i, t in enumerate(chunks):
        raw = bytes(tensor_bytes(t))
        res = store.begin_put(
            NS, key(i), "float16", list(t.shape), len(raw), checksum(raw), newest=i == 2,
            position=64 * i,
        )  # fmt: skip
        res.write(raw)
        res.commit()
    store._encode_device = 0  # as --encode-gpu 0 would set it, on a machine with a GPU
    batches: list[list[tuple[int, int]]] = []  # per batch, (position, level) a value

    def gpu(codec: Any, items: Any, device: int) -> Any:
        codecs = codec if isinstance(codec, list) else [codec] * len(items)
        batches.append([(int(c.params["position"]), int(c.params["level"])) for c in codecs])
        return encode_stored_many(codecs, items, device if on_gpu else None)

    monkeypatch.setattr("kvstore.codecs.values.encode_stored_many", gpu)
    assert write_ahead(store) == 4
    assert sorted(sorted(b) for b in batches) == [[(0, 2), (64, 2), (128, 1)], [(192, 2)]]
    base = codec_from_spec(spec)
    for i, t in enumerate(chunks):
        codec = base.for_position(64 * i, t.shape)
        codec = codec.for_newest() if i == 2 else codec
        header, payload = encode_stored(codec, entry(store, key(i)).header(), tensor_bytes(t))
        got_header, got = stored_record(store, key(i))
        assert got == bytes(payload) and got_header.params == header.params
        assert got_header.codec == codec.codec_id == 7  # cachegen-x
