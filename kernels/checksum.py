"""XXH3-64 of many buffers at once on the GPU, byte-identical to `xxhash.xxh3_64`.

Every stored value carries the XXH3-64 of its bytes (`kvstore.codecs.container.checksum`).
A value copied between a GPU and the host arena at PCIe speed cannot also be hashed by the
CPU at that speed (on the lent H100's host, twelve cores hash about 50 GB/s while the copy
engine moves 55 GB/s over the same memory). The GPU has bandwidth to spare, and XXH3's
long-input loop splits into parallel work:

- the input is read in 1 KiB blocks of 16 stripes; within a block, each of the 8 64-bit
  accumulator lanes only *adds* per-stripe terms, so the sum of a block's terms per lane
  (`phase 1`) can be computed for every block in parallel;
- across blocks, lane i evolves alone: acc = scramble(acc + block_sum), a short serial chain
  per (buffer, lane) (`phase 2`, one thread each), then the 8 lanes merge into the digest.

`xxh3_64_gpu` runs both phases for a batch of device (or UVA-mapped pinned host) buffers on
a stream; `xxh3_64_phased` is the CPU twin (numba) of the same decomposition, used to test
it against the reference on machines without a GPU. Buffers of 240 bytes or less take
XXH3's short-input paths, which these do not implement: `needs_cpu(n)` says so, and callers
hash those few bytes on the CPU.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numba
import numpy as np

from kvstore.kernels._cuda import KernelModule
from kvstore.kernels.blocks import BlockError, DeviceBuffer, as_cupy_stream

SHORT_MAX = 240
STRIPE, BLOCK, STRIPES_PER_BLOCK = 64, 1024, 16

_SECRET = bytes.fromhex(
    "b8fe6c3923a44bbe7c01812cf721ad1cded46de9839097db7240a4a4b7b3671f"
    "cb79e64eccc0e578825ad07dccff7221b8084674f743248ee03590e6813a264c"
    "3c2852bb91c300cb88d0658b1b532ea371644897a20df94e3819ef46a9deacd8"
    "a8fa763fe39c343ff9dcbbc7c70b4f1d8a51e04bcdb45931c89f7ec9d9787364"
    "eac5ac8334d3ebc3c581a0fffa1363eb170ddd51b7f0da49d316552629d4689e"
    "2b16be587d47a1fc8ff8b8d17ad031ce45cb3a8f95160428afd7fbcabb4b407e"
)
assert len(_SECRET) == 192


def _secret64(offset: int, count: int) -> np.ndarray:
    return np.frombuffer(_SECRET[offset : offset + 8 * count], "<u8").copy()


# Secret words each part of the algorithm reads (some at unaligned byte offsets).
STRIPE_KEYS = _secret64(0, 24)  # stripe s, lane i reads word s + i
SCRAMBLE_KEYS = _secret64(128, 8)
LAST_KEYS = _secret64(121, 8)  # the final stripe: 192 - 64 - 7
MERGE_KEYS = _secret64(11, 8)
INIT_ACC = np.array(
    [
        0xC2B2AE3D,
        0x9E3779B185EBCA87,
        0xC2B2AE3D27D4EB4F,
        0x165667B19E3779F9,
        0x85EBCA77C2B2AE63,
        0x85EBCA77,
        0x27D4EB2F165667C5,
        0x9E3779B1,
    ],
    np.uint64,
)
PRIME32_1 = np.uint64(0x9E3779B1)
PRIME64_1 = np.uint64(0x9E3779B185EBCA87)
PRIME_MX1 = np.uint64(0x165667919E3779F9)


def needs_cpu(nbytes: int) -> bool:
    """Whether a buffer of `nbytes` takes XXH3's short-input path (not done here)."""
    return nbytes <= SHORT_MAX


def shape_of(nbytes: int) -> tuple[int, int]:
    """(full blocks, stripes in the last partial block) of a long input."""
    full = (nbytes - 1) // BLOCK
    return full, ((nbytes - 1) - full * BLOCK) // STRIPE


# ------------------------------------------------------------------------------ CPU twin


