"""Re-rotating stored K to new positions (RoPE), on the GPU and on the CPU.

A RAG document chunk's KV is computed once, at some positions, and reused wherever the
chunk lands in a later prompt. V does not depend on position; K was stored rotated by its
positions, K = R(from) k. Since rotations compose, R(to) k = R(to - from) K: the chunk's K
is moved by rotating each channel pair by (to - from) times its frequency.

- `RopeConfig`: head_dim, rotary_dim, base (theta), pairing and `RopeScaling`, with
  `inv_freq()` (transformers' formulas, in float64) and `from_hf(config)`.
- `rerotate_k(k, from_pos, to_pos, config, out=None, stream=None)`: K laid out
  `[layers, tokens, heads, head_dim]`, or a whole KV `[layers, 2, tokens, heads, head_dim]`
  of which only K moves; float16, bfloat16 or float32; each token may move by its own delta.
  CUDA tensors (torch or CuPy) run a CuPy kernel, asynchronous on `stream` (a CuPy or torch
  stream, None for the current one), and return a recorded `cupy.cuda.Event`; CPU tensors
  (torch or NumPy) run the numba twin, parallel over tokens, and return None when done.

Both give the same bits. The cos and sin of each (delta, frequency) are computed on the host
in float64 (angle = delta * inv_freq, exact deltas) and rounded to float32; both kernels then
compute x' = x cos - y sin and y' = x sin + y cos as separate IEEE float32 roundings in that
order and round to the output dtype to nearest even with the bit-level conversions of
`kvstore.kernels.floatbits`. numba does not contract multiply-adds unless fastmath is on
(it is not here); the GPU kernel writes its operations as PTX `mul.rn`/`add.rn`/`sub.rn`,
which are never fused and, lacking `.ftz`, keep subnormals although CuPy compiles every
kernel with -ftz=true (the CPU side assumes no library has set the FPU's flush-to-zero
mode). A NaN result is written as the positive quiet NaN on both.

Measured on the H200, in place, Llama-3-8B K (32 layers, 8 heads of 128): 4096 tokens of
bf16 in 175 us (3.1 TB/s read + write, 16-byte vectors; 1.3 TB/s when misaligned data
forces 2-byte words); a 256-token chunk takes ~100 us a call, nearly all of it host work
(the table, its pinned staging and the launch).

What re-rotation cannot undo: engines compute RoPE angles in float32 (position times a
float32 inv_freq), an error of up to about position * 2**-24 rad in the fastest channels
(4e-3 rad at 100k). The K an engine would compute at `to` differs from the re-rotated one by
that much, the model's own position noise there; the re-rotation itself adds only float32
rounding.

YaRN scales cos and sin of both q and k by its attention factor (mscale) when it rotates;
stored K already carries it, and a re-rotation is a pure rotation that must not apply it
again: `RopeScaling` does not even hold it. Dynamic NTK scaling changes the base with the
sequence length, so no fixed re-rotation matches it; `RopeScaling("dynamic", ...)` uses the
static NTK-aware base, base * factor ** (rotary_dim / (rotary_dim - 2)), which is the base
transformers' dynamic form reaches at (2 - 1/factor) times max_position_embeddings. Below
max_position_embeddings that form is plain RoPE: re-rotate K cached there with
scaling=None.

Every argument is checked on the host before anything runs (`RopeError`, a ValueError):
shapes, dtypes, position arrays (host integer arrays, one entry per token), `out`'s shape,
dtype, device, and no partial overlap with the input.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Literal, cast

import numba
import numpy as np

from kvstore.kernels._cuda import KernelModule, align
from kvstore.kernels.blocks import as_cupy_stream
from kvstore.kernels.checksum import _keep_until_done
from kvstore.kernels.floatbits import (
    CUDA_FLOATBITS,
    WORD_KINDS,
    bf16_to_f32,
    f16_to_f32,
    f32_to_bf16,
    f32_to_f16,
    host_words,
)

Pairing = Literal["neox", "gptj"]
ScalingKind = Literal["linear", "dynamic", "yarn", "llama3"]

_KINDS = WORD_KINDS  # dtype name -> kernel kind
_THREADS = 256


class RopeError(ValueError):
    """Arguments a re-rotation refuses before anything runs."""


@dataclass(frozen=True)
class RopeScaling:
    """How a model stretches RoPE past its training length (transformers' `rope_type`)."""

    kind: ScalingKind
    """"linear" (position interpolation), "dynamic" (NTK-aware, static form: see the module
    docstring), "yarn" or "llama3"."""
    factor: float
    """How many times the training length the model is stretched to."""
    original_max_position_embeddings: int | None = None
    """The training length; required by "yarn" and "llama3", not used by the others."""
    beta_fast: float = 32.0
    """YaRN: rotations over the training length above which a channel is not scaled."""
    beta_slow: float = 1.0
    """YaRN: rotations below which a channel is fully interpolated."""
    truncate: bool = True
    """YaRN: round the correction range outwards to whole channels, as transformers does."""
    low_freq_factor: float = 1.0
    """Llama 3: wavelengths above training length / this are divided by `factor`."""
    high_freq_factor: float = 4.0
    """Llama 3: wavelengths below training length / this are kept; between, interpolated."""

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "dynamic", "yarn", "llama3"):
            raise RopeError(f"unknown RoPE scaling {self.kind!r}: linear, dynamic, yarn, llama3")
        if not self.factor > 0:
            raise RopeError(f"RoPE scaling factor must be positive, got {self.factor}")
        orig = self.original_max_position_embeddings
        if self.kind in ("yarn", "llama3") and (orig is None or orig <= 0):
            raise RopeError(f"{self.kind} scaling needs original_max_position_embeddings > 0")
        if self.kind == "yarn" and not self.beta_fast > self.beta_slow > 0:
            raise RopeError(f"yarn needs beta_fast > beta_slow > 0, got {self.beta_fast}, "
                            f"{self.beta_slow}")  # fmt: skip
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            raise RopeError("llama3 scaling needs high_freq_factor > low_freq_factor > 0")


