"""Least-recently-used eviction: an ordered dict, oldest first, O(1) per event."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator

from kvstore.policy.base import EvictionPolicy


class LRUPolicy(EvictionPolicy):
    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def insert(self, item: Hashable) -> None:
        self._order[item] = None
        self._order.move_to_end(item)

    def access(self, item: Hashable) -> None:
        if item in self._order:
            self._order.move_to_end(item)

    def remove(self, item: Hashable) -> None:
        self._order.pop(item, None)

    def candidates(self) -> Iterator[Hashable]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)
