"""`cachegen` encoding on the GPU: bit for bit the payload the CPU encoder
(`kvstore.codecs.cachegen`) makes of the same value, and the checksum of the value it
decodes to.

A value on the GPU (`[layers, 2, tokens, heads, head_dim]`, float16, bfloat16 or float32)
is encoded in two kernels with the host in between:

1. `quantize`: a CTA per unit (layer, K/V, head) with a thread per channel walks the
   tokens twice: first the channel model (start value and residual spread, in float64 as
   the CPU sums them, in the same order), then, after the head's step (thread 0 sums the
   channels' spreads in channel order), the symbols, the value each decodes to (written in
   the value's dtype, the previous one predicting the next for K) and the unit's symbol
   counts (shared-memory atomics). Escapes are ranked in channel order with a warp ballot,
   as the GPU decoder ranks them, into a region of their unit.
2. The host turns the counts into rANS frequency tables (`rans.quantize_freqs`, the CPU's
   own), then `rans_encode` codes a stream per thread, backwards into a slot of its worst
   case, its lanes as the CPU encoder runs them (division where the CPU multiplies by a
   reciprocal: the same integers).

The host adds up the streams' lengths into their offsets, which `gather_streams` lays the
streams back to back by, and meanwhile writes every part of the payloads but the streams
with the CPU's own code (`CacheGen.frame_payloads`) into pinned memory, which the streams
are then copied into, each value's to its place. Each value's checksum is XXH3-64 on the
GPU (`kvstore.kernels.checksum`).

`encode_many_on_gpu` encodes a batch: values of one shape and dtype lie in one buffer, a
slot each, and every step above runs once for all of them (the kernels see one value of B
times as many units; the tables are one parallel call; the payloads are joined by one
parallel kernel). A value at a time, the host's share (tables, joining, launches) is
most of the time; in batches of ~32 MiB it is amortized.

Float arithmetic is written with explicit round-to-nearest intrinsics (`__fmul_rn`,
`__dadd_rn`, ...): NVRTC fuses a multiply and an add into one FMA by default, which the
CPU does not, and the payload must not depend on where it was encoded.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numba
import numpy as np

from kvstore.codecs import rans
from kvstore.kernels._cuda import KernelModule, align, with_values
from kvstore.kernels.blocks import as_cupy_stream
from kvstore.kernels.cachegen import CUDA_ESCAPES
from kvstore.kernels.checksum import SHORT_MAX, xxh3_64_gpu_spans
from kvstore.kernels.floatbits import CUDA_FLOATBITS

if TYPE_CHECKING:
    import torch

    from kvstore.codecs.cachegen import CacheGen

# What both GPU encoders (this and `kernels.cachegen_cross_encode`) read values and write
# float16 bits with, as the CPU's `f32_to_f16(x, True)`.
CUDA_ENCODE_HELPERS = r"""
#define CENTER @CENTER@
#define REACH @REACH@
#define ALPHABET @ALPHABET@
#define OUTLIER_SPREADS @OUTLIER_SPREADS@
#define F16_MAX 65504.0f

__device__ __forceinline__ float load_value(const char* words, int kind, long long at) {
    if (kind == 0) return ((const float*)words)[at];
    u32 h = ((const unsigned short*)words)[at];
    return kind == 1 ? f16_to_f32(h) : bf16_to_f32(h);
}

// float16 bits of x, saturating at +-65504 past the range (infinities too); NaN: 0x7E00.
__device__ __forceinline__ u32 f32_to_f16_sat(float x) {
    u32 u = __float_as_uint(x);
    u32 sign = (u >> 16) & 0x8000;
    u32 a = u & 0x7FFFFFFF;
    if (a > 0x7F800000) return 0x7E00 | sign;
    if (a >= 0x477FF000) return 0x7BFF | sign;
    return f32_to_f16(x);
}
"""

_CUDA_SOURCE = r"""
#define PRECISION @PRECISION@
#define RANS_L (1u << 23)
#define LANES @LANES@

