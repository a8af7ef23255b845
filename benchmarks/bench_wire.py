"""Wire benchmark: kvstore put/get throughput against redis-py and memcpy, lookup latency.

What is measured, all in one run on one machine so that the numbers are comparable:

* **memcpy** -- `np.copyto` of a preallocated array of each size, best of several runs.
  This is the hardware reference: no store can move a value between two buffers of one
  host faster than the CPU copies it. (Sizes that fit in the CPU caches copy faster than
  main memory allows; the reference is measured per size for that reason.)
* **kvstore put / get** -- `kvstore.client.KVClient.put(key, tensor)` and `.get(key)` of a
  torch uint8 tensor of each size against a real `kvstore-server` process on its Unix
  socket, with the cpu (shared memory) tier large enough that every value lands there.
  The time is what an engine waits for: tensor to bytes, gRPC, the server's copy into its
  arena and its checksum, and back to a tensor on get. Median of `--iters` runs after a
  warm-up, alternating with the redis runs below so that a slow spell of the machine hits
  both; a get is checked once to return a tensor equal to the one put.
* **redis put / get** -- the same bytes through redis-py `Redis.set` / `Redis.get` against a
  `redis-server` on a Unix socket with persistence off: the common baseline a KV-cache
  store is compared to (LMCache, for example, offers Redis as a remote backend).
* **lookup** -- latency of `KVClient.lookup` over the 64 chained prefix keys of a stored
  64-chunk prompt: the call an engine makes on the critical path of every request before it
  decides what to prefill. p50 and p99 over `--lookup-calls` calls.

Throughput is bytes of value per second, in GB/s (10**9 bytes). The targets ("get >= 2x
redis-py" at every size, "lookup p99 < 1 ms") are reported as PASS/MISS, never asserted:
the script exits 0 unless something fails to run.

    python benchmarks/bench_wire.py                       # 4MiB and 64MiB
    python benchmarks/bench_wire.py --sizes 1MiB,16MiB,256MiB --iters 30 --json out.json
    python benchmarks/bench_wire.py --quick               # seconds; used by the tests
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import redis
import torch
from _procs import progress, running_kvstore, save_plot, stop, wait_until_serving, write_outputs
from redis.utils import HIREDIS_AVAILABLE

import kvstore
from kvstore.client import KVClient
from kvstore.config import ConfigError, parse_size
from kvstore.errors import KVStoreError

MiB = 1 << 20
GiB = 1 << 30
NAMESPACE = "bench/wire"
DEFAULT_SIZES = "4MiB,64MiB"
QUICK_SIZES = "64KiB,1MiB"
LOOKUP_KEYS = 64
GET_TARGET_RATIO = 2.0
LOOKUP_P99_TARGET_MS = 1.0
ARENA_TARGET_SHARE = 0.5


# --------------------------------------------------------------------------- results


@dataclass
class Throughput:
    """Timed runs of one operation on one value size."""

    nbytes: int
    seconds: list[float]

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def gbps(self) -> float:
        return self.nbytes / self.median_s / 1e9


@dataclass
class Row:
    """One line of the table: one size and one operation, both systems."""

    size: str
    nbytes: int
    op: str
    kvstore: Throughput
    redis: Throughput
    memcpy_gbps: float
    kvstore_tier: str = ""

    @property
    def ratio(self) -> float:
        return self.kvstore.gbps / self.redis.gbps

    @property
    def of_memcpy(self) -> float:
        return self.kvstore.gbps / self.memcpy_gbps

    def to_json(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "nbytes": self.nbytes,
            "op": self.op,
            "kvstore_gbps": self.kvstore.gbps,
            "redis_gbps": self.redis.gbps,
            "kvstore_over_redis": self.ratio,
            "memcpy_gbps": self.memcpy_gbps,
            "kvstore_over_memcpy": self.of_memcpy,
            "kvstore_tier": self.kvstore_tier,
            "kvstore_seconds": self.kvstore.seconds,
            "redis_seconds": self.redis.seconds,
        }


@dataclass
class PathRow:
    """Reads of one value over kvstore's two data paths, beside memcpy."""

    size: str
    nbytes: int
    memcpy_gbps: float
    arena_get: Throughput  # KVClient.get on the Unix socket: a copy out of the arena
    arena_get_into: Throughput  # get_into a preallocated tensor: what an engine does
    tcp_get: Throughput  # KVClient.get over loopback TCP: streamed bytes

    @property
    def best_arena(self) -> Throughput:
        return max(self.arena_get, self.arena_get_into, key=lambda t: t.gbps)

    def to_json(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "nbytes": self.nbytes,
            "memcpy_gbps": self.memcpy_gbps,
            "arena_get_gbps": self.arena_get.gbps,
            "arena_get_into_gbps": self.arena_get_into.gbps,
            "tcp_get_gbps": self.tcp_get.gbps,
            "arena_get_over_memcpy": self.arena_get.gbps / self.memcpy_gbps,
            "arena_get_into_over_memcpy": self.arena_get_into.gbps / self.memcpy_gbps,
            "tcp_get_over_memcpy": self.tcp_get.gbps / self.memcpy_gbps,
        }


