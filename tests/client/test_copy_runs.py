"""`CopyRuns`: copies that continue each other become one call, and the bytes are right."""

from __future__ import annotations

import torch

from kvstore.client._transfer import CopyRuns


def test_neighbouring_copies_merge_and_others_do_not() -> None:
    arena = torch.arange(4096, dtype=torch.int32).view(torch.uint8)  # 16 KiB of distinct bytes
    out = torch.zeros(8, 1024, dtype=torch.uint8)
    other = torch.zeros(1024, dtype=torch.uint8)
    # Slots 0,1,2 into rows 0,1,2 (one run), slot 5 into row 3 (the source jumps), slot 6
    # into row 4 (continues), slot 7 into another tensor, slot 8 into row 6 (row 5 skipped).
    rows = [(0, 0), (1, 1), (2, 2), (5, 3), (6, 4)]
    plan = [(slot, out[row]) for slot, row in rows] + [(7, other), (8, out[6])]
    copies = CopyRuns()
    for slot, dst in plan:
        copies.add(dst, 0, arena, slot * 1024, 1024, non_blocking=False)
    copies.flush()
    assert copies.calls == 4
    for slot, dst in plan:
        assert torch.equal(dst, arena[slot * 1024 : (slot + 1) * 1024])
    assert not out[5].any() and not out[7].any()  # nothing written past a run's end


def test_runs_copy_bytes_between_dtypes_and_never_across_allocations() -> None:
    rows = torch.randn(4, 64, dtype=torch.float32)  # destinations of another dtype
    src = rows.clone().view(torch.uint8).reshape(-1)
    out = torch.zeros(4, 64, dtype=torch.float32)
    copies = CopyRuns()
    for i in range(4):
        copies.add(out[i], 0, src, i * 256, 256, non_blocking=False)
    copies.flush()
    assert copies.calls == 1 and torch.equal(out, rows)
    # Two allocations that happen to lie back to back are still two copies.
    data = torch.randint(0, 255, (2048,), dtype=torch.uint8)
    memory = bytearray(2048)
    a = torch.frombuffer(memory, dtype=torch.uint8, count=1024)
    b = torch.frombuffer(memory, dtype=torch.uint8, count=1024, offset=1024)
    assert b.data_ptr() == a.data_ptr() + 1024  # neighbours, each its own storage
    copies = CopyRuns()
    copies.add(a, 0, data, 0, 1024, non_blocking=False)
    copies.add(b, 0, data, 1024, 1024, non_blocking=False)
    copies.flush()
    assert copies.calls == 2
    assert bytes(memory) == bytes(data.numpy())


def test_a_copy_is_made_only_when_flushed_and_flush_is_idempotent() -> None:
    src = torch.arange(256, dtype=torch.int32).view(torch.uint8)
    dst = torch.zeros(1024, dtype=torch.uint8)
    copies = CopyRuns()
    copies.add(dst, 0, src, 0, 512, non_blocking=False)
    copies.add(dst, 512, src, 512, 512, non_blocking=False)
    assert not dst.any()  # still one pending run
    copies.flush()
    copies.flush()
    assert copies.calls == 1 and torch.equal(dst, src)


def test_offsets_count_from_where_each_view_starts() -> None:
    base = torch.arange(1024, dtype=torch.int16)  # 2 KiB of distinct bytes
    src = base[100:]  # a view 200 bytes into its storage
    arena = torch.zeros(4096, dtype=torch.uint8)
    region = arena[1000:]  # so is the destination region
    copies = CopyRuns()
    copies.add(region, 24, src, 8, 40, non_blocking=False)
    copies.add(region, 64, src, 48, 40, non_blocking=False)  # continues both: merged
    copies.flush()
    assert copies.calls == 1
    want = src.view(torch.uint8)[8:88]
    assert torch.equal(arena[1024:1104], want)
    assert not arena[:1024].any() and not arena[1104:].any()
