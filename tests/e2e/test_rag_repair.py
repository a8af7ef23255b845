"""Repairing reused chunk KV while decoding, on SmolLM2-135M: once a `RepairSchedule` has
handed out every stale token, the prompt's KV is a prefill's and greedy decoding goes on
as a full prefill's does.

The pipeline is the reference one `benchmarks/bench_rag.py` measures (`blend_prefill`,
`decode_step`); the chunks' KV is each chunk prefilled alone and its K re-rotated to where
it lands, as `ChunkCache.get_chunks` lays it in (without a server here).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from kvstore.client.chunks import RepairSchedule
from kvstore.client.hf import kv_of
from kvstore.kernels.rope import RopeConfig, rerotate_k

from .conftest import BENCHMARKS

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def bench_rag(smollm2: tuple[Any, Any]) -> Any:
    assert BENCHMARKS.is_dir()  # the smollm2 fixture put it on sys.path
    import bench_rag

    return bench_rag


def rag_prompt(tokenizer: Any, bench_rag: Any) -> tuple[list[int], list[list[int]], list[int]]:
    """(prefix, three ~60-token document chunks, question) as bench_rag builds them."""
    from pydoc_data.topics import topics

    docs = [tokenizer(topics[name][:300])["input_ids"] for name in ("for", "with", "try")]
    question = tokenizer(bench_rag.QUESTION.format("When does the else clause run?"))
    return tokenizer(bench_rag.PREFIX)["input_ids"], docs, question["input_ids"]


def reused_kv(model: Any, prefix: list[int], docs: list[list[int]]) -> torch.Tensor:
    """The prompt's KV from reuse: the prefix exact, each chunk prefilled alone with K
    moved to where it lands."""
    rope = RopeConfig.from_hf(model.config)
    parts = [kv_of(model(torch.tensor([prefix]), use_cache=True).past_key_values)]
    start = len(prefix)
    for doc in docs:
        kv = kv_of(model(torch.tensor([doc]), use_cache=True).past_key_values).contiguous()
        rerotate_k(kv, np.arange(len(doc)), np.arange(start, start + len(doc)), rope)
        parts.append(kv)
        start += len(doc)
    return torch.cat(parts, dim=2).contiguous()


@torch.inference_mode()
def full_prefill(model: Any, tokens: list[int], new: int) -> tuple[torch.Tensor, list[int]]:
    """A plain prefill's KV of `tokens` (`[layers, 2, heads, n, dim]`) and its `new` greedy
    tokens."""
    out = model.generate(torch.tensor([tokens]), do_sample=False, max_new_tokens=new,
                         return_dict_in_generate=True)  # fmt: skip
    kv = kv_of(out.past_key_values)[:, :, : len(tokens)].transpose(2, 3)
    return kv, out.sequences[0, len(tokens) :].tolist()


def decode_greedy(bench_rag: Any, model: Any, blend: Any, tokens: list[int], new: int,
                  schedule: RepairSchedule) -> tuple[torch.Tensor, list[int]]:  # fmt: skip
    """Greedy decoding from `blend` with repair steps; (the cache after, the tokens)."""
    layers, _, heads, n, dim = blend.kv.shape
    kv = torch.zeros((layers, 2, heads, n + new, dim))
    kv[:, :, :, :n] = blend.kv
    out = [int(blend.logits.argmax())]
    for j in range(1, new):
        logits = bench_rag.decode_step(model, kv, [*tokens, *out], n + j - 1, schedule.next())
        out.append(int(logits.argmax()))
    return kv, out


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("per_step", [7, 40])
def test_repairing_every_stale_token_gives_a_prefills_kv(
    smollm2: tuple[Any, Any], bench_rag: Any, per_step: int
) -> None:
    model, tokenizer = smollm2
    prefix, docs, question = rag_prompt(tokenizer, bench_rag)
    ids = prefix + [t for d in docs for t in d]
    t, n = len(ids), len(ids) + len(question)
    want, _ = full_prefill(model, ids + question, 1)
    reused = reused_kv(model, prefix, docs)
    spans = [(len(prefix), t - len(prefix))]
    blend = bench_rag.blend_prefill(model, reused, ids, question, focus=(0.15, spans))
    stale = np.arange(len(prefix), n)
    done = np.concatenate([blend.picked, np.arange(t, n)])
    assert blend.picked.size == round(0.15 * (t - len(prefix)))
    before = relative(blend.kv, want)
    assert before > 1e-2  # reuse left the KV far from a prefill's: the test can fail
    schedule = RepairSchedule(stale, per_step, blend.attention, recomputed=done)
    steps = -(-(stale.size - done.size) // per_step)  # phase one
    kv, _ = decode_greedy(bench_rag, model, blend, ids + question, 2 * steps + 40, schedule)
    assert schedule.done
    assert relative(kv[:, :, :, :n], want) < 1e-4 < before


def test_one_step_that_repairs_everything_decodes_as_a_full_prefill(
    smollm2: tuple[Any, Any], bench_rag: Any
) -> None:
    """Every stale token in the first decode step: that step's new token attends to a
    prefill's KV, so it and every token after it are full prefill's greedy tokens."""
    model, tokenizer = smollm2
    prefix, docs, question = rag_prompt(tokenizer, bench_rag)
    ids = prefix + [t for d in docs for t in d]
    t, n = len(ids), len(ids) + len(question)
    new = 24
    want, greedy = full_prefill(model, ids + question, new)
    blend = bench_rag.blend_prefill(model, reused_kv(model, prefix, docs), ids, question)
    schedule = RepairSchedule(np.arange(len(prefix), n), n, recomputed=np.arange(t, n))
    kv, got = decode_greedy(bench_rag, model, blend, ids + question, new, schedule)
    assert schedule.done
    assert relative(kv[:, :, :, :n], want) < 1e-4
    assert got[1:] == greedy[1:]  # the first token came before any repair
