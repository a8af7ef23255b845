"""`reserve_parts`: how a put_from splits its Reserve calls so that copies start early."""

from __future__ import annotations

import random

from kvstore.client._transfer import FIRST_RESERVE_BYTES, RESERVE_GROWTH, reserve_parts

MiB = 1 << 20


def test_the_engines_chunks_start_with_one_value() -> None:
    # 2 GiB in 32 MiB chunks: one short Reserve, then parts growing threefold.
    assert reserve_parts([32 * MiB] * 64) == [(0, 4), (4, 16), (16, 64)]


def test_small_puts_take_one_reserve() -> None:
    assert reserve_parts([MiB] * 32) == [(0, 32)]
    assert reserve_parts([0] * 5) == [(0, 5)]
    assert reserve_parts([]) == []


def test_a_value_larger_than_a_part_is_reserved_alone() -> None:
    assert reserve_parts([200 * MiB, MiB, MiB]) == [(0, 1), (1, 3)]


def test_parts_cover_every_value_in_order_within_their_bounds() -> None:
    rng = random.Random(5)
    for _ in range(300):
        choices = [0, 1, 4096, MiB, 7 * MiB, 40 * MiB]
        sizes = [rng.choice(choices) for _ in range(rng.randint(1, 80))]
        parts = reserve_parts(sizes)
        assert parts[0][0] == 0 and parts[-1][1] == len(sizes)
        done = 0
        for (a, b), (c, _) in zip(parts, [*parts[1:], (len(sizes), 0)], strict=True):
            assert a < b == c
            part = sum(sizes[a:b])
            limit = max(FIRST_RESERVE_BYTES, RESERVE_GROWTH * done)
            assert b - a == 1 or part <= limit  # one value may exceed it, more may not
            if b < len(sizes):
                assert part + sizes[b] > limit  # a part takes all that fits
            done += part
