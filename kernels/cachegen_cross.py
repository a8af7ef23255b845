"""`cachegen-x` decoding on the GPU: bit for bit what the host decoder
(`kvstore.codecs.cachegen_cross`) writes, into the caller's CUDA tensors.

A batch of payloads made with one profile's maps is staged as cachegen's are
(`kvstore.kernels.cachegen.Staged`: copied to the GPU in pieces, the rANS streams decoded
to symbols, each stream's escapes counted), then the layers run in order, each over every
value of the batch (in two halves on two streams once the batch has `SPLIT_ROWS` tokens,
so one half's GEMM runs beside the other's reconstruction):

1. layer l >= 1's prediction: a GEMM of the batch's rows of layer l-1 (as integers: its
   decoded channels times a power of two, rounded, clipped to the maps' input limit) by
   the layer's integer map, exact whatever order cuBLAS sums in
   (`kvstore.codecs.cachegen_profile.CrossLayer.predict`): for 8-bit maps cuBLAS's int8
   GemmEx (int8 inputs, int32 sums: the tensor cores' integer kernels, on the launch's
   stream through `kvstore.kernels._cublas`); for 16-bit maps (or channels not a multiple
   of 8) its float64 GemmEx, every partial sum an integer below 2^53;
2. `reconstruct_x_J` (`reconstruct_x8_J` reading int32 products and writing int8 inputs,
   where the float64 one moves 8 bytes for each): a warp per (value, K/V, head, 32-token
   segment), each lane J of the head's channels: value = (prediction + start) + (symbol -
   127) * step in float32, or the unit's next escaped value (a segment starts past the
   escapes its unit's earlier segments' streams counted; within a token they rank by
   ballot); writes the integer input of the next layer's GEMM, and the output: V as it is, K
   rotated back by the float32 cos / sin of its positions (computed on the host as the host
   decoder computes them) with each product and sum rounded (`__fmul_rn`, `__fadd_rn`: NVRTC
   would otherwise fuse them), then rounded to the output dtype.

On an H200, 220 real SmolLM2 chunks (1.19 GB out): 71.3 GB/s of GPU time with 8-bit maps
(54.5 with float64 GEMMs; 37.4 with a CTA per unit walking all its tokens, one copy then
one rANS kernel, and one stream). torch's `_int_mm` on the same buffers (its stream set to
the launch's) was as fast but decoded wrong now and then across calls: not used.

`decode_x_on_gpu(jobs, stream)` has `decode_on_gpu`'s contract (`kvstore.kernels.cachegen`):
a handle whose `wait()` raises ContainerError for a damaged stream or a value that fails
its checksum.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from kvstore.kernels._cuda import KernelModule, with_values
from kvstore.kernels.cachegen import (
    CUDA_ESCAPES,
    GpuDecode,
    Job,
    Launch,
    Staged,
    _runs,
    checked_jobs,
)
from kvstore.kernels.floatbits import CUDA_FLOATBITS
from kvstore.threads import host_pool

if TYPE_CHECKING:
    from kvstore.codecs.cachegen_cross import CacheGenX

# The value's first row in the batch, the unit's first channel, K (0) or V, its first rANS
# stream (a segment of its tokens each) and the tokens in a segment.
_XUNIT_FIELDS = 5

_CUDA_SOURCE = r"""
#define CENTER @CENTER@
#define BAD_ESCAPES 5
#define WARPS @WARPS@
#define FULL 0xFFFFFFFFu

// What a lane reads for P tokens of its J channels before it reconstructs them.
template <int J, int P> struct Ahead {
    int s[P][J];
    double a[P][J];
    float co[P][J], si[P][J];
};

template <int J, int P, typename A>
__device__ __forceinline__ void read_ahead(Ahead<J, P>& b, long long t0, long long tokens,
                                           const bool* ok, const int* c, const long long* hc,
                                           const unsigned char* sym, long long dim,
                                           const A* acc, long long row0, long long chan,
                                           long long channels, bool is_k, long long half,
                                           const float* cosines, const float* sines) {
#pragma unroll
    for (int p = 0; p < P; ++p) {
        const long long t = t0 + p;
#pragma unroll
        for (int j = 0; j < J; ++j) {
            const bool m = t < tokens && ok[j];
            b.s[p][j] = m ? (int)sym[t * dim + c[j]] : CENTER;
            b.a[p][j] = (m && acc) ? (double)acc[(row0 + t) * channels + chan + c[j]] : 0.0;
            const long long r = (row0 + t) * half + hc[j];
            b.co[p][j] = (m && is_k) ? cosines[r] : 0.f;
            b.si[p][j] = (m && is_k) ? sines[r] : 0.f;
        }
    }
}

