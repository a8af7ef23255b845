"""gather_blocks / scatter_blocks: the numba twins against NumPy, the CUDA kernels against
the twins (byte for byte, on a GPU), and every refusal made before anything is written."""

from __future__ import annotations

import numpy as np
import pytest

from kvstore.kernels import (
    BlockError,
    gather_blocks,
    gather_blocks_cpu,
    scatter_blocks,
    scatter_blocks_cpu,
)


def _cuda_devices() -> int:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # no cupy, no driver, no device: all mean no GPU here
        return 0


gpu = pytest.mark.skipif(_cuda_devices() == 0, reason="needs a CUDA GPU and CuPy")

# (block bytes, slots in the pool, k): edge sizes, one block, many tiny blocks, big blocks
CASES = [
    (16, 64, 1),
    (16, 4096, 100_000),
    (48, 1000, 777),
    (4096, 512, 300),
    (65536, 64, 64),
    (16 * 1024 + 16, 40, 25),
]


def make_case(block: int, slots: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 256, block * slots, dtype=np.uint8)
    ids = rng.integers(0, slots, k)  # unsorted, with repeats
    return pool, ids


def reference_gather(pool: np.ndarray, ids: np.ndarray, block: int) -> np.ndarray:
    return pool.reshape(-1, block)[ids].reshape(-1)


@pytest.mark.parametrize(("block", "slots", "k"), CASES)
def test_cpu_gather_matches_numpy(block: int, slots: int, k: int) -> None:
    pool, ids = make_case(block, slots, k, seed=block + k)
    out = np.zeros(k * block, np.uint8)
    assert gather_blocks_cpu(pool, ids, out, block) is None
    assert np.array_equal(out, reference_gather(pool, ids, block))


@pytest.mark.parametrize(("block", "slots", "k"), CASES)
def test_cpu_scatter_matches_numpy(block: int, slots: int, k: int) -> None:
    rng = np.random.default_rng(k)
    k = min(k, slots)
    ids = rng.permutation(slots)[:k]  # unsorted, each slot once
    dense = rng.integers(0, 256, k * block, dtype=np.uint8)
    pool = rng.integers(0, 256, slots * block, dtype=np.uint8)
    want = pool.copy().reshape(-1, block)
    want[ids] = dense.reshape(-1, block)
    scatter_blocks_cpu(dense, ids, pool, block)
    assert np.array_equal(pool, want.reshape(-1))


def test_cpu_twins_take_torch_tensors_and_round_trip() -> None:
    torch = pytest.importorskip("torch")
    pool = torch.randint(0, 256, (32 * 256,), dtype=torch.uint8)
    ids = [5, 0, 31, 7]
    dense = torch.empty(len(ids) * 256, dtype=torch.uint8)
    gather_blocks_cpu(pool, ids, dense, 256)
    back = torch.zeros_like(pool)
    scatter_blocks_cpu(dense, ids, back, 256)
    assert torch.equal(back.view(32, 256)[ids], pool.view(32, 256)[ids])


@pytest.mark.parametrize(("block", "pitch"), [(64, 64), (64, 128), (48, 16), (4096, 64)])
def test_cpu_twins_address_slots_by_pitch(block: int, pitch: int) -> None:
    # Values of a slab allocator start at 64-byte aligned offsets, not at multiples of
    # their size: a gather by offset passes offset // pitch with the alignment as pitch.
    rng = np.random.default_rng(block + pitch)
    pool = rng.integers(0, 256, 64 * 1024, dtype=np.uint8)
    slots = (pool.size - block) // pitch + 1
    ids = rng.integers(0, slots, 50)
    out = np.zeros(ids.size * block, np.uint8)
    gather_blocks_cpu(pool, ids, out, block, slot_bytes=pitch)
    want = np.concatenate([pool[i * pitch : i * pitch + block] for i in ids])
    assert np.array_equal(out, want)
    with pytest.raises(BlockError, match="outside the pool"):
        gather_blocks_cpu(pool, [slots], out, block, slot_bytes=pitch)
    if pitch >= block:
        uniq = rng.permutation(slots)[:20]
        dense = rng.integers(0, 256, uniq.size * block, dtype=np.uint8)
        scatter_blocks_cpu(dense, uniq, pool, block, slot_bytes=pitch)
        got = np.concatenate([pool[i * pitch : i * pitch + block] for i in uniq])
        assert np.array_equal(got, dense)
    else:
        with pytest.raises(BlockError, match="one block apart"):
            scatter_blocks_cpu(out, [0], pool, block, slot_bytes=pitch)


