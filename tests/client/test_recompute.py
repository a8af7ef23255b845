"""Which tokens to recompute after reusing chunks: CacheBlend's largest KV deviation on an
early layer, within the reused spans, the tokens the question attends to most, and EPIC's
first N tokens of each chunk."""

from __future__ import annotations

import pytest
import torch

from kvstore.client.chunks import (
    recompute_by_attention,
    recompute_by_deviation,
    recompute_first,
)
from kvstore.errors import InvalidArgument


def layer_kv(tokens: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, tokens, 2, 8, generator=torch.Generator().manual_seed(seed))


def test_deviation_picks_the_tokens_that_moved_most() -> None:
    fresh = layer_kv(100)
    reused = fresh.clone()
    moved = [3, 17, 42, 80, 99]
    for rank, t in enumerate(moved):  # a different size of deviation for each
        reused[:, t] += 0.5 * (rank + 1)
    reused += 1e-3 * layer_kv(100, seed=1)  # every token a little
    assert recompute_by_deviation(reused, fresh, 0.05).tolist() == moved
    assert recompute_by_deviation(reused, fresh, 0.03).tolist() == [42, 80, 99]  # largest
    assert recompute_by_deviation(reused, fresh, 0.0).size == 0
    assert recompute_by_deviation(reused, fresh, 1.0).tolist() == list(range(100))
    # Several layers at once: the same ranking when every layer moved alike.
    layers = (3, -1, -1, -1, -1)
    many = recompute_by_deviation(reused.expand(*layers), fresh.expand(*layers), 0.05)
    assert many.tolist() == moved


def test_deviation_only_among_the_reused_spans() -> None:
    fresh = layer_kv(50)
    reused = fresh.clone()
    reused[:, 0] += 9  # a question token, computed fresh anyway: not a candidate
    reused[:, 12] += 1
    reused[:, 30] += 2
    got = recompute_by_deviation(reused, fresh, 0.1, spans=[(10, 10), (25, 10)])
    assert got.tolist() == [12, 30]  # 10% of the 20 reused tokens
    with pytest.raises(InvalidArgument, match="outside"):
        recompute_by_deviation(reused, fresh, 0.1, spans=[(45, 10)])


def test_first_tokens_of_each_chunk() -> None:
    assert recompute_first([(10, 5), (0, 3), (40, 100)], 4).tolist() == [
        0, 1, 2, 10, 11, 12, 13, 40, 41, 42, 43,
    ]  # fmt: skip
    assert recompute_first([(0, 8)], 0).size == 0
    assert recompute_first([], 3).size == 0


def test_bad_arguments() -> None:
    a = layer_kv(10)
    with pytest.raises(InvalidArgument, match="same shape"):
        recompute_by_deviation(a, a[:, :5], 0.1)
    with pytest.raises(InvalidArgument, match="ratio"):
        recompute_by_deviation(a, a, 1.5)
    with pytest.raises(InvalidArgument, match="n must"):
        recompute_first([(0, 4)], -1)


def test_attention_picks_what_the_question_looks_at_within_the_spans() -> None:
    weights = torch.full((2, 3, 4, 60), 1e-3)  # [layers, heads, question tokens, tokens]
    weights[0, 1, 2, 15] = 0.5
    weights[1, :, :, 33] = 0.1  # a little from every head and query: 2.4 in all
    weights[:, :, :, 55] = 1.0  # the question itself: not a candidate
    got = recompute_by_attention(weights, 0.1, spans=[(10, 10), (25, 10)])
    assert got.tolist() == [15, 33]
    assert recompute_by_attention(weights, 0.0).size == 0
    assert recompute_by_attention(weights[0, 0, 0], 1 / 60).tolist() == [55]
    with pytest.raises(InvalidArgument, match="ratio"):
        recompute_by_attention(weights, -0.1)
