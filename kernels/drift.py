"""The drift correction of reused chunks (`kvstore.client.chunks.DriftCorrection`) on one
layer: one numba call on the host (`drift_cpu`), two CuPy kernels on a GPU (`drift_gpu`).

On each layer of a recompute pass, every token of a reused chunk that the pass does not
recompute moves `share` of the mean drift (fresh minus reused KV) of the chunk's recomputed
tokens; K's drift is averaged turned back to position 0 and turned to each token's own.
As torch ops that is ~40 small kernels a layer (`DriftCorrection._apply_torch`): on the host
~3 ms a layer of SmolLM2's (each waking the thread pool), where `drift_cpu` takes ~0.8 ms
(2,000 moving tokens, one core); on a GPU ~1 ms of launches a layer, where `drift_gpu`
launches two kernels.

Both compute in float32: a token's moved K is K + (m cos + swapped(m) sin) with m the
chunk's mean, rounded once to the layer's dtype (torch adds the two products in two
steps: the results agree to float32 rounding, not to the bit).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from kvstore.kernels._cuda import KernelModule
from kvstore.kernels.blocks import as_cupy_stream
from kvstore.kernels.floatbits import (
    CUDA_FLOATBITS,
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


# ------------------------------------------------------------------------------ GPU

_CUDA_SOURCE = r"""
// The numba twin's two loops as two kernels, in float32. The layer's KV is words of KIND
// at `plane` (K to V), `tok` and `head` element strides, channels contiguous.
//
// drift_means: a CTA per (chunk, head-group), a thread per channel of a head; each sums,
// in the twin's order, its channel's drift over the chunk's recomputed tokens (rows
// bounds[2c] to bounds[2c + 1] of `fresh`), K's turned back to position 0, times scale[c]
// (share / count).
template <int KIND>
__device__ __forceinline__ void means(const void* kv_, long long plane, long long tok,
                                      long long head, const float* fresh, const long long* where,
                                      const int* bounds, const float* cos_p, const float* sin_p,
                                      const int* partner, const float* sign, const float* scale,
                                      float* out, int rows, int chunks, int heads, int dim) {
    typedef typename Word<KIND>::T T;
    const T* kv = (const T*)kv_;
    const int c = blockIdx.x, d = threadIdx.x, h = blockIdx.y * blockDim.y + threadIdx.y;
    if (h >= heads || d >= dim) return;
    const int q = partner[d];
    const float sg = sign[d];
    float sk = 0.f, sv = 0.f;
    for (int i = bounds[2 * c]; i < bounds[2 * c + 1]; ++i) {
        const long long at = where[i] * tok + h * head;
        const float* f = fresh + ((long long)i * heads + h) * dim;
        const float* fv = f + (long long)rows * heads * dim;
        const float dk = f[d] - Word<KIND>::load(kv[at + d]);
        const float dq = f[q] - Word<KIND>::load(kv[at + q]);
        sk += dk * cos_p[(long long)i * dim + d] - sg * dq * sin_p[(long long)i * dim + d];
        sv += fv[d] - Word<KIND>::load(kv[plane + at + d]);
    }
    const long long o = ((long long)c * heads + h) * dim + d;
    out[o] = sk * scale[c];
    out[(long long)chunks * heads * dim + o] = sv * scale[c];
}

// drift_move: a CTA per (moving token j, head-group), a thread per channel: token moved[j]
// of chunk owner[j], unless recomputed, moves by its chunk's means, K's turned to it.
template <int KIND>
__device__ __forceinline__ void move(void* kv_, long long plane, long long tok, long long head,
                                     const float* mean, const long long* moved, const int* owner,
                                     const unsigned char* picked, const float* cos_t,
                                     const float* sin_t, const int* partner, const float* sign,
                                     int chunks, int heads, int dim) {
    typedef typename Word<KIND>::T T;
    T* kv = (T*)kv_;
    const long long j = blockIdx.x;
    const int d = threadIdx.x, h = blockIdx.y * blockDim.y + threadIdx.y;
    const long long t = moved[j];
    if (h >= heads || d >= dim || picked[t]) return;
    const long long m = ((long long)owner[j] * heads + h) * dim;
    const float turned = cos_t[j * dim + d] * mean[m + d]
                         + sin_t[j * dim + d] * sign[d] * mean[m + partner[d]];
    const float dv = mean[(long long)chunks * heads * dim + m + d];
    const long long at = t * tok + h * head + d;
    kv[at] = Word<KIND>::store(Word<KIND>::load(kv[at]) + turned);
    kv[plane + at] = Word<KIND>::store(Word<KIND>::load(kv[plane + at]) + dv);
}

