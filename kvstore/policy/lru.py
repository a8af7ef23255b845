"""Least-recently-used eviction: an ordered dict, oldest first, O(1) per event."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from kvstore.policy.base import EvictionPolicy, K


class LRUPolicy(EvictionPolicy[K]):
    def __init__(self) -> None:
        self._order: OrderedDict[K, None] = OrderedDict()

    def insert(self, item: K, cost: float = 1.0) -> None:
        self._order[item] = None
        self._order.move_to_end(item)

    def access(self, item: K) -> None:
        if item in self._order:
            self._order.move_to_end(item)

    def remove(self, item: K) -> None:
        self._order.pop(item, None)

    def candidates(self) -> Iterator[K]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)
