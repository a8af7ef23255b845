"""Python clients for kvstore: `KVClient` (blocking) and `AsyncKVClient` (asyncio).

    from kvstore.client import KVClient
    with KVClient("unix:///path/kvstore-data/kvstore.sock", "llama-3-8b/bf16") as kv:
        kv.put_prefix(token_ids, kv_tensor)      # [layers, 2, tokens, heads, head_dim]
        hit = kv.get_prefix(token_ids)           # longest stored prefix, or None

Both share `ClientCore`, which holds all protocol logic; they differ only in how they wait.
"""

from __future__ import annotations

import os
from pathlib import Path

from kvstore.client._core import PrefixTiers, ServerStats, TierStats
from kvstore.client.aio import AsyncKVClient
from kvstore.client.sync import KVClient

__all__ = [
    "AsyncKVClient",
    "KVClient",
    "PrefixTiers",
    "ServerStats",
    "TierStats",
    "default_address",
]


def default_address() -> str:
    """The server's address as the environment gives it: $KVSTORE_ADDRESS, else the socket
    $KVSTORE_SOCKET (what the Helm chart sets in the engine container), else the socket
    under $KVSTORE_DATA_DIR (default ./kvstore-data), where the server puts it."""
    env = os.environ.get("KVSTORE_ADDRESS")
    if env:
        return env
    socket = os.environ.get("KVSTORE_SOCKET")
    if socket:
        return f"unix://{Path(socket).resolve()}"
    data_dir = Path(os.environ.get("KVSTORE_DATA_DIR", "kvstore-data")).resolve()
    return f"unix://{data_dir / 'kvstore.sock'}"
