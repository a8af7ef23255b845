"""Reading values in place from the server's host arena (same-host clients).

The cpu tier is one shared-memory file. A client on the same host maps it and, when the
server answers a get with a `SharedSlice`, copies the value straight out of the arena: one
memcpy instead of a stream of gRPC messages. The server holds the slot under a lease until
the client releases it, so the bytes cannot change while they are copied. Puts go the other
way: the server reserves a slot, the client writes the value into it, and commits.
The mapping is writable when the file is (same user); otherwise gets still read in place
and puts stream.

The gpu tier's pools are mapped the same way through CUDA IPC (`PoolMap`, `open_pools`):
a value in the pool of the client's GPU is copied or gathered device to device.

With CUDA, the mapping is registered as pinned memory in this process on first GPU use
(`cudaHostRegister`, read-only when the mapping is), so copies between the arena and a GPU
run at full PCIe speed and kernels read the arena directly through unified addressing.
"""

from __future__ import annotations

import mmap
import os
import threading
import warnings
import weakref
from typing import Any

import numpy as np
import torch

from kvstore.errors import DataLoss, Unavailable

_MADV_POPULATE_READ = 22  # Linux 5.14+: fault a range in with one call, not page by page
_MADV_POPULATE_WRITE = 23
_PAGE = mmap.PAGESIZE
_HOST_REGISTER_PORTABLE = 0x01  # usable from every CUDA context of the process
_HOST_REGISTER_READ_ONLY = 0x08


def cuda_register(ptr: int, nbytes: int, read_only: bool) -> None:
    """Pin `nbytes` at `ptr` for CUDA (page-locked, device-addressable through UVA)."""
    flags = _HOST_REGISTER_PORTABLE | (_HOST_REGISTER_READ_ONLY if read_only else 0)
    err = torch.cuda.cudart().cudaHostRegister(ptr, nbytes, flags)
    if int(err) != 0:
        raise Unavailable(f"cudaHostRegister of the host arena failed: {err}")


def _cuda_unregister(ptr: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)


class ArenaMap:
    """A read-only mapping of the arena file at `path`, which must be the file (dev, ino)."""

    def __init__(self, path: str, dev: int, ino: int) -> None:
        try:
            fd = os.open(path, os.O_RDWR)
            self.writable = True
        except PermissionError:
            fd = os.open(path, os.O_RDONLY)
            self.writable = False
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (dev, ino):
                raise OSError(f"{path} is not the arena the server announced")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if self.writable else 0)
            self._mm = mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED, prot=prot)
        finally:
            os.close(fd)
        self.path, self.dev, self.ino = path, dev, ino
        self.size = st.st_size
        self._populate = True
        self._array = np.frombuffer(self._mm, np.uint8)
        self.address = self._array.ctypes.data
        self._registered = False
        self._register_lock = threading.Lock()
        self._tensor: torch.Tensor | None = None

    def array(self) -> np.ndarray:
        """The whole arena as a flat byte array (no copy)."""
        return self._array

    def tensor(self) -> torch.Tensor:
        """The whole arena as a flat uint8 CPU tensor (no copy); pinned once registered."""
        if self._tensor is None:
            with warnings.catch_warnings():  # read-only mappings: nothing writes through it
                warnings.simplefilter("ignore", UserWarning)
                self._tensor = torch.frombuffer(self._mm, dtype=torch.uint8)
        return self._tensor

    def register_cuda(self) -> None:
        """Register the mapping with CUDA, once; undone when the map is collected."""
        if self._registered:
            return
        with self._register_lock:
            if not self._registered:
                cuda_register(self.address, self.size, read_only=not self.writable)
                weakref.finalize(self, _cuda_unregister, self.address)
                self._registered = True

    def holds(self, dev: int, ino: int, offset: int, nbytes: int) -> bool:
        """Whether a slice of the arena file (dev, ino) lies within this mapping."""
        return (self.dev, self.ino) == (dev, ino) and 0 <= offset <= self.size - nbytes

    def copy(self, offset: int, nbytes: int) -> np.ndarray:
        """A private copy of `nbytes` at `offset`."""
        return self._region(offset, nbytes, _MADV_POPULATE_READ).copy()

    def write(self, offset: int, data: memoryview) -> None:
        """Write `data` at `offset` (a reserved slot)."""
        self._region(offset, data.nbytes, _MADV_POPULATE_WRITE)[:] = np.frombuffer(data, np.uint8)

    def _region(self, offset: int, nbytes: int, populate: int) -> np.ndarray:
        if offset < 0 or offset + nbytes > self.size:
            raise DataLoss(f"server pointed outside its arena ({offset}+{nbytes} > {self.size})")
        if self._populate and nbytes:
            start = offset - offset % _PAGE
            try:
                self._mm.madvise(populate, start, offset + nbytes - start)
            except OSError:
                self._populate = False  # older kernel: fault pages in on first touch
        return np.frombuffer(self._mm, np.uint8, nbytes, offset)


