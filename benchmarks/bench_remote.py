"""Remote tier benchmark: node B reads KV that node A stored, from a shared Redis Cluster.

Starts a Redis Cluster of `--masters` masters on loopback (`_redis_cluster.local_cluster`)
and two kvstore-servers, A and B, both `--tiers cpu,remote` on it. For each payload size,
in rounds that alternate the order of the methods:

* **remote, node B** -- A stores `n` values (fresh keys each round) and copies them to the
  cluster in the background (`--remote-write through`); once B sees them all (`exists`),
  B's client reads them with one `get_into` into a host tensor: B misses locally, fetches
  them from the cluster (one pipeline per master, the masters in parallel), checks every
  piece's checksum, places them in its cpu tier, and the client copies them out of B's
  shared arena.
* **redis-py GET** -- the same bytes stored with `SET` on the same cluster and read back
  with redis-py's `RedisCluster.get`, one key after another: KV kept as plain Redis values.
* **redis-py pipeline** -- the same keys in one `RedisCluster` pipeline (for reference).
* **local cpu, node B** -- B's second read of the same keys, now in its cpu tier.

Target (issue 10): remote >= 2x redis-py GET at every size. Reported as PASS/MISS, never
asserted. Every read is checked against what was written.

    python benchmarks/bench_remote.py [--sizes 256KiB,1MiB,8MiB,32MiB] [--total 128MiB]
        [--rounds 3] [--masters 3] [--codec remote=zstd] [--json out.json] [--plot out.png]

Needs `redis-server` (or `valkey-server`) on PATH. `--quick` is a smoke run for the tests.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import redis
import torch
from _procs import progress, start_kvstore, stop, write_outputs
from _redis_cluster import local_cluster, redis_server_binary
from redis.cluster import RedisCluster
from redis.utils import HIREDIS_AVAILABLE

from kvstore.client import KVClient
from kvstore.codecs import codec_from_spec
from kvstore.config import format_size, parse_size

NAMESPACE = "bench/remote"
TARGET = 2.0  # remote over redis-py GET
KV_TOKEN_BYTES = 2 * 8 * 128 * 2  # K and V of one token, 8 heads of 128, bf16
LOSSY_TOLERANCE = 0.05  # relative error of a read through a lossy codec
SEEN_TIMEOUT_S = 120.0
METHODS = ("remote", "redis_get", "redis_pipeline", "local_cpu")
LABELS = {
    "remote": "remote, node B",
    "redis_get": "redis-py GET",
    "redis_pipeline": "redis-py pipeline",
    "local_cpu": "local cpu, node B",
}


def values_of(n: int, size: int, seed: int) -> torch.Tensor:
    """`n` values of `size` bytes shaped as one layer's K and V of Llama-3-8B (2, tokens,
    8 KV heads, head dim 128) in bf16 from a normal distribution, so that KV codecs apply."""
    if size % KV_TOKEN_BYTES:
        raise ValueError(f"value sizes must be multiples of {KV_TOKEN_BYTES} bytes (one token)")
    g = torch.Generator().manual_seed(seed)
    shape = (n, 2, size // KV_TOKEN_BYTES, 8, 128)
    return torch.randn(shape, generator=g).to(torch.bfloat16)


def fresh_keys(n: int) -> list[bytes]:
    return [secrets.token_bytes(32) for _ in range(n)]


def wait_seen(b: KVClient, keys: list[bytes]) -> None:
    """Until node B finds every key (on the cluster: A's copies are written in the
    background)."""
    deadline = time.monotonic() + SEEN_TIMEOUT_S
    while not all(b.exists(keys)):
        if time.monotonic() > deadline:
            found = sum(b.exists(keys))
            raise RuntimeError(
                f"node B sees {found} of {len(keys)} values node A stored after "
                f"{SEEN_TIMEOUT_S:g}s: A's writes to the cluster are not landing"
            )
        time.sleep(0.02)


def sync(into: str) -> None:
    if into == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def check_read(out: torch.Tensor, values: torch.Tensor, exact: bool, what: str) -> None:
    """`out` is `values`: byte for byte, or within a lossy codec's error."""
    out = out.cpu()
    if exact:
        ok = torch.equal(out.view(torch.uint8), values.view(torch.uint8))
    else:
        err = (out.float() - values.float()).norm() / values.float().norm()
        ok = bool(err < LOSSY_TOLERANCE)
    if not ok:
        raise RuntimeError(f"{what} read different values than node A stored")


