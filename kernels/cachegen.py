"""`cachegen` decoding on the GPU: rANS streams to symbols to values, written straight into
the caller's CUDA tensors, bit for bit what the CPU decoder (`kvstore.codecs.cachegen`)
writes.

A batch of payloads decodes in two kernels from one pinned buffer of everything they need
(the streams' bytes, the frequency tables, per-channel starts and steps, the escapes' values
and small descriptor tables), copied to the GPU in pieces of about `PIECE_BYTES` of stream
data so the rANS kernel of one piece runs while the next is copied (`Staged`):

1. `rans_decode`: a CTA per group of `GROUP_UNITS` units (layer, K/V, head) first builds
   their decode tables in shared memory (slot -> symbol, and per symbol its frequency and
   cumulative frequency: 5 KiB a unit), then runs a thread per rANS stream
   (`SEGMENT_TOKENS` tokens of one unit), its lanes interleaved as the CPU decoder does.
   Symbols go to a scratch buffer four at a time, and each stream's count of escapes
   (symbol 0) to another, for a second stage that splits a unit's tokens (cachegen-x's); a
   stream that is truncated or inconsistent records why in a status word in pinned host
   memory. (Tables in global
   memory, 16 KiB a unit, outweighed the symbols of short chunks and thrashed the caches:
   a whole batch decoded at 26.6 GB/s on the H100 that way; with shared-memory tables the
   rANS kernel alone runs at 144 GB/s and the batch at 62-70 GB/s on the H100 and H200, and
   at ~100 GB/s on the H200 once the copy hides under the kernel.)
2. `reconstruct`: a CTA per unit with a thread per channel walks the tokens: value =
   prediction + (symbol - 127) * step in float32, the previous token's value the prediction
   for K (closed-loop DPCM), the channel mean for V; escapes take the next stored value of
   their unit in (token, channel) order, ranked with a warp ballot. Each value is rounded to
   the output dtype (float16, bfloat16 or float32, to nearest even) as the CPU rounds it.

The product (symbol - 127) * step is exact in float32, so a fused multiply-add gives the
same bits as the CPU's separate operations.

`decode_on_gpu(jobs, stream)` launches a batch and returns a `GpuDecode` whose `wait()`
raises `ContainerError` for a damaged stream, or for a value whose checksum (XXH3-64 on the
GPU, `kvstore.kernels.checksum`) does not match its container's.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from kvstore.kernels._cuda import KernelModule, align, with_values
from kvstore.kernels.blocks import DeviceBuffer, as_cupy_stream
from kvstore.kernels.checksum import SHORT_MAX, _keep_until_done, xxh3_64_gpu
from kvstore.kernels.floatbits import CUDA_FLOATBITS
from kvstore.threads import host_pool

if TYPE_CHECKING:
    import torch

    from kvstore.codecs.cachegen import CacheGen

SLOTS = 1 << 12  # decode table entries: 2**PRECISION (checked against the codec's below)
GROUP_UNITS = 8  # units whose tables a CTA of rans_decode holds: 8 x 5 KiB of shared memory
_STREAM_FIELDS = 5  # data start, data end, unit, symbol offset, symbol count
_UNIT_FIELDS = 9  # out address, token stride, symbol offset, tokens, dim, channel, escapes
#                   first and end, flags (dtype kind | closed loop << 4)
_RECON_THREADS = 32  # a unit's CTA: its channels, rounded up to warps
PIECE_BYTES = 16 << 20  # a batch's stream data is copied and decoded in pieces of this size
MAX_PIECES = 8

CUDA_ESCAPES = r"""
// This token's escapes ranked in channel order across the CTA, with a warp ballot (every
// thread calls it, when any thread of the CTA has an escape): how many come before this
// thread's, and how many there are.
__device__ __forceinline__ void rank_escapes(bool esc, int* warp_escapes, long long* before,
                                             long long* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
    unsigned ballot = __ballot_sync(0xFFFFFFFFu, esc);
    if (lane == 0) warp_escapes[warp] = __popc(ballot);
    __syncthreads();
    long long b = 0, n = 0;
    for (int w = 0; w < warps; ++w) {
        b += w < warp ? warp_escapes[w] : 0;
        n += warp_escapes[w];
    }
    *before = b + __popc(ballot & ((1u << lane) - 1));
    *total = n;
    __syncthreads();  // warp_escapes is reused by the next token
}

