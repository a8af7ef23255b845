"""`kvstore`: inspect a running server (`kvstore stats [--watch]`, `kvstore ls`,
`kvstore health`), and mint tokens for its tenants (`kvstore token`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from grpc_health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpc_health.v1.health_pb2_grpc import HealthStub
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from kvstore import __version__
from kvstore.auth import mint_token
from kvstore.client import KVClient, ServerStats, default_address
from kvstore.client._channel import Connection
from kvstore.config import format_size
from kvstore.errors import KVStoreError
from kvstore.v1 import kvstore_pb2 as pb


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvstore",
        description="Inspect a running kvstore-server.",
        epilog="The server address defaults to $KVSTORE_ADDRESS, else $KVSTORE_SOCKET, else the "
        "socket under $KVSTORE_DATA_DIR (default ./kvstore-data), as the server chooses it.",
    )
    p.add_argument(
        "--address",
        default=None,
        help="unix:///path/to/kvstore.sock or HOST:PORT (default: see below)",
    )
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the server")
    p.add_argument("--token", help="bearer token for a server run with --auth-tokens "
                   "(default $KVSTORE_TOKEN)")  # fmt: skip
    p.add_argument("--tls-ca", metavar="PEM", help="CA bundle that signed the server's "
                   "certificate: connect with TLS (default $KVSTORE_TLS_CA)")  # fmt: skip
    p.add_argument("--tls-cert", metavar="PEM", help="client certificate, for mTLS")
    p.add_argument("--tls-key", metavar="PEM", help="the client certificate's key")
    p.add_argument("--tls-server-name", metavar="NAME",
                   help="name the server's certificate must carry (default: the host)")  # fmt: skip
    p.add_argument("--version", action="version", version=f"kvstore {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    st = sub.add_parser("stats", help="server settings and a table per tier")
    st.add_argument("--json", action="store_true", help="print JSON instead of a table")
    st.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=2.0,
        metavar="SECONDS",
        help="redraw every SECONDS (default 2) with counters as rates, until Ctrl-C",
    )
    he = sub.add_parser(
        "health",
        help="exit 0 if the server answers SERVING on the gRPC health service (for probes)",
    )
    he.add_argument(
        "--service",
        default="",
        help='service to ask about: "" (the server, default) or kvstore.v1.KVStore',
    )
    ls = sub.add_parser("ls", help="list stored entries")
    ls.add_argument("--namespace", default=None, help="only this namespace")
    ls.add_argument("--limit", type=int, default=100, help="at most this many (0: all)")
    ls.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    ev = sub.add_parser(
        "events",
        help="follow KV events (stored, promoted, demoted, evicted, deleted) as they happen, "
        "a line each, until Ctrl-C",
    )
    ev.add_argument(
        "--namespace",
        default="*",
        help='shell glob of namespaces (default "*": every one the token may read)',
    )
    ev.add_argument(
        "--snapshot",
        action="store_true",
        help="first print what the server holds (SNAPSHOT lines, then SNAPSHOT_END)",
    )
    ev.add_argument(
        "--count", type=int, default=0, metavar="N", help="stop after N events (0: never)"
    )
    ev.add_argument("--json", action="store_true", help="print JSON lines instead of text")
    tok = sub.add_parser(
        "token",
        help="mint a token for a tenant: prints the entry to add to the server's "
        "--auth-tokens file (it holds only the token's hash) on stdout, the token on stderr",
    )
    tok.add_argument("tenant", help="the tenant's name (an existing one gets another token)")
    tok.add_argument("--read", action="append", default=[], metavar="GLOB",
                     help="namespaces it may read, as shell globs; repeatable")  # fmt: skip
    tok.add_argument("--write", action="append", default=[], metavar="GLOB",
                     help="namespaces it may write (put, delete, pin); repeatable")  # fmt: skip
    return p


# The per-tier counters a server reports (kvstore.v1.TierStats), in table order.
COUNTERS = ("hits", "misses", "evictions", "promotions", "demotions")


def stats_view(s: ServerStats, before: ServerStats | None = None, seconds: float = 0.0) -> Group:
    """The server line and the per-tier table; with `before`, counters as rates per second."""
    rates = before is not None and seconds > 0
    head = Text(
        f"kvstore-server {s.version}  up {s.uptime_seconds:.0f}s  entries {s.entries}  "
        f"pinned {s.pinned}  leases {s.leases}  chunk {s.chunk_tokens} tokens"
    )
    table = Table("tier", "entries", "used", "capacity", "hit ratio",
                  *(f"{c}/s" if rates else c for c in COUNTERS))  # fmt: skip
    for t in s.tiers.values():
        old = before.tiers.get(t.name) if before is not None else None
        if rates and old is not None:
            cells = [f"{(getattr(t, c) - getattr(old, c)) / seconds:.1f}" for c in COUNTERS]
            hits, misses = t.hits - old.hits, t.misses - old.misses
        elif rates:  # a tier the previous sample did not have: no rate yet
            cells = ["-"] * len(COUNTERS)
            hits = misses = 0
        else:
            cells = [str(getattr(t, c)) for c in COUNTERS]
            hits, misses = t.hits, t.misses
        ratio = f"{hits / (hits + misses):.1%}" if hits + misses else "-"
        table.add_row(
            t.name,
            str(t.entries),
            format_size(t.used_bytes),
            format_size(t.capacity_bytes),
            ratio,
            *cells,
        )
    parts: list[Text | Table] = [head, table]
    for name, (raw, encoded) in sorted(s.codecs.items()):
        if not raw:
            continue
        ratio_text = f"{raw / encoded:.2f}x" if encoded else "-"
        parts.append(
            Text(
                f"ssd codec {name}: {format_size(raw)} written as {format_size(encoded)} "
                f"({ratio_text})"
            )
        )
    for rule, (used, quota) in s.quotas.items():
        parts.append(Text(f"quota {rule}: {format_size(used)} of {format_size(quota)}"))
    if s.remote is not None:
        parts.append(Text(remote_line(s.remote)))
    return Group(*parts)


def remote_line(r: pb.RemoteStats) -> str:
    """The remote tier's counters, on one line."""
    state = "connected" if r.connected else "NOT CONNECTED"
    asked = r.hits + r.misses
    ratio = f"{r.hits / asked:.1%}" if asked else "-"
    per_batch = f"{1000 * r.batch_seconds / r.batches:.1f}ms" if r.batches else "-"
    return (
        f"remote {state}: hits {r.hits} misses {r.misses} (hit ratio {ratio}), read "
        f"{format_size(r.bytes_read)}; wrote {r.values_written} values "
        f"({format_size(r.bytes_written)}); errors {r.errors}, corrupt dropped {r.corrupt}; "
        f"write queue {r.queued_writes} ({format_size(r.queued_bytes)}), dropped "
        f"{r.dropped_writes}; {r.batches} batches, {per_batch} each"
    )


