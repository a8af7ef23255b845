"""Eviction policies: `base.EvictionPolicy`, and one module per policy."""

from __future__ import annotations

from kvstore.policy.base import EvictionPolicy
from kvstore.policy.lru import LRUPolicy

POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRUPolicy}

__all__ = ["POLICIES", "EvictionPolicy", "LRUPolicy"]
