"""Greedy-Dual-Size-Frequency eviction: keep what is reused often and costly to recompute.

RAG chunks are not reused in recency order: a system prompt or a popular document comes back
again and again between bursts of one-off chunks, which LRU lets push it out (Cache-Craft
makes this point for chunk caches). GDSF (Cherkasova, 1998) gives each entry the priority

    priority = clock + reuses * cost

where `cost` is what recomputing the entry costs per byte it occupies (1.0 unless the store
knows better: prefill cost per byte of KV is the same for every chunk of one model) and
`reuses` counts its reads since it arrived in the tier, itself included. The entry with the
lowest priority goes first; the clock then rises to that priority, so an entry that stops
being read ages out behind newer ones instead of living forever on an old count (LFU's
failure). Ties go to the least recently touched.

Priorities sit in a heap with lazy deletion: an access pushes the entry's new priority, and
stale heap items are skipped and compacted once they outnumber the live ones. Insert, access
and remove are O(log n); `candidates()` walks a copy of the heap in order.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator

from kvstore.policy.base import EvictionPolicy, K


class GDSFPolicy(EvictionPolicy[K]):
    def __init__(self) -> None:
        self._clock = 0.0
        # item -> [priority, reuses, cost, sequence]: the live heap item is the one whose
        # (priority, sequence) match.
        self._state: dict[K, list[float]] = {}
        self._heap: list[tuple[float, int, K]] = []
        self._seq = itertools.count()

    def _push(self, item: K, state: list[float]) -> None:
        state[0] = self._clock + state[1] * state[2]
        state[3] = next(self._seq)
        heapq.heappush(self._heap, (state[0], int(state[3]), item))
        if len(self._heap) > 2 * len(self._state) + 1024:  # drop stale heap items
            self._heap = [(p, s, i) for p, s, i in self._heap if self._live(p, s, i)]
            heapq.heapify(self._heap)

    def _live(self, priority: float, seq: int, item: K) -> bool:
        state = self._state.get(item)
        return state is not None and state[0] == priority and state[3] == seq

    def insert(self, item: K, cost: float = 1.0) -> None:
        state = self._state.get(item)
        if state is None:
            state = self._state[item] = [0.0, 1.0, max(float(cost), 0.0), 0.0]
        else:
            state[2] = max(float(cost), 0.0)
        self._push(item, state)

    def access(self, item: K) -> None:
        state = self._state.get(item)
        if state is not None:
            state[1] += 1
            self._push(item, state)

    def remove(self, item: K) -> None:
        state = self._state.pop(item, None)
        if state is None:
            return
        # Leaving with the lowest priority (an eviction): the clock catches up with it.
        while self._heap and not self._live(*self._heap[0]):
            heapq.heappop(self._heap)
        if not self._heap or state[0] <= self._heap[0][0]:
            self._clock = max(self._clock, state[0])

    def candidates(self) -> Iterator[K]:
        heap = list(self._heap)
        while heap:
            priority, seq, item = heapq.heappop(heap)
            if self._live(priority, seq, item):
                yield item

    def __len__(self) -> int:
        return len(self._state)
