"""RAG chunk reuse against a real server: a chunk stored once comes back at any position of
a new prompt with K re-rotated there (equal, within float rounding, to K computed at that
position), V unchanged, missing chunks reported and left alone, other RoPE settings never
matched, bad layouts refused before anything is read."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvstore.client.chunks import _COUNT_TAG, ChunkCache
from kvstore.errors import InvalidArgument
from kvstore.kernels.rope import RopeConfig
from kvstore.keys import derived_key
from tests.e2e.helpers import gpu_ready

LAYERS, HEADS, DIM = 3, 2, 32
ROPE = RopeConfig(head_dim=DIM, base=10000.0)


def rope_at(raw: torch.Tensor, start: int, cfg: RopeConfig = ROPE) -> torch.Tensor:
    """K of raw keys `[layers, tokens, heads, dim]` at positions start..: NeoX pairing,
    computed in float64 straight from the definition."""
    n = raw.shape[1]
    angle = np.outer(np.arange(start, start + n), cfg.inv_freq())  # [tokens, dim / 2]
    cos = torch.from_numpy(np.cos(angle))[None, :, None, :]
    sin = torch.from_numpy(np.sin(angle))[None, :, None, :]
    x, y = raw.double()[..., : DIM // 2], raw.double()[..., DIM // 2 :]
    return torch.cat([x * cos - y * sin, x * sin + y * cos], dim=-1)


def chunk_kv(seed: int, n: int, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(KV of a chunk computed at `start`, its raw keys): float32."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(LAYERS, n, HEADS, DIM, generator=g)
    v = torch.randn(LAYERS, n, HEADS, DIM, generator=g)
    return torch.stack([rope_at(raw, start).float(), v], dim=1).contiguous(), raw


def tokens(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 50000, n).tolist()


def test_chunks_come_back_rotated_to_their_new_positions(server) -> None:  # type: ignore[no-untyped-def]
    with server.client() as c:
        cache = ChunkCache(c, ROPE)
        docs = [(tokens(i, n), *chunk_kv(i, n, start)) for i, (n, start) in
                enumerate([(40, 0), (25, 0), (33, 1000)])]  # fmt: skip
        for (ids, kv, _), (_, start) in zip(docs, [(40, 0), (25, 0), (33, 1000)], strict=True):
            before = kv.clone()
            cache.put_chunk(ids, kv, position=start)
            assert torch.equal(kv, before)  # the caller's tensor is not touched
        # A new prompt: the documents in another order, with gaps between them, and one
        # chunk the store has never seen.
        unseen = tokens(99, 10)
        positions = [7, 60, 5000, 100]  # doc 2, doc 0, unseen, doc 1
        order = [docs[2][0], docs[0][0], unseen, docs[1][0]]
        out = torch.full((LAYERS, 2, 5100, HEADS, DIM), 7.0)
        found = cache.get_chunks(order, positions, out)
        assert found == [True, True, False, True]
        assert (out[:, :, 5000:5010] == 7.0).all()  # the missing chunk's span untouched
        assert (out[:, :, :7] == 7.0).all() and (out[:, :, 47:60] == 7.0).all()
        for doc, pos in ((2, 7), (0, 60), (1, 100)):
            ids, kv, raw = docs[doc]
            n = len(ids)
            got = out[:, :, pos : pos + n]
            assert torch.equal(got[:, 1], kv[:, 1])  # V as stored
            want = rope_at(raw, pos)
            err = (got[:, 0].double() - want).abs().max()
            assert err < 1e-5 * want.abs().max() * 10, (doc, float(err))
        # Into an engine's heads-first cache (`[layers, 2, heads, tokens, dim]`) through a
        # transposed view: the same values where they belong, nothing else touched.
        heads_first = torch.full((LAYERS, 2, HEADS, 5100, DIM), 7.0)
        view = heads_first.transpose(2, 3)
        assert cache.get_chunks(order, positions, view) == found
        assert torch.equal(view, out)


def test_other_rope_settings_never_match(server) -> None:  # type: ignore[no-untyped-def]
    with server.client() as c:
        ids = tokens(5, 16)
        kv, _ = chunk_kv(5, 16, 0)
        ChunkCache(c, ROPE).put_chunk(ids, kv)
        other = ChunkCache(c, RopeConfig(head_dim=DIM, base=500000.0))
        out = torch.zeros(LAYERS, 2, 16, HEADS, DIM)
        assert other.get_chunks([ids], [0], out) == [False]
        assert ChunkCache(c, ROPE).get_chunks([ids], [0], out) == [True]
        assert torch.equal(out, kv)  # at the position it was computed at: bit for bit


def test_a_chunk_prefilled_after_a_prefix_is_found_only_with_that_prefix(server) -> None:  # type: ignore[no-untyped-def]
    """A chunk prefilled after a system prompt is stored as computed at the prompt's length
    and under a key naming the prompt: it is found with that prefix, rotated from where it
    was computed to where it lands, and never mistaken for the chunk prefilled alone or
    after another prefix (their KV differ)."""
    with server.client() as c:
        cache = ChunkCache(c, ROPE)
        system, other = tokens(40, 12), tokens(41, 12)
        ids = tokens(42, 20)
        after, raw = chunk_kv(42, 20, len(system))
        alone, _ = chunk_kv(43, 20, 0)  # the same tokens' KV when prefilled alone
        cache.put_chunk(ids, after, prefix=system)
        out = torch.zeros(LAYERS, 2, 300, HEADS, DIM)
        assert cache.get_chunks([ids], [200], out) == [False]  # alone: not stored yet
        assert cache.get_chunks([ids], [200], out, prefix=other) == [False]
        assert (out == 0).all()
        cache.put_chunk(ids, alone)
        assert cache.get_chunks([ids], [200], out, prefix=system) == [True]
        got = out[:, :, 200:220]
        assert torch.equal(got[:, 1], after[:, 1])
        want = rope_at(raw, 200)
        assert (got[:, 0].double() - want).abs().max() < 1e-4 * want.abs().max()
        assert cache.get_chunks([ids], [0], out) == [True]
        assert torch.equal(out[:, :, :20], alone)  # the one prefilled alone, its own KV
        assert cache.key(ids, prefix=[]) == cache.key(ids)  # an empty prefix is none
        with pytest.raises(InvalidArgument, match="starts at position 12"):
            cache.put_chunk(ids, after, position=0, prefix=system)


def test_in_context_chunks_are_kept_as_the_mean_of_every_context_they_were_seen_in(server) -> None:  # type: ignore[no-untyped-def]
    """KV of one chunk computed inside three prompts, at three positions with different
    documents before it: each put merges into a running mean under a key of its own
    (neither the chunk alone nor right after the prefix), found re-rotated to where it
    lands; so does how far the observations spread around it; the count survives, and a
    mean whose count was lost counts as one, with no spread."""
    with server.client() as c:
        cache = ChunkCache(c, ROPE)
        system = tokens(50, 10)
        ids = tokens(51, 16)
        raws, vs = [], []
        for i, start in enumerate((40, 75, 130)):
            kv, raw = chunk_kv(60 + i, 16, start)  # other documents before it: other KV
            assert cache.observations(ids, prefix=system) == i
            cache.put_chunk(ids, kv, position=start, prefix=system, in_context=True)
            assert (cache.spread([ids], prefix=system)[0] is None) == (i == 0)  # one: none
            raws.append(raw)
            vs.append(kv[:, 1])
        assert cache.observations(ids, prefix=system) == 3
        out = torch.zeros(LAYERS, 2, 300, HEADS, DIM)
        assert cache.get_chunks([ids], [200], out, prefix=system) == [False]  # right after
        assert cache.get_chunks([ids], [200], out) == [False]  # alone
        assert cache.get_chunks([ids], [200], out, in_context=True) == [False]  # no prefix
        assert cache.get_chunks([ids], [200], out, prefix=system, in_context=True) == [True]
        got = out[:, :, 200:216].double()
        want_v = torch.stack(vs).double().mean(0)
        assert (got[:, 1] - want_v).abs().max() < 1e-5
        # K: rotation is linear, so the mean of the rotated keys is the rotated mean
        want_k = rope_at(torch.stack(raws).mean(0), 200)
        assert (got[:, 0] - want_k).abs().max() < 1e-4 * want_k.abs().max()
        # the spread: each token's root mean squared distance to the mean, K and V
        # (rotation keeps distances: K's is the unrotated keys')
        spread, none = cache.spread([ids, tokens(52, 16)], prefix=system)
        assert none is None
        assert spread is not None and spread.shape == (LAYERS, 2, 16, HEADS)
        for part, seen in ((0, torch.stack(raws)), (1, torch.stack(vs))):
            seen = seen.double()
            want = (seen - seen.mean(0)).pow(2).sum(-1).mean(0).sqrt()
            assert (spread[:, part].double() - want).abs().max() < 1e-4 * want.max()
        assert cache.spread([ids]) == [None] and cache.spread([ids[:-1]], prefix=system) == [None]
        # the count evicted or lost: the stored mean weighs as one observation
        key = cache.key(ids, prefix=system, in_context=True)
        assert c.delete([derived_key(key, _COUNT_TAG)]) == 1
        assert cache.observations(ids, prefix=system) == 1
        assert cache.spread([ids], prefix=system) == [None]
        kv, raw = chunk_kv(70, 16, 20)
        cache.put_chunk(ids, kv, position=20, prefix=system, in_context=True)
        assert cache.observations(ids, prefix=system) == 2
        cache.get_chunks([ids], [0], out, prefix=system, in_context=True)
        old_v, want_v = want_v, (want_v + kv[:, 1].double()) / 2
        assert (out[:, 1, :16].double() - want_v).abs().max() < 1e-5
        spread = cache.spread([ids], prefix=system)[0]  # of two: half their distance
        assert spread is not None
        want = (kv[:, 1].double() - old_v).norm(dim=-1) / 2
        assert (spread[:, 1].double() - want).abs().max() < 1e-4 * want.max()
        # the mean evicted, its count and spread left behind: the next put starts afresh
        assert c.delete([key]) == 1
        kv, raw = chunk_kv(71, 16, 33)
        cache.put_chunk(ids, kv, position=33, prefix=system, in_context=True)
        assert cache.observations(ids, prefix=system) == 1
        assert cache.spread([ids], prefix=system) == [None]
        cache.get_chunks([ids], [0], out, prefix=system, in_context=True)
        assert (out[:, 1, :16] - kv[:, 1]).abs().max() < 1e-6
        with pytest.raises(InvalidArgument, match="position >= 10"):
            cache.put_chunk(ids, kv, position=5, prefix=system, in_context=True)


def test_bad_layouts_are_refused_before_anything_is_read(server) -> None:  # type: ignore[no-untyped-def]
    with server.client() as c:
        cache = ChunkCache(c, ROPE)
        ids = tokens(6, 8)
        kv, _ = chunk_kv(6, 8, 0)
        with pytest.raises(InvalidArgument, match="token ids"):
            cache.put_chunk(ids[:-1], kv)
        with pytest.raises(InvalidArgument, match="head_dim"):
            cache.put_chunk(ids, torch.zeros(LAYERS, 2, 8, HEADS, DIM // 2))
        with pytest.raises(InvalidArgument, match="layers, 2, tokens"):
            cache.put_chunk(ids, torch.zeros(8, DIM))
        cache.put_chunk(ids, kv)
        out = torch.zeros(LAYERS, 2, 20, HEADS, DIM)
        with pytest.raises(InvalidArgument, match="does not fit"):
            cache.get_chunks([ids], [15], out)
        with pytest.raises(InvalidArgument, match="overlap"):
            cache.get_chunks([ids, ids], [0, 4], out)
        with pytest.raises(InvalidArgument, match="positions"):
            cache.get_chunks([ids], [0, 8], out)
        assert (out == 0).all()


@pytest.mark.skipif(not gpu_ready(), reason="needs a CUDA GPU and CuPy")
def test_chunks_into_gpu_memory_match_the_cpu_path(server) -> None:  # type: ignore[no-untyped-def]
    """The same chunks laid into a CUDA tensor on a stream: the same bits as on the CPU
    (the rotation kernels are twins)."""
    with server.client() as c:
        cache = ChunkCache(c, ROPE)
        docs = [
            (tokens(20 + i, 24), chunk_kv(20 + i, 24, 0)[0].to(torch.bfloat16)) for i in range(3)
        ]
        for ids, kv in docs:
            cache.put_chunk(ids, kv.cuda())
        positions = [300, 0, 100]
        ids = [d[0] for d in docs]
        on_cpu = torch.zeros(LAYERS, 2, 400, HEADS, DIM, dtype=torch.bfloat16)
        on_gpu = on_cpu.cuda()
        assert cache.get_chunks(ids, positions, on_cpu) == [True] * 3
        assert cache.get_chunks(ids, positions, on_gpu, torch.cuda.Stream()) == [True] * 3
        assert torch.equal(on_gpu.cpu(), on_cpu)


@pytest.mark.skipif(not gpu_ready(), reason="needs a CUDA GPU and CuPy")
def test_in_context_means_merged_from_gpu_memory_match_the_cpu_path(server) -> None:  # type: ignore[no-untyped-def]
    """In-context KV put from CUDA tensors (bfloat16, as an engine has it) merges into the
    same mean as the same KV put from host memory."""
    with server.client() as c:
        cache = ChunkCache(c, ROPE)
        system = tokens(80, 8)
        on_host, on_gpu = tokens(81, 24), tokens(82, 24)  # two chunks, one per path
        for i, start in enumerate((30, 90, 250)):
            kv = chunk_kv(90 + i, 24, start)[0].to(torch.bfloat16)
            cache.put_chunk(on_host, kv, position=start, prefix=system, in_context=True)
            cache.put_chunk(on_gpu, kv.cuda(), position=start, prefix=system, in_context=True)
        assert cache.observations(on_host, system) == cache.observations(on_gpu, system) == 3
        a, b = (torch.zeros(LAYERS, 2, 100, HEADS, DIM, dtype=torch.bfloat16) for _ in "ab")
        assert cache.get_chunks([on_host], [50], a, prefix=system, in_context=True) == [True]
        assert cache.get_chunks([on_gpu], [50], b, prefix=system, in_context=True) == [True]
        assert a[:, :, 50:74].abs().sum() > 0
        assert torch.equal(a, b)
