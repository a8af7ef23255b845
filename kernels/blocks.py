"""Gather and scatter of fixed-size KV blocks by slot id, on the GPU and on the CPU.

A top-k sparse-attention step (Quest, ShadowKV, RetrievalAttention) picks k blocks of KV
scattered over a pool of fixed-size slots and needs them in one contiguous buffer. One
kernel over the list of slot ids does that at memory (or PCIe) speed, where a copy call
per block is bound by launch overhead.

- `gather_blocks(src, slot_ids, out, block_bytes, stream=None)`: out[i] = src[slot_ids[i]].
- `scatter_blocks(src, slot_ids, dst, block_bytes, stream=None)`: dst[slot_ids[i]] = src[i].

`src`/`dst`/`out` are flat byte buffers: CuPy arrays or CUDA torch tensors on the GPU
(device memory, or registered host memory addressed through UVA), NumPy arrays or CPU
torch tensors on the CPU. The GPU versions are asynchronous on `stream` (a CuPy stream, a
torch stream, or the current stream) and return a recorded `cupy.cuda.Event`; the CPU
versions (numba, parallel over blocks) return None when done. Both give identical bytes.

Every argument is checked on the host before anything is launched: block size a positive
multiple of 16 (the kernels move 16-byte vectors), slot ids integers within the pool,
`out` large enough, no slot written twice by a scatter. Slot ids are host arrays; they are
where the index lives.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np

from kvstore.kernels._cuda import KernelModule

VECTOR_BYTES = 16
_THREADS = 256
_HOST_CTAS = 32  # CTAs of a large gather or scatter whose pool is pinned host memory
_HOST_SMALL_BYTES = 4 << 20  # up to this many bytes, one CTA per block instead

_UNROLL = 4  # vectors each thread loads before it stores: independent reads in flight
_FEW = 128  # launches of at most this many slot ids pass them as a kernel parameter

_CUDA_SOURCE = r"""
// One CTA per block at a time (grid-stride over blocks); each thread issues UNROLL 16-byte
// loads before its first store. Slot b starts at slot(b) * pitch vectors of the pool.
// The ids come either in pinned host memory the kernel reads through UVA (a ring filled by
// the host, so a launch needs no separate copy of them), or, up to FEW of them, by value in
// the launch itself: no ring to fill and no PCIe round trip before the data loads.
#define UNROLL @UNROLL@
#define FEW @FEW@

__device__ __forceinline__ void copy_block(const uint4* __restrict__ src,
                                           uint4* __restrict__ dst, long long vecs) {
    for (long long v0 = threadIdx.x; v0 < vecs; v0 += (long long)blockDim.x * UNROLL) {
        uint4 r[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            long long v = v0 + (long long)u * blockDim.x;
            if (v < vecs) r[u] = src[v];
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            long long v = v0 + (long long)u * blockDim.x;
            if (v < vecs) dst[v] = r[u];
        }
    }
}

struct RingSlots {
    const long long* ids;
    __device__ long long operator()(long long b) const { return __ldg(ids + b); }
};
struct FewSlots {
    long long v[FEW];
    __device__ long long operator()(long long b) const { return v[b]; }
};

// GATHER: dense[b] = pool[slot(b)]; otherwise (scatter) pool[slot(b)] = dense[b].
template <bool GATHER, typename Slots>
__device__ __forceinline__ void move_blocks(uint4* pool, uint4* dense, long long vecs,
                                            long long pitch, long long k, const Slots& slot) {
    for (long long b = blockIdx.x; b < k; b += gridDim.x) {
        uint4* p = pool + slot(b) * pitch;
        uint4* d = dense + b * vecs;
        if (GATHER) copy_block(p, d, vecs); else copy_block(d, p, vecs);
    }
}

