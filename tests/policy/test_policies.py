"""One contract for every eviction policy in `POLICIES` (LRU today; ARC, S3-FIFO later)."""

from __future__ import annotations

from collections.abc import Hashable

import pytest

from kvstore.policy import POLICIES, EvictionPolicy, LRUPolicy

ALL = pytest.mark.parametrize("name", sorted(POLICIES))


def make(name: str) -> EvictionPolicy:
    policy = POLICIES[name]()
    assert isinstance(policy, EvictionPolicy)
    return policy


def ids(i: int) -> tuple[str, bytes]:
    return ("ns", i.to_bytes(32, "big"))  # the store's entry ids


def test_registry() -> None:
    assert POLICIES["lru"] is LRUPolicy
    for cls in POLICIES.values():
        assert issubclass(cls, EvictionPolicy)


@ALL
def test_empty(name: str) -> None:
    p = make(name)
    assert len(p) == 0
    assert list(p.candidates()) == []


@ALL
def test_candidates_are_exactly_the_members(name: str) -> None:
    p = make(name)
    items = [ids(i) for i in range(50)]
    for it in items:
        p.insert(it)
    for it in items[::3]:
        p.access(it)
    for it in items[::7]:
        p.remove(it)
    live = [it for it in items if it not in items[::7]]
    got = list(p.candidates())
    assert len(got) == len(set(got)) == len(p) == len(live)
    assert set(got) == set(live)


@ALL
def test_remove_and_access_of_unknown_items_are_harmless(name: str) -> None:
    p = make(name)
    p.insert(ids(1))
    p.remove(ids(2))
    p.access(ids(3))
    assert list(p.candidates()) == [ids(1)]
    p.remove(ids(1))
    p.remove(ids(1))
    assert len(p) == 0
    p.access(ids(1))  # an access never inserts
    assert len(p) == 0


@ALL
def test_reinsert_after_remove(name: str) -> None:
    p = make(name)
    p.insert(ids(1))
    p.remove(ids(1))
    p.insert(ids(1))
    assert list(p.candidates()) == [ids(1)]


@ALL
def test_without_accesses_oldest_goes_first(name: str) -> None:
    p = make(name)
    for i in range(10):
        p.insert(ids(i))
    assert next(iter(p.candidates())) == ids(0)


@ALL
def test_a_read_entry_is_not_evicted_before_unread_ones(name: str) -> None:
    p = make(name)
    for i in range(10):
        p.insert(ids(i))
    p.access(ids(0))
    order = list(p.candidates())
    assert order[0] != ids(0)
    assert order.index(ids(0)) > order.index(ids(1))


@ALL
def test_candidates_do_not_change_state(name: str) -> None:
    p = make(name)
    for i in range(10):
        p.insert(ids(i))
    p.access(ids(4))
    assert list(p.candidates()) == list(p.candidates())
    assert len(p) == 10


@ALL
def test_any_hashable_ids(name: str) -> None:
    p = make(name)
    things: list[Hashable] = [1, "two", (3, b"three"), frozenset({4})]
    for t in things:
        p.insert(t)
    assert set(p.candidates()) == set(things)


def test_lru_order() -> None:
    p = LRUPolicy()
    for x in "abcd":
        p.insert(x)
    p.access("b")
    p.access("a")
    assert list(p.candidates()) == ["c", "d", "b", "a"]
    p.insert("c")  # re-inserting counts as the newest
    assert list(p.candidates()) == ["d", "b", "a", "c"]
    p.remove("b")
    assert list(p.candidates()) == ["d", "a", "c"]
