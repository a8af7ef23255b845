"""`kvstore-server`: parse flags, build the config, run the daemon."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

import uvloop

from kvstore import __version__, logs
from kvstore.config import DURABILITY_MODES, ConfigError, ServerConfig
from kvstore.gpu import cuda_device_count
from kvstore.memtune import keep_freed_buffers, quiet_openmp
from kvstore.preflight import check_environment

EPILOG = """\
Settings come from, highest precedence first: these flags, the TOML file given by --config
(keys as the flag names, e.g. cpu-bytes = "8GiB", optionally under [server]), KVSTORE_*
environment variables (KVSTORE_CPU_BYTES=8GiB, KVSTORE_TIERS=cpu,ssd, ...), then defaults.
Sizes take B, KB, MB, GB, TB, KiB, MiB, GiB or TiB.

examples:
  kvstore-server                                  # cpu,ssd tiers under ./kvstore-data
  kvstore-server --cpu-bytes 32GiB --ssd-bytes 1TiB --data-dir /var/lib/kvstore
  kvstore-server --listen 0.0.0.0:50051           # also serve remote clients over TCP
  kvstore-server --listen 0.0.0.0:50051 --tls-cert server.pem --tls-key server-key.pem \\
                 --auth-tokens tokens.toml          # TLS, and a token per tenant
  kvstore-server --tiers gpu,cpu,ssd --gpu-bytes 8GiB --cpu-bytes 64GiB
                                                  # an 8GiB pool on every visible GPU
  KVSTORE_REMOTE_PASSWORD=... kvstore-server --tiers cpu,ssd,remote \\
                 --remote redis://10.0.0.5:6379,redis://10.0.0.6:6379
                                                  # share KV with other nodes via a
                                                  # Redis/Valkey Cluster
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvstore-server",
        description="Serve a tiered KV-cache store (GPU, shared host memory, SSD) over gRPC.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = ServerConfig()
    p.add_argument(
        "--tiers",
        help="comma-separated tiers, fastest first: gpu, cpu, ssd, remote (default "
        f"{','.join(d.tiers)}); remote, a Redis/Valkey Cluster shared by many nodes, needs "
        "--remote",
    )
    p.add_argument(
        "--data-dir",
        help="directory for the ssd tier and the default socket "
        f"(default ./{ServerConfig.__dataclass_fields__['data_dir'].default})",
    )
    p.add_argument("--socket", help="Unix socket path (default <data-dir>/kvstore.sock)")
    p.add_argument(
        "--listen", metavar="HOST:PORT", help="also listen on this TCP address (default: off)"
    )
    p.add_argument(
        "--tls-cert",
        metavar="PEM",
        help="certificate (chain) for --listen: with --tls-key, TCP clients must use TLS",
    )
    p.add_argument("--tls-key", metavar="PEM", help="unencrypted private key of --tls-cert")
    p.add_argument(
        "--tls-client-ca",
        metavar="PEM",
        help="CA bundle: TCP clients must present a certificate it signed (mTLS)",
    )
    p.add_argument(
        "--auth-tokens",
        metavar="FILE",
        help="tokens file (TOML, or JSON if named *.json) of tenants, their token hashes and "
        "the namespace globs each may read and write; every data call then needs "
        "`authorization: Bearer <token>` (mint one with `kvstore token`)",
    )
    p.add_argument(
        "--trust-socket",
        action="store_const",
        const=True,
        help="with --auth-tokens: Unix-socket callers without a token may use every namespace",
    )
    p.add_argument(
        "--socket-group",
        metavar="GROUP",
        help="let this group use the socket and map the shared memory (mode 0660); default: "
        "the server's user only (0600)",
    )
    p.add_argument(
        "--gpu-bytes",
        help="size of the gpu tier's pool on each visible GPU (default 4GiB); the gpu tier "
        "holds values same-host clients write from their GPU and demotes to cpu",
    )
    p.add_argument(
        "--gpu-twin",
        action="store_const",
        const=True,
        help="run the gpu tier as one pool of shared host memory standing in for a GPU, on a "
        "machine without one (tests; never faster than cpu)",
    )
    p.add_argument("--cpu-bytes", help="size of the shared-memory cpu tier (default 1GiB)")
    p.add_argument("--ssd-bytes", help="bytes of values the ssd tier may hold (default 16GiB)")
    p.add_argument(
        "--ssd-write-ahead",
        type=float,
        metavar="SHARE",
        help="share of the cpu tier kept copied to ssd ahead of eviction: once less than "
        "this share is free, its least recently used values are encoded and written to ssd "
        "in the background, so puts that need room drop them at once (default "
        f"{d.ssd_write_ahead:g}; 0: write only when evicting)",
    )
    p.add_argument(
        "--encode-gpu",
        metavar="auto|off|N",
        help="where the ssd writer encodes values whose codec also encodes on a GPU "
        "(cachegen): auto (default) on the gpu tier's GPU when there is one, else on host "
        "threads; off, on host threads; N, on CUDA GPU N. The bytes stored are the same; a "
        "GPU leaves the host's cores to the serving engine. While it encodes it uses ~400 MB "
        "of that GPU's memory beyond the gpu tier, given back after 2 s without writes",
    )
    p.add_argument(
        "--durability",
        choices=DURABILITY_MODES,
        help="when ssd writes reach the disk: sync (a put acknowledged on ssd is flushed "
        "first; survives power loss), async (flushed every second; default), none (never "
        "flushed by the server). A killed server loses no acknowledged ssd write in any mode",
    )
    p.add_argument(
        "--codec",
        action="append",
        metavar="TIER[GLOB]=SPEC",
        help="how the ssd and remote tiers encode values; repeatable, namespace rules first: "
        "ssd=zstd (lossless), ssd[llama-3-8b/*]=kivi:bits=4 (lossy, opt in per namespace), "
        "remote=zstd; default raw. Codecs: raw, zstd:level=N,shuffle=0|1, int8, fp8, "
        "kivi:bits=2|4, cachegen:level=0-3,profile=FILE,newest=0-3 (the level of a "
        "sequence's newest chunk, which clients mark at put; a profile fitted by "
        "python -m kvstore.codecs.cachegen_profile carries cross-layer maps, and values "
        "put with their position are then coded by cachegen-x), cachegen-zstd (the same, "
        "zstd frames: decodes faster on the host, no GPU decoder; with a profile's maps, "
        "cachegen-x-zstd), cachegen-x:level=0-3,profile=FILE (positions searched when not "
        "given)",
    )
    p.add_argument(
        "--remote",
        metavar="URL[,URL...]",
        help="the remote tier's cluster: seed node URLs, redis://[:PASSWORD@]HOST:PORT or "
        "rediss:// for TLS (any one that answers gives the slot map; one plain Redis works "
        "too). Prefer the KVSTORE_REMOTE_PASSWORD environment variable to a password in "
        "the URL",
    )
    p.add_argument(
        "--remote-write",
        choices=("through", "evict", "off"),
        help="through (default): copy every put to remote in the background (puts never "
        "wait); evict: write only values leaving this node's last local tier; off: read only",
    )
    p.add_argument(
        "--remote-piece-bytes",
        help="largest record a value is split into on the remote tier (default 1MiB)",
    )
    p.add_argument(
        "--remote-timeout",
        type=float,
        help="deadline in seconds of each remote call; a master that misses it is skipped "
        f"for --remote-backoff seconds, its keys missing at once (default {d.remote_timeout:g})",
    )
    p.add_argument(
        "--remote-backoff",
        type=float,
        help=f"seconds a failed remote master is skipped (default {d.remote_backoff:g})",
    )
    p.add_argument(
        "--remote-ttl",
        type=float,
        help="seconds remote records live (default 0: no TTL; the cluster's maxmemory "
        "policy, e.g. allkeys-lru, drops what it must)",
    )
    p.add_argument(
        "--remote-workers",
        type=int,
        help="threads running remote batches, all requests together: a read's pieces use "
        "two per master; writes, existence checks and deletes one per 8 keys of a master's "
        f"share (default {d.remote_workers})",
    )
    p.add_argument(
        "--remote-queue-bytes",
        help="bytes of values waiting to be written to remote; past it the oldest pending "
        "write is dropped and counted (default 256MiB)",
    )
    p.add_argument(
        "--chunk-tokens", type=int, help=f"tokens per prefix chunk (default {d.chunk_tokens})"
    )
    p.add_argument("--max-value-bytes", help="largest single value accepted (default 256MiB)")
    p.add_argument(
        "--max-keys-per-request",
        type=int,
        help=f"most keys one request may name (default {d.max_keys_per_request})",
    )
    p.add_argument(
        "--staging-bytes",
        help="bound on buffers for values that bypass the cpu tier (default 1GiB)",
    )
    p.add_argument(
        "--max-inflight-requests",
        type=int,
        help="most calls served at once; more are refused with RESOURCE_EXHAUSTED and a "
        "retry hint (default: 32 per CPU core, at least 64)",
    )
    p.add_argument(
        "--max-inflight-bytes",
        help="most bytes of streamed puts not yet stored and gets not yet sent; past it "
        "calls are refused with a retry hint (default: 1/16 of memory, at most 8GiB)",
    )
    p.add_argument(
        "--max-leases",
        type=int,
        help="most read leases, and put reservations, same-host clients hold at once "
        f"(default {d.max_leases})",
    )
    p.add_argument(
        "--max-watchers",
        type=int,
        help=f"most Watch streams (KV events) open at once (default {d.max_watchers})",
    )
    p.add_argument(
        "--watch-queue-events",
        type=int,
        help="events a Watch stream may lag behind before it loses them and gets a GAP "
        f"(default {d.watch_queue_events})",
    )
    p.add_argument(
        "--quota",
        action="append",
        metavar="TIER[GLOB]=SIZE",
        help="bytes the namespaces matching GLOB may hold in TIER (gpu, cpu or ssd) together; "
        "repeatable, first matching rule per tier wins: cpu[tenant-a/*]=8GiB. A group at "
        "its quota evicts its own entries, never another's (from gpu: to cpu; a gpu quota "
        "spans all pools)",
    )
    p.add_argument(
        "--grace-seconds",
        type=float,
        help=f"time in-flight calls get to finish on shutdown (default {d.grace_seconds:g})",
    )
    p.add_argument(
        "--lease-seconds",
        type=float,
        help="how long a same-host client may hold a value it reads in place, or a slot it "
        f"reserved for a put, before the server takes it back (default {d.lease_seconds:g})",
    )
    p.add_argument(
        "--eviction",
        help="eviction policy of every tier: lru, or gdsf to keep entries that are reused "
        "often (a RAG chunk cache's popular documents) over one-off ones (default lru)",
    )
    p.add_argument("--log-level", help="debug, info, warning or error (default info)")
    p.add_argument(
        "--log-format",
        help="text (default) or json: one object per line with the request id of the call "
        "that logged it (clients may choose it with x-request-id metadata)",
    )
    p.add_argument(
        "--health-listen",
        metavar="HOST:PORT",
        help="serve only the gRPC health service on this TCP address, for Kubernetes grpc "
        "probes (default: off; health is always on the socket and --listen)",
    )
    p.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)",
    )
    p.add_argument("--config", metavar="FILE", help="TOML file with any of the settings above")
    p.add_argument(
        "--check-config",
        action="store_true",
        help="print the effective settings as JSON, check the machine against them (data "
        "directory, room in /dev/shm and on disk, socket and ports free, memory limit), and "
        "exit without serving: 0 if it would start, 1 if not (the reasons on stderr)",
    )
    p.add_argument("--version", action="version", version=f"kvstore-server {__version__}")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    quiet_openmp()  # before anything loads an OpenMP runtime
    args = build_parser().parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "check_config")}
    try:
        config = ServerConfig.load(flags, args.config)
    except ConfigError as exc:
        print(f"kvstore-server: {exc}", file=sys.stderr)
        return 2
    if "gpu" in config.tiers and not config.gpu_twin:
        count, why = cuda_device_count()
        if count == 0:
            print(f"kvstore-server: --tiers gpu needs a CUDA GPU, but {why}.", file=sys.stderr)
            return 2
        try:
            import cupy  # noqa: F401
        except ImportError:
            print(
                "kvstore-server: --tiers gpu needs CuPy (pip install 'kvstore[gpu]').",
                file=sys.stderr,
            )
            return 2
    if args.check_config:
        print(json.dumps(config.describe(), indent=2, default=str))
        findings = check_environment(config)
        for f in findings:
            print(f"kvstore-server: {f.level}: {f.message}", file=sys.stderr)
        return 1 if any(f.level == "error" for f in findings) else 0
    logs.configure(config.log_level, config.log_format)
    from kvstore.server import serve  # grpc import is slow; keep --help and errors fast

    keep_freed_buffers()

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(config))
    except (RuntimeError, OSError, ConfigError) as exc:  # ConfigError: certificates, tokens
        print(f"kvstore-server: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
