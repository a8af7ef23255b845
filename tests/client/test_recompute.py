"""Which tokens to recompute after reusing chunks: CacheBlend's largest KV deviation on an
early layer, within the reused spans, the tokens the question attends to most (weighted by
their values: what they add to its output), EPIC's first N tokens of each chunk, the
schedule that repairs the rest while decoding, and the drift the recomputed tokens carry to
the rest of their chunk."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvstore.client.chunks import (
    DriftCorrection,
    RepairSchedule,
    correct_drift,
    recompute_by_attention,
    recompute_by_deviation,
    recompute_first,
    weighted_attention,
)
from kvstore.errors import InvalidArgument
from kvstore.kernels.rope import RopeConfig, rerotate_k


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


def test_weighted_attention_scores_what_an_error_in_each_token_would_cost() -> None:
    layers, heads, kv_heads, question, tokens, dim = 2, 6, 2, 3, 40, 8
    g = torch.Generator().manual_seed(3)
    attention = torch.rand(layers, heads, question, tokens, generator=g).softmax(-1)
    values = torch.randn(layers, kv_heads, tokens, dim, generator=g)
    # token 7 draws every head's attention but has no value (a sink): it adds nothing
    attention[..., 7] = 5.0
    values[:, :, 7] = 0.0
    norms = values.norm(dim=-1)
    got = weighted_attention(attention, norms)
    assert got.shape == (layers, tokens)
    # the same sum written out: query head h reads KV head h // (heads / kv_heads)
    want = torch.zeros(layers, tokens)
    for li in range(layers):
        for h in range(heads):
            want[li] += attention[li, h].sum(0) * norms[li, h // (heads // kv_heads)]
    torch.testing.assert_close(got, want)
    assert got[:, 7].abs().max() == 0
    assert 7 in recompute_by_attention(attention, 1 / tokens).tolist()
    assert 7 not in recompute_by_attention(got, 0.25).tolist()
    # one layer at a time, as a pass through the layers collects it
    torch.testing.assert_close(weighted_attention(attention[1], norms[1]), want[1])


def test_weighted_attention_refuses_shapes_that_do_not_match() -> None:
    attention, weights = torch.rand(2, 6, 3, 40), torch.rand(2, 2, 40)
    for w in (
        weights[:, :, :39],  # fewer tokens
        torch.rand(2, 4, 40),  # 6 heads over 4 KV heads
        weights[:1],  # other layers
        torch.rand(2, 2, 40, 8),  # values, not a weight per token
        torch.rand(2, 0, 40),  # no KV heads
    ):
        with pytest.raises(InvalidArgument, match="attention"):
            weighted_attention(attention, w)


class CausalToy:
    """A stand-in for a model's KV: each position's value is computed from the values of
    every position before it (random weights, so any stale input shows), as a token's KV
    depends on the KV before it. `recompute(batch)` is one causal pass over the batch."""

    def __init__(self, tokens: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.base = rng.normal(size=tokens)
        self.weight = np.tril(rng.normal(size=(tokens, tokens)) / tokens, -1)
        self.truth = np.zeros(tokens)
        for p in range(tokens):
            self.truth[p] = self.base[p] + self.weight[p] @ self.truth

    def recompute(self, values: np.ndarray, batch: np.ndarray) -> None:
        for p in np.sort(batch):  # earlier tokens of the batch already fresh, as in a pass
            values[p] = self.base[p] + self.weight[p] @ values


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("per_step", [1, 5, 16])
@pytest.mark.parametrize("by_score", [True, False])
def test_repair_schedule_ends_with_a_prefills_values(
    seed: int, per_step: int, by_score: bool
) -> None:
    toy = CausalToy(60, seed)
    rng = np.random.default_rng(100 + seed)
    # A prefix (0..9, exact), three chunks (10..49, reused: wrong), a question (50..59).
    values = toy.truth.copy()
    values[10:] += rng.normal(size=50)
    question = np.arange(50, 60)
    picked = np.sort(rng.choice(np.arange(10, 50), 6, replace=False))  # before the 1st token
    toy.recompute(values, np.concatenate([picked, question]))
    stale = np.arange(10, 60)
    scores = rng.random(60) if by_score else None
    sched = RepairSchedule(stale, per_step, scores, recomputed=np.concatenate([picked, question]))
    handed: list[int] = []
    batches: list[list[int]] = []
    initial = sched.exact  # picked tokens from position 10 on, if any, are exact already
    for _ in range(200):
        exact = np.isclose(values[stale], toy.truth[stale], rtol=0, atol=1e-12)
        leading = exact.size if exact.all() else int(np.argmin(exact))
        assert sched.exact == leading  # the schedule knows which KV is exact
        assert sched.done == bool(exact.all())
        if sched.done:
            break
        batch = sched.next()
        assert 0 < batch.size <= per_step and np.all(np.diff(batch) > 0)
        assert np.isin(batch, stale).all()
        toy.recompute(values, batch)
        handed += batch.tolist()
        batches.append(batch.tolist())
    assert sched.done and np.allclose(values, toy.truth, rtol=0, atol=1e-12)
    assert sched.next().size == 0
    if by_score:  # phase one: each token never recomputed, once, the best first
        never = set(np.setdiff1d(np.arange(10, 50), picked).tolist())
        firsts, seen = [], set()
        for batch in batches:  # each step's positions handed out for the first time
            firsts.append([p for p in batch if p in never and p not in seen])
            seen.update(batch)
        assert sorted(p for f in firsts for p in f) == sorted(never)
        for i, now in enumerate(firsts):
            later = [p for f in firsts[i + 1 :] for p in f]
            assert not now or not later or min(scores[now]) >= max(scores[later])
    else:  # one sweep in position order from the first stale KV: each once
        assert handed == list(range(10 + initial, 60))


def test_repair_schedule_hands_out_the_best_first() -> None:
    scores = np.zeros(20)
    scores[[15, 3, 9, 12]] = [4.0, 3.0, 2.0, 1.0]
    sched = RepairSchedule(np.arange(2, 18), 2, scores, recomputed=[16, 17])
    assert sched.next().tolist() == [3, 15]
    assert sched.next().tolist() == [9, 12]
    assert sched.exact == 0  # 2 is still the reused KV
    assert sched.next().tolist() == [2, 4]  # ties: the earlier position first
    assert sched.exact == 1  # 2; not 3, recomputed while 2 was the reused KV
    assert sched.next(5).tolist() == [5, 6, 7, 8, 10]  # one larger step
    assert sched.next().tolist() == [11, 13]
    with pytest.raises(InvalidArgument, match="count"):
        sched.next(-1)
    nothing = RepairSchedule(np.arange(5), 0)
    assert nothing.next().size == 0 and not nothing.done


def test_repair_schedule_refuses_bad_arguments() -> None:
    with pytest.raises(InvalidArgument, match="per_step"):
        RepairSchedule([1, 2], -1)
    with pytest.raises(InvalidArgument, match="among the stale"):
        RepairSchedule([1, 2], 4, recomputed=[3])
    with pytest.raises(InvalidArgument, match="one value per position"):
        RepairSchedule([1, 2, 9], 4, scores=np.ones(5))
    with pytest.raises(InvalidArgument, match=">= 0"):
        RepairSchedule([-1, 2], 4)


# ------------------------------------------------------------------------------ drift


def _at(k_pre: torch.Tensor, positions: np.ndarray, rope: RopeConfig) -> torch.Tensor:
    """K `[tokens, heads, dim]` computed unrotated, rotated to `positions`."""
    out = k_pre.float().contiguous().clone()[None]
    rerotate_k(out, np.zeros(len(positions), np.int64), positions, rope)
    return out[0]


def _cuda() -> bool:
    try:
        import cupy

        return torch.cuda.is_available() and int(cupy.cuda.runtime.getDeviceCount()) > 0
    except Exception:  # no cupy, no driver, no device: all mean no GPU here
        return False


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU"))],
)
@pytest.mark.parametrize("pairing", ["neox", "gptj"])
@pytest.mark.parametrize("share", [0.5, 1.0])
def test_correct_drift_moves_the_rest_of_each_chunk_by_its_recomputed_mean(
    pairing: str, share: float, device: str
) -> None:
    """A chunk whose recomputed tokens all drifted by the same unrotated K and V moves the
    rest of its tokens by `share` of it, K rotated to each; the recomputed tokens, the
    tokens outside the chunks and a chunk with none recomputed are left alone."""
    rope = RopeConfig(16, base=10000.0, pairing=pairing)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(0)
    tokens, heads, dim = 40, 2, 16
    pos = np.arange(tokens)
    k_pre, v = (
        torch.randn(tokens, heads, dim, generator=g),
        torch.randn(tokens, heads, dim, generator=g),
    )
    layer = torch.stack((_at(k_pre, pos, rope), v))  # [2, tokens, heads, dim]
    spans = [(4, 12), (16, 12), (28, 10)]  # the third has no recomputed token
    picked = np.array([5, 9, 17, 20, 38, 39])  # 38, 39: the question, outside the chunks
    dk = {0: torch.randn(heads, dim, generator=g), 1: torch.randn(heads, dim, generator=g)}
    dv = {0: torch.randn(heads, dim, generator=g), 1: torch.randn(heads, dim, generator=g)}
    chunk = {5: 0, 9: 0, 17: 1, 20: 1}
    fresh_pre_k = torch.stack([k_pre[p] + (dk[chunk[p]] if p in chunk else 3.0) for p in picked])
    fresh_v = torch.stack([v[p] + (dv[chunk[p]] if p in chunk else 3.0) for p in picked])
    fresh = torch.stack((_at(fresh_pre_k, picked, rope), fresh_v))
    before = layer.clone()
    on = layer.to(device)
    correct_drift(on, fresh.to(device), picked, spans, rope, share)
    layer = on.cpu()
    want_pre, want_v = k_pre.clone(), v.clone()
    for c, (start, n) in enumerate(spans[:2]):
        for q in range(start, start + n):
            if q not in picked:
                want_pre[q] += share * dk[c]
                want_v[q] += share * dv[c]
    torch.testing.assert_close(layer[0], _at(want_pre, pos, rope), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer[1], want_v, atol=1e-6, rtol=1e-6)
    untouched = [*picked.tolist(), *range(0, 4), *range(28, 40)]
    assert torch.equal(layer[:, untouched], before[:, untouched])


def test_correct_drift_takes_a_view_and_refuses_bad_input() -> None:
    rope = RopeConfig(8)
    kv = torch.zeros(2, 3, 10, 8, dtype=torch.bfloat16)  # [2, heads, tokens, dim] as stored
    layer = kv.transpose(1, 2)  # [2, tokens, heads, dim]: a view
    fresh = torch.ones(2, 1, 3, 8)
    correct_drift(layer, fresh, np.array([2]), [(0, 5)], rope, share=1.0)
    assert torch.equal(kv[1, :, 3], torch.ones(3, 8, dtype=torch.bfloat16))  # through the view
    assert torch.equal(kv[1, :, 2], torch.zeros(3, 8, dtype=torch.bfloat16))  # picked: as it was
    assert torch.equal(kv[1, :, 5:], torch.zeros(3, 5, 8, dtype=torch.bfloat16))
    bad = [
        (layer[0], fresh, [2], [(0, 5)], 0.5, "layer_kv"),
        (layer, fresh[:, :, :2], [2], [(0, 5)], 0.5, "fresh"),
        (layer, torch.ones(2, 2, 3, 8), [3, 2], [(0, 5)], 0.5, "sorted"),
        (layer, fresh, [10], [(0, 5)], 0.5, "sorted"),
        (layer, fresh, [2], [(8, 5)], 0.5, "outside"),
        (layer, fresh, [2], [(0, 5)], 1.5, "share"),
        (layer, fresh, [2], [(4, 3), (0, 5)], 0.5, "overlaps"),
    ]
    for lay, fr, picked, spans, share, message in bad:
        with pytest.raises(InvalidArgument, match=message):
            correct_drift(lay, fr, np.array(picked), spans, rope, share)
    plan = DriftCorrection(np.array([2]), [(0, 5)], 10, rope, "cpu")
    with pytest.raises(InvalidArgument, match="laid out for 10"):
        plan.apply(layer[:, :8], fresh)  # fewer tokens than the plan's positions assume


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rope", [RopeConfig(16), RopeConfig(16, rotary_dim=8, pairing="gptj")])
def test_the_host_kernel_moves_tokens_as_the_torch_ops_do(
    dtype: torch.dtype, rope: RopeConfig
) -> None:
    """On the host, `DriftCorrection` runs one numba call a layer (`kvstore.kernels.drift`);
    on a GPU, torch ops. On a heads-first cache's view, in each dtype, with channels past
    rotary_dim: the same moves, to the float32 rounding of the two ways' sums (one rounding
    to the dtype against torch's two)."""
    g = torch.Generator().manual_seed(3)
    tokens, heads = 60, 3
    cache = torch.randn(2, heads, tokens, 16, generator=g).to(dtype)  # [2, heads, tokens, dim]
    spans = [(2, 20), (22, 20), (42, 14)]
    picked = np.array([3, 8, 9, 25, 41, 57, 58])  # 57, 58 outside every span
    fresh = torch.randn(2, picked.size, heads, 16, generator=g).to(dtype)
    plan = DriftCorrection(picked, spans, tokens, rope, "cpu", share=0.7)
    assert plan.host is not None
    by_kernel, by_torch = cache.clone(), cache.clone()
    plan.apply(by_kernel.transpose(1, 2), fresh)
    plan._apply_torch(by_torch.transpose(1, 2), fresh)
    assert not torch.equal(by_kernel, cache)  # something moved
    assert torch.equal(by_kernel[:, :, picked], cache[:, :, picked])
    assert torch.equal(by_kernel[:, :, 42:], cache[:, :, 42:])  # no recomputed token: stays
    ulp = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    err = (by_kernel.float() - by_torch.float()).abs().max()
    assert float(err) <= 2 * ulp * float(cache.float().abs().max() + 1), float(err)