#define ENTRIES(KIND, NAME)                                                                   \
    extern "C" __global__ void drift_means_##NAME(                                            \
        const void* kv, long long plane, long long tok, long long head, const float* fresh,   \
        const long long* where, const int* bounds, const float* cos_p, const float* sin_p,        \
        const int* partner, const float* sign, const float* scale, float* out, int rows,      \
        int chunks, int heads, int dim) {                                                     \
        means<KIND>(kv, plane, tok, head, fresh, where, bounds, cos_p, sin_p, partner, sign,      \
                    scale, out, rows, chunks, heads, dim);                                    \
    }                                                                                         \
    extern "C" __global__ void drift_move_##NAME(                                             \
        void* kv, long long plane, long long tok, long long head, const float* mean,          \
        const long long* moved, const int* owner, const unsigned char* picked,                \
        const float* cos_t, const float* sin_t, const int* partner, const float* sign,        \
        int chunks, int heads, int dim) {                                                     \
        move<KIND>(kv, plane, tok, head, mean, moved, owner, picked, cos_t, sin_t, partner,   \
                   sign, chunks, heads, dim);                                                 \
    }
ENTRIES(0, f32)
ENTRIES(1, f16)
ENTRIES(2, bf16)
"""

_WORDS = ("f32", "f16", "bf16")
_module = KernelModule(
    CUDA_FLOATBITS + _CUDA_SOURCE,
    tuple(f"drift_{step}_{word}" for step in ("means", "move") for word in _WORDS),
)


def drift_gpu(
    kv: Any,
    kind: int,
    fresh: Any,
    where: Any,
    bounds: Any,
    scale: Any,
    moved: Any,
    owner: Any,
    picked: Any,
    cos_p: Any,
    sin_p: Any,
    cos_t: Any,
    sin_t: Any,
    partner: Any,
    sign: Any,
    means: Any,
    stream: Any = None,
) -> None:
    """`drift_cpu` on a CUDA layer, two kernels on `stream` (default: torch's current).
    Torch tensors on one device: `kv` the layer `[2, tokens, heads, head_dim]` of `kind`
    (channels contiguous, any other strides); `fresh` float32 `[2, rows, heads, head_dim]`
    contiguous; `where` (int64) the rows' positions; `bounds` (int32, 2 per chunk) each moving
    chunk's rows `bounds[2c]:bounds[2c + 1]` (the rows sorted by position, so a chunk's
    are consecutive); `scale` (float32) share / count per chunk; `moved` (int64) the moving
    chunks' tokens in order and `owner` (int32) each one's chunk; `picked` (uint8, per
    token) the recomputed; the RoPE tables, `partner` (int32) and `sign` (float32) as
    `drift_cpu` takes them; `means` float32 `[2, chunks, heads, head_dim]`, scratch."""
    import cupy
    import torch

    _, _, heads, dim = kv.shape
    chunks, rows, count = scale.numel(), fresh.shape[1], moved.numel()
    per = max(1, min(heads, 1024 // dim))  # heads a CTA
    groups = -(-heads // per)
    plane, tok, head = (int(x) for x in kv.stride()[:3])
    word = _WORDS[kind]
    device = kv.device.index
    s = as_cupy_stream(stream if stream is not None else torch.cuda.current_stream(kv.device))
    ptr = [np.uint64(t.data_ptr()) for t in (kv, fresh, where, bounds, cos_p, sin_p, partner, sign)]
    with cupy.cuda.Device(device):
        if chunks:
            _module.get(device, f"drift_means_{word}")(
                (chunks, groups), (dim, per),
                (ptr[0], np.int64(plane), np.int64(tok), np.int64(head), ptr[1], ptr[2],
                 ptr[3], ptr[4], ptr[5], ptr[6], ptr[7], np.uint64(scale.data_ptr()),
                 np.uint64(means.data_ptr()), np.int32(rows), np.int32(chunks),
                 np.int32(heads), np.int32(dim)),
                stream=s,
            )  # fmt: skip
        if count:
            _module.get(device, f"drift_move_{word}")(
                (count, groups), (dim, per),
                (ptr[0], np.int64(plane), np.int64(tok), np.int64(head),
                 np.uint64(means.data_ptr()), np.uint64(moved.data_ptr()),
                 np.uint64(owner.data_ptr()), np.uint64(picked.data_ptr()),
                 np.uint64(cos_t.data_ptr()), np.uint64(sin_t.data_ptr()), ptr[6], ptr[7],
                 np.int32(chunks), np.int32(heads), np.int32(dim)),
                stream=s,
            )  # fmt: skip