def cmd_stats(client: KVClient, as_json: bool, console: Console) -> None:
    s = client.stats()
    if as_json:
        out = asdict(s)
        out["gpu_pools"] = [MessageToDict(p) for p in s.gpu_pools]
        if s.remote is not None:
            out["remote"] = {f.name: getattr(s.remote, f.name) for f in s.remote.DESCRIPTOR.fields}
        console.print_json(json.dumps(out))
        return
    console.print(stats_view(s))


def watch_stats(
    address: str, timeout: float, interval: float, console: Console, security: dict[str, Any]
) -> None:
    """Redraw the stats every `interval` seconds until Ctrl-C, with counters per second;
    an unreachable server is shown and tried again, so a restart does not end the watch.
    On a terminal the table is redrawn in place; into a pipe or a file each sample is
    printed as it is taken (a live display would show nothing there until the end)."""
    client: KVClient | None = None
    before: tuple[ServerStats, float] | None = None
    display = Live(console=console, auto_refresh=False) if console.is_terminal else None
    with display if display is not None else contextlib.nullcontext() as live:

        def show(view: Any) -> None:
            if live is None:
                console.print(view)
                console.file.flush()
            else:
                live.update(view)
                live.refresh()

        try:
            while True:
                try:
                    if client is None:
                        client = KVClient(address, "kvstore-admin", timeout=timeout, **security)
                    s, now = client.stats(), time.monotonic()
                    restarted = before is not None and _went_back(before[0], s)
                    if before is None or restarted:
                        view = stats_view(s)
                    else:
                        view = stats_view(s, before[0], now - before[1])
                    before = (s, now)
                    show(Group(view, Text(f"every {interval:g}s; Ctrl-C to stop")))
                except KVStoreError as exc:
                    if client is not None:
                        client.close()
                    client, before = None, None
                    show(Text(f"{address}: {exc}; trying again in {interval:g}s"))
                time.sleep(interval)
        except KeyboardInterrupt:
            pass
        finally:
            if client is not None:
                client.close()


def _went_back(before: ServerStats, now: ServerStats) -> bool:
    """The server restarted between two samples: its uptime or a counter went down."""
    if now.uptime_seconds < before.uptime_seconds:
        return True
    return any(
        getattr(t, c) < getattr(before.tiers[name], c)
        for name, t in now.tiers.items()
        if name in before.tiers
        for c in COUNTERS
    )


