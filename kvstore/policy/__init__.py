"""Eviction policies: `base.EvictionPolicy`, and one module per policy: `lru` (the default)
and `gdsf` (reuse counts with aging, weighed by recompute cost: for RAG chunk caches)."""

from __future__ import annotations

from kvstore.policy.base import EvictionPolicy
from kvstore.policy.gdsf import GDSFPolicy
from kvstore.policy.lru import LRUPolicy

POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRUPolicy, "gdsf": GDSFPolicy}

__all__ = ["POLICIES", "EvictionPolicy", "GDSFPolicy", "LRUPolicy"]