@dataclass(frozen=True)
class RopeConfig:
    """The rotary embedding of a model's K: which channels rotate, and how fast."""

    head_dim: int
    """Channels per head."""
    rotary_dim: int | None = None
    """The first this many channels rotate (even, at most head_dim); None: all of them.
    Always an int once constructed."""
    base: float = 10000.0
    """The base wavelength (rope_theta)."""
    pairing: Pairing = "neox"
    """Which channels rotate together. "neox": i with i + rotary_dim/2 (transformers'
    `rotate_half`: Llama, Mistral, Qwen, GPT-NeoX); "gptj": 2i with 2i+1 (GPT-J, and Meta's
    original Llama code, whose checkpoints transformers permutes into "neox")."""
    scaling: RopeScaling | None = None
    """Long-context scaling of the frequencies, or None for plain RoPE."""

    def __post_init__(self) -> None:
        if not isinstance(self.head_dim, int | np.integer) or self.head_dim <= 0:
            raise RopeError(f"head_dim must be a positive integer, got {self.head_dim!r}")
        rot = self.head_dim if self.rotary_dim is None else self.rotary_dim
        if not isinstance(rot, int | np.integer) or rot <= 0 or rot % 2 or rot > self.head_dim:
            raise RopeError(
                f"rotary_dim must be even, positive and at most head_dim {self.head_dim}, "
                f"got {rot!r}"
            )
        object.__setattr__(self, "rotary_dim", int(rot))
        if not self.base > 1:
            raise RopeError(f"the RoPE base must be above 1, got {self.base}")
        if self.pairing not in ("neox", "gptj"):
            raise RopeError(f'pairing must be "neox" or "gptj", got {self.pairing!r}')
        if self.scaling is not None and self.scaling.kind == "dynamic" and rot <= 2:
            raise RopeError("dynamic NTK scaling needs rotary_dim > 2")

    @property
    def pairs(self) -> int:
        """Rotating channel pairs per head: rotary_dim / 2."""
        return (self.head_dim if self.rotary_dim is None else self.rotary_dim) // 2

    def inv_freq(self) -> np.ndarray:
        """The angle per position of each pair, float64 [rotary_dim / 2]: transformers'
        `_compute_default/linear/dynamic/yarn/llama3` formulas (`modeling_rope_utils`),
        evaluated in float64 where transformers rounds to float32."""
        dim = 2 * self.pairs
        exponents = np.arange(0, dim, 2, dtype=np.float64) / dim
        sc = self.scaling
        if sc is None:
            return 1.0 / self.base**exponents
        if sc.kind == "linear":
            return 1.0 / self.base**exponents / sc.factor
        if sc.kind == "dynamic":
            base = self.base * sc.factor ** (dim / (dim - 2))
            return 1.0 / base**exponents
        assert sc.original_max_position_embeddings is not None
        orig = sc.original_max_position_embeddings
        if sc.kind == "yarn":
            return _yarn(self.base, dim, sc.factor, orig, sc.beta_fast, sc.beta_slow, sc.truncate)
        return _llama3(1.0 / self.base**exponents, sc.factor, orig, sc.low_freq_factor,
                       sc.high_freq_factor)  # fmt: skip

    @classmethod
    def from_hf(
        cls, config: Any, *, pairing: Pairing = "neox", layer_type: str | None = None
    ) -> RopeConfig:
        """The RoPE of a transformers `PretrainedConfig` (or an object with its attributes):
        `rope_parameters` (transformers 5) or `rope_theta` and `rope_scaling` (4.x), head_dim
        or hidden_size / num_attention_heads, partial_rotary_factor (or GPT-NeoX's
        rotary_pct, GPT-J's rotary_dim). The pairing is not in the config: GPT-J-style
        models need pairing="gptj". Models with per-layer-type RoPE (Gemma 3) need
        `layer_type`. Only the scalings above are supported (not longrope, mrope, ...)."""
        params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
        params = dict(params or {})
        nested = {k: v for k, v in params.items() if isinstance(v, dict)}
        if nested:
            if layer_type not in nested:
                raise RopeError(f"per-layer RoPE parameters: pass layer_type, one of {nested}")
            params = dict(nested[layer_type])
        kind = params.get("rope_type") or params.get("type") or "default"
        base = params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        fraction = (
            params.get("partial_rotary_factor")
            or getattr(config, "partial_rotary_factor", None)
            or getattr(config, "rotary_pct", None)
        )
        rotary = int(head_dim * fraction) if fraction else getattr(config, "rotary_dim", None)
        max_pos: Any = getattr(config, "max_position_embeddings", None)
        # transformers gives a config attribute precedence over the parameters (Phi-3)
        orig: Any = (
            getattr(config, "original_max_position_embeddings", None)
            or params.get("original_max_position_embeddings")
            or max_pos
        )
        scaling: RopeScaling | None
        if kind == "default":
            scaling = None
        elif kind in ("linear", "dynamic"):
            scaling = RopeScaling(cast(ScalingKind, kind), float(params["factor"]), orig)
        elif kind == "yarn":
            factor = params.get("factor")
            if factor is None:  # DeepSeek-V3 style: the stretch is implied by the lengths
                factor = max_pos / orig
            scaling = RopeScaling(
                "yarn",
                float(factor),
                orig,
                beta_fast=float(params.get("beta_fast") or 32.0),
                beta_slow=float(params.get("beta_slow") or 1.0),
                truncate=bool(params.get("truncate", True)),
            )
        elif kind == "llama3":
            scaling = RopeScaling(
                "llama3",
                float(params["factor"]),
                orig,
                low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
            )
        else:
            raise RopeError(f"RoPE type {kind!r} is not supported for re-rotation")
        return cls(int(head_dim), rotary, float(base), pairing, scaling)


