"""What KV events cost puts: put throughput of one `kvstore-server` with no watcher, with a
watcher that keeps up (a reader in a process of its own, as a router), and with one that
never reads (its queue overflows: GAP and resync), in the same run: rounds interleaved, the
order of the cases rotating from round to round.

    python benchmarks/bench_events.py                 # 4 KiB values, 5 rounds
    python benchmarks/bench_events.py --size 64KiB --values 5000 --rounds 7

Each round puts `--values` values with `batch_put` (`--batch` per call) and with single
`put`s over the server's Unix socket, and times them; the table gives the median values/s
per case and its ratio to "none". The server runs with `--tiers cpu` and a cpu tier big
enough to hold every value, so no eviction muddles the comparison.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from _procs import progress, start_kvstore, stop

from kvstore.client import KVClient
from kvstore.config import parse_size
from kvstore.events import EventKind

NAMESPACE = "bench/events"


def key(i: int) -> bytes:
    return i.to_bytes(8, "little") * 4


def put_rate(c: KVClient, values: int, batch: int, value: torch.Tensor, single: bool) -> float:
    started = time.perf_counter()
    if single:
        for i in range(values):
            c.put(key(i), value)
    else:
        for b in range(0, values, batch):
            n = min(batch, values - b)
            c.batch_put([key(i) for i in range(b, b + n)], [value] * n)
    return values / (time.perf_counter() - started)


def read_events(address: str, ready: Any, done: Any) -> None:
    """A watcher in a process of its own (as a router is) that reads every event."""
    with KVClient(address, NAMESPACE) as c:
        stream = c.watch()
        threading.Thread(target=lambda: (done.wait(), stream.close()), daemon=True).start()
        for e in stream:
            if e.kind == EventKind.SNAPSHOT_END:
                ready.set()


class Reader:
    def __init__(self, address: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.ready, self.done = ctx.Event(), ctx.Event()
        self.proc = ctx.Process(target=read_events, args=(address, self.ready, self.done))
        self.proc.start()
        if not self.ready.wait(60):
            raise RuntimeError("the reading watcher did not start")

    def close(self) -> None:
        self.done.set()
        self.proc.join(10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="4KiB", help="bytes per value (default 4KiB)")
    p.add_argument("--values", type=int, default=4000, help="values per timed run")
    p.add_argument("--batch", type=int, default=200, help="values per batch_put call")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per case")
    args = p.parse_args()
    size = parse_size(args.size, "size")
    value = torch.zeros(size, dtype=torch.uint8)
    cpu = max(256 << 20, 4 * size * args.values)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "d"
        proc = start_kvstore(
            data, Path(tmp) / "server.log", "--tiers", "cpu", "--cpu-bytes", str(cpu)
        )
        try:
            address = f"unix://{data / 'kvstore.sock'}"
            rates: dict[tuple[str, str], list[float]] = {}
            with KVClient(address, NAMESPACE) as c, KVClient(address, NAMESPACE) as w:
                put_rate(c, args.values, args.batch, value, single=False)  # warm-up
                for r in range(args.rounds):
                    cases = ("none", "reading", "stalled")
                    for case in cases[r % 3 :] + cases[: r % 3]:  # no case always first
                        reader = Reader(address) if case == "reading" else None
                        stalled = w.watch() if case == "stalled" else None
                        if stalled is not None:
                            next(iter(stalled))  # registered; then never read
                        for mode in ("batch_put", "put"):
                            rate = put_rate(c, args.values, args.batch, value, mode == "put")
                            rates.setdefault((case, mode), []).append(rate)
                        if reader is not None:
                            reader.close()
                        if stalled is not None:
                            stalled.close()
                    progress(f"round {r + 1}/{args.rounds} done")
        finally:
            stop(proc, "kvstore-server")
    print(f"values of {size} bytes, {args.values} per run, median of {args.rounds} rounds")
    print(f"{'watcher':<10} {'call':<10} {'values/s':>10} {'vs none':>8}")
    for mode in ("batch_put", "put"):
        base = statistics.median(rates[("none", mode)])
        for case in ("none", "reading", "stalled"):
            rate = statistics.median(rates[(case, mode)])
            print(f"{case:<10} {mode:<10} {rate:>10.0f} {rate / base:>8.3f}")


if __name__ == "__main__":
    main()