@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rope", [RopeConfig(16), RopeConfig(16, rotary_dim=8, pairing="gptj")])
def test_the_gpu_kernels_move_tokens_as_the_host_kernel_does(
    dtype: torch.dtype, rope: RopeConfig
) -> None:
    """On a GPU, `DriftCorrection` runs two CuPy kernels a layer (`drift_gpu`): on a
    heads-first cache's view, in each dtype, the same moves as the numba twin and the torch
    ops, to float32 rounding; the chunks listed out of position order."""
    g = torch.Generator().manual_seed(4)
    tokens, heads = 60, 3
    cache = torch.randn(2, heads, tokens, 16, generator=g).to(dtype)
    spans = [(22, 20), (2, 20), (42, 14)]
    picked = np.array([3, 8, 9, 25, 41, 57, 58])
    fresh = torch.randn(2, picked.size, heads, 16, generator=g).to(dtype)
    on_host = cache.clone()
    DriftCorrection(picked, spans, tokens, rope, "cpu", share=0.7).apply(
        on_host.transpose(1, 2), fresh
    )
    plan = DriftCorrection(picked, spans, tokens, rope, "cuda", share=0.7)
    assert plan.gpu is not None
    by_kernel, by_torch = cache.cuda(), cache.cuda()
    plan.apply(by_kernel.transpose(1, 2), fresh.cuda())
    plan._apply_torch(by_torch.transpose(1, 2), fresh.cuda())
    assert torch.equal(by_kernel[:, :, picked].cpu(), cache[:, :, picked])
    assert torch.equal(by_kernel[:, :, 42:].cpu(), cache[:, :, 42:])
    ulp = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    bound = 2 * ulp * float(cache.float().abs().max() + 1)
    for other in (on_host, by_torch.cpu()):
        err = (by_kernel.cpu().float() - other.float()).abs().max()
        assert float(err) <= bound, float(err)
    assert not torch.equal(by_kernel.cpu(), cache)
