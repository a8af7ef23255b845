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

from collections.abc import Sequence
from typing import Any

import numba
import numpy as np

VECTOR_BYTES = 16
_THREADS = 256

_CUDA_SOURCE = r"""
extern "C" __global__ void gather_blocks(const uint4* __restrict__ src,
                                         const long long* __restrict__ slots,
                                         uint4* __restrict__ out,
                                         long long vecs_per_block, long long k) {
    for (long long b = blockIdx.x; b < k; b += gridDim.x) {
        const uint4* s = src + slots[b] * vecs_per_block;
        uint4* d = out + b * vecs_per_block;
        for (long long v = threadIdx.x; v < vecs_per_block; v += blockDim.x) d[v] = s[v];
    }
}

extern "C" __global__ void scatter_blocks(const uint4* __restrict__ src,
                                          const long long* __restrict__ slots,
                                          uint4* __restrict__ dst,
                                          long long vecs_per_block, long long k) {
    for (long long b = blockIdx.x; b < k; b += gridDim.x) {
        const uint4* s = src + b * vecs_per_block;
        uint4* d = dst + slots[b] * vecs_per_block;
        for (long long v = threadIdx.x; v < vecs_per_block; v += blockDim.x) d[v] = s[v];
    }
}
"""


class BlockError(ValueError):
    """Arguments a gather or scatter refuses before launching anything."""