#define ENTRY(NAME, GATHER, SLOTS, PARAM)                                                 \
    extern "C" __global__ void NAME(uint4* pool, uint4* dense, long long vecs,           \
                                    long long pitch, long long k, PARAM) {               \
        move_blocks<GATHER>(pool, dense, vecs, pitch, k, SLOTS);                         \
    }
ENTRY(gather_blocks, true, RingSlots{ids}, const long long* ids)
ENTRY(scatter_blocks, false, RingSlots{ids}, const long long* ids)
ENTRY(gather_few, true, slots, FewSlots slots)
ENTRY(scatter_few, false, slots, FewSlots slots)
""".replace("@UNROLL@", str(_UNROLL)).replace("@FEW@", str(_FEW))


class BlockError(ValueError):
    """Arguments a gather or scatter refuses before launching anything."""


def check_blocks(
    pool_bytes: int,
    slot_ids: Sequence[int] | np.ndarray,
    dense_bytes: int,
    block_bytes: int,
    *,
    slot_bytes: int | None = None,
    unique: bool = False,
) -> np.ndarray:
    """Validate a gather/scatter; returns the slot ids as a contiguous int64 array.

    `pool_bytes` is the size of the slotted buffer, `dense_bytes` of the contiguous one.
    Slot i starts at byte i * `slot_bytes` (default `block_bytes`) of the pool.
    """
    if not isinstance(block_bytes, int | np.integer) or block_bytes <= 0:
        raise BlockError(f"block_bytes must be a positive integer, got {block_bytes!r}")
    if block_bytes % VECTOR_BYTES:
        raise BlockError(f"block_bytes must be a multiple of {VECTOR_BYTES}, got {block_bytes}")
    pitch = block_bytes if slot_bytes is None else slot_bytes
    if not isinstance(pitch, int | np.integer) or pitch <= 0 or pitch % VECTOR_BYTES:
        raise BlockError(f"slot_bytes must be a positive multiple of {VECTOR_BYTES}, got {pitch}")
    if unique and pitch < block_bytes:
        raise BlockError("a scatter needs slots at least one block apart")
    ids = slot_ids if isinstance(slot_ids, np.ndarray) else np.asarray(slot_ids)
    if ids.dtype != np.int64 or ids.ndim != 1 or not ids.flags.c_contiguous:
        if ids.ndim != 1:
            raise BlockError(f"slot ids must be one-dimensional, got shape {ids.shape}")
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise BlockError(f"slot ids must be integers, got {ids.dtype}")
        ids = np.ascontiguousarray(ids, dtype=np.int64)
    slots = (pool_bytes - block_bytes) // pitch + 1 if pool_bytes >= block_bytes else 0
    bad = _first_outside(ids, slots)  # one pass, no temporaries: on every launch's path
    if bad >= 0:
        raise BlockError(f"slot id {int(ids[bad])} is outside the pool of {slots} slots")
    if dense_bytes < ids.size * block_bytes:
        raise BlockError(
            f"the contiguous buffer holds {dense_bytes} bytes; {ids.size} blocks of "
            f"{block_bytes} need {ids.size * block_bytes}"
        )
    if unique and ids.size != np.unique(ids).size:
        raise BlockError("a scatter may not write the same slot twice")
    return ids


@numba.njit(cache=True, nogil=True)
def _first_outside(ids: np.ndarray, slots: int) -> int:
    """Index of the first id outside [0, slots), or -1."""
    for i in range(ids.size):
        if ids[i] < 0 or ids[i] >= slots:
            return i
    return -1


# ------------------------------------------------------------------------------ CPU twins


@numba.njit(parallel=True, cache=True, nogil=True)
def _gather_cpu(
    pool: np.ndarray, slots: np.ndarray, dense: np.ndarray, block: int, pitch: int
) -> None:
    for b in numba.prange(slots.size):
        s = slots[b] * pitch
        dense[b * block : (b + 1) * block] = pool[s : s + block]


@numba.njit(parallel=True, cache=True, nogil=True)
def _scatter_cpu(
    pool: np.ndarray, slots: np.ndarray, dense: np.ndarray, block: int, pitch: int
) -> None:
    for b in numba.prange(slots.size):
        d = slots[b] * pitch
        pool[d : d + block] = dense[b * block : (b + 1) * block]


def _host_bytes(buf: Any, what: str) -> np.ndarray:
    arr = buf.numpy() if hasattr(buf, "numpy") and not isinstance(buf, np.ndarray) else buf
    if not isinstance(arr, np.ndarray) or not arr.flags.c_contiguous:
        raise BlockError(f"{what} must be a contiguous NumPy array or CPU tensor")
    return arr.reshape(-1).view(np.uint8)


def gather_blocks_cpu(
    src: Any,
    slot_ids: Sequence[int] | np.ndarray,
    out: Any,
    block_bytes: int,
    *,
    slot_bytes: int | None = None,
) -> None:
    """CPU twin of `gather_blocks`."""
    s, o = _host_bytes(src, "src"), _host_bytes(out, "out")
    ids = check_blocks(s.size, slot_ids, o.size, block_bytes, slot_bytes=slot_bytes)
    if ids.size:
        _gather_cpu(s, ids, o, block_bytes, slot_bytes or block_bytes)


def scatter_blocks_cpu(
    src: Any,
    slot_ids: Sequence[int] | np.ndarray,
    dst: Any,
    block_bytes: int,
    *,
    slot_bytes: int | None = None,
) -> None:
    """CPU twin of `scatter_blocks`."""
    s, d = _host_bytes(src, "src"), _host_bytes(dst, "dst")
    ids = check_blocks(d.size, slot_ids, s.size, block_bytes, slot_bytes=slot_bytes, unique=True)
    if ids.size:
        _scatter_cpu(d, ids, s, block_bytes, slot_bytes or block_bytes)


# ------------------------------------------------------------------------------ GPU


@dataclass(frozen=True)
class DeviceBuffer:
    """A flat byte range a kernel can address: device memory of `device`, or pinned host
    memory (`device` None) addressed through UVA."""

    ptr: int
    nbytes: int
    device: int | None


def device_buffer(buf: Any, what: str) -> DeviceBuffer:
    """The byte range of a contiguous CuPy array, CUDA torch tensor, or a `DeviceBuffer`."""
    if isinstance(buf, DeviceBuffer):
        if buf.ptr % VECTOR_BYTES:
            raise BlockError(f"{what} must be {VECTOR_BYTES}-byte aligned")
        return buf
    if hasattr(buf, "data_ptr"):  # torch.Tensor
        if not buf.is_cuda:
            raise BlockError(f"{what} is a CPU tensor; the GPU kernels need CUDA memory")
        if not buf.is_contiguous():
            raise BlockError(f"{what} must be contiguous")
        ptr, nbytes, device = buf.data_ptr(), buf.nbytes, buf.get_device()
    elif hasattr(buf, "data") and hasattr(buf.data, "ptr"):  # cupy.ndarray
        if not buf.flags.c_contiguous:
            raise BlockError(f"{what} must be contiguous")
        ptr, nbytes, device = buf.data.ptr, buf.nbytes, buf.device.id
    else:
        raise BlockError(f"{what} must be a CuPy array or a CUDA tensor, got {type(buf).__name__}")
    if ptr % VECTOR_BYTES:
        raise BlockError(f"{what} must be {VECTOR_BYTES}-byte aligned")
    return DeviceBuffer(ptr, nbytes, device)


_module = KernelModule(
    _CUDA_SOURCE, ("gather_blocks", "scatter_blocks", "gather_few", "scatter_few")
)


_per_thread = threading.local()


class _FewArgs:
    """The arguments of a small launch, laid out for `cuLaunchKernel` (pool, dense, vecs,
    pitch, k, then the ids struct by value) with the array of pointers to each. Launching
    through the driver with them skips CuPy's per-argument conversion, which took half of a
    small gather's launch (9 of 19 us on the H200). One per thread; the launch copies the
    values, so the next launch may overwrite them."""

    def __init__(self) -> None:
        self.values = np.zeros(5 + _FEW, np.int64)
        base = self.values.ctypes.data
        self.params = np.array([base + 8 * i for i in range(6)], np.uint64)
        self.params_ptr = self.params.ctypes.data


def _few_args() -> _FewArgs:
    args: _FewArgs | None = getattr(_per_thread, "few", None)
    if args is None:
        args = _per_thread.few = _FewArgs()
    return args


_external_streams: dict[int, Any] = {}


def as_cupy_stream(stream: Any) -> Any:
    """A CuPy stream for `stream`: a CuPy stream, a torch stream (its wrapper is kept per
    handle: making one costs more than the launch it is for), or None for the current."""
    import cupy

    if stream is None:
        return cupy.cuda.get_current_stream()
    if isinstance(stream, cupy.cuda.Stream | cupy.cuda.ExternalStream):
        return stream
    handle = stream.cuda_stream
    wrapped = _external_streams.get(handle)
    if wrapped is None:
        if hasattr(cupy.cuda.Stream, "from_external"):  # CuPy 14: the CUDA stream protocol
            wrapped = cupy.cuda.Stream.from_external(stream)
        else:
            wrapped = cupy.cuda.ExternalStream(handle)
        _external_streams[handle] = wrapped
    return wrapped


class _IdRing:
    """Pinned host buffers the slot ids are written to and the kernel reads through UVA:
    a launch is one kernel, with no copy ahead of it. A buffer is reused only after the
    event of the kernel that read it has completed, so `_RING` launches can be in flight
    on a stream before one waits. The events alone make reuse safe, whichever stream a
    buffer was last read on; one ring per stream only keeps streams from waiting on each
    other."""

    _RING = 8

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buffers: list[np.ndarray | None] = [None] * self._RING
        self.owners: list[Any] = [None] * self._RING
        self.events: list[Any] = [None] * self._RING
        self.next = 0

    def put(self, ids: np.ndarray) -> tuple[int, int]:
        """Stage `ids`; returns (address, ring position) for `done` once launched."""
        import cupy

        i = self.next
        self.next = (i + 1) % self._RING
        event = self.events[i]
        if event is not None and not event.done:
            event.synchronize()
        buf = self.buffers[i]
        if buf is None or buf.size < ids.size:
            n = max(ids.size, 4096)
            self.owners[i] = mem = cupy.cuda.alloc_pinned_memory(n * 8)
            self.buffers[i] = buf = np.frombuffer(mem, np.int64, n)
        buf[: ids.size] = ids
        return buf.ctypes.data, i

    def done(self, i: int, event: Any) -> None:
        self.events[i] = event


_rings: dict[tuple[int, int], _IdRing] = {}


def launch_blocks(
    name: str,
    pool: DeviceBuffer,
    dense: DeviceBuffer,
    ids: np.ndarray,
    block: int,
    pitch: int,
    stream: Any,
) -> Any:
    """Launch `name` ("gather_blocks" or "scatter_blocks") with arguments already checked
    (`check_blocks`); returns the event recorded after it."""
    import cupy

    device = dense.device
    assert device is not None
    if pool.device is not None and pool.device != device:
        raise BlockError(
            f"the pool is on GPU {pool.device} and the contiguous buffer on GPU {device}"
        )
    current = cupy.cuda.runtime.getDevice()
    with cupy.cuda.Device(device) if current != device else contextlib.nullcontext():
        s = as_cupy_stream(stream)
        if not ids.size:
            return recorded_event(s)
        vecs = block // VECTOR_BYTES
        threads = min(_THREADS, max(32, -(-vecs // (32 * _UNROLL)) * 32))
        # From host memory PCIe is the limit, reached with a few dozen CTAs; more would only
        # take SMs from the caller's compute (H100: 1.36x on a concurrent matmul with one
        # CTA per block, 1.12x with 32, at the same gather bandwidth). A small gather is over
        # in microseconds: one CTA per block keeps its latency down.
        few_ctas = pool.device is None and ids.size * block > _HOST_SMALL_BYTES
        grid = min(ids.size, _HOST_CTAS if few_ctas else 65535 * 16)
        # Launch first, then make the event: the GPU starts while the host does the rest.
        if ids.size <= _FEW:
            few = _few_args()
            args = few.values  # user-space addresses are below 2**63: int64 holds them
            args[0], args[1], args[2] = pool.ptr, dense.ptr, vecs
            args[3], args[4] = pitch // VECTOR_BYTES, ids.size
            args[5 : 5 + ids.size] = ids
            cupy.cuda.driver.launchKernel(
                _few_function(device, name), grid, 1, 1, threads, 1, 1, 0, s.ptr,
                few.params_ptr, 0,
            )  # fmt: skip
            return recorded_event(s)
        head = (
            np.uint64(pool.ptr),
            np.uint64(dense.ptr),
            np.int64(vecs),
            np.int64(pitch // VECTOR_BYTES),
            np.int64(ids.size),
        )
        ring = _rings.get((device, s.ptr))
        if ring is None:
            ring = _rings.setdefault((device, s.ptr), _IdRing())
        with ring.lock:  # threads launching on one stream must not share a buffer
            addr, pos = ring.put(ids)
            _module.get(device, name)((grid,), (threads,), (*head, np.uint64(addr)), stream=s)
            event = recorded_event(s)
            ring.done(pos, event)
    return event


_few_functions: dict[tuple[int, str], int] = {}


def _few_function(device: int, name: str) -> int:
    """The CUfunction of the by-value variant of `name` on `device`."""
    fn = _few_functions.get((device, name))
    if fn is None:
        kernel = _module.get(device, name.replace("_blocks", "_few")).kernel
        fn = _few_functions[(device, name)] = kernel.ptr
    return fn


def recorded_event(stream: Any) -> Any:
    """A new event recorded on CuPy `stream` (on its device: the caller's current one)."""
    import cupy

    event = cupy.cuda.Event(block=False, disable_timing=True)
    event.record(stream)
    return event


def gather_blocks(
    src: Any,
    slot_ids: Sequence[int] | np.ndarray,
    out: Any,
    block_bytes: int,
    stream: Any = None,
    *,
    slot_bytes: int | None = None,
) -> Any:
    """out[i] = src[slot_ids[i]] for blocks of `block_bytes`, on the GPU; returns an event.

    `src` may be device memory on `out`'s GPU or pinned host memory (a `DeviceBuffer` with
    device None, or a CuPy view of it); `out` is device memory.
    """
    s, o = device_buffer(src, "src"), device_buffer(out, "out")
    ids = check_blocks(s.nbytes, slot_ids, o.nbytes, block_bytes, slot_bytes=slot_bytes)
    return launch_blocks("gather_blocks", s, o, ids, block_bytes, slot_bytes or block_bytes, stream)


def scatter_blocks(
    src: Any,
    slot_ids: Sequence[int] | np.ndarray,
    dst: Any,
    block_bytes: int,
    stream: Any = None,
    *,
    slot_bytes: int | None = None,
) -> Any:
    """dst[slot_ids[i]] = src[i] for blocks of `block_bytes`, on the GPU; returns an event."""
    s, d = device_buffer(src, "src"), device_buffer(dst, "dst")
    ids = check_blocks(
        d.nbytes, slot_ids, s.nbytes, block_bytes, slot_bytes=slot_bytes, unique=True
    )
    return launch_blocks(
        "scatter_blocks", d, s, ids, block_bytes, slot_bytes or block_bytes, stream
    )