def _yarn(
    base: float, dim: int, factor: float, orig: int, fast: float, slow: float, truncate: bool
) -> np.ndarray:
    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(fast), correction_dim(slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    extrapolation = 1.0 - ramp  # share of the unscaled frequency, 1 for the fast channels
    return 1.0 / (factor * pos_freqs) * (1 - extrapolation) + 1.0 / pos_freqs * extrapolation


def _llama3(inv: np.ndarray, factor: float, orig: int, low: float, high: float) -> np.ndarray:
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > orig / low, inv / factor, inv)
    smooth = (orig / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < orig / high) & ~(wavelen > orig / low)
    return np.where(medium, smoothed, scaled)


def rotation_table(
    config: RopeConfig, from_pos: np.ndarray, to_pos: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, cos, sin) of a re-rotation: token t turns by cos[row[t]], sin[row[t]] (float32
    [deltas, rotary_dim / 2], one row per distinct delta, from float64 angles)."""
    deltas, rows = np.unique(to_pos - from_pos, return_inverse=True)
    angle = deltas.astype(np.float64)[:, None] * config.inv_freq()[None, :]
    cos = np.ascontiguousarray(np.cos(angle), np.float32)
    sin = np.ascontiguousarray(np.sin(angle), np.float32)
    return rows.reshape(-1).astype(np.int32), cos, sin


# ------------------------------------------------------------------------------ arguments


@dataclass(frozen=True)
class _Operand:
    """A K or KV tensor as the kernels see it."""

    obj: Any
    kind: int  # 0 float32, 1 float16, 2 bfloat16
    shape: tuple[int, ...]
    ptr: int
    nbytes: int
    device: int | None  # None: host memory

    @property
    def kv(self) -> bool:
        return len(self.shape) == 5


def _operand(t: Any, what: str) -> _Operand:
    if hasattr(t, "data_ptr"):  # torch.Tensor
        name = str(t.dtype).removeprefix("torch.")
        device = t.get_device() if t.is_cuda else None
        contiguous, ptr, nbytes = t.is_contiguous(), t.data_ptr(), t.nbytes
    elif isinstance(t, np.ndarray):
        name, device = t.dtype.name, None
        contiguous, ptr, nbytes = t.flags.c_contiguous, t.ctypes.data, t.nbytes
        if not t.flags.writeable:
            raise RopeError(f"{what} is a read-only array")
    elif hasattr(t, "data") and hasattr(t.data, "ptr"):  # cupy.ndarray
        name, device = t.dtype.name, t.device.id
        contiguous, ptr, nbytes = t.flags.c_contiguous, t.data.ptr, t.nbytes
    else:
        raise RopeError(f"{what} must be a torch tensor, NumPy or CuPy array, "
                        f"got {type(t).__name__}")  # fmt: skip
    kind = _KINDS.get(name)
    if kind is None:
        raise RopeError(f"{what} must be float16, bfloat16 or float32, not {name}")
    if not contiguous:
        raise RopeError(f"{what} must be contiguous")
    shape = tuple(int(n) for n in t.shape)
    if not (len(shape) == 4 or (len(shape) == 5 and shape[1] == 2)):
        raise RopeError(
            f"{what} must be K [layers, tokens, heads, head_dim] or KV "
            f"[layers, 2, tokens, heads, head_dim], got shape {shape}"
        )
    return _Operand(t, kind, shape, int(ptr), int(nbytes), device)


def _positions(pos: Any, tokens: int, what: str) -> np.ndarray:
    try:
        arr = np.asarray(pos)
    except TypeError as e:  # a CUDA tensor or CuPy array
        raise RopeError(f"{what} must be a host array of positions") from e
    if arr.ndim != 1 or arr.shape[0] != tokens:
        raise RopeError(f"{what} must hold one position per token ({tokens}), got {arr.shape}")
    if tokens and not np.issubdtype(arr.dtype, np.integer):
        raise RopeError(f"{what} must be integers, got {arr.dtype}")
    return arr.astype(np.int64)


def _check(
    k: Any, from_pos: Any, to_pos: Any, config: RopeConfig, out: Any
) -> tuple[_Operand, _Operand, np.ndarray, np.ndarray]:
    if not isinstance(config, RopeConfig):
        raise RopeError(f"config must be a RopeConfig, got {type(config).__name__}")
    src = _operand(k, "k")
    if src.shape[-1] != config.head_dim:
        raise RopeError(f"k has head_dim {src.shape[-1]}; the config says {config.head_dim}")
    tokens = src.shape[-3]
    f = _positions(from_pos, tokens, "from_pos")
    t = _positions(to_pos, tokens, "to_pos")
    if src.shape[-3] * src.shape[-2] >= 2**31:
        raise RopeError("tokens * heads must be below 2**31")
    dst = src if out is None else _operand(out, "out")
    if dst is not src:
        if dst.shape != src.shape or dst.kind != src.kind:
            raise RopeError(
                f"out must match k: shape {src.shape} and dtype {_dtype_name(src.kind)}, "
                f"got {dst.shape} and {_dtype_name(dst.kind)}"
            )
        if dst.device != src.device:
            raise RopeError(f"out is on {_place(dst.device)}, k on {_place(src.device)}")
        if dst.ptr == src.ptr:
            dst = src  # the same memory: in place
        elif dst.ptr < src.ptr + src.nbytes and src.ptr < dst.ptr + dst.nbytes:
            raise RopeError("out overlaps k without being k")
    return src, dst, f, t


def _place(device: int | None) -> str:
    return "the host" if device is None else f"GPU {device}"


def _dtype_name(kind: int) -> str:
    return {v: k for k, v in _KINDS.items()}[kind]


# ------------------------------------------------------------------------------ CPU twin


@numba.njit(parallel=True, cache=True, nogil=True)
def _rerotate_cpu(
    src: np.ndarray,
    dst: np.ndarray,
    kind: int,
    rows: np.ndarray,
    cos: np.ndarray,
    sin: np.ndarray,
    layers: int,
    tokens: int,
    heads: int,
    dim: int,
    pairs: int,
    gptj: bool,
    copy_tail: bool,
    src_layer: int,
    dst_layer: int,
) -> None:
    # src, dst: flat words (uint32 for float32, uint16 otherwise); token t of layer l starts
    # at l * layer + t * heads * dim. x * c - y * s is three roundings: numba leaves
    # multiply-adds unfused without fastmath, as the GPU kernel's PTX mul.rn/sub.rn do.
    for lt in numba.prange(layers * tokens):
        layer, t = lt // tokens, lt % tokens
        r = rows[t]
        for h in range(heads):
            s0 = layer * src_layer + (t * heads + h) * dim
            d0 = layer * dst_layer + (t * heads + h) * dim
            for j in range(pairs):
                xi = 2 * j if gptj else j
                yi = xi + 1 if gptj else j + pairs
                if kind == 0:
                    x = np.uint32(src[s0 + xi]).view(np.float32)
                    y = np.uint32(src[s0 + yi]).view(np.float32)
                elif kind == 1:
                    x, y = f16_to_f32(src[s0 + xi]), f16_to_f32(src[s0 + yi])
                else:
                    x, y = bf16_to_f32(src[s0 + xi]), bf16_to_f32(src[s0 + yi])
                c, s = cos[r, j], sin[r, j]
                xo = x * c - y * s
                yo = x * s + y * c
                if xo != xo:  # one NaN for all: x86 makes them negative, NVIDIA positive
                    xo = np.float32(np.nan)
                if yo != yo:
                    yo = np.float32(np.nan)
                if kind == 0:
                    dst[d0 + xi] = np.float32(xo).view(np.uint32)
                    dst[d0 + yi] = np.float32(yo).view(np.uint32)
                elif kind == 1:
                    dst[d0 + xi] = f32_to_f16(xo, False)
                    dst[d0 + yi] = f32_to_f16(yo, False)
                else:
                    dst[d0 + xi] = f32_to_bf16(xo)
                    dst[d0 + yi] = f32_to_bf16(yo)
            if copy_tail:
                for i in range(2 * pairs, dim):
                    dst[d0 + i] = src[s0 + i]


def _host_words(op: _Operand) -> np.ndarray:
    t = op.obj
    word = np.uint32 if op.kind == 0 else np.uint16
    if isinstance(t, np.ndarray):
        return t.reshape(-1).view(word)
    return host_words(t).reshape(-1)  # contiguous (checked): a view


def _run_cpu(src: _Operand, dst: _Operand, table: tuple[np.ndarray, ...], cfg: RopeConfig) -> None:
    layers, (tokens, heads, dim) = src.shape[0], src.shape[-3:]
    s = _host_words(src)
    d = s if dst is src else _host_words(dst)
    layer = s.size // layers if layers else 0
    rows, cos, sin = table
    if s.size:
        _rerotate_cpu(s, d, src.kind, rows, cos, sin, layers, tokens, heads, dim, cfg.pairs,
                      cfg.pairing == "gptj", dst is not src, layer, layer)  # fmt: skip
    if src.kv and dst is not src:  # V moves with K, unchanged
        d.reshape(layers, 2, -1)[:, 1] = s.reshape(layers, 2, -1)[:, 1]


# ------------------------------------------------------------------------------ GPU

_CUDA_SOURCE = r"""
// A CTA is THREADS threads: blockDim.x over the units of a row (its pairs, then, out of
// place, its channels past rotary_dim), blockDim.y rows (a token's head) at a time;
// grid-stride over the rows of a layer (x) and over layers (y). The bits are those of the
// numba twin: the same float32 operations in the same order, none fused, subnormals kept.