@numba.njit(cache=True, nogil=True)
def _mul_fold(a: np.uint64, b: np.uint64) -> np.uint64:
    """Low xor high half of the 128-bit product a * b."""
    mask = np.uint64(0xFFFFFFFF)
    a_lo, a_hi, b_lo, b_hi = a & mask, a >> np.uint64(32), b & mask, b >> np.uint64(32)
    lo_lo, hi_lo, lo_hi, hi_hi = a_lo * b_lo, a_hi * b_lo, a_lo * b_hi, a_hi * b_hi
    cross = (lo_lo >> np.uint64(32)) + (hi_lo & mask) + lo_hi
    upper = (hi_lo >> np.uint64(32)) + (cross >> np.uint64(32)) + hi_hi
    lower = (cross << np.uint64(32)) | (lo_lo & mask)
    return lower ^ upper


@numba.njit(cache=True, nogil=True)
def _stripe_terms(words: np.ndarray, keys: np.ndarray, key0: int, sums: np.ndarray) -> None:
    """Add the accumulator terms of one stripe (8 little-endian words) to `sums`."""
    mask = np.uint64(0xFFFFFFFF)
    for i in range(8):
        key = words[i] ^ keys[key0 + i]
        sums[i] += words[i ^ 1] + (key & mask) * (key >> np.uint64(32))


@numba.njit(cache=True, nogil=True)
def _phased(data: np.ndarray, stripe_keys, scramble_keys, last_keys, merge_keys, init) -> np.uint64:  # type: ignore[no-untyped-def]
    n = data.size
    full = (n - 1) // 1024
    partial = ((n - 1) - full * 1024) // 64
    acc = init.copy()
    sums = np.zeros(8, np.uint64)
    words = np.empty(8, np.uint64)
    for b in range(full + 1):  # phase 1 and 2 interleaved here; the GPU splits them
        sums[:] = 0
        stripes = 16 if b < full else partial
        for s in range(stripes):
            base = b * 1024 + s * 64
            for i in range(8):
                words[i] = data[base + 8 * i : base + 8 * i + 8].view(np.uint64)[0]
            _stripe_terms(words, stripe_keys, s, sums)
        if b < full:
            for i in range(8):
                a = acc[i] + sums[i]
                a ^= a >> np.uint64(47)
                acc[i] = (a ^ scramble_keys[i]) * np.uint64(0x9E3779B1)
        else:
            base = n - 64
            for i in range(8):
                words[i] = data[base + 8 * i : base + 8 * i + 8].copy().view(np.uint64)[0]
            _stripe_terms(words, last_keys, 0, sums)
            for i in range(8):
                acc[i] += sums[i]
    h = np.uint64(n) * np.uint64(0x9E3779B185EBCA87)
    for i in range(4):
        h += _mul_fold(acc[2 * i] ^ merge_keys[2 * i], acc[2 * i + 1] ^ merge_keys[2 * i + 1])
    h ^= h >> np.uint64(37)
    h *= np.uint64(0x165667919E3779F9)
    h ^= h >> np.uint64(32)
    return h


def xxh3_64_phased(data: Any) -> int:
    """XXH3-64 of a long (> 240 bytes) host buffer, by the GPU kernels' decomposition."""
    arr = np.frombuffer(memoryview(data).cast("B"), np.uint8)
    if needs_cpu(arr.size):
        raise BlockError(f"{arr.size} bytes take XXH3's short-input path; hash them with xxhash")
    return int(_phased(arr, STRIPE_KEYS, SCRAMBLE_KEYS, LAST_KEYS, MERGE_KEYS, INIT_ACC))


# ------------------------------------------------------------------------------ GPU