class PoolMap:
    """A gpu tier pool of the server, opened here through its CUDA IPC handle.

    `tensor()` is the whole pool as a flat uint8 tensor on `device`: values are copied in
    and out with `copy_` and gathered with the block kernels, device to device. The handle
    is closed when the map is collected (no `BlockRefs` uses it any more).
    """

    writable = True

    def __init__(self, handle: bytes, ordinal: int, size: int, dev: int, ino: int) -> None:
        import cupy

        rt = cupy.cuda.runtime
        with cupy.cuda.Device(ordinal):
            ptr = rt.ipcOpenMemHandle(handle, rt.cudaIpcMemLazyEnablePeerAccess)
        weakref.finalize(self, _close_ipc, ptr, ordinal)
        mem = cupy.cuda.UnownedMemory(ptr, size, None, ordinal)
        array = cupy.ndarray((size,), cupy.uint8, cupy.cuda.MemoryPointer(mem, 0))
        self.device = torch.device("cuda", ordinal)
        self._tensor = torch.as_tensor(array, device=self.device)
        self.address, self.size, self.dev, self.ino = ptr, size, dev, ino

    def tensor(self) -> torch.Tensor:
        return self._tensor

    def array(self) -> None:
        """No host view: the pool is device memory."""
        return None

    def register_cuda(self) -> None:
        pass

    def holds(self, dev: int, ino: int, offset: int, nbytes: int) -> bool:
        return (self.dev, self.ino) == (dev, ino) and 0 <= offset <= self.size - nbytes

    def copy(self, offset: int, nbytes: int) -> np.ndarray:
        """A host copy of `nbytes` at `offset`."""
        if offset < 0 or offset + nbytes > self.size:
            raise DataLoss(f"server pointed outside its pool ({offset}+{nbytes} > {self.size})")
        return self._tensor[offset : offset + nbytes].cpu().numpy()


def _close_ipc(ptr: int, ordinal: int) -> None:
    import cupy

    with cupy.cuda.Device(ordinal):
        cupy.cuda.runtime.ipcCloseMemHandle(ptr)


# A place values live in, mapped here: the host arena (or a gpu pool's host twin), or a
# gpu pool on one of this process's GPUs.
Region = ArenaMap | PoolMap


def open_pools(pools: list[Any]) -> dict[int, Region]:
    """Map the server's gpu pools (`StatsResponse.gpu_pools`) this process can reach: each
    CUDA pool on the local GPU with its UUID (needs CuPy), a host twin by its file."""
    out: dict[int, Region] = {}
    local: dict[str, int] | None = None
    for p in pools:
        try:
            if p.twin_path:
                out[p.pool] = ArenaMap(p.twin_path, p.arena_dev, p.arena_ino)
                continue
            if local is None:
                local = _local_gpus()
            ordinal = local.get(p.device_uuid)
            if ordinal is not None:
                out[p.pool] = PoolMap(
                    p.ipc_handle, ordinal, p.capacity_bytes, p.arena_dev, p.arena_ino
                )
        except (OSError, RuntimeError, ImportError):
            continue  # not reachable from here: its values come as bytes
    return out


def _local_gpus() -> dict[str, int]:
    """UUID -> ordinal of the GPUs this process sees, if it can use them through CuPy."""
    if not torch.cuda.is_available():
        return {}
    try:
        import cupy  # noqa: F401
    except ImportError:
        return {}
    from kvstore.gpu import device_uuid

    return {device_uuid(i): i for i in range(torch.cuda.device_count())}
