"""`int8` and `fp8`: lossy KV codecs, symmetric absmax quantization to one byte a value.

Both take the `[layers, 2, tokens, heads, head_dim]` KV layout (`kv_view`) in float16,
bfloat16 or float32, and quantize K and V along different axes, as KIVI does: K has
outlier *channels* (a few head_dim indices large in every token), so it gets one scale
per (layer, head, head_dim index) over the chunk's tokens; V has no such channels, so it
gets one scale per (layer, token, head) over head_dim.

- `int8` (id 2): scale = absmax / 127, code = round(x / scale) (to nearest even),
  clamped to [-127, 127].
- `fp8` (id 3): scale = absmax / 448, code = x / scale as float8_e4m3fn (round to nearest
  even; 448 is e4m3fn's largest finite value).

A group of zeros gets scale 0 and decodes to zeros. Non-finite values are refused
(InvalidArgument): one inf would take its whole group's precision with it.

Payload, in this order, every size following from the shape the container records:

    K codes  u8      [layers, tokens, heads, head_dim]
    V codes  u8      [layers, tokens, heads, head_dim]
    K scales f32 LE  [layers, heads, head_dim]
    V scales f32 LE  [layers, tokens, heads]

about half the bytes of float16: the scales add 2 / tokens + 2 / head_dim bytes a value.

Decoding is exactly `out = dtype(float32(code) * scale)`: one float32 product, rounded
to nearest even into the value's dtype. The container checksums the decoded value, so
another decoder (a GPU one, say) must reproduce these bits.

`PayloadLayout` says where each part lies. The numba kernels read and write the values'
bits and convert float16 and bfloat16 with `kvstore.kernels.floatbits` (numba has neither
type on the CPU): one parallel pass over the value to encode, plus a pass over K for its
channels' absmax, and one pass to decode straight into the output, with no float32 copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numba
import numpy as np
import torch

from kvstore.codecs.base import Codec, ContainerError, kv_view, register
from kvstore.errors import InvalidArgument
from kvstore.kernels.floatbits import bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16, host_words

# How the kernels read and write a value's bits (uint32 words for float32, else uint16).
F32, F16, BF16 = 0, 1, 2
_KINDS = {torch.float32: F32, torch.float16: F16, torch.bfloat16: BF16}

INT8_MAX, FP8_MAX = np.float32(127.0), np.float32(448.0)
# Code byte -> the float32 it stands for (int8: two's complement; e4m3fn: 0x7F, 0xFF NaN).
INT8_VALUES = np.arange(256, dtype=np.uint8).view(np.int8).astype(np.float32)
FP8_VALUES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()


@numba.njit(cache=True, nogil=True)
def _load(bits: int, kind: int) -> np.float32:
    """The float32 value of one element's bits (float16 inf and NaN stay, to be refused)."""
    if kind == BF16:
        return bf16_to_f32(bits)
    if kind == F16:
        return f16_to_f32(bits)
    return np.uint32(bits).view(np.float32)


@numba.njit(cache=True, nogil=True)
def _store(value: float, kind: int) -> np.int64:
    """The bits of float32 `value` in the output dtype, rounded to nearest even."""
    if kind == BF16:
        return f32_to_bf16(value)
    if kind == F16:
        # The documented `dtype(float32(code) * scale)`: IEEE rounding, overflowing to inf.
        return f32_to_f16(value, False)
    return np.int64(np.float32(value).view(np.uint32))


@numba.njit(cache=True, nogil=True)
def _fp8_code(x: float) -> np.int32:
    """float8_e4m3fn bits of float32 `x` clamped to +-448, rounded to nearest even."""
    y = min(max(np.float32(x), -FP8_MAX), FP8_MAX)
    u = np.float32(y).view(np.int32)
    sign = (u >> 24) & 0x80
    a = u & 0x7FFFFFFF
    # Below 2**-6, e4m3 has subnormals, multiples of 2**-9; above, keep 3 mantissa bits,
    # rounding to nearest even, and rebias the exponent from 127 to 7.
    sub = np.int32(np.rint(abs(y) * np.float32(512.0)))
    normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - (120 << 3)
    return (sub if a < 0x3C800000 else normal) | sign


@numba.njit(cache=True, nogil=True)
def _int8_code(x: float) -> np.int32:
    """The int8 code of `x` (in units of the scale), as its two's complement byte."""
    return np.int32(min(max(np.rint(np.float32(x)), -INT8_MAX), INT8_MAX)) & 0xFF


