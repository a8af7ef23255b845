"""SlabAllocator: alignment, no overlap, exact accounting, pages moving between classes."""

from __future__ import annotations

import itertools
import random

import pytest

from kvstore.tiers.slab import ALIGN, SlabAllocator, Slot, size_classes

KiB, MiB = 1 << 10, 1 << 20


def page_tails(a: SlabAllocator, slots: list[Slot]) -> int:
    """Bytes at the end of each page in use that its class's slots cannot fill."""
    pages = {s.page: a.classes[s.size_class] for s in slots}
    return sum(a.page_bytes - a.page_bytes // size * size for size in pages.values())


@pytest.mark.parametrize(("lo", "hi"), [(4096, 64 * MiB), (4096, 4 * MiB), (4096, 1 * MiB)])
def test_size_classes_shape(lo: int, hi: int) -> None:
    classes = size_classes(lo, hi)
    assert classes == sorted(set(classes))
    assert classes[0] == lo
    assert classes[-1] == hi
    assert all(c % ALIGN == 0 for c in classes)
    power = lo
    while power <= hi:
        assert power in classes
        power *= 2
    # Steps of 2**(1/4), plus at most one alignment unit of rounding.
    assert all(b <= a * 2**0.25 + ALIGN for a, b in itertools.pairwise(classes))


def test_class_of_picks_smallest_fitting_class() -> None:
    a = SlabAllocator(4 * MiB, page_bytes=1 * MiB)
    for n in (0, 1, 4096, 4097, 5000, 65536, 65537, 1 * MiB):
        c = a.class_of(n)
        assert c is not None
        assert a.classes[c] >= n
        assert c == 0 or a.classes[c - 1] < n
    assert a.class_of(1 * MiB + 1) is None


def test_geometry() -> None:
    # As few pages as the limit allows, equal and aligned, covering nearly all the capacity.
    a = SlabAllocator(10 * MiB + 123, page_bytes=4 * MiB)
    assert a.num_pages == 3
    assert a.page_bytes == (10 * MiB + 123) // 3 // ALIGN * ALIGN <= 4 * MiB
    assert a.capacity == 3 * a.page_bytes
    assert 10 * MiB + 123 - a.capacity < 3 * ALIGN
    assert a.free_pages == 3
    exact = SlabAllocator(8 * MiB, page_bytes=4 * MiB)
    assert (exact.num_pages, exact.page_bytes) == (2, 4 * MiB)
    small = SlabAllocator(1_000_000, page_bytes=64 * MiB)  # page shrinks to the capacity
    assert small.page_bytes == 1_000_000 - 1_000_000 % ALIGN
    assert small.num_pages == 1
    with pytest.raises(ValueError):
        SlabAllocator(1000)


def test_alloc_is_aligned_sized_and_accounted() -> None:
    a = SlabAllocator(4 * MiB, page_bytes=1 * MiB)
    slot = a.alloc(5000)
    assert slot is not None
    assert slot.offset % ALIGN == 0
    assert slot.size >= 5000
    assert slot.size == a.classes[slot.size_class]
    assert a.used_bytes == slot.size + page_tails(a, [slot])
    assert a.live_slots == 1
    assert a.page_live(slot.page) == 1
    assert slot.page * a.page_bytes <= slot.offset
    assert slot.offset + slot.size <= (slot.page + 1) * a.page_bytes


def test_alloc_returns_none_when_full_and_for_oversize() -> None:
    a = SlabAllocator(4 * MiB, page_bytes=1 * MiB)
    assert a.alloc(1 * MiB + 1) is None
    slots = [a.alloc(1 * MiB) for _ in range(4)]
    assert all(s is not None for s in slots)
    assert len({s.offset for s in slots if s}) == 4
    assert a.alloc(1 * MiB) is None
    assert a.alloc(4096) is None  # no page is free for another class either
    assert a.used_bytes == a.capacity
    assert a.free_pages == 0
    first = slots[0]
    assert first is not None
    a.free(first)
    again = a.alloc(100)
    assert again is not None
    assert again.page == first.page


def test_fill_one_class_exactly() -> None:
    a = SlabAllocator(2 * MiB, page_bytes=1 * MiB)
    c = a.class_of(64 * KiB)
    assert c is not None
    per_page = a.page_bytes // a.classes[c]
    slots = []
    while (s := a.alloc(64 * KiB)) is not None:
        slots.append(s)
    assert len(slots) == 2 * per_page
    assert a.used_bytes == len(slots) * a.classes[c] + page_tails(a, slots) <= a.capacity


def test_pages_move_between_size_classes_after_fully_freed() -> None:
    a = SlabAllocator(4 * MiB, page_bytes=1 * MiB)
    small = []
    while (s := a.alloc(4096)) is not None:
        small.append(s)
    assert a.free_pages == 0
    assert a.alloc(512 * KiB) is None  # every page belongs to the 4 KiB class
    # Free all but one slot of page 0: the page still belongs to the small class.
    page0 = [s for s in small if s.page == small[0].page]
    for s in page0[1:]:
        a.free(s)
    assert a.free_pages == 0
    assert a.alloc(512 * KiB) is None
    a.free(page0[0])
    assert a.free_pages == 1
    big = a.alloc(512 * KiB)
    assert big is not None
    assert big.page == page0[0].page
    assert big.size_class != page0[0].size_class
    # The other pages still belong to the small class: a freed slot there is reused.
    assert a.alloc(4096) is None
    other = next(s for s in small if s.page != big.page)
    a.free(other)
    reuse = a.alloc(4096)
    assert reuse == other


def test_freeing_unallocated_slots_raises() -> None:
    a = SlabAllocator(4 * MiB, page_bytes=1 * MiB)
    s1 = a.alloc(4096)
    s2 = a.alloc(4096)
    assert s1 is not None and s2 is not None
    with pytest.raises(ValueError):
        a.free(Slot(2 * MiB, 4096, 2, s1.size_class))  # page never used
    with pytest.raises(ValueError):
        a.free(Slot(s1.offset, 8192, s1.page, s1.size_class + 4))  # wrong class
    with pytest.raises(ValueError):
        a.free(Slot(s1.offset + 100 * 4096, 4096, s1.page, s1.size_class))  # never handed out
    with pytest.raises(ValueError):
        a.free(Slot(s1.offset + 64, 4096, s1.page, s1.size_class))  # not a slot boundary
    with pytest.raises(ValueError):
        a.free(Slot(99 * MiB, 4096, 99, 0))  # no such page
    a.free(s1)
    # A double free while the page still holds a live slot must not return the page.
    with pytest.raises(ValueError):
        a.free(s1)
    assert a.page_live(s2.page) == 1
    assert a.live_slots == 1
    assert a.used_bytes == s2.size + page_tails(a, [s2])
    other = a.alloc(8192)
    assert other is not None
    assert other.page != s2.page
    a.free(s2)
    with pytest.raises(ValueError):
        a.free(s2)
    a.free(other)
    assert a.free_pages == a.num_pages


def test_random_churn_no_overlap_no_leak() -> None:
    rng = random.Random(1234)
    a = SlabAllocator(8 * MiB, page_bytes=1 * MiB)
    sizes = [1, 4096, 4097, 10_000, 65536, 100_000, 300_000, 1 * MiB]
    live: dict[int, Slot] = {}  # offset -> slot
    failures = 0
    for _ in range(20_000):
        if live and (rng.random() < 0.45 or len(live) > 400):
            off = rng.choice(list(live))
            a.free(live.pop(off))
        else:
            n = rng.choice(sizes) if rng.random() < 0.5 else rng.randint(1, 200_000)
            s = a.alloc(n)
            if s is None:
                failures += 1
                continue
            assert s.offset % ALIGN == 0
            assert s.size >= n
            assert s.offset not in live
            live[s.offset] = s
        in_use = list(live.values())
        assert a.used_bytes == sum(s.size for s in in_use) + page_tails(a, in_use) <= a.capacity
        assert a.live_slots == len(live)
    # No two live slots overlap, and none crosses its page.
    spans = sorted((s.offset, s.offset + s.size, s.page) for s in live.values())
    for (_, end, _), (start, _, _) in itertools.pairwise(spans):
        assert end <= start
    for start, end, page in spans:
        assert page * a.page_bytes <= start and end <= (page + 1) * a.page_bytes
    assert failures > 0  # the churn did run the allocator out of room
    for s in live.values():
        a.free(s)
    assert a.used_bytes == 0
    assert a.live_slots == 0
    assert a.free_pages == a.num_pages
    # Everything is reusable: the whole range as page-sized slots again.
    full = [a.alloc(a.page_bytes) for _ in range(a.num_pages)]
    assert all(s is not None for s in full)
