"""The drift correction of reused chunks (`kvstore.client.chunks.DriftCorrection`) on one
layer of host KV, in one numba call.

On each layer of a recompute pass, every token of a reused chunk that the pass does not
recompute moves `share` of the mean drift (fresh minus reused KV) of the chunk's recomputed
tokens; K's drift is averaged turned back to position 0 and turned to each token's own.
On the GPU that is a handful of torch kernels a layer (`DriftCorrection`); on the host the
same as torch ops cost ~3 ms a layer of SmolLM2's (30 small ops, each waking the thread
pool), this ~0.8 ms (2,000 moving tokens, one core).

Both compute in float32: a token's moved K is K + (m cos + swapped(m) sin) with m the
chunk's mean, rounded once to the layer's dtype (torch adds the two products in two
steps: the results agree to float32 rounding, not to the bit).
"""

from __future__ import annotations

import numba
import numpy as np

from kvstore.kernels.floatbits import (
    WORDS_F16,
    WORDS_F32,
    bf16_to_f32,
    f16_to_f32,
    f32_to_bf16,
    f32_to_f16,
)


@numba.njit(cache=True, nogil=True, inline="always")
def _load(words: np.ndarray, i: int, t: int, h: int, d: int, kind: int) -> np.float32:
    w = words[i, t, h, d]
    if kind == WORDS_F32:
        return np.uint32(w).view(np.float32)
    if kind == WORDS_F16:
        return f16_to_f32(w)
    return bf16_to_f32(w)


@numba.njit(cache=True, nogil=True, inline="always")
def _store(words: np.ndarray, i: int, t: int, h: int, d: int, x: np.float32, kind: int) -> None:
    if kind == WORDS_F32:
        words[i, t, h, d] = np.float32(x).view(np.uint32)
    elif kind == WORDS_F16:
        words[i, t, h, d] = f32_to_f16(x, False)
    else:
        words[i, t, h, d] = f32_to_bf16(x)


@numba.njit(cache=True, nogil=True)
def drift_cpu(
    kv: np.ndarray,
    kind: int,
    fresh: np.ndarray,
    where: np.ndarray,
    owner: np.ndarray,
    counts: np.ndarray,
    starts: np.ndarray,
    stops: np.ndarray,
    cos_p: np.ndarray,
    sin_p: np.ndarray,
    cos_t: np.ndarray,
    sin_t: np.ndarray,
    partner: np.ndarray,
    sign: np.ndarray,
    share: float,
    picked: np.ndarray,
) -> None:
    """Move one layer's reused tokens, in place.

    `kv`: the layer's words `[2, tokens, heads, head_dim]` (uint32 for float32, uint16 for
    float16 / bfloat16: `kind`, `floatbits.WORD_KINDS`; any strides). `fresh`: float32
    `[2, len(where), heads, head_dim]`, the recomputed tokens' KV, at positions `where`;
    `owner`: each one's moving chunk (-1: none), chunk c spanning `starts[c]:stops[c]`
    with `counts[c]` recomputed tokens. `cos_p`, `sin_p` (`[len(where), head_dim]`) and
    `cos_t`, `sin_t` (`[moving tokens, head_dim]`, the chunks' tokens in order) are RoPE's
    tables at those positions; channel d's partner in its pair is `partner[d]`, with
    `sign[d]` (-1 first, +1 second, 0 past rotary_dim): swapped(x)[d] = sign[d] x[partner[d]].
    Tokens with `picked[t]` (the recomputed ones) are left as they are."""
    chunks, heads, dim = starts.size, fresh.shape[2], fresh.shape[3]
    mk = np.zeros((chunks, heads, dim), np.float32)
    mv = np.zeros((chunks, heads, dim), np.float32)
    dk = np.empty(dim, np.float32)
    for i in range(where.size):
        c = owner[i]
        if c < 0:
            continue
        p = where[i]
        for h in range(heads):
            for d in range(dim):
                dk[d] = fresh[0, i, h, d] - _load(kv, 0, p, h, d, kind)
            for d in range(dim):  # turned back: x cos - swapped(x) sin
                mk[c, h, d] += dk[d] * cos_p[i, d] - sign[d] * dk[partner[d]] * sin_p[i, d]
                mv[c, h, d] += fresh[1, i, h, d] - _load(kv, 1, p, h, d, kind)
    for c in range(chunks):
        f = np.float32(share / counts[c])
        for h in range(heads):
            for d in range(dim):
                mk[c, h, d] *= f
                mv[c, h, d] *= f
    j = 0
    for c in range(chunks):
        for t in range(starts[c], stops[c]):
            if not picked[t]:
                for h in range(heads):
                    for d in range(dim):
                        turned = (
                            cos_t[j, d] * mk[c, h, d] + sin_t[j, d] * sign[d] * mk[c, h, partner[d]]
                        )
                        _store(kv, 0, t, h, d, _load(kv, 0, t, h, d, kind) + turned, kind)
                        _store(kv, 1, t, h, d, _load(kv, 1, t, h, d, kind) + mv[c, h, d], kind)
            j += 1