def check_blocks(
    pool_bytes: int,
    slot_ids: Sequence[int] | np.ndarray,
    dense_bytes: int,
    block_bytes: int,
    *,
    unique: bool = False,
) -> np.ndarray:
    """Validate a gather/scatter; returns the slot ids as a contiguous int64 array.

    `pool_bytes` is the size of the slotted buffer, `dense_bytes` of the contiguous one.
    """
    if not isinstance(block_bytes, int | np.integer) or block_bytes <= 0:
        raise BlockError(f"block_bytes must be a positive integer, got {block_bytes!r}")
    if block_bytes % VECTOR_BYTES:
        raise BlockError(f"block_bytes must be a multiple of {VECTOR_BYTES}, got {block_bytes}")
    ids = np.asarray(slot_ids)
    if ids.ndim != 1:
        raise BlockError(f"slot ids must be one-dimensional, got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise BlockError(f"slot ids must be integers, got {ids.dtype}")
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    slots = pool_bytes // block_bytes
    if ids.size and (ids.min() < 0 or ids.max() >= slots):
        bad = int(ids[(ids < 0) | (ids >= slots)][0])
        raise BlockError(f"slot id {bad} is outside the pool of {slots} slots")
    if dense_bytes < ids.size * block_bytes:
        raise BlockError(
            f"the contiguous buffer holds {dense_bytes} bytes; {ids.size} blocks of "
            f"{block_bytes} need {ids.size * block_bytes}"
        )
    if unique and ids.size != np.unique(ids).size:
        raise BlockError("a scatter may not write the same slot twice")
    return ids


# ------------------------------------------------------------------------------ CPU twins


@numba.njit(parallel=True, cache=True)
def _gather_cpu(src: np.ndarray, slots: np.ndarray, out: np.ndarray, block: int) -> None:
    for b in numba.prange(slots.size):
        s = slots[b] * block
        out[b * block : (b + 1) * block] = src[s : s + block]


@numba.njit(parallel=True, cache=True)
def _scatter_cpu(src: np.ndarray, slots: np.ndarray, dst: np.ndarray, block: int) -> None:
    for b in numba.prange(slots.size):
        d = slots[b] * block
        dst[d : d + block] = src[b * block : (b + 1) * block]


def _host_bytes(buf: Any, what: str) -> np.ndarray:
    arr = buf.numpy() if hasattr(buf, "numpy") and not isinstance(buf, np.ndarray) else buf
    if not isinstance(arr, np.ndarray) or not arr.flags.c_contiguous:
        raise BlockError(f"{what} must be a contiguous NumPy array or CPU tensor")
    return arr.reshape(-1).view(np.uint8)


def gather_blocks_cpu(
    src: Any, slot_ids: Sequence[int] | np.ndarray, out: Any, block_bytes: int
) -> None:
    """CPU twin of `gather_blocks`."""
    s, o = _host_bytes(src, "src"), _host_bytes(out, "out")
    ids = check_blocks(s.size, slot_ids, o.size, block_bytes)
    if ids.size:
        _gather_cpu(s, ids, o, block_bytes)


def scatter_blocks_cpu(
    src: Any, slot_ids: Sequence[int] | np.ndarray, dst: Any, block_bytes: int
) -> None:
    """CPU twin of `scatter_blocks`."""
    s, d = _host_bytes(src, "src"), _host_bytes(dst, "dst")
    ids = check_blocks(d.size, slot_ids, s.size, block_bytes, unique=True)
    if ids.size:
        _scatter_cpu(s, ids, d, block_bytes)


# ------------------------------------------------------------------------------ GPU


_kernels: dict[str, Any] = {}


def _kernel(name: str) -> Any:
    if name not in _kernels:
        import cupy

        module = cupy.RawModule(code=_CUDA_SOURCE, options=("-std=c++17",))
        for n in ("gather_blocks", "scatter_blocks"):
            _kernels[n] = module.get_function(n)
    return _kernels[name]


def _device_bytes(buf: Any, what: str) -> Any:
    import cupy

    arr = cupy.asarray(buf)  # CuPy arrays as they are; CUDA tensors through their interface
    if not arr.flags.c_contiguous:
        raise BlockError(f"{what} must be contiguous")
    if arr.data.ptr % VECTOR_BYTES:
        raise BlockError(f"{what} must be {VECTOR_BYTES}-byte aligned")
    return arr.reshape(-1).view(cupy.uint8)


def _as_stream(stream: Any) -> Any:
    import cupy

    if stream is None:
        return cupy.cuda.get_current_stream()
    if isinstance(stream, cupy.cuda.Stream | cupy.cuda.ExternalStream):
        return stream
    if hasattr(cupy.cuda.Stream, "from_external"):  # CuPy 14: the CUDA stream protocol
        return cupy.cuda.Stream.from_external(stream)
    return cupy.cuda.ExternalStream(stream.cuda_stream)  # a torch.cuda.Stream


# Per (device, stream), a device buffer the slot ids are copied into. Reusing it is safe:
# the copy of the next call is ordered on the same stream after the kernel that read it.
# The stream object is kept with it so its handle cannot be reused by another stream.
_id_buffers: dict[tuple[int, int], tuple[Any, Any]] = {}


def _upload_ids(ids: np.ndarray, s: Any) -> Any:
    import cupy

    slot = (cupy.cuda.runtime.getDevice(), s.ptr)
    held = _id_buffers.get(slot)
    buf = held[1] if held is not None else None
    if buf is None or buf.size < ids.size:
        with s:
            buf = cupy.empty(max(ids.size, 4096), cupy.int64)
        _id_buffers[slot] = (s, buf)
    # From pageable memory: the driver has taken the bytes when the call returns.
    cupy.cuda.runtime.memcpyAsync(
        buf.data.ptr, ids.ctypes.data, ids.nbytes, cupy.cuda.runtime.memcpyHostToDevice, s.ptr
    )
    return buf


def _launch(
    name: str, pooled: Any, dense: Any, ids: np.ndarray, block_bytes: int, stream: Any
) -> Any:
    import cupy

    s = _as_stream(stream)
    event = cupy.cuda.Event(block=False, disable_timing=True)
    if ids.size:
        dev_ids = _upload_ids(ids, s)
        vecs = block_bytes // VECTOR_BYTES
        threads = min(_THREADS, max(32, -(-vecs // 32) * 32))
        grid = min(ids.size, 65535 * 16)
        args = (
            (pooled, dev_ids, dense, np.int64(vecs), np.int64(ids.size))
            if name == "gather_blocks"
            else (dense, dev_ids, pooled, np.int64(vecs), np.int64(ids.size))
        )
        _kernel(name)((grid,), (threads,), args, stream=s)
    event.record(s)
    return event


def gather_blocks(
    src: Any, slot_ids: Sequence[int] | np.ndarray, out: Any, block_bytes: int, stream: Any = None
) -> Any:
    """out[i] = src[slot_ids[i]] for blocks of `block_bytes`, on the GPU; returns an event."""
    s, o = _device_bytes(src, "src"), _device_bytes(out, "out")
    ids = check_blocks(s.size, slot_ids, o.size, block_bytes)
    return _launch("gather_blocks", s, o, ids, block_bytes, stream)


def scatter_blocks(
    src: Any, slot_ids: Sequence[int] | np.ndarray, dst: Any, block_bytes: int, stream: Any = None
) -> Any:
    """dst[slot_ids[i]] = src[i] for blocks of `block_bytes`, on the GPU; returns an event."""
    s, d = _device_bytes(src, "src"), _device_bytes(dst, "dst")
    ids = check_blocks(d.size, slot_ids, s.size, block_bytes, unique=True)
    return _launch("scatter_blocks", d, s, ids, block_bytes, stream)
