"""`cachegen-x` decoding on the GPU: bit for bit what the host decoder
(`kvstore.codecs.cachegen_cross`) writes, into the caller's CUDA tensors.

A batch of payloads made with one profile's maps is staged as cachegen's are
(`kvstore.kernels.cachegen.Staged`: one copy to the GPU, the rANS streams decoded to
symbols), then the layers run in order, each over every value of the batch:

1. layer l >= 1's prediction: cuBLAS's float64 GEMM of the batch's rows of layer l-1 (as
   integers: its decoded channels times a power of two, rounded, clipped to +-32767) by
   the layer's integer map: exact, whatever order cuBLAS sums in, since every partial sum
   is an integer below 2^53 (`kvstore.codecs.cachegen_profile.CrossLayer.predict`);
2. `reconstruct_x`: a CTA per (value, K/V, head), a thread per channel, walks the tokens:
   value = (prediction + start) + (symbol - 127) * step in float32, or the unit's next
   escaped value; writes the integer input of the next layer's GEMM, and the output: V as
   it is, K rotated back by the float32 cos / sin of its positions (computed on the host
   as the host decoder computes them) with each product and sum rounded (`__fmul_rn`,
   `__fadd_rn`: NVRTC would otherwise fuse them), then rounded to the output dtype.

`decode_x_on_gpu(jobs, stream)` has `decode_on_gpu`'s contract (`kvstore.kernels.cachegen`):
a handle whose `wait()` raises ContainerError for a damaged stream or a value that fails
its checksum.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from kvstore.kernels._cuda import KernelModule, align, with_values
from kvstore.kernels.cachegen import (
    _RECON_THREADS,
    CUDA_ESCAPES,
    GpuDecode,
    Job,
    Launch,
    Staged,
    checked_jobs,
)
from kvstore.kernels.floatbits import CUDA_FLOATBITS
from kvstore.threads import host_pool

if TYPE_CHECKING:
    from kvstore.codecs.cachegen_cross import CacheGenX

_XUNIT_FIELDS = 3  # the value's first row in the batch, the unit's first channel, K (0) or V

_CUDA_SOURCE = r"""
#define CENTER @CENTER@
#define BAD_ESCAPES 5