@dataclass
class LookupLatency:
    keys: int
    seconds: list[float]

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(np.asarray(self.seconds), q)) * 1e3

    def to_json(self) -> dict[str, Any]:
        return {
            "keys": self.keys,
            "calls": len(self.seconds),
            "p50_ms": self.percentile_ms(50),
            "p99_ms": self.percentile_ms(99),
            "mean_ms": statistics.fmean(self.seconds) * 1e3,
            "max_ms": max(self.seconds) * 1e3,
        }


@dataclass
class Verdict:
    target: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"{self.target}: {'PASS' if self.passed else 'MISS'} ({self.detail})"


@dataclass
class Report:
    meta: dict[str, Any]
    memcpy_gbps: dict[str, float] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    paths: list[PathRow] = field(default_factory=list)
    lookup: LookupLatency | None = None
    verdicts: list[Verdict] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "meta": self.meta,
            "memcpy_gbps": self.memcpy_gbps,
            "throughput": [r.to_json() for r in self.rows],
            "paths": [p.to_json() for p in self.paths],
            "lookup": self.lookup.to_json() if self.lookup else None,
            "targets": [asdict(v) for v in self.verdicts],
        }


# --------------------------------------------------------------------------- helpers


def size_label(n: int) -> str:
    """`4194304` -> `4MiB`; sizes that are not whole KiB/MiB/GiB stay in bytes."""
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n}B"


def parse_sizes(text: str) -> list[int]:
    sizes = []
    for part in text.split(","):
        if not part.strip():
            continue
        n = parse_size(part, "--sizes")
        if n < 1:
            raise ConfigError(f"--sizes: every size must be at least 1 byte, got {part!r}")
        sizes.append(n)
    if not sizes:
        raise ConfigError("--sizes: give at least one size, e.g. 4MiB,64MiB")
    return sizes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_key(tag: str) -> bytes:
    """A 32-byte key, as kvstore requires; redis uses the same bytes."""
    return hashlib.blake2b(tag.encode(), digest_size=32).digest()


