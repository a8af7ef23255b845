"""`kivi`: lossy, KIVI's asymmetric 2- or 4-bit quantization of a KV chunk.

KIVI (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", 2024)
finds that K has outlier *channels* while V does not, so it quantizes K per channel (a
group is `group` consecutive tokens of one channel) and V per token (a group is `group`
consecutive channels of one token and head), each group with its own minimum and scale,
and keeps the most recent tokens in full precision. This module offers that as the `Kivi`
codec (`kivi:bits=2,group=32,residual=32`):

- `bits`: 2 or 4 bits per code; `group`: tokens per K group and channels per V group, a
  positive multiple of 8 up to 256 (a last partial group is allowed); `residual`: the last
  `residual` tokens of the chunk (all of them in a shorter chunk) are stored exactly.
- Input: a `[layers, 2, tokens, heads, head_dim]` float16, bfloat16 or float32 tensor of
  finite values within float16's range (minimums and scales are float16, as in KIVI).

A group's codes are round((x - min) / scale), clamped to [0, 2**bits - 1], with scale =
(max - min) / (2**bits - 1). The min is rounded down and the scale up to float16, so the
codes still span the whole group: every element decodes within scale / 2 of its value,
plus the output dtype's rounding. A constant group whose value is a float16 gets scale 0
and decodes exactly. Decoding is exactly float32 `min + code * scale` (the product is
exact), rounded to nearest even into the value's dtype, float16 saturating at ±65504 (a
rounded-up scale can reach past it): the container checksums the decoded value, so any
other decoder must reproduce these bits.

Payload, little-endian, in this order, with q = max(tokens - residual, 0) quantized tokens,
r = tokens - q, C = heads * head_dim, row = ceil(C * bits / 8), kg = ceil(q / group) and
vg = ceil(head_dim / group):

    K codes    u8          [layers, q, row]
    K mins     f16         [layers, kg, C]
    K scales   f16         [layers, kg, C]
    V codes    u8          [layers, q, row]
    V mins     f16         [layers, q, heads, vg]
    V scales   f16         [layers, q, heads, vg]
    residual   value dtype [layers, 2, r, heads, head_dim]

A row of codes is one token of one layer, C codes in [heads, head_dim] order; code i sits
in byte i * bits // 8 at bit i * bits % 8 (low bits first), and the padding bits of the
row's last byte are zero.

The kernels (numba, parallel over K's token groups and over V's tokens) read and write the
value as 16-bit words whatever its dtype and convert to and from float32 with
`kvstore.kernels.floatbits` (numba has no float16 on the CPU): one pass over the value each
way, and one compiled version of each kernel serves every dtype.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import numba
import numpy as np
import torch

from kvstore.codecs.base import (
    DTYPE_WORDS,
    Codec,
    ContainerError,
    ParamValue,
    kv_view,
    register,
)
from kvstore.errors import InvalidArgument
from kvstore.kernels.floatbits import (
    F16_MAX,
    WORDS_BF16,
    WORDS_F16,
    WORDS_F32,
    bf16_to_f32,
    f16_to_f32,
    f32_to_bf16,
    f32_to_f16,
)

# How the kernels read and write a dtype's 16-bit words.
_F32, _F16, _BF16 = WORDS_F32, WORDS_F16, WORDS_BF16
_KINDS = DTYPE_WORDS


class _Parts(NamedTuple):
    """The payload's sections, as byte views of one buffer."""

    k_codes: np.ndarray
    k_mins: np.ndarray
    k_scales: np.ndarray
    v_codes: np.ndarray
    v_mins: np.ndarray
    v_scales: np.ndarray
    residual: np.ndarray


