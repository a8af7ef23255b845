"""`cachegen`: lossy, CacheGen-style anchors, deltas and entropy coding of a KV chunk.

CacheGen (Liu et al., SIGCOMM 2024) observed that KV changes little between nearby tokens,
that early layers are more sensitive to loss than later ones, and that each (layer,
channel) has its own value distribution. This codec (`cachegen:level=1,anchor=16`) uses
all three:

- Tokens come in groups of `anchor`; the first of each group is an *anchor*, quantized to
  8 bits per channel (symmetric, one float16 scale per (layer, K/V, head, channel)). Every
  other token is coded as its *delta* from its group's decoded anchor, so errors do not
  accumulate along the chunk and groups decode independently.
- Deltas are quantized uniformly to an odd number of bins whose step is per (layer, K/V,
  head, channel), from that channel's largest delta: scaled this way the channels of one
  head share a distribution. The number of bins falls with depth: the first third of the
  layers gets the most (`LEVELS[level]`), as the early layers matter most.
- The delta symbols of each (layer, K/V, head) form one stream, coded with rANS
  (`kvstore.codecs.rans`) against that stream's own frequency table; tables are packed in
  a few bits per symbol instead of CacheGen's 16-bit CDFs. Streams decode independently
  (in parallel here; one GPU thread each later).

Input: `[layers, 2, tokens, heads, head_dim]` float16, bfloat16 or float32, finite, with
magnitudes within float16's range (scales are float16). Decoding computes every value in
float32 as `anchor_code * anchor_scale` plus `(symbol - bins // 2) * step`, then rounds it
to the value's dtype to nearest even; the container checksums the result, so any other
decoder must reproduce these bits.

Payload, little-endian:

    anchor scales  f16  [layers, 2, heads, head_dim]
    delta steps    f16  [layers, 2, heads, head_dim]
    anchor codes   i8   [layers, 2, anchors, heads, head_dim]
    tables_len     u32, then the packed rANS tables (one model per stream)
    offsets        u32  [streams + 1], then the streams' bytes

with anchors = ceil(tokens / anchor), streams = layers * 2 * heads (in that order), each
of (tokens - anchors) * head_dim symbols, token-major.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numba
import numpy as np
import torch

from kvstore.codecs import rans
from kvstore.codecs.base import Codec, ContainerError, ParamValue, kv_view, register
from kvstore.errors import InvalidArgument

# Delta bins for the first, second and last third of the layers, by level: lower levels
# keep more.
LEVELS: Mapping[int, tuple[int, int, int]] = {
    0: (127, 63, 63),
    1: (63, 31, 31),
    2: (31, 15, 15),
    3: (15, 7, 7),
}
PRECISION = 12  # rANS frequency bits: tables small, coding within ~0.1% of the entropy
LANES = 4
F16_MAX = 65504.0
# Scales are rounded to float16; dividing by a little more than the code range keeps every
# code within it after that rounding.
_ANCHOR_DIV = 126.9


@dataclass(frozen=True)
class _Layout:
    layers: int
    tokens: int
    heads: int
    head_dim: int
    anchor: int

    @property
    def anchors(self) -> int:
        return -(-self.tokens // self.anchor) if self.tokens else 0

    @property
    def per_stream(self) -> int:
        return (self.tokens - self.anchors) * self.head_dim

    @property
    def streams(self) -> int:
        return self.layers * 2 * self.heads

    @property
    def channels(self) -> int:
        return self.layers * 2 * self.heads * self.head_dim

    def fixed_bytes(self) -> int:
        return 2 * 2 * self.channels + self.anchors * self.channels


@register
class CacheGen(Codec):
    name = "cachegen"
    codec_id = 5
    lossless = False
    PARAMS: ClassVar[Mapping[str, ParamValue]] = {"level": 1, "anchor": 16}

    def check_params(self) -> None:
        if self.params["level"] not in LEVELS:
            raise InvalidArgument(
                f"cachegen level must be one of {sorted(LEVELS)}, got {self.params['level']}"
            )
        if not 2 <= int(self.params["anchor"]) <= 256:
            raise InvalidArgument(f"cachegen anchor must be 2-256, got {self.params['anchor']}")

    def _layout(self, shape: tuple[int, ...]) -> _Layout:
        layers, _, tokens, heads, head_dim = shape
        return _Layout(layers, tokens, heads, head_dim, int(self.params["anchor"]))

    def _bins(self, layers: int) -> np.ndarray:
        """Delta bins of each layer: thirds of the depth take the level's three counts."""
        first, middle, last = LEVELS[int(self.params["level"])]
        third = np.arange(layers) * 3 // max(layers, 1)
        return np.array([first, middle, last], np.int32)[third]

    def encode_payload(self, tensor: torch.Tensor) -> bytes:
        kv_view(tensor, self.name)  # the layout check
        x = tensor.float()
        if not torch.isfinite(x).all() or (x.numel() and x.abs().max() > F16_MAX):
            raise InvalidArgument(
                "cachegen needs finite values within float16's range; store this value with "
                "a lossless codec (raw or zstd)"
            )
        lay = self._layout(tuple(tensor.shape))
        xs = x.permute(0, 1, 3, 4, 2).contiguous().numpy()  # [L, 2, H, D, T]: tokens inner
        anchors = xs[..., :: lay.anchor]
        a_scale = _f16_scales(np.abs(anchors).max(axis=-1, initial=0.0) / _ANCHOR_DIV)
        a_codes = np.empty(anchors.shape, np.int8)
        deltas_max = np.empty(xs.shape[:-1], np.float32)
        _anchor_codes(xs, lay.anchor, a_scale, a_codes, deltas_max)
        bins = self._bins(lay.layers)
        half = (bins // 2).astype(np.float32)[:, None, None, None]
        steps = _f16_scales(deltas_max / (half * 1.001))
        symbols = np.empty(
            (lay.layers, 2, lay.heads, lay.tokens - lay.anchors, lay.head_dim), np.uint8
        )
        _delta_symbols(xs, lay.anchor, a_scale, a_codes, steps, bins, symbols)
        streams = symbols.reshape(lay.streams, lay.per_stream)
        counts = _histograms(streams, int(bins.max()))
        freqs = rans.quantize_freqs(counts, PRECISION)
        tables = rans.pack_tables(freqs, PRECISION)
        models = np.arange(lay.streams, dtype=np.int32)
        data, offsets = rans.encode_streams(streams, models, freqs, PRECISION, LANES)
        return b"".join(
            [
                a_scale.astype("<f2").tobytes(),
                steps.astype("<f2").tobytes(),
                # anchors stored [L, 2, anchors, H, D], as the module docstring says
                np.ascontiguousarray(a_codes.transpose(0, 1, 4, 2, 3)).tobytes(),
                struct.pack("<I", len(tables)),
                tables,
                offsets.astype("<u4").tobytes(),
                data,
            ]
        )

    def decode_payload(self, payload: memoryview, out: torch.Tensor) -> None:
        if out.dim() != 5 or out.shape[1] != 2:
            raise ContainerError(f"cachegen cannot decode into shape {tuple(out.shape)}")
        lay = self._layout(tuple(out.shape))
        buf = np.frombuffer(payload, np.uint8)
        fixed = lay.fixed_bytes()
        if buf.size < fixed + 4:
            raise ContainerError("cachegen payload is truncated")
        ch = lay.channels
        shape4 = (lay.layers, 2, lay.heads, lay.head_dim)
        a_scale = buf[: 2 * ch].view("<f2").astype(np.float32).reshape(shape4)
        steps = buf[2 * ch : 4 * ch].view("<f2").astype(np.float32).reshape(shape4)
        a_codes = (
            buf[4 * ch : fixed]
            .view(np.int8)
            .reshape(lay.layers, 2, lay.anchors, lay.heads, lay.head_dim)
            .transpose(0, 1, 3, 4, 2)
        )
        (n_tables,) = struct.unpack_from("<I", payload, fixed)
        pos = fixed + 4
        n_offsets = 4 * (lay.streams + 1)
        if buf.size < pos + n_tables + n_offsets:
            raise ContainerError("cachegen payload is truncated (tables or offsets)")
        bins = self._bins(lay.layers)
        alphabet = int(bins.max())
        freqs = rans.unpack_tables(
            bytes(buf[pos : pos + n_tables]), lay.streams, alphabet, PRECISION
        )
        pos += n_tables
        offsets = buf[pos : pos + n_offsets].view("<u4").astype(np.int64)
        data = buf[pos + n_offsets :]
        if offsets.size and (offsets[0] != 0 or offsets[-1] != data.size):
            raise ContainerError("cachegen stream offsets do not cover the payload")
        # A layer's symbols must stay within its own bins: a table that allows more is forged.
        limit = np.repeat(bins, 2 * lay.heads)
        if (freqs[np.arange(alphabet)[None, :] >= limit[:, None]] != 0).any():
            raise ContainerError("cachegen table allows symbols beyond its layer's bins")
        models = np.arange(lay.streams, dtype=np.int32)
        streams = rans.decode_streams(
            data.data, offsets, models, freqs, PRECISION, lay.per_stream, LANES
        )
        symbols = streams.reshape(lay.layers, 2, lay.heads, lay.tokens - lay.anchors, lay.head_dim)
        values = np.empty((lay.layers, 2, lay.heads, lay.head_dim, lay.tokens), np.float32)
        _reconstruct(a_codes, a_scale, steps, symbols, bins, lay.anchor, values)
        out.copy_(torch.from_numpy(values).permute(0, 1, 4, 2, 3))


def _f16_scales(s: np.ndarray) -> np.ndarray:
    """Scales rounded to float16 and back: what the decoder will read."""
    return np.minimum(s, F16_MAX).astype(np.float16).astype(np.float32)


@numba.njit(parallel=True, cache=True)
def _anchor_codes(xs, anchor, a_scale, a_codes, deltas_max):  # type: ignore[no-untyped-def]
    """Quantize anchors (8 bits) and find each channel's largest delta from them."""
    layers, _, heads, dim, tokens = xs.shape
    for u in numba.prange(layers * 2 * heads):
        ly, kv, h = u // (2 * heads), (u // heads) % 2, u % heads
        for d in range(dim):
            s = a_scale[ly, kv, h, d]
            inv = np.float32(1.0) / s if s > 0 else np.float32(0.0)
            top = np.float32(0.0)
            for g in range(a_codes.shape[4]):
                c = np.rint(xs[ly, kv, h, d, g * anchor] * inv)
                c = min(max(c, -127.0), 127.0)
                a_codes[ly, kv, h, d, g] = np.int8(c)
                a_hat = np.float32(c) * s
                for t in range(g * anchor + 1, min(tokens, (g + 1) * anchor)):
                    top = max(top, abs(xs[ly, kv, h, d, t] - a_hat))
            deltas_max[ly, kv, h, d] = top


@numba.njit(parallel=True, cache=True)
def _delta_symbols(xs, anchor, a_scale, a_codes, steps, bins, symbols):  # type: ignore[no-untyped-def]
    layers, _, heads, dim, tokens = xs.shape
    for u in numba.prange(layers * 2 * heads):
        ly, kv, h = u // (2 * heads), (u // heads) % 2, u % heads
        half = bins[ly] // 2
        for d in range(dim):
            step = steps[ly, kv, h, d]
            inv = np.float32(1.0) / step if step > 0 else np.float32(0.0)
            i = 0
            for t in range(tokens):
                g = t // anchor
                if t == g * anchor:
                    continue
                a_hat = np.float32(a_codes[ly, kv, h, d, g]) * a_scale[ly, kv, h, d]
                q = np.rint((xs[ly, kv, h, d, t] - a_hat) * inv)
                q = min(max(q, -half), half)
                symbols[ly, kv, h, i, d] = np.uint8(q + half)
                i += 1


@numba.njit(parallel=True, cache=True)
def _histograms(streams, alphabet):  # type: ignore[no-untyped-def]
    counts = np.zeros((streams.shape[0], alphabet), np.int64)
    for s in numba.prange(streams.shape[0]):
        for v in streams[s]:
            counts[s, v] += 1
    return counts


@numba.njit(parallel=True, cache=True)
def _reconstruct(a_codes, a_scale, steps, symbols, bins, anchor, values):  # type: ignore[no-untyped-def]
    layers, _, heads, dim, tokens = values.shape
    for u in numba.prange(layers * 2 * heads):
        ly, kv, h = u // (2 * heads), (u // heads) % 2, u % heads
        half = bins[ly] // 2
        for d in range(dim):
            s = a_scale[ly, kv, h, d]
            step = steps[ly, kv, h, d]
            i = 0
            for t in range(tokens):
                g = t // anchor
                a_hat = np.float32(a_codes[ly, kv, h, d, g]) * s
                if t == g * anchor:
                    values[ly, kv, h, d, t] = a_hat
                else:
                    q = np.float32(np.int32(symbols[ly, kv, h, i, d]) - half)
                    values[ly, kv, h, d, t] = a_hat + q * step
                    i += 1
