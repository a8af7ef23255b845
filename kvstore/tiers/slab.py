"""Size-class slab allocator over a fixed byte range.

The range is cut into equal pages. A page belongs to one size class at a time and is carved
into equal slots of that class; size classes grow by 2**(1/4) (at most ~19% slack per value)
and include every power of two. `alloc` and `free` are O(1): each class keeps the pages that
have a free slot, each page a free list and a bump pointer. A page whose last slot is freed
returns to the shared pool, so memory moves between classes as the value mix changes and
churn cannot fragment the range: every page is always wholly free or in one class.

The allocator only does arithmetic on offsets; it never touches the memory it manages.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

ALIGN = 64


@dataclass(frozen=True, slots=True)
class Slot:
    """An allocated slot: `offset` into the range, `size` bytes usable, in `page`."""

    offset: int
    size: int
    page: int
    size_class: int


@dataclass(slots=True)
class _Page:
    size_class: int = -1
    slot_size: int = 0
    capacity: int = 0  # slots the page holds in its current class
    bumped: int = 0  # slots handed out at least once since the page joined the class
    live: int = 0
    # Slot indexes freed and not reused; a dict so a double free is caught in O(1).
    free: dict[int, None] = field(default_factory=dict)


def size_classes(min_size: int, max_size: int) -> list[int]:
    """Class sizes from `min_size` to `max_size`: steps of 2**(1/4), 64-byte aligned."""
    sizes: set[int] = set()
    base = 1 << max(min_size - 1, 1).bit_length()
    while base // 2 >= min_size:
        base //= 2
    p = base
    while p <= max_size * 2:
        for q in range(4):
            s = int(p * 2 ** (q / 4))
            s = -(-s // ALIGN) * ALIGN
            if min_size <= s <= max_size:
                sizes.add(s)
        p *= 2
    sizes.add(max_size)
    return sorted(sizes)


class SlabAllocator:
    """Allocates slots of `capacity` bytes cut into pages of `page_bytes`."""

    def __init__(self, capacity: int, page_bytes: int = 64 << 20, min_size: int = 4096) -> None:
        # Pages of at most `page_bytes`, as many as needed to use the whole capacity: 100 MiB
        # becomes two 50 MiB pages rather than one 64 MiB page and 36 MiB never used.
        pages = max(1, -(-capacity // page_bytes))
        page_bytes = capacity // pages
        page_bytes -= page_bytes % ALIGN
        if page_bytes < min_size:
            raise ValueError(f"capacity {capacity} is too small for one {min_size}-byte slot")
        self.page_bytes = page_bytes
        self.classes = size_classes(min_size, page_bytes)
        self.num_pages = capacity // page_bytes
        self._pages = [_Page() for _ in range(self.num_pages)]
        self._free_pages = list(range(self.num_pages - 1, -1, -1))
        # Per class, pages with a free or never-used slot; dict keeps insertion order (O(1)).
        self._partial: list[dict[int, None]] = [{} for _ in self.classes]
        # Bytes that cannot be handed out now: live slots (their class size, not the request
        # size) plus the tail of each page that its class's slots do not fill.
        self.used_bytes = 0
        self.live_slots = 0

    @property
    def max_alloc(self) -> int:
        return self.page_bytes

    @property
    def capacity(self) -> int:
        return self.num_pages * self.page_bytes

    @property
    def free_pages(self) -> int:
        return len(self._free_pages)

    def class_of(self, nbytes: int) -> int | None:
        """Index of the smallest class holding `nbytes`, or None if larger than a page."""
        if nbytes > self.page_bytes:
            return None
        return bisect.bisect_left(self.classes, max(nbytes, 1))

    def alloc(self, nbytes: int) -> Slot | None:
        """A slot of at least `nbytes`, or None when the class has no room and no page is free."""
        c = self.class_of(nbytes)
        if c is None:
            return None
        partial = self._partial[c]
        if partial:
            pidx = next(iter(partial))
        elif self._free_pages:
            pidx = self._free_pages.pop()
            page = self._pages[pidx]
            page.size_class, page.slot_size = c, self.classes[c]
            page.capacity = self.page_bytes // page.slot_size
            self.used_bytes += self.page_bytes - page.capacity * page.slot_size
            page.bumped, page.live = 0, 0
            page.free.clear()
            partial[pidx] = None
        else:
            return None
        page = self._pages[pidx]
        if page.free:
            idx = page.free.popitem()[0]
        else:
            idx = page.bumped
            page.bumped += 1
        page.live += 1
        if not page.free and page.bumped == page.capacity:
            del partial[pidx]
        self.used_bytes += page.slot_size
        self.live_slots += 1
        return Slot(pidx * self.page_bytes + idx * page.slot_size, page.slot_size, pidx, c)

    def free(self, slot: Slot) -> None:
        if not 0 <= slot.page < self.num_pages:
            raise ValueError(f"slot at offset {slot.offset} is not allocated")
        page = self._pages[slot.page]
        if page.size_class != slot.size_class or page.live <= 0:
            raise ValueError(f"slot at offset {slot.offset} is not allocated")
        idx, rem = divmod(slot.offset - slot.page * self.page_bytes, page.slot_size)
        if rem or not 0 <= idx < page.bumped or idx in page.free:
            raise ValueError(f"slot at offset {slot.offset} is not allocated")
        was_full = not page.free and page.bumped == page.capacity
        page.free[idx] = None
        page.live -= 1
        self.used_bytes -= page.slot_size
        self.live_slots -= 1
        partial = self._partial[page.size_class]
        if page.live == 0:
            self.used_bytes -= self.page_bytes - page.capacity * page.slot_size
            partial.pop(slot.page, None)
            page.size_class = -1
            page.free.clear()
            self._free_pages.append(slot.page)
        elif was_full:
            partial[slot.page] = None

    def page_live(self, page: int) -> int:
        """Slots of `page` currently handed out."""
        return self._pages[page].live