// A warp per segment (a rANS stream's tokens) of a unit (value, K/V, head) of one layer;
// lane l holds channels l, l + 32, ... (J of them), so a token's escapes rank with ballots
// alone and a K channel's RoPE partner (channel +- dim / 2) is in the same lane when
// dim = 32 J, in the warp's shared row otherwise. Each lane reads P tokens ahead of the
// ones it reconstructs. A: the product's type (double from cuBLAS's float64 GEMM, int from
// an int8 one); N: the next layer's inputs' (double, or signed char for an int8 GEMM).
template <int J, int P, typename A, typename N>
__device__ __forceinline__ void recon_x(const long long* __restrict__ units,
                                        const long long* __restrict__ xunits,
                                        const long long* __restrict__ order, long long n_order,
                                        long long segments, const int* __restrict__ zeros,
                                        const unsigned char* __restrict__ symbols,
                                        const float* __restrict__ starts,
                                        const float* __restrict__ steps,
                                        const float* __restrict__ escaped,
                                        const A* __restrict__ acc,
                                        const double* __restrict__ out_scale,
                                        const float* __restrict__ in_scale,
                                        N* __restrict__ next,
                                        const float* __restrict__ cosines,
                                        const float* __restrict__ sines,
                                        long long channels, float limit,
                                        int* __restrict__ status) {
    __shared__ float pair[WARPS][32 * J];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long w = (long long)blockIdx.x * WARPS + warp;
    const long long slot = w / segments, seg = w % segments;
    if (slot >= n_order) return;  // the whole warp: nothing below syncs the CTA
    const long long unit = order[slot];
    const long long* u = units + unit * 9;
    const long long* x = xunits + unit * 5;
    const long long stride = u[1], tokens = u[3], dim = u[4];
    const long long seg_tokens = x[4];
    const long long t_begin = seg * seg_tokens;
    const long long t_end = min(tokens, t_begin + seg_tokens);
    const bool last_seg = t_end == tokens;
    if (t_begin >= tokens && seg) return;  // a shorter unit than the batch's longest
    const int kind = (int)(u[8] & 15);
    const long long row0 = x[0], chan = x[1];
    const bool is_k = x[2] == 0;
    const long long half = dim / 2;
    const bool same_lane = dim == 32 * J && J % 2 == 0;
    const unsigned char* sym = symbols + u[2];
    const unsigned below = (1u << lane) - 1;
    bool ok[J];
    int c[J];
    long long hc[J];
    float start[J], step[J], iscale[J];
    double oscale[J];
#pragma unroll
    for (int j = 0; j < J; ++j) {
        c[j] = lane + 32 * j;
        ok[j] = c[j] < dim;
        hc[j] = c[j] < half ? c[j] : c[j] - half;
        start[j] = ok[j] ? starts[u[5] + c[j]] : 0.f;
        step[j] = ok[j] ? steps[u[5] + c[j]] : 0.f;
        oscale[j] = (ok[j] && acc) ? out_scale[chan + c[j]] : 0.0;
        iscale[j] = (ok[j] && next) ? in_scale[chan + c[j]] : 0.f;
    }
    // This segment's first escape: the unit's, past the escapes of its segments before
    // (each rANS stream, a segment of a unit, counted its own).
    int before_seg = 0;
    for (long long i = lane; i < seg; i += 32) before_seg += zeros[x[3] + i];
    long long e = u[6] + __reduce_add_sync(FULL, before_seg);
    const long long e_end = u[7];
    bool bad = false;
    char* out = (char*)u[0];
    Ahead<J, P> cur, ahead;
    read_ahead<J, P, A>(cur, t_begin, t_end, ok, c, hc, sym, dim, acc, row0, chan, channels, is_k,
                     half, cosines, sines);
    for (long long t0 = t_begin; t0 < t_end; t0 += P) {
        if (t0 + P < t_end)
            read_ahead<J, P, A>(ahead, t0 + P, t_end, ok, c, hc, sym, dim, acc, row0, chan,
                             channels, is_k, half, cosines, sines);
#pragma unroll
        for (int p = 0; p < P; ++p) {
            const long long t = t0 + p;
            if (t >= t_end) break;
            float v[J];
            unsigned ballots[J], any = 0;
#pragma unroll
            for (int j = 0; j < J; ++j) {
                const float pred = (float)(cur.a[p][j] * oscale[j]);
                v[j] = __fadd_rn(__fadd_rn(pred, start[j]),
                                 __fmul_rn((float)(cur.s[p][j] - CENTER), step[j]));
                ballots[j] = __ballot_sync(FULL, ok[j] && cur.s[p][j] == 0);
                any |= ballots[j];
            }
            if (any) {  // escapes, in channel order: ranked by the ballots
                long long before = e;
#pragma unroll
                for (int j = 0; j < J; ++j) {
                    if ((ballots[j] >> lane) & 1) {
                        const long long k = before + __popc(ballots[j] & below);
                        if (k < e_end) v[j] = escaped[k]; else bad = true;
                    }
                    before += __popc(ballots[j]);
                }
                e = before;
            }
#pragma unroll
            for (int j = 0; j < J; ++j) {
                const long long at = (row0 + t) * channels + chan + c[j];
                if (ok[j] && next)
                    next[at] = (N)fminf(fmaxf(rintf(__fmul_rn(v[j], iscale[j])), -limit), limit);
            }
            if (is_k) {
                float partner[J];
                if (same_lane) {
#pragma unroll
                    for (int j = 0; j < J; ++j) partner[j] = v[(j + J / 2) % J];
                } else {
#pragma unroll
                    for (int j = 0; j < J; ++j) if (ok[j]) pair[warp][c[j]] = v[j];
                    __syncwarp();
#pragma unroll
                    for (int j = 0; j < J; ++j)
                        partner[j] = ok[j] ? pair[warp][c[j] < half ? c[j] + half : c[j] - half]
                                           : 0.f;
                    __syncwarp();  // the row is rewritten for the next token
                }
#pragma unroll
                for (int j = 0; j < J; ++j) {
                    const float co = cur.co[p][j], sn = cur.si[p][j];
                    const float o = c[j] < half
                        ? __fsub_rn(__fmul_rn(v[j], co), __fmul_rn(partner[j], sn))
                        : __fadd_rn(__fmul_rn(v[j], co), __fmul_rn(partner[j], sn));
                    if (ok[j]) store_value(out, kind, t * stride + c[j], o);
                }
            } else {
#pragma unroll
                for (int j = 0; j < J; ++j)
                    if (ok[j]) store_value(out, kind, t * stride + c[j], v[j]);
            }
        }
        if (t0 + P < t_end) cur = ahead;
    }
    if (bad || (lane == 0 && last_seg && e != e_end)) status[unit] = BAD_ESCAPES;
}

