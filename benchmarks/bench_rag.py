"""RAG chunk reuse on a real model: time to first token and answer agreement, per method.

SmolLM2-135M-Instruct (GGUF, offline, `_realkv.load_smollm2`) on the CPU. The documents are
the first ~`--chunk-tokens` (350) tokens of 24 sections of the Python language reference,
one chunk each. A prompt is a RAG prompt as a chat model gets it: the chat template's
system turn and the user turn's opening (`PREFIX`, the same for every prompt), `--chunks`
(6) chunks — the one its question is about and 5 others, in an order of its own — then the
question and the assistant's header. Two fixed sets (`--set`): `eval`, 20 prompts, the
scored one, and `fit`, 8 other questions, for choosing a method's settings without looking
at the scored prompts. Every chunk's KV is prefilled once and stored in a real
`kvstore-server` through `kvstore.client.chunks.ChunkCache`: alone (at position 0), after
the prefix (`prefix=`, its own key) and, for the ctx methods, as its mean
among other documents (`--contexts`). The prefix's KV is stored too (alone at 0: exact).
Then, for each prompt, the first token's logits come from:

- **full**: a prefill of the whole prompt (the reference; logits of the last position
  only, as a server computes them);
- **naive**: the chunks' stored KV (prefilled alone) concatenated as stored (each at
  positions 0..n), then the question prefilled over it;
- **shift**: the same with each chunk's K re-rotated to where it lands (`get_chunks`);
- **blend r%**: shift, then CacheBlend's selective recompute in the same pass as the
  question (`blend_prefill`): layer 0 runs over the whole prompt, the r% of chunk tokens
  whose fresh layer-1 KV deviates most from the reused KV (`recompute_by_deviation`) go on
  through every other layer with the question, over the reused KV of the rest, and their
  fresh KV replaces the reused one (layer 1's for every token);
- **focus r%**: shift, then the r% of chunk tokens the question draws most from recomputed
  with it: a first pass carries the question alone over the shifted KV and sums, over
  layers, heads and question tokens, each token's attention weight times its value's norm
  (`weighted_attention`, `recompute_by_attention`), a second pass recomputes the chosen
  tokens and the question;
- **first N**: shift, then the first N tokens of each chunk recomputed with the question
  (EPIC, `recompute_first`);
- **focus r% + repair N/step**: focus r%'s first token (one timed pass, the same TTFT),
  then decode steps that each recompute N more stale tokens with the new token in the same
  pass (`decode_step`), in the order a `RepairSchedule` hands them out: the chunk tokens
  not yet recomputed, the question's attention first (`--repair-order score`; `position`:
  in position order), then the settling pass that makes every stale KV exact. Scored
  teacher-forced on full's answer through these steps; **step ms** is the mean decode
  step over the answer, **added ms** that less the mean plain decode step over the same
  KV (both the median over the prompts; the row
  `repair 0/step`, plain decoding through the same code: its top-1 checks this path
  against focus r%'s scoring), **1st step ms** the first decode step's (`--repair
  F+N`: F tokens in it, front-loading the repair at the second token's expense);
- **sys shift / sys blend r% / sys focus r%**: the same, from the chunks stored as
  prefilled after the prefix (one attention sink, the prompt's). The first chunk's KV is
  then exact (a prefill of the prompt's start), so the budget, r% of all chunk tokens,
  goes to the other chunks.
- **ctx shift / ctx blend r% / ctx focus r%**: the first chunk as in sys, the others from
  their KV as it looks among other documents: before the prompts, each chunk is prefilled
  `--contexts` (6) times after the prefix and 1..chunks-1 documents drawn from the rest of
  the corpus (`context_documents`: other parts of the language reference, none in any
  prompt), and the store keeps the mean (`put_chunk(in_context=True)`) and how far the
  contexts spread around it. ctx focus weighs the question's attention by that spread of
  each token's V (`ChunkCache.spread`; fetched within TTFT) instead of by the value norm:
  the tokens likeliest to make the output wrong where they land. An index-time cost
  (`--contexts` prefills per document), none per prompt.
- **ctx drift r%**: ctx focus r%, and in its recompute pass, layer by layer, the chunk
  tokens left as reused move half the way their chunk's recomputed tokens drifted from
  their reused KV (`correct_drift`: the chunk's mean drift, K's unrotated): what the
  documents before a chunk change in all its tokens, measured on the few recomputed.

Every reuse method runs one pass through the layers that carries only the tokens it
computes (the question's, plus the recomputed ones), attending over the prompt's KV with
PyTorch's SDPA: no transformers cache is built on the timed path.

For each: **TTFT**, wall time from having the prompt's token ids to the first token's logits
(fetching and rotating the chunks from the server, the recompute and the question's prefill
included; the model's own threads, `--threads`); **top-1**, the share of the 32 tokens that
**full** generates greedily (teacher-forced, the first token included) that each method
predicts the same; **KL** of its first-token distribution from full's; and **gap closed**,
(top-1 - naive's) / (100% - naive's), with a bootstrap interval over the prompts (one
token of one prompt moves the mean by 1/(32 x prompts)). Target (issue 6): recompute at 15%
closes >= 90% of the gap with TTFT >= 3x lower than full, at prompts of >= 2k tokens;
judged for every method at 15%.

    python benchmarks/bench_rag.py [--prompts 20] [--set eval] [--ratios 5,15,30]
        [--methods naive,shift,...] [--contexts 6] [--repair 64,128,256]
        [--repair-order score|position] [--json f] [--plot f]

This process is the engine: its OpenMP threads wait as OpenMP's default has them (they spin
a moment between ops), for full prefill and every method alike. `OMP_WAIT_POLICY=PASSIVE`,
which the server sets for itself (its threads share the cores with an engine's), would make
each small op of a recompute pass wake the second thread: full prefill ran as fast, the
15% passes ~20% slower on the 2-core VM. The header prints the policy the run had.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from _procs import progress, running_kvstore, save_plot, write_outputs
from _realkv import MissingModelDependency, load_smollm2

from kvstore.client import KVClient
from kvstore.client.chunks import (
    ChunkCache,
    DriftCorrection,
    RepairSchedule,
    recompute_by_attention,
    recompute_by_deviation,
    recompute_first,
    weighted_attention,
)
from kvstore.client.hf import cache_of, kv_of
from kvstore.kernels.rope import RopeConfig
from kvstore.scratch import HostScratch

ANSWER_TOKENS = 32
NAMESPACE = "bench/rag/"
TARGET_GAP, TARGET_SPEEDUP, TARGET_TOKENS = 0.90, 3.0, 2000
# The prompt around the documents: the chat template's system turn and the user turn's
# opening (the prefix every prompt shares), then the chunks, then the question and the
# assistant's header.
PREFIX = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n<|im_start|>user\nAnswer the question from these documents.\n\n"
)
QUESTION = "\n\nQuestion: {}<|im_end|>\n<|im_start|>assistant\n"
# The documents: the first ~chunk-tokens tokens of each of these sections of the language
# reference, one chunk each.
SECTIONS = (
    "execmodel", "naming", "exceptions", "import", "assignment", "compound", "for", "with",
    "try", "function", "class", "strings", "raise", "comparisons", "booleans",
    "attribute-access", "specialnames", "dict", "sequence-types", "slicings", "calls",
    "context-managers", "async", "in",
)  # fmt: skip
# (section, question): each prompt retrieves that section's chunk and `--chunks` - 1 others.
# "eval" is the scored set; "fit" is kept apart for choosing a method's settings.
QUESTIONS = {
    "eval": (
        ("execmodel", "What is a code block, and which pieces of a program are blocks?"),
        ("naming", "Which constructs bind names?"),
        ("exceptions", "Where can an exception that is raised be handled?"),
        ("import", "What are the two steps of a basic import statement?"),
        ("assignment", "What does an assignment statement do with the expression list?"),
        ("for", "When does the else clause of a for loop run?"),
        ("with", "How does the execution of a with statement with one item proceed?"),
        ("try", "Which clauses can a try statement have?"),
        ("function", "What does a function definition define?"),
        ("class", "Which base class does a class without an inheritance list have?"),
        ("strings", "Which prefixes can a string literal have?"),
        ("raise", "What does a raise statement without an expression do?"),
        ("comparisons", "How is a chained comparison such as a < b < c interpreted?"),
        ("booleans", "Which values are interpreted as false in a Boolean context?"),
        ("attribute-access", "When is __getattr__ called?"),
        ("specialnames", "How does a class overload an operator?"),
        ("dict", "In what order are the items of a dictionary display evaluated?"),
        ("slicings", "What does a slicing select, and where may it be used?"),
        ("context-managers", "What is a context manager, and what is it typically used for?"),
        ("in", "How does the in operator test membership in a string?"),
    ),
    "fit": (
        ("compound", "Which statements are compound statements?"),
        ("sequence-types", "Which methods should a mapping provide?"),
        ("calls", "What kinds of arguments can a call have?"),
        ("async", "Where can await expressions be used?"),
        ("exceptions", "What does the finally clause of a try statement do?"),
        ("execmodel", "Is a script file a code block?"),
        ("booleans", "What does the operator not yield?"),
        ("for", "How many times is the starred_list expression of a for loop evaluated?"),
    ),
}


# --------------------------------------------------------------------------- documents


def _cut(tokenizer: Any, text: str, chunk_tokens: int, count: int) -> list[list[int]]:
    """Up to `count` consecutive chunks of `text`, each the lines that first reach
    `chunk_tokens` tokens, tokenized on its own (as a RAG system tokenizes its documents)."""
    chunks, current = [], ""
    for line in text.strip().splitlines(keepends=True):
        current += line
        ids = tokenizer(current)["input_ids"]
        if len(ids) >= chunk_tokens:
            chunks.append(ids)
            current = ""
            if len(chunks) == count:
                break
    return chunks


def document_chunks(tokenizer: Any, chunk_tokens: int) -> dict[str, list[int]]:
    """A chunk of about `chunk_tokens` tokens from the start of each section in `SECTIONS`,
    cut at a line end."""
    from pydoc_data.topics import topics

    chunks: dict[str, list[int]] = {}
    for name in SECTIONS:
        cut = _cut(tokenizer, topics[name], chunk_tokens, 1)
        if not cut:
            raise RuntimeError(f"section {name!r} has fewer than {chunk_tokens} tokens")
        chunks[name] = cut[0]
    return chunks


def context_documents(tokenizer: Any, chunk_tokens: int) -> list[list[int]]:
    """The rest of the corpus, which `--contexts` prefills each pool chunk among: the next
    two chunks of every `SECTIONS` section and the first three of every other section of
    the language reference (none of them a pool chunk or in any prompt)."""
    from pydoc_data.topics import topics

    docs = []
    for name, text in topics.items():
        cut = _cut(tokenizer, text, chunk_tokens, 3)
        docs += cut[1:] if name in SECTIONS else cut
    return docs


@dataclass
class Prompt:
    """One RAG prompt: `prefix` + the chunks `docs` + `question` (token ids)."""

    prefix: list[int]
    docs: list[list[int]]
    question: list[int]


def rag_prompts(
    tokenizer: Any, which: str, count: int, chunks: int, chunk_tokens: int
) -> list[Prompt]:
    """The first `count` prompts of the set `which`: each retrieves the chunk its question is
    about and `chunks` - 1 others, in an order of its own (fixed seeds: the same prompts on
    every run)."""
    pool = document_chunks(tokenizer, chunk_tokens)
    questions = QUESTIONS[which]
    if not 1 <= count <= len(questions):
        raise ValueError(f"the {which!r} set has {len(questions)} prompts, not {count}")
    rng = np.random.default_rng({"eval": 0, "fit": 1}[which])
    prefix = tokenizer(PREFIX)["input_ids"]
    prompts = []
    for section, text in questions[:count]:
        others = [name for name in SECTIONS if name != section]
        names = [section, *rng.choice(others, chunks - 1, replace=False)]
        rng.shuffle(names)
        q = tokenizer(QUESTION.format(text))["input_ids"]
        prompts.append(Prompt(prefix, [pool[n] for n in names], q))
    return prompts


# --------------------------------------------------------------------------- the model

# Llama shapes for --random-llama: hidden, layers, heads, KV heads, MLP, vocabulary.
RANDOM_LLAMAS = {
    "1b": (2048, 16, 32, 8, 8192, 128256),
    "8b": (4096, 32, 32, 8, 14336, 128256),
}


def random_llama(shape: str) -> Any:
    """A LlamaForCausalLM of that shape with random bf16 weights, built on the GPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv_heads, mlp, vocab = RANDOM_LLAMAS[shape]
    cfg = LlamaConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=mlp, vocab_size=vocab,
        max_position_embeddings=131072, rope_theta=500000.0,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    return model.eval()


