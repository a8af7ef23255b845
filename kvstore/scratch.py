"""Host memory kept from one call to the next, per thread (`HostScratch`).

A fresh buffer of megabytes page-faults its way in: glibc hands allocations past 32 MiB
(and, per thread arena, smaller ones it has trimmed) straight from the kernel, which zeroes
every page on first touch. Measured: writing a fresh 97 MiB tensor 28-30 ms against 10 ms
into a reused one (2-core VM); a 5.9 MB decoded chunk 8.0-8.8 ms fresh against 5.1 ms
reused (one thread of an H200 host; up to 31 ms on the VM with glibc's per-thread arenas).
Memory whose contents are needed only until the same thread's next call can come from here.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch


class HostScratch:
    """A host buffer per thread, kept at the largest size asked for (never shrunk: what
    one thread's largest call needs stays allocated while the thread lives)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def take(self, nbytes: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        """A flat `dtype` tensor of `nbytes` bytes (a multiple of the dtype's size): this
        thread's buffer, valid until the thread's next `take`."""
        buffer = getattr(self._local, "buffer", None)
        if buffer is None or buffer.numel() < nbytes:
            self._local.buffer = buffer = None  # the old one freed before the new is made
            self._local.buffer = buffer = torch.empty(nbytes, dtype=torch.uint8)
        return buffer[:nbytes].view(dtype)

    def tensor(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous `dtype` tensor of `shape` over this thread's buffer (`take`)."""
        return self.take(math.prod(shape) * dtype.itemsize, dtype).view(tuple(shape))
