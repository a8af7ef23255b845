"""Reading values in place from the server's host arena (same-host clients).

The cpu tier is one shared-memory file. A client on the same host maps it read-only and,
when the server answers a get with a `SharedSlice`, copies the value straight out of the
arena: one memcpy instead of a stream of gRPC messages. The server holds the slot under a
lease until the client releases it, so the bytes cannot change while they are copied.
"""

from __future__ import annotations

import mmap
import os

import numpy as np

from kvstore.errors import DataLoss

_MADV_POPULATE_READ = 22  # Linux 5.14+: fault a range in with one call, not page by page
_PAGE = mmap.PAGESIZE


class ArenaMap:
    """A read-only mapping of the arena file at `path`, which must be the file (dev, ino)."""

    def __init__(self, path: str, dev: int, ino: int) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (dev, ino):
                raise OSError(f"{path} is not the arena the server announced")
            self._mm = mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
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
        if offset < 0 or offset + nbytes > self.size:
            raise DataLoss(f"server pointed outside its arena ({offset}+{nbytes} > {self.size})")
        if self._populate and nbytes:
            start = offset - offset % _PAGE
            try:
                self._mm.madvise(_MADV_POPULATE_READ, start, offset + nbytes - start)
            except OSError:
                self._populate = False  # older kernel: fault pages in on first touch
        return np.frombuffer(self._mm, np.uint8, nbytes, offset).copy()
