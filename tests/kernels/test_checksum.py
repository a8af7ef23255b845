"""XXH3-64 on the GPU: the decomposition (CPU twin) and the kernels against `xxhash`."""

from __future__ import annotations

import numpy as np
import pytest
import xxhash

from kvstore.kernels.blocks import BlockError, DeviceBuffer
from kvstore.kernels.checksum import needs_cpu, xxh3_64_gpu, xxh3_64_phased
from tests.kernels.test_blocks import gpu

# Around every boundary of the long-input loop: short/long, stripes, blocks, odd tails.
LENGTHS = [241, 255, 256, 257, 1023, 1024, 1025, 1087, 1088, 2047, 2048, 2049, 4096 + 7,
           65536, 65536 + 13, (1 << 20) + 64, 3 * (1 << 20) + 1]  # fmt: skip


def random_bytes(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


@pytest.mark.parametrize("n", LENGTHS)
def test_cpu_twin_matches_xxhash(n: int) -> None:
    data = random_bytes(n, n)
    assert xxh3_64_phased(data) == xxhash.xxh3_64_intdigest(data)


def test_cpu_twin_matches_xxhash_on_random_lengths() -> None:
    rng = np.random.default_rng(7)
    for n in rng.integers(241, 20_000, 200):
        data = random_bytes(int(n), int(n) + 1)
        assert xxh3_64_phased(data) == xxhash.xxh3_64_intdigest(data), n


def test_short_inputs_are_left_to_the_cpu() -> None:
    assert needs_cpu(240) and not needs_cpu(241)
    with pytest.raises(BlockError, match="short-input"):
        xxh3_64_phased(bytes(240))


@gpu
def test_gpu_digests_match_xxhash_for_a_batch() -> None:
    import cupy

    rng = np.random.default_rng(3)
    lengths = LENGTHS + [int(n) for n in rng.integers(241, 300_000, 300)]
    hosts = [random_bytes(n, i) for i, n in enumerate(lengths)]
    # One device buffer, each input at an 8-byte aligned offset, with odd gaps between.
    offsets, total = [], 0
    for n in lengths:
        offsets.append(total)
        total += -(-(n + 24) // 8) * 8
    dev = cupy.zeros(total, cupy.uint8)
    for h, off in zip(hosts, offsets, strict=True):
        dev[off : off + h.size] = cupy.asarray(h)
    buffers = [DeviceBuffer(dev.data.ptr + o, n, 0) for o, n in zip(offsets, lengths, strict=True)]
    stream = cupy.cuda.Stream(non_blocking=True)
    got = xxh3_64_gpu(buffers, 0, stream).result()
    assert got == [xxhash.xxh3_64_intdigest(h) for h in hosts]


@gpu
def test_gpu_digests_of_pinned_host_memory_through_uva() -> None:
    import cupy

    n = 5 * (1 << 20) + 40
    pinned = cupy.cuda.alloc_pinned_memory(n)
    host = np.frombuffer(pinned, np.uint8, n)
    host[:] = random_bytes(n, 9)
    got = xxh3_64_gpu([DeviceBuffer(host.ctypes.data, n, None)], 0).result()
    assert got == [xxhash.xxh3_64_intdigest(host)]


@gpu
def test_gpu_refuses_short_or_misaligned_buffers() -> None:
    import cupy

    dev = cupy.zeros(4096, cupy.uint8)
    with pytest.raises(BlockError, match="240"):
        xxh3_64_gpu([DeviceBuffer(dev.data.ptr, 200, 0)], 0)
    with pytest.raises(BlockError, match="aligned"):
        xxh3_64_gpu([DeviceBuffer(dev.data.ptr + 4, 1000, 0)], 0)