BAD = {
    "block not a multiple of 16": (24, [0], "multiple of 16"),
    "zero block": (0, [0], "positive"),
    "negative slot": (64, [1, -1], "outside the pool"),
    "slot past the pool": (64, [0, 16], "outside the pool"),
    "float ids": (64, [0.5], "integers"),
    "2-D ids": (64, [[0, 1]], "one-dimensional"),
    "out too small": (64, list(range(9)), "need"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_cpu_refusals_write_nothing(case: str) -> None:
    block, ids, message = BAD[case]
    pool = np.arange(16 * 64, dtype=np.uint8)  # 16 slots of 64 bytes
    out = np.full(8 * 64, 7, np.uint8)
    with pytest.raises(BlockError, match=message):
        gather_blocks_cpu(pool, ids, out, block)
    assert (out == 7).all()
    with pytest.raises(BlockError, match=message):
        scatter_blocks_cpu(out, ids, pool, block)
    assert np.array_equal(pool, np.arange(16 * 64, dtype=np.uint8))


def test_scatter_refuses_a_slot_written_twice() -> None:
    pool = np.zeros(16 * 64, np.uint8)
    with pytest.raises(BlockError, match="twice"):
        scatter_blocks_cpu(np.ones(2 * 64, np.uint8), [3, 3], pool, 64)
    assert not pool.any()


def test_non_contiguous_host_buffers_are_refused() -> None:
    pool = np.zeros((64, 32), np.uint8)[:, ::2]
    with pytest.raises(BlockError, match="contiguous"):
        gather_blocks_cpu(pool, [0], np.zeros(16, np.uint8), 16)


# ------------------------------------------------------------------------------ GPU


@gpu
@pytest.mark.parametrize(("block", "slots", "k"), CASES)
def test_gpu_gather_and_scatter_match_the_cpu_twins(block: int, slots: int, k: int) -> None:
    import cupy

    pool, ids = make_case(block, slots, k, seed=block * 3 + k)
    want = np.zeros(k * block, np.uint8)
    gather_blocks_cpu(pool, ids, want, block)
    out = cupy.zeros(k * block, cupy.uint8)
    event = gather_blocks(cupy.asarray(pool), ids, out, block)
    event.synchronize()
    assert np.array_equal(cupy.asnumpy(out), want)

    uniq = np.random.default_rng(k).permutation(slots)[: min(k, slots)]
    dense = np.random.default_rng(block).integers(0, 256, uniq.size * block, dtype=np.uint8)
    host_pool = pool.copy()
    scatter_blocks_cpu(dense, uniq, host_pool, block)
    dev_pool = cupy.asarray(pool)
    scatter_blocks(cupy.asarray(dense), uniq, dev_pool, block).synchronize()
    assert np.array_equal(cupy.asnumpy(dev_pool), host_pool)


@gpu
def test_gpu_gather_reads_pinned_host_memory_through_uva() -> None:
    import cupy

    block, slots, k = 65536, 256, 200
    pinned = cupy.cuda.alloc_pinned_memory(block * slots)
    host = np.frombuffer(pinned, np.uint8, block * slots)
    host[:] = np.random.default_rng(1).integers(0, 256, host.size, dtype=np.uint8)
    # Under UVA, pinned host memory is mapped at the same address on the device.
    mem = cupy.cuda.UnownedMemory(host.ctypes.data, host.size, pinned)
    src = cupy.ndarray(host.size, cupy.uint8, cupy.cuda.MemoryPointer(mem, 0))
    ids = np.random.default_rng(2).integers(0, slots, k)
    out = cupy.empty(k * block, cupy.uint8)
    stream = cupy.cuda.Stream(non_blocking=True)
    gather_blocks(src, ids, out, block, stream=stream).synchronize()
    assert np.array_equal(cupy.asnumpy(out), reference_gather(host, ids, block))


@gpu
def test_gpu_gather_on_a_torch_stream_with_torch_tensors() -> None:
    torch = pytest.importorskip("torch")
    pool = torch.randint(0, 256, (128 * 1024,), dtype=torch.uint8, device="cuda")
    out = torch.empty(16 * 1024, dtype=torch.uint8, device="cuda")
    ids = list(range(127, 111, -1))
    stream = torch.cuda.Stream()
    event = gather_blocks(pool, ids, out, 1024, stream=stream)
    event.synchronize()
    assert torch.equal(out.view(16, 1024), pool.view(128, 1024)[ids])


@gpu
def test_gpu_refusals_launch_nothing() -> None:
    import cupy

    pool = cupy.arange(16 * 64, dtype=cupy.uint8)
    out = cupy.full(8 * 64, 7, cupy.uint8)
    for block, ids, message in BAD.values():
        with pytest.raises(BlockError, match=message):
            gather_blocks(pool, ids, out, block)
    with pytest.raises(BlockError, match="twice"):
        scatter_blocks(out, [1, 1], pool, 64)
    cupy.cuda.get_current_stream().synchronize()
    assert bool((out == 7).all())
    assert bool((pool == cupy.arange(16 * 64, dtype=cupy.uint8)).all())


@gpu
def test_gpu_gather_by_pitch_matches_the_cpu_twin() -> None:
    import cupy

    rng = np.random.default_rng(11)
    pool = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
    block, pitch = 4096 + 64, 64
    ids = rng.integers(0, (pool.size - block) // pitch + 1, 333)
    want = np.zeros(ids.size * block, np.uint8)
    gather_blocks_cpu(pool, ids, want, block, slot_bytes=pitch)
    out = cupy.zeros(want.size, cupy.uint8)
    gather_blocks(cupy.asarray(pool), ids, out, block, slot_bytes=pitch).synchronize()
    assert np.array_equal(cupy.asnumpy(out), want)


@gpu
def test_gpu_refuses_host_tensors_and_buffers_on_another_device() -> None:
    torch = pytest.importorskip("torch")
    import cupy

    pool = cupy.zeros(1 << 16, cupy.uint8)
    with pytest.raises(BlockError, match="CPU tensor"):
        gather_blocks(pool, [0], torch.zeros(64, dtype=torch.uint8), 64)
    if cupy.cuda.runtime.getDeviceCount() > 1:
        with cupy.cuda.Device(1):
            out = cupy.full(64, 7, cupy.uint8)
        with pytest.raises(BlockError, match="GPU 0"):
            gather_blocks(pool, [0], out, 64)
        assert bool((out == 7).all())


@gpu
def test_gpu_back_to_back_gathers_on_two_streams_each_see_their_own_ids() -> None:
    # The slot ids go through one device buffer per stream, reused call after call: every
    # gather must still read the ids it was given, not the next call's.
    import cupy

    block, slots = 4096, 1024
    pool_host = np.random.default_rng(5).integers(0, 256, block * slots, dtype=np.uint8)
    pool = cupy.asarray(pool_host)
    streams = [cupy.cuda.Stream(non_blocking=True) for _ in range(2)]
    rng = np.random.default_rng(6)
    jobs = []
    for i in range(60):
        ids = rng.integers(0, slots, int(rng.integers(1, 300)))
        out = cupy.empty(ids.size * block, cupy.uint8)
        gather_blocks(pool, ids, out, block, streams[i % 2])
        jobs.append((ids, out))
    for s in streams:
        s.synchronize()
    for ids, out in jobs:
        assert np.array_equal(cupy.asnumpy(out), reference_gather(pool_host, ids, block))
