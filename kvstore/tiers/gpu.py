"""The gpu tier: one pool of memory per GPU, cut into slab slots like the host arena.

- `CudaPool`: one `cudaMalloc` region on one GPU, exported to same-host clients with CUDA
  IPC (`export`); they read and write its slots in place with their own copies and kernels.
  Copies from a slot to host memory (demotion to the cpu tier, a read for a client that
  cannot map the pool) run on the pool's own non-blocking stream, so they neither wait
  behind nor hold up work that clients run on the same GPU.
- `TwinPool`: the host twin: the same slots over a shared-memory file standing in for GPU
  memory (`--gpu-twin`), so the gpu tier's placement, demotion and client protocol run, and
  are tested, on machines without a GPU.

Both add to the `MemoryTier` slots: `copy_out(moves)` and `wait()` to copy slots into host
buffers, `read(slot, nbytes)`, and `export()` (what a client needs to map the pool).
"""

from __future__ import annotations

import secrets
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvstore.gpu import device_uuid
from kvstore.tiers.base import MemoryTier
from kvstore.tiers.host import HostArena
from kvstore.tiers.slab import SlabAllocator, Slot

TWIN_UUID = "host-twin"
_D2H = 2  # cudaMemcpyDeviceToHost


@dataclass(frozen=True)
class PoolExport:
    """A pool as clients see it (`StatsResponse.gpu_pools`)."""

    pool: int  # 1-based
    device_uuid: str
    capacity_bytes: int
    ipc_handle: bytes = b""
    twin_path: str = ""
    arena_dev: int = 0
    arena_ino: int = 0


# (slot, bytes, host buffer): copy the first `bytes` of the slot into the buffer.
Move = tuple[Slot, int, memoryview]


class GpuPool(MemoryTier):
    name = "gpu"
    pool: int  # 1-based number, as on the wire
    uuid: str  # of its GPU, or TWIN_UUID

    @abstractmethod
    def copy_out(self, moves: Sequence[Move]) -> None:
        """Start copying slots to host buffers; done, and the buffers safe to use, after
        the next `wait()`. The caller keeps the buffers alive until then."""

    @abstractmethod
    def wait(self) -> None:
        """Block until every copy started so far is done."""

    @abstractmethod
    def export(self) -> PoolExport: ...

    def read(self, slot: Slot, nbytes: int) -> bytearray:
        """A host copy of the first `nbytes` of a slot."""
        buf = bytearray(nbytes)
        self.copy_out([(slot, nbytes, memoryview(buf))])
        self.wait()
        return buf


class CudaPool(GpuPool):
    """`capacity_bytes` of device memory on GPU `ordinal` (of this process)."""

    def __init__(
        self, pool: int, ordinal: int, capacity_bytes: int, page_bytes: int = 64 << 20
    ) -> None:
        import cupy

        self._cupy = cupy
        rt = cupy.cuda.runtime
        self.pool = pool
        self.ordinal = ordinal
        self.allocator = SlabAllocator(capacity_bytes, page_bytes=page_bytes)
        self.capacity_bytes = self.allocator.capacity
        self.uuid = device_uuid(ordinal)
        with cupy.cuda.Device(ordinal):
            try:
                self.ptr: int = rt.malloc(self.capacity_bytes)
            except rt.CUDARuntimeError as exc:
                raise OSError(
                    f"cannot allocate {self.capacity_bytes} bytes on GPU {ordinal} "
                    f"({self.uuid}): {exc}; lower --gpu-bytes"
                ) from None
            self._stream: int = rt.streamCreateWithFlags(1)  # non-blocking
            self._handle: bytes = rt.ipcGetMemHandle(self.ptr)
        # Slices name the pool by this number, new at every start, so a client's mapping
        # of an earlier server's pool is noticed rather than read.
        self._ident = secrets.randbits(63) | 1

    def copy_out(self, moves: Sequence[Move]) -> None:
        rt = self._cupy.cuda.runtime
        with self._cupy.cuda.Device(self.ordinal):
            for slot, nbytes, dst in moves:
                if nbytes:
                    host = np.frombuffer(dst, np.uint8, nbytes)
                    rt.memcpyAsync(
                        host.ctypes.data, self.ptr + slot.offset, nbytes, _D2H, self._stream
                    )

    def wait(self) -> None:
        with self._cupy.cuda.Device(self.ordinal):
            self._cupy.cuda.runtime.streamSynchronize(self._stream)

    def export(self) -> PoolExport:
        return PoolExport(
            self.pool,
            self.uuid,
            self.capacity_bytes,
            ipc_handle=bytes(self._handle),
            arena_ino=self._ident,
        )

    def close(self) -> None:
        if not self.ptr:
            return
        rt = self._cupy.cuda.runtime
        with self._cupy.cuda.Device(self.ordinal):
            rt.streamSynchronize(self._stream)
            rt.streamDestroy(self._stream)
            rt.free(self.ptr)
        self.ptr = 0


class TwinPool(GpuPool):
    """A pool in a shared-memory file at `path`, standing in for one GPU's memory."""

    def __init__(
        self, pool: int, path: Path, capacity_bytes: int, page_bytes: int = 64 << 20
    ) -> None:
        self.pool = pool
        self.uuid = TWIN_UUID
        self._arena = HostArena(path, capacity_bytes, page_bytes=page_bytes)
        self.allocator = self._arena.allocator
        self.capacity_bytes = self._arena.capacity_bytes

    def copy_out(self, moves: Sequence[Move]) -> None:
        for slot, nbytes, dst in moves:
            dst[:nbytes] = self._arena.view(slot, nbytes)

    def wait(self) -> None:
        pass

    def export(self) -> PoolExport:
        a = self._arena
        return PoolExport(
            self.pool,
            self.uuid,
            self.capacity_bytes,
            twin_path=str(a.path),
            arena_dev=a.dev,
            arena_ino=a.ino,
        )

    def view(self, slot: Slot, nbytes: int) -> memoryview:
        """The slot's bytes (for tests: a GPU pool has no host view)."""
        return self._arena.view(slot, nbytes)

    def close(self) -> None:
        self._arena.close()


def register_host_memory(buffer: memoryview, ordinal: int) -> int:
    """Pin a host mapping for fast asynchronous copies from GPU pools; returns its address
    for `unregister_host_memory`."""
    import cupy

    ptr = int(np.frombuffer(buffer, np.uint8).ctypes.data)
    with cupy.cuda.Device(ordinal):
        cupy.cuda.runtime.hostRegister(ptr, len(buffer), 1)  # portable: every GPU
    return ptr


def unregister_host_memory(ptr: int) -> None:
    import cupy

    cupy.cuda.runtime.hostUnregister(ptr)
