"""Put throughput to the ssd tier under each `--durability` mode.

A `kvstore-server --tiers ssd` (so every put lands on ssd and, under `sync`, waits for its
flush) on a data directory under `--dir` (default: a temporary directory; point it at the
disk you mean to measure), `--clients` threads each putting `--count` values of each
`--sizes`. Prints puts per second and MB/s per mode and size, and the ratio to `none`
(no flushing at all: the bound the other modes are measured against).

    python benchmarks/bench_durability.py
    python benchmarks/bench_durability.py --dir /var/lib/kvstore-bench --sizes 64KiB,4MiB
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from _procs import progress, running_kvstore

from kvstore.client import KVClient
from kvstore.config import DURABILITY_MODES, parse_size


def measure(address: str, size: int, clients: int, count: int) -> float:
    """Seconds for `clients` threads to put `count` values of `size` bytes each."""
    value = torch.randint(0, 256, (size,), dtype=torch.uint8)
    barrier = threading.Barrier(clients + 1)

    def work(w: int) -> None:
        with KVClient(address, "bench/durability") as c:
            barrier.wait()
            for i in range(count):
                tier = c.put(bytes([w]) + i.to_bytes(4, "little") + bytes(27), value)
                assert tier == "ssd", tier

    threads = [threading.Thread(target=work, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - started


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="64KiB,1MiB")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--count", type=int, default=100, help="puts per client and size")
    p.add_argument("--dir", type=Path, help="where the data directory goes")
    args = p.parse_args()
    sizes = [parse_size(s, "sizes") for s in args.sizes.split(",")]
    need = sum(sizes) * args.clients * args.count * 2 + (256 << 20)
    rows: dict[tuple[str, int], float] = {}
    for mode in DURABILITY_MODES:
        with tempfile.TemporaryDirectory(dir=args.dir, prefix="kvstore-durability-") as tmp:
            flags = ["--tiers", "ssd", "--ssd-bytes", str(need), "--durability", mode]
            with running_kvstore(Path(tmp), *flags) as address:
                for size in sizes:
                    s = measure(address, size, args.clients, args.count)
                    rows[mode, size] = args.clients * args.count / s
                    progress(f"{mode} {size} B: {rows[mode, size]:.0f} puts/s")
    print(f"{args.clients} clients, {args.count} puts each per size, every put to ssd")
    print(f"{'mode':>6} {'size':>9} {'puts/s':>8} {'MB/s':>8} {'vs none':>8}")
    for (mode, size), rate in rows.items():
        print(
            f"{mode:>6} {size:>9} {rate:8.0f} {rate * size / 1e6:8.1f} "
            f"{rate / rows['none', size]:8.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