// ---------------------------------------------------------------- symbols
// units: per unit, its first element in `words` (tokens apart by `width` elements), its
// resolution's index, flags (dtype kind | closed loop << 4). Outputs per unit: starts and
// steps (float16 bits, a channel each), symbols [padded tokens, dim], counts [ALPHABET],
// escapes (float16 bits, in token then channel order, from the start of its region of
// tokens * dim), bad (a value out of float16's range). `back`: the decoded value, laid out
// as the input.
extern "C" __global__ void quantize(const char* __restrict__ words,
                                    char* __restrict__ back,
                                    const long long* __restrict__ units,
                                    const float* __restrict__ res,
                                    long long tokens, long long width, long long dim,
                                    long long padded,
                                    unsigned short* __restrict__ starts,
                                    unsigned short* __restrict__ steps,
                                    unsigned char* __restrict__ symbols,
                                    int* __restrict__ counts,
                                    unsigned short* __restrict__ escapes,
                                    int* __restrict__ bad_unit) {
    __shared__ int hist[256];
    __shared__ float spreads[1024];
    __shared__ float head_rms;
    __shared__ int warp_escapes[32];
    const long long u = blockIdx.x;
    const long long* un = units + u * 3;
    const long long base = un[0];
    const int kind = (int)(un[2] & 15);
    const bool closed = (un[2] >> 4) & 1;
    const int d = threadIdx.x;
    const bool mine = d < dim;
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
    const long long at0 = base + d;
    // The channel model, as the CPU's `_channel_model`.
    bool bad = false;
    float start = 0.f, spread = 0.f;
    if (mine && tokens > 0) {
        double acc = 0.0;
        if (closed) {  // K: differences along the tokens, summed in float64
            float prev = load_value(words, kind, at0);
            bad |= !(fabsf(prev) <= F16_MAX);
            for (long long t = 1; t < tokens; ++t) {
                float x = load_value(words, kind, at0 + t * width);
                bad |= !(fabsf(x) <= F16_MAX);
                float e = __fsub_rn(x, prev);
                acc = __dadd_rn(acc, (double)__fmul_rn(e, e));
                prev = x;
            }
            start = load_value(words, kind, at0);
            spread = (float)__dsqrt_rn(__ddiv_rn(acc, (double)(tokens > 1 ? tokens - 1 : 1)));
        } else {  // V: around the channel mean
            double mean = 0.0;
            for (long long t = 0; t < tokens; ++t) {
                float x = load_value(words, kind, at0 + t * width);
                bad |= !(fabsf(x) <= F16_MAX);
                mean = __dadd_rn(mean, (double)x);
            }
            mean = __ddiv_rn(mean, (double)tokens);
            for (long long t = 0; t < tokens; ++t) {
                double e = __dsub_rn((double)load_value(words, kind, at0 + t * width), mean);
                acc = __dadd_rn(acc, __dmul_rn(e, e));
            }
            start = (float)mean;
            spread = (float)__dsqrt_rn(__ddiv_rn(acc, (double)tokens));
        }
    }
    if (__syncthreads_or(bad)) {
        if (d == 0) bad_unit[u] = 1;
        return;
    }
    if (mine) spreads[d] = spread;
    __syncthreads();
    if (d == 0) {  // the head's step: the channels' spreads, root mean square, in order
        float r = 0.f;
        for (long long c = 0; c < dim; ++c) r = __fadd_rn(r, __fmul_rn(spreads[c], spreads[c]));
        head_rms = (float)__dsqrt_rn(__ddiv_rn((double)r, (double)dim));
    }
    __syncthreads();
    float pred = 0.f, step = 0.f, inv = 0.f, limit = 1.f;
    if (mine) {
        u32 bits = f32_to_f16_sat(start);
        starts[u * dim + d] = (unsigned short)bits;
        pred = f16_to_f32(bits);
        bits = f32_to_f16_sat(__fdiv_rn(head_rms, res[un[1]]));
        steps[u * dim + d] = (unsigned short)bits;
        step = f16_to_f32(bits);
        inv = step > 0.f ? __fdiv_rn(1.f, step) : 0.f;
        double far = ceil(__dmul_rn(__dmul_rn(OUTLIER_SPREADS, (double)spread), (double)inv));
        limit = (float)fmin(fmax(far, 1.0), (double)REACH);
    }
    long long e = 0;  // the unit's escapes so far
    unsigned short* esc_out = escapes + u * tokens * dim;
    for (long long t = 0; t < tokens; ++t) {
        bool esc = false;
        float x = 0.f, v = 0.f;
        if (mine) {
            x = load_value(words, kind, at0 + t * width);
            float residual = __fsub_rn(x, pred);
            float q = rintf(__fmul_rn(residual, inv));
            esc = fabsf(q) > limit || (step == 0.f && residual != 0.f) || (t == 0 && !closed);
            q = fminf(fmaxf(q, -limit), limit);
            int s = esc ? 0 : (int)q + CENTER;
            symbols[u * padded * dim + t * dim + d] = (unsigned char)s;
            atomicAdd(&hist[s], 1);
            v = esc ? f16_to_f32(f32_to_f16_sat(x)) : __fadd_rn(pred, __fmul_rn(q, step));
            store_value(back, kind, at0 + t * width, v);
            if (closed) pred = v;
        }
        if (__syncthreads_or(esc)) {
            long long before, total;
            rank_escapes(esc, warp_escapes, &before, &total);
            if (esc) esc_out[e + before] = (unsigned short)f32_to_f16_sat(x);
            e += total;
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < ALPHABET; i += blockDim.x) counts[u * ALPHABET + i] = hist[i];
}

// ---------------------------------------------------------------- rANS streams
// streams: per stream, its symbols' offset, their count, its unit, the end of its slot in
// `slots` (room for 2 bytes a symbol and 4 a lane below it). fc: per unit and symbol,
// frequency | cumulative frequency << 16. lengths: the stream's bytes, -1 if a symbol has
// no frequency.
__device__ __forceinline__ u32 rans_put(u32 x, u32 fc, unsigned char* slots, long long* p,
                                        bool* bad) {
    u32 f = fc & 0xFFFF;
    if (f == 0) { *bad = true; return x; }
    u32 x_max = f << (31 - PRECISION);
    while (x >= x_max) { slots[--*p] = (unsigned char)(x & 0xFF); x >>= 8; }
    return ((x / f) << PRECISION) + (x % f) + (fc >> 16);
}

extern "C" __global__ void rans_encode(const unsigned char* __restrict__ symbols,
                                       const long long* __restrict__ streams,
                                       long long n_streams,
                                       const u32* __restrict__ fc,
                                       unsigned char* __restrict__ slots,
                                       long long* __restrict__ lengths) {
    long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= n_streams) return;
    const long long* st = streams + k * 4;
    const unsigned char* sym = symbols + st[0];
    const long long n = st[1];
    const u32* table = fc + st[2] * 256;
    const long long end = st[3];
    long long p = end;
    bool bad = false;
    // Symbol i goes to lane i % LANES, last symbol first: the symbols past the last whole
    // round of LANES, then whole rounds unrolled, every lane's index known when compiled, so
    // that the lanes' chains interleave (H200, 11 SmolLM2 chunks' 15,840 streams of 2,048
    // symbols: 563 -> 491 us; the same bytes).
    u32 x[LANES];
#pragma unroll
    for (int l = 0; l < LANES; ++l) x[l] = RANS_L;
    long long i = n - 1;
    for (; i >= 0 && (i + 1) % LANES != 0; --i) {
        const int li = (int)(i % LANES);
#pragma unroll
        for (int l = 0; l < LANES; ++l)
            if (l == li) x[l] = rans_put(x[l], table[sym[i]], slots, &p, &bad);
    }
    for (; i >= 0; i -= LANES) {
#pragma unroll
        for (int l = LANES - 1; l >= 0; --l)
            x[l] = rans_put(x[l], table[sym[i - (LANES - 1 - l)]], slots, &p, &bad);
    }
    const int active = n < LANES ? (int)n : LANES;
#pragma unroll
    for (int l = LANES - 1; l >= 0; --l) {
        if (l >= active) continue;
        p -= 4;
        for (int b = 0; b < 4; ++b) slots[p + b] = (unsigned char)(x[l] >> (8 * b));
    }
    lengths[k] = bad ? -1 : end - p;
}