def sync(model: Any) -> None:
    """Wait for the GPU (a wall time must include its work)."""
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


@torch.inference_mode()
def prefill(
    model: Any, ids: Sequence[int], cache: Any = None, start: int = 0, last_only: bool = False
) -> tuple[torch.Tensor, Any]:
    """Run `ids` at positions start.. over `cache`; (logits of every position, or of the
    last one only, cache)."""
    dev = model.device
    pos = torch.arange(start, start + len(ids), device=dev)[None]
    out = model(
        input_ids=torch.tensor([list(ids)], device=dev),
        position_ids=pos,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1 if last_only else 0,
    )
    return out.logits[0].float(), out.past_key_values


@dataclass
class _Rows:
    """Tokens a pass carries through a layer: their positions (ascending), hidden states,
    RoPE tables and which KV positions each may attend to (causal)."""

    pos: torch.Tensor
    hidden: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    _masks: dict[int, torch.Tensor] = field(default_factory=dict)
    _groups: dict[tuple[int, int], list[tuple[int, int, int, torch.Tensor]]] = field(
        default_factory=dict
    )

    def mask(self, tokens: int) -> torch.Tensor:
        """`[rows, tokens]`, added to attention scores: 0 where a row may attend (causal),
        -inf elsewhere. Made once a pass (the rows keep their positions on every layer)."""
        if tokens not in self._masks:
            self._masks[tokens] = _causal_mask(self.pos, tokens, self.hidden.dtype)
        return self._masks[tokens]

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The rows' attention output, `[1, heads, rows, dim]`: `q` (`[1, heads, rows, dim]`,
        RoPE applied) over `keys` and `values` (`[1, kv_heads, tokens, dim]`), each row up to
        its own position.

        A masked attention kernel computes every block of the scores, the masked ones too,
        so the rows go in a few groups by position, each over the keys up to its last row's
        only (the rows of a reused prompt lie spread over it: ~0.6 of the work). The query
        heads that share a KV head go in as one head of 3x the rows (grouped-query attention
        folded as its queries share keys): larger query blocks, each KV block read once per
        KV head. SmolLM2's 340-row pass on 2 cores: 8.3 ms a layer as one call, 6.1 so.
        On a GPU one call: its kernels are chosen per shape, and the groups' shapes change
        with every prompt (the 8B shape's 15% pass on the H200 took 250 ms so, ~100 as one
        call)."""
        if q.is_cuda:
            mask = self.mask(keys.shape[2])
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        _, heads, s, dim = q.shape
        kv_heads, tokens = keys.shape[1], keys.shape[2]
        share = heads // kv_heads
        key = (tokens, share)
        if key not in self._groups:
            count = max(1, min(4, s // 64))  # a group of fewer rows runs slower than its share
            bounds = np.linspace(0, s, count + 1).astype(int).tolist()
            top = self.pos.cpu().numpy()
            groups = []
            for a, b in itertools.pairwise(bounds):
                reach = int(top[a:b].max()) + 1
                mask = _causal_mask(self.pos[a:b], reach, q.dtype).repeat(share, 1)
                groups.append((a, b, reach, mask))
            self._groups[key] = groups
        outs = []
        for a, b, reach, mask in self._groups[key]:
            part = q[:, :, a:b].reshape(1, kv_heads, share * (b - a), dim)
            o = F.scaled_dot_product_attention(
                part, keys[:, :, :reach], values[:, :, :reach], attn_mask=mask
            )
            outs.append(o.view(1, heads, b - a, dim))
        return outs[0] if len(outs) == 1 else torch.cat(outs, 2)


def _causal_mask(pos: torch.Tensor, tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """`[len(pos), tokens]`: 0 up to each row's position, -inf past it."""
    allowed = torch.arange(tokens, device=pos.device)[None, :] <= pos[:, None]
    zero = torch.zeros((), dtype=dtype, device=pos.device)
    return zero.masked_fill(~allowed, float("-inf"))


