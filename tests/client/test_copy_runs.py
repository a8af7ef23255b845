"""`CopyRuns`: copies that continue each other become one call, and the bytes are right."""

from __future__ import annotations

import torch

from kvstore.client._transfer import CopyRuns, flat_bytes


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
        copies.add(flat_bytes(dst), arena[slot * 1024 : (slot + 1) * 1024], non_blocking=False)
    copies.flush()
    assert copies.calls == 4
    for slot, dst in plan:
        assert torch.equal(dst, arena[slot * 1024 : (slot + 1) * 1024])
    assert not out[5].any() and not out[7].any()  # nothing written past a run's end


def test_a_copy_is_made_only_when_flushed_and_flush_is_idempotent() -> None:
    src = torch.arange(256, dtype=torch.int32).view(torch.uint8)
    dst = torch.zeros(1024, dtype=torch.uint8)
    copies = CopyRuns()
    copies.add(dst[:512], src[:512], non_blocking=False)
    copies.add(dst[512:], src[512:], non_blocking=False)
    assert not dst.any()  # still one pending run
    copies.flush()
    copies.flush()
    assert copies.calls == 1 and torch.equal(dst, src)
