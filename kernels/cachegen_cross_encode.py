"""`cachegen-x` encoding on the GPU: bit for bit the payload the host encoder
(`kvstore.codecs.cachegen_cross.CacheGenX`) makes of the same value at the same position,
and the checksum of the value it decodes to.

The host encoder's structure, run on the GPU for a batch of values of one shape and dtype
(their positions, and levels, may differ):

1. `channels`: the channels the maps read, `[layers, rows, 2 * heads * head_dim]` in
   float32 (a row a token of a value): K with RoPE undone by the decoders' cos / sin tables
   (the host's, copied) and V, each product and sum rounded as the host's `_channels`
   rounds them; a value past float16's range, or a channel, is refused as there.
2. Layer by layer (closed loop): the product of the layer below as decoded (integers) by
   the layer's map, the GEMMs the GPU decoder runs (`kvstore.kernels.cachegen_cross`), then
   `quantize_x`, a CTA per unit (value, K/V, head) as the host's `_code_unit`: groups of a
   thread a channel read tiles of the residuals from the prediction into shared memory side
   by side, one group sums them in token order (float64, the host's order), thread 0 the
   head's step from the spreads (in channel order), then every group codes tokens of its
   own: the symbols, the escapes (every value of the first token, and those past their
   channel's reach) in their places, the channels as decoded (written over the inputs) and
   as the next layer's integer inputs. With kv maps, K's units, the kv GEMM, then V's
   units, as the decoder runs them. Once every layer is done, `finish` (a CTA per unit)
   counts each unit's symbols and gathers its escapes in token then channel order, as the
   decoders rank them.
3. `output`: the decoded channels with RoPE applied back to K, in the value's dtype: the
   value the payload decodes to, whose XXH3-64 is the container's checksum.

Then the rANS tables, streams and framing are cachegen's GPU encoder's
(`kvstore.kernels.cachegen_encode.code_batch`), each payload after its position (u64).

Steps 1 to 3 (~120 launches for SmolLM2's 30 layers, with the finishing `finish`) are one
CUDA graph, captured for the first batch of a shape, count, dtype and maps and launched for
the next ones in the same buffers (`_Plan`; the GEMMs through `kvstore.kernels._cublas`,
which CuPy's own cuBLAS calls are not while a stream is captured). Launched one by one
from Python, their host time was most of a batch's, and two threads encoding side by side
waited on each other's GIL for each (H200, ten 256-token chunks: 8.25 -> 7.4 ms a batch
alone; two threads 3.0 -> 5.8 GB/s, 12.2 with `kvstore.threads.short_gil_turns`).

Float arithmetic is written with explicit round-to-nearest intrinsics, as in
`kernels/cachegen_encode.py`: NVRTC would otherwise fuse a multiply and an add.
"""

from __future__ import annotations

import collections
import struct
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from kvstore.kernels import _cublas
from kvstore.kernels._cuda import KernelModule, align, keeps_scratch
from kvstore.kernels.blocks import as_cupy_stream
from kvstore.kernels.cachegen_cross import _device_maps, _int8_gemm, _kv_product, _product
from kvstore.kernels.cachegen_encode import (
    _download,
    _own_stream,
    _refusal,
    _upload,
    code_batch,
    encode_source,
    in_groups,
    quantized_buffers,
    stage_values,
)

if TYPE_CHECKING:
    import torch

    from kvstore.codecs.cachegen_cross import CacheGenX