#define RECONSTRUCT_X(NAME, J, P, A, N)                                                       \
    extern "C" __global__ void __launch_bounds__(32 * WARPS) NAME(                            \
        const long long* units, const long long* xunits, const long long* order,             \
        long long n_order, long long segments, const int* zeros,                             \
        const unsigned char* symbols, const float* starts,                                   \
        const float* steps, const float* escaped, const A* acc, const double* out_scale,     \
        const float* in_scale, N* next, const float* cosines, const float* sines,            \
        long long channels, float limit, int* status) {                                      \
        recon_x<J, P, A, N>(units, xunits, order, n_order, segments, zeros, symbols, starts, \
                            steps, escaped, acc, out_scale, in_scale, next, cosines, sines,  \
                            channels, limit, status);                                        \
    }
@INSTANCES@
"""


# reconstruct_x_J for heads of up to 32 J channels, reading P = 4 / J tokens ahead (a lane's
# registers hold 4 of its channel-tokens ahead, whatever the head size).
_LANE_CHANNELS = (1, 2, 4, 8, 16, 32)
_WARPS = 4  # units (warps) a CTA of reconstruct_x
SPLIT_ROWS = 8192  # a batch of at least this many tokens runs as two halves (`_decode_batch`)


def _source() -> str:
    from kvstore.codecs import cachegen

    instances = "\n".join(
        f"RECONSTRUCT_X({_kernel_for(32 * j, int8)}, {j}, {max(1, 4 // j)}, "
        + ("int, signed char)" if int8 else "double, double)")
        for j in _LANE_CHANNELS
        for int8 in (False, True)
    )
    return with_values(
        CUDA_FLOATBITS + CUDA_ESCAPES + _CUDA_SOURCE,
        {"@CENTER@": cachegen.CENTER, "@WARPS@": _WARPS, "@INSTANCES@": instances},
    )


def _kernel_for(dim: int, int8: bool) -> str:
    """The reconstruct_x instance for heads of `dim` channels (at most 1024), reading an
    int8 GEMM's product and writing int8 inputs (`int8`) or float64's."""
    j = next(j for j in _LANE_CHANNELS if 32 * j >= dim)
    return f"reconstruct_x{'8' if int8 else ''}_{j}"


_module = KernelModule(
    _source, tuple(_kernel_for(32 * j, i8) for j in _LANE_CHANNELS for i8 in (False, True))
)


@dataclass(frozen=True)
class _DeviceMaps:
    """A profile's maps and scales on one GPU (`_device_maps`)."""

    maps: Any  # [layers - 1, C, C]: int8, each layer's transposed where `_int8_gemm`; else float64
    ins: Any  # float32 [layers - 1, C]: input scales
    outs: Any  # float64 [layers - 1, C]: output scales
    kv: Any = None  # kv maps [layers, C / 2, C / 2], laid out as `maps`; None without
    v_out0: Any = None  # float64 [C]: layer 0's V output scales (`CrossLayer.v_out_scale`)


