"""HostArena: a shared-memory file cut into slab slots, visible to other mappings."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstore.tiers.host import SHM_DIR, HostArena, default_arena_path

MiB = 1 << 20


@pytest.fixture
def arena(tmp_path: Path) -> Iterator[HostArena]:
    a = HostArena(tmp_path / "arena", 4 * MiB, page_bytes=1 * MiB)
    yield a
    a.close()


def test_file_is_created_with_capacity_and_private_mode(arena: HostArena) -> None:
    st = os.stat(arena.path)
    assert st.st_size == arena.capacity_bytes == 4 * MiB
    assert st.st_mode & 0o777 == 0o600
    assert arena.max_value_bytes == 1 * MiB
    assert arena.name == "cpu"


def test_capacity_is_split_into_equal_pages_no_larger_than_asked(tmp_path: Path) -> None:
    # 5 MiB with pages of at most 2 MiB: three pages of 5/3 MiB (64-byte aligned), so
    # almost all of the flag is usable instead of 4 MiB in two whole 2 MiB pages.
    a = HostArena(tmp_path / "arena", 5 * MiB, page_bytes=2 * MiB)
    try:
        page = (5 * MiB // 3) // 64 * 64
        assert a.allocator.num_pages == 3 and a.allocator.page_bytes == page
        assert a.capacity_bytes == 3 * page and 5 * MiB - a.capacity_bytes < 3 * 64
        assert os.stat(a.path).st_size == a.capacity_bytes
        assert a.max_value_bytes == page
    finally:
        a.close()


def test_writes_are_visible_through_another_mapping(arena: HostArena) -> None:
    slot = arena.alloc(10_000)
    assert slot is not None
    payload = os.urandom(10_000)
    arena.view(slot, len(payload))[:] = payload
    with open(arena.path, "rb") as fh, mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as m:
        assert m[slot.offset : slot.offset + len(payload)] == payload
    # And the other way round: a client writing the file is seen by the arena.
    with open(arena.path, "r+b") as fh:
        fh.seek(slot.offset)
        fh.write(b"\xff" * 4)
    assert bytes(arena.view(slot, 4)) == b"\xff" * 4


def test_view_is_the_slot_only(arena: HostArena) -> None:
    a, b = arena.alloc(4096), arena.alloc(4096)
    assert a is not None and b is not None
    arena.view(a, 4096)[:] = b"\x11" * 4096
    arena.view(b, 4096)[:] = b"\x22" * 4096
    assert bytes(arena.view(a, 4096)) == b"\x11" * 4096
    assert len(arena.view(a, 100)) == 100


def test_used_bytes_follow_alloc_and_free(arena: HostArena) -> None:
    assert arena.used_bytes == 0
    slots = [arena.alloc(MiB) for _ in range(4)]
    assert all(s is not None for s in slots)
    assert arena.used_bytes == 4 * MiB
    assert arena.alloc(1) is None
    assert arena.alloc(MiB + 1) is None
    for s in slots:
        assert s is not None
        arena.free(s)
    assert arena.used_bytes == 0


def test_close_unlinks_even_with_a_live_view(tmp_path: Path) -> None:
    a = HostArena(tmp_path / "arena", 1 * MiB)
    slot = a.alloc(4096)
    assert slot is not None
    held = a.view(slot, 4096)
    a.close()
    assert not a.path.exists()
    held[:4] = b"ok!!"  # the mapping lives on while a view does
    assert bytes(held[:4]) == b"ok!!"
    held.release()


def test_reopen_truncates_old_contents(tmp_path: Path) -> None:
    path = tmp_path / "arena"
    path.write_bytes(b"\xaa" * 100)
    a = HostArena(path, 1 * MiB)
    try:
        slot = a.alloc(4096)
        assert slot is not None
        assert bytes(a.view(slot, 100)) == bytes(100)
    finally:
        a.close()


def test_default_arena_path(tmp_path: Path) -> None:
    p = default_arena_path(tmp_path / "a")
    assert p.parent == SHM_DIR
    assert p.name.startswith(f"kvstore-{os.getuid()}-")
    assert p == default_arena_path(tmp_path / "a")
    assert p == default_arena_path(tmp_path / "x" / ".." / "a")  # resolved first
    assert p != default_arena_path(tmp_path / "b")
