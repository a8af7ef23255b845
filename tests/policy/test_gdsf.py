"""GDSF: entries reused often outlive one-off ones, costlier ones outlive cheaper ones at the
same reuse, an entry that stops being read ages out, and the store evicts by it."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore.codecs.container import checksum
from kvstore.errors import InvalidArgument
from kvstore.policy import GDSFPolicy, LRUPolicy
from tests.test_store import NS, MakeStore, entry, key, put, value


def test_reused_entries_outlive_a_burst_of_one_offs() -> None:
    p: GDSFPolicy[str] = GDSFPolicy()
    p.insert("popular")
    for _ in range(5):
        p.access("popular")
    for i in range(100):  # one-off chunks, each read once, newer than "popular"
        p.insert(f"once-{i}")
    order = list(p.candidates())
    assert order[-1] == "popular"  # evicted last; LRU would evict it first
    assert order[:3] == ["once-0", "once-1", "once-2"]  # ties: the oldest first


def test_cost_weighs_in_at_equal_reuse() -> None:
    p: GDSFPolicy[str] = GDSFPolicy()
    p.insert("cheap", cost=1.0)
    p.insert("dear", cost=4.0)
    p.insert("free", cost=0.0)
    assert list(p.candidates()) == ["free", "cheap", "dear"]
    for _ in range(4):
        p.access("cheap")  # five reads at 1.0 beat one at 4.0
    assert list(p.candidates()) == ["free", "dear", "cheap"]


def test_a_reused_costly_chunk_outlives_a_recent_cheap_one() -> None:
    """Cache-Craft's case: a document chunk that prompts keep retrieving, from a model whose
    KV is dear to recompute, against a newer chunk that is cheap and read once. LRU evicts
    the reused chunk first; GDSF evicts the recent cheap one first."""
    order = {}
    for name, policy in (("lru", LRUPolicy[str]()), ("gdsf", GDSFPolicy[str]())):
        policy.insert("reused-dear", cost=4.0)
        for _ in range(3):
            policy.access("reused-dear")
        policy.insert("recent-cheap", cost=1.0)
        policy.access("recent-cheap")
        order[name] = list(policy.candidates())
    assert order == {
        "lru": ["reused-dear", "recent-cheap"],
        "gdsf": ["recent-cheap", "reused-dear"],
    }


def test_an_entry_that_stops_being_read_ages_out() -> None:
    p: GDSFPolicy[str] = GDSFPolicy()
    p.insert("old-hot")
    for _ in range(9):
        p.access("old-hot")  # priority 10
    # A stream of entries, each read twice, evicting the lowest as it goes: every eviction
    # raises the clock to the evicted priority, so new entries' priorities climb past 10.
    for i in range(40):
        p.insert(f"n{i}")
        p.access(f"n{i}")
        if len(p) > 5:
            p.remove(next(iter(p.candidates())))
    assert "old-hot" not in set(p.candidates())


def test_the_store_keeps_reused_values_in_cpu(make_store: MakeStore, tmp_path: Path) -> None:
    """A 4 MiB cpu tier, one value read often, then a stream of one-off values: with GDSF
    the reused value stays in cpu; with LRU it is demoted."""
    where = {}
    for policy in ("lru", "gdsf"):
        store = make_store(data_dir=tmp_path / policy, ssd_bytes="32MiB", eviction=policy)
        put(store, key(0), value(0))
        for _ in range(5):
            lease = store.get(NS, key(0))
            assert lease is not None
            lease.release()
        for i in range(1, 12):
            put(store, key(i), value(i))
        where[policy] = entry(store, key(0)).tier
    assert where == {"lru": "ssd", "gdsf": "cpu"}


def test_the_store_keeps_costlier_values(make_store: MakeStore, tmp_path: Path) -> None:
    """Two values read alike, one eight times costlier to recompute per byte: under GDSF a
    stream of one-off puts demotes the cheap one and leaves the dear one in cpu."""
    store = make_store(data_dir=tmp_path / "d", ssd_bytes="32MiB", eviction="gdsf")
    for k, cost in ((key(0), 1.0), (key(1), 8.0)):
        data = value(k[-1])
        res = store.begin_put(NS, k, "uint8", [len(data)], len(data), checksum(data), cost)
        res.write(data)
        res.commit()
    for i in range(2, 10):
        put(store, key(i), value(i))
    assert (entry(store, key(0)).tier, entry(store, key(1)).tier) == ("ssd", "cpu")


def test_a_bad_cost_is_refused(make_store: MakeStore) -> None:
    store = make_store()
    data = value(1, 1000)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(InvalidArgument, match="cost"):
            store.begin_put(NS, key(1), "uint8", [1000], 1000, checksum(data), bad)
    assert store.exists(NS, [key(1)]) == [False]