@dataclass(frozen=True)
class _Layout:
    """A KV value's shape and the codec's parameters: all that section sizes follow from."""

    layers: int
    tokens: int
    heads: int
    head_dim: int
    itemsize: int
    bits: int
    group: int
    residual: int

    @property
    def quantized(self) -> int:
        """Tokens quantized: all but the last `residual`."""
        return max(self.tokens - self.residual, 0)

    @property
    def channels(self) -> int:
        return self.heads * self.head_dim

    @property
    def words(self) -> int:
        """16-bit words per token of K or V."""
        return self.channels * self.itemsize // 2

    @property
    def row_bytes(self) -> int:
        return -(-self.channels * self.bits // 8)

    @property
    def k_groups(self) -> int:
        return -(-self.quantized // self.group)

    @property
    def v_groups(self) -> int:
        return -(-self.head_dim // self.group)

    def sizes(self) -> list[int]:
        """Byte sizes of the sections, in payload order."""
        codes = self.layers * self.quantized * self.row_bytes
        k_params = 2 * self.layers * self.k_groups * self.channels
        v_params = 2 * self.layers * self.quantized * self.heads * self.v_groups
        kept = self.layers * 2 * (self.tokens - self.quantized) * self.words * 2
        return [codes, k_params, k_params, codes, v_params, v_params, kept]

    def total(self) -> int:
        return sum(self.sizes())

    def split(self, buf: np.ndarray) -> _Parts:
        """Views of the sections of `buf`, `total()` bytes."""
        ends = itertools.accumulate(self.sizes(), initial=0)
        return _Parts(*(buf[a:b] for a, b in itertools.pairwise(ends)))


@register
class Kivi(Codec):
    name = "kivi"
    thread_teams = True
    codec_id = 4
    lossless = False
    PARAMS: ClassVar[Mapping[str, ParamValue]] = {"bits": 2, "group": 32, "residual": 32}

    def check_params(self) -> None:
        bits, group, residual = (int(self.params[k]) for k in ("bits", "group", "residual"))
        if bits not in (2, 4):
            raise InvalidArgument(f"kivi bits must be 2 or 4, got {bits}")
        if not (0 < group <= 256 and group % 8 == 0):
            raise InvalidArgument(f"kivi group must be a multiple of 8 in 8-256, got {group}")
        if residual < 0:
            raise InvalidArgument(f"kivi residual must be >= 0, got {residual}")

    def _layout(self, t: torch.Tensor) -> _Layout:
        layers, _, tokens, heads, head_dim = t.shape
        return _Layout(
            layers,
            tokens,
            heads,
            head_dim,
            t.element_size(),
            int(self.params["bits"]),
            int(self.params["group"]),
            int(self.params["residual"]),
        )

    def encode_payload(self, tensor: torch.Tensor) -> bytes:
        kv_view(tensor, self.name)
        if tensor.dtype not in _KINDS:
            raise InvalidArgument(f"kivi takes float16, bfloat16 or float32, not {tensor.dtype}")
        _check_range(tensor)
        lay = self._layout(tensor)
        buf = np.empty(lay.total(), np.uint8)
        parts = lay.split(buf)
        src = _words(tensor, lay)
        q = lay.quantized
        if q:
            _encode_k(src, _KINDS[tensor.dtype], lay, parts)
            _encode_v(src, _KINDS[tensor.dtype], lay, parts)
        kept = src[:, :, q:].view(np.uint8)
        parts.residual.reshape(kept.shape)[:] = kept
        return buf.tobytes()

    def decode_payload(self, payload: memoryview, out: torch.Tensor) -> None:
        if out.dim() != 5 or out.shape[1] != 2 or out.dtype not in _KINDS:
            raise ContainerError(f"a kivi value is KV, not {out.dtype} {tuple(out.shape)}")
        lay = self._layout(out)
        if len(payload) != lay.total():
            raise ContainerError(
                f"kivi payload of {len(payload)} bytes; {out.dtype} {tuple(out.shape)} with "
                f"{self.spec()} needs {lay.total()}"
            )
        buf = np.frombuffer(payload, np.uint8)
        buf.flags.writeable = False  # one compiled kernel, whoever owns the bytes
        parts = lay.split(buf)
        dst = _words(out, lay)
        q = lay.quantized
        if q:
            _decode_k(parts, lay, _KINDS[out.dtype], dst)
            _decode_v(parts, lay, _KINDS[out.dtype], dst)
        kept = dst[:, :, q:].view(np.uint8)
        kept[:] = parts.residual.reshape(kept.shape)


def _check_range(t: torch.Tensor) -> None:
    """InvalidArgument unless every value is finite and fits float16."""
    if not t.numel():
        return
    lo, hi = (float(m) for m in torch.aminmax(t))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise InvalidArgument("kivi takes finite values only; the tensor has inf or nan")
    if max(-lo, hi) > F16_MAX:
        raise InvalidArgument(
            f"kivi stores minimums and scales as float16: values must be within "
            f"±{F16_MAX:g}, got {lo:g} to {hi:g}"
        )


def _words(t: torch.Tensor, lay: _Layout) -> np.ndarray:
    """A contiguous KV tensor as 16-bit words `[layers, 2, tokens, words per token]`,
    without a copy. The kernels take this whole array, always C-contiguous, rather than
    slices of it, which numba would type differently from shape to shape (each type a
    compilation of seconds)."""
    words = t.view(torch.int16).numpy().view(np.uint16)
    return words.reshape(lay.layers, 2, lay.tokens, lay.words)


def _encode_k(words: np.ndarray, kind: int, lay: _Layout, parts: _Parts) -> None:
    mins = np.empty((lay.layers, lay.k_groups, lay.channels), np.uint16)
    scales = np.empty_like(mins)
    codes = parts.k_codes.reshape(lay.layers, lay.quantized, lay.row_bytes)
    _k_encode(words, kind, lay.group, lay.bits, codes, mins, scales)
    parts.k_mins[:] = mins.view(np.uint8).reshape(-1)
    parts.k_scales[:] = scales.view(np.uint8).reshape(-1)


def _encode_v(words: np.ndarray, kind: int, lay: _Layout, parts: _Parts) -> None:
    mins = np.empty((lay.layers, lay.quantized, lay.heads, lay.v_groups), np.uint16)
    scales = np.empty_like(mins)
    codes = parts.v_codes.reshape(lay.layers, lay.quantized, lay.row_bytes)
    _v_encode(words, kind, lay.group, lay.bits, lay.head_dim, codes, mins, scales)
    parts.v_mins[:] = mins.view(np.uint8).reshape(-1)
    parts.v_scales[:] = scales.view(np.uint8).reshape(-1)


def _f16_section(raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A float16 section as float32, converted once rather than per use in the kernels."""
    return raw.view("<f2").astype(np.float32).reshape(shape)


def _decode_k(parts: _Parts, lay: _Layout, kind: int, words: np.ndarray) -> None:
    shape = (lay.layers, lay.k_groups, lay.channels)
    _k_decode(
        parts.k_codes.reshape(lay.layers, lay.quantized, lay.row_bytes),
        _f16_section(parts.k_mins, shape),
        _f16_section(parts.k_scales, shape),
        lay.group,
        lay.bits,
        kind,
        words,
    )


def _decode_v(parts: _Parts, lay: _Layout, kind: int, words: np.ndarray) -> None:
    shape = (lay.layers, lay.quantized, lay.heads, lay.v_groups)
    _v_decode(
        parts.v_codes.reshape(lay.layers, lay.quantized, lay.row_bytes),
        _f16_section(parts.v_mins, shape),
        _f16_section(parts.v_scales, shape),
        lay.group,
        lay.bits,
        kind,
        lay.head_dim,
        words,
    )


# ------------------------------------------------------ a token's words and float32


@numba.njit(cache=True, nogil=True)
def _load(src: np.ndarray, kind: int, dst: np.ndarray) -> None:
    """dst (float32) = the values whose 16-bit words are `src`."""
    n = dst.size
    bits = dst.view(np.uint32)
    if kind == _F32:
        for c in range(n):
            bits[c] = np.uint32(src[2 * c]) | np.uint32(src[2 * c + 1]) << np.uint32(16)
    elif kind == _BF16:
        for c in range(n):
            dst[c] = bf16_to_f32(src[c])
    else:
        for c in range(n):
            dst[c] = f16_to_f32(src[c])


@numba.njit(cache=True, nogil=True)
def _store(vals: np.ndarray, kind: int, dst: np.ndarray) -> None:
    """dst (16-bit words) = float32 `vals` rounded to the dtype, to nearest even."""
    n = vals.size
    bits = vals.view(np.uint32)
    if kind == _F32:
        for c in range(n):
            dst[2 * c] = bits[c] & 0xFFFF
            dst[2 * c + 1] = bits[c] >> 16
    elif kind == _BF16:
        for c in range(n):
            dst[c] = f32_to_bf16(vals[c])
    else:  # saturating: a rounded-up scale can take min + code * scale past 65504
        for c in range(n):
            dst[c] = f32_to_f16(vals[c], True)


# -------------------------------------------------------------------- quantization


@numba.njit(cache=True, nogil=True)
def _group_params(
    lo: np.float32, hi: np.float32, levels: int
) -> tuple[np.int64, np.int64, np.float32, np.float32]:
    """Float16 bits of the min and scale of a group spanning [lo, hi], and that min and
    the inverse scale (0 for a constant group) as float32.

    The min rounds down and the scale up, so min + levels * scale >= hi: no value lies
    outside the codes' span, where it would break the scale / 2 error bound.
    """
    m16 = f32_to_f16(np.float32(lo), True)
    if f16_to_f32(m16) > lo:  # one float16 step down
        m16 = np.int64(0x8001) if m16 == 0 else (m16 + 1 if m16 & 0x8000 else m16 - 1)
    mn = f16_to_f32(m16)
    need = (np.float64(hi) - np.float64(mn)) / levels  # float64: exact enough to round up
    s16 = f32_to_f16(np.float32(need), True)
    if np.float64(f16_to_f32(s16)) < need:
        s16 += 1
    scale = f16_to_f32(s16)
    inv = np.float32(1) / scale if scale > 0 else np.float32(0)
    return m16, s16, mn, inv


@numba.njit(cache=True, fastmath=True, nogil=True)
def _span(x: np.ndarray, c0: int, c1: int) -> tuple[np.float32, np.float32]:
    """Min and max of x[c0:c1]. Fast-math lets LLVM vectorize the reductions; it cannot
    change their result, since values are finite and min and max do not round."""
    lo = hi = x[c0]
    for c in range(c0 + 1, c1):
        v = x[c]
        lo = v if v < lo else lo
        hi = v if v > hi else hi
    return lo, hi


@numba.njit(cache=True, nogil=True)
def _quantize(x: np.ndarray, mn: np.ndarray, inv: np.ndarray, levels: int, row: np.ndarray) -> None:
    """row[c] = the code of x[c] against the min and inverse scale of its group."""
    for c in range(x.size):
        q = (x[c] - mn[c]) * inv[c] + np.float32(0.5)
        row[c] = int(min(max(q, np.float32(0)), np.float32(levels)))


@numba.njit(cache=True, nogil=True)
def _dequantize(row: np.ndarray, mn: np.ndarray, scale: np.ndarray, vals: np.ndarray) -> None:
    """vals[c] = mn[c] + row[c] * scale[c]; the product is exact (a few-bit code times a
    float16), so the result does not depend on whether the machine fuses it into an FMA."""
    for c in range(vals.size):
        vals[c] = mn[c] + np.float32(row[c]) * scale[c]


@numba.njit(cache=True, nogil=True)
def _pack(row: np.ndarray, bits: int, dst: np.ndarray) -> None:
    """Pack `row`'s codes (zero past the last) into `dst`, 8 // bits to a byte."""
    if bits == 2:
        for j in range(dst.size):
            dst[j] = row[4 * j] | row[4 * j + 1] << 2 | row[4 * j + 2] << 4 | row[4 * j + 3] << 6
    else:
        for j in range(dst.size):
            dst[j] = row[2 * j] | row[2 * j + 1] << 4


@numba.njit(cache=True, nogil=True)
def _unpack(src: np.ndarray, bits: int, row: np.ndarray) -> None:
    if bits == 2:
        for j in range(src.size):
            b = src[j]
            row[4 * j] = b & 3
            row[4 * j + 1] = (b >> 2) & 3
            row[4 * j + 2] = (b >> 4) & 3
            row[4 * j + 3] = b >> 6
    else:
        for j in range(src.size):
            b = src[j]
            row[2 * j] = b & 15
            row[2 * j + 1] = b >> 4


@numba.njit(parallel=True, cache=True, nogil=True)
def _k_encode(
    words: np.ndarray,
    kind: int,
    group: int,
    bits: int,
    codes: np.ndarray,
    mins: np.ndarray,
    scales: np.ndarray,
) -> None:
    """K per channel: words [layers, 2, tokens, words] -> codes [layers, q, row], float16
    bits of mins and scales [layers, kg, C]. One token group of one layer per iteration."""
    layers, tokens = codes.shape[0], codes.shape[1]
    groups, channels = mins.shape[1], mins.shape[2]
    levels = (1 << bits) - 1
    for i in numba.prange(layers * groups):
        layer, g = i // groups, i % groups
        t0 = g * group
        n = min(group, tokens - t0)
        x = np.empty((n, channels), np.float32)
        for t in range(n):
            _load(words[layer, 0, t0 + t], kind, x[t])
        lo = x[0].copy()
        hi = x[0].copy()
        for t in range(1, n):
            for c in range(channels):
                v = x[t, c]
                lo[c] = v if v < lo[c] else lo[c]
                hi[c] = v if v > hi[c] else hi[c]
        mn = np.empty(channels, np.float32)
        inv = np.empty(channels, np.float32)
        for c in range(channels):
            mins[layer, g, c], scales[layer, g, c], mn[c], inv[c] = _group_params(
                lo[c], hi[c], levels
            )
        row = np.zeros(codes.shape[2] * (8 // bits), np.uint8)
        for t in range(n):
            _quantize(x[t], mn, inv, levels, row)
            _pack(row, bits, codes[layer, t0 + t])


@numba.njit(parallel=True, cache=True, nogil=True)
def _v_encode(
    words: np.ndarray,
    kind: int,
    group: int,
    bits: int,
    head_dim: int,
    codes: np.ndarray,
    mins: np.ndarray,
    scales: np.ndarray,
) -> None:
    """V per token: words [layers, 2, tokens, words] -> codes [layers, q, row], float16
    bits of mins and scales [layers, q, heads, vg]. One token of one layer per iteration."""
    layers, tokens = codes.shape[0], codes.shape[1]
    heads, groups = mins.shape[2], mins.shape[3]
    channels = heads * head_dim
    levels = (1 << bits) - 1
    for i in numba.prange(layers * tokens):
        layer, t = i // tokens, i % tokens
        x = np.empty(channels, np.float32)
        _load(words[layer, 1, t], kind, x)
        mn = np.empty(channels, np.float32)
        inv = np.empty(channels, np.float32)
        for h in range(heads):
            for g in range(groups):
                c0 = h * head_dim + g * group
                c1 = h * head_dim + min((g + 1) * group, head_dim)
                lo, hi = _span(x, c0, c1)
                mins[layer, t, h, g], scales[layer, t, h, g], m, v = _group_params(lo, hi, levels)
                mn[c0:c1] = m
                inv[c0:c1] = v
        row = np.zeros(codes.shape[2] * (8 // bits), np.uint8)
        _quantize(x, mn, inv, levels, row)
        _pack(row, bits, codes[layer, t])


@numba.njit(parallel=True, cache=True, nogil=True)
def _k_decode(
    codes: np.ndarray,
    mins: np.ndarray,
    scales: np.ndarray,
    group: int,
    bits: int,
    kind: int,
    words: np.ndarray,
) -> None:
    """K of words [layers, 2, tokens, words] = mins + codes * scales [layers, kg, C] of
    each element's token group. One token of one layer per iteration."""
    layers, tokens = codes.shape[0], codes.shape[1]
    channels = mins.shape[2]
    for i in numba.prange(layers * tokens):
        layer, t = i // tokens, i % tokens
        g = t // group
        row = np.empty(codes.shape[2] * (8 // bits), np.uint8)
        _unpack(codes[layer, t], bits, row)
        vals = np.empty(channels, np.float32)
        _dequantize(row, mins[layer, g], scales[layer, g], vals)
        _store(vals, kind, words[layer, 0, t])


@numba.njit(parallel=True, cache=True, nogil=True)
def _v_decode(
    codes: np.ndarray,
    mins: np.ndarray,
    scales: np.ndarray,
    group: int,
    bits: int,
    kind: int,
    head_dim: int,
    words: np.ndarray,
) -> None:
    """V of words [layers, 2, tokens, words] = mins + codes * scales [layers, q, heads, vg]
    of each element's channel group. One token of one layer per iteration."""
    layers, tokens = codes.shape[0], codes.shape[1]
    heads, groups = mins.shape[2], mins.shape[3]
    channels = heads * head_dim
    for i in numba.prange(layers * tokens):
        layer, t = i // tokens, i % tokens
        row = np.empty(codes.shape[2] * (8 // bits), np.uint8)
        _unpack(codes[layer, t], bits, row)
        mn = np.empty(channels, np.float32)
        scale = np.empty(channels, np.float32)
        for h in range(heads):
            for g in range(groups):
                c0 = h * head_dim + g * group
                c1 = h * head_dim + min((g + 1) * group, head_dim)
                mn[c0:c1] = mins[layer, t, h, g]
                scale[c0:c1] = scales[layer, t, h, g]
        vals = np.empty(channels, np.float32)
        _dequantize(row, mn, scale, vals)
        _store(vals, kind, words[layer, 1, t])