@numba.njit(cache=True, error_model="numpy", nogil=True)
def _scale(top: int, kind: int, fp8: bool) -> np.float32:
    """The scale of a group whose largest magnitude has the bits `top`."""
    return _load(top, kind) / (FP8_MAX if fp8 else INT8_MAX)


# Measured on the kernels below: a loop vectorizes only if the fp8/int8 choice is made
# outside it, if it indexes whole arrays (row views taken inside a parallel loop stopped
# it), and if division follows numpy's error model (no zero check; no divisor is zero).


@numba.njit(cache=True, error_model="numpy", nogil=True)
def _quantize_k(rows, kind, fp8, layer, t, div, codes):  # type: ignore[no-untyped-def]
    """codes[layer, t] = the codes of K row rows[layer, 0, t] over its channels' `div`."""
    if fp8:
        for i in range(rows.shape[3]):
            codes[layer, t, i] = _fp8_code(_load(rows[layer, 0, t, i], kind) / div[layer, i])
    else:
        for i in range(rows.shape[3]):
            codes[layer, t, i] = _int8_code(_load(rows[layer, 0, t, i], kind) / div[layer, i])


@numba.njit(cache=True, error_model="numpy", nogil=True)
def _quantize_v(x, kind, fp8, layer, t, head, div, codes):  # type: ignore[no-untyped-def]
    """codes[layer, t, head] = the codes of V group x[layer, 1, t, head] over `div`."""
    if fp8:
        for d in range(x.shape[4]):
            codes[layer, t, head, d] = _fp8_code(_load(x[layer, 1, t, head, d], kind) / div)
    else:
        for d in range(x.shape[4]):
            codes[layer, t, head, d] = _int8_code(_load(x[layer, 1, t, head, d], kind) / div)


@numba.njit(parallel=True, cache=True, nogil=True)
def _encode_kv(  # type: ignore[no-untyped-def]
    x, kind, fp8, k_codes, v_codes, k_scales, v_scales
):
    """Quantize `x` (bits, [layers, 2, tokens, heads, head_dim]) into codes and scales.

    A group's absmax is taken on the bits: in IEEE formats the magnitude bits order like
    the magnitudes, and inf and NaN come out above every finite value, so a non-finite
    element makes its group's scale non-finite, which the caller checks.
    """
    layers, _, tokens, heads, dim = x.shape
    width = heads * dim
    # Both passes read K as (layer, token) rows of heads * head_dim values, in memory
    # order; the absmax pass (integer maxima, cheap) is parallel over layers only.
    rows = x.reshape(layers, 2, tokens, width)
    k_rows = k_codes.reshape(layers, tokens, width)
    k_flat = k_scales.reshape(layers, width)
    mask = 0x7FFFFFFF if kind == F32 else 0x7FFF
    one = np.float32(1.0)
    k_div = np.empty((layers, width), np.float32)  # the K scales, with 1 for 0
    for layer in numba.prange(layers):
        top = np.zeros(width, np.int32)
        for t in range(tokens):
            for i in range(width):
                top[i] = max(top[i], np.int32(rows[layer, 0, t, i] & mask))
        for i in range(width):
            s = _scale(top[i], kind, fp8)
            k_flat[layer, i] = s
            k_div[layer, i] = s if s > 0 else one  # the group is zeros (or underflows)
    for r in numba.prange(layers * tokens):
        layer, t = r // tokens, r % tokens
        _quantize_k(rows, kind, fp8, layer, t, k_div, k_rows)
        for head in range(heads):
            top_v = np.int32(0)
            for d in range(dim):
                top_v = max(top_v, np.int32(x[layer, 1, t, head, d] & mask))
            s = _scale(top_v, kind, fp8)
            v_scales[layer, t, head] = s
            _quantize_v(x, kind, fp8, layer, t, head, s if s > 0 else one, v_codes)


@numba.njit(parallel=True, cache=True, nogil=True)
def _decode_kv(  # type: ignore[no-untyped-def]
    k_codes, v_codes, k_scales, v_scales, values, kind, out
):
    """out (bits, [layers, 2, tokens, heads, head_dim]) = values[code] * scale."""
    layers, tokens, heads, dim = k_codes.shape
    for r in numba.prange(layers * tokens):
        layer, t = r // tokens, r % tokens
        for head in range(heads):
            for d in range(dim):
                k = values[k_codes[layer, t, head, d]] * k_scales[layer, head, d]
                out[layer, 0, t, head, d] = _store(k, kind)
            s = v_scales[layer, t, head]
            for d in range(dim):
                out[layer, 1, t, head, d] = _store(values[v_codes[layer, t, head, d]] * s, kind)


