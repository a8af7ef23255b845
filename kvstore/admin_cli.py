"""`kvstore`: inspect a running server (`kvstore stats`, `kvstore ls`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kvstore import __version__
from kvstore.client import KVClient
from kvstore.config import format_size
from kvstore.errors import KVStoreError


def default_address() -> str:
    env = os.environ.get("KVSTORE_ADDRESS")
    if env:
        return env
    socket = os.environ.get("KVSTORE_SOCKET")
    if socket:
        return f"unix://{Path(socket).resolve()}"
    data_dir = Path(os.environ.get("KVSTORE_DATA_DIR", "kvstore-data")).resolve()
    return f"unix://{data_dir / 'kvstore.sock'}"


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
    p.add_argument("--version", action="version", version=f"kvstore {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    st = sub.add_parser("stats", help="server settings and a table per tier")
    st.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls = sub.add_parser("ls", help="list stored entries")
    ls.add_argument("--namespace", default=None, help="only this namespace")
    ls.add_argument("--limit", type=int, default=100, help="at most this many (0: all)")
    ls.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    return p


def cmd_stats(client: KVClient, as_json: bool, console: Console) -> None:
    s = client.stats()
    if as_json:
        console.print_json(json.dumps(asdict(s)))
        return
    console.print(
        f"kvstore-server {s.version}  up {s.uptime_seconds:.0f}s  entries {s.entries}  "
        f"pinned {s.pinned}  leases {s.leases}  chunk {s.chunk_tokens} tokens"
    )
    table = Table("tier", "entries", "used", "capacity", "hits", "misses", "evictions",
                  "promotions", "demotions")  # fmt: skip
    for t in s.tiers.values():
        table.add_row(
            t.name,
            str(t.entries),
            format_size(t.used_bytes),
            format_size(t.capacity_bytes),
            str(t.hits),
            str(t.misses),
            str(t.evictions),
            str(t.promotions),
            str(t.demotions),
        )
    console.print(table)


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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    address = args.address or default_address()
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 120)  # pipes and logs get whole rows
    try:
        with KVClient(address, "kvstore-admin", timeout=args.timeout) as client:
            if args.command == "stats":
                cmd_stats(client, args.json, console)
            else:
                cmd_ls(client, args.namespace, args.limit, args.json, console)
    except KVStoreError as exc:
        print(f"kvstore: {address}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
