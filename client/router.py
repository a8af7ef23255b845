"""`KVRouter`: which node holds which prefix, kept from the nodes' KV events, and which node
a request should go to.

    router = KVRouter("llama-3-8b/bf16", nodes={"a": "10.0.0.1:7070", "b": "10.0.0.2:7070"})
    match = router.best(token_ids)        # NodeMatch(node="b", chunks=12, ...) or None
    ...
    router.close()

Each node is followed by a background thread: a `Watch` stream of the router's namespace
with a snapshot, so the router's view of a node is that snapshot plus every change since
(a view is swapped in whole at SNAPSHOT_END; until then the previous one serves).
A stream that fails (node down, restarted) forgets the node's state and reconnects with
exponential backoff; the new stream's snapshot replaces it. A GAP (the router fell behind)
keeps the stale view until the snapshot that follows it replaces it.

Engines with a transport of their own (or tests) skip the threads: `apply(node, event)`
feeds events as `KVClient.watch` yields them.

Ranking: the keys of a token sequence are the client's prefix key chain
(`KVClient.prefix_keys`: `kvstore.keys.chunk_keys` salted by the namespace, partial tail
included), so they are the keys engines store. A node's match is the number of leading
keys it holds; with `tier_weights` each held chunk counts its fastest tier's weight instead
of 1 (e.g. gpu 1.0, cpu 0.8, ssd 0.3: a prefix in GPU memory beats a longer one on disk).
An engine adapter that stores a chunk as several values under derived keys (one per layer
or layer group) is matched through `chunk_part`, which names the value that stands for a
chunk: `lambda k: layer_key(k, 0, 0)` (`kvstore.client.vllm`: rank 0, layer 0) or
`lambda k: group_key(k, 0, groups)` (`kvstore.client.hf`). The router then assumes the
chunk's other parts are where that one is, as the adapters store and evict them together.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Unpack

import numpy as np

from kvstore.client._channel import ConnectOptions
from kvstore.client._watch import WatchStream
from kvstore.client.sync import KVClient
from kvstore.errors import KVStoreError
from kvstore.events import EventKind, KVEvent
from kvstore.keys import chunk_keys

log = logging.getLogger(__name__)

BACKOFF_S = (0.1, 5.0)
"""First and longest wait before reconnecting to a node whose stream failed."""


@dataclass(frozen=True)
class NodeMatch:
    """How much of a token sequence one node holds."""

    node: str
    chunks: int
    """Leading chunks of the sequence the node holds (its longest cached prefix)."""
    score: float
    """`chunks` weighted by the fastest tier of each (= chunks with unit weights)."""
    tiers: tuple[str, ...]
    """The fastest tier of each held chunk, in order."""


class KVRouter:
    """Where each (namespace, key) is held on several nodes, and nodes ranked by the
    longest cached prefix of a token sequence. Thread safe."""

    def __init__(
        self,
        namespace: str,
        chunk_tokens: int | None = None,
        *,
        nodes: Mapping[str, str] | None = None,
        tier_weights: Mapping[str, float] | None = None,
        chunk_part: Callable[[bytes], bytes] | None = None,
        backoff: tuple[float, float] = BACKOFF_S,
        **connect: Unpack[ConnectOptions],
    ) -> None:
        """`chunk_tokens`: the servers' setting (asked of the first node reached when
        None). `nodes`: name -> address, each followed by a background thread (see
        `follow`). `tier_weights`: a held chunk's worth by its fastest tier (default 1
        each). `chunk_part`: the key of the value that stands for a chunk, from the chunk's
        prefix key (see the module doc; default: the prefix key itself). `connect`: as
        `KVClient`'s (token, TLS), for every node."""
        self.namespace = namespace
        self.chunk_tokens = chunk_tokens
        self.tier_weights = dict(tier_weights or {})
        for tier, w in self.tier_weights.items():
            if not w > 0:
                raise ValueError(f"tier weight of {tier} must be positive, got {w}")
        self._backoff = backoff
        self.chunk_part = chunk_part
        self._connect = connect
        self._lock = threading.Lock()
        self._held: dict[str, dict[bytes, tuple[str, ...]]] = {}
        self._pending: dict[str, dict[bytes, tuple[str, ...]]] = {}  # snapshots in progress
        self._instance: dict[str, str] = {}
        self._seq: dict[str, int] = {}
        self.gaps: dict[str, int] = {}
        """Per node, GAP events received (the router fell behind and resynchronised)."""
        self.restarts: dict[str, int] = {}
        """Per node, server restarts seen (a new instance id)."""
        self._stop = threading.Event()
        self._streams: dict[str, WatchStream] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._synced: dict[str, threading.Event] = {}
        for node, address in (nodes or {}).items():
            self.follow(node, address)

    # ------------------------------------------------------------ state from events

    def apply(self, node: str, event: KVEvent) -> None:
        """Update `node`'s state by one event (as `KVClient.watch` yields them)."""
        with self._lock:
            if event.instance and event.instance != self._instance.get(node):
                if node in self._instance:
                    self.restarts[node] = self.restarts.get(node, 0) + 1
                # A new server start: what it held is unknown until its snapshot.
                self._instance[node] = event.instance
                self._held[node] = {}
                self._pending.pop(node, None)
            held = self._held.setdefault(node, {})
            kind = event.kind
            if kind == EventKind.GAP:
                self.gaps[node] = self.gaps.get(node, 0) + 1
                return
            if kind == EventKind.SNAPSHOT_BEGIN:
                self._pending[node] = {}
                return
            if kind == EventKind.SNAPSHOT_END:
                self._held[node] = self._pending.pop(node, held)
                self._seq[node] = event.seq
                return
            if event.namespace != self.namespace:
                return
            # The stale view follows live events too while a snapshot builds the new one.
            views = [self._pending[node]] if node in self._pending else []
            if kind != EventKind.SNAPSHOT:
                views.append(held)
                self._seq[node] = event.seq
            for view in views:
                if event.tiers:
                    view[event.key] = event.tiers
                else:
                    view.pop(event.key, None)

    def apply_all(self, node: str, events: Iterable[KVEvent]) -> None:
        for event in events:
            self.apply(node, event)

    def forget(self, node: str) -> None:
        """Drop what the router knows of `node` (its stream is down): it matches nothing
        until a new snapshot arrives."""
        with self._lock:
            self._held[node] = {}
            self._pending.pop(node, None)
            self._instance.pop(node, None)

    def held(self, node: str) -> int:
        """How many keys of the namespace `node` is known to hold."""
        with self._lock:
            return len(self._held.get(node, ()))

    def seq(self, node: str) -> int:
        """The seq of the last event applied from `node` (0: none yet)."""
        with self._lock:
            return self._seq.get(node, 0)

    # ------------------------------------------------------------ ranking

    def rank(self, token_ids: Sequence[int] | np.ndarray) -> list[NodeMatch]:
        """Every known node, best first: highest score, then most chunks, then name."""
        if self.chunk_tokens is None:
            raise RuntimeError("chunk_tokens is not known yet: pass it, or wait for a node")
        keys = chunk_keys(token_ids, self.chunk_tokens, self.namespace, include_partial=True)
        if self.chunk_part is not None:
            keys = [self.chunk_part(k) for k in keys]
        weights = self.tier_weights
        out = []
        with self._lock:
            for node, held in self._held.items():
                tiers: list[str] = []
                score = 0.0
                for k in keys:
                    where = held.get(k)
                    if not where:
                        break
                    tiers.append(where[0])
                    score += weights.get(where[0], 1.0)
                out.append(NodeMatch(node, len(tiers), score, tuple(tiers)))
        out.sort(key=lambda m: (-m.score, -m.chunks, m.node))
        return out

    def best(self, token_ids: Sequence[int] | np.ndarray) -> NodeMatch | None:
        """The node holding the most of the sequence's prefix; None when none holds any."""
        ranked = self.rank(token_ids)
        return ranked[0] if ranked and ranked[0].chunks else None

    # ------------------------------------------------------------ following nodes

    def follow(self, node: str, address: str) -> None:
        """Follow `node` at `address` from a background thread until `close()`."""
        if node in self._threads:
            raise ValueError(f"node {node!r} is already followed")
        self._synced[node] = threading.Event()
        t = threading.Thread(
            target=self._follow, args=(node, address), name=f"kvstore-router-{node}", daemon=True
        )
        self._threads[node] = t
        t.start()

    def wait_synced(self, timeout: float | None = None) -> bool:
        """Whether every followed node's first snapshot arrived within `timeout`."""
        return all(e.wait(timeout) for e in self._synced.values())

    def _follow(self, node: str, address: str) -> None:
        delay = self._backoff[0]
        while not self._stop.is_set():
            try:
                with KVClient(address, self.namespace, **self._connect) as client:
                    if self.chunk_tokens is None:
                        self.chunk_tokens = client.chunk_tokens
                    stream = client.watch(self.namespace, snapshot=True)
                    with self._lock:
                        self._streams[node] = stream
                    if self._stop.is_set():
                        stream.close()
                    for event in stream:
                        self.apply(node, event)
                        if event.kind == EventKind.SNAPSHOT_END:
                            delay = self._backoff[0]
                            self._synced[node].set()
            except KVStoreError as exc:
                log.warning("router: %s (%s): %s; retrying in %.1fs", node, address, exc, delay)
            self.forget(node)
            if self._stop.wait(delay):
                break
            delay = min(delay * 2, self._backoff[1])

    def close(self) -> None:
        """Stop following every node."""
        self._stop.set()
        with self._lock:
            streams = list(self._streams.values())
        for s in streams:
            s.close()
        for t in self._threads.values():
            t.join(timeout=10)

    def __enter__(self) -> KVRouter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
