"""KV events: what the tiers gain and lose, for routers that track where each prefix is held.

Primitives:
- `KVEvent`, `EventKind`: one change of where a value is held (the wire's `KVEvent`).
- `EventHub`: numbers every event (`seq`, from 1 at each server start; `instance` names the
  start) and offers it to each registered `Watcher`. With no watcher, publishing costs the
  store one truth test of a tuple.
- `Watcher`: one Watch stream's bounded queue. Events that do not fit are dropped and
  counted, and the reader learns of it (`take` returns where the loss began), so it can
  send a GAP marker and a fresh snapshot; a slow reader never blocks a put or grows memory.

Snapshots are streamed, not copied: subscribing takes the list of keys held (one reference
each) and queues SNAPSHOT_BEGIN; each `snapshot_step` then queues the current state of the
next keys as SNAPSHOT events, in the same queue as live events and only while the queue has
room. Each SNAPSHOT says where its key is at that point of the stream, so a reader that
applies the stream in order (snapshot and live events alike) from SNAPSHOT_BEGIN holds the
server's state at SNAPSHOT_END, with no change lost or applied out of order.

The store publishes, subscribes and steps snapshots under its own lock, so `seq` follows
the order in which changes happen.
"""

from __future__ import annotations

import enum
import fnmatch
import secrets
import threading
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

from kvstore.errors import ResourceExhausted, Unavailable


class EventKind(enum.IntEnum):
    """As `kvstore.v1.KVEvent.Kind`; see the proto for what each means."""

    STORED = 1
    PROMOTED = 2
    DEMOTED = 3
    EVICTED = 4
    DELETED = 5
    SNAPSHOT_BEGIN = 6
    SNAPSHOT = 7
    SNAPSHOT_END = 8
    GAP = 9


class KVEvent(NamedTuple):
    """One change of where a value is held: after it, `(namespace, key)` is in `tiers`
    (fastest first; empty: gone). `tier` is the tier the event is about. A named tuple:
    built for every change while someone watches, it must be cheap (a third of a frozen
    dataclass's cost)."""

    kind: EventKind
    seq: int
    namespace: str = ""
    key: bytes = b""
    tier: str = ""
    tiers: tuple[str, ...] = ()
    nbytes: int = 0
    instance: str = ""  # the server start that emitted it (set on events a client receives)


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
        # The snapshot being streamed: the keys held when it began, and how many are sent.
        self._snapshot: list[Any] | None = None
        self._sent = 0

    def admits(self, namespace: str) -> bool:
        cache = self._admitted  # before the rights are read: see `rights_changed`
        ok = cache.get(namespace)
        if ok is None:
            ok = fnmatch.fnmatchcase(namespace, self.glob) and self._may_read(namespace)
            if len(cache) < 4096:
                cache[namespace] = ok
        return ok

    def rights_changed(self) -> None:
        """`may_read` answers differently from now on (called after the change): what was
        cached is dropped. An answer under the old rights still being computed lands in
        the dropped cache, since the cache is read before the rights."""
        self._admitted = {}

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

    def restart(self, snapshot: list[Any] | None, seq: int) -> None:
        """Forget what is queued, and begin streaming a snapshot of `snapshot` (the keys
        held now) if given."""
        with self._lock:
            self._queue.clear()
            self._lost_from = 0
            self._snapshot, self._sent = snapshot, 0
            if snapshot is not None:
                self._queue.append(KVEvent(EventKind.SNAPSHOT_BEGIN, seq))

    @property
    def snapshotting(self) -> bool:
        """Whether a snapshot is still being streamed."""
        return self._snapshot is not None

    def snapshot_step(self, index: Mapping[Any, Held], most: int, seq: int) -> None:
        """Queue the state in `index` of up to `most` more keys of the snapshot (fewer when
        the queue has less room), then SNAPSHOT_END once all are. The caller holds the lock
        `publish` runs under."""
        keys = self._snapshot
        if keys is None:
            return
        with self._lock:
            room = self.capacity - len(self._queue)
        if room <= 0 or self._lost_from:
            return  # the reader drains first, or a resync restarts the snapshot anyway
        stop = min(len(keys), self._sent + min(most, room))
        events = []
        for k in keys[self._sent : stop]:
            h = index.get(k)
            if h is not None and self.admits(h.namespace):
                events.append(
                    KVEvent(EventKind.SNAPSHOT, seq, h.namespace, h.key, "", h.tiers, h.nbytes)
                )
        self._sent = stop
        if stop == len(keys):
            events.append(KVEvent(EventKind.SNAPSHOT_END, seq))
            self._snapshot = None
        with self._lock:
            first = not self._queue
            self._queue.extend(events)
        if first and events:
            self._wake()

    def close(self) -> None:
        """The stream is over (or the server is stopping): wake its reader, and let no
        later `subscribe` register it."""
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
        self.closed = False

    def publish(self, kind: EventKind, held: Held, tier: str) -> None:
        """`held` changed by `kind` in `tier`; it is now held in `held.tiers`."""
        self.seq += 1
        event = KVEvent(kind, self.seq, held.namespace, held.key, tier, held.tiers, held.nbytes)
        for w in self.watchers:
            if w.admits(held.namespace) and not w.offer(event):
                self.dropped += 1

    def subscribe(self, watcher: Watcher, snapshot: list[Any] | None) -> None:
        """Register `watcher` (again, after a gap: its queue restarts), with a snapshot of
        the keys in `snapshot` to stream (`Watcher.snapshot_step`) if given. The caller holds
        the lock `publish` runs under. ResourceExhausted past the bound; Unavailable once
        closed."""
        with self._lock:
            if self.closed or watcher.closed:
                raise Unavailable("the server is shutting down, or the stream ended")
            if watcher not in self.watchers:
                if len(self.watchers) >= self.max_watchers:
                    raise ResourceExhausted(
                        f"{len(self.watchers)} Watch streams are open, the server's bound "
                        f"(max-watchers {self.max_watchers}); close one or raise the bound"
                    )
                self.watchers = (*self.watchers, watcher)
        watcher.restart(snapshot, self.seq)

    def unsubscribe(self, watcher: Watcher) -> None:
        with self._lock:
            self.watchers = tuple(w for w in self.watchers if w is not watcher)

    def close(self) -> None:
        """End every watch (shutdown): each watcher is woken and sees `closed`."""
        with self._lock:
            self.closed = True
            watchers = self.watchers
        for w in watchers:
            w.close()
