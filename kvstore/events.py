"""KV events: what the tiers gain and lose, for routers that track where each prefix is held.

Primitives:
- `KVEvent`, `EventKind`: one change of where a value is held (the wire's `KVEvent`).
- `EventHub`: numbers every event (`seq`, from 1 at each server start; `instance` names the
  start) and offers it to each registered `Watcher`. With no watcher, publishing costs the
  store one truth test of a tuple.
- `Watcher`: one Watch stream's bounded queue. Events that do not fit are dropped and
  counted, and the reader learns of it (`take` returns where the loss began), so it can
  send a GAP marker and a fresh snapshot; a slow reader never blocks a put or grows memory.

The store publishes and subscribes under its own lock, so `seq` follows the order in which
changes happen, and a snapshot taken while subscribing is exact as of the last seq before
the watcher's first queued event.
"""

from __future__ import annotations

import enum
import fnmatch
import secrets
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from kvstore.errors import ResourceExhausted, Unavailable


class EventKind(enum.IntEnum):
    """As `kvstore.v1.KVEvent.Kind`; see the proto for what each means."""

    STORED = 1
    PROMOTED = 2
    DEMOTED = 3
    EVICTED = 4
    DELETED = 5
    SNAPSHOT = 6
    SNAPSHOT_END = 7
    GAP = 8


@dataclass(frozen=True, slots=True)
class KVEvent:
    """One change of where a value is held: after it, `(namespace, key)` is in `tiers`
    (fastest first; empty: gone). `tier` is the tier the event is about."""

    kind: EventKind
    seq: int
    namespace: str = ""
    key: bytes = b""
    tier: str = ""
    tiers: tuple[str, ...] = ()
    nbytes: int = 0
    instance: str = ""
    """The server start that emitted it (set on events a client receives)."""


class Held(Protocol):
    """What the hub reads of a store entry."""

    namespace: str
    key: bytes
    nbytes: int

    @property
    def tiers(self) -> tuple[str, ...]: ...


class Watcher:
    """The events one Watch stream has yet to send, at most `capacity` of them.

    `admits(namespace)` filters (the request's glob and the caller's read rights); `wake()`
    is called when the queue goes from empty to not empty, or the watcher is closed.
    """

    def __init__(
        self,
        glob: str,
        may_read: Callable[[str], bool],
        capacity: int,
        wake: Callable[[], None],
    ) -> None:
        self.glob = glob or "*"
        self._may_read = may_read
        self.capacity = capacity
        self._wake = wake
        self._queue: deque[KVEvent] = deque()
        self._lock = threading.Lock()
        self._lost_from = 0  # seq of the first event dropped since the last take(); 0: none
        self.dropped = 0
        self.closed = False
        self._admitted: dict[str, bool] = {}  # namespaces are few; globbing each event is not

    def admits(self, namespace: str) -> bool:
        ok = self._admitted.get(namespace)
        if ok is None:
            ok = fnmatch.fnmatchcase(namespace, self.glob) and self._may_read(namespace)
            if len(self._admitted) < 4096:
                self._admitted[namespace] = ok
        return ok

    def offer(self, event: KVEvent) -> bool:
        """Queue `event`; False when it was dropped (the queue is full or already lost)."""
        with self._lock:
            if self._lost_from or len(self._queue) >= self.capacity:
                self._lost_from = self._lost_from or event.seq
                self.dropped += 1
                return False
            first = not self._queue
            self._queue.append(event)
        if first:
            self._wake()
        return True

    def take(self) -> tuple[list[KVEvent], int]:
        """The queued events, and the seq from which events were dropped after them (0:
        none). Queuing resumes with the next event."""
        with self._lock:
            events = list(self._queue)
            self._queue.clear()
            lost, self._lost_from = self._lost_from, 0
        return events, lost

    def restart(self) -> None:
        """Forget what is queued (a snapshot taken now replaces it)."""
        with self._lock:
            self._queue.clear()
            self._lost_from = 0

    def close(self) -> None:
        self.closed = True
        self._wake()


class EventHub:
    """Numbers events and hands them to the watchers that admit them; at most
    `max_watchers` at once. The caller (the store) serialises `publish` and `subscribe`."""

    def __init__(self, max_watchers: int) -> None:
        self.max_watchers = max_watchers
        self.instance = secrets.token_hex(8)
        self.seq = 0
        self.watchers: tuple[Watcher, ...] = ()  # replaced, never mutated: read without lock
        self.dropped = 0  # events dropped by full watcher queues, all watchers together
        self._lock = threading.Lock()
        self._closed = False

    def publish(self, kind: EventKind, held: Held, tier: str) -> None:
        """`held` changed by `kind` in `tier`; it is now held in `held.tiers`."""
        self.seq += 1
        event = KVEvent(kind, self.seq, held.namespace, held.key, tier, held.tiers, held.nbytes)
        for w in self.watchers:
            if w.admits(held.namespace) and not w.offer(event):
                self.dropped += 1

    def subscribe(self, watcher: Watcher, held: Iterable[Held]) -> list[KVEvent]:
        """Register `watcher` (again, after a gap: its queue restarts) and return what of
        `held` it admits as SNAPSHOT events closed by SNAPSHOT_END, exact as of that seq.
        The caller holds the lock `publish` runs under. ResourceExhausted past the bound;
        Unavailable once closed."""
        with self._lock:
            if self._closed:
                raise Unavailable("the server is shutting down")
            if watcher not in self.watchers:
                if len(self.watchers) >= self.max_watchers:
                    raise ResourceExhausted(
                        f"{len(self.watchers)} Watch streams are open, the server's bound "
                        f"(max-watchers {self.max_watchers}); close one or raise the bound"
                    )
                self.watchers = (*self.watchers, watcher)
        watcher.restart()
        seq = self.seq
        snapshot = [
            KVEvent(EventKind.SNAPSHOT, seq, h.namespace, h.key, "", h.tiers, h.nbytes)
            for h in held
            if watcher.admits(h.namespace)
        ]
        snapshot.append(KVEvent(EventKind.SNAPSHOT_END, seq))
        return snapshot

    def unsubscribe(self, watcher: Watcher) -> None:
        with self._lock:
            self.watchers = tuple(w for w in self.watchers if w is not watcher)

    def close(self) -> None:
        """End every watch (shutdown): each watcher is woken and sees `closed`."""
        with self._lock:
            self._closed = True
            watchers = self.watchers
        for w in watchers:
            w.close()
