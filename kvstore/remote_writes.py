"""The queue of values waiting to be written to the remote tier.

`WriteQueue` is bounded in bytes: pushing past the bound drops the oldest pending writes
(counted in `dropped`), so a put never waits for the remote, and a slow or dead cluster
costs at most the bound in memory. A write-through item refers to the stored entry and
is read when its turn comes (nothing is copied on the put path); a value leaving the node
carries its bytes, captured as it left.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from kvstore.codecs.container import ValueHeader
from kvstore.tiers.base import Buffer


@dataclass(eq=False)
class PendingWrite:
    namespace: str
    key: bytes
    nbytes: int
    entry: Any = None  # the store's Entry, for a write-through read when written
    header: ValueHeader | None = None  # a captured value: its container header ...
    payload: Buffer | None = None  # ... and payload
    encoded: bool = False  # `payload` is as a tier stored it (not to be encoded again)
    newest: bool = False  # the newest chunk of its sequence (`Codec.for_newest` encodes it)
    position: int = -1  # its first token's position in its sequence (`Codec.for_position`)


class WriteQueue:
    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._items: deque[PendingWrite] = deque()
        self._bytes = 0
        self._cond = threading.Condition()
        self.dropped = 0
        self.closed = False

    @property
    def depth(self) -> int:
        return len(self._items)

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    def push(self, item: PendingWrite) -> None:
        with self._cond:
            if item.nbytes > self.limit_bytes:
                self.dropped += 1
                return
            while self._items and self._bytes + item.nbytes > self.limit_bytes:
                self._bytes -= self._items.popleft().nbytes
                self.dropped += 1
            self._items.append(item)
            self._bytes += item.nbytes
            self._cond.notify()

    def take(self, most_bytes: int, timeout_s: float) -> list[PendingWrite]:
        """The oldest pending writes, up to `most_bytes` (at least one); waits up to
        `timeout_s` for the first, and returns [] if none came or the queue closed."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not self._items and not self.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._cond.wait(left)
            out: list[PendingWrite] = []
            taken = 0
            while self._items and (not out or taken + self._items[0].nbytes <= most_bytes):
                item = self._items.popleft()
                taken += item.nbytes
                out.append(item)
            self._bytes -= taken
            return out

    def discard(self, namespace: str, keys: Collection[bytes]) -> None:
        """Forget pending writes of `keys` (deleted: they must not come back)."""
        with self._cond:
            keep = [i for i in self._items if not (i.namespace == namespace and i.key in keys)]
            self._items = deque(keep)
            self._bytes = sum(i.nbytes for i in keep)

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()