# Each GPU's copy of a profile's maps and scales, by digest; never dropped: the cachegen-x
# encoder's CUDA graphs (`cachegen_cross_encode._Plan`) hold their addresses.
_maps: dict[tuple[int, str], _DeviceMaps] = {}
_maps_lock = threading.Lock()


def _int8_gemm(cross: Any) -> bool:
    """Whether `cross`'s products run as int8 GEMMs on the GPU: 8-bit maps whose channels
    are a multiple of 8 (cuBLAS's leading dimensions); float64 GEMMs otherwise (exact too)."""
    return bool(cross.map_bits == 8 and cross.channels % 8 == 0)


def _device_maps(cross: Any, device: int) -> _DeviceMaps:
    """`cross`'s maps and scales on GPU `device`, uploaded once."""
    import cupy

    def laid_out(m: np.ndarray) -> Any:
        if _int8_gemm(cross):  # the "TN" layout cuBLAS's int8 kernels take
            return cupy.asarray(np.ascontiguousarray(m.transpose(0, 2, 1)))
        return cupy.asarray(m.astype(np.float64))

    key = (device, cross.digest)
    with _maps_lock:
        got = _maps.get(key)
        if got is None:
            with cupy.cuda.Device(device):
                ins, outs = cupy.asarray(cross.in_scale), cupy.asarray(cross.out_scale)
                got = _DeviceMaps(laid_out(cross.maps), ins, outs)
                if cross.has_kv:
                    got = replace(
                        got, kv=laid_out(cross.kv_maps), v_out0=cupy.asarray(cross.v_out_scale(0))
                    )
            _maps[key] = got
    return got


def _x(job: Job) -> CacheGenX:
    return cast("CacheGenX", job.codec)


class AllOf:
    """Several batches' handles as one (`wait()` waits for each, raising the first error)."""

    def __init__(self, handles: Sequence[GpuDecode]) -> None:
        self.handles = list(handles)

    def is_done(self) -> bool:
        return all(h.is_done() for h in self.handles)

    def wait(self) -> None:
        for h in self.handles:
            h.wait()


def decode_x_on_gpu(jobs: Sequence[Job | tuple[Any, ...]], stream: Any = None) -> GpuDecode | AllOf:
    """Launch the decoding of cachegen-x `jobs` (all on one GPU) on `stream` and return its
    handle (`kvstore.kernels.cachegen.decode_on_gpu`'s contract): a batch per profile's maps
    among them, one after another on the stream."""
    todo = checked_jobs(jobs, "cachegen-x")
    groups: dict[str, list[Job]] = {}
    for j in todo:
        groups.setdefault(_x(j).cross.digest, []).append(j)
    handles = [_decode_batch(group, stream) for group in groups.values()]
    return handles[0] if len(handles) == 1 else AllOf(handles)