def cmd_health(conn: Connection, address: str, timeout: float, service: str) -> int:
    """0 when the server answers SERVING for `service`; a line saying what is wrong if not."""
    with conn.open(grpc, []) as channel:
        try:
            reply = HealthStub(channel).Check(
                HealthCheckRequest(service=service), timeout=timeout, wait_for_ready=False
            )
        except grpc.RpcError as exc:
            print(f"kvstore: {address}: not healthy: {exc.code().name}: {exc.details()}",
                  file=sys.stderr)  # fmt: skip
            return 1
    status = HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != HealthCheckResponse.SERVING:
        print(f"kvstore: {address}: {status}", file=sys.stderr)
        return 1
    print(status)
    return 0


def cmd_ls(
    client: KVClient, namespace: str | None, limit: int, as_json: bool, console: Console
) -> None:
    entries = client.entries(namespace, limit)
    if as_json:
        for e in entries:
            h = e.header
            row = {
                "namespace": e.namespace,
                "key": h.key.hex(),
                "dtype": h.dtype,
                "shape": list(h.shape),
                "bytes": h.nbytes,
                "tier": e.tier,
                "pins": e.pins,
                "hits": e.hits,
            }
            print(json.dumps(row))
        return
    table = Table("namespace", "key", "dtype", "shape", "size", "tier", "pins", "hits")
    for e in entries:
        h = e.header
        table.add_row(
            e.namespace,
            h.key.hex()[:16] + "…",
            h.dtype,
            "x".join(map(str, h.shape)) or "scalar",
            format_size(h.nbytes),
            e.tier,
            str(e.pins),
            str(e.hits),
        )
    console.print(table)
    console.print(f"{len(entries)} entries" + (f" (limit {limit})" if limit else ""))


def cmd_events(
    client: KVClient, namespaces: str, snapshot: bool, count: int, as_json: bool
) -> None:
    """Print each event of `namespaces` as it comes (flushed: `kvstore events | grep`)."""
    stream = client.watch(namespaces, snapshot=snapshot)
    seen = 0
    try:
        for e in stream:
            if as_json:
                row = {
                    "kind": e.kind.name, "seq": e.seq, "namespace": e.namespace,
                    "key": e.key.hex(), "tier": e.tier, "tiers": list(e.tiers),
                    "bytes": e.nbytes, "instance": e.instance,
                }  # fmt: skip
                print(json.dumps(row), flush=True)
            else:
                held = ",".join(e.tiers) or "gone"
                where = (f"{e.tier} -> {held}" if e.tier else held) if e.namespace else ""
                size = format_size(e.nbytes) if e.nbytes else ""
                fields = [f"{e.seq:>8}", f"{e.kind.name:<14}", e.namespace, e.key.hex()[:16]]
                print(" ".join([*fields, where, size]).rstrip(), flush=True)
            seen += 1
            if count and seen >= count:
                break
    finally:
        stream.close()


def cmd_token(tenant: str, read: list[str], write: list[str]) -> int:
    if not read and not write:
        print("kvstore: token: give --read and/or --write namespace globs", file=sys.stderr)
        return 2
    token, entry = mint_token(tenant, read, write)
    # The entry alone on stdout, so `kvstore token ... >> tokens.toml` appends just the hash.
    print(f"# tenant {tenant}: add to the --auth-tokens file (an existing tenant: add the hash "
          "to its tokens)", file=sys.stderr)  # fmt: skip
    print(entry)
    print(f"token: {token}\n# give it to the tenant (KVSTORE_TOKEN); it is not stored anywhere",
          file=sys.stderr)  # fmt: skip
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "token":
        return cmd_token(args.tenant, args.read, args.write)
    address = args.address or default_address()
    security = {
        "token": args.token,
        "tls_ca": args.tls_ca,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_server_name": args.tls_server_name,
    }
    try:
        conn = Connection.resolve(address, **security)
    except KVStoreError as exc:
        print(f"kvstore: {exc}", file=sys.stderr)
        return 2
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 120)  # pipes and logs get whole rows
    if args.command == "health":
        return cmd_health(conn, address, args.timeout, args.service)
    if args.command == "stats" and args.watch is not None:
        if args.json or args.watch <= 0:
            print("kvstore: --watch takes a positive interval and no --json", file=sys.stderr)
            return 2
        watch_stats(address, args.timeout, args.watch, console, security)
        return 0
    try:
        with KVClient(address, "kvstore-admin", timeout=args.timeout, **security) as client:
            if args.command == "stats":
                cmd_stats(client, args.json, console)
            elif args.command == "events":
                if args.count < 0:
                    print("kvstore: events: --count takes N >= 0", file=sys.stderr)
                    return 2
                cmd_events(client, args.namespace, args.snapshot, args.count, args.json)
            else:
                cmd_ls(client, args.namespace, args.limit, args.json, console)
    except KVStoreError as exc:
        print(f"kvstore: {address}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the way `kvstore events` ends when run by hand
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