_CUDA_SOURCE = r"""
typedef unsigned long long u64;

__device__ __forceinline__ u64 load64(const unsigned char* p) {
    // Inputs are 8-byte aligned except, possibly, the final stripe at len - 64.
    if ((reinterpret_cast<size_t>(p) & 7) == 0) return *reinterpret_cast<const u64*>(p);
    u64 v = 0;
#pragma unroll
    for (int b = 7; b >= 0; --b) v = (v << 8) | p[b];
    return v;
}

__device__ __forceinline__ u64 term(u64 own, u64 other, u64 key) {
    u64 k = own ^ key;
    return other + (k & 0xFFFFFFFFull) * (k >> 32);
}

// Phase 1: one thread per (block, lane) of each buffer: the sum of the block's terms for
// that lane. Entry `full` of a buffer (its last) is the partial block plus the last stripe.
extern "C" __global__ void xxh3_block_sums(const u64* __restrict__ ptrs,
                                           const long long* __restrict__ lens,
                                           const long long* __restrict__ first,
                                           const u64* __restrict__ keys, u64* __restrict__ sums) {
    const int buf = blockIdx.y;
    const unsigned char* data = reinterpret_cast<const unsigned char*>(ptrs[buf]);
    const long long n = lens[buf];
    const long long full = (n - 1) / 1024;
    const int lane = threadIdx.x & 7;
    for (long long b = (blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 3; b <= full;
         b += ((long long)gridDim.x * blockDim.x) >> 3) {
        const unsigned char* p = data + b * 1024;
        u64 sum = 0;
        if (b < full) {
#pragma unroll
            for (int s = 0; s < 16; ++s) {
                u64 own = load64(p + s * 64 + lane * 8);
                u64 other = load64(p + s * 64 + (lane ^ 1) * 8);
                sum += term(own, other, __ldg(keys + s + lane));
            }
        } else {
            const int stripes = (int)(((n - 1) - full * 1024) / 64);
            for (int s = 0; s < stripes; ++s) {
                u64 own = load64(p + s * 64 + lane * 8);
                u64 other = load64(p + s * 64 + (lane ^ 1) * 8);
                sum += term(own, other, __ldg(keys + s + lane));
            }
            const unsigned char* last = data + n - 64;
            sum += term(load64(last + lane * 8), load64(last + (lane ^ 1) * 8), keys[32 + lane]);
        }
        sums[(first[buf] + b) * 8 + lane] = sum;
    }
}

// Phase 2: one thread per (buffer, lane) runs the lane's chain over the block sums; the 8
// lanes of a buffer then merge into its digest (lanes of a buffer share one warp).
extern "C" __global__ void xxh3_merge(const long long* __restrict__ lens,
                                      const long long* __restrict__ first,
                                      const u64* __restrict__ keys, const u64* __restrict__ sums,
                                      u64* __restrict__ out, int count) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    const int buf = t >> 3, lane = t & 7;
    const bool live = buf < count;
    u64 acc = 0;
    if (live) {
        const long long n = lens[buf];
        const long long full = (n - 1) / 1024;
        const u64* s = sums + first[buf] * 8 + lane;
        const u64 key = keys[24 + lane];
        acc = keys[48 + lane];  // initial accumulator
        long long b = 0;
        // The chain is serial; the loads are not: 32 block sums are in flight while the
        // previous 32 are folded in.
        u64 cur[32], nxt[32];
        if (full >= 32) {
#pragma unroll
            for (int j = 0; j < 32; ++j) cur[j] = s[j * 8];
        }
        for (; b + 32 <= full; b += 32) {
            const bool more = b + 64 <= full;
#pragma unroll
            for (int j = 0; j < 32; ++j) nxt[j] = more ? s[(b + 32 + j) * 8] : 0ull;
#pragma unroll
            for (int j = 0; j < 32; ++j) {
                u64 a = acc + cur[j];
                a ^= a >> 47;
                acc = (a ^ key) * 0x9E3779B1ull;
            }
#pragma unroll
            for (int j = 0; j < 32; ++j) cur[j] = nxt[j];
        }
        for (; b < full; ++b) {
            u64 a = acc + s[b * 8];
            a ^= a >> 47;
            acc = (a ^ key) * 0x9E3779B1ull;
        }
        acc += s[full * 8];
    }
    const unsigned mask = 0xFFFFFFFFu;
    u64 partner = __shfl_xor_sync(mask, acc, 1);
    if (live && (lane & 1) == 0) {
        u64 a = acc ^ keys[40 + lane], b = partner ^ keys[40 + lane + 1];
        acc = (a * b) ^ __umul64hi(a, b);  // mul128 folded
    }
    // Sum the four folded pairs (lanes 0, 2, 4, 6) into lane 0 of the buffer.
    u64 v = (lane & 1) ? 0ull : acc;
    v += __shfl_down_sync(mask, v, 2);
    v += __shfl_down_sync(mask, v, 4);
    if (live && lane == 0) {
        u64 h = (u64)lens[buf] * 0x9E3779B185EBCA87ull + v;
        h ^= h >> 37;
        h *= 0x165667919E3779F9ull;
        h ^= h >> 32;
        out[buf] = h;
    }
}
"""

_module = KernelModule(_CUDA_SOURCE, ("xxh3_block_sums", "xxh3_merge"))
_KEYS = np.concatenate([STRIPE_KEYS, SCRAMBLE_KEYS, LAST_KEYS, MERGE_KEYS, INIT_ACC])


_device_key_arrays: dict[int, Any] = {}


