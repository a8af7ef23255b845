"""Load soak: many concurrent clients of mixed traffic with eviction churn, against a real
server, watching its memory, descriptors and leases over time.

Each client (a thread with its own `KVClient`, in `--procs` processes: gRPC shares one
connection among the channels of a process) owns `--keys` keys and loops
over put / get / get_into / exists / lookup / delete of them, with values of 4 KiB to
1 MiB whose bytes follow from (client, key, version). Far more than the tiers hold is
written, so values keep moving from cpu to ssd and out. Every value read back is checked:
it must be absent or exactly the bytes of the last version the client stored (or, after a
put that failed, of the one before). RESOURCE_EXHAUSTED and UNAVAILABLE count as refusals
(back-pressure), anything else as an error.

Every second it samples the server's RSS (anonymous and shared memory apart), its open
descriptors, the leases it holds and the arena file's size in /dev/shm. At the end it
prints throughput and p50/p99 latency per operation and checks that:

- no wrong byte was read and no call failed other than by a refusal;
- anonymous memory grew by less than 10% + 32 MiB between the end of the warm-up and the
  end of the run; the warm-up ends once the tiers are full (the ssd tier evicts, so the
  index stops growing) and a quarter of the run has passed, and it must end before the
  last quarter; the arena stayed within its size;
- once the clients are closed, the server holds no lease, is back to its descriptor count
  from before they connected (+2); it never maps shared memory other than its arena, and
  the arena file is gone once it stops.

It exits 1 when a check fails. CI runs it for 60 s (`tests/e2e/test_soak.py`).

    python benchmarks/soak_load.py [--duration 600] [--clients 64] [--json f] [--plot f]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import multiprocessing
import os
import queue
import random
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _crash import KeyState
from _procs import progress, running_kvstore, save_plot, write_outputs

from kvstore.client import KVClient
from kvstore.config import parse_size
from kvstore.errors import KVStoreError, ResourceExhausted, Unavailable

SIZES = (4 << 10, 64 << 10, 256 << 10, 1 << 20)
OPS = ("put", "get", "get_into", "exists", "lookup", "delete")
WEIGHTS = (30, 30, 10, 10, 10, 10)
NAMESPACE = "soak/load"


def value_of(client: int, slot: int, version: int) -> torch.Tensor:
    """The bytes of version `version` of a client's key `slot`."""
    size = SIZES[slot % len(SIZES)]
    seed = hashlib.blake2b(f"{client}/{slot}/{version}".encode(), digest_size=8).digest()
    rng = np.random.default_rng(int.from_bytes(seed, "little"))
    return torch.from_numpy(rng.integers(0, 256, size, dtype=np.uint8))


def key_of(client: int, slot: int) -> bytes:
    return hashlib.blake2b(f"soak/{client}/{slot}".encode(), digest_size=32).digest()


