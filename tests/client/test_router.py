"""`KVRouter` fed events directly: ranking by longest cached prefix, tier weights, snapshots
replacing state, restarts and gaps."""

from __future__ import annotations

import pytest

from kvstore.client.hf import group_key
from kvstore.client.router import KVRouter, NodeMatch
from kvstore.events import EventKind, KVEvent
from kvstore.keys import chunk_keys

NS = "llama/bf16"
CT = 4


def tokens(start: int, n_chunks: int) -> list[int]:
    return list(range(start, start + n_chunks * CT))


def stored(keys: list[bytes], tier: str = "cpu", seq: int = 1) -> list[KVEvent]:
    return [
        KVEvent(EventKind.STORED, seq + i, NS, k, tier, (tier,), 64, "i1")
        for i, k in enumerate(keys)
    ]


def keys_of(ids: list[int]) -> list[bytes]:
    return chunk_keys(ids, CT, NS, include_partial=True)


def test_the_node_with_the_longest_cached_prefix_ranks_first() -> None:
    r = KVRouter(NS, CT)
    prompt = tokens(0, 6)
    r.apply_all("a", stored(keys_of(prompt)[:2]))
    r.apply_all("b", stored(keys_of(prompt)[:5]))
    r.apply_all("c", stored(keys_of(tokens(1000, 6))))  # another prompt entirely
    assert r.rank(prompt) == [
        NodeMatch("b", 5, 5.0, ("cpu",) * 5),
        NodeMatch("a", 2, 2.0, ("cpu",) * 2),
        NodeMatch("c", 0, 0.0, ()),
    ]
    best = r.best(prompt)
    assert best is not None and best.node == "b"
    assert r.best(tokens(5000, 3)) is None


def test_a_hole_ends_the_prefix_and_a_partial_tail_counts_as_a_chunk() -> None:
    r = KVRouter(NS, CT)
    prompt = [*tokens(0, 4), 99, 98]  # four whole chunks and a partial one
    keys = keys_of(prompt)
    assert len(keys) == 5
    r.apply_all("a", stored([keys[0], keys[2], keys[3]]))  # chunk 1 missing
    r.apply_all("b", stored(keys))
    assert [(m.node, m.chunks) for m in r.rank(prompt)] == [("b", 5), ("a", 1)]


def test_tier_weights_prefer_a_shorter_prefix_in_faster_memory() -> None:
    r = KVRouter(NS, CT, tier_weights={"gpu": 1.0, "cpu": 0.8, "ssd": 0.25})
    prompt = tokens(0, 4)
    keys = keys_of(prompt)
    r.apply_all("disk", stored(keys, "ssd"))  # 4 x 0.25 = 1.0
    r.apply_all("gpu", stored(keys[:2], "gpu"))  # 2 x 1.0 = 2.0
    assert [m.node for m in r.rank(prompt)] == ["gpu", "disk"]
    with pytest.raises(ValueError, match="positive"):
        KVRouter(NS, CT, tier_weights={"ssd": 0})


def test_live_events_follow_evictions_demotions_and_deletes() -> None:
    r = KVRouter(NS, CT)
    prompt = tokens(0, 3)
    k = keys_of(prompt)
    r.apply_all("a", stored(k))
    r.apply("a", KVEvent(EventKind.DEMOTED, 4, NS, k[0], "ssd", ("ssd",), 64, "i1"))
    assert r.rank(prompt)[0].tiers == ("ssd", "cpu", "cpu")
    r.apply("a", KVEvent(EventKind.EVICTED, 5, NS, k[1], "cpu", (), 64, "i1"))
    assert r.rank(prompt)[0].chunks == 1
    r.apply("a", KVEvent(EventKind.DELETED, 6, NS, k[0], "", (), 64, "i1"))
    assert r.best(prompt) is None and r.held("a") == 1 and r.seq("a") == 6
    r.apply("a", KVEvent(EventKind.STORED, 7, "other/ns", k[0], "cpu", ("cpu",), 64, "i1"))
    assert r.best(prompt) is None  # another namespace's key is not this one's


def test_a_snapshot_replaces_what_was_known_and_a_restart_voids_it() -> None:
    r = KVRouter(NS, CT)
    prompt = tokens(0, 3)
    k = keys_of(prompt)
    r.apply_all("a", stored(k))

    def ev(
        kind: EventKind, seq: int, key: bytes = b"", tiers: tuple[str, ...] = (), i: str = "i1"
    ) -> None:
        r.apply("a", KVEvent(kind, seq, NS if key else "", key, "", tiers, 64, i))

    # After a GAP the old view serves (following live events) until the snapshot after it
    # is complete; the snapshot's view takes live events in stream order too.
    ev(EventKind.GAP, 9)
    ev(EventKind.SNAPSHOT_BEGIN, 11)
    ev(EventKind.SNAPSHOT, 11, k[0], ("cpu",))
    ev(EventKind.SNAPSHOT, 11, k[1], ("cpu",))
    r.apply("a", KVEvent(EventKind.EVICTED, 12, NS, k[1], "cpu", (), 64, "i1"))
    assert r.rank(prompt)[0].chunks == 1 and r.gaps == {"a": 1}  # the old view, k[1] gone
    ev(EventKind.SNAPSHOT, 12, k[2], ("ssd",))
    ev(EventKind.SNAPSHOT_END, 12)
    assert r.rank(prompt)[0].chunks == 1 and r.held("a") == 2 and r.seq("a") == 12
    # A new instance id: the server restarted and what it held is unknown.
    ev(EventKind.SNAPSHOT_BEGIN, 0, i="i2")
    assert r.held("a") == 0 and r.restarts == {"a": 1}
    ev(EventKind.SNAPSHOT, 0, k[1], ("ssd",), i="i2")
    ev(EventKind.SNAPSHOT_END, 0, i="i2")
    assert r.held("a") == 1 and r.best(prompt) is None  # holds chunk 1 but not chunk 0
    r.forget("a")
    assert r.held("a") == 0


def test_an_engine_adapters_derived_keys_are_matched_through_chunk_part() -> None:
    group0 = lambda k: group_key(k, 0, 4)  # noqa: E731  (the transformers cache's first group)
    r = KVRouter(NS, CT, chunk_part=group0)
    prompt = tokens(0, 3)
    r.apply_all("engine", stored([group0(k) for k in keys_of(prompt)]))
    r.apply_all("plain", stored(keys_of(prompt)))  # no value under a layer's key
    assert [(m.node, m.chunks) for m in r.rank(prompt)] == [("engine", 3), ("plain", 0)]


def test_ranking_needs_chunk_tokens() -> None:
    with pytest.raises(RuntimeError, match="chunk_tokens"):
        KVRouter(NS).rank([1, 2, 3])