def _decode_batch(todo: list[Job], stream: Any) -> GpuDecode:
    """`decode_x_on_gpu` of jobs that share one profile's maps."""
    import cupy

    from kvstore.codecs.cachegen_cross import rope_tables
    from kvstore.codecs.cachegen_profile import input_row

    cross = _x(todo[0]).cross

    # The tables stay packed: Staged unpacks the batch's at once.
    parsed = list(host_pool().map(lambda j: _x(j).parse(j.payload, j.out.shape, False), todo))
    positions = [p for p, _ in parsed]
    lays = [p.layout for _, p in parsed]
    layers, heads, dim = cross.layers, cross.heads, cross.head_dim
    half, ch = dim // 2, cross.channels
    row_at = [0, *np.cumsum([lay.tokens for lay in lays]).tolist()]  # each value's first row
    rows = row_at[-1]
    per_layer = len(todo) * 2 * heads
    segments = max(1, *(lay.segments for lay in lays))  # a warp per (unit, segment)
    staged = Staged(
        todo,
        [p for _, p in parsed],
        {
            "xunits": 8 * _XUNIT_FIELDS * sum(lay.units for lay in lays),
            "order": 8 * layers * per_layer,
            "cos": 4 * max(rows * half, 1),
            "sin": 4 * max(rows * half, 1),
        },
    )
    xunits = staged.view("xunits", np.int64).reshape(-1, _XUNIT_FIELDS)
    # Each layer's units in launch order: a value's K and V heads together, or with kv maps
    # (V predicted from K too) every value's K heads, then every value's V heads.
    kv_maps = cross.has_kv
    order = staged.view("order", np.int64)
    order = order.reshape((layers, 2, len(todo), heads) if kv_maps else (layers, len(todo), -1))
    cosines, sines = staged.view("cos", np.float32), staged.view("sin", np.float32)
    for i0, i1 in _runs(lays):  # each run of values with one layout at once
        lay, k, u_at = lays[i0], i1 - i0, staged.u_at
        idx = np.arange(lay.units, dtype=np.int64)
        kv = idx // heads % 2
        xu = xunits[u_at[i0] : u_at[i1]].reshape(k, lay.units, _XUNIT_FIELDS)
        xu[:, :, 0] = np.asarray(row_at[i0:i1], np.int64)[:, None]
        xu[:, :, 1] = kv * heads * dim + idx % heads * dim
        xu[:, :, 2] = kv
        xu[:, :, 3] = np.asarray(staged.s_at[i0:i1], np.int64)[:, None] + idx * lay.segments
        xu[:, :, 4] = lay.segment
        u0 = np.asarray(u_at[i0:i1], np.int64)[:, None]
        if kv_maps:
            order[:, :, i0:i1] = u0 + idx.reshape(layers, 2, 1, heads)
        else:
            order[:, i0:i1] = u0 + idx.reshape(layers, 1, 2 * heads)
    for i, lay in enumerate(lays):
        row = row_at[i]
        cos, sin = rope_tables(cross, positions[i], lay.tokens)
        cosines[row * half : (row + lay.tokens) * half] = cos.reshape(-1)
        sines[row * half : (row + lay.tokens) * half] = sin.reshape(-1)

    # Two halves of the batch (by rows, at a value's edge) on two streams, so one half's
    # GEMM (tensor cores) runs beside the other's reconstruction (memory).
    mid = int(np.searchsorted(row_at, rows / 2)) if rows >= SPLIT_ROWS and len(todo) > 1 else 0
    halves = [(0, mid), (mid, len(todo))] if 0 < mid < len(todo) else [(0, len(todo))]
    int8 = _int8_gemm(cross)

    def values(launch: Launch) -> None:
        dm = _device_maps(cross, launch.device)
        maps, ins, outs = dm.maps, dm.ins, dm.outs
        limit = np.float32(cross.input_limit)
        # int8 GEMMs: int8 inputs, int32 products; else float64 for both.
        acc = cupy.empty((rows, ch), cupy.int32 if int8 else cupy.float64)
        inputs = [cupy.empty((rows, ch), cupy.int8 if int8 else cupy.float64) for _ in range(2)]
        launch.keep += [acc, *inputs]
        fn = _module.get(launch.device, _kernel_for(dim, int8))
        streams = [launch.stream]
        if len(halves) == 2:
            streams.append(cupy.cuda.Stream(non_blocking=True))
            streams[1].wait_event(launch.stream.record())
            launch.keep.append(streams[1])
        null = np.uint64(0)

        def reconstruct(
            st: Any, first: int, n_order: int, product: bool, out_scale: Any, ins: Any, here: Any
        ) -> None:
            # Units order[first:first + n_order] of one layer against `acc` (if `product`)
            # scaled by `out_scale`, writing the next map's inputs into `here` (if not None).
            fn(
                (-(-n_order * segments // _WARPS),),
                (32 * _WARPS,),
                (launch.ptr("units"), launch.ptr("xunits"),
                 np.uint64(launch.base + launch.at["order"] + 8 * first),
                 np.int64(n_order), np.int64(segments), np.uint64(launch.zeros),
                 launch.symbols, launch.ptr("starts"), launch.ptr("steps"),
                 launch.ptr("escaped"),
                 np.uint64(acc.data.ptr) if product else null,
                 np.uint64(out_scale.data.ptr) if product else null,
                 null if here is None else np.uint64(ins.data.ptr),
                 null if here is None else np.uint64(here.data.ptr),
                 launch.ptr("cos"), launch.ptr("sin"), np.int64(ch), limit,
                 launch.unit_status),
                stream=st,
            )  # fmt: skip

        n_values, hc = len(todo), ch // 2
        for layer in range(layers):
            below, here = inputs[(layer + 1) % 2], inputs[layer % 2]
            last = layer == layers - 1
            at = layer * per_layer
            for (v0, v1), st in zip(halves, streams, strict=True):
                r0, r1 = row_at[v0], row_at[v1]
                if layer and r1 > r0:
                    with st:
                        _product(below[r0:r1], maps[layer - 1], acc[r0:r1], int8)
                scale = outs[layer - 1] if layer else None
                nxt = None if last else here
                scale_in = ins[input_row(layer, layers)]
                if not kv_maps:
                    n = (v1 - v0) * 2 * heads
                    reconstruct(st, at + v0 * 2 * heads, n, layer > 0, scale, scale_in, nxt)
                    continue
                # K's units (their inputs always written: V's kv map reads them), then
                # V's against the product plus K's times the kv map.
                n = (v1 - v0) * heads
                reconstruct(st, at + v0 * heads, n, layer > 0, scale, scale_in, here)
                if r1 > r0:
                    with st:
                        _kv_product(here[r0:r1], dm.kv[layer], acc[r0:r1], hc, layer > 0, int8)
                v_scale = scale if layer else dm.v_out0
                first = at + n_values * heads + v0 * heads
                reconstruct(st, first, n, True, v_scale, scale_in, nxt)
        if len(streams) == 2:
            launch.stream.wait_event(streams[1].record())

    return staged.launch(stream, values)


def _product(x: Any, m: Any, out: Any, int8: bool) -> None:
    """out ([rows, C]) = x ([rows, C]) @ a layer's map `m` (laid out as `_device_maps` has
    it), exact, on the current CuPy stream: int8 inputs and int32 sums, or float64."""
    rows, ch = x.shape
    _gemm(x.data.ptr, ch, m.data.ptr, ch, out.data.ptr, ch, rows, False, int8)


def _kv_product(x: Any, kv: Any, acc: Any, half: int, add: bool, int8: bool) -> None:
    """acc[:, half:] (+)= x[:, :half] @ the kv map `kv` (laid out as `_device_maps` has
    it), exact, on the current CuPy stream: V's part of a layer's product with kv maps
    (`add`: onto the map's product; layer 0: in its place)."""
    rows, ch = x.shape
    at = acc.data.ptr + half * acc.dtype.itemsize
    _gemm(x.data.ptr, ch, kv.data.ptr, half, at, ch, rows, add, int8)


def _gemm(
    x: int, ldx: int, m: int, k: int, out: int, ldo: int, rows: int, add: bool, int8: bool
) -> None:
    """out ([rows, k], row stride `ldo`) (+)= x ([rows, k], row stride `ldx`) @ the square
    map at `m` ([k, k] as `_device_maps` lays it out), exact (addresses as ints): cuBLAS's
    GemmEx on the current CuPy stream (`kvstore.kernels._cublas`: it may be capturing a
    CUDA graph), column-major, as out^T = map^T x^T. int8: int8 inputs and int32 sums, the
    map stored transposed and read transposed ("TN", what the integer kernels take); else
    float64 throughout (integers: exact in any order)."""
    from kvstore.kernels import _cublas as cb

    one, zero = _SCALARS[int8]
    if int8:
        a, c, compute = cb.R_8I, cb.R_32I, cb.COMPUTE_32I
    else:
        a, c, compute = cb.R_64F, cb.R_64F, cb.COMPUTE_64F
    cb.gemm_ex(
        cb.OP_T if int8 else cb.OP_N, k, rows, k, one, m, a, k, x, ldx, one if add else zero,
        out, c, ldo, compute,
    )  # fmt: skip


_SCALARS: dict[bool, tuple[np.ndarray, np.ndarray]] = {
    False: (np.ones(1, np.float64), np.zeros(1, np.float64)),
    True: (np.ones(1, np.int32), np.zeros(1, np.int32)),
}