// The streams back to back: a CTA per stream copies its bytes from the end of its slot
// to `offsets[k]` of `out`.
extern "C" __global__ void gather_streams(const unsigned char* __restrict__ slots,
                                          const long long* __restrict__ streams,
                                          const long long* __restrict__ offsets,
                                          unsigned char* __restrict__ out) {
    const long long k = blockIdx.x;
    const long long n = offsets[k + 1] - offsets[k];
    const unsigned char* from = slots + streams[k * 4 + 3] - n;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) out[offsets[k] + i] = from[i];
}
"""


def encode_source(source: str) -> str:
    """CUDA `source` after the float bits, escapes and encoding helpers, with the codec's
    constants (@CENTER@, @REACH@, ...) put in."""
    from kvstore.codecs import cachegen

    subs = {
        "@PRECISION@": cachegen.PRECISION,
        "@CENTER@": cachegen.CENTER,
        "@REACH@": cachegen.REACH,
        "@ALPHABET@": cachegen.ALPHABET,
        "@LANES@": cachegen.LANES,
        "@OUTLIER_SPREADS@": repr(float(cachegen.OUTLIER_SPREADS)),
    }
    return with_values(CUDA_FLOATBITS + CUDA_ESCAPES + CUDA_ENCODE_HELPERS + source, subs)


def _source() -> str:
    return encode_source(_CUDA_SOURCE)


@numba.njit(cache=True, nogil=True, parallel=True)
def _tables(counts: np.ndarray, total_freq: int, freqs: np.ndarray, fc: np.ndarray) -> None:
    """Per unit (a row of int32 symbol counts): the frequency table
    `rans.quantize_freqs` gives (`freqs`, uint16) and the `rans_encode` kernel's table
    (`fc`, 256 wide: frequency | cumulative frequency << 16), units in parallel: a batch
    has thousands, and this once took a fifth of its host time through NumPy."""
    for m in numba.prange(counts.shape[0]):
        alphabet = counts.shape[1]
        row = np.zeros(alphabet, np.int64)
        rans._quantize_row(counts[m].astype(np.float64), total_freq, row)
        cum = 0
        for s in range(alphabet):
            freqs[m, s] = row[s]
            fc[m, s] = row[s] | cum << 16
            cum += row[s]
        for s in range(alphabet, fc.shape[1]):
            fc[m, s] = 0


_module = KernelModule(_source, ("quantize", "rans_encode", "gather_streams"))


def _pinned_like(arrays: list[Any]) -> tuple[Any, list[np.ndarray]]:
    """One pinned host buffer with a view shaped like each of `arrays`."""
    import cupy

    sizes = [align(a.nbytes, 256) for a in arrays]
    mem = cupy.cuda.alloc_pinned_memory(max(sum(sizes), 1))
    starts = np.cumsum([0, *sizes[:-1]])
    return mem, [
        np.frombuffer(mem, a.dtype, a.size, int(at)).reshape(a.shape)
        for a, at in zip(arrays, starts, strict=True)
    ]


def _copy(dst: int, src: int, nbytes: int, kind: int, stream: Any) -> None:
    import cupy

    if nbytes:
        cupy.cuda.runtime.memcpyAsync(dst, src, nbytes, kind, stream.ptr)


def _upload(
    arrays: list[np.ndarray], stream: Any, keep: list[Any], into: list[Any] | None = None
) -> list[Any]:
    """Device copies of host `arrays` (into the device arrays `into`, else new ones), staged
    through one pinned buffer (kept in `keep` until the copies are done): copies from
    pageable memory are synchronous and take a driver lock that serializes the host threads
    encoding side by side."""
    mem, views = _pinned_like(arrays)
    keep.append(mem)
    for a, h in zip(arrays, views, strict=True):
        h[...] = a
    return _to_device(views, stream, into)


def _to_device(pinned: list[np.ndarray], stream: Any, into: list[Any] | None = None) -> list[Any]:
    """Device copies of `pinned` arrays (host memory the caller keeps until they are done),
    into the device arrays `into` (as large) or new ones."""
    import cupy

    out = into if into is not None else [cupy.empty(h.shape, h.dtype) for h in pinned]
    for h, d in zip(pinned, out, strict=True):
        assert d.nbytes == h.nbytes
        _copy(d.data.ptr, h.ctypes.data, h.nbytes, cupy.cuda.runtime.memcpyHostToDevice, stream)
    return out


def _pinned_bytes(n: int) -> np.ndarray:
    """n bytes of pinned host memory, alive as long as the array (or a view of it)."""
    import cupy

    return np.frombuffer(cupy.cuda.alloc_pinned_memory(max(n, 1)), np.uint8, n)


def _download(arrays: list[Any], stream: Any) -> list[np.ndarray]:
    """Host copies of device `arrays` (contiguous), in one pinned buffer, once `stream` has
    done everything before them (it is synchronized)."""
    import cupy

    _, views = _pinned_like(arrays)
    for a, h in zip(arrays, views, strict=True):
        _copy(h.ctypes.data, a.data.ptr, a.nbytes, cupy.cuda.runtime.memcpyDeviceToHost, stream)
    stream.synchronize()
    return views


_local = threading.local()


def _own_stream(device: int) -> Any:
    """This thread's stream on `device`: the server's host threads encode side by side, and
    the legacy default stream would serialize them with every other stream."""
    import cupy

    streams = _local.__dict__.setdefault("streams", {})
    if device not in streams:
        with cupy.cuda.Device(device):
            streams[device] = cupy.cuda.Stream(non_blocking=True)
    return streams[device]


def encode_on_gpu(
    codec: CacheGen, value: torch.Tensor, device: int | None = None, stream: Any = None
) -> tuple[memoryview, int]:
    """`encode_many_on_gpu` of one value: its payload and the XXH3-64 of what it decodes to."""
    return encode_many_on_gpu(codec, [value], device, stream)[0]


def encode_many_on_gpu(
    codec: CacheGen, values: Sequence[torch.Tensor], device: int | None = None, stream: Any = None
) -> list[tuple[memoryview, int]]:
    """Per value, the payload `codec.encode_payload` makes of it and the XXH3-64 of the
    value it decodes to (the container's value checksum), encoded on a GPU. Values are
    float16, bfloat16 or float32 `[layers, 2, tokens, heads, head_dim]` (head_dim <= 1024):
    CUDA tensors (encoded on their GPU) or host tensors, copied to GPU `device` first
    (fastest from pinned memory). Values of one shape, dtype and GPU are encoded together:
    one launch of each kernel and one set of frequency tables for all of them, so that a
    batch of small values keeps the GPU busy and pays for the host's share once. On
    `stream` (CuPy or torch; the caller orders it after the values' writers), else on a
    stream of this thread's own that first waits for the work torch has queued on the
    device's current stream (what wrote CUDA values). Blocks until done.
    Raises ValuesRefused (an InvalidArgument) naming the values the codec cannot take (not
    the KV layout or a dtype it encodes, out of float16's range), before any payload is
    returned: the others can be sent again without them."""
    return in_groups(
        codec.name,
        values,
        device,
        lambda which, on: _encode_group(codec, [values[i] for i in which], on, stream, which),
    )


def in_groups(
    name: str,
    values: Sequence[torch.Tensor],
    device: int | None,
    encode: Callable[[list[int], int], list[tuple[memoryview, int]]],
) -> list[tuple[memoryview, int]]:
    """`encode(which, gpu)` of each group of `values` (their indexes) of one shape, dtype
    and GPU, the results in the values' order; ValuesRefused first, naming every value a
    GPU encoder of codec `name` cannot take (not the KV layout, a dtype it does not read,
    a host value without `device`, heads of more than 1024 channels)."""
    from kvstore.codecs.base import DTYPE_WORDS, ValuesRefused, kv_view
    from kvstore.errors import InvalidArgument

    groups: dict[tuple[Any, ...], list[int]] = {}
    refused: dict[int, str] = {}
    for i, value in enumerate(values):
        try:
            kv_view(value, name)  # the layout check
            if value.dtype not in DTYPE_WORDS or not (value.is_cuda or device is not None):
                raise InvalidArgument(
                    f"{name} encodes on the GPU a CUDA tensor of float16, bfloat16 or "
                    "float32, or one on the host with the GPU to copy it to, not "
                    f"{value.dtype} on {value.device}"
                )
            if value.shape[-1] > 1024:
                raise InvalidArgument(
                    f"{name} encodes heads of up to 1024 channels, not {value.shape[-1]}"
                )
        except InvalidArgument as exc:
            refused[i] = str(exc)
            continue
        on = value.get_device() if value.is_cuda else int(device)  # type: ignore[arg-type]
        groups.setdefault((tuple(value.shape), value.dtype, on), []).append(i)
    if refused:
        raise ValuesRefused(_refusal(refused), list(refused))
    out: list[tuple[memoryview, int]] = [(memoryview(b""), 0)] * len(values)
    for (_, _, on), which in groups.items():
        for i, c in zip(which, encode(which, on), strict=True):
            out[i] = c
    return out


def _refusal(refused: dict[int, str]) -> str:
    """The message of a ValuesRefused: the first refused value's reason, and how many."""
    first = min(refused)
    more = f" (and {len(refused) - 1} more values)" if len(refused) > 1 else ""
    return f"value {first}: {refused[first]}{more}"


def _encode_group(
    codec: CacheGen, values: list[torch.Tensor], device: int, stream: Any, index: list[int]
) -> list[tuple[memoryview, int]]:
    """`encode_many_on_gpu` of values of one shape and dtype, encoded on `device`; `index`:
    their places in the caller's list (for errors). Each value has a slot of `stride`
    bytes (256-aligned, for the checksum's loads) in one input and one output buffer: the
    kernels see a batch of B values as one value of B times as many units."""
    import cupy

    from kvstore.codecs.base import DTYPE_WORDS, ValuesRefused
    from kvstore.codecs.cachegen import _Layout

    first_value = values[0]
    b_n = len(values)
    layers, _, tokens, heads, head_dim = first_value.shape
    lay = _Layout(layers, tokens, heads, head_dim)
    res = codec.resolution(layers, heads).astype(np.float32).reshape(-1)
    nu, dim = lay.units, head_dim
    padded = lay.segments * lay.segment
    item = first_value.element_size()
    nbytes = first_value.numel() * item
    stride = align(max(nbytes, 1), 256)
    idx = np.arange(nu, dtype=np.int64)
    lk, h = idx // heads, idx % heads  # lk = layer * 2 + K/V
    width = heads * head_dim
    one = np.empty((nu, 3), np.int64)
    one[:, 0] = lk * tokens * width + h * head_dim
    one[:, 1] = idx  # resolution [layers, 2, heads], flattened: the unit's own index
    closed = (lk % 2 == 0) & bool(codec.params["k"])
    one[:, 2] = DTYPE_WORDS[first_value.dtype] | closed.astype(np.int64) << 4
    units = np.tile(one, (b_n, 1))
    units[:, 0] += np.repeat(np.arange(b_n, dtype=np.int64) * (stride // item), nu)
    n_units = b_n * nu

    with cupy.cuda.Device(device):
        s = as_cupy_stream(stream) if stream is not None else _own_stream(device)
        keep: list[Any] = []  # pinned staging and host values, alive until copied
        with s:
            src_ptr = stage_values(values, stride, device, s, stream is None, keep)
            back = cupy.empty(max(b_n * stride, 1), cupy.uint8)
            d_units, d_res = _upload([units, res], s, keep)
            d_starts, d_steps, d_symbols, d_counts, d_escapes = quantized_buffers(n_units, lay)
            d_bad = cupy.zeros(n_units, cupy.int32)
            if nu:
                _module.get(device, "quantize")(
                    (n_units,), (align(dim, 32),),
                    (np.uint64(src_ptr), back, d_units, d_res,
                     np.int64(tokens), np.int64(width), np.int64(dim), np.int64(padded),
                     d_starts, d_steps, d_symbols, d_counts, d_escapes, d_bad),
                )  # fmt: skip
            counts32, bad = _download([d_counts, d_bad], s)
            if bad.any():
                reason = (
                    "cachegen needs finite values within float16's range; store this value "
                    "with a lossless codec (raw or zstd)"
                )
                which = {index[int(u) // nu] for u in np.flatnonzero(bad)}
                raise ValuesRefused(_refusal(dict.fromkeys(which, reason)), list(which))
            return code_batch(
                codec, lay, b_n, device, s, keep, d_symbols, counts32, d_starts, d_steps,
                d_escapes, back, stride, nbytes,
            )  # fmt: skip


def quantized_buffers(n_units: int, lay: Any) -> tuple[Any, Any, Any, Any, Any]:
    """The device buffers a batch's quantizer writes and `code_batch` reads, for `n_units`
    units of layout `lay`: each unit's starts and steps (float16 bits, a channel each),
    its symbols over its padded tokens (zeros: the kernels write its tokens' rows only),
    its symbol counts and its escapes (at the start of its region of tokens * dim)."""
    import cupy

    from kvstore.codecs.cachegen import ALPHABET

    dim, padded = lay.head_dim, lay.segments * lay.segment
    return (
        cupy.empty(n_units * dim, cupy.uint16),
        cupy.empty(n_units * dim, cupy.uint16),
        cupy.zeros(n_units * padded * dim, cupy.uint8),
        cupy.empty(n_units * ALPHABET, cupy.int32),
        cupy.empty(max(n_units * lay.tokens * dim, 1), cupy.uint16),
    )


def stage_values(
    values: Sequence[torch.Tensor],
    stride: int,
    device: int,
    s: Any,
    wait: bool,
    keep: list[Any],
    into: int | None = None,
) -> int:
    """The address of `values` (of one shape and dtype) on GPU `device`, a slot of `stride`
    bytes each, copied there on stream `s` (to the device buffer at `into`, else a new one,
    or a CUDA value alone and contiguous: its own); after what torch has queued on the
    device's current stream if `wait` (the work that wrote CUDA values). `keep` gets what
    must live until the copies are done."""
    import cupy

    contiguous = [value.contiguous() for value in values]
    if wait and any(v.is_cuda for v in values):
        # After what torch has queued for the values (the work that wrote them, the copies
        # `contiguous()` made) on its stream, not racing it on our own.
        import torch

        after = torch.cuda.Event()
        after.record(torch.cuda.current_stream(device))
        cupy.cuda.runtime.streamWaitEvent(s.ptr, after.cuda_event, 0)
        keep.append(after)
    first = values[0]
    if into is None and len(values) == 1 and first.is_cuda and first.is_contiguous():
        return int(first.data_ptr())
    nbytes = first.numel() * first.element_size()
    if into is None:
        src = cupy.empty(len(values) * stride, cupy.uint8)
        keep.append(src)
        into = int(src.data.ptr)
    for b, v in enumerate(contiguous):
        keep.append(v)
        _copy(into + b * stride, v.data_ptr(), nbytes, cupy.cuda.runtime.memcpyDefault, s)
    return into


def code_batch(
    codec: CacheGen,
    lay: Any,
    b_n: int,
    device: int,
    s: Any,
    keep: list[Any],
    d_symbols: Any,
    counts32: np.ndarray,
    d_starts: Any,
    d_steps: Any,
    d_escapes: Any,
    back: Any,
    stride: int,
    nbytes: int,
    prefix: np.ndarray | None = None,
) -> list[tuple[memoryview, int]]:
    """The payloads and value checksums of `b_n` values of layout `lay` quantized on GPU
    `device` (on stream `s`, current; `keep` holds what must outlive the copies): their
    units' symbols `[units, padded tokens, dim]`, counts (on the host, int32 `[units,
    ALPHABET]`), starts and steps (float16 bits, a channel each), escapes (each unit's at
    the start of its region of tokens * dim) on the device, and the values they decode to
    (`back`, a slot of `stride` bytes each, `nbytes` of value), each payload after its row of
    `prefix` (`CacheGen.frame_payloads`). The rANS tables, streams and framing, as
    cachegen's CPU encoder makes them."""
    import cupy

    from kvstore.codecs.cachegen import ALPHABET, LANES, PRECISION
    from kvstore.codecs.container import checksum

    nu, tokens, dim = lay.units, lay.tokens, lay.head_dim
    n_units = b_n * nu
    counts = counts32.reshape(n_units, ALPHABET)
    escapes = counts[:, 0].astype(np.int64)
    first = np.zeros(n_units + 1, np.int64)
    np.cumsum(escapes, out=first[1:])
    # Each unit's escapes lie at the start of its region of tokens * dim.
    where = np.repeat(np.arange(n_units) * tokens * dim - first[:-1], escapes)
    where += np.arange(first[-1])
    ns = lay.streams
    n_streams = b_n * ns
    lengths_in = np.tile(lay.stream_lengths(), b_n)
    streams = np.empty((n_streams, 4), np.int64)
    # A unit's streams are consecutive segments of its rows of symbols.
    streams[:, 0] = np.arange(n_streams, dtype=np.int64) * (lay.segment * dim)
    streams[:, 1] = lengths_in
    streams[:, 2] = np.tile(lay.stream_models(), b_n)
    streams[:, 2] += np.repeat(np.arange(b_n, dtype=np.int64) * nu, ns)
    streams[:, 3] = np.cumsum(2 * lengths_in + 4 * LANES)
    slot_bytes = int(streams[-1, 3]) if n_streams else 0
    freqs = np.empty((n_units, ALPHABET), np.uint16)
    # The kernel's tables are made in the pinned buffer they are uploaded from.
    fc = np.empty((n_units, 256), np.uint32)
    mem, (h_streams, h_fc, h_where) = _pinned_like([streams, fc, where])
    keep.append(mem)
    _tables(counts, 1 << PRECISION, freqs, h_fc)
    h_streams[...] = streams
    h_where[...] = where
    d_streams, d_fc, d_where = _to_device([h_streams, h_fc, h_where], s)
    d_slots = cupy.empty(max(slot_bytes, 1), cupy.uint8)
    d_lengths = cupy.empty(max(n_streams, 1), cupy.int64)
    if n_streams:
        _module.get(device, "rans_encode")(
            (-(-n_streams // 128),), (128,),
            (d_symbols, d_streams, np.int64(n_streams), d_fc, d_slots, d_lengths),
        )  # fmt: skip
    big = nbytes > SHORT_MAX
    digests = None
    if big:
        at = np.arange(b_n, dtype=np.uint64) * np.uint64(stride)
        ptrs = np.uint64(back.data.ptr) + at
        digests = xxh3_64_gpu_spans(ptrs, np.full(b_n, nbytes, np.int64), device, s)
    sizes, starts, steps, escaped = _download(
        [d_lengths[:n_streams], d_starts, d_steps, d_escapes[d_where]], s
    )
    if sizes.size and sizes.min() < 0:  # the tables come from the same counts
        raise RuntimeError("cachegen GPU encode: a symbol has no frequency in its table")
    offsets = np.zeros(n_streams + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    d_data = cupy.empty(max(int(offsets[-1]), 1), cupy.uint8)
    if n_streams:
        (d_offsets,) = _upload([offsets], s, keep)
        _module.get(device, "gather_streams")(
            (n_streams,), (128,), (d_slots, d_streams, d_offsets, d_data)
        )
    # Everything but the streams, while the GPU gathers them; then the streams
    # straight into their places (the buffer is pinned), with no copy here.
    frames = codec.frame_payloads(
        lay, b_n, starts, steps, escapes, freqs, offsets, escaped, first, _pinned_bytes, prefix
    )  # fmt: skip
    to_host = cupy.cuda.runtime.memcpyDeviceToHost
    for b in range(b_n):
        o0, o1 = frames.streams(b)
        at_b = frames.out.ctypes.data + int(frames.data_at[b])
        _copy(at_b, d_data.data.ptr + o0, o1 - o0, to_host, s)
    s.synchronize()
    if not big:  # too short for the GPU's checksum: hashed here
        (small,) = _download([back], s)
        sums = [checksum(small[b * stride : b * stride + nbytes].data) for b in range(b_n)]
    else:
        assert digests is not None
        sums = [int(d) for d in digests.result()]
    payloads = frames.payloads()
    return list(zip(payloads, sums, strict=True))