def node_round(
    a: KVClient, b: KVClient, values: torch.Tensor, exact: bool, into: str
) -> dict[str, float]:
    """Seconds for B to read `values` from the cluster into a tensor on `into`, then from
    its cpu tier."""
    keys = fresh_keys(len(values))
    tiers = a.batch_put(keys, list(values))
    if set(tiers) != {"cpu"}:
        raise RuntimeError(f"node A stored the values in {set(tiers)}, not cpu")
    wait_seen(b, keys)
    if b.lookup_tiers(keys).tiers != ("remote",) * len(keys):
        raise RuntimeError("node B holds the values before reading them: not a remote read")
    out = torch.zeros_like(values, device=into)  # touched before the clock starts
    before = b.stats().remote
    remote = timed(lambda: b.get_into(keys, out).wait())
    after = b.stats().remote
    check_read(out, values, exact, "node B")
    assert before is not None and after is not None
    # Time inside B's reads from the cluster (summed over its masters' parallel batches).
    batches = after.batch_seconds - before.batch_seconds
    out.zero_()
    local = timed(lambda: b.get_into(keys, out).wait())
    check_read(out, values, exact, "node B's second read")
    a.delete(keys)  # on A and on the cluster; B's copies age out of its cpu tier
    return {"remote": remote, "local_cpu": local, "fetch_batches": batches}


def redis_round(rc: RedisCluster, values: torch.Tensor, into: str) -> dict[str, float]:
    """Seconds to read `values` back into a tensor on `into` with plain GETs, then with one
    pipeline (each reply copied into its place, as an engine keeping KV in Redis would)."""
    payloads = [v.contiguous().view(torch.uint8).numpy().tobytes() for v in values]
    out = torch.zeros((len(values), values[0].nbytes), dtype=torch.uint8, device=into)
    host = out.numpy() if into == "cpu" else None

    def land(i: int, reply: Any) -> None:
        data = np.frombuffer(reply, np.uint8)
        if host is not None:
            host[i] = data  # numpy: torch's CPU copy_ of 1 MiB costs milliseconds here
        else:
            with warnings.catch_warnings():  # read-only bytes, only read from
                warnings.simplefilter("ignore", UserWarning)
                out[i].copy_(torch.from_numpy(data))

    keys = [b"bench:plain:" + secrets.token_hex(8).encode() for _ in payloads]
    pipe = rc.pipeline(transaction=False)
    for k, p in zip(keys, payloads, strict=True):
        pipe.set(k, p)
    pipe.execute()
    expected = values.reshape(len(values), -1).view(torch.uint8).to(into)

    def gets() -> None:
        for i, k in enumerate(keys):
            land(i, rc.get(k))
        sync(into)

    get = timed(gets)
    if not torch.equal(out, expected):
        raise RuntimeError("redis-py GET returned different bytes")
    out.zero_()

    def pipelined() -> None:
        pipe = rc.pipeline(transaction=False)
        for k in keys:
            pipe.get(k)
        for i, reply in enumerate(pipe.execute()):
            land(i, reply)
        sync(into)

    pipeline = timed(pipelined)
    if not torch.equal(out, expected):
        raise RuntimeError("the redis-py pipeline returned different bytes")
    pipe = rc.pipeline(transaction=False)
    for k in keys:
        pipe.delete(k)
    pipe.execute()
    return {"redis_get": get, "redis_pipeline": pipeline}