@dataclass(frozen=True)
class PayloadLayout:
    """The payload's parts for one KV shape: their sizes, and views of them in a buffer."""

    layers: int
    tokens: int
    heads: int
    dim: int

    @classmethod
    def of(cls, shape: tuple[int, ...]) -> PayloadLayout:
        layers, _, tokens, heads, dim = shape
        return cls(layers, tokens, heads, dim)

    @property
    def codes(self) -> int:
        """Bytes of K codes, and of V codes."""
        return self.layers * self.tokens * self.heads * self.dim

    @property
    def k_scales(self) -> int:
        return self.layers * self.heads * self.dim

    @property
    def v_scales(self) -> int:
        return self.layers * self.tokens * self.heads

    @property
    def nbytes(self) -> int:
        return 2 * self.codes + 4 * (self.k_scales + self.v_scales)

    def split(self, buf: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """K codes, V codes, K scales, V scales: views of the uint8 array `buf` (nbytes)."""
        code_shape = (self.layers, self.tokens, self.heads, self.dim)
        k_end, v_end = self.codes, 2 * self.codes
        ks_end = v_end + 4 * self.k_scales
        return (
            buf[:k_end].reshape(code_shape),
            buf[k_end:v_end].reshape(code_shape),
            buf[v_end:ks_end].view("<f4").reshape(self.layers, self.heads, self.dim),
            buf[ks_end:].view("<f4").reshape(self.layers, self.tokens, self.heads),
        )


class AbsmaxCodec(Codec):
    """What `int8` and `fp8` share: all but the code format."""

    fp8: ClassVar[bool]
    values: ClassVar[np.ndarray]  # code byte -> float32
    thread_teams = True

    def encode_payload(self, tensor: torch.Tensor) -> bytes:
        kv_view(tensor, self.name)
        kind = _KINDS.get(tensor.dtype)
        if kind is None:
            raise InvalidArgument(
                f"codec {self.name!r} takes float16, bfloat16 or float32, not {tensor.dtype}"
            )
        layout = PayloadLayout.of(tuple(tensor.shape))
        buf = np.empty(layout.nbytes, np.uint8)
        k_codes, v_codes, k_scales_at, v_scales_at = layout.split(buf)
        # The scales' place in the payload need not be 4-byte aligned: the kernel writes
        # aligned arrays (so that one compiled variant serves), copied in after.
        k_scales = np.empty(k_scales_at.shape, np.float32)
        v_scales = np.empty(v_scales_at.shape, np.float32)
        _encode_kv(host_words(tensor), kind, self.fp8, k_codes, v_codes, k_scales, v_scales)
        if not (np.isfinite(k_scales).all() and np.isfinite(v_scales).all()):
            raise InvalidArgument(
                f"codec {self.name!r} cannot quantize inf or NaN values; "
                "store this tensor with a lossless codec (raw or zstd)"
            )
        k_scales_at[...] = k_scales
        v_scales_at[...] = v_scales
        return buf.tobytes()

    def decode_payload(self, payload: memoryview, out: torch.Tensor) -> None:
        kind = _KINDS.get(out.dtype)
        if out.dim() != 5 or out.shape[1] != 2 or kind is None:
            raise ContainerError(
                f"a {self.name} payload decodes to KV [layers, 2, tokens, heads, head_dim] "
                f"in float16, bfloat16 or float32, not {out.dtype} {tuple(out.shape)}"
            )
        layout = PayloadLayout.of(tuple(out.shape))
        if len(payload) != layout.nbytes:
            raise ContainerError(
                f"{self.name} payload of {len(payload)} bytes; shape {tuple(out.shape)} "
                f"needs {layout.nbytes}"
            )
        buf = np.frombuffer(payload, np.uint8)
        buf.flags.writeable = False  # read-only whatever the source: one compiled variant
        k_codes, v_codes, k_scales, v_scales = layout.split(buf)
        # Copies of the scales (a few hundred KiB) are aligned; their place may not be.
        _decode_kv(
            k_codes,
            v_codes,
            k_scales.copy(),
            v_scales.copy(),
            self.values,
            kind,
            host_words(out),
        )


@register
class Int8(AbsmaxCodec):
    name = "int8"
    codec_id = 2
    lossless = False
    fp8 = False
    values = INT8_VALUES


@register
class Fp8(AbsmaxCodec):
    name = "fp8"
    codec_id = 3
    lossless = False
    fp8 = True
    values = FP8_VALUES