_CUDA_SOURCE = r"""
#define BAD_CHANNEL 1
#define BAD_VALUE 2

// Where thread i of `channels` and `output` works, a thread per (value, layer, token, head,
// pair of K channels d and d + dim / 2): its K channel d in the value (a slot of `stride`
// elements each, [layers, 2, tokens, heads, dim]), its V channel d there, K's channel d in
// ch [layers, rows, C] and its token's cos / sin [rows, dim / 2]; false past the last.
struct Pair {
    long long value, k_at, v_at, ch_at, trig;
};
__device__ __forceinline__ bool pair_of(long long values, long long layers, long long tokens,
                                        long long heads, long long dim, long long stride,
                                        Pair* p) {
    const long long half = dim / 2;
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= values * layers * tokens * heads * half) return false;
    const long long d = i % half, h = i / half % heads, t = i / (half * heads) % tokens;
    const long long ly = i / (half * heads * tokens) % layers;
    const long long b = i / (half * heads * tokens * layers);
    const long long width = heads * dim, row = b * tokens + t;
    p->value = b;
    p->k_at = b * stride + ((ly * 2) * tokens + t) * width + h * dim + d;
    p->v_at = p->k_at + tokens * width;
    p->ch_at = (ly * values * tokens + row) * 2 * width + h * dim + d;
    p->trig = row * half + d;
    return true;
}

// A thread per (value, layer, token, head, pair of K channels d and d + dim / 2): the
// channels as the host's `_channels` computes them, into ch [layers, rows, C] (C = 2 heads
// dim, K's heads then V's); bad[value] = BAD_VALUE for a value past float16's range, else
// BAD_CHANNEL for a K channel past it (the largest found).
extern "C" __global__ void channels(const char* __restrict__ words, long long stride,
                                    int kind, long long values, long long layers,
                                    long long tokens, long long heads, long long dim,
                                    const float* __restrict__ cosines,
                                    const float* __restrict__ sines, float unscale,
                                    float* __restrict__ ch, int* __restrict__ bad) {
    Pair p;
    if (!pair_of(values, layers, tokens, heads, dim, stride, &p)) return;
    const long long half = dim / 2, width = heads * dim;
    const float a = load_value(words, kind, p.k_at), c = load_value(words, kind, p.k_at + half);
    const float v0 = load_value(words, kind, p.v_at);
    const float v1 = load_value(words, kind, p.v_at + half);
    const float co = cosines[p.trig], si = sines[p.trig];
    const float lo = __fmul_rn(__fadd_rn(__fmul_rn(a, co), __fmul_rn(c, si)), unscale);
    const float hi = __fmul_rn(__fsub_rn(__fmul_rn(c, co), __fmul_rn(a, si)), unscale);
    float* out = ch + p.ch_at;
    out[0] = lo;
    out[half] = hi;
    out[width] = v0;
    out[width + half] = v1;
    const bool value = !(fabsf(a) <= F16_MAX && fabsf(c) <= F16_MAX && fabsf(v0) <= F16_MAX &&
                         fabsf(v1) <= F16_MAX);
    const bool channel = !(fabsf(lo) <= F16_MAX && fabsf(hi) <= F16_MAX);
    if (value) atomicMax(bad + p.value, BAD_VALUE);
    else if (channel) atomicMax(bad + p.value, BAD_CHANNEL);
}

// Token t's residual from the prediction: x - float32(acc * out_scale), or x (no product).
template <typename A>
__device__ __forceinline__ float residual_at(const float* xd, const A* ad, double oscale,
                                             long long t, long long C) {
    const float pred = ad ? (float)__dmul_rn((double)ad[t * C], oscale) : 0.f;
    return __fsub_rn(xd[t * C], pred);
}

// A CTA per (value, unit j of units lo.., K's heads then V's) of layer `layer`: the host's
// `_code_unit` but for its counts and escapes' order, which `finish` makes once every layer
// is done. The CTA is `groups` groups of `lanes` threads (a thread a channel, dim rounded up
// to warps): the groups read tiles of tokens' residuals into shared memory side by side,
// group 0 sums them per channel in token order (float64, as the host), then every group
// quantizes tokens of its own. x: the layer's channels [rows, C], overwritten with them as
// decoded; acc: the map's product [rows, C] (null: no prediction), out_scale [C] its scale;
// next: the decoded channels as the next map's inputs [rows, C], rint(x * in_scale) clipped
// to +-limit; res: per value, the resolutions [layers, 2, heads]. An escape's float16 bits
// go to its place in its unit's region of tokens * dim of `escapes`.
#define TILE_FLOATS 8192
template <typename A, typename N>
__device__ __forceinline__ void quantize_x_body(
    float* __restrict__ x, const A* __restrict__ acc, const double* __restrict__ out_scale,
    N* __restrict__ next, const float* __restrict__ in_scale, float limit,
    const float* __restrict__ res, long long layer, long long layers, long long unit_lo,
    long long n_units, long long tokens, long long heads, long long dim, long long padded,
    unsigned short* __restrict__ starts, unsigned short* __restrict__ steps,
    unsigned char* __restrict__ symbols, unsigned short* __restrict__ escapes) {
    __shared__ float tile[TILE_FLOATS];
    __shared__ float spreads[1024];
    __shared__ float start_of[1024];
    __shared__ float head_rms;
    const long long b = blockIdx.x / n_units, j = unit_lo + blockIdx.x % n_units;
    const long long kv = j / heads, h = j % heads;
    const long long nu = layers * 2 * heads;
    const long long u = b * nu + (layer * 2 + kv) * heads + h;
    const long long C = 2 * heads * dim, at = (kv * heads + h) * dim;
    const long long row0 = b * tokens;
    const int lanes = (int)((dim + 31) / 32 * 32), groups = blockDim.x / lanes;
    const int g = threadIdx.x / lanes, d = threadIdx.x % lanes;
    const long long per_tile = TILE_FLOATS / lanes;
    const bool mine = d < dim;
    const double oscale = (mine && acc) ? out_scale[at + d] : 0.0;
    float* xd = x + row0 * C + at + d;
    const A* ad = acc ? acc + row0 * C + at + d : nullptr;
    // The residuals' mean (pass 0) and spread (pass 1), the first token left out.
    const long long lo = tokens > 1 ? 1 : 0;
    const double n = (double)(tokens - lo > 1 ? tokens - lo : 1);
    double mean = 0.0, sq = 0.0;
    for (int pass = 0; pass < 2; ++pass) {
        for (long long t0 = lo; t0 < tokens; t0 += per_tile) {
            const long long n_t = min(per_tile, tokens - t0);
            if (mine) {
#pragma unroll 8
                for (long long k = g; k < n_t; k += groups)
                    tile[k * lanes + d] = residual_at(xd, ad, oscale, t0 + k, C);
            }
            __syncthreads();
            if (g == 0 && mine) {
                if (pass == 0) {
#pragma unroll 8
                    for (long long k = 0; k < n_t; ++k)
                        mean = __dadd_rn(mean, (double)tile[k * lanes + d]);
                } else {
#pragma unroll 8
                    for (long long k = 0; k < n_t; ++k) {
                        const double e = __dsub_rn((double)tile[k * lanes + d], mean);
                        sq = __dadd_rn(sq, __dmul_rn(e, e));
                    }
                }
            }
            __syncthreads();
        }
        if (pass == 0) mean = __ddiv_rn(mean, n);
    }
    if (g == 0 && mine) {
        const float spread = (float)__dsqrt_rn(__ddiv_rn(sq, n));
        spreads[d] = spread;
        const u32 bits = f32_to_f16_sat((float)mean);
        starts[u * dim + d] = (unsigned short)bits;
        start_of[d] = f16_to_f32(bits);
    }
    __syncthreads();
    if (threadIdx.x == 0) {  // the head's step: the channels' spreads, root mean square, in order
        float r = 0.f;
        for (long long c = 0; c < dim; ++c) r = __fadd_rn(r, __fmul_rn(spreads[c], spreads[c]));
        head_rms = (float)__dsqrt_rn(__ddiv_rn((double)r, (double)dim));
    }
    __syncthreads();
    if (!mine) return;
    const float rv = res[(b * layers + layer) * 2 * heads + j];
    const u32 step_bits = f32_to_f16_sat(__fdiv_rn(head_rms, rv));
    if (g == 0) steps[u * dim + d] = (unsigned short)step_bits;
    const float step = f16_to_f32(step_bits), start = start_of[d];
    const float inv = step > 0.f ? __fdiv_rn(1.f, step) : 0.f;
    const double f =
        ceil(__dmul_rn(__dmul_rn(OUTLIER_SPREADS, (double)spreads[d]), (double)inv));
    const float far = (float)fmin(fmax(f, 1.0), (double)REACH);
    const float iscale = in_scale[at + d];
    unsigned char* sym = symbols + u * padded * dim + d;
    unsigned short* esc_out = escapes + u * tokens * dim + d;
    N* nx = next ? next + row0 * C + at + d : nullptr;
#pragma unroll 8
    for (long long t = g; t < tokens; t += groups) {
        const float xt = xd[t * C];
        const float pred = ad ? (float)__dmul_rn((double)ad[t * C], oscale) : 0.f;
        const float base = __fadd_rn(pred, start);
        const float residual = __fsub_rn(xt, base);
        float q = rintf(__fmul_rn(residual, inv));
        const bool esc = fabsf(q) > far || (step == 0.f && residual != 0.f) || t == 0;
        q = fminf(fmaxf(q, -far), far);
        sym[t * dim] = (unsigned char)(esc ? 0 : (int)q + CENTER);
        float v;
        if (esc) {
            const u32 bits = f32_to_f16_sat(xt);
            esc_out[t * dim] = (unsigned short)bits;
            v = f16_to_f32(bits);
        } else {
            v = __fadd_rn(base, __fmul_rn(q, step));
        }
        xd[t * C] = v;
        if (nx) nx[t * C] = (N)fminf(fmaxf(rintf(__fmul_rn(v, iscale)), -limit), limit);
    }
}

// A CTA per unit, a thread per channel, once every layer is quantized: the unit's symbol
// counts, and its escapes gathered to the start of its region in token then channel order
// (ranked with a warp ballot, as the decoders rank them).
extern "C" __global__ void finish(const unsigned char* __restrict__ symbols,
                                  unsigned short* __restrict__ escapes,
                                  int* __restrict__ counts, long long tokens, long long dim,
                                  long long padded) {
    __shared__ int hist[256];
    __shared__ int warp_escapes[32];
    const long long u = blockIdx.x;
    const int d = threadIdx.x;
    const bool mine = d < dim;
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    const unsigned char* sym = symbols + u * padded * dim;
    unsigned short* esc = escapes + u * tokens * dim;
    long long e = 0;
    for (long long t = 0; t < tokens; ++t) {
        const int s = mine ? sym[t * dim + d] : 1;
        if (mine) atomicAdd(&hist[s], 1);
        const bool escaped = s == 0;
        if (__syncthreads_or(escaped)) {
            long long before, total;
            rank_escapes(escaped, warp_escapes, &before, &total);
            // Every rank is at most its own place: earlier places are read before written.
            const unsigned short bits = escaped ? esc[t * dim + d] : 0;
            __syncthreads();
            if (escaped) esc[e + before] = bits;
            e += total;
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < ALPHABET; i += blockDim.x) counts[u * ALPHABET + i] = hist[i];
}

#define QUANTIZE_X(NAME, A, N)                                                                \
    extern "C" __global__ void NAME(                                                          \
        float* x, const A* acc, const double* out_scale, N* next, const float* in_scale,      \
        float limit, const float* res, long long layer, long long layers, long long unit_lo,  \
        long long n_units, long long tokens, long long heads, long long dim, long long padded,\
        unsigned short* starts, unsigned short* steps, unsigned char* symbols,                \
        unsigned short* escapes) {                                                            \
        quantize_x_body<A, N>(x, acc, out_scale, next, in_scale, limit, res, layer, layers,   \
                              unit_lo, n_units, tokens, heads, dim, padded, starts, steps,    \
                              symbols, escapes);                                              \
    }
QUANTIZE_X(quantize_x8, int, signed char)
QUANTIZE_X(quantize_x64, double, double)

// A thread per (value, layer, token, head, pair d, d + dim / 2): the decoded channels ch
// [layers, rows, C] as the value [layers, 2, tokens, heads, dim] (a slot of `stride`
// elements each) in its dtype, K rotated back by cos / sin as the host's `_rotate_row`.
extern "C" __global__ void output(const float* __restrict__ ch, long long values,
                                  long long layers, long long tokens, long long heads,
                                  long long dim, const float* __restrict__ cosines,
                                  const float* __restrict__ sines, char* __restrict__ back,
                                  long long stride, int kind) {
    Pair p;
    if (!pair_of(values, layers, tokens, heads, dim, stride, &p)) return;
    const long long half = dim / 2, width = heads * dim;
    const float* in = ch + p.ch_at;
    const float a = in[0], c = in[half];
    const float co = cosines[p.trig], si = sines[p.trig];
    store_value(back, kind, p.k_at, __fsub_rn(__fmul_rn(a, co), __fmul_rn(c, si)));
    store_value(back, kind, p.k_at + half, __fadd_rn(__fmul_rn(c, co), __fmul_rn(a, si)));
    store_value(back, kind, p.v_at, in[width]);
    store_value(back, kind, p.v_at + half, in[width + half]);
}
"""

