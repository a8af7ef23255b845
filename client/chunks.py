"""RAG chunk reuse: a document chunk's KV stored once under a key of its tokens alone, and
laid into any prompt at any position.

In retrieval-augmented generation the same documents come back in different orders and
places, so their KV is never a prefix hit. `ChunkCache` stores each chunk under
`kvstore.keys.doc_key` and, to reuse it, re-rotates its K from the positions it was
computed at to the ones it lands at (`kvstore.kernels.rerotate_k`: RoPE is a rotation by
position, so R(q) k = R(q - p) R(p) k). V does not depend on position. What the chunk's
tokens would have attended to in the new prompt is lost; an engine restores the most
important part by recomputing a few tokens (CacheBlend, EPIC).

- `put_chunk(token_ids, kv, position=0, prefix=None)`: store the KV of `token_ids`
  computed with the chunk starting at `position` (0: a chunk prefilled on its own). It is
  stored as if computed at 0 — re-rotated first when `position` is not 0 — so one stored
  copy serves every later position with one rotation. `prefix`: the tokens the chunk was
  prefilled after (a system prompt, say), whose KV is not part of `kv`; `position` is then
  their count.
- `get_chunks(token_id_lists, positions, out, stream=None, prefix=None)`: write chunk i's
  KV into `out[:, :, positions[i] : positions[i] + len(chunk i)]` re-rotated to those
  positions; `out` is the new prompt's KV (`[layers, 2, tokens, heads, head_dim]`, CPU or
  CUDA). The tokens between chunks (instructions, the question) are the engine's to
  compute. Returns which chunks were found; a missing one leaves its span of `out`
  untouched. `prefix`: find the chunks stored with that prefix.

- `put_chunk(..., in_context=True)`: `kv` was computed inside a prompt, with other
  documents between `prefix` and the chunk (at `position`): what an engine has after
  prefilling a prompt whose chunks were not cached. Each such put is merged into a running
  mean of every in-context KV put for these tokens (after that prefix), stored under a key
  of its own; `get_chunks(..., in_context=True)` finds the mean.

Which KV to reuse. A chunk's KV depends on what it was computed after; reused elsewhere,
its tokens lack what they would have attended to. Measured on SmolLM2-135M
(`benchmarks/NOTES-rag.md`): prefilled alone, each chunk carries an attention sink of its
own; prefilled right after the prompt's shared start (`prefix`), one sink, and the first
chunk after that start is exact; prefilled among other documents and averaged over a few
such contexts, the KV is what a chunk looks like somewhere in the middle of a RAG prompt,
and the reused KV comes closest to a prefill's (its first-token KL ~10x below the
prefix-only KV's at the same recompute budget). So: the first chunk after the prefix from
`prefix=`, the others from `in_context=True`.

The doc keys are salted with the namespace and the RoPE configuration, so a chunk computed
under other rotary settings is never found, let alone rotated wrongly, and with the prefix
its KV was computed after, so a chunk is only found as it was computed. Why a prefix: a
chunk prefilled alone makes its first token an attention sink, one per reused chunk, where
the whole prompt has only one; prefilled after the prompt's shared start (the chat
template's system turn), every chunk's KV is computed under the one sink the prompt will
have, and the first chunk after that start is exactly what a prefill of the prompt gives.

Which tokens to recompute: `recompute_by_deviation` (CacheBlend: the r% whose KV on an early
layer deviates most from a fresh prefill), `recompute_by_attention` (the r% the question
attends to most over the reused KV, best weighted by what an error in each token's KV
would cost, `weighted_attention`) and `recompute_first` (EPIC: the first N tokens of each
chunk) return their positions in the prompt.

Repairing while decoding (`RepairSchedule`): what was not recomputed before the first token
can be recomputed afterwards, a bounded number of tokens folded into each decode step (as
chunked prefill rides along with decoding), the most important first; the schedule says
which, and when the prompt's KV has become exactly what a prefill of it gives.

Keeping what is worth keeping (Cache-Craft): a server run with `--eviction gdsf` counts the
reads of every stored chunk and weighs them by the client's `recompute_cost`, so a chunk
that prompts keep retrieving outlives a newer one read once (`kvstore.policy.gdsf`).
"""

from __future__ import annotations

import importlib.util
import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kvstore.client.sync import KVClient
from kvstore.errors import InvalidArgument
from kvstore.kernels.drift import drift_cpu, drift_gpu
from kvstore.kernels.floatbits import WORD_KINDS, host_words
from kvstore.kernels.rope import RopeConfig, rerotate_k
from kvstore.keys import derived_key, doc_key
from kvstore.scratch import HostScratch

# The running mean's count of an in-context chunk lies under this part of its key.
_COUNT_TAG = b"in-context observations"
_SPREAD_TAG = b"in-context spread"


def _observed(count: torch.Tensor, counted: bool) -> int:
    """The observations in a stored in-context mean, from its count (`count[0]`, if
    `counted`): a mean whose count was lost (evicted apart from it) counts as one."""
    return max(1, int(count[0])) if counted else 1