@dataclass
class ClientLog:
    """What one client did: latencies per operation, bytes moved, what went wrong."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: {op: [] for op in OPS})
    bytes_moved: int = 0
    refusals: int = 0
    errors: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    hits: int = 0
    misses: int = 0


class Client(threading.Thread):
    def __init__(self, cid: int, address: str, keys: int, stop: Any) -> None:
        super().__init__(name=f"soak-client-{cid}", daemon=True)
        self.cid, self.address, self.keys, self.stop_at = cid, address, keys, stop
        self.log = ClientLog()
        # Per key, the versions a read may return (puts of one key are sequential; after
        # one that failed, the store may hold the old value or the new one).
        self.versions = [KeyState() for _ in range(keys)]
        self.rng = random.Random(cid)

    def run(self) -> None:
        with KVClient(self.address, NAMESPACE, timeout=60) as c:
            while not self.stop_at.is_set():
                op = self.rng.choices(OPS, WEIGHTS)[0]
                slot = self.rng.randrange(self.keys)
                t0 = time.perf_counter()
                try:
                    self.step(c, op, slot)
                except (ResourceExhausted, Unavailable):
                    self.log.refusals += 1
                    continue
                except KVStoreError as exc:
                    self.log.errors.append(f"{op}: {type(exc).__name__}: {exc}")
                    continue
                self.log.latencies[op].append(time.perf_counter() - t0)

    def check(self, slot: int, got: torch.Tensor | None) -> None:
        if got is None:  # eviction may drop any value: a miss is never wrong
            self.log.misses += 1
            return
        self.log.hits += 1
        self.log.bytes_moved += got.numel()
        flat = got.reshape(-1).view(torch.uint8)
        allowed = self.versions[slot].allowed()
        for v in allowed:
            if torch.equal(flat, value_of(self.cid, slot, v)):
                return
        self.log.wrong.append(f"client {self.cid} key {slot}: not any of {sorted(allowed)}")

    def step(self, c: KVClient, op: str, slot: int) -> None:
        k = key_of(self.cid, slot)
        if op == "put":
            state = self.versions[slot]
            version = state.next_version
            state.next_version += 1
            value = value_of(self.cid, slot, version)
            state.pending.add(version)  # until acknowledged
            c.put(k, value)
            state.pending.clear()
            state.acked = version
            self.log.bytes_moved += value.numel()
        elif op == "get":
            self.check(slot, c.get(k))
        elif op == "get_into":
            out = torch.empty(SIZES[slot % len(SIZES)], dtype=torch.uint8)
            found = c.get_into([k], [out]).wait()
            self.check(slot, out if found[0] else None)
        elif op == "exists":
            c.exists([key_of(self.cid, s) for s in range(self.keys)])
        elif op == "lookup":
            c.lookup([key_of(self.cid, s) for s in range(slot + 1)])
        else:
            c.delete([k])
            state = self.versions[slot]
            state.pending.clear()
            state.acked = None


# ------------------------------------------------------------------ the server, sampled


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and RssShmem of `pid` in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssShmem"):
            out[name] = int(rest.split()[0]) * 1024
    return out


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def shm_in_use(pid: int) -> set[str]:
    """The /dev/shm files `pid` maps or holds open (other processes' segments, such as
    other servers' arenas or multiprocessing's semaphores, are not its business)."""
    names = set()
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            path = line.split(maxsplit=5)[5:]
            if path and path[0].startswith("/dev/shm/"):
                names.add(path[0].removesuffix(" (deleted)"))
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("/dev/shm/"):
                    names.add(target.removesuffix(" (deleted)"))
    return names


@dataclass
class Sample:
    t: float
    rss: int
    anon: int
    shmem: int
    fds: int
    leases: int
    arena_bytes: int
    ops: int
    entries: int  # values stored, every tier
    ssd_evictions: int  # nonzero once the last tier is full: the store's size is steady


def sample(pid: int, c: KVClient, arena: Path, t: float, ops: int) -> Sample:
    st = proc_status(pid)
    try:
        arena_bytes = arena.stat().st_blocks * 512
    except OSError:
        arena_bytes = 0
    stats = c.stats()
    ssd = stats.tiers.get("ssd")
    return Sample(
        t, st.get("VmRSS", 0), st.get("RssAnon", 0), st.get("RssShmem", 0), open_fds(pid),
        stats.leases, arena_bytes, ops, stats.entries, ssd.evictions if ssd else 0,
    )  # fmt: skip


def percentile(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


# ------------------------------------------------------------------ the run


def client_process(
    cids: list[int],
    address: str,
    keys: int,
    stop: Any,
    ops: Any,
    slot: int,
    results: Any,
    ready: Any,
) -> None:
    """Run the clients `cids` as threads until `stop` is set; publish the operation count in
    `ops[slot]` as it goes and each client's log on `results` at the end. Clients live in
    several processes because gRPC shares one connection among the channels of a process."""
    torch.set_num_threads(1)
    clients = [Client(cid, address, keys, stop) for cid in cids]
    for cl in clients:
        cl.start()
    ready.release()
    while any(cl.is_alive() for cl in clients):
        ops[slot] = sum(len(x) for cl in clients for x in cl.log.latencies.values())
        time.sleep(0.5)
    for cl in clients:
        results.put((cl.cid, cl.log))


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kvsoak-") as tmp:
        flags = ["--tiers", "cpu,ssd", "--cpu-bytes", args.cpu_bytes, "--ssd-bytes", args.ssd_bytes]
        with running_kvstore(Path(tmp), *flags) as address:
            pid = int((Path(tmp) / "kvstore" / "kvstore.lock").read_text().strip())
            with KVClient(address, NAMESPACE, timeout=60) as watcher:
                arena = Path(watcher.stats().host_arena_path)
                shm_seen: set[str] = set()
                fds_before = open_fds(pid)
                ctx = multiprocessing.get_context("spawn")
                stop, results = ctx.Event(), ctx.Queue()
                procs = max(1, min(args.procs, args.clients))
                counts = ctx.Array("q", procs)
                ready = ctx.Semaphore(0)
                clients_of = [list(range(i, args.clients, procs)) for i in range(procs)]
                workers = [
                    ctx.Process(
                        target=client_process,
                        args=(clients_of[i], address, args.keys, stop, counts, i, results, ready),
                        daemon=True,
                    )
                    for i in range(procs)
                ]
                progress(
                    f"{args.clients} clients in {procs} processes, {args.keys} keys each, "
                    f"for {args.duration:g} s"
                )
                for w in workers:
                    w.start()
                for _ in workers:  # the clock starts once every process is running
                    if not ready.acquire(timeout=300):
                        raise RuntimeError("a client process did not start within 300 s")
                t0 = time.monotonic()
                samples: list[Sample] = []
                while (t := time.monotonic() - t0) < args.duration:
                    ops = sum(counts[:])
                    samples.append(sample(pid, watcher, arena, t, ops))
                    shm_seen |= shm_in_use(pid)
                    if len(samples) % 10 == 0:
                        s = samples[-1]
                        progress(
                            f"{t:5.0f} s: {ops} ops, server RSS {s.rss / 2**20:.0f} MiB "
                            f"(anon {s.anon / 2**20:.0f}), {s.fds} fds, {s.leases} leases"
                        )
                    time.sleep(1.0)
                stop.set()
                logs: dict[int, ClientLog] = {}
                with contextlib.suppress(queue.Empty):
                    while len(logs) < args.clients:
                        cid, log = results.get(timeout=120)
                        logs[cid] = log
                elapsed = time.monotonic() - t0
                for w in workers:
                    w.join(timeout=30)
                stuck = [f"client {i}" for i in range(args.clients) if i not in logs]
                stuck += [f"process {w.pid}" for w in workers if w.is_alive()]
                # Leases end in the background after a get: give them a moment.
                deadline = time.monotonic() + 10
                while (leases := watcher.stats().leases) and time.monotonic() < deadline:
                    time.sleep(0.1)
                fds_after = open_fds(pid)
                final = sample(pid, watcher, arena, elapsed, 0)
    shm_left = {str(arena)} if arena.exists() else set()  # the server has stopped
    return report(args, list(logs.values()), samples, final, elapsed, stuck, leases, fds_before,
                  fds_after, shm_seen - {str(arena)}, shm_left)  # fmt: skip


def report(
    args: argparse.Namespace,
    clients: list[ClientLog],
    samples: list[Sample],
    final: Sample,
    elapsed: float,
    stuck: list[str],
    leases: int,
    fds_before: int,
    fds_after: int,
    shm_other: set[str],
    shm_left: set[str],
) -> dict[str, Any]:
    lat = {op: [x for cl in clients for x in cl.latencies[op]] for op in OPS}
    ops = sum(len(v) for v in lat.values())
    moved = sum(cl.bytes_moved for cl in clients)
    wrong = [w for cl in clients for w in cl.wrong]
    errors = [e for cl in clients for e in cl.errors]
    # Warm-up ends once the tiers are full (the ssd tier has begun to evict: the index
    # stops growing) and a quarter of the run has passed, whichever is later.
    full = next((s.t for s in samples if s.ssd_evictions), math.inf)
    warm = [s for s in samples if s.t >= max(full, args.duration / 4)]
    anon0 = warm[0].anon if warm else final.anon
    growth = final.anon - anon0
    checks = {
        "no wrong bytes": not wrong,
        "no errors but refusals": not errors,
        "every client stopped": not stuck,
        "the tiers filled up (warm-up ended) before the last quarter": (
            full <= args.duration * 3 / 4
        ),
        f"anon RSS growth after warm-up {growth / 2**20:+.1f} MiB < 10% + 32 MiB": (
            growth < anon0 * 0.10 + (32 << 20)
        ),
        "arena within its size": max((s.arena_bytes for s in samples), default=0)
        <= parse_size(args.cpu_bytes) + (64 << 20),
        "no leases left": leases == 0,
        f"descriptors back ({fds_before} before, {fds_after} after)": fds_after <= fds_before + 2,
        "no shared memory but the arena, and the arena gone after the server": (
            not shm_other and not shm_left
        ),
    }
    out: dict[str, Any] = {
        "clients": args.clients,
        "seconds": elapsed,
        "ops": ops,
        "ops_per_s": ops / elapsed,
        "MBps": moved / elapsed / 1e6,
        "hits": sum(cl.hits for cl in clients),
        "misses": sum(cl.misses for cl in clients),
        "refusals": sum(cl.refusals for cl in clients),
        "latency_ms": {
            op: {"n": len(v), "p50": percentile(v, 50) * 1e3, "p99": percentile(v, 99) * 1e3}
            for op, v in lat.items()
        },
        "samples": [s.__dict__ for s in samples],
        "checks": checks,
        "wrong": wrong[:20],
        "errors": errors[:20],
    }
    print(f"{args.clients} clients for {elapsed:.0f} s: {ops} operations, {ops / elapsed:.0f}/s, "
          f"{moved / elapsed / 1e6:.0f} MB/s of values; {out['hits']} hits, {out['misses']} "
          f"misses, {out['refusals']} refusals")  # fmt: skip
    print(f"{'op':<9} {'count':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for op, v in out["latency_ms"].items():
        print(f"{op:<9} {v['n']:>8} {v['p50']:>8.2f} {v['p99']:>8.2f}")
    rss = [s.rss / 2**20 for s in samples]
    print(
        f"server RSS {min(rss, default=0):.0f}-{max(rss, default=0):.0f} MiB, anon "
        f"{anon0 / 2**20:.0f} MiB after warm-up, {final.anon / 2**20:.0f} MiB at the end"
    )
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    for line in (wrong + errors)[:10]:
        print(f"  {line}")
    return out


def plot(figures: dict[str, Any], path: Path) -> bool:
    samples = figures["samples"]

    def draw(fig: Any, axes: Any) -> None:
        t = [s["t"] for s in samples]
        ax = axes[0]
        for name in ("rss", "anon", "shmem"):
            ax.plot(t, [s[name] / 2**20 for s in samples], label=f"server {name}")
        ax.set_ylabel("MiB")
        ax.legend(fontsize=8)
        ax.set_title(f"soak: {figures['clients']} clients, {figures['ops_per_s']:.0f} ops/s")
        ax = axes[1]
        rate = np.diff([s["ops"] for s in samples], prepend=0)
        ax.plot(t, rate, label="ops/s")
        ax.plot(t, [s["leases"] for s in samples], label="leases held")
        ax.plot(t, [s["fds"] for s in samples], label="open descriptors")
        ax.set_xlabel("seconds")
        ax.legend(fontsize=8)

    return save_plot(path, draw, nrows=2, figsize=(8, 6), sharex=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    p.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    p.add_argument("--keys", type=int, default=48, help="keys per client (default 48)")
    p.add_argument("--procs", type=int, default=4, help="client processes (default 4)")
    p.add_argument("--cpu-bytes", default="128MiB", help="server cpu tier (default 128MiB)")
    p.add_argument("--ssd-bytes", default="384MiB", help="server ssd tier (default 384MiB)")
    p.add_argument("--json", type=Path, help="write every figure and sample as JSON")
    p.add_argument("--plot", type=Path, help="write a PNG of memory and rate over time")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    figures = run(args)
    write_outputs(figures, args.json, args.plot, lambda path: plot(figures, path))
    return 0 if all(figures["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