_KERNELS = ("channels", "quantize_x8", "quantize_x64", "output", "finish")
_module = KernelModule(lambda: encode_source(_CUDA_SOURCE), _KERNELS)
_THREADS = 256  # a CTA of `channels` and `output`


def encode_x_many_on_gpu(
    codec: CacheGenX | Sequence[CacheGenX],
    values: Sequence[torch.Tensor],
    device: int | None = None,
    stream: Any = None,
) -> list[tuple[memoryview, int]]:
    """Per value, the payload the host encoder makes of it and the XXH3-64 of the value it
    decodes to, encoded on a GPU: `kvstore.kernels.cachegen_encode.encode_many_on_gpu`'s
    contract, with `codec` one cachegen-x codec or one per value (each at its value's
    position, `for_position`; one profile's maps). A codec without a position searches for
    it first on the host (`find_position`), as the host encoder does. Raises ValuesRefused
    naming the values it cannot take (not the KV layout of its maps, a dtype it does not
    read, past float16's range, K with RoPE undone past it)."""
    from kvstore.codecs.base import ValuesRefused
    from kvstore.codecs.container import ContainerError
    from kvstore.codecs.values import each_codec
    from kvstore.errors import InvalidArgument

    codecs = cast("list[CacheGenX]", each_codec(codec, len(values)))
    if not codecs:
        return []
    for c in codecs:  # cachegen-x-zstd frames its symbols otherwise: not this encoder's
        if c.gpu_encoder() is not encode_x_many_on_gpu:
            raise InvalidArgument(f"{c.name} does not encode on the GPU")
    digests = {c.cross.digest for c in codecs}
    if len(digests) > 1:
        raise InvalidArgument(f"cachegen-x encodes one profile's maps at a time, not {digests}")
    refused: dict[int, str] = {}
    for i, value in enumerate(values):
        try:
            codecs[i].check_value_shape(tuple(value.shape))
        except ContainerError as exc:  # the maps are for other KV
            refused[i] = str(exc)
    if refused:
        raise ValuesRefused(_refusal(refused), list(refused))
    return in_groups(
        codecs[0].name,
        values,
        device,
        lambda which, on: _encode_group(
            [codecs[i] for i in which], [values[i] for i in which], on, stream, which
        ),
    )