def time_runs(fn: Callable[[], object], iters: int, warmup: int) -> list[float]:
    """Seconds of each of `iters` calls of `fn`, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def time_alternating(
    a: Callable[[], object], b: Callable[[], object], iters: int, warmup: int
) -> tuple[list[float], list[float]]:
    """Like `time_runs` for two functions, their calls alternating: a, b, a, b, ..."""
    for _ in range(warmup):
        a()
        b()
    out_a, out_b = [], []
    for _ in range(iters):
        t0 = time.perf_counter()
        a()
        t1 = time.perf_counter()
        b()
        t2 = time.perf_counter()
        out_a.append(t1 - t0)
        out_b.append(t2 - t1)
    return out_a, out_b


# --------------------------------------------------------------------------- servers


@contextlib.contextmanager
def kvstore_server(workdir: Path, largest: int, port: int) -> Iterator[str]:
    """Run `kvstore-server` with cpu,ssd tiers under `workdir`, also listening on loopback
    TCP `port`; yields its Unix-socket address."""
    # Room for a value and its replacement while an overwrite commits, with margin.
    cpu_bytes = max(GiB, 4 * largest)
    max_value = max(256 * MiB, largest)
    progress(f"starting kvstore-server (cpu tier {size_label(cpu_bytes)})")
    with running_kvstore(
        workdir,
        "--tiers", "cpu,ssd",
        "--cpu-bytes", str(cpu_bytes),
        "--ssd-bytes", str(4 * GiB),
        "--max-value-bytes", str(max_value),
        "--staging-bytes", str(max(GiB, max_value)),
        "--listen", f"127.0.0.1:{port}",
    ) as address:  # fmt: skip
        yield address


@contextlib.contextmanager
def redis_server(binary: str, workdir: Path) -> Iterator[str]:
    """Run `redis-server` on a Unix socket under `workdir`, persistence off; yields the path."""
    socket_path = workdir / "redis.sock"
    log_path = workdir / "redis-server.log"
    cmd = [
        binary,
        "--port", "0",
        "--unixsocket", str(socket_path),
        "--unixsocketperm", "700",
        "--dir", str(workdir),
        "--save", "",
        "--appendonly", "no",
        "--proto-max-bulk-len", "1gb",
        "--client-query-buffer-limit", "1gb",
    ]  # fmt: skip
    progress(f"starting {binary} on {socket_path}")
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

    def answers() -> bool:
        try:
            with redis.Redis(unix_socket_path=str(socket_path)) as probe:
                probe.ping()
            return True
        except redis.ConnectionError:
            return False

    try:
        wait_until_serving(proc, "redis-server", socket_path, log_path, answers)
        yield str(socket_path)
    finally:
        stop(proc, "redis-server")


def redis_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    for word in out.stdout.split():
        if word.startswith("v="):
            return word[2:]
    return out.stdout.strip() or "unknown"


# --------------------------------------------------------------------------- measurements


def measure_memcpy(nbytes: int, repeats: int) -> float:
    """Best `np.copyto` rate between two preallocated arrays, in GB/s."""
    src = np.random.default_rng(1).integers(0, 256, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    best = min(time_runs(lambda: np.copyto(dst, src), repeats, warmup=1))
    return nbytes / best / 1e9


def measure_size(
    kv: KVClient,
    tcp: KVClient,
    rds: redis.Redis,
    nbytes: int,
    iters: int,
    warmup: int,
    memcpy_gbps: float,
    paths: list[PathRow],
) -> list[Row]:
    """put and get of one value of `nbytes` through both systems; kvstore's data paths
    (arena get, get_into, get over TCP) go to `paths`.

    The runs of the two systems alternate, so that a slow spell of the machine (other
    tenants, frequency changes) lands on both rather than on whichever ran at the time.
    """
    label = size_label(nbytes)
    payload = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    tensor = torch.from_numpy(payload)
    raw = payload.tobytes()
    key = bench_key(f"value-{nbytes}")
    tiers: set[str] = set()

    def kv_put() -> None:
        tiers.add(kv.put(key, tensor))

    def report(system: str, op: str, seconds: list[float]) -> None:
        median = statistics.median(seconds)
        progress(
            f"{system:<7} {op} {label}: {nbytes / median / 1e9:.3f} GB/s "
            f"(median {median * 1e3:.2f} ms of {len(seconds)})"
        )

    kv_put_runs, redis_put_runs = time_alternating(kv_put, lambda: rds.set(key, raw), iters, warmup)
    report("kvstore", "put", kv_put_runs)
    report("redis", "put", redis_put_runs)

    got = kv.get(key)
    if got is None or got.dtype != tensor.dtype or not torch.equal(got, tensor):
        raise RuntimeError(f"kvstore get of a {label} value did not return the tensor put")
    if rds.get(key) != raw:
        raise RuntimeError(f"redis get of a {label} value did not return the bytes set")
    kv_get_runs, redis_get_runs = time_alternating(
        lambda: kv.get(key), lambda: rds.get(key), iters, warmup
    )
    report("kvstore", "get", kv_get_runs)
    report("redis", "get", redis_get_runs)

    out = torch.empty_like(tensor)
    if kv.get_into([key], [out]).wait() != [True] or not torch.equal(out, tensor):
        raise RuntimeError(f"kvstore get_into of a {label} value did not fill the tensor put")
    if not torch.equal(tcp.get(key), tensor):
        raise RuntimeError(f"kvstore get over TCP of a {label} value did not return the tensor")
    into_runs, tcp_runs = time_alternating(
        lambda: kv.get_into([key], [out]).wait(), lambda: tcp.get(key), iters, warmup
    )
    report("kvstore", "get_into", into_runs)
    report("kvstore", "get over TCP", tcp_runs)
    paths.append(
        PathRow(
            label,
            nbytes,
            memcpy_gbps,
            Throughput(nbytes, kv_get_runs),
            Throughput(nbytes, into_runs),
            Throughput(nbytes, tcp_runs),
        )
    )

    kv.delete([key])
    rds.delete(key)
    return [
        Row(
            label,
            nbytes,
            "put",
            Throughput(nbytes, kv_put_runs),
            Throughput(nbytes, redis_put_runs),
            memcpy_gbps,
            ",".join(sorted(tiers)),
        ),
        Row(
            label,
            nbytes,
            "get",
            Throughput(nbytes, kv_get_runs),
            Throughput(nbytes, redis_get_runs),
            memcpy_gbps,
        ),
    ]


def measure_lookup(kv: KVClient, calls: int) -> LookupLatency:
    """Latency of `lookup` over the keys of a stored prompt of LOOKUP_KEYS whole chunks."""
    chunk_tokens = kv.stats().chunk_tokens
    tokens = np.arange(LOOKUP_KEYS * chunk_tokens, dtype=np.int32)
    # A small fp16 KV ([layers, 2, tokens, kv_heads, head_dim]); lookup never reads values.
    kv_tensor = torch.zeros((1, 2, len(tokens), 1, 4), dtype=torch.float16)
    kv.put_prefix(tokens, kv_tensor)
    keys = kv.prefix_keys(tokens)
    found = kv.lookup(keys)
    if found != LOOKUP_KEYS:
        raise RuntimeError(f"lookup found {found} of the {LOOKUP_KEYS} keys just stored")
    seconds = time_runs(lambda: kv.lookup(keys), calls, warmup=min(100, calls))
    result = LookupLatency(LOOKUP_KEYS, seconds)
    progress(
        f"lookup of {LOOKUP_KEYS} keys x {calls}: p50 {result.percentile_ms(50):.3f} ms, "
        f"p99 {result.percentile_ms(99):.3f} ms"
    )
    kv.delete(keys)
    return result


def judge(rows: Sequence[Row], paths: Sequence[PathRow], lookup: LookupLatency) -> list[Verdict]:
    gets = [r for r in rows if r.op == "get"]
    # Bandwidth is judged on the largest value: smaller ones measure the call's latency.
    big = max(paths, key=lambda p: p.nbytes)
    arena_share = big.best_arena.gbps / big.memcpy_gbps
    worst = min(gets, key=lambda r: r.ratio)
    per_size = ", ".join(f"{r.size} {r.ratio:.2f}x" for r in gets)
    p99 = lookup.percentile_ms(99)
    return [
        Verdict(
            f"get >= {GET_TARGET_RATIO:g}x redis-py",
            all(r.ratio >= GET_TARGET_RATIO for r in gets),
            f"worst {worst.ratio:.2f}x at {worst.size}; {per_size}",
        ),
        Verdict(
            f"same-host get >= {ARENA_TARGET_SHARE:.0%} of memcpy",
            arena_share >= ARENA_TARGET_SHARE,
            f"{arena_share:.0%} at {big.size} (get {big.arena_get.gbps:.2f}, get_into "
            f"{big.arena_get_into.gbps:.2f}, memcpy {big.memcpy_gbps:.2f} GB/s; "
            f"bytes path over TCP {big.tcp_get.gbps:.2f} GB/s)",
        ),
        Verdict(
            f"lookup p99 < {LOOKUP_P99_TARGET_MS:g} ms",
            p99 < LOOKUP_P99_TARGET_MS,
            f"p99 {p99:.3f} ms",
        ),
    ]


# --------------------------------------------------------------------------- output


def render(report: Report) -> str:
    m = report.meta
    lines = [
        f"kvstore wire benchmark: kvstore {m['kvstore_version']} vs redis-server "
        f"{m['redis_server_version']} (redis-py {m['redis_py_version']}, "
        f"hiredis {'on' if m['redis_py_hiredis'] else 'off'})",
        f"{m['platform']}, {m['cpu_count']} CPUs; {m['iters']} runs per cell, "
        "median; GB/s = 10**9 bytes/s; memcpy = best np.copyto",
        "",
        f"{'size':>7} {'op':>4} {'kvstore GB/s':>13} {'redis GB/s':>11} "
        f"{'kvstore/redis':>14} {'kvstore/memcpy':>15} {'memcpy GB/s':>12}",
    ]
    for r in report.rows:
        lines.append(
            f"{r.size:>7} {r.op:>4} {r.kvstore.gbps:>13.3f} {r.redis.gbps:>11.3f} "
            f"{r.ratio:>13.2f}x {r.of_memcpy:>14.1%} {r.memcpy_gbps:>12.2f}"
        )
    if report.paths:
        lines += [
            "",
            "kvstore data paths (get of one value, GB/s and share of memcpy):",
            f"{'size':>7} {'arena get':>15} {'arena get_into':>17} {'TCP get (bytes)':>18}",
        ]
        for p in report.paths:
            cells = [
                f"{t.gbps:.3f} {t.gbps / p.memcpy_gbps:>5.0%}"
                for t in (p.arena_get, p.arena_get_into, p.tcp_get)
            ]
            lines.append(f"{p.size:>7} {cells[0]:>15} {cells[1]:>17} {cells[2]:>18}")
    if report.lookup is not None:
        lk = report.lookup.to_json()
        lines += [
            "",
            f"lookup of {lk['keys']} keys, {lk['calls']} calls: p50 {lk['p50_ms']:.3f} ms, "
            f"p99 {lk['p99_ms']:.3f} ms (mean {lk['mean_ms']:.3f} ms, max {lk['max_ms']:.3f} ms)",
        ]
    lines += ["", "targets:"] + [f"  {v.line()}" for v in report.verdicts]
    return "\n".join(lines)


def write_plot(report: Report, path: Path) -> bool:
    """Grouped bars of GB/s per size and op; False when matplotlib is not installed."""
    labels = [f"{r.op} {r.size}" for r in report.rows]

    def draw(fig: Any, ax: Any) -> None:
        x = np.arange(len(labels))
        width = 0.27
        series = (
            ("kvstore", [r.kvstore.gbps for r in report.rows]),
            ("redis-py", [r.redis.gbps for r in report.rows]),
            ("memcpy", [r.memcpy_gbps for r in report.rows]),
        )
        for i, (name, values) in enumerate(series):
            ax.bar(x + (i - 1) * width, values, width, label=name)
        ax.set_xticks(x, labels)
        ax.set_ylabel("GB/s (median; memcpy best)")
        ax.set_yscale("log")
        ax.set_title("kvstore vs redis-py over a Unix socket, same machine")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))

    return save_plot(path, draw, figsize=(max(6.0, 1.4 * len(labels)), 4.5))


# --------------------------------------------------------------------------- main


def run_systems(
    report: Report,
    sizes: Sequence[int],
    iters: int,
    warmup: int,
    lookup_calls: int,
    redis_binary: str,
) -> None:
    """Start both servers, fill `report.rows` and `report.lookup`, stop both servers."""
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kvbench-")))
        port = free_port()
        address = stack.enter_context(kvstore_server(workdir, max(sizes), port))
        redis_socket = stack.enter_context(redis_server(redis_binary, workdir))
        kv = stack.enter_context(KVClient(address, NAMESPACE))
        tcp = stack.enter_context(KVClient(f"127.0.0.1:{port}", NAMESPACE))
        rds = stack.enter_context(redis.Redis(unix_socket_path=redis_socket))
        for n in sizes:
            memcpy = report.memcpy_gbps[size_label(n)]
            report.rows += measure_size(kv, tcp, rds, n, iters, warmup, memcpy, report.paths)
        report.lookup = measure_lookup(kv, lookup_calls)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="kvstore put/get throughput vs redis-py and memcpy, and lookup latency.",
    )
    p.add_argument("--sizes", help=f"comma-separated value sizes (default {DEFAULT_SIZES})")
    p.add_argument(
        "--iters", type=int, help="timed runs per cell, median reported (default 20; quick 5)"
    )
    p.add_argument("--warmup", type=int, default=3, help="untimed runs before each cell")
    p.add_argument("--lookup-calls", type=int, help="timed lookup calls (default 2000)")
    p.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}, few runs: seconds")
    p.add_argument("--json", type=Path, metavar="FILE", help="write every number as JSON")
    p.add_argument("--plot", type=Path, metavar="FILE", help="write a PNG (needs matplotlib)")
    p.add_argument("--redis-server", default="redis-server", help="redis-server binary")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sizes = parse_sizes(args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES))
    except ConfigError as exc:
        print(f"bench_wire: {exc}", file=sys.stderr)
        return 2
    iters = args.iters or (5 if args.quick else 20)
    lookup_calls = args.lookup_calls or (200 if args.quick else 2000)
    if iters < 1 or args.warmup < 0 or lookup_calls < 1:
        print("bench_wire: --iters and --lookup-calls must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    redis_binary = shutil.which(args.redis_server)
    if redis_binary is None:
        print(
            f"bench_wire: {args.redis_server!r} not found on PATH; install Redis "
            "(e.g. apt-get install redis-server) or pass --redis-server",
            file=sys.stderr,
        )
        return 2

    report = Report(
        meta={
            "sizes": [size_label(n) for n in sizes],
            "iters": iters,
            "warmup": args.warmup,
            "lookup_calls": lookup_calls,
            "quick": args.quick,
            "kvstore_version": kvstore.__version__,
            "redis_server_version": redis_version(redis_binary),
            "redis_py_version": redis.__version__,
            "redis_py_hiredis": HIREDIS_AVAILABLE,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "gb": "10**9 bytes",
        }
    )

    for n in sizes:
        gbps = measure_memcpy(n, repeats=max(5, iters))
        report.memcpy_gbps[size_label(n)] = gbps
        progress(f"memcpy {size_label(n)}: {gbps:.2f} GB/s (best)")

    try:
        run_systems(report, sizes, iters, args.warmup, lookup_calls, redis_binary)
    except (RuntimeError, KVStoreError, redis.RedisError) as exc:
        print(f"bench_wire: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    assert report.lookup is not None
    report.verdicts = judge(report.rows, report.paths, report.lookup)
    print(render(report))
    write_outputs(report.to_json(), args.json, args.plot, lambda path: write_plot(report, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