// A thread moves a unit of N words at a time: with WIDE, one 16-byte vector (the row, the
// rotary half and the tail all 16-byte aligned), else one word (NeoX) or one pair (GPT-J).
template <typename T, int N, bool WIDE>
struct alignas(WIDE ? 16 : sizeof(T)) Unit {
    T e[N];
    __device__ __forceinline__ void load(const T* p) {
        if (WIDE) *reinterpret_cast<uint4*>(e) = *reinterpret_cast<const uint4*>(p);
        else for (int i = 0; i < N; ++i) e[i] = p[i];
    }
    __device__ __forceinline__ void store(T* p) const {
        if (WIDE) *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(e);
        else for (int i = 0; i < N; ++i) p[i] = e[i];
    }
};

// IEEE float32 operations written as PTX: no .ftz (CuPy compiles with -ftz=true, which
// would flush the subnormals the CPU keeps), and an explicit rounding mode (never fused).
__device__ __forceinline__ float mul(float a, float b) {
    float r;
    asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
__device__ __forceinline__ float add(float a, float b) {
    float r;
    asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
__device__ __forceinline__ float sub(float a, float b) {
    float r;
    asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
__device__ __forceinline__ float canonical(float v) {  // x86 and NVIDIA NaNs differ in sign
    return v != v ? __uint_as_float(0x7FC00000u) : v;
}

template <int KIND>
__device__ __forceinline__ void turn(typename Word<KIND>::T& xw, typename Word<KIND>::T& yw,
                                     float c, float s) {
    const float x = Word<KIND>::load(xw), y = Word<KIND>::load(yw);
    xw = Word<KIND>::store(canonical(sub(mul(x, c), mul(y, s))));
    yw = Word<KIND>::store(canonical(add(mul(x, s), mul(y, c))));
}

// src may be dst (in place): no __restrict__.
template <int KIND, bool GPTJ, bool WIDE>
__device__ __forceinline__ void rerotate(const void* src_, void* dst_, const int* rows,
                                         const float* cosv, const float* sinv,
                                         long long layers, int tokens, int heads, int dim,
                                         int pairs, int per_row, long long src_layer,
                                         long long dst_layer) {
    typedef typename Word<KIND>::T T;
    constexpr int N = WIDE ? 16 / (int)sizeof(T) : (GPTJ ? 2 : 1);  // words of a unit
    constexpr int P = GPTJ ? N / 2 : N;  // pairs of a unit
    constexpr int TAIL = WIDE ? N : 1;  // words of a unit past rotary_dim
    const int turning = pairs / P;  // units that rotate; the rest of a row's are copied
    const long long n_rows = (long long)tokens * heads;
    for (long long l = blockIdx.y; l < layers; l += gridDim.y) {
        const T* src = (const T*)src_ + l * src_layer;
        T* dst = (T*)dst_ + l * dst_layer;
        for (long long row = (long long)blockIdx.x * blockDim.y + threadIdx.y; row < n_rows;
             row += (long long)gridDim.x * blockDim.y) {
            const long long table = (long long)rows[(int)row / heads] * pairs;
            const T* s = src + row * dim;
            T* d = dst + row * dim;
            for (int u = threadIdx.x; u < per_row; u += blockDim.x) {
                const int j = u * P;  // first pair
                if (u >= turning) {  // past rotary_dim: copied when out of place
                    const int at = 2 * pairs + (u - turning) * TAIL;
                    Unit<T, TAIL, WIDE> w;
                    w.load(s + at);
                    w.store(d + at);
                } else if (GPTJ) {  // pair i is words 2i, 2i + 1
                    Unit<T, N, WIDE> w;
                    w.load(s + 2 * j);
#pragma unroll
                    for (int i = 0; i < P; ++i)
                        turn<KIND>(w.e[2 * i], w.e[2 * i + 1], cosv[table + j + i],
                                   sinv[table + j + i]);
                    w.store(d + 2 * j);
                } else {  // pair i is words i, i + pairs
                    Unit<T, N, WIDE> x, y;
                    x.load(s + j);
                    y.load(s + pairs + j);
#pragma unroll
                    for (int i = 0; i < P; ++i)
                        turn<KIND>(x.e[i], y.e[i], cosv[table + j + i], sinv[table + j + i]);
                    x.store(d + j);
                    y.store(d + pairs + j);
                }
            }
        }
    }
}

#define ENTRY(NAME, KIND, GPTJ, WIDE)                                                     \
    extern "C" __global__ void NAME(const void* src, void* dst, const int* rows,          \
                                    const float* cosv, const float* sinv, long long layers, \
                                    int tokens, int heads, int dim, int pairs, int per_row, \
                                    long long src_layer, long long dst_layer) {           \
        rerotate<KIND, GPTJ, WIDE>(src, dst, rows, cosv, sinv, layers, tokens, heads, dim, \
                                   pairs, per_row, src_layer, dst_layer);                 \
    }
#define ENTRIES(KIND, NAME)                              \
    ENTRY(rerotate_##NAME##_neox, KIND, false, false)    \
    ENTRY(rerotate_##NAME##_gptj, KIND, true, false)     \
    ENTRY(rerotate_##NAME##_neox_wide, KIND, false, true) \
    ENTRY(rerotate_##NAME##_gptj_wide, KIND, true, true)
ENTRIES(0, f32)
ENTRIES(1, f16)
ENTRIES(2, bf16)
"""

_WORDS = ("f32", "f16", "bf16")
_NAMES = tuple(
    f"rerotate_{word}_{pairing}{wide}"
    for word in _WORDS
    for pairing in ("neox", "gptj")
    for wide in ("", "_wide")
)
_module = KernelModule(CUDA_FLOATBITS + _CUDA_SOURCE, _NAMES)


def _run_gpu(
    src: _Operand, dst: _Operand, table: tuple[np.ndarray, ...], cfg: RopeConfig, stream: Any
) -> Any:
    import cupy

    device = src.device
    assert device is not None
    layers, (tokens, heads, dim) = src.shape[0], src.shape[-3:]
    item = 4 if src.kind == 0 else 2
    layer = src.nbytes // item // layers if layers else 0
    rows, cos, sin = table
    at_cos = align(rows.nbytes)
    at_sin = at_cos + align(cos.nbytes)
    total = at_sin + sin.nbytes
    current = cupy.cuda.runtime.getDevice()
    with cupy.cuda.Device(device) if current != device else contextlib.nullcontext():
        s = as_cupy_stream(stream)
        event = cupy.cuda.Event(block=False, disable_timing=True)
        if src.kv and dst is not src and layers:  # V moves with K, unchanged
            plane = layer * item // 2
            cupy.cuda.runtime.memcpy2DAsync(
                dst.ptr + plane, 2 * plane, src.ptr + plane, 2 * plane, plane, layers,
                cupy.cuda.runtime.memcpyDeviceToDevice, s.ptr,
            )  # fmt: skip
        if tokens * heads == 0 or layers == 0:
            event.record(s)
            return event
        pinned = cupy.cuda.alloc_pinned_memory(total)
        host = np.frombuffer(pinned, np.uint8, total)
        host[: rows.nbytes] = rows.view(np.uint8)
        host[at_cos : at_cos + cos.nbytes] = cos.reshape(-1).view(np.uint8)
        host[at_sin:] = sin.reshape(-1).view(np.uint8)
        with s:
            dev = cupy.empty(total, cupy.uint8)
        cupy.cuda.runtime.memcpyAsync(
            dev.data.ptr, host.ctypes.data, total, cupy.cuda.runtime.memcpyHostToDevice, s.ptr
        )
        pairs, gptj = cfg.pairs, cfg.pairing == "gptj"
        # A thread's unit: a 16-byte vector where rows and the rotary half are aligned to
        # one, else a word or a pair (bf16 on the H200: 3.1 TB/s against 1.3 with words).
        n = 16 // item
        wide = (
            src.ptr % 16 == 0
            and dst.ptr % 16 == 0
            and dim % n == 0
            and pairs % (n // 2 if gptj else n) == 0
        )
        unit_pairs = (n // 2 if gptj else n) if wide else 1
        tail = (dim - 2 * pairs) // (n if wide else 1) if dst is not src else 0
        per_row = pairs // unit_pairs + tail
        bx = min(_THREADS, 1 << (per_row - 1).bit_length())
        by = _THREADS // bx
        grid = (min(-(-(tokens * heads) // by), 65535), min(layers, 65535))
        name = f"rerotate_{_WORDS[src.kind]}_{cfg.pairing}{'_wide' if wide else ''}"
        base = dev.data.ptr
        _module.get(device, name)(
            grid,
            (bx, by),
            (np.uint64(src.ptr), np.uint64(dst.ptr), np.uint64(base), np.uint64(base + at_cos),
             np.uint64(base + at_sin), np.int64(layers), np.int32(tokens), np.int32(heads),
             np.int32(dim), np.int32(pairs), np.int32(per_row), np.int64(layer),
             np.int64(layer)),
            stream=s,
        )  # fmt: skip
        event.record(s)
    _keep_until_done(event, (pinned, dev))  # the GPU reads both until then
    return event


# ------------------------------------------------------------------------------ entry point


def rerotate_k(
    k: Any,
    from_pos: Any,
    to_pos: Any,
    config: RopeConfig,
    out: Any = None,
    stream: Any = None,
) -> Any:
    """Move K from positions `from_pos` to `to_pos` (host integer arrays, one per token):
    K = R(from) k becomes R(to) k, in place or into `out` (the same shape, dtype and device
    as `k`; for a KV input, its V is copied unchanged, and out of place so are the channels
    past rotary_dim). CUDA tensors: launched on `stream`, returns a `cupy.cuda.Event`
    recorded after it. CPU tensors: done on return, returns None."""
    src, dst, f, t = _check(k, from_pos, to_pos, config, out)
    table = rotation_table(config, f, t)
    if src.device is None:
        _run_cpu(src, dst, table, config)
        return None
    return _run_gpu(src, dst, table, config, stream)