def _device_keys(device: int) -> Any:
    """The secret-derived words the kernels read, uploaded once per device."""
    keys = _device_key_arrays.get(device)
    if keys is None:
        import cupy

        keys = _device_key_arrays[device] = cupy.asarray(_KEYS)
        cupy.cuda.runtime.deviceSynchronize()
    return keys


class Digests:
    """XXH3-64 digests being computed on the GPU; `result()` waits and returns them."""

    def __init__(self, out: np.ndarray, event: Any) -> None:
        self._out = out  # pinned host memory the merge kernel writes through UVA
        self.event = event

    def result(self) -> list[int]:
        self.event.synchronize()
        return [int(x) for x in self._out]


# Buffers of launches not yet known to be done, with their events: dropping a `Digests`
# (a transfer that failed part-way) must not hand its pinned tables back to the pool, and
# to another allocation, while its kernels may still write into them.
_in_flight: list[tuple[Any, tuple[Any, ...]]] = []
_in_flight_lock = threading.Lock()


def _keep_until_done(event: Any, keep: tuple[Any, ...]) -> None:
    with _in_flight_lock:
        _in_flight[:] = [(e, k) for e, k in _in_flight if not e.done]
        _in_flight.append((event, keep))


def xxh3_64_gpu(buffers: Sequence[DeviceBuffer], device: int, stream: Any = None) -> Digests:
    """Start hashing `buffers` (each longer than 240 bytes, 8-byte aligned, device memory of
    `device` or pinned host memory) on `stream`; ordered after work already on it."""
    for b in buffers:
        if b.device is not None and b.device != device:
            raise BlockError(f"a buffer to hash is on GPU {b.device}, not GPU {device}")
    ptrs = np.fromiter((b.ptr for b in buffers), np.uint64, len(buffers))
    lens = np.fromiter((b.nbytes for b in buffers), np.int64, len(buffers))
    return xxh3_64_gpu_spans(ptrs, lens, device, stream)


def xxh3_64_gpu_spans(
    ptrs: np.ndarray, lens: np.ndarray, device: int, stream: Any = None
) -> Digests:
    """`xxh3_64_gpu` of the buffers at addresses `ptrs` (uint64) of `lens` bytes (int64),
    all on `device` (or pinned host memory): for a caller that has them as arrays."""
    import cupy

    if not len(ptrs):
        raise BlockError("no buffers to hash")
    if (lens <= SHORT_MAX).any():
        raise BlockError(f"buffers of {SHORT_MAX} bytes or less are hashed on the CPU")
    if (ptrs % 8).any():
        raise BlockError("buffers to hash must be 8-byte aligned")
    entries = (lens - 1) // BLOCK + 1
    n = len(ptrs)
    # Per-buffer pointers, lengths and scratch offsets, then the digests: all in pinned host
    # memory the kernels read and write through UVA. Copies would queue on the copy engines
    # behind whatever transfer these buffers are part of.
    pinned = cupy.cuda.alloc_pinned_memory(8 * 4 * n)
    meta = np.frombuffer(pinned, np.uint64, 4 * n)
    meta[:n] = ptrs
    meta[n : 2 * n] = lens
    meta[2 * n : 3 * n] = np.concatenate([[0], np.cumsum(entries)[:-1]])
    out = meta[3 * n :]
    base = meta.ctypes.data
    with cupy.cuda.Device(device):
        s = as_cupy_stream(stream)
        d_keys = _device_keys(device)
        with s:
            sums = cupy.empty(int(entries.sum()) * 8, cupy.uint64)
        threads = 256
        per_buffer = min(-(-int(entries.max()) * 8 // threads), 4096)
        for start in range(0, n, 65535):
            count = min(65535, n - start)
            _module.get(device, "xxh3_block_sums")(
                (per_buffer, count),
                (threads,),
                (
                    np.uint64(base + 8 * start),
                    np.uint64(base + 8 * (n + start)),
                    np.uint64(base + 8 * (2 * n + start)),
                    d_keys,
                    sums,
                ),
                stream=s,
            )
        _module.get(device, "xxh3_merge")(
            (-(-n * 8 // threads),),
            (threads,),
            (
                np.uint64(base + 8 * n),
                np.uint64(base + 16 * n),
                d_keys,
                sums,
                np.uint64(base + 24 * n),
                np.int32(n),
            ),
            stream=s,
        )
        event = cupy.cuda.Event(block=False, disable_timing=True)
        event.record(s)
    _keep_until_done(event, (sums, pinned))
    return Digests(out, event)