extern "C" __global__ void reconstruct_x(const long long* __restrict__ units,
                                         const long long* __restrict__ xunits,
                                         const long long* __restrict__ order,
                                         const unsigned char* __restrict__ symbols,
                                         const float* __restrict__ starts,
                                         const float* __restrict__ steps,
                                         const float* __restrict__ escaped,
                                         const double* __restrict__ acc,
                                         const double* __restrict__ out_scale,
                                         const float* __restrict__ in_scale,
                                         double* __restrict__ next,
                                         const float* __restrict__ cosines,
                                         const float* __restrict__ sines,
                                         long long channels,
                                         int* __restrict__ status) {
    __shared__ int warp_escapes[32];
    __shared__ float k[1024];
    const long long unit = order[blockIdx.x];
    const long long* u = units + unit * 9;
    const long long* x = xunits + unit * 3;
    const long long stride = u[1], tokens = u[3], dim = u[4];
    const int kind = (int)(u[8] & 15);
    const long long row0 = x[0], chan = x[1];
    const bool is_k = x[2] == 0;
    const int d = threadIdx.x;
    const bool mine = d < dim;
    const long long half = dim / 2;
    const unsigned char* sym = symbols + u[2] + d;
    float start = 0.f, step = 0.f, iscale = 0.f;
    double oscale = 0.0;
    if (mine) {
        start = starts[u[5] + d];
        step = steps[u[5] + d];
        if (acc) oscale = out_scale[chan + d];
        if (next) iscale = in_scale[chan + d];
    }
    long long e = u[6];
    const long long e_end = u[7];
    bool bad = false;
    char* out = (char*)u[0];
    for (long long t = 0; t < tokens; ++t) {
        const int s = mine ? sym[t * dim] : CENTER;
        const long long at = (row0 + t) * channels + chan + d;
        const float pred = (mine && acc) ? (float)(acc[at] * oscale) : 0.f;
        float v = __fadd_rn(__fadd_rn(pred, start), __fmul_rn((float)(s - CENTER), step));
        v = take_escape(mine && s == 0, v, escaped, &e, e_end, &bad, warp_escapes);
        if (mine && next) {
            float q = rintf(__fmul_rn(v, iscale));
            next[at] = (double)fminf(fmaxf(q, -32767.f), 32767.f);
        }
        if (is_k) {
            if (mine) k[d] = v;
            __syncthreads();
            if (mine) {
                const long long r = (row0 + t) * half + (d < half ? d : d - half);
                const float c = cosines[r], sn = sines[r];
                const float o = d < half
                    ? __fsub_rn(__fmul_rn(v, c), __fmul_rn(k[d + half], sn))
                    : __fadd_rn(__fmul_rn(v, c), __fmul_rn(k[d - half], sn));
                store_value(out, kind, t * stride + d, o);
            }
            __syncthreads();
        } else if (mine) {
            store_value(out, kind, t * stride + d, v);
        }
    }
    if (bad || (d == 0 && e != e_end)) status[unit] = BAD_ESCAPES;
}
"""


def _source() -> str:
    from kvstore.codecs import cachegen

    return with_values(CUDA_FLOATBITS + CUDA_ESCAPES + _CUDA_SOURCE, {"@CENTER@": cachegen.CENTER})


_module = KernelModule(_source, ("reconstruct_x",))

# Each GPU's copy of a profile's maps (float64) and scales, by digest.
_maps: dict[tuple[int, str], tuple[Any, Any, Any]] = {}
_maps_lock = threading.Lock()


def _device_maps(cross: Any, device: int) -> tuple[Any, Any, Any]:
    """(maps float64 [layers - 1, C, C], input scales float32, output scales float64) of
    `cross` on GPU `device`, uploaded once."""
    import cupy

    key = (device, cross.digest)
    with _maps_lock:
        got = _maps.get(key)
        if got is None:
            with cupy.cuda.Device(device):
                maps = cupy.asarray(cross.maps.astype(np.float64))
                ins = cupy.asarray(np.ldexp(np.float32(1), cross.in_exp.astype(np.int32)))
                outs = cupy.asarray(np.ldexp(1.0, -cross.out_exp.astype(np.int32)))
            got = _maps[key] = (maps, ins, outs)
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

    cross = _x(todo[0]).cross

    parsed = list(host_pool().map(lambda j: _x(j).parse(j.payload, j.out.shape), todo))
    positions = [p for p, _ in parsed]
    lays = [p.layout for _, p in parsed]
    layers, heads, dim = cross.layers, cross.heads, cross.head_dim
    half, ch = dim // 2, cross.channels
    rows = sum(lay.tokens for lay in lays)
    per_layer = len(todo) * 2 * heads
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
    order = staged.view("order", np.int64).reshape(layers, len(todo), 2 * heads)
    cosines, sines = staged.view("cos", np.float32), staged.view("sin", np.float32)
    row = 0
    for i, lay in enumerate(lays):
        u0 = staged.u_at[i]
        idx = np.arange(lay.units, dtype=np.int64)
        kv = idx // heads % 2
        xu = xunits[u0 : u0 + lay.units]
        xu[:, 0] = row
        xu[:, 1] = kv * heads * dim + idx % heads * dim
        xu[:, 2] = kv
        order[:, i] = u0 + idx.reshape(layers, 2 * heads)
        cos, sin = rope_tables(cross, positions[i], lay.tokens)
        cosines[row * half : (row + lay.tokens) * half] = cos.reshape(-1)
        sines[row * half : (row + lay.tokens) * half] = sin.reshape(-1)
        row += lay.tokens

    def values(launch: Launch) -> None:
        maps, ins, outs = _device_maps(cross, launch.device)
        acc = cupy.empty((rows, ch), cupy.float64)
        inputs = [cupy.empty((rows, ch), cupy.float64) for _ in range(2)]
        launch.keep += [acc, *inputs]
        fn = _module.get(launch.device, "reconstruct_x")
        null = np.uint64(0)
        for layer in range(layers):
            below, here = inputs[(layer + 1) % 2], inputs[layer % 2]
            if layer and rows:
                cupy.matmul(below, maps[layer - 1], out=acc)
            last = layer == layers - 1
            fn(
                (per_layer,),
                (align(dim, _RECON_THREADS),),
                (launch.ptr("units"), launch.ptr("xunits"),
                 np.uint64(launch.base + launch.at["order"] + 8 * layer * per_layer),
                 launch.symbols, launch.ptr("starts"), launch.ptr("steps"),
                 launch.ptr("escaped"),
                 np.uint64(acc.data.ptr) if layer else null,
                 np.uint64(outs[layer - 1].data.ptr) if layer else null,
                 null if last else np.uint64(ins[layer].data.ptr),
                 null if last else np.uint64(here.data.ptr),
                 launch.ptr("cos"), launch.ptr("sin"), np.int64(ch), launch.unit_status),
                stream=launch.stream,
            )  # fmt: skip

    return staged.launch(stream, values)
