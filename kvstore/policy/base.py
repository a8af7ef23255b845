"""The eviction-policy interface.

A policy orders the entries of one tier by how willing it is to evict them. It sees only
opaque hashable ids and three events (insert, access, remove); it never evicts by itself.
The tier manager walks `candidates()` and skips what it may not evict (pinned or leased).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class EvictionPolicy(ABC, Generic[K]):
    @abstractmethod
    def insert(self, item: K, cost: float = 1.0) -> None:
        """A new entry arrived in the tier. `cost`: what recomputing it costs per byte it
        occupies, relative to other entries (policies that weigh it keep costlier ones)."""

    @abstractmethod
    def access(self, item: K) -> None:
        """An entry of the tier was read."""

    @abstractmethod
    def remove(self, item: K) -> None:
        """An entry left the tier (evicted, demoted, promoted or deleted)."""

    @abstractmethod
    def candidates(self) -> Iterator[K]:
        """Entries in eviction order, first the one to evict first.

        The caller may not insert or remove while iterating; it collects, then acts.
        """

    @abstractmethod
    def __len__(self) -> int: ...
