"""Python clients for kvstore: `KVClient` (blocking) and `AsyncKVClient` (asyncio).

    from kvstore.client import KVClient
    with KVClient("unix:///path/kvstore-data/kvstore.sock", "llama-3-8b/bf16") as kv:
        kv.put_prefix(token_ids, kv_tensor)      # [layers, 2, tokens, heads, head_dim]
        hit = kv.get_prefix(token_ids)           # longest stored prefix, or None

Both share `ClientCore`, which holds all protocol logic; they differ only in how they wait.
"""

from __future__ import annotations

from kvstore.client._core import ServerStats, TierStats
from kvstore.client.aio import AsyncKVClient
from kvstore.client.sync import KVClient

__all__ = ["AsyncKVClient", "KVClient", "ServerStats", "TierStats"]