// v, or for an escape (every thread calls it, `esc` its own) its unit's next stored value:
// escaped[*e + this escape's rank]; *e moves past this token's escapes, and *bad is set
// when the unit has fewer stored than its symbols say (*e reaching e_end).
__device__ __forceinline__ float take_escape(bool esc, float v, const float* escaped,
                                             long long* e, long long e_end, bool* bad,
                                             int* warp_escapes) {
    if (__syncthreads_or(esc)) {
        long long before, total;
        rank_escapes(esc, warp_escapes, &before, &total);
        if (esc) {
            if (*e + before < e_end) v = escaped[*e + before]; else *bad = true;
        }
        *e += total;
    }
    return v;
}

// v rounded to the value's dtype (float32, float16 or bfloat16, as the CPU's `_store`),
// at element `at` of `out`.
__device__ __forceinline__ void store_value(char* out, int kind, long long at, float v) {
    if (kind == 0) ((float*)out)[at] = v;
    else if (kind == 1) ((unsigned short*)out)[at] = (unsigned short)f32_to_f16(v);
    else ((unsigned short*)out)[at] = (unsigned short)f32_to_bf16(v);
}
"""

_CUDA_SOURCE = r"""
#define SLOTS @SLOTS@
#define PRECISION @PRECISION@
#define RANS_L (1u << 23)
#define CENTER @CENTER@
#define ALPHABET @ALPHABET@
#define LANES @LANES@
#define GROUP @GROUP@
#define WORD_LANES (LANES >= 4 ? 0xFFFFFFFFu : (1u << (8 * LANES)) - 1u)  // a word's symbols
// Status codes, as the CPU decoder's (kvstore.codecs.rans) and one more.
#define TRUNCATED 1
#define BAD_START 2
#define BAD_END 3
#define TRAILING 4
#define BAD_ESCAPES 5

typedef unsigned long long u64;

// ---------------------------------------------------------------- rANS streams
// A CTA decodes the streams of up to GROUP units, whose decode tables it first builds in
// shared memory from their frequencies: per unit, slot -> symbol (a byte per slot) and per
// symbol its frequency | cumulative frequency << 16. Tables in global memory, one per unit,
// would outweigh the symbols they decode for short chunks and thrash the caches.
// One symbol of a lane in state x: the symbol, and the state before renormalization.
__device__ __forceinline__ u32 rans_step(u32 x, const unsigned char* table, const u32* fc,
                                         u32* sym) {
    u32 slot = x & (SLOTS - 1);
    *sym = table[slot];
    u32 e = fc[*sym];
    return (e & 0xFFFF) * (x >> PRECISION) + slot - (e >> 16);
}