def _layer(
    model: Any,
    li: int,
    rows: _Rows,
    kv: torch.Tensor,
    causal_all: bool = False,
    weights: list[torch.Tensor] | None = None,
    cost: torch.Tensor | None = None,
    drift: DriftCorrection | None = None,
) -> None:
    """One decoder layer over `rows`: their fresh K and V replace theirs in `kv[li]`
    (`[2, kv_heads, tokens, dim]`), then their queries attend over the whole of `kv[li]`.
    `drift` (made for these rows): first, the tokens of each reused chunk that the rows do
    not recompute move part of the way their chunk's recomputed rows drifted
    (`correct_drift`).
    `causal_all`: the rows are every token in order (a plain causal mask). `weights`: the
    attention weights are computed explicitly and, weighted by `cost` (`[kv_heads,
    tokens]`; None: each value's norm, what the token adds to the rows' outputs), summed
    over heads and rows (`weighted_attention`), `[tokens]`, appended to it (for few rows:
    the question's)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    layer = model.model.layers[li]
    attn, s = layer.self_attn, rows.pos.numel()
    dim = kv.shape[-1]
    x = layer.input_layernorm(rows.hidden)
    q = attn.q_proj(x).view(1, s, -1, dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, s, -1, dim).transpose(1, 2)
    v = attn.v_proj(x).view(1, s, -1, dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, rows.cos, rows.sin)
    if drift is not None:
        fresh = torch.stack((k[0], v[0])).transpose(1, 2)  # [2, rows, heads, dim]
        drift.apply(kv[li].transpose(1, 2), fresh)
    kv[li, 0, :, rows.pos] = k[0]
    kv[li, 1, :, rows.pos] = v[0]
    keys, values = kv[li, 0][None], kv[li, 1][None]
    if weights is not None:
        groups = q.shape[1] // kv.shape[2]  # query heads per KV head, grouped as GQA does
        scaled = (q[0] * attn.scaling).reshape(kv.shape[2], groups * s, dim)
        scores = (scaled @ kv[li, 0].transpose(1, 2)).view(-1, groups, s, kv.shape[3])
        scores += rows.mask(kv.shape[3])
        p = scores.view(kv.shape[2], groups * s, -1).softmax(-1)  # query heads kv-major
        cost = kv[li, 1].norm(dim=-1) if cost is None else cost
        weights.append(weighted_attention(p.reshape(-1, s, p.shape[-1]), cost))
        o = (p @ kv[li, 1]).reshape(1, -1, s, dim)
    elif causal_all:
        o = F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=True)
    else:
        o = rows.attend(q, keys, values)
    h = rows.hidden + attn.o_proj(o.transpose(1, 2).reshape(1, s, -1))
    rows.hidden = h + layer.mlp(layer.post_attention_layernorm(h))


def _rows_at(model: Any, tokens: Sequence[int], positions: np.ndarray) -> _Rows:
    """Rows for the tokens at `positions` (sorted) of the sequence `tokens`."""
    dev, body = model.device, model.model
    keep = torch.from_numpy(positions.astype(np.int64)).to(dev)
    h = body.embed_tokens(torch.tensor([[tokens[i] for i in positions.tolist()]], device=dev))
    cos, sin = body.rotary_emb(h, keep[None])
    return _Rows(keep, h, cos, sin)


def _question_rows(
    model: Any, ids: Sequence[int], question: Sequence[int], picked: np.ndarray | None
) -> _Rows:
    """Rows for the question's tokens, after the chunk tokens at `picked` (None: none)."""
    t = len(ids)
    chosen = np.empty(0, np.int64) if picked is None else picked
    positions = np.concatenate([chosen, np.arange(t, t + len(question))])
    return _rows_at(model, [*ids, *question], positions)


class Blend(NamedTuple):
    """What `blend_prefill` gives: the first token's `logits`; the prompt's `kv` after the
    pass (`[layers, 2, heads, T + len(question), dim]`, the question's included); the chunk
    tokens it recomputed (`picked`); and, with `focus`, the question's `attention` over
    every position (`[T + len(question)]`, weighted and summed over layers, heads and
    question tokens: `weighted_attention`), the scores the choice was made by."""

    logits: torch.Tensor
    kv: torch.Tensor
    picked: np.ndarray
    attention: torch.Tensor | None


def pass_kv(
    model: Any, tokens: int, question: int, shape: tuple[int, int, int] | None = None
) -> torch.Tensor:
    """Room for `tokens` tokens of reused KV, `[layers, 2, tokens, heads, head_dim]`, that
    `blend_prefill` uses as it is: a view of the pass's own buffer (heads first, with room
    for `question` more tokens), so the chunks fetched into it are not copied again.
    `shape`: (layers, kv heads, head dim), if not the model's. In host memory the buffer is
    kept from one call to the next (`HostScratch`), as an engine keeps its KV memory (a
    fresh 100 MB page-faults its way in, ~18 ms on the VM): valid until the next call."""
    if shape is None:
        cfg = model.config
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, dim)
    layers, heads, dim = shape
    room = (layers, 2, heads, tokens + question, dim)
    if model.device.type == "cuda":  # torch's allocator keeps its memory
        buffer = torch.empty(room, dtype=model.dtype, device=model.device)
    else:
        buffer = _KV_MEMORY.tensor(room, model.dtype)
    return buffer[:, :, :, :tokens].transpose(2, 3)


_KV_MEMORY = HostScratch()  # pass_kv's on the host


