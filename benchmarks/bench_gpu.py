"""GPU block gather: the kernel against the copy engine, measured in one run.

Figures (each beside its limit, as a ratio):
- pinned H2D and D2D bandwidth with one large `cudaMemcpyAsync` (the limits);
- `gather_blocks` of k blocks from pinned host memory through UVA, vs pinned H2D;
- the same k blocks as one `cudaMemcpyAsync` per block, vs the kernel (launch-bound);
- `gather_blocks` from a device pool, vs D2D (read + write counted once, as bytes moved);
- launch-to-event latency for k = 64 small blocks.

    python benchmarks/bench_gpu.py [--arena 4GiB] [--json out.json]

Needs a CUDA GPU and CuPy. Timing uses CUDA events; each figure is the median of runs
after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import cupy
import numpy as np

from kvstore.kernels import gather_blocks

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def timed(fn: Callable[[], object], stream: cupy.cuda.Stream, runs: int = 10) -> float:
    """Median seconds of `fn` enqueued on `stream`, by CUDA events."""
    for _ in range(2):
        fn()
    stream.synchronize()
    times = []
    for _ in range(runs):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end) / 1e3)
    return statistics.median(times)


def uva_view(host: np.ndarray, owner: object) -> cupy.ndarray:
    """A device array addressing pinned host memory through UVA (no copy): with unified
    addressing, pinned host memory has the same address on the device."""
    mem = cupy.cuda.UnownedMemory(host.ctypes.data, host.size, owner)
    return cupy.ndarray(host.size, cupy.uint8, cupy.cuda.MemoryPointer(mem, 0))


def gather_row(
    host: np.ndarray,
    uva: cupy.ndarray,
    pool: cupy.ndarray,
    block: int,
    k: int,
    stream: cupy.cuda.Stream,
    rng: np.random.Generator,
) -> dict[str, float]:
    """GB/s of k blocks: kernel over UVA, one memcpy per block, kernel over a device pool."""
    ids = rng.integers(0, host.size // block, k)
    pids = rng.integers(0, pool.size // block, k)
    out = cupy.empty(k * block, cupy.uint8)
    base = host.ctypes.data

    def per_block() -> None:
        for i, slot in enumerate(ids):
            (out.data + i * block).copy_from_host_async(base + int(slot) * block, block, stream)

    moved = k * block
    return {
        "uva_GBps": moved
        / timed(lambda: gather_blocks(uva, ids, out, block, stream), stream)
        / 1e9,
        "memcpy_loop_GBps": moved / timed(per_block, stream, runs=5) / 1e9,
        "pool_GBps": moved
        / timed(lambda: gather_blocks(pool, pids, out, block, stream), stream)
        / 1e9,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--arena", type=int, default=4, help="pinned host arena, GiB (default 4)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    stream = cupy.cuda.Stream(non_blocking=True)
    arena_bytes = args.arena * GiB
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    pinned = cupy.cuda.alloc_pinned_memory(arena_bytes)
    host = np.frombuffer(pinned, np.uint8, arena_bytes)
    host[::4096] = 1  # touch every page
    uva = uva_view(host, pinned)
    figures: dict[str, float] = {}
    big = 1 * GiB
    a, b = cupy.empty(big, cupy.uint8), cupy.empty(big, cupy.uint8)
    t = timed(lambda: a.data.copy_from_host_async(host.ctypes.data, big, stream), stream)
    figures["pinned_h2d_GBps"] = h2d = big / t / 1e9
    t = timed(lambda: b.data.copy_from_device_async(a.data, big, stream), stream)
    figures["d2d_GBps"] = d2d = big / t / 1e9  # bytes copied (each read once, written once)
    print(f"{name}: pinned H2D {h2d:.1f} GB/s, device-to-device copy {d2d:.0f} GB/s")
    print("block       k   UVA gather  /H2D   memcpy/block  kernel/loop  pool gather  /D2D")
    rng = np.random.default_rng(0)
    pool = cupy.empty(4 * GiB, cupy.uint8)
    for block in (16 * KiB, 64 * KiB):
        for k in (64, 256, 4096):
            row = gather_row(host, uva, pool, block, k, stream, rng)
            for key, v in row.items():
                figures[f"{block // KiB}KiB_k{k}_{key}"] = v
            print(
                f"{block // KiB:>3}KiB {k:>6} {row['uva_GBps']:>7.1f} GB/s "
                f"{row['uva_GBps'] / h2d:>5.0%} {row['memcpy_loop_GBps']:>9.1f} GB/s "
                f"{row['uva_GBps'] / row['memcpy_loop_GBps']:>10.1f}x "
                f"{row['pool_GBps']:>7.0f} GB/s {row['pool_GBps'] / d2d:>5.0%}"
            )
    small = cupy.empty(64 * 4 * KiB, cupy.uint8)
    ids = rng.integers(0, arena_bytes // (4 * KiB), 64)
    latencies = []
    for _ in range(200):
        stream.synchronize()
        t0 = time.perf_counter()
        gather_blocks(uva, ids, small, 4 * KiB, stream).synchronize()
        latencies.append(time.perf_counter() - t0)
    figures["launch_to_event_us_p50"] = statistics.median(latencies[20:]) * 1e6
    print(f"launch to event, k=64 blocks of 4 KiB: p50 {figures['launch_to_event_us_p50']:.1f} us")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
