"""Process-wide settings for a server: keep glibc malloc from handing freed megabyte buffers
back to the kernel (`keep_freed_buffers`), and OpenMP threads from spinning (`quiet_openmp`).

Every 4 MiB piece the server sends or receives is a fresh Python bytes object. By default
glibc returns large freed blocks to the kernel (munmap, heap trim), so the next piece
page-faults its way through fresh memory; on a virtual machine those faults cost more
than the copy itself (measured: a 64 MiB get took 124 ms with the defaults, 64-73 ms with
the limits below). Bounded: at most `TRIM_THRESHOLD` of freed heap is kept.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's maximum; pieces (4 MiB) come from the heap
TRIM_THRESHOLD = 256 << 20
TOP_PAD = 64 << 20


def keep_freed_buffers() -> bool:
    """Apply the limits; False where the C library is not glibc (nothing changes)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    return all(
        mallopt(param, value) == 1
        for param, value in (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (M_TOP_PAD, TOP_PAD),
        )
    )


def quiet_openmp() -> None:
    """Let idle OpenMP threads (numba's parallel codec kernels, torch) sleep rather than spin
    after each parallel region, unless OMP_WAIT_POLICY is set already. Spinning threads take
    the cores the ssd writer's and the remote fetch's host threads code values on, and an
    engine's next to the sidecar: on a 16-core GPU host, 12 host threads encoding cachegen
    chunks ran 1.26 -> 1.55 GB/s with it, decoding 2.75 -> 3.67. Must run before the OpenMP
    runtimes load (torch and numba's are loaded with the codecs).

    Also keeps NumPy's OpenBLAS to one thread per call unless OPENBLAS_NUM_THREADS is set:
    the server codes a value per host thread, and cachegen-x's per-layer products (NumPy
    GEMMs then; torch's now, which `threads.one_core_kernels` keeps to one thread) otherwise
    each start a team of every core's threads, so that 12 host threads on a 16-core GPU
    host encoded no faster than two cores do."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