extern "C" __global__ void rans_decode(const unsigned char* __restrict__ data,
                                       const long long* __restrict__ groups,
                                       const long long* __restrict__ streams,
                                       const unsigned short* __restrict__ freqs,
                                       unsigned char* __restrict__ symbols,
                                       int* __restrict__ status,
                                       int* __restrict__ zeros) {
    __shared__ unsigned char slot_symbol[GROUP][SLOTS];
    __shared__ u32 freq_cum[GROUP][256];
    const long long* g = groups + (long long)blockIdx.x * 4;
    const long long u0 = g[0], s0 = g[2], ns = g[3];
    const int nu = (int)g[1];
    for (int i = threadIdx.x; i < nu * ALPHABET; i += blockDim.x)
        freq_cum[i / ALPHABET][i % ALPHABET] = freqs[u0 * ALPHABET + i];
    __syncthreads();
    for (int j = threadIdx.x; j < nu; j += blockDim.x) {
        u32 c = 0;
        for (int s = 0; s < ALPHABET; ++s) {
            u32 f = freq_cum[j][s];
            freq_cum[j][s] = f | c << 16;
            c += f;
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < nu * ALPHABET; i += blockDim.x) {
        int j = i / ALPHABET, s = i % ALPHABET;
        u32 e = freq_cum[j][s];
        for (u32 k = e >> 16, end = (e >> 16) + (e & 0xFFFF); k < end; ++k)
            slot_symbol[j][k] = (unsigned char)s;
    }
    __syncthreads();
    for (long long k = s0 + threadIdx.x; k < s0 + ns; k += blockDim.x) {
        const long long* d = streams + k * 5;
        long long pos = d[0], end = d[1];
        const int j = (int)(d[2] - u0);
        const unsigned char* table = slot_symbol[j];
        const u32* fc = freq_cum[j];
        unsigned char* out = symbols + d[3];
        long long n = d[4];
        int escapes = 0;  // symbols 0 (escapes), for a second stage that splits units
        if (zeros) zeros[k] = 0;
        if (n == 0) { if (pos != end) status[k] = TRAILING; continue; }
        int active = n < LANES ? (int)n : LANES;
        if (end - pos < 4 * active) { status[k] = TRUNCATED; continue; }
        u32 x[LANES];
        bool bad = false;
#pragma unroll
        for (int l = 0; l < LANES; ++l) {
            if (l < active) {
                u32 v = (u32)data[pos] | (u32)data[pos + 1] << 8 | (u32)data[pos + 2] << 16 |
                        (u32)data[pos + 3] << 24;
                bad |= v < RANS_L || v >= (RANS_L << 8);
                x[l] = v;
                pos += 4;
            } else {
                x[l] = RANS_L;
            }
        }
        if (bad) { status[k] = BAD_START; continue; }
        long long i = 0;
        // While 2 * LANES bytes remain, a group of LANES symbols cannot read past the
        // stream: read two bytes and keep 0-2 of them, as the CPU decoder does.
        while (i + LANES <= n && pos + 2 * LANES <= end) {
            u32 word = 0;
#pragma unroll
            for (int l = 0; l < LANES; ++l) {
                u32 sym;
                u32 v = rans_step(x[l], table, fc, &sym);
                int take = (v < RANS_L) + (v < (RANS_L >> 8));
                u32 w = (u32)data[pos] << 8 | (u32)data[pos + 1];
                x[l] = (v << (8 * take)) | (w >> (16 - 8 * take));
                pos += take;
                word |= sym << (8 * l);
            }
            escapes += __popc(__vcmpeq4(word, 0u) & WORD_LANES) >> 3;
            if (LANES == 4 && ((d[3] + i) & 3) == 0) {
                *(u32*)(out + i) = word;
            } else {
#pragma unroll
                for (int l = 0; l < LANES; ++l) out[i + l] = (word >> (8 * l)) & 0xFF;
            }
            i += LANES;
        }
        for (; i < n && !bad; ++i) {
            int l = (int)(i % LANES);
            u32 sym;
            u32 v = rans_step(x[l], table, fc, &sym);
            while (v < RANS_L && !bad) {
                if (pos >= end) bad = true; else v = v << 8 | data[pos++];
            }
            x[l] = v;
            out[i] = (unsigned char)sym;
            escapes += sym == 0;
        }
        if (zeros) zeros[k] = escapes;
        if (bad) { status[k] = TRUNCATED; continue; }
        for (int l = 0; l < active; ++l) bad |= x[l] != RANS_L;
        if (bad) status[k] = BAD_END;
        else if (pos != end) status[k] = TRAILING;
    }
}

// ---------------------------------------------------------------- values
extern "C" __global__ void reconstruct(const long long* __restrict__ units,
                                       const unsigned char* __restrict__ symbols,
                                       const float* __restrict__ starts,
                                       const float* __restrict__ steps,
                                       const float* __restrict__ escaped,
                                       int* __restrict__ status) {
    __shared__ int warp_escapes[32];
    const long long* u = units + (long long)blockIdx.x * 9;
    const long long stride = u[1], tokens = u[3], dim = u[4];
    const long long flags = u[8];
    const int kind = (int)(flags & 15);
    const bool closed = (flags >> 4) & 1;
    const int d = threadIdx.x;
    const bool mine = d < dim;
    const unsigned char* sym = symbols + u[2] + d;
    float pred = 0.f, step = 0.f;
    if (mine) { pred = starts[u[5] + d]; step = steps[u[5] + d]; }
    long long e = u[6];
    const long long e_end = u[7];
    bool bad = false;
    char* out = (char*)u[0];
    int next = mine && tokens > 0 ? sym[0] : CENTER;
    for (long long t = 0; t < tokens; ++t) {
        int s = next;  // the next token's symbol loads while this one is finished
        if (mine && t + 1 < tokens) next = sym[(t + 1) * dim];
        float v = pred + (float)(s - CENTER) * step;  // the product is exact
        v = take_escape(mine && s == 0, v, escaped, &e, e_end, &bad, warp_escapes);
        if (mine) store_value(out, kind, t * stride + d, v);
        if (closed) pred = v;
    }
    if (bad || (d == 0 && e != e_end)) status[blockIdx.x] = BAD_ESCAPES;
}
"""


def _source() -> str:
    from kvstore.codecs import cachegen

    if 1 << cachegen.PRECISION != SLOTS:
        raise RuntimeError("the GPU decode tables assume 12-bit rANS frequencies")
    subs = {
        "@SLOTS@": SLOTS,
        "@PRECISION@": cachegen.PRECISION,
        "@CENTER@": cachegen.CENTER,
        "@ALPHABET@": cachegen.ALPHABET,
        "@LANES@": cachegen.LANES,
        "@GROUP@": GROUP_UNITS,
    }
    return with_values(CUDA_FLOATBITS + CUDA_ESCAPES + _CUDA_SOURCE, subs)


_module = KernelModule(_source, ("rans_decode", "reconstruct"))


_STATUS = {
    1: "is truncated (it needs more bytes than it has)",
    2: "is corrupted (a lane's initial state is out of range)",
    3: "is corrupted (a lane did not return to its initial state)",
    4: "is corrupted (bytes left over after its last symbol)",
}


@dataclass
class GpuDecode:
    """A batch decoding on the GPU. `wait()` blocks until it is done and raises
    ContainerError if a payload was damaged or a value fails its checksum."""

    event: Any
    status: np.ndarray  # pinned: streams then units, 0 = fine
    status_owner: Any
    n_streams: int
    checks: list[tuple[int, int, torch.Tensor]]  # (job, expected checksum, out)
    digests: Any  # kvstore.kernels.checksum.Digests of the checks' outs, or None

    def is_done(self) -> bool:
        return bool(self.event.done)

    def wait(self) -> None:
        import torch

        from kvstore.codecs.base import ContainerError
        from kvstore.codecs.container import checksum

        self.event.synchronize()
        bad = np.flatnonzero(self.status)
        if bad.size:
            k = int(bad[0])
            if k < self.n_streams:
                why = _STATUS.get(int(self.status[k]), "is corrupted")
                raise ContainerError(f"cachegen rANS stream {k} {why}")
            raise ContainerError("cachegen escapes disagree with the streams")
        digests = iter(self.digests.result() if self.digests is not None else [])
        for job, want, out in self.checks:
            if out.nbytes > SHORT_MAX:
                got = next(digests)
            else:  # too short for the GPU hash: on the host
                got = checksum(out.detach().reshape(-1).view(torch.uint8).cpu().numpy().data)
            if got != want:
                raise ContainerError(f"cachegen value {job} decoded on the GPU fails its checksum")


@dataclass(frozen=True)
class Job:
    """One payload to decode: the codec that made it, the payload, the CUDA tensor it
    decodes into (contiguous float16, bfloat16 or float32, the value's shape), and the
    value's checksum from its container to verify (None: not checked)."""

    codec: CacheGen
    payload: memoryview
    out: torch.Tensor
    checksum: int | None = None


def decode_on_gpu(jobs: Sequence[Job | tuple[Any, ...]], stream: Any = None) -> GpuDecode:
    """Launch the decoding of `jobs` (all on one GPU) on `stream` (CuPy or torch stream,
    None: the current one) and return its handle. Payloads are parsed and checked on the
    host first: a malformed header raises ContainerError before anything launches."""
    from kvstore.codecs.cachegen import parse_payload

    todo = checked_jobs(jobs, "cachegen")
    # Parsed on the host threads, the tables left packed: Staged unpacks the batch's at once.
    parsed = list(
        host_pool().map(
            lambda j: parse_payload(
                j.payload, tuple(j.out.shape), int(j.codec.params["version"]), tables=False
            ),
            todo,
        )
    )
    staged = Staged(todo, parsed)
    for i, job in enumerate(todo):
        lay = staged.lays[i]
        idx = np.arange(lay.units, dtype=np.int64)
        closed = (idx // lay.heads % 2 == 0) & bool(job.codec.params["k"])
        staged.units[staged.u_at[i] : staged.u_at[i] + lay.units, 8] |= closed.astype(np.int64) << 4

    def values(launch: Launch) -> None:
        if staged.n_units:
            _module.get(launch.device, "reconstruct")(
                (staged.n_units,),
                (align(staged.dims, _RECON_THREADS),),
                (launch.ptr("units"), launch.symbols, launch.ptr("starts"), launch.ptr("steps"),
                 launch.ptr("escaped"), launch.unit_status),
                stream=launch.stream,
            )  # fmt: skip

    return staged.launch(stream, values)


def checked_jobs(jobs: Sequence[Job | tuple[Any, ...]], name: str) -> list[Job]:
    """`jobs` as `Job`s, each checked: its `out` a contiguous float16, bfloat16 or float32
    tensor on the first one's GPU; ContainerError (naming codec `name`) otherwise."""
    from kvstore.codecs.base import DTYPE_WORDS as kinds
    from kvstore.codecs.base import ContainerError

    todo = [j if isinstance(j, Job) else Job(*j) for j in jobs]
    if not todo:
        raise ValueError("no payloads to decode")
    device = todo[0].out.get_device()
    for i, job in enumerate(todo):
        out = job.out
        if not out.is_cuda or out.get_device() != device or not out.is_contiguous():
            raise ContainerError(f"job {i}: out must be a contiguous tensor on GPU {device}")
        if out.dtype not in kinds:
            raise ContainerError(
                f"job {i}: {name} decodes on the GPU into float16, bfloat16 or float32, "
                f"not {out.dtype}"
            )
    return todo


@dataclass
class Launch:
    """What a second stage of a batch's decoding launches with (`Staged.launch`)."""

    device: int
    stream: Any  # CuPy stream
    base: int  # device address of the staged sections
    at: dict[str, int]
    symbols: Any  # CuPy array: the decoded rANS symbols
    unit_status: np.uint64  # address of the units' status words (pinned)
    zeros: int  # device address: each rANS stream's count of symbols 0 (escapes), int32
    keep: list[Any]  # device scratch the stage allocates, kept until the batch is done

    def ptr(self, name: str) -> np.uint64:
        return np.uint64(self.base + self.at[name])


def _runs(items: Sequence[Any]) -> list[tuple[int, int]]:
    """[first, end) of each run of equal consecutive `items`."""
    edges = [0, *(i for i in range(1, len(items)) if items[i] != items[i - 1]), len(items)]
    return list(itertools.pairwise(edges))


class Staged:
    """A batch of parsed cachegen payloads laid out for the GPU in one pinned buffer: the
    rANS streams and tables, per-channel starts and steps, escapes, and a descriptor per
    unit (`_UNIT_FIELDS`: out address, token stride, symbol offset, tokens, dim, channel,
    escapes first and end, flags = dtype kind). `extra` sections (name -> bytes) are laid
    out after them for the caller to fill. `launch` copies it to the GPU, decodes the
    streams to symbols and runs the caller's second stage."""

    def __init__(
        self, todo: Sequence[Job], parsed: Sequence[Any], extra: dict[str, int] | None = None
    ) -> None:
        from kvstore.codecs.base import DTYPE_WORDS as kinds
        from kvstore.codecs.base import ContainerError
        from kvstore.codecs.cachegen import ALPHABET

        self.todo, self.parsed = list(todo), list(parsed)
        self.dims = max(p.layout.head_dim for p in parsed)
        if self.dims > 1024:
            raise ContainerError(f"cachegen decodes heads of up to 1024 channels, not {self.dims}")
        lays = self.lays = [p.layout for p in parsed]
        # Sizes of every section, then one pinned buffer holding them all.
        self.n_units = n_units = sum(lay.units for lay in lays)
        self.n_streams = n_streams = sum(lay.streams for lay in lays)
        n_channels = sum(lay.channels for lay in lays)
        n_escaped = sum(p.escaped.size for p in parsed)
        data_bytes = sum(len(p.data) for p in parsed)
        sym_sizes = [align(lay.units * lay.segments * lay.segment * lay.head_dim) for lay in lays]
        self.sym_bytes = sum(sym_sizes)
        self.n_groups = n_groups = sum(-(-lay.units // GROUP_UNITS) for lay in lays)
        # What the rANS kernel reads first, its stream data (copied in pieces) next, then
        # what the second stage reads (`_copy_and_decode`).
        sections = {
            "groups": 8 * 4 * n_groups,
            "streams": 8 * _STREAM_FIELDS * n_streams,
            "freqs": 2 * ALPHABET * n_units,
            "data": max(data_bytes, 1),
            "units": 8 * _UNIT_FIELDS * n_units,
            "starts": 4 * n_channels,
            "steps": 4 * n_channels,
            "escaped": 4 * max(n_escaped, 1),
            **(extra or {}),
        }
        self.at, total = {}, 0
        for name, size in sections.items():
            self.at[name] = total
            total += align(size, 256)
        self.total = total
        self.pinned = pinned = _pinned(total)
        self.buf = buf = np.frombuffer(pinned, np.uint8, total)
        self.sections = sections
        groups = self.view("groups", np.int64).reshape(n_groups, 4)
        streams = self.view("streams", np.int64).reshape(n_streams, _STREAM_FIELDS)
        self.units = units = self.view("units", np.int64).reshape(n_units, _UNIT_FIELDS)
        starts, steps = self.view("starts", np.float32), self.view("steps", np.float32)
        escaped = buf[self.at["escaped"] : self.at["escaped"] + 4 * n_escaped].view(np.float32)
        freqs = self.view("freqs", np.uint16).reshape(n_units, ALPHABET)
        data = buf[self.at["data"] : self.at["data"] + data_bytes]

        # Where each job's parts go: running sums over the jobs before it (and, last, the
        # total: job i's parts end where job i + 1's start).
        def starts_of(sizes: list[int]) -> list[int]:
            return [0, *np.cumsum(sizes, dtype=np.int64).tolist()]

        self.u_at = u_at = starts_of([lay.units for lay in lays])
        self.s_at = s_at = starts_of([lay.streams for lay in lays])
        self.c_at = c_at = starts_of([lay.channels for lay in lays])
        e_at = starts_of([p.escaped.size for p in parsed])
        d_at = starts_of([len(p.data) for p in parsed])
        self.g_at = g_at = starts_of([-(-lay.units // GROUP_UNITS) for lay in lays])
        self.d_at = d_at
        sym_at = starts_of(sym_sizes)
        self.widest = max(GROUP_UNITS * lay.segments for lay in lays)  # the largest group's

        # The descriptors (groups, streams, units) of each run of jobs with one layout at
        # once: a template per layout plus each job's offsets (per job they were ~30 NumPy
        # calls a chunk, under the GIL).
        at = {"u": u_at, "s": s_at, "c": c_at, "e": e_at, "d": d_at, "y": sym_at}
        for i0, i1 in _runs(lays):
            lay, k = lays[i0], i1 - i0
            nu, ns, ng = lay.units, lay.streams, -(-lay.units // GROUP_UNITS)
            base = {n: np.asarray(a[i0:i1], np.int64)[:, None] for n, a in at.items()}
            first = np.arange(ng, dtype=np.int64) * GROUP_UNITS
            gr = groups[g_at[i0] : g_at[i1]].reshape(k, ng, 4)
            gr[:, :, 0] = base["u"] + first
            gr[:, :, 1] = np.minimum(GROUP_UNITS, nu - first)
            gr[:, :, 2] = base["s"] + first * lay.segments
            gr[:, :, 3] = gr[:, :, 1] * lay.segments
            # Streams: where their bytes and symbols are, and their table.
            offsets = np.stack([parsed[i].offsets for i in range(i0, i1)])
            st = streams[s_at[i0] : s_at[i1]].reshape(k, ns, _STREAM_FIELDS)
            st[:, :, 0] = base["d"] + offsets[:, :-1]
            st[:, :, 1] = base["d"] + offsets[:, 1:]
            st[:, :, 2] = base["u"] + lay.stream_models()
            seg_bytes = lay.segment * lay.head_dim
            padded = lay.segments * seg_bytes  # a unit's symbols
            st[:, :, 3] = base["y"] + np.arange(ns, dtype=np.int64) * seg_bytes
            st[:, :, 4] = lay.stream_lengths()
            # Units: (layer, K/V, head) in that order.
            un = units[u_at[i0] : u_at[i1]].reshape(k, nu, _UNIT_FIELDS)
            idx = np.arange(nu, dtype=np.int64)
            lk, h = idx // lay.heads, idx % lay.heads  # lk = layer * 2 + K/V
            width = lay.heads * lay.head_dim
            outs = [todo[i].out for i in range(i0, i1)]
            ptr = np.array([o.data_ptr() for o in outs], np.int64)[:, None]
            esize = np.array([o.element_size() for o in outs], np.int64)[:, None]
            un[:, :, 0] = ptr + esize * (lk * lay.tokens * width + h * lay.head_dim)
            un[:, :, 1] = width
            un[:, :, 2] = base["y"] + idx * padded
            un[:, :, 3] = lay.tokens
            un[:, :, 4] = lay.head_dim
            un[:, :, 5] = base["c"] + idx * lay.head_dim
            firsts = np.stack([parsed[i].first for i in range(i0, i1)])
            un[:, :, 6] = base["e"] + firsts[:, :-1]
            un[:, :, 7] = base["e"] + firsts[:, 1:]
            un[:, :, 8] = np.array([kinds[o.dtype] for o in outs], np.int64)[:, None]

        def fill(i: int) -> None:
            """Job i's data-dependent sections: its values' parts and its streams' bytes."""
            p = parsed[i]
            c0, e0, d0, nc, nd = c_at[i], e_at[i], d_at[i], lays[i].channels, len(p.data)
            starts[c0 : c0 + nc] = p.starts.reshape(-1)
            steps[c0 : c0 + nc] = p.steps.reshape(-1)
            escaped[e0 : e0 + p.escaped.size] = p.escaped
            if p.freqs is not None:
                freqs[u_at[i] : u_at[i + 1]] = p.freqs
            data[d0 : d0 + nd] = np.frombuffer(p.data, np.uint8)

        # The tables left packed (`parse_payload(tables=False)`): one call for all, in
        # parallel without the GIL (one by one they took ~0.2 ms a chunk on the host pool,
        # a fifth of a batch's host time).
        packed = [i for i, p in enumerate(parsed) if p.freqs is None]
        if packed:
            from kvstore.codecs import rans
            from kvstore.codecs.cachegen import PRECISION

            spans = [(u_at[i], u_at[i + 1]) for i in packed]  # each job's units' rows
            rans.unpack_tables_into([parsed[i].tables for i in packed], spans, freqs, PRECISION)
        list(host_pool().map(fill, range(len(todo))))  # list(): raises what a job raised

    def view(self, name: str, dtype: Any) -> np.ndarray:
        """Section `name` of the pinned buffer as a flat array of `dtype`."""
        at = self.at[name]
        return self.buf[at : at + self.sections[name]].view(dtype)

    def launch(self, stream: Any, values: Any) -> GpuDecode:
        """Copy the batch to the GPU, decode its streams to symbols, then call
        `values(Launch)` to launch what turns them into the jobs' values; and the checksums
        of the values, all on `stream`."""
        import cupy

        todo = self.todo
        device = todo[0].out.get_device()
        n_streams, n_units = self.n_streams, self.n_units
        status_mem = _pinned(4 * (n_streams + n_units))
        status = np.frombuffer(status_mem, np.int32, n_streams + n_units)
        status[:] = 0
        with cupy.cuda.Device(device):
            s = as_cupy_stream(stream)
            with s:
                dev = cupy.empty(self.total, cupy.uint8)
                symbols = cupy.empty(max(self.sym_bytes, 1), cupy.uint8)
                zeros = cupy.empty(max(n_streams, 1), cupy.int32)
            launch = Launch(
                device, s, dev.data.ptr, self.at, symbols,
                np.uint64(status.ctypes.data + 4 * n_streams), zeros.data.ptr, [zeros],
            )  # fmt: skip
            self._copy_and_decode(launch, np.uint64(status.ctypes.data))
            with s:
                values(launch)
            checks = [(i, j.checksum, j.out) for i, j in enumerate(todo) if j.checksum is not None]
            big = [c for c in checks if c[2].nbytes > SHORT_MAX]
            digests = None
            if big:
                bufs = [DeviceBuffer(o.data_ptr(), o.nbytes, device) for _, _, o in big]
                digests = xxh3_64_gpu(bufs, device, s)
            event = cupy.cuda.Event(block=False, disable_timing=True)
            event.record(s)
        # Host buffers the GPU still reads or writes, and device scratch, live until done.
        _keep_until_done(event, (self.pinned, status_mem, dev, symbols, *launch.keep))
        return GpuDecode(event, status, status_mem, n_streams, checks, digests)

    def pieces(self) -> list[tuple[int, int]]:
        """The jobs in runs [first, end) of about `PIECE_BYTES` of stream data each (at most
        `MAX_PIECES`): what `launch` copies and decodes one after another."""
        data = self.sections["data"]
        n = max(1, min(MAX_PIECES, data // PIECE_BYTES))
        # The first piece half the others: its copy is the one nothing hides.
        at = [data * (2 * k - 1) // (2 * n - 1) for k in range(1, n)]
        cuts = np.searchsorted(self.d_at, at, side="right")
        edges = sorted({0, *cuts.tolist(), len(self.todo)})
        return list(itertools.pairwise(edges))

    def _copy_and_decode(self, launch: Launch, stream_status: np.uint64) -> None:
        """Copy the batch to the GPU and decode its streams, overlapping the two: the stream
        data goes in `pieces` on a copy stream, each piece's rANS kernel waits only for its
        own copy, and the pieces' kernels alternate between the batch's stream and a second
        one so each fills the tail of the one before; what the second stage reads is copied
        last. (On an H200 the copy is ~70% of the rANS kernel's time at cachegen's ratios:
        in one piece 5.5 + 7.6 ms for 220 SmolLM2 chunks, in pieces ~6 ms.)"""
        import cupy

        from kvstore.codecs.cachegen import ALPHABET

        s, base, host = launch.stream, launch.base, self.buf.ctypes.data
        rt = cupy.cuda.runtime
        pieces = self.pieces()
        if len(pieces) == 1:
            rt.memcpyAsync(base, host, self.total, rt.memcpyHostToDevice, s.ptr)
            if self.n_streams:
                self._rans(launch, stream_status, 0, self.n_groups, s)
            return
        copier, other = cupy.cuda.Stream(non_blocking=True), cupy.cuda.Stream(non_blocking=True)
        launch.keep += [copier, other]
        copier.wait_event(s.record())  # what the caller queued before the batch
        # What the rANS kernel reads of jobs [first, end): rows of four sections.
        rows = {
            "groups": (self.g_at, 32),
            "streams": (self.s_at, 8 * _STREAM_FIELDS),
            "freqs": (self.u_at, 2 * ALPHABET),
            "data": (self.d_at, 1),
        }
        for n, (first, end) in enumerate(pieces):
            for name, (at, size) in rows.items():
                lo, hi = self.at[name] + size * at[first], self.at[name] + size * at[end]
                rt.memcpyAsync(base + lo, host + lo, hi - lo, rt.memcpyHostToDevice, copier.ptr)
            on = (s, other)[n % 2]
            on.wait_event(copier.record())
            g0, g1 = self.g_at[first], self.g_at[end]
            if g1 > g0:
                self._rans(launch, stream_status, g0, g1, on)
        rest = self.at["units"]  # what the second stage reads
        rt.memcpyAsync(
            base + rest, host + rest, self.total - rest, rt.memcpyHostToDevice, copier.ptr
        )
        s.wait_event(copier.record())
        s.wait_event(other.record())

    def _rans(self, launch: Launch, stream_status: np.uint64, g0: int, g1: int, on: Any) -> None:
        """The rANS kernel over groups [g0, g1), on stream `on`."""
        _module.get(launch.device, "rans_decode")(
            (g1 - g0,),
            (min(256, align(self.widest, 32)),),
            (launch.ptr("data"), np.uint64(launch.ptr("groups") + 32 * g0),
             launch.ptr("streams"), launch.ptr("freqs"), launch.symbols, stream_status,
             np.uint64(launch.zeros)),
            stream=on,
        )  # fmt: skip


def _pinned(nbytes: int) -> Any:
    import cupy

    return cupy.cuda.alloc_pinned_memory(nbytes)
