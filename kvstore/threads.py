"""One pool of host threads for work that releases the GIL beside GPU transfers: checksums
of arena bytes (xxhash) while the copy engines move them, and the parsing and staging of a
batch of payloads before a GPU decode (NumPy copies, numba kernels without the GIL)."""

from __future__ import annotations

import concurrent.futures
import os
import threading

# One core hashes or copies well below PCIe speed; leave two for the caller's own threads.
HOST_THREADS = max(2, min(12, (os.cpu_count() or 2) - 2))
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_lock = threading.Lock()


def host_pool() -> concurrent.futures.ThreadPoolExecutor:
    """The process's pool, started on first use."""
    global _pool
    with _lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(
                HOST_THREADS, thread_name_prefix="kvstore-host"
            )
        return _pool