def measure(
    a: KVClient,
    b: KVClient,
    rc: RedisCluster,
    size: int,
    n: int,
    rounds: int,
    exact: bool,
    into: str,
) -> dict[str, Any]:
    values = values_of(n, size, seed=size)
    warm = values[: max(1, n // 8)]
    node_round(a, b, warm, exact, into)  # warm-up: connections, arena mapping
    redis_round(rc, warm, into)
    seconds: dict[str, list[float]] = {m: [] for m in METHODS}
    for r in range(rounds):
        rounds_in_order = [
            lambda: node_round(a, b, values, exact, into),
            lambda: redis_round(rc, values, into),
        ]
        if r % 2:
            rounds_in_order.reverse()
        for run in rounds_in_order:
            for method, s in run().items():
                seconds.setdefault(method, []).append(s)
        progress(f"{format_size(size)} x {n}: round {r + 1}/{rounds} done")
    nbytes = n * size
    gbps = {m: nbytes / statistics.median(seconds[m]) / 1e9 for m in METHODS}
    return {
        "size": size,
        "values": n,
        "bytes": nbytes,
        "GBps": gbps,
        "seconds": seconds,
        "remote_over_redis_get": gbps["remote"] / gbps["redis_get"],
    }


def render(fig: dict[str, Any]) -> str:
    lines = [
        f"{fig['masters']}-master Redis Cluster on loopback ({fig['redis_version']}, "
        f"hiredis {'yes' if fig['hiredis'] else 'no'}), codec {fig['codec'] or 'raw'}, read "
        f"into {fig['into']} tensors; GB/s, median of {fig['rounds']} rounds",
        f"{'size':>9} {'values':>6} "
        + " ".join(f"{LABELS[m]:>18}" for m in METHODS)
        + f" {'remote / GET':>13}  target",
    ]
    for row in fig["sizes"]:
        ratio = row["remote_over_redis_get"]
        verdict = "PASS" if ratio >= TARGET else "MISS"
        lines.append(
            f"{format_size(row['size']):>9} {row['values']:>6} "
            + " ".join(f"{row['GBps'][m]:>18.2f}" for m in METHODS)
            + f" {ratio:>12.1f}x  >= {TARGET:g}x {verdict}"
        )
    return "\n".join(lines)


def write_plot(fig: dict[str, Any], path: Path) -> bool:
    from _procs import save_plot

    def draw(_f: Any, ax: Any) -> None:
        rows = fig["sizes"]
        width = 0.8 / len(METHODS)
        for j, m in enumerate(METHODS):
            xs = [i + (j - (len(METHODS) - 1) / 2) * width for i in range(len(rows))]
            ax.bar(xs, [r["GBps"][m] for r in rows], width, label=LABELS[m])
        ax.set_xticks(range(len(rows)), [format_size(r["size"]) for r in rows])
        ax.set_xlabel("value size")
        ax.set_ylabel("GB/s read (log scale)")
        ax.set_yscale("log")
        ax.set_title(
            f"Reading KV through a {fig['masters']}-master Redis Cluster, into {fig['into']}"
        )
        ax.legend()

    return save_plot(path, draw, figsize=(8, 4.5))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="256KiB,1MiB,8MiB,32MiB", help="value sizes, comma-separated")
    p.add_argument("--total", default="128MiB", help="bytes read per round and size")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per size (median)")
    p.add_argument("--masters", type=int, default=3, help="Redis Cluster masters (default 3)")
    p.add_argument("--codec", default="", help="the nodes' --codec rule, e.g. remote=zstd")
    p.add_argument(
        "--into",
        choices=("cpu", "cuda"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where every method lands the KV read (default cuda when there is a GPU, as "
        "an engine loads it; cpu otherwise)",
    )
    p.add_argument("--quick", action="store_true", help="small sizes, one round: a smoke run")
    p.add_argument("--json", type=Path, help="write the figures as JSON here")
    p.add_argument("--plot", type=Path, help="write a PNG plot here")
    args = p.parse_args()
    if args.quick:
        args.sizes, args.total, args.rounds = "64KiB,1MiB", "4MiB", 1
    sizes = [parse_size(s, "sizes") for s in args.sizes.split(",")]
    total = parse_size(args.total, "total")
    if redis_server_binary() is None:
        print("bench_remote: redis-server is not on PATH (apt-get install redis-server)")
        return 2
    exact = True
    for rule in filter(None, args.codec.split(";")):
        exact = exact and codec_from_spec(rule.partition("=")[2]).lossless
    per_round = max(total, max(sizes))
    cpu = max(256 << 20, 3 * per_round)  # a round's values, twice over, and room
    figures: dict[str, Any] = {
        "masters": args.masters,
        "codec": args.codec,
        "rounds": args.rounds,
        "hiredis": HIREDIS_AVAILABLE,
        "into": args.into,
        "sizes": [],
    }
    with tempfile.TemporaryDirectory(prefix="kvbench-remote-") as tmp:
        work = Path(tmp)
        progress(f"starting a {args.masters}-master Redis Cluster")
        with local_cluster(work / "redis", masters=args.masters) as cluster:
            flags = [
                "--tiers", "cpu,remote",
                "--remote", ",".join(cluster.urls),
                "--cpu-bytes", str(cpu),
                "--remote-queue-bytes", str(2 * per_round),
                "--max-value-bytes", str(max(sizes)),
                "--log-level", "warning",
            ]  # fmt: skip
            if args.codec:
                flags += ["--codec", args.codec]
            procs = []
            try:
                for name in ("a", "b"):
                    procs.append(
                        start_kvstore(work / name, work / f"{name}.log", *flags, announce=False)
                    )
                progress("nodes A and B serve")
                host, port = cluster.urls[0].removeprefix("redis://").split(":")
                rc = RedisCluster(host=host, port=int(port))
                figures["redis_version"] = "redis " + str(rc.info("server")["redis_version"])
                with (
                    KVClient(f"unix://{work / 'a' / 'kvstore.sock'}", NAMESPACE) as a,
                    KVClient(f"unix://{work / 'b' / 'kvstore.sock'}", NAMESPACE) as b,
                ):
                    for size in sizes:
                        n = max(4, total // size)
                        row = measure(a, b, rc, size, n, args.rounds, exact, args.into)
                        figures["sizes"].append(row)
                rc.close()
            except (redis.RedisError, RuntimeError) as exc:
                print(f"bench_remote: {exc}", file=sys.stderr)
                return 1
            finally:
                for proc in procs:
                    stop(proc, "kvstore-server")
    print(render(figures))
    write_outputs(figures, args.json, args.plot, lambda path: write_plot(figures, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