class ChunkCache:
    """Document chunks of one model (`client`'s namespace, `rope`) in a kvstore server."""

    def __init__(self, client: KVClient, rope: RopeConfig) -> None:
        self.client = client
        self.rope = rope
        sc = rope.scaling
        settings = f"|rope:{rope.head_dim},{rope.rotary_dim},{rope.base!r},{rope.pairing}," + (
            "none" if sc is None else f"{sc!r}"
        )
        self._salt = client.namespace + settings
        self._scratch = HostScratch()  # where get_chunks' host chunks land

    def key(
        self,
        token_ids: Sequence[int] | np.ndarray,
        prefix: Sequence[int] | np.ndarray | None = None,
        in_context: bool = False,
    ) -> bytes:
        """The key a chunk of these tokens is stored under, prefilled alone (`prefix` None)
        or right after the tokens `prefix`; `in_context`: the mean of its KV computed among
        other documents (after `prefix`, if any)."""
        return doc_key(token_ids, self._salt_after(prefix, in_context))

    def _salt_after(self, prefix: Sequence[int] | np.ndarray | None, in_context: bool) -> str:
        salt = self._salt + ("|among documents" if in_context else "")
        if prefix is None or not np.asarray(prefix).size:
            return salt
        return salt + "|after:" + doc_key(prefix, self._salt).hex()

    def _check_kv(self, kv: torch.Tensor, what: str, contiguous: bool = True) -> tuple[int, ...]:
        if not isinstance(kv, torch.Tensor) or kv.dim() != 5 or kv.shape[1] != 2:
            shape = tuple(kv.shape) if isinstance(kv, torch.Tensor) else type(kv).__name__
            raise InvalidArgument(
                f"{what} must be KV [layers, 2, tokens, heads, head_dim], got {shape}"
            )
        if kv.shape[4] != self.rope.head_dim:
            raise InvalidArgument(
                f"{what} has head_dim {kv.shape[4]}; the RoPE configuration says "
                f"{self.rope.head_dim}"
            )
        if contiguous and not kv.is_contiguous():
            raise InvalidArgument(f"{what} must be contiguous")
        return tuple(kv.shape)

    def put_chunk(
        self,
        token_ids: Sequence[int] | np.ndarray,
        kv: torch.Tensor,
        position: int | None = None,
        prefix: Sequence[int] | np.ndarray | None = None,
        in_context: bool = False,
    ) -> str:
        """Store the KV of one document chunk, computed at `position` (default: 0, or after
        `prefix`, the tokens it was prefilled after: their count); returns the tier it
        landed in. `kv` stays unchanged.

        `in_context`: `kv` was computed inside a prompt, after `prefix` (if given) and other
        documents, the chunk at `position` (past the prefix). It is merged into the running
        mean of every in-context KV put for these tokens after that prefix: the stored
        value becomes old + (kv - old) / (n + 1), the count n + 1 kept beside it, and so
        does how far the observations spread around the mean (Welford's running sum of
        squared deviations, per layer, K or V, token and head: `spread()`). Two clients
        merging the same chunk at the same moment may lose one observation (each reads the
        mean, then writes its own update); a mean whose count was evicted counts as one
        observation, with no spread, and a spread lost alone starts again from zero."""
        tokens = np.asarray(token_ids)
        shape = self._check_kv(kv, "kv")
        if tokens.ndim != 1 or tokens.size != shape[2]:
            raise InvalidArgument(
                f"kv holds {shape[2]} tokens but the token ids have shape {tokens.shape}"
            )
        after = 0 if prefix is None else int(np.asarray(prefix).size)
        if position is None:
            position = after
        if position < 0:
            raise InvalidArgument(f"position must be >= 0, got {position}")
        if in_context and position < after:
            raise InvalidArgument(
                f"a chunk computed after {after} prefix tokens and other documents starts at "
                f"a position >= {after}, not {position}"
            )
        if prefix is not None and not in_context and position != after:
            raise InvalidArgument(
                f"a chunk prefilled after {after} prefix tokens starts at position {after}, "
                f"not {position}"
            )
        value = kv
        if position:
            value = torch.empty_like(kv)
            n = shape[2]
            event = rerotate_k(
                kv, np.arange(position, position + n), np.arange(n), self.rope, out=value
            )
            if event is not None:
                event.synchronize()
        key = self.key(tokens, prefix, in_context)
        if not in_context:
            return self._put(key, value)
        # The mean, its count and its spread: read in one call, written in one call.
        keys = [key, derived_key(key, _COUNT_TAG), derived_key(key, _SPREAD_TAG)]
        old, count = torch.empty_like(value), torch.zeros(1, dtype=torch.int64)
        squares = torch.zeros(shape[:4], dtype=torch.float32)
        has_mean, counted, spread = self.client.get_into(keys, [old, count, squares]).wait()
        if not (has_mean and counted and spread):
            # no spread yet, a spread lost alone, or one left from a mean since evicted
            squares.zero_()
        n = 0
        if has_mean:
            n = _observed(count, counted)
            new, mean = value.float(), old.float()
            delta = new - mean
            mean += delta / (n + 1)
            squares += (delta * (new - mean)).sum(-1).cpu()
            value = mean.to(kv.dtype)
        count[0] = n + 1
        return str(self.client.put_from(keys, [value, count, squares]).wait()[0])

    def _counts(self, keys: Sequence[bytes]) -> list[tuple[int, bool]]:
        """The observations in the stored in-context means under `keys`, in one round trip:
        each one's count, or 1 if the count was lost (evicted apart from the mean); and
        whether it was found."""
        counts = [torch.zeros(1, dtype=torch.int64) for _ in keys]
        found = self.client.get_into([derived_key(k, _COUNT_TAG) for k in keys], counts).wait()
        return [(_observed(c, hit), hit) for c, hit in zip(counts, found, strict=True)]

    def _put(self, key: bytes, value: torch.Tensor) -> str:
        if value.is_cuda:
            return str(self.client.put_from([key], [value]).wait()[0])
        return self.client.put(key, value)

    def observations(
        self,
        token_ids: Sequence[int] | np.ndarray,
        prefix: Sequence[int] | np.ndarray | None = None,
    ) -> int:
        """How many in-context KV the stored mean of these tokens (after `prefix`) holds: 0
        if none is stored."""
        key = self.key(token_ids, prefix, in_context=True)
        return self._counts([key])[0][0] if self.client.exists([key])[0] else 0

    def spread(
        self,
        token_id_lists: Sequence[Sequence[int] | np.ndarray],
        prefix: Sequence[int] | np.ndarray | None = None,
    ) -> list[torch.Tensor | None]:
        """How far the in-context KV merged into the stored mean of each chunk (after
        `prefix`) lay from it: the standard deviation over the observations of each token's
        K and V vectors (the root of the mean squared distance to the mean), float32 on the
        host, `[layers, 2, tokens, heads]`; None where fewer than two observations (or their
        spread) are stored. Two round trips for all the chunks. A token whose KV changes
        with the documents around it has a wide spread: its mean is the least reliable in
        a new prompt, the one to recompute (`weighted_attention`)."""
        keys = [self.key(ids, prefix, in_context=True) for ids in token_id_lists]
        counts = self._counts(keys)
        wanted = [i for i, (n, counted) in enumerate(counts) if counted and n > 1]
        squares = self.client.batch_get([derived_key(keys[i], _SPREAD_TAG) for i in wanted])
        spreads: list[torch.Tensor | None] = [None] * len(keys)
        for i, got in zip(wanted, squares, strict=True):
            if got is not None:  # NumPy: torch's ops woke its thread pool for each (an 8B
                # shape's 7 MB took 11-45 ms on a 16-core host), the same IEEE bits
                root = got.float().numpy() / np.float32(counts[i][0])
                spreads[i] = torch.from_numpy(np.sqrt(root, out=root))
        return spreads

    def _landing(self, out: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
        """Where the chunks land before they are rotated into `out`: in GPU memory fresh
        tensors (torch's allocator keeps its memory); in host memory views of this thread's
        scratch (`HostScratch`: a fresh 100 MB buffer page-faults its way in, ~18 ms of a
        ~60 ms get_chunks of 2k SmolLM2 tokens on a 2-core VM)."""
        if out.is_cuda:
            return [torch.empty(s, dtype=out.dtype, device=out.device) for s in shapes]
        sizes = [math.prod(s) for s in shapes]
        flat = self._scratch.tensor((sum(sizes),), out.dtype)
        return [part.view(s) for part, s in zip(flat.split(sizes), shapes, strict=True)]

    def get_chunks(
        self,
        token_id_lists: Sequence[Sequence[int] | np.ndarray],
        positions: Sequence[int],
        out: torch.Tensor,
        stream: Any = None,
        prefix: Sequence[int] | np.ndarray | None = None,
        in_context: bool = False,
    ) -> list[bool]:
        """Lay the stored chunks into `out` at `positions`, K re-rotated to them; returns
        which were found. `prefix`: the chunks stored as prefilled after these tokens;
        `in_context`: the means of their KV computed among other documents (after `prefix`).
        CUDA `out`: the copies and rotations run on `stream` (default: the current one) and
        are done when this returns. `out` may be a view (a heads-first cache transposed, say:
        each chunk is copied into it once)."""
        shape = self._check_kv(out, "out", contiguous=False)
        if len(token_id_lists) != len(positions):
            raise InvalidArgument(f"{len(token_id_lists)} chunks but {len(positions)} positions")
        spans = []
        for i, (ids, pos) in enumerate(zip(token_id_lists, positions, strict=True)):
            n = int(np.asarray(ids).size)
            if n == 0 or pos < 0 or pos + n > shape[2]:
                raise InvalidArgument(
                    f"chunk {i} ({n} tokens at position {pos}) does not fit out's {shape[2]} tokens"
                )
            spans.append((int(pos), n))
        order = sorted(range(len(spans)), key=lambda i: spans[i][0])
        for a, b in itertools.pairwise(order):
            if spans[a][0] + spans[a][1] > spans[b][0]:
                raise InvalidArgument(f"chunks {a} and {b} overlap in out")
        if not spans:
            return []
        layers, _, _, heads, dim = shape
        temps = self._landing(out, [(layers, 2, n, heads, dim) for _, n in spans])
        salt = self._salt_after(prefix, in_context)
        keys = [doc_key(ids, salt) for ids in token_id_lists]
        found = self.client.get_into(keys, temps, stream).wait()
        cuda = out.is_cuda
        torch_stream = (
            stream if stream is not None else (torch.cuda.current_stream() if cuda else None)
        )
        for (pos, n), temp, hit in zip(spans, temps, found, strict=True):
            if not hit:
                continue
            event = rerotate_k(
                temp, np.arange(n), np.arange(pos, pos + n), self.rope, stream=torch_stream
            )
            if cuda:
                assert event is not None
                with torch.cuda.stream(torch_stream):
                    out[:, :, pos : pos + n].copy_(temp, non_blocking=True)
            else:
                out[:, :, pos : pos + n].copy_(temp)
        if torch_stream is not None:
            torch_stream.synchronize()
        return found


# ------------------------------------------------------------------------------ recompute


def recompute_by_deviation(
    reused: torch.Tensor,
    fresh: torch.Tensor,
    ratio: float,
    spans: Sequence[tuple[int, int]] | None = None,
) -> np.ndarray:
    """CacheBlend's choice of tokens to recompute: those whose KV deviates most between the
    reused chunks (`get_chunks`' output) and a fresh prefill of the new prompt, on an early
    layer, where the deviation already shows which tokens lost the most cross-attention.

    `reused` and `fresh` are that layer's KV, `[2, tokens, heads, head_dim]` (or several
    layers, `[layers, 2, tokens, heads, head_dim]`, summed over). Returns the positions of
    the `ratio` share of the tokens with the largest deviation (L2 over K and V), sorted,
    chosen among the reused tokens (`spans`: (start, length) of each chunk in the prompt;
    None: every token). The engine recomputes these through all layers over the reused KV.
    """
    if reused.shape != fresh.shape or reused.dim() not in (4, 5):
        raise InvalidArgument(
            f"reused {tuple(reused.shape)} and fresh {tuple(fresh.shape)} must be one or more "
            "layers of KV of the same shape"
        )
    if not 0 <= ratio <= 1:
        raise InvalidArgument(f"ratio must be between 0 and 1, got {ratio}")
    tokens_dim = reused.dim() - 3
    diff = (reused.float() - fresh.float()).pow(2)
    other = [d for d in range(diff.dim()) if d != tokens_dim]
    return _top_share(diff.sum(dim=other).sqrt(), ratio, spans)


def recompute_by_attention(
    attention: torch.Tensor,
    ratio: float,
    spans: Sequence[tuple[int, int]] | None = None,
) -> np.ndarray:
    """The tokens the new part of the prompt (the question) looks at most: recomputing
    them gives its attention accurate KV where it lands (the idea behind Cache-Craft's and
    A3's focus on the query's attention). `attention` holds the attention weights of the
    question's tokens over the prompt's tokens, computed over the reused KV (one pass of
    the question alone), with the tokens last (`[..., tokens]`, e.g. `[layers, heads,
    question, tokens]`); they are summed over the rest. Returns the positions of the `ratio`
    share of the tokens (within `spans`, as `recompute_by_deviation`) with the most weight,
    sorted."""
    if attention.dim() < 1:
        raise InvalidArgument("attention must have a tokens dimension, the last")
    if not 0 <= ratio <= 1:
        raise InvalidArgument(f"ratio must be between 0 and 1, got {ratio}")
    score = attention.float().reshape(-1, attention.shape[-1]).sum(0)
    return _top_share(score, ratio, spans)


def weighted_attention(attention: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each token's share of the question's attention weighted by what an error in its
    reused KV would cost, for `recompute_by_attention`: the attention weight times a
    per-token, per-KV-head `weights`, summed over heads and question tokens.

    Attention alone overrates tokens that draw weight but change the output little (an
    attention sink's value is near zero). Two weights measured on SmolLM2
    (`benchmarks/NOTES-rag.md`): the norm of each token's value vector (`v.norm(dim=-1)`:
    what the token adds to the output, as VATP weighs tokens for KV pruning), for any
    reused KV; and, for in-context means, the spread of the token's V over the contexts
    it was seen in (`ChunkCache.spread`): how wrong the mean is likely to be where it
    lands, so weight times spread estimates the output's error from that token.

    `attention`: `[..., heads, question, tokens]`; `weights`: `[..., kv_heads, tokens]`,
    the same leading dimensions; grouped-query attention's head h reads KV head
    h // (heads / kv_heads). Returns `[..., tokens]`."""
    if attention.dim() < 3 or weights.dim() != attention.dim() - 1:
        raise InvalidArgument(
            "attention must be [..., heads, question, tokens] and weights [..., kv_heads, "
            f"tokens] with the same leading dimensions, got {tuple(attention.shape)} and "
            f"{tuple(weights.shape)}"
        )
    heads, kv_heads = attention.shape[-3], weights.shape[-2]
    if (
        not kv_heads
        or heads % kv_heads
        or weights.shape[-1] != attention.shape[-1]
        or weights.shape[:-2] != attention.shape[:-3]
    ):
        raise InvalidArgument(
            f"attention {tuple(attention.shape)} and weights {tuple(weights.shape)} do not "
            "match: need the same tokens and leading dimensions, and heads a multiple of "
            "kv_heads"
        )
    per_head = attention.float().sum(-2).unflatten(-2, (kv_heads, heads // kv_heads)).sum(-2)
    return (per_head * weights.float()).sum(-2)


def _top_share(
    score: torch.Tensor, ratio: float, spans: Sequence[tuple[int, int]] | None
) -> np.ndarray:
    """Sorted positions of the `ratio` share of the tokens in `spans` (None: all) with the
    largest `score` (`[tokens]`); ties go to the earlier token."""
    values = score.cpu().numpy()
    n = values.size
    pool = _span_positions(spans, n) if spans is not None else np.arange(n)
    k = round(ratio * pool.size)
    if k == 0:
        return np.empty(0, np.int64)
    top = pool[np.argsort(-values[pool], kind="stable")[:k]]
    return np.sort(top).astype(np.int64)


def recompute_first(spans: Sequence[tuple[int, int]], n: int) -> np.ndarray:
    """EPIC's choice: the first `n` tokens of each reused chunk (`spans`: (start, length)),
    where the attention-sink effect of a chunk prefilled on its own concentrates. Sorted
    positions in the prompt."""
    if n < 0:
        raise InvalidArgument(f"n must be >= 0, got {n}")
    picked = [np.arange(start, start + min(n, length)) for start, length in spans]
    return np.sort(np.concatenate(picked)).astype(np.int64) if picked else np.empty(0, np.int64)


# The share of the recomputed tokens' mean drift that `correct_drift` gives the rest of
# their chunk: chosen on bench_rag's fit set (0.5 against 1.0; NOTES-rag.md).
DRIFT_SHARE = 0.5


def correct_drift(
    layer_kv: torch.Tensor,
    fresh: torch.Tensor,
    picked: np.ndarray,
    spans: Sequence[tuple[int, int]],
    rope: RopeConfig,
    share: float = DRIFT_SHARE,
) -> None:
    """Move the reused KV of each chunk's tokens that are not recomputed by `share` of the
    mean drift of those that are, on one layer, in place.

    Recomputing a chunk's chosen tokens shows how far their reused KV was from what the
    prompt gives them (its drift); much of that drift is the chunk's as a whole (what the
    documents before it add to every token's hidden state), so the tokens left as reused
    are moved part of the way along the mean drift of their chunk's recomputed ones. Call
    it on each layer of the recompute pass, after computing the recomputed tokens' K and V
    and before writing them into the layer (their reused KV is read here) and before any
    token attends to the layer. K's drift is averaged unrotated (RoPE is a linear rotation
    per position: R(p) a - R(p) b = R(p)(a - b)) and rotated to each token it moves.
    `DriftCorrection` does the same with the indexes made once for every layer of a pass.

    `layer_kv`: the layer's KV `[2, tokens, heads, head_dim]` (a view will do), K rotated
    to each token's position; `fresh`: the recomputed tokens' `[2, len(picked), heads,
    head_dim]`, K rotated likewise; `picked`: their positions, sorted (positions outside
    `spans`, the question's, are left out of the means); `spans`: the reused chunks (start,
    length), each corrected from its own recomputed tokens (a chunk with none is left
    alone); `rope`: the model's rotary settings."""
    _check_layer(layer_kv)
    plan = DriftCorrection(picked, spans, layer_kv.shape[1], rope, layer_kv.device, share)
    plan.apply(layer_kv, fresh)


class DriftCorrection:
    """`correct_drift` for every layer of one recompute pass: the positions, the chunks'
    membership and the RoPE angles are the same on each layer, so they are laid out once
    (on `device`) and `apply` runs one numba call a layer on the host, two CuPy kernels on
    a GPU (`kvstore.kernels.drift`; torch ops where CuPy is missing), with no host round
    trip."""

    def __init__(
        self,
        picked: np.ndarray,
        spans: Sequence[tuple[int, int]],
        tokens: int,
        rope: RopeConfig,
        device: torch.device | str,
        share: float = DRIFT_SHARE,
    ) -> None:
        picked = np.asarray(picked, np.int64)
        if picked.ndim != 1 or (
            picked.size and (np.any(np.diff(picked) <= 0) or picked[0] < 0 or picked[-1] >= tokens)
        ):
            raise InvalidArgument(f"picked must be sorted distinct positions below {tokens}")
        if not 0 <= share <= 1:
            raise InvalidArgument(f"share must be between 0 and 1, got {share}")
        owner = np.full(picked.size, -1, np.int64)  # the moving chunk of each picked token
        self.ranges: list[tuple[int, int]] = []  # the moving chunks' positions
        for start, length in spans:
            _check_span(start, length, tokens)
        ordered = sorted((start, length) for start, length in spans if length)
        for (a, n), (b, _) in itertools.pairwise(ordered):
            if a + n > b:  # a token in two chunks would move twice
                raise InvalidArgument(f"span ({a}, {n}) overlaps the span starting at {b}")
        for start, length in spans:
            inside = (picked >= start) & (picked < start + length)
            if 0 < inside.sum() < length:  # some recomputed, some left: the rest moves
                owner[inside] = len(self.ranges)
                self.ranges.append((start, start + length))
        self.picked, self.rope, self.share, self.tokens = picked, rope, share, tokens
        self.moving = len(self.ranges) > 0 and share > 0
        self.host: tuple[np.ndarray, ...] | None = None  # the numba kernel's arguments
        self.gpu: tuple[torch.Tensor, ...] | None = None  # the CuPy kernels'
        if not self.moving:
            return
        members = np.flatnonzero(owner >= 0)
        counts = np.bincount(owner[members], minlength=len(self.ranges))
        moved = np.concatenate([np.arange(start, stop) for start, stop in self.ranges])
        parts = [picked, members, owner[members], counts, moved]
        # One copy to the device for all of them (each copy of its own would wait for the
        # device's queue), then views; the angles computed there, once a pass.
        flat = torch.from_numpy(np.concatenate(parts)).to(torch.device(device))
        where, members_t, owner_t, counts_t, moved_t = flat.split([p.size for p in parts])
        self.where, self.members, self.owner = where, members_t, owner_t
        self.counts = counts_t.float()
        self.cos_p, self.sin_p = _tables(rope, where)
        self.cos_t, self.sin_t = _tables(rope, moved_t)
        first, second = _pairs(rope)
        channels = np.arange(rope.head_dim)
        partner, sign = channels.copy(), np.zeros(rope.head_dim, np.float32)
        partner[first], partner[second] = channels[second], channels[first]
        sign[first], sign[second] = -1.0, 1.0
        is_picked = np.zeros(tokens, np.bool_)
        is_picked[picked] = True
        if flat.device.type == "cpu":
            starts, stops = np.array(self.ranges, np.int64).reshape(-1, 2).T
            self.host = (
                picked, owner, counts.astype(np.float32), starts, stops,
                self.cos_p.numpy(), self.sin_p.numpy(), self.cos_t.numpy(), self.sin_t.numpy(),
                partner, sign, is_picked,
            )  # fmt: skip
        elif flat.device.type == "cuda" and _has_cupy():
            # drift_gpu's arguments; a moving chunk's recomputed rows are consecutive (the
            # rows sorted by position, the chunks apart)
            lo = np.searchsorted(picked, [start for start, _ in self.ranges])
            bounds = np.stack([lo, lo + counts], 1).reshape(-1)
            chunk_of = np.concatenate(
                [np.full(stop - start, i) for i, (start, stop) in enumerate(self.ranges)]
            )
            small = [bounds, chunk_of, partner]
            ints = torch.from_numpy(np.concatenate(small).astype(np.int32)).to(flat.device)
            bounds_t, chunk_t, partner_t = ints.split([a.size for a in small])
            floats = np.concatenate([share / counts, sign]).astype(np.float32)
            scale_t, sign_t = (
                torch.from_numpy(floats).to(flat.device).split([counts.size, sign.size])
            )
            picked_t = torch.from_numpy(is_picked.view(np.uint8)).to(flat.device)
            self.gpu = (where, bounds_t, scale_t, moved_t, chunk_t, picked_t, self.cos_p,
                        self.sin_p, self.cos_t, self.sin_t, partner_t, sign_t)  # fmt: skip

    def apply(self, layer_kv: torch.Tensor, fresh: torch.Tensor) -> None:
        """`correct_drift` on one layer: `layer_kv` `[2, tokens, heads, head_dim]` (a view
        will do), `fresh` `[2, len(picked), heads, head_dim]`."""
        _check_layer(layer_kv)
        _, tokens, heads, dim = layer_kv.shape
        if tokens != self.tokens:  # the positions were checked against the plan's tokens
            raise InvalidArgument(
                f"layer_kv has {tokens} tokens; the correction was laid out for {self.tokens}"
            )
        if fresh.shape != (2, self.picked.size, heads, dim) or dim != self.rope.head_dim:
            raise InvalidArgument(
                f"fresh must be [2, {self.picked.size}, {heads}, {self.rope.head_dim}] (one "
                f"row per picked token, the RoPE's head_dim), got {tuple(fresh.shape)}"
            )
        if not self.moving:
            return
        if self.host is not None and not layer_kv.is_cuda:
            self._apply_host(layer_kv, fresh)
        elif self.gpu is not None and layer_kv.is_cuda and layer_kv.stride(3) == 1:
            self._apply_gpu(layer_kv, fresh)
        else:
            self._apply_torch(layer_kv, fresh)

    def _kind(self, layer_kv: torch.Tensor) -> int:
        kind = WORD_KINDS.get(str(layer_kv.dtype).removeprefix("torch."))
        if kind is None:
            raise InvalidArgument(
                f"layer_kv must be float32, float16 or bfloat16, not {layer_kv.dtype}"
            )
        return kind

    def _apply_gpu(self, layer_kv: torch.Tensor, fresh: torch.Tensor) -> None:
        assert self.gpu is not None
        kind = self._kind(layer_kv)
        if layer_kv.device != self.where.device:
            raise InvalidArgument(
                f"layer_kv is on {layer_kv.device}; the correction was laid out on "
                f"{self.where.device}"
            )
        _, _, heads, dim = layer_kv.shape
        values = fresh.to(layer_kv.device, torch.float32).contiguous()
        means = torch.empty((2, len(self.ranges), heads, dim), dtype=torch.float32,
                            device=layer_kv.device)  # fmt: skip
        (where, bounds, scale, moved, owner, picked, cos_p, sin_p, cos_t, sin_t, partner,
         sign) = self.gpu  # fmt: skip
        drift_gpu(layer_kv, kind, values, where, bounds, scale, moved, owner, picked, cos_p, sin_p,
                  cos_t, sin_t, partner, sign, means)  # fmt: skip

    def _apply_host(self, layer_kv: torch.Tensor, fresh: torch.Tensor) -> None:
        assert self.host is not None
        kind = self._kind(layer_kv)
        words = host_words(layer_kv)  # any strides: the layer's own memory
        values = fresh.float().contiguous().numpy()
        (
            where,
            owner,
            counts,
            starts,
            stops,
            cos_p,
            sin_p,
            cos_t,
            sin_t,
            partner,
            sign,
            is_picked,
        ) = self.host
        drift_cpu(words, kind, values, where, owner, counts, starts, stops, cos_p, sin_p,
                  cos_t, sin_t, partner, sign, self.share, is_picked)  # fmt: skip

    def _apply_torch(self, layer_kv: torch.Tensor, fresh: torch.Tensor) -> None:
        _, _, heads, dim = layer_kv.shape
        kept = layer_kv[:, self.where]  # a copy: the recomputed tokens' reused KV
        drift = fresh.float() - kept.float()  # [2, picked, heads, dim]
        k = drift[0]  # K's drift turned back to position 0: R(-p) x = x cos - swapped(x) sin
        drift[0] = k * self.cos_p[:, None] - _swapped(k, self.rope) * self.sin_p[:, None]
        sums = torch.zeros(
            (2, self.counts.numel(), heads, dim), dtype=torch.float32, device=drift.device
        )
        sums.index_add_(1, self.owner, drift[:, self.members])
        means = sums * (self.share / self.counts)[None, :, None, None]
        swapped = _swapped(means[0], self.rope)
        at = 0
        for i, (start, stop) in enumerate(self.ranges):  # slices of the layer, in place
            n = stop - start
            keys = layer_kv[0, start:stop]  # += R(p) mean: mean cos + swapped(mean) sin
            keys.addcmul_(self.cos_t[at : at + n, None], means[0, i])
            keys.addcmul_(self.sin_t[at : at + n, None], swapped[i])
            layer_kv[1, start:stop] += means[1, i]
            at += n
        layer_kv[:, self.where] = kept  # the recomputed tokens as they were: the caller's


def _has_cupy() -> bool:
    """Whether CuPy, which runs the GPU kernels, is installed (the torch ops stand in)."""
    return importlib.util.find_spec("cupy") is not None


def _tables(rope: RopeConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE's rotation at `positions` as two float32 `[len(positions), head_dim]` tables,
    `cos` and `sin` (from float64 angles, as `rerotate_k` makes them), each pair's angle on
    both its channels, and 1 and 0 on the channels past rotary_dim: a token's `x` turns to
    `x * cos + _swapped(x) * sin` (and back with `- sin`)."""
    inv = torch.from_numpy(rope.inv_freq()).to(positions.device, torch.float64)
    angle = positions.double()[:, None] * inv[None, :]
    first, second = _pairs(rope)
    tables = []
    for part, fill in ((angle.cos().float(), 1.0), (angle.sin().float(), 0.0)):
        table = torch.full(
            (positions.numel(), rope.head_dim), fill, dtype=torch.float32, device=positions.device
        )
        table[:, first], table[:, second] = part, part
        tables.append(table)
    return tables[0], tables[1]


def _pairs(rope: RopeConfig) -> tuple[slice, slice]:
    """The channels of each rotating pair's first and second member, as `rope` pairs them."""
    r = rope.rotary_dim
    assert r is not None
    if rope.pairing == "neox":
        return slice(0, r // 2), slice(r // 2, r)
    return slice(0, r, 2), slice(1, r, 2)


def _swapped(x: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """float32 `x` (`[..., head_dim]`) with each rotating pair (a, b) made (-b, a), and
    zero past rotary_dim: what RoPE's sine multiplies. A new tensor."""
    first, second = _pairs(rope)
    out = torch.zeros_like(x)
    out[..., first] = -x[..., second]
    out[..., second] = x[..., first]
    return out


def _check_layer(layer_kv: torch.Tensor) -> None:
    if layer_kv.dim() != 4 or layer_kv.shape[0] != 2:
        raise InvalidArgument(
            f"layer_kv must be [2, tokens, heads, head_dim], got {tuple(layer_kv.shape)}"
        )


def _check_span(start: int, length: int, tokens: int) -> None:
    if start < 0 or length < 0 or start + length > tokens:
        raise InvalidArgument(f"span ({start}, {length}) is outside the {tokens} tokens")


def _span_positions(spans: Sequence[tuple[int, int]], tokens: int) -> np.ndarray:
    parts = []
    for start, length in spans:
        _check_span(start, length, tokens)
        parts.append(np.arange(start, start + length))
    return np.unique(np.concatenate(parts)) if parts else np.empty(0, np.int64)


# ------------------------------------------------------------------------------ repair


class RepairSchedule:
    """Which stale KV to recompute at each decode step, `per_step` tokens at a time, so that
    the reused KV is repaired while the answer is generated and the time to the first
    token stays that of the recompute before it.

    `stale`: the prompt positions whose KV is not what a prefill of this prompt gives — the
    reused chunk tokens, and the tokens computed over them (the question's); every other
    position before them is taken to be exact (a prefix hit, say), and tokens after the
    prompt (the generated ones) keep their own KV. `scores`: each position's importance
    (`[tokens]`, indexed by position, e.g. the question's attention that chose the tokens
    recomputed before the first token, `recompute_by_attention`); None: position order.
    `recomputed`: stale positions already recomputed once over the reused KV (those
    recomputed with the question, and the question's own).

    `next()` hands out the positions for one step, sorted, and assumes the caller recomputes
    exactly those, all layers, in one causal pass over the cache (each attending to the
    positions before it: its fresh KV for those in the same pass, the cache's for the
    rest), writing their KV in place. Phase one: the stale positions never recomputed, the
    highest score first. A token recomputed while an earlier stale token still had reused
    KV is closer but not exact: its layers attended to that token's old KV. The positions
    with exact KV therefore always form the stale list's first `exact` entries, and phase
    two (the settling) recomputes the rest in position order, which makes each exact in
    turn; `done` then says the prompt's KV equals a prefill's (within float rounding). A
    step that ends phase one fills its remaining places from phase two. With `scores`
    None there is no phase one: one sweep in position order, from the first stale
    position that is not exact, recomputes each position once.
    """

    def __init__(
        self,
        stale: Sequence[int] | np.ndarray,
        per_step: int,
        scores: torch.Tensor | np.ndarray | None = None,
        recomputed: Sequence[int] | np.ndarray = (),
    ) -> None:
        if per_step < 0:
            raise InvalidArgument(f"per_step must be >= 0, got {per_step}")
        self.per_step = per_step
        self.stale = np.unique(np.asarray(stale, dtype=np.int64))
        if self.stale.size and self.stale[0] < 0:
            raise InvalidArgument(f"stale positions must be >= 0, got {self.stale[0]}")
        done = np.unique(np.asarray(recomputed, dtype=np.int64))
        if not np.isin(done, self.stale).all():
            raise InvalidArgument("recomputed positions must be among the stale ones")
        fresh = self.stale[~np.isin(self.stale, done)]
        if scores is None:
            fresh = fresh[:0]
        else:
            values = scores.float().cpu().numpy() if isinstance(scores, torch.Tensor) else scores
            values = np.asarray(values, dtype=np.float64)
            if values.ndim != 1 or (self.stale.size and values.size <= self.stale[-1]):
                raise InvalidArgument(
                    f"scores must be one value per position, up to {self.stale[-1]}, "
                    f"got shape {values.shape}"
                )
            fresh = fresh[np.argsort(-values[fresh], kind="stable")]
        self._first: list[int] = fresh.tolist()[::-1]  # popped from the end: best first
        # What was recomputed in one pass before any step: exact up to its first gap.
        self.exact = 0
        self.exact = self._exact_after(done)

    def _exact_after(self, batch: np.ndarray) -> int:
        """How many stale positions are exact once `batch` is recomputed in one pass: the
        exact ones so far, then as many following ones as the batch holds without a gap."""
        inside = np.isin(self.stale[self.exact :], batch)
        return self.exact + (inside.size if inside.all() else int(np.argmin(inside)))

    @property
    def done(self) -> bool:
        """Every stale position is exact: there is nothing left to hand out."""
        return self.exact == self.stale.size

    def next(self, count: int | None = None) -> np.ndarray:
        """The sorted positions to recompute in this step, `count` of them (default
        `per_step`; fewer at the end, none once `done`). A larger `count` on the first step
        front-loads the repair: the next token sees more of it, for a slower step."""
        count = self.per_step if count is None else count
        if count < 0:
            raise InvalidArgument(f"count must be >= 0, got {count}")
        take = [self._first.pop() for _ in range(min(count, len(self._first)))]
        room = count - len(take)
        if room and not self._first:
            settle = self.stale[self.exact :]
            settle = settle[~np.isin(settle, take)][:room]
            take += settle.tolist()
        batch = np.sort(np.asarray(take, dtype=np.int64))
        self.exact = self._exact_after(batch)
        return batch
