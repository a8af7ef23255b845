"""Tier interfaces.

Two kinds of tier sit under the tier manager (`kvstore.store`):

- `MemoryTier`: memory cut into slots (`SlabAllocator`); values are only reachable through
  the index. Host memory (`HostArena`) is read and written in place through `view()`; a
  GPU pool (`kvstore.tiers.gpu`) copies to and from host memory on a stream of its own.
- `StorageTier`: a keyed store of containers (`kvstore.codecs.container`); `put` copies a
  value in, `read` hands back a checksum-verified view of it.

Tiers do no eviction of their own: when one is full it says so (`alloc` returns None,
`put` raises `TierFull`) and the manager decides what to demote or drop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager

from kvstore.codecs.container import ValueHeader
from kvstore.errors import Unavailable
from kvstore.tiers.slab import SlabAllocator, Slot

Buffer = bytes | bytearray | memoryview


class TierFull(Exception):
    """The tier has no room for this value until something is evicted."""


class TierError(Unavailable):
    """The tier failed for a reason eviction cannot fix (an I/O error, a full disk)."""


class Tier(ABC):
    name: str
    capacity_bytes: int

    @property
    @abstractmethod
    def used_bytes(self) -> int: ...

    @abstractmethod
    def close(self) -> None: ...


class MemoryTier(Tier):
    """Slots of memory; see `SlabAllocator` for the allocation rules."""

    allocator: SlabAllocator

    @property
    def used_bytes(self) -> int:
        return self.allocator.used_bytes

    @property
    def max_value_bytes(self) -> int:
        """Largest value a single slot can hold."""
        return self.allocator.max_alloc

    def alloc(self, nbytes: int) -> Slot | None:
        return self.allocator.alloc(nbytes)

    def free(self, slot: Slot) -> None:
        self.allocator.free(slot)


class StorageTier(Tier):
    """Keyed containers that survive a restart."""

    @abstractmethod
    def record_bytes(self, header: ValueHeader) -> int:
        """Bytes a value counts against `capacity_bytes`."""

    @abstractmethod
    def put(self, namespace: str, key: bytes, header: ValueHeader, payload: Buffer) -> None:
        """Store a value (replacing any old one).

        Raises `TierFull` when out of room and `TierError` when the medium fails.
        """

    @abstractmethod
    def read(
        self, namespace: str, key: bytes
    ) -> AbstractContextManager[tuple[ValueHeader, memoryview]]:
        """Context manager yielding the header and a verified view valid inside the block.

        Raises `KeyError` if absent and `kvstore.errors.DataLoss` if the stored bytes fail
        their checksum (the caller drops the entry).
        """

    @abstractmethod
    def delete(self, namespace: str, key: bytes) -> None: ...

    @abstractmethod
    def scan(self) -> Iterator[tuple[str, bytes, ValueHeader]]:
        """Every stored (namespace, key, header), for rebuilding the index on start."""

    @abstractmethod
    def sync(self) -> None:
        """Make every completed put durable."""
