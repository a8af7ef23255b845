"""Chunks kept as their mean KV among other documents, on SmolLM2-135M and a real server:
laid into a new prompt, they come closer to the prompt's own prefill than the same chunks
prefilled right after the prefix, in the KV itself and in the question's first token.

The pipeline is the reference one `benchmarks/bench_rag.py` measures (`put_in_contexts`,
`blend_prefill`); `benchmarks/NOTES-rag.md` has the measurement at full size.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kvstore.client.chunks import ChunkCache
from kvstore.client.hf import kv_of
from kvstore.kernels.rope import RopeConfig

from .conftest import BENCHMARKS

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def bench_rag(smollm2: tuple[Any, Any]) -> Any:
    assert BENCHMARKS.is_dir()  # the smollm2 fixture put it on sys.path
    import bench_rag

    return bench_rag


def chunks_of(tokenizer: Any, names: tuple[str, ...]) -> list[list[int]]:
    """~60-token document chunks: the start of these sections of the language reference."""
    from pydoc_data.topics import topics

    return [tokenizer(topics[name][:300])["input_ids"] for name in names]


@torch.inference_mode()
def test_chunks_kept_among_other_documents_come_closest_to_a_prefill(
    smollm2: tuple[Any, Any],
    bench_rag: Any,
    server: Any,
) -> None:
    model, tokenizer = smollm2
    prefix = tokenizer(bench_rag.PREFIX)["input_ids"]
    docs = chunks_of(tokenizer, ("for", "with", "try"))
    others = chunks_of(tokenizer, ("import", "class", "raise", "dict", "calls", "async"))
    question = tokenizer(bench_rag.QUESTION.format("When does the else clause run?"))
    question = question["input_ids"]
    ids = prefix + [t for d in docs for t in d]
    starts = np.cumsum([len(prefix)] + [len(d) for d in docs[:-1]]).tolist()
    with server.client() as c:
        cache = ChunkCache(c, RopeConfig.from_hf(model.config))
        _, pc = bench_rag.prefill(model, prefix)
        cache.put_chunk(prefix, kv_of(pc).contiguous())
        for doc in docs:
            _, dc = bench_rag.prefill(model, prefix + doc)
            cache.put_chunk(doc, kv_of(dc)[:, :, len(prefix) :].contiguous(), prefix=prefix)
        bench_rag.put_in_contexts(model, cache, prefix, docs[1:], others, 4, 2)
        assert [cache.observations(d, prefix) for d in docs] == [0, 4, 4]

        def laid(in_context: bool) -> torch.Tensor:
            layers, two, _, heads, dim = kv_of(pc).shape
            out = torch.empty(layers, two, len(ids), heads, dim)
            found = cache.get_chunks([prefix], [0], out)
            found += cache.get_chunks(docs[:1], starts[:1], out, prefix=prefix)
            found += cache.get_chunks(
                docs[1:], starts[1:], out, prefix=prefix, in_context=in_context
            )
            assert all(found)
            return out

        after_prefix, among = laid(False), laid(True)
    logits, full = bench_rag.prefill(model, ids + question, last_only=True)
    want = kv_of(full)[:, :, : len(ids)]
    ref = F.log_softmax(logits[-1], -1)
    # the first chunk is exact both ways: a prefill of the prompt's start
    first = slice(starts[0], starts[1])
    assert (after_prefix[:, :, first] - want[:, :, first]).abs().max() < 1e-4
    later = slice(starts[1], len(ids))

    def deviation(kv: torch.Tensor) -> float:
        return float((kv[1:, :, later] - want[1:, :, later]).norm() / want[1:, :, later].norm())

    def kl(kv: torch.Tensor) -> float:
        got = bench_rag.blend_prefill(model, kv, ids, question).logits
        return float(F.kl_div(F.log_softmax(got, -1), ref, log_target=True, reduction="sum"))

    dev_after, dev_among = deviation(after_prefix), deviation(among)
    kl_after, kl_among = kl(after_prefix), kl(among)
    print(f"deviation {dev_after:.3f} -> {dev_among:.3f}, KL {kl_after:.2e} -> {kl_among:.2e}")
    assert dev_among < 0.85 * dev_after
    assert kl_among < 0.5 * kl_after

    # Recomputing the tokens the question looks at, with the drift correction: the tokens
    # left as reused move toward the prompt's own prefill (`correct_drift`).
    spans = [(starts[1], len(docs[1])), (starts[2], len(docs[2]))]
    plain = bench_rag.blend_prefill(model, among, ids, question, focus=(0.3, spans))
    drifted = bench_rag.blend_prefill(
        model, among, ids, question, focus=(0.3, spans), drift=RopeConfig.from_hf(model.config)
    )
    assert np.array_equal(plain.picked, drifted.picked) and plain.picked.size
    rest = np.setdiff1d(np.arange(starts[1], len(ids)), plain.picked)

    def off(blend: Any) -> float:
        kv = blend.kv[1:, :, :, rest].transpose(2, 3)
        return float((kv - want[1:, :, rest]).norm() / want[1:, :, rest].norm())

    print(f"reused tokens' deviation {off(plain):.3f} -> {off(drifted):.3f} with the drift")
    assert off(drifted) < off(plain)

    # The same pass run in the buffer `pass_kv` makes (the chunks fetched straight into it,
    # no copy): the same first token and KV, bit for bit, and the buffer is the pass's.
    room = bench_rag.pass_kv(model, len(ids), len(question))
    room.copy_(among)
    in_place = bench_rag.blend_prefill(
        model, room, ids, question, focus=(0.3, spans), drift=RopeConfig.from_hf(model.config)
    )
    assert torch.equal(in_place.logits, drifted.logits)
    assert torch.equal(in_place.kv, drifted.kv)
    assert in_place.kv.data_ptr() == room.data_ptr()


@pytest.mark.parametrize("rows", [1, 40, 340])
def test_grouped_attention_matches_one_masked_call(bench_rag: Any, rows: int) -> None:
    """The pass's attention, its rows grouped by position and its query heads folded onto
    their KV head, gives what one masked grouped-query call gives (and each row sees no key
    past its own position: a future key changed changes nothing)."""
    gen = torch.Generator().manual_seed(rows)
    tokens = 700
    pos = torch.from_numpy(np.sort(np.random.default_rng(rows).choice(tokens, rows, False)))
    q = torch.randn(1, 9, rows, 64, generator=gen)
    keys, values = torch.randn(2, 1, 3, tokens, 64, generator=gen)
    hidden = torch.zeros(1, rows, 576)
    got = bench_rag._Rows(pos, hidden, hidden, hidden).attend(q, keys, values)
    mask = bench_rag._causal_mask(pos, tokens, q.dtype)
    want = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    later = int(pos.max()) + 1
    if later < tokens:
        keys[:, :, later:] += 5.0
        values[:, :, later:] -= 5.0
        again = bench_rag._Rows(pos, hidden, hidden, hidden).attend(q, keys, values)
        torch.testing.assert_close(again, got, rtol=0, atol=0)