def _laid_out(reused: torch.Tensor, tokens: int) -> torch.Tensor | None:
    """The pass's buffer (`[layers, 2, heads, tokens, dim]`) that `reused` is the first
    positions of, when `pass_kv` made it; None otherwise."""
    layers, two, _, heads, dim = reused.shape
    whole = reused.transpose(2, 3)
    strides = (two * heads * tokens * dim, heads * tokens * dim, tokens * dim, dim, 1)
    size = layers * two * heads * tokens * dim * reused.element_size()
    storage = reused.untyped_storage().nbytes()
    if whole.stride() != strides or whole.storage_offset() or storage < size:
        return None
    return whole.as_strided((layers, two, heads, tokens, dim), strides)


@torch.inference_mode()
def blend_prefill(
    model: Any,
    reused: torch.Tensor,
    ids: Sequence[int],
    question: Sequence[int],
    picked: np.ndarray | None = None,
    select: tuple[float, Sequence[tuple[int, int]]] | None = None,
    focus: tuple[float, Sequence[tuple[int, int]]] | None = None,
    spread: torch.Tensor | None = None,
    drift: RopeConfig | None = None,
) -> Blend:
    """The first token's logits over reused chunk KV, in one pass through the layers that
    carries only the tokens it recomputes (as CacheBlend runs inside an engine).

    `reused`: the KV of `ids` (`[layers, 2, T, heads, dim]`, chunks laid in by `get_chunks`;
    made by `pass_kv`, the pass runs in it, else in a copy). The question is new, so its
    tokens are always computed; so are the chunk tokens at `picked`. `select=(ratio, spans)`
    picks them instead, CacheBlend's way: layer 0 runs over every token (its output is what
    layer 1's K and V need), and the `ratio` share of the chunk tokens (`spans`) whose fresh
    layer-1 KV deviates most from the reused one (`recompute_by_deviation`) go on through
    the other layers; layer 1's fresh KV, computed for every token anyway, replaces the
    reused one. Each carried token attends to the KV of every token before it: its own fresh
    KV where it was recomputed, the reused one elsewhere. `focus=(ratio, spans)` picks them
    by where the question looks instead: a first pass carries the question alone over the
    reused KV and records on every layer what each token adds to its output
    (`weighted_attention`: attention weight times value norm, or times `spread`, `[layers,
    kv_heads, T]`, where given: for in-context means, `ChunkCache.spread`'s V, zero where
    the KV is exact); the `ratio` share of the chunk tokens that score most
    (`recompute_by_attention`) are recomputed with it in a second pass. `drift` (the model's
    RoPE settings), with `focus`: in that second pass, the other tokens of each of `focus`'s
    spans move part of the way their chunk's recomputed tokens drifted, layer by layer
    (`correct_drift`)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    body = model.model
    layers, _, t, heads, dim = reused.shape
    n, dev = t + len(question), model.device
    kv = _laid_out(reused, n)
    if kv is None:
        kv = torch.empty((layers, 2, heads, n, dim), dtype=reused.dtype, device=dev)
        kv[:, :, :, :t] = reused.transpose(2, 3)
    first, attention = 0, None
    if select is not None:
        ratio, spans = select
        every = torch.arange(n, device=dev)
        h = body.embed_tokens(torch.tensor([[*ids, *question]], device=dev))
        cos, sin = body.rotary_emb(h, every[None])
        rows = _Rows(every, h, cos, sin)
        _layer(model, 0, rows, kv, causal_all=True)
        stale = kv[1, :, :, :t]  # layer 1's reused KV, until `fresh` replaces it below
        x = body.layers[1].input_layernorm(rows.hidden)
        attn = body.layers[1].self_attn
        k = attn.k_proj(x).view(1, n, -1, dim).transpose(1, 2)
        v = attn.v_proj(x).view(1, n, -1, dim).transpose(1, 2)
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        fresh = torch.stack((k[0, :, :t], v[0, :, :t]))
        picked = recompute_by_deviation(stale.transpose(1, 2), fresh.transpose(1, 2), ratio, spans)
        keep = torch.from_numpy(np.concatenate([picked, np.arange(t, n)])).to(dev)
        rows = _Rows(keep, rows.hidden[:, keep], cos[:, keep], sin[:, keep])
        kv[1, 0, :, :t], kv[1, 1, :, :t] = fresh[0], fresh[1]
        first = 1
    else:
        if focus is not None:
            ratio, spans = focus
            weights: list[torch.Tensor] = []
            rows = _question_rows(model, ids, question, np.empty(0, np.int64))
            costs: list[torch.Tensor | None] = [None] * layers
            if spread is not None:  # the question's own KV is computed: no error to weigh
                costs = list(torch.nn.functional.pad(spread.to(dev), (0, n - t)))
            for li in range(layers):
                _layer(model, li, rows, kv, weights=weights, cost=costs[li])
            attention = torch.stack(weights).sum(0)
            picked = recompute_by_attention(attention, ratio, spans)
        rows = _question_rows(model, ids, question, picked)
    carried = None
    if drift is not None and focus is not None:
        carried = DriftCorrection(rows.pos.cpu().numpy(), focus[1], n, drift, dev)
    for li in range(first, layers):
        _layer(model, li, rows, kv, drift=carried)
    logits = model.lm_head(body.norm(rows.hidden[:, -1:]))[0, -1].float()
    done = np.empty(0, np.int64) if picked is None else picked
    return Blend(logits, kv, done, attention)


@torch.inference_mode()
def decode_step(
    model: Any, kv: torch.Tensor, tokens: Sequence[int], position: int, repair: np.ndarray
) -> torch.Tensor:
    """One decode step that also repairs reused KV: the token `tokens[position]` goes
    through every layer together with the prompt tokens at `repair` (sorted positions
    before it, handed out by a `RepairSchedule`), in one pass as chunked prefill rides
    along with decoding. Each carried token writes its fresh K and V into `kv`
    (`[layers, 2, heads, capacity, dim]`, zeros past what is filled) in place and
    attends to every position up to its own: the fresh KV of the carried tokens before it,
    the cache's elsewhere. Returns the new token's next-token logits."""
    rows = _rows_at(model, tokens[: position + 1], np.append(repair, position))
    for li in range(kv.shape[0]):
        _layer(model, li, rows, kv)
    return model.lm_head(model.model.norm(rows.hidden[:, -1:]))[0, -1].float()


def self_check(model: Any, chunks: ChunkCache, docs: list[list[int]]) -> float:
    """The blend pass against a plain prefill: recomputing every token of reused,
    re-rotated chunks must give the prompt's own KV (the masks, positions and KV updates
    are right), and the re-rotated chunks alone must differ from it (the check can fail).
    Returns the largest relative difference; RuntimeError if either fails."""
    ids = [t for d in docs for t in d]
    _, cache = prefill(model, ids)
    want = kv_of(cache)
    reused = torch.empty(want.shape, dtype=want.dtype, device=want.device)
    starts = np.cumsum([0] + [len(d) for d in docs[:-1]]).tolist()
    chunks.get_chunks(docs, starts, reused)
    blended = blend_prefill(model, reused, ids, [], picked=np.arange(len(ids)))
    got = blended.kv.transpose(2, 3)
    tol = 1e-3 if want.dtype == torch.float32 else 5e-2  # bf16 kernels round differently
    want, got, reused = want.float(), got.float(), reused.float()
    scale = float(want.abs().max())
    err = float((got - want).abs().max()) / scale
    stale = float((reused - want).abs().max()) / scale
    if not err < tol or not stale > 3 * err:
        raise RuntimeError(
            f"recomputing every token gave KV {err:.1e} from a plain prefill's (reused chunks: "
            f"{stale:.1e}): the recompute path is wrong"
        )
    return err


# --------------------------------------------------------------------------- one prompt


@dataclass
class Outcome:
    """One method on one prompt. Repair rows also carry `itl_s`, the mean time of a
    decode step over the answer (the repair included), `added_s`, that less the mean
    plain decode step's over the same KV in the same prompt, `first_step_s`, the first
    decode step's time (from the first token to the second), and `exact_after`, the
    decode steps after which the prompt's KV was a prefill's (nan: not within the
    answer)."""

    method: str
    ttft_s: float
    top1: float
    kl: float
    itl_s: float = math.nan
    added_s: float = math.nan
    first_step_s: float = math.nan
    exact_after: float = math.nan


@dataclass
class PromptResult:
    tokens: int
    outcomes: list[Outcome] = field(default_factory=list)


def answer_logits(
    model: Any, kv: torch.Tensor, question: list[int], answer: list[int]
) -> torch.Tensor:
    """Logits for the first answer token and the next ones, teacher-forced on `answer`."""
    logits, _ = prefill(model, question + answer[:-1], cache_of(model, kv), kv.shape[2])
    return logits[len(question) - 1 :]


FAMILIES = (
    "naive", "shift", "blend", "focus", "first", "sys-naive", "sys-shift", "sys-blend",
    "sys-focus", "ctx-naive", "ctx-shift", "ctx-blend", "ctx-focus", "ctx-drift",
    "focus-repair",
)  # fmt: skip
REPAIR_ORDERS = ("score", "position")


def repair_decode(
    model: Any,
    blend: Blend,
    tokens: Sequence[int],
    answer: Sequence[int],
    schedule: RepairSchedule | None,
    first: int | None = None,
) -> tuple[float, list[float], float]:
    """Decode `answer` teacher-forced from `blend` (its first-token logits and KV), each
    step repairing what `schedule` hands out (None: plain decoding), the first step
    `first` tokens (default: as many as the others); `tokens` are the prompt's, question
    included. Returns (top-1 agreement with `answer`, the first token included, each
    decode step's wall time, and after how many steps `schedule` was done, nan if it was
    not). `blend.kv` is not changed."""
    layers, _, heads, n, dim = blend.kv.shape
    kv = torch.zeros((layers, 2, heads, n + len(answer), dim), dtype=blend.kv.dtype,
                     device=blend.kv.device)  # fmt: skip
    kv[:, :, :, :n] = blend.kv
    seq = [*tokens, *answer]
    hits = [int(blend.logits.argmax()) == answer[0]]
    steps: list[float] = []
    exact_after = math.nan
    for j in range(1, len(answer)):
        t0 = time.perf_counter()
        count = first if j == 1 else None
        repair = schedule.next(count) if schedule is not None else np.empty(0, np.int64)
        logits = decode_step(model, kv, seq, n + j - 1, repair)
        sync(model)
        steps.append(time.perf_counter() - t0)
        hits.append(int(logits.argmax()) == answer[j])
        if schedule is not None and schedule.done and math.isnan(exact_after):
            exact_after = j
    return statistics.fmean(hits), steps, exact_after


def run_prompt(
    model: Any,
    chunks: ChunkCache,
    prompt: Prompt,
    ratios: Sequence[float],
    first_n: int,
    families: Sequence[str] = FAMILIES,
    quiet: bool = False,
    repairs: Sequence[tuple[int | None, int]] = (),
    repair_order: str = "score",
) -> PromptResult:
    prefix, docs, question = prompt.prefix, prompt.docs, prompt.question
    ids = prefix + [t for d in docs for t in d]
    spans, pos = [], len(prefix)
    for d in docs:
        spans.append((pos, len(d)))
        pos += len(d)
    t, chunk_tokens = len(ids), len(ids) - len(prefix)
    # Stored after the prefix, the first chunk's KV is what a prefill of the prompt gives
    # (a prefix hit): the recompute budget, r% of all chunk tokens, goes to the others.
    later = spans[1:]
    later_share = chunk_tokens / max(1, sum(n for _, n in later))
    result = PromptResult(tokens=t + len(question))
    cfg = model.config
    layers, heads = cfg.num_hidden_layers, cfg.num_key_value_heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    # full: the reference, and its greedy answer
    t0 = time.perf_counter()
    logits, cache = prefill(model, ids + question, last_only=True)
    sync(model)
    full_ttft = time.perf_counter() - t0
    answer = [int(logits[-1].argmax())]
    for _ in range(ANSWER_TOKENS - 1):
        step, cache = prefill(model, answer[-1:], cache, t + len(question) + len(answer) - 1)
        answer.append(int(step[-1].argmax()))
    ref = answer_logits(model, kv_of(cache)[:, :, :t], question, answer)
    ref_logp = F.log_softmax(ref[0], -1)

    def kl_of(first: torch.Tensor) -> float:
        logp = F.log_softmax(first, -1)
        return float(F.kl_div(logp, ref_logp, log_target=True, reduction="sum"))

    def record(outcome: Outcome) -> None:
        result.outcomes.append(outcome)
        if not quiet:
            o = outcome
            line = f"  {o.method:<27} TTFT {o.ttft_s * 1e3:7.0f} ms  top-1 {o.top1:6.1%}"
            line += f"  KL {o.kl:.2e}"
            if not math.isnan(o.itl_s):
                line += f"  step {o.itl_s * 1e3:5.0f} ms (+{o.added_s * 1e3:.0f})"
                line += f", first {o.first_step_s * 1e3:.0f} ms, exact after {o.exact_after}"
            progress(line)

    def score(method: str, ttft: float, kv: torch.Tensor) -> None:
        got = answer_logits(model, kv, question, answer)
        top1 = float((got.argmax(-1).cpu() == torch.tensor(answer)).double().mean())
        record(Outcome(method, ttft, top1, kl_of(got[0])))

    result.outcomes.append(Outcome("full", full_ttft, 1.0, 0.0))
    progress(f"  {'full':<27} TTFT {full_ttft * 1e3:7.0f} ms ({result.tokens} tokens)")

    def reused(storage: str) -> torch.Tensor:
        """The prompt's KV from the store: the prefix (stored alone at 0, so exact) and the
        chunks, stored alone (`naive`: laid in as stored, at 0..n; `alone`: re-rotated),
        after the prefix (`sys`) or, but for the first (after the prefix, exact), as their
        mean among other documents (`ctx`)."""
        out = pass_kv(model, t, len(question), (layers, heads, dim))
        found = chunks.get_chunks([prefix], [0], out) if prefix else []
        starts = [s for s, _ in spans]
        if storage.endswith("naive"):
            temps = [
                torch.empty((layers, 2, n, heads, dim), dtype=model.dtype, device=model.device)
                for _, n in spans
            ]
            after = None if storage == "naive" else prefix  # sys or ctx chunks, as stored
            keys = [chunks.key(d, after, storage == "ctx naive" and j > 0)
                    for j, d in enumerate(docs)]  # fmt: skip
            found += chunks.client.get_into(keys, temps).wait()
            for (s, n), temp in zip(spans, temps, strict=True):
                out[:, :, s : s + n] = temp
        elif storage == "ctx":
            found += chunks.get_chunks(docs[:1], starts[:1], out, prefix=prefix)
            found += chunks.get_chunks(docs[1:], starts[1:], out, prefix=prefix, in_context=True)
        else:
            after = prefix if storage == "sys" else None
            found += chunks.get_chunks(docs, starts, out, prefix=after)
        if not all(found):
            raise RuntimeError("a chunk put for this run was not found")
        return out

    def spread() -> torch.Tensor:
        """For ctx focus: the spread of the means' V over their contexts (`ChunkCache.spread`),
        `[layers, kv heads, T]`; zero for the prefix and the first chunk (exact)."""
        out = torch.zeros((layers, heads, t), device=model.device)
        for got, (s, n) in zip(chunks.spread(docs[1:], prefix), later, strict=True):
            if got is None:
                raise RuntimeError("a chunk's in-context spread was not found")
            out[:, :, s : s + n] = got[:, 1].transpose(1, 2).to(model.device)
        return out

    def timed(method: str, storage: str, weigh_by_spread: bool = False, **how: Any) -> None:
        """Time one method: fetch `storage`'s chunks (and, for `weigh_by_spread`, their
        spreads), run `blend_prefill` with `how`, and score its KV."""
        t0 = time.perf_counter()
        if weigh_by_spread:
            how["spread"] = spread()
        kv = blend_prefill(model, reused(storage), ids, question, **how).kv
        sync(model)
        score(method, time.perf_counter() - t0, kv[:, :, :, :t].transpose(2, 3))

    def budget(r: float, storage: str) -> tuple[float, list[tuple[int, int]]]:
        return (min(1.0, r * later_share), later) if storage != "alone" else (r, spans)

    if "naive" in families:
        timed("naive", "naive")
    for tag in ("sys", "ctx"):
        if f"{tag}-naive" in families:
            timed(f"{tag} naive", f"{tag} naive")
    if "shift" in families:
        timed("shift", "alone")
    if "sys-shift" in families:
        timed("sys shift", "sys")
    if "ctx-shift" in families:
        timed("ctx shift", "ctx")
    for storage, tag in (("alone", ""), ("sys", "sys "), ("ctx", "ctx ")):
        for r in ratios:
            if f"{tag}blend".replace(" ", "-") in families:
                timed(f"{tag}blend {r:.0%}", storage, select=budget(r, storage))
        for r in ratios:
            if f"{tag}focus".replace(" ", "-") in families:
                timed(f"{tag}focus {r:.0%}", storage, focus=budget(r, storage),
                      weigh_by_spread=storage == "ctx")  # fmt: skip
    for r in ratios:
        if "ctx-drift" in families:
            timed(f"ctx drift {r:.0%}", "ctx", focus=budget(r, "ctx"), weigh_by_spread=True,
                  drift=chunks.rope)  # fmt: skip
    if "first" in families:
        timed(f"first {first_n}", "alone", picked=recompute_first(spans, first_n))
    if "focus-repair" in families:
        # Focus's first token, then decode steps that each recompute `per_step` more stale
        # tokens: the chunks' and the question's (computed over the chunks' reused KV).
        # Every row's first token is this one timed pass: the repair starts after it.
        stale = np.concatenate([np.arange(s, s + n) for s, n in [*spans, (t, len(question))]])
        for r in ratios:
            t0 = time.perf_counter()
            blend = blend_prefill(model, reused("alone"), ids, question, focus=budget(r, "alone"))
            sync(model)
            ttft = time.perf_counter() - t0
            done = np.concatenate([blend.picked, np.arange(t, t + len(question))])
            base, plain, _ = repair_decode(model, blend, ids + question, answer, None)
            for first, per_step in ((None, 0), *repairs):
                if per_step:
                    scores = blend.attention if repair_order == "score" else None
                    schedule = RepairSchedule(stale, per_step, scores, recomputed=done)
                    top1, steps, exact = repair_decode(
                        model, blend, ids + question, answer, schedule, first
                    )
                else:
                    top1, steps, exact = base, plain, math.nan
                itl = statistics.fmean(steps)
                front = "" if first is None else f"{first}+"
                name = f"focus {r:.0%} + repair {front}{per_step}/step"
                if repair_order != "score" and per_step:
                    name += f" ({repair_order})"
                added = itl - statistics.fmean(plain)
                kl = kl_of(blend.logits)
                record(Outcome(name, ttft, top1, kl, itl, added, steps[0], exact))
    return result


# --------------------------------------------------------------------------- report


def gap_closed(method: np.ndarray, naive: np.ndarray) -> float:
    """(mean top-1 - naive's) / (100% - naive's), over the prompts' top-1 shares."""
    gap = 1.0 - float(naive.mean())
    return (float(method.mean()) - float(naive.mean())) / gap if gap > 0 else math.nan