class _Plan:
    """A batch's device buffers, kept between calls for batches of the same shape, count,
    dtype and maps, with the CUDA graph of its kernels (`channels`, the layer loop,
    `output`, `finish`): captured once, then each batch is one launch rather than ~120
    through CuPy and cuBLAS from Python, which two threads encoding side by side made
    wait on each other's hold of the GIL. A call copies its values, rotation tables and
    resolutions into `src`, `cos`, `sin` and `res` and launches the graph."""

    def __init__(
        self, key: tuple[Any, ...], b_n: int, lay: Any, cross: Any, stride: int, int8: bool
    ) -> None:
        import cupy

        self.key = key
        layers, tokens, dim = lay.layers, lay.tokens, lay.head_dim
        rows, n_units, ch_n = b_n * tokens, b_n * lay.units, cross.channels
        half = max(dim // 2, 1)
        self.src = cupy.empty(max(b_n * stride, 1), cupy.uint8)
        self.back = cupy.empty(max(b_n * stride, 1), cupy.uint8)
        self.cos = cupy.empty((rows, half), cupy.float32)
        self.sin = cupy.empty((rows, half), cupy.float32)
        self.res = cupy.empty((b_n, layers, 2, lay.heads), cupy.float32)
        self.ch = cupy.empty((layers, rows, ch_n), cupy.float32)
        self.bad = cupy.empty(b_n, cupy.int32)
        bufs = quantized_buffers(n_units, lay)
        self.starts, self.steps, self.symbols, self.counts, self.escapes = bufs
        self.acc = cupy.empty((rows, ch_n), cupy.int32 if int8 else cupy.float64)
        self.inputs = [cupy.empty((rows, ch_n), cupy.int8 if int8 else cupy.float64) for _ in "ab"]
        self.graph: Any = None
        held = [self.src, self.back, self.cos, self.sin, self.res, self.ch, self.bad, *bufs]
        self.nbytes = sum(a.nbytes for a in [*held, self.acc, *self.inputs])


# Plans not in use, by key (`_take_plan`): at most _IDLE_PLANS of them holding at most
# _IDLE_PLAN_BYTES, those of the key with the fewest batches dropped first (a prefix's last
# chunk is mostly a shape of its own: its plan must not push out those that full batches of
# 256-token chunks use), with how many batches each key's plans have encoded. A plan
# dropped is captured again when its key comes back (~3.5 ms of host time): at four, the
# store's demotion of four token counts recaptured 13 graphs per 1.9 GB and ran at
# 5.4-6.5 GB/s, 6.9-7.7 with none recaptured (H200; `benchmarks/NOTES-codecs.md`). A
# 64 MiB cachegen-x batch's plan holds ~360 MB.
_IDLE_PLANS = 16
_IDLE_PLAN_BYTES = 2 << 30
_idle: collections.OrderedDict[tuple[Any, ...], list[_Plan]] = collections.OrderedDict()
_batches: collections.Counter[tuple[Any, ...]] = collections.Counter()
_idle_lock = threading.Lock()


def _take_plan(key: tuple[Any, ...], make: Callable[[], _Plan]) -> _Plan:
    """An idle plan for `key` (the caller's alone until `_give_plan`), else `make()`."""
    with _idle_lock:
        found = _idle.get(key)
        if found:
            plan = found.pop()
            if not found:
                del _idle[key]
            return plan
    return make()


def _give_plan(plan: _Plan) -> None:
    """`plan` idle again, for the next batch of its key; past _IDLE_PLANS idle ones or
    _IDLE_PLAN_BYTES, one of the key that has encoded the fewest batches is dropped (of
    those keys, the one idle longest; its buffers go back to CuPy's pool)."""
    with _idle_lock:
        _batches[plan.key] += 1
        _idle.setdefault(plan.key, []).append(plan)
        _idle.move_to_end(plan.key)
        while len(idle := [p for ps in _idle.values() for p in ps]) > _IDLE_PLANS or (
            len(idle) > 1 and sum(p.nbytes for p in idle) > _IDLE_PLAN_BYTES
        ):
            key = min(_idle, key=_batches.__getitem__)
            _idle[key].pop(0)
            if not _idle[key]:
                del _idle[key], _batches[key]


@keeps_scratch
def _drop_plans(device: int) -> None:
    """Let go of the idle plans of GPU `device` (`kvstore.kernels._cuda.release_memory`)."""
    with _idle_lock:
        for key in [k for k in _idle if k[0] == device]:
            del _idle[key], _batches[key]


def _captured(issue: Callable[[], None]) -> Any:
    """The CUDA graph of the work `issue()` queues on the current CuPy stream (run on a
    stream of its own, captured there; relaxed, so that other threads' allocations go on)."""
    import cupy

    stream = cupy.cuda.Stream(non_blocking=True)
    relaxed = getattr(cupy.cuda.runtime, "streamCaptureModeRelaxed", 2)
    with stream:
        stream.begin_capture(relaxed)
        try:
            issue()
        finally:
            graph = stream.end_capture()
    return graph


def _encode_group(
    codecs: list[CacheGenX],
    values: list[torch.Tensor],
    device: int,
    stream: Any,
    index: list[int],
) -> list[tuple[memoryview, int]]:
    """`encode_x_many_on_gpu` of values of one shape and dtype on `device`; `index`: their
    places in the caller's list (for errors)."""
    import cupy

    from kvstore.codecs.base import DTYPE_WORDS, ValuesRefused
    from kvstore.codecs.cachegen import _Layout
    from kvstore.codecs.cachegen_cross import _NOT_F16, find_position, rope_tables

    codec = codecs[0]
    cross = codec.cross
    first_value = values[0]
    b_n = len(values)
    layers, _, tokens, heads, dim = first_value.shape
    lay = _Layout(layers, tokens, heads, dim, codec.SEGMENT or max(tokens, 1))
    half = dim // 2
    rows = b_n * tokens
    item = first_value.element_size()
    nbytes = first_value.numel() * item
    stride = align(max(nbytes, 1), 256)
    positions = []
    for c, v in zip(codecs, values, strict=True):
        p = int(c.params["position"])
        if p < 0:
            p = find_position(cross, v.detach().float().cpu().numpy())
        positions.append(p)
    cos = np.empty((rows, max(half, 1)), np.float32)
    sin = np.empty((rows, max(half, 1)), np.float32)
    for b, p in enumerate(positions):
        cos[b * tokens : (b + 1) * tokens], sin[b * tokens : (b + 1) * tokens] = rope_tables(
            cross, p, tokens
        )
    res = np.stack([c.resolution(layers, heads) for c in codecs]).astype(np.float32)
    prefix = np.frombuffer(struct.pack(f"<{b_n}Q", *positions), np.uint8).reshape(b_n, 8)
    int8 = _int8_gemm(cross)
    kind = DTYPE_WORDS[first_value.dtype]
    key = (device, cross.digest, kind, tuple(first_value.shape), lay.segment, b_n)

    with cupy.cuda.Device(device):
        s = as_cupy_stream(stream) if stream is not None else _own_stream(device)
        keep: list[Any] = []
        plan = _take_plan(key, lambda: _Plan(key, b_n, lay, cross, stride, int8))
        try:
            with s:
                stage_values(values, stride, device, s, stream is None, keep, plan.src.data.ptr)
                _upload([cos, sin, res], s, keep, [plan.cos, plan.sin, plan.res])
                cupy.cuda.runtime.memsetAsync(plan.bad.data.ptr, 0, plan.bad.nbytes, s.ptr)
                if plan.graph is None:  # what the capture must not do: compile, upload
                    for name in _KERNELS:
                        _module.get(device, name)
                    _device_maps(cross, device)
                    _cublas.handle(device)
                    plan.graph = _captured(
                        lambda: _kernels(plan, cross, lay, b_n, device, stride // item, kind)
                    )
                plan.graph.launch(s)
                counts32, found = _download([plan.counts, plan.bad], s)
                if found.any():
                    channel = (
                        f"{codec.name}: K with RoPE undone leaves float16's range; store this "
                        "value with another codec"
                    )
                    reasons = {
                        index[b]: _NOT_F16.format(codec.name) if f == 2 else channel
                        for b, f in enumerate(found.tolist())
                        if f
                    }
                    raise ValuesRefused(_refusal(reasons), sorted(reasons))
                return code_batch(
                    codec, lay, b_n, device, s, keep, plan.symbols, counts32, plan.starts,
                    plan.steps, plan.escapes, plan.back, stride, nbytes, prefix,
                )  # fmt: skip
        finally:  # code_batch has synchronized `s`, or the error left the plan unread
            s.synchronize()
            _give_plan(plan)


def _kernels(
    plan: _Plan, cross: Any, lay: Any, b_n: int, device: int, stride: int, kind: int
) -> None:
    """Queue on the current stream the kernels of a batch of `b_n` values in `plan`'s
    buffers (a slot of `stride` elements of dtype `kind` each): channels, each layer's
    products and units, the decoded values and the units' counts and escapes. Allocates
    nothing and compiles nothing (`_encode_group` has): a CUDA graph holds it."""
    from kvstore.codecs.cachegen_profile import input_row

    layers, tokens, heads, dim = lay.layers, lay.tokens, lay.heads, lay.head_dim
    nu, half, ch_n = lay.units, dim // 2, cross.channels
    padded = lay.segments * lay.segment
    rows, n_units = b_n * tokens, b_n * nu
    per = b_n * layers * tokens * heads * half  # threads of `channels` and `output`
    int8 = _int8_gemm(cross)
    dm = _device_maps(cross, device)
    unscale = np.float32(1 / cross.rope_scale**2)
    if per:
        _module.get(device, "channels")(
            (-(-per // _THREADS),), (_THREADS,),
            (plan.src, np.int64(stride), np.int32(kind), np.int64(b_n),
             np.int64(layers), np.int64(tokens), np.int64(heads), np.int64(dim),
             plan.cos, plan.sin, unscale, plan.ch, plan.bad),
        )  # fmt: skip
    quantize = _module.get(device, "quantize_x8" if int8 else "quantize_x64")
    limit = np.float32(cross.input_limit)
    null = np.uint64(0)
    acc, inputs = plan.acc, plan.inputs
    # Groups of a thread a channel (rounded up to warps), up to 1024 threads: a launch
    # has a CTA per unit of each value, fewer than the SMs in a batch of 64 MiB of values,
    # whose loads are then shared by more warps (H200, ten 256-token chunks: 4.6 ms of
    # quantize launches at 256 threads, 2.3 at 1024).
    threads = align(dim, 32) * max(1, 1024 // align(dim, 32))

    def units(layer: int, lo: int, hi: int, product: bool, scale: Any, nxt: Any) -> None:
        # Units lo..hi - 1 of layer `layer` of every value, against `acc` (if `product`)
        # scaled by `scale`, writing the next map's inputs to `nxt`.
        if hi <= lo:
            return
        quantize(
            (b_n * (hi - lo),), (threads,),
            (plan.ch[layer], acc if product else null, scale if product else null,
             null if nxt is None else nxt, dm.ins[input_row(layer, layers)], limit,
             plan.res, np.int64(layer), np.int64(layers), np.int64(lo),
             np.int64(hi - lo), np.int64(tokens), np.int64(heads), np.int64(dim),
             np.int64(padded), plan.starts, plan.steps, plan.symbols, plan.escapes),
        )  # fmt: skip

    for layer in range(layers):
        below, here = inputs[(layer + 1) % 2], inputs[layer % 2]
        nxt = None if layer == layers - 1 else here
        scale = dm.outs[layer - 1] if layer else None
        if layer and rows:
            _product(below, dm.maps[layer - 1], acc, int8)
        if not cross.has_kv:
            units(layer, 0, 2 * heads, layer > 0, scale, nxt)
            continue
        # K's units (their inputs always written: V's kv map reads them), then V's
        # against the product plus K's times the kv map.
        units(layer, 0, heads, layer > 0, scale, here)
        if rows:
            _kv_product(here, dm.kv[layer], acc, ch_n // 2, layer > 0, int8)
        units(layer, heads, 2 * heads, True, scale if layer else dm.v_out0, nxt)
    if per:
        _module.get(device, "output")(
            (-(-per // _THREADS),), (_THREADS,),
            (plan.ch, np.int64(b_n), np.int64(layers), np.int64(tokens), np.int64(heads),
             np.int64(dim), plan.cos, plan.sin, plan.back, np.int64(stride),
             np.int32(kind)),
        )  # fmt: skip
    if n_units:
        _module.get(device, "finish")(
            (n_units,), (align(dim, 32),),
            (plan.symbols, plan.escapes, plan.counts, np.int64(tokens), np.int64(dim),
             np.int64(padded)),
        )  # fmt: skip
