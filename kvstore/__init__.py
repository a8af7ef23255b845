"""kvstore: a tiered KV-cache store for LLM serving.

The daemon (`kvstore-server`) owns the memory tiers and serves them over gRPC; engines talk
to it through `kvstore.client`. `kvstore.keys` computes the prefix keys both sides agree on.
"""

from __future__ import annotations

__version__ = "0.1.0"