def bootstrap_gap(
    method: np.ndarray, naive: np.ndarray, draws: int = 2000, level: float = 0.9
) -> tuple[float, float]:
    """A `level` interval of `gap_closed` from resampling the prompts (with replacement,
    the same prompts for the method and naive; a fixed seed)."""
    rng = np.random.default_rng(0)
    picks = rng.integers(0, method.size, (draws, method.size))
    m, n = method[picks].mean(1), naive[picks].mean(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        gaps = (m - n) / (1.0 - n)
    gaps = gaps[np.isfinite(gaps)]
    if not gaps.size:
        return math.nan, math.nan
    lo, hi = np.quantile(gaps, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def summarize(results: list[PromptResult]) -> list[dict[str, Any]]:
    methods = [o.method for o in results[0].outcomes]
    rows = []
    top1 = {}
    for m in methods:
        outs = [next(o for o in r.outcomes if o.method == m) for r in results]
        top1[m] = np.array([o.top1 for o in outs])
        rows.append(
            {
                "method": m,
                "ttft_s": statistics.fmean(o.ttft_s for o in outs),
                "top1": statistics.fmean(o.top1 for o in outs),
                "top1_min": min(o.top1 for o in outs),
                "kl": statistics.fmean(o.kl for o in outs),
                # Decode-step times: the median over the prompts (each prompt's mean over
                # its steps), robust to a prompt timed while the machine was busy.
                "itl_s": statistics.median(o.itl_s for o in outs),
                "added_s": statistics.median(o.added_s for o in outs),
                "first_step_s": statistics.median(o.first_step_s for o in outs),
                "exact_after": statistics.median(o.exact_after for o in outs),
            }
        )
    full = rows[0]
    naive = top1.get("naive")
    kl_naive = next((r["kl"] for r in rows if r["method"] == "naive"), math.nan)
    for r in rows:
        r["speedup"] = full["ttft_s"] / r["ttft_s"]
        r["kl_closed"] = 1.0 - r["kl"] / kl_naive if kl_naive else math.nan
        # Against the naive concatenation of the same stored chunks (sys, ctx), where run
        own = top1.get(r["method"].split(" ")[0] + " naive")
        r["gap_own"] = math.nan if own is None else gap_closed(top1[r["method"]], own)
        if naive is None:
            r["gap_closed"], r["gap_ci"] = math.nan, (math.nan, math.nan)
        else:
            r["gap_closed"] = gap_closed(top1[r["method"]], naive)
            r["gap_ci"] = bootstrap_gap(top1[r["method"]], naive)
    return rows


def render(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    width = max(14, *(len(r["method"]) for r in rows))
    lines = [
        f"RAG chunk reuse on {meta['model']}, {meta['prompts']} prompts ({meta['set']} set) of "
        f"{meta['tokens_min']}-{meta['tokens_max']} tokens ({meta['chunks']} chunks of "
        f"~{meta['chunk_tokens']} tokens between a system prefix and a question), torch "
        f"{meta['torch']}, {meta['threads']} threads (OMP_WAIT_POLICY {meta['omp_wait_policy']}), "
        f"load average {meta['load']}",
        "TTFT: mean, from the prompt's token ids to the first token's logits (chunks fetched "
        "from a kvstore-server and re-rotated, recompute and question prefill included); "
        f"top-1: agreement with full's {ANSWER_TOKENS} greedy tokens (teacher-forced), mean and "
        "the worst prompt's; KL of the first token's distribution from full's; gap closed: "
        "(top-1 - naive's) / (100% - naive's), with a 90% bootstrap interval over the prompts",
        "",
        f"{'method':<{width}} {'TTFT ms':>9} {'speedup':>8} {'top-1':>7} {'worst':>7} "
        f"{'KL':>9} {'gap closed':>11} {'90% interval':>13} {'own naive':>10} {'KL closed':>10} "
        f"{'step ms':>8} {'added ms':>9} {'1st step ms':>12}",
    ]
    if meta.get("random_weights"):
        lines[-1] = f"{'method':<{width}} {'TTFT ms':>9} {'speedup':>8}"
        for r in rows:
            lines.append(f"{r['method']:<{width}} {r['ttft_s'] * 1e3:>9.1f} {r['speedup']:>7.1f}x")
        lines.append("(random weights: agreement with full prefill says nothing; timings only)")
        return "\n".join(lines)
    for r in rows:
        gap = "" if math.isnan(r["gap_closed"]) else f"{r['gap_closed']:.0%}"
        lo, hi = r["gap_ci"]
        ci = "" if math.isnan(lo) or r["method"] in ("full", "naive") else f"{lo:.0%}..{hi:.0%}"
        step = "" if math.isnan(r["itl_s"]) else f"{r['itl_s'] * 1e3:.0f}"
        added = "" if math.isnan(r["added_s"]) else f"{r['added_s'] * 1e3:+.0f}"
        first = "" if math.isnan(r["first_step_s"]) else f"{r['first_step_s'] * 1e3:.0f}"
        own = "" if math.isnan(r["gap_own"]) else f"{r['gap_own']:.0%}"
        kl_closed = "" if math.isnan(r["kl_closed"]) else f"{r['kl_closed']:.1%}"
        lines.append(
            f"{r['method']:<{width}} {r['ttft_s'] * 1e3:>9.0f} {r['speedup']:>7.1f}x "
            f"{r['top1']:>7.1%} {r['top1_min']:>7.1%} {r['kl']:>9.2e} {gap:>11} {ci:>13} "
            f"{own:>10} {kl_closed:>10} {step:>8} {added:>9} {first:>12}"
        )
    lines.append(
        "own naive: the gap closed against the naive concatenation of the same stored chunks "
        "(sys naive, ctx naive) where that ran; KL closed: 1 - KL / naive's KL"
    )
    for r in rows:
        judged = r["method"].endswith(" 15%") or " 15% + repair " in r["method"]
        if not judged or " + repair 0/step" in r["method"]:  # 0/step: plain decoding's row
            continue
        gaps = [r["gap_closed"], r["kl_closed"]] + (
            [] if math.isnan(r["gap_own"]) else [r["gap_own"]]
        )
        ok = min(gaps) >= TARGET_GAP and r["speedup"] >= TARGET_SPEEDUP
        own = "" if math.isnan(r["gap_own"]) else f" ({r['gap_own']:.0%} against its own naive)"
        lines.append(
            f"target: {r['method']} closes >= {TARGET_GAP:.0%} of the gap (top-1 and KL) at >= "
            f"{TARGET_SPEEDUP:g}x lower TTFT, prompts >= {TARGET_TOKENS} tokens: top-1 gap "
            f"{r['gap_closed']:.0%}{own}, KL gap {r['kl_closed']:.0%}, {r['speedup']:.1f}x -> "
            f"{'PASS' if ok else 'MISS'}"
        )
    return "\n".join(lines)


def write_plot(rows: list[dict[str, Any]], path: Path) -> bool:
    def draw(fig: Any, ax: Any) -> None:
        # The 0/step row is plain decoding's (a check of the decode path): not drawn.
        drawn = [r for r in rows if " + repair 0/step" not in r["method"]]
        repairs = [r for r in drawn if " + repair " in r["method"]]
        for r in drawn:
            where = (r["ttft_s"] * 1e3, 100 * r["top1"])
            if r in repairs:  # the same TTFT as their focus row: labels in a column, with cost
                k = repairs.index(r)
                label = f"{r['method']} ({r['added_s'] * 1e3:+.0f} ms/step)"
                ax.plot(*where, "s", markersize=5)
                ax.annotate(label, where, textcoords="offset points", xytext=(40, -16 * k - 24),
                            fontsize=7, arrowprops={"arrowstyle": "-", "lw": 0.5})  # fmt: skip
                continue
            ax.plot(*where, "o", markersize=8)
            ax.annotate(r["method"], where, textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.set_xlabel("time to first token, ms (CPU)")
        ax.set_ylabel(f"top-1 agreement with full prefill over {ANSWER_TOKENS} tokens, %")
        ax.grid(True, alpha=0.3)
        fig.suptitle("RAG chunk reuse on SmolLM2-135M: speed vs agreement")

    return save_plot(path, draw, figsize=(7, 4.5))


def random_prompts(
    vocab: int, count: int, chunks: int, chunk_tokens: int, pool_size: int
) -> tuple[list[Prompt], list[list[int]]]:
    """For --random-llama: random token ids, the same shapes as `rag_prompts`, and as many
    other random documents for the contexts (`context_documents`)."""
    rng = np.random.default_rng(0)
    pool = [rng.integers(0, vocab, chunk_tokens).tolist() for _ in range(2 * pool_size)]
    prefix = rng.integers(0, vocab, 32).tolist()
    question = rng.integers(0, vocab, 32).tolist()
    prompts = [
        Prompt(prefix, [pool[j] for j in rng.choice(pool_size, chunks, replace=False)], question)
        for _ in range(count)
    ]
    return prompts, pool[pool_size:]


def put_in_contexts(
    model: Any,
    cache: ChunkCache,
    prefix: list[int],
    docs: Sequence[list[int]],
    others: Sequence[list[int]],
    contexts: int,
    most_before: int,
) -> None:
    """Store each of `docs` as its KV looks among other documents: `contexts` times, after
    `prefix` and 1..`most_before` documents drawn from `others` (the rest of the corpus),
    prefilled and merged into the chunk's in-context mean (`put_chunk(in_context=True)`).
    What a RAG deployment does offline when it indexes its documents, or online from the
    prompts whose chunks were not cached yet (fixed seed: the same contexts on every run)."""
    rng = np.random.default_rng(2)
    for i, doc in enumerate(docs):
        for _ in range(contexts):
            picked = rng.choice(len(others), int(rng.integers(1, most_before + 1)), replace=False)
            head = prefix + [t for j in picked for t in others[j]]
            _, c = prefill(model, head + doc)
            kv = kv_of(c)[:, :, len(head) :].contiguous()
            cache.put_chunk(doc, kv, position=len(head), prefix=prefix, in_context=True)
        progress(f"  chunk {i + 1}/{len(docs)} prefilled in {contexts} contexts")


def parse_repair(item: str) -> tuple[int | None, int]:
    """`--repair`'s items: "N" (N stale tokens a step) or "F+N" (F in the first step)."""
    first, _, per_step = item.strip().rpartition("+")
    counts = (int(first) if first else None, int(per_step))
    if min(c for c in counts if c is not None) < 1:
        raise ValueError(item)
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument(
        "--prompts", type=int, default=20,
        help=f"prompts (default 20; the eval set has {len(QUESTIONS['eval'])}, fit "
        f"{len(QUESTIONS['fit'])})",
    )  # fmt: skip
    p.add_argument("--set", choices=sorted(QUESTIONS), default="eval", help="prompt set (eval)")
    p.add_argument("--chunks", type=int, default=6, help="document chunks per prompt (6)")
    p.add_argument("--chunk-tokens", type=int, default=350, help="tokens per chunk, about (350)")
    p.add_argument("--pool", type=int, default=12, help="--random-llama: distinct chunks (12)")
    p.add_argument("--ratios", default="5,15,30", help="recompute shares, %% (5,15,30)")
    p.add_argument("--first", type=int, default=16, help="first-N recompute: N per chunk (16)")
    p.add_argument(
        "--repair", default="64,128,256",
        help="focus-repair: stale tokens recomputed per decode step, each a row; F+N: F in "
        "the first decode step, then N (64,128,256)",
    )  # fmt: skip
    p.add_argument(
        "--repair-order", choices=REPAIR_ORDERS, default="score",
        help="focus-repair: the question's attention first (score) or position order",
    )  # fmt: skip
    p.add_argument(
        "--methods", default=",".join(FAMILIES),
        help=f"method families to run, of {','.join(FAMILIES)} (all; naive is the gap's base)",
    )  # fmt: skip
    p.add_argument(
        "--contexts", type=int, default=6,
        help="ctx-* methods: each chunk's KV is the mean of this many prefills among other "
        "documents of the corpus (6; 0 skips the ctx-* methods)",
    )  # fmt: skip
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument(
        "--random-llama",
        choices=sorted(RANDOM_LLAMAS),
        help="instead of SmolLM2: a Llama-shaped model with random bf16 weights on the GPU and "
        "random token ids (timings; agreement then only measures how close each method "
        "comes to the same model's full prefill)",
    )
    p.add_argument("--json", type=Path, help="write every number as JSON")
    p.add_argument("--plot", type=Path, help="write a PNG (needs matplotlib)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ratios = [float(x) / 100 for x in args.ratios.split(",") if x.strip()]
    try:
        repairs = [parse_repair(x) for x in args.repair.split(",") if x.strip()]
    except ValueError:
        print(f"bench_rag: --repair takes N or F+N, positive, not {args.repair!r}", file=sys.stderr)
        return 2
    families = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := set(families) - set(FAMILIES):
        print(f"bench_rag: unknown methods {sorted(unknown)}", file=sys.stderr)
        return 2
    if min(args.prompts, args.chunks, args.chunk_tokens) < 1 or args.contexts < 0:
        print("bench_rag: need positive sizes", file=sys.stderr)
        return 2
    if not args.contexts:
        families = [f for f in families if not f.startswith("ctx-")]
    if args.random_llama:
        if not torch.cuda.is_available():
            print("bench_rag: --random-llama needs a CUDA GPU", file=sys.stderr)
            return 2
        if args.chunks > args.pool:
            print("bench_rag: need --chunks <= --pool", file=sys.stderr)
            return 2
        model = random_llama(args.random_llama)
        prompts, others = random_prompts(
            model.config.vocab_size, args.prompts, args.chunks, args.chunk_tokens, args.pool
        )
        name = (
            f"random-weight Llama ({args.random_llama} shape, bf16, {torch.cuda.get_device_name()})"
        )
    else:
        try:
            model, tokenizer = load_smollm2()
        except (MissingModelDependency, FileNotFoundError) as exc:
            print(f"bench_rag: {exc}", file=sys.stderr)
            return 2
        try:
            prompts = rag_prompts(tokenizer, args.set, args.prompts, args.chunks, args.chunk_tokens)
            others = context_documents(tokenizer, args.chunk_tokens) if args.contexts else []
        except ValueError as exc:
            print(f"bench_rag: {exc}", file=sys.stderr)
            return 2
        name = "SmolLM2-135M-Instruct"
    rope = RopeConfig.from_hf(model.config)
    results = []
    namespace = NAMESPACE + (args.random_llama or "smollm2")
    prefix = prompts[0].prefix
    pool = {tuple(d): d for pr in prompts for d in pr.docs}
    # The arena is shared memory the server touches in full: as large as the chunks need
    # (SmolLM2: 73 values of ~16 MiB; the 8B shape: 36 of 64 MiB), no larger.
    arena, staging = ("8GiB", "2GiB") if args.random_llama else ("2GiB", "256MiB")
    with tempfile.TemporaryDirectory(prefix="kvbench-rag-") as tmp, running_kvstore(
        Path(tmp), "--tiers", "cpu", "--cpu-bytes", arena, "--max-value-bytes", staging,
        "--staging-bytes", staging,
    ) as address, KVClient(address, namespace) as client:  # fmt: skip
        cache = ChunkCache(client, rope)
        progress(f"prefilling and storing {len(pool)} chunks, alone and after the prefix")
        _, c = prefill(model, prefix)
        cache.put_chunk(prefix, kv_of(c).contiguous())
        for doc in pool.values():
            _, c = prefill(model, doc)
            cache.put_chunk(doc, kv_of(c).contiguous())
            _, c = prefill(model, prefix + doc)
            cache.put_chunk(doc, kv_of(c)[:, :, len(prefix) :].contiguous(), prefix=prefix)
        if any(f.startswith("ctx-") for f in families):
            most = max(1, args.chunks - 1)
            progress(
                f"prefilling each chunk among 1-{most} of {len(others)} other documents, "
                f"{args.contexts} times, and storing the means"
            )
            put_in_contexts(model, cache, prefix, list(pool.values()), others, args.contexts, most)
        # Untimed, a prompt of the same shape: loads the numba kernels, maps the arena and,
        # on a GPU, picks the kernels for these shapes, which the first timed prompt would
        # otherwise pay for (the first of four 8B prompts on the H100 took 10x longer).
        run_prompt(model, cache, prompts[0], ratios[:1], args.first, families, quiet=True)
        try:
            check = self_check(model, cache, list(pool.values())[:3])
        except RuntimeError as exc:
            print(f"bench_rag: check failed: {exc}", file=sys.stderr)
            return 1
        progress(f"self-check: recomputing every token reproduces a prefill within {check:.1e}")
        for i, prompt in enumerate(prompts):
            progress(f"prompt {i + 1}/{len(prompts)}")
            results.append(
                run_prompt(model, cache, prompt, ratios, args.first, families, False, repairs,
                           args.repair_order)
            )  # fmt: skip
    rows = summarize(results)
    tokens = [r.tokens for r in results]
    import transformers

    meta = {
        "model": name, "prompts": len(results), "chunks": args.chunks,
        "set": "random" if args.random_llama else args.set,
        "chunk_tokens": args.chunk_tokens, "tokens_min": min(tokens), "tokens_max": max(tokens),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "threads": torch.get_num_threads(), "self_check_rel_err": check,
        "random_weights": bool(args.random_llama), "contexts": args.contexts,
        "load": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
    }  # fmt: skip
    print(render(rows, meta))
    figures = {
        "meta": meta,
        "rows": rows,
        "prompts": [[vars(o) for o in r.outcomes] for r in results],
    }
    write_outputs(figures, args.json, args.plot, lambda path: write_plot(rows, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
