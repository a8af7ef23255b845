"""Reading values in place from the server's host arena (same-host clients).

The cpu tier is one shared-memory file. A client on the same host maps it and, when the
server answers a get with a `SharedSlice`, copies the value straight out of the arena: one
memcpy instead of a stream of gRPC messages. The server holds the slot under a lease until
the client releases it, so the bytes cannot change while they are copied. Puts go the other
way: the server reserves a slot, the client writes the value into it, and commits.
The mapping is writable when the file is (same user); otherwise gets still read in place
and puts stream.
"""

from __future__ import annotations

import mmap
import os

import numpy as np

from kvstore.errors import DataLoss

_MADV_POPULATE_READ = 22  # Linux 5.14+: fault a range in with one call, not page by page
_MADV_POPULATE_WRITE = 23
_PAGE = mmap.PAGESIZE


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
