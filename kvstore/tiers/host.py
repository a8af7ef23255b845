"""The cpu tier: one POSIX shared-memory arena managed by a `SlabAllocator`.

The arena is a file in `/dev/shm`, so same-host clients can map it by path and read values
in place. Its pages are reserved with `posix_fallocate` and mapped with `MAP_POPULATE` at
start: a full `/dev/shm` is a clear error at start-up rather than a SIGBUS on some later
write, and no request pays for page faults.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path

from kvstore.tiers.base import MemoryTier
from kvstore.tiers.slab import SlabAllocator, Slot

SHM_DIR = Path("/dev/shm")


def default_arena_path(data_dir: Path) -> Path:
    """One arena per data directory and user, so two servers never share one."""
    tag = hashlib.blake2b(str(data_dir.resolve()).encode(), digest_size=6).hexdigest()
    return SHM_DIR / f"kvstore-{os.getuid()}-{tag}"


class HostArena(MemoryTier):
    """Shared-memory arena of `capacity_bytes`, cut into slab slots."""

    name = "cpu"

    def __init__(self, path: Path, capacity_bytes: int, page_bytes: int = 64 << 20) -> None:
        self.path = Path(path)
        self.allocator = SlabAllocator(capacity_bytes, page_bytes=page_bytes)
        self.capacity_bytes = self.allocator.capacity
        # A new file (new inode) every start, never a reused one: a client still mapping the
        # file of a crashed predecessor must see that its mapping is stale, and truncating a
        # mapped file would fault its readers.
        self.path.unlink(missing_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, self.capacity_bytes)
            try:
                os.posix_fallocate(fd, 0, self.capacity_bytes)
            except OSError as exc:
                self.path.unlink(missing_ok=True)
                raise OSError(
                    exc.errno,
                    f"cannot reserve {self.capacity_bytes} bytes of shared memory in "
                    f"{self.path.parent} ({exc.strerror}); lower --cpu-bytes or enlarge "
                    f"{self.path.parent}",
                ) from None
            # Fault every page in now, in one pass: a page faulted on first write costs far
            # more than the write, and would land on some request's critical path.
            self._mmap = mmap.mmap(
                fd, self.capacity_bytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE
            )
            st = os.fstat(fd)
            # Identify this arena file to clients that map it by path (see SharedSlice).
            self.dev, self.ino = st.st_dev, st.st_ino
        finally:
            os.close(fd)
        self._view = memoryview(self._mmap)

    def whole(self) -> memoryview:
        """The whole arena (to register it with CUDA)."""
        return self._view

    def view(self, slot: Slot, nbytes: int) -> memoryview:
        """Writable view of the first `nbytes` of a slot."""
        return self._view[slot.offset : slot.offset + nbytes]

    def close(self) -> None:
        try:
            self._view.release()
            self._mmap.close()
        except BufferError:
            # A view handed out is still alive somewhere; the mapping goes with the process.
            pass
        self.path.unlink(missing_ok=True)
