"""One pool of host threads for work that releases the GIL: checksums of arena bytes (xxhash)
while the copy engines move them, the parsing and staging of a batch of payloads before a
GPU decode (NumPy copies, numba kernels without the GIL), and values coded one per thread
(fetched remote values decoded, the ssd writer's values encoded)."""

from __future__ import annotations

import concurrent.futures
import functools
import importlib
import os
import sys
import threading

# One core hashes or copies well below PCIe speed; leave two for the caller's own threads.
HOST_THREADS = max(2, min(12, (os.cpu_count() or 2) - 2))
_pools: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
_lock = threading.Lock()
# The ssd writer's GPU batches (`--encode-gpu`) encode on threads of their own, this many
# side by side, taken in the order they were submitted: while one batch's host share (its
# payloads framed) runs, the other's kernels do. In the host pool behind a semaphore they
# had no order: a thread that gave the semaphore back took it again before the waiters
# woke, and on an H200 host batches chosen first waited over a second behind later ones.
# Demotion of 1.9 GB of SmolLM2 chunks (cachegen-x) on an H200 host: two threads 7.8 GB/s,
# three 7.9 (64 MiB batches); one 6.4 against two's 8.9 in 128 MiB batches.
GPU_ENCODE_THREADS = 2


def _started(name: str, threads: int) -> concurrent.futures.ThreadPoolExecutor:
    """The process's pool `name` of `threads` threads, started on first use."""
    with _lock:
        pool = _pools.get(name)
        if pool is None:
            pool = _pools[name] = concurrent.futures.ThreadPoolExecutor(
                threads, thread_name_prefix=name
            )
        return pool


def host_pool() -> concurrent.futures.ThreadPoolExecutor:
    """The process's pool, started on first use."""
    return _started("kvstore-host", HOST_THREADS)


def gpu_encode_pool() -> concurrent.futures.ThreadPoolExecutor:
    """The process's GPU_ENCODE_THREADS threads for GPU encode batches, started on first use
    (one process-wide set: each thread keeps a cuBLAS handle per GPU for the process's life)."""
    return _started("kvstore-gpu-encode", GPU_ENCODE_THREADS)


def one_core_kernels() -> None:
    """Run the calling thread's numba kernels and torch's CPU operations on its own core:
    for a pool thread that codes one value of a batch while its siblings code the others.
    A kernel compiled `parallel=True` would otherwise start a team of threads for each
    caller, every core's worth, and the pool's threads would fight over the cores; so
    would torch's (cachegen-x's int8 products: 12 threads encoding on a 16-core GPU host
    ran 0.68 -> 0.80 GB/s, demotion 0.70 -> 0.94, with one torch thread each). numba's
    setting is per thread; torch's is per thread for threads that have used it already,
    and becomes the default of those that have not (the server's threads all code)."""
    numba = sys.modules.get("numba")  # imported with the codecs; without them, no kernels
    if numba is not None and numba.get_num_threads() != 1:
        numba.set_num_threads(1)
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


# The longest a thread that wants the GIL waits for one that holds it (Python's default
# is 5 ms). The ssd writer's GPU batches each wait on the GPU, then need the GIL back to
# go on, while a sibling holds it for its host share (tables, framing): at 5 ms a turn, two
# batches side by side were slower than one alone (H200, two threads encoding ten
# cachegen-x chunks each: 5.8 GB/s against one thread's 8.0; 12.2 at 0.5 ms, 13.0 at 0.1).
GIL_TURN_S = 0.0005


def short_gil_turns() -> None:
    """Make the interpreter hand the GIL over at least every GIL_TURN_S (process-wide;
    never lengthens a shorter setting): for threads that drive a GPU side by side."""
    if sys.getswitchinterval() > GIL_TURN_S:
        sys.setswitchinterval(GIL_TURN_S)


@functools.cache
def threadsafe_layer() -> str | None:
    """The first of numba's thread-safe threading layers this machine can load ("tbb", or
    "omp": GNU OpenMP, the libgomp1 package), or None. Without one numba falls back to its
    workqueue layer, which aborts the whole process when two threads run parallel kernels
    at once, as a server's host pool and concurrent reads do."""
    for name, module in (("tbb", "tbbpool"), ("omp", "omppool")):
        try:
            importlib.import_module(f"numba.np.ufunc.{module}")
        except (ImportError, OSError):
            continue
        return name
    return None


def forbid_unsafe_layer() -> None:
    """Make numba raise (ValueError: no threading layer) rather than fall back to the
    workqueue layer: a coded value then fails its own request instead of aborting the
    server (`threadsafe_layer`). Set before the first parallel kernel runs; a layer chosen
    through NUMBA_THREADING_LAYER is left alone. Does not import numba: a server that codes
    nothing never starts its threads."""
    os.environ.setdefault("NUMBA_THREADING_LAYER", "threadsafe")  # read when numba loads
    numba = sys.modules.get("numba")
    if numba is not None and numba.config.THREADING_LAYER == "default":
        numba.config.THREADING_LAYER = os.environ["NUMBA_THREADING_LAYER"]
