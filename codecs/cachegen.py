"""`cachegen`: lossy, CacheGen-style prediction, per-channel quantization and rANS coding of
a KV chunk.

CacheGen (Liu et al., SIGCOMM 2024) codes KV as small residuals from a prediction, with
coarser quantization for less sensitive layers and one probability model per (layer,
channel group) for an arithmetic coder. What real KV looks like decided the predictor
here (measured on SmolLM2's KV, `benchmarks/NOTES-codecs.md`): K changes slowly along the
tokens, so each K value is predicted by the previous token's *decoded* value (closed-loop
DPCM: errors never accumulate); V has no such locality, and its channel's mean predicts it
best. So, per channel (layer, K/V, head, head_dim index) over the chunk's tokens:

- a float16 start value (K: the first token's prediction; V: the channel mean) and a
  float16 quantization step, the spread of the channel's residuals divided by the level's
  resolution for that layer third and K or V (`LEVELS`): finer for the first third of the
  layers, which matter most;
- each token's residual quantized to q = round(residual / step), coded as symbol q + 127
  for |q| <= 126; a value further from its prediction (an attention-sink token, an
  outlier) is an *escape*: symbol 0, its value stored as float16 beside the streams. Every
  value decodes within step / 2, or exactly as float16 for an escape;
- the symbols of each (layer, K/V, head) form one stream, coded with rANS
  (`kvstore.codecs.rans`) against its own frequency table; tables are packed in a few bits
  per symbol. Streams decode independently (in parallel here; one GPU thread each later).

Input: `[layers, 2, tokens, heads, head_dim]` float16, bfloat16 or float32, finite, within
float16's range. Decoding computes values in float32 (K: x = x_prev + (symbol - 127) *
step, starting from the start value; V: x = mean + (symbol - 127) * step; an escape: its
stored value, which for K then predicts the next token) and rounds them to the value's
dtype to nearest even; the container checksums the result, so any other decoder must
reproduce these bits.

Payload, little-endian:

    starts   f16  [layers, 2, heads, head_dim]
    steps    f16  [layers, 2, heads, head_dim]
    escapes  u32  [streams]: how many escapes each stream has
    tables_len u32, then the packed rANS tables (one model per stream)
    offsets  u32  [streams + 1], then the streams' bytes
    escaped  f16  the escapes' values, stream by stream, in token order

with streams = layers * 2 * heads (in that order), each of tokens * head_dim symbols,
token-major.
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

# Residual spread / step for (K, V) in the first, middle and last third of the layers, by
# level: lower levels keep more. A Gaussian residual costs about log2(resolution) + 2 bits.
# On SmolLM2's KV, V's error moved the model's predictions more than K's, and the later
# layers mattered as much as the first (benchmarks/NOTES-codecs.md): V gets the finer steps.
LEVELS: Mapping[int, tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    0: ((12.0, 16.0), (8.0, 12.0), (8.0, 12.0)),
    1: ((8.0, 12.0), (6.0, 9.0), (6.0, 9.0)),
    2: ((6.0, 8.0), (4.0, 6.0), (4.0, 6.0)),
    3: ((4.0, 5.0), (3.0, 4.0), (3.0, 4.0)),
}
ALPHABET = 254  # 0: escape; 1..253: residuals of -126..126 steps
CENTER = 127
REACH = 126
# A residual beyond this many spreads of its channel escapes to an exact float16 value:
# such tokens (attention sinks, delimiters) draw much of the attention, so their error
# costs far more than their share, and storing them exactly costs little.
OUTLIER_SPREADS = 4.0
PRECISION = 12  # rANS frequency bits: tables small, coding within ~0.1% of the entropy
LANES = 4
F16_MAX = 65504.0


@dataclass(frozen=True)
class _Layout:
    layers: int
    tokens: int
    heads: int
    head_dim: int

    @property
    def streams(self) -> int:
        return self.layers * 2 * self.heads

    @property
    def per_stream(self) -> int:
        return self.tokens * self.head_dim

    @property
    def channels(self) -> int:
        return self.streams * self.head_dim


@register
class CacheGen(Codec):
    name = "cachegen"
    codec_id = 5
    lossless = False
    # k=1: K predicted by the previous token; k=0: by its channel's mean, like V.
    PARAMS: ClassVar[Mapping[str, ParamValue]] = {"level": 1, "k": 1}

    def check_params(self) -> None:
        if self.params["level"] not in LEVELS:
            raise InvalidArgument(
                f"cachegen level must be one of {sorted(LEVELS)}, got {self.params['level']}"
            )
        if self.params["k"] not in (0, 1):
            raise InvalidArgument(f"cachegen k must be 0 or 1, got {self.params['k']}")

    def resolution(self, layers: int) -> np.ndarray:
        """[layers, 2] residual spread over step, K then V: each third of the depth takes
        the level's setting for it."""
        per_third = np.array(LEVELS[int(self.params["level"])], np.float32)  # [3, 2]
        third = np.arange(layers) * 3 // max(layers, 1)
        return per_third[third]

    def encode_payload(self, tensor: torch.Tensor) -> bytes:
        kv_view(tensor, self.name)  # the layout check
        x = tensor.float()
        if not torch.isfinite(x).all() or (x.numel() and x.abs().max() > F16_MAX):
            raise InvalidArgument(
                "cachegen needs finite values within float16's range; store this value with "
                "a lossless codec (raw or zstd)"
            )
        layers, _, tokens, heads, head_dim = tensor.shape
        lay = _Layout(layers, tokens, heads, head_dim)
        xs = x.permute(0, 1, 3, 2, 4).contiguous().numpy()  # [L, 2, H, T, D]
        dpcm = bool(self.params["k"])
        starts, spread = _predictions(xs, dpcm)
        starts = _to_f16(starts)
        res = self.resolution(layers)[:, :, None, None]
        steps = _to_f16(spread / res)
        symbols = np.empty(xs.shape, np.uint8)
        exact = _to_f16(xs)  # what an escape decodes to
        reach = np.minimum(np.ceil(self.resolution(layers) * OUTLIER_SPREADS), REACH)
        _quantize(xs, exact, starts, steps, reach.astype(np.int32), symbols, dpcm)
        streams = symbols.reshape(lay.streams, lay.per_stream)
        escapes = (streams == 0).sum(axis=1).astype("<u4")
        escaped = exact.reshape(lay.streams, lay.per_stream)[streams == 0]
        freqs = rans.quantize_freqs(_histograms(streams), PRECISION)
        tables = rans.pack_tables(freqs, PRECISION)
        models = np.arange(lay.streams, dtype=np.int32)
        data, offsets = rans.encode_streams(streams, models, freqs, PRECISION, LANES)
        return b"".join(
            [
                starts.astype("<f2").tobytes(),
                steps.astype("<f2").tobytes(),
                escapes.tobytes(),
                struct.pack("<I", len(tables)),
                tables,
                offsets.astype("<u4").tobytes(),
                data,
                escaped.astype("<f2").tobytes(),
            ]
        )

    def decode_payload(self, payload: memoryview, out: torch.Tensor) -> None:
        if out.dim() != 5 or out.shape[1] != 2:
            raise ContainerError(f"cachegen cannot decode into shape {tuple(out.shape)}")
        layers, _, tokens, heads, head_dim = out.shape
        lay = _Layout(layers, tokens, heads, head_dim)
        buf = np.frombuffer(payload, np.uint8)
        ch, n = lay.channels, lay.streams
        head = 4 * ch + 4 * n
        if buf.size < head + 4:
            raise ContainerError("cachegen payload is truncated")
        shape4 = (layers, 2, heads, head_dim)
        starts = buf[: 2 * ch].view("<f2").astype(np.float32).reshape(shape4)
        steps = buf[2 * ch : 4 * ch].view("<f2").astype(np.float32).reshape(shape4)
        if not (np.isfinite(starts).all() and np.isfinite(steps).all()):
            raise ContainerError("cachegen payload has non-finite starts or steps")
        escapes = buf[4 * ch : head].view("<u4").astype(np.int64)
        (n_tables,) = struct.unpack_from("<I", payload, head)
        pos = head + 4
        n_offsets = 4 * (n + 1)
        if buf.size < pos + n_tables + n_offsets:
            raise ContainerError("cachegen payload is truncated (tables or offsets)")
        freqs = rans.unpack_tables(bytes(buf[pos : pos + n_tables]), n, ALPHABET, PRECISION)
        pos += n_tables
        offsets = buf[pos : pos + n_offsets].view("<u4").astype(np.int64)
        pos += n_offsets
        total = int(escapes.sum())
        if escapes.size and escapes.max() > lay.per_stream:
            raise ContainerError("cachegen payload counts more escapes than values")
        end = buf.size - 2 * total
        if offsets[0] != 0 or pos + offsets[-1] != end:
            raise ContainerError("cachegen streams and escapes do not fill the payload")
        escaped = buf[end:].view("<f2").astype(np.float32)
        models = np.arange(n, dtype=np.int32)
        streams = rans.decode_streams(
            buf[pos:end].data, offsets, models, freqs, PRECISION, lay.per_stream, LANES
        )
        if not np.array_equal((streams == 0).sum(axis=1), escapes):
            raise ContainerError("cachegen escapes disagree with the streams")
        first = np.zeros(n + 1, np.int64)
        np.cumsum(escapes, out=first[1:])
        values = np.empty((layers, 2, heads, tokens, head_dim), np.float32)
        dpcm = bool(self.params["k"])
        _reconstruct(streams.reshape(values.shape), starts, steps, escaped, first, values, dpcm)
        out.copy_(torch.from_numpy(values).permute(0, 1, 3, 2, 4))


def _to_f16(a: np.ndarray) -> np.ndarray:
    """Rounded to float16 and back: what the decoder will read."""
    return np.clip(a, -F16_MAX, F16_MAX).astype(np.float16).astype(np.float32)


@numba.njit(parallel=True, cache=True)
def _predictions(xs, dpcm):  # type: ignore[no-untyped-def]
    """Per channel: the start value (K: the first token; V: the mean) and the spread
    (root mean square) of the residuals the predictor leaves."""
    layers, _, heads, tokens, dim = xs.shape
    starts = np.zeros((layers, 2, heads, dim), np.float32)
    spread = np.zeros((layers, 2, heads, dim), np.float32)
    for u in numba.prange(layers * 2 * heads):
        ly, kv, h = u // (2 * heads), (u // heads) % 2, u % heads
        for d in range(dim):
            if tokens == 0:
                continue
            if kv == 0 and dpcm:  # K: differences along the tokens
                starts[ly, kv, h, d] = xs[ly, kv, h, 0, d]
                acc = 0.0
                for t in range(1, tokens):
                    e = xs[ly, kv, h, t, d] - xs[ly, kv, h, t - 1, d]
                    acc += e * e
                spread[ly, kv, h, d] = np.sqrt(acc / max(tokens - 1, 1))
            else:  # V: around the channel mean
                mean = 0.0
                for t in range(tokens):
                    mean += xs[ly, kv, h, t, d]
                mean /= tokens
                acc = 0.0
                for t in range(tokens):
                    e = xs[ly, kv, h, t, d] - mean
                    acc += e * e
                starts[ly, kv, h, d] = mean
                spread[ly, kv, h, d] = np.sqrt(acc / tokens)
    return starts, spread


@numba.njit(parallel=True, cache=True)
def _quantize(xs, exact, starts, steps, reach, symbols, dpcm):  # type: ignore[no-untyped-def]
    """Symbols of every value (0 where it escapes, to `exact`); K closed-loop against the
    decoded previous token."""
    layers, _, heads, tokens, dim = xs.shape
    for u in numba.prange(layers * 2 * heads):
        ly, kv, h = u // (2 * heads), (u // heads) % 2, u % heads
        for d in range(dim):
            step = steps[ly, kv, h, d]
            inv = np.float32(1.0) / step if step > 0 else np.float32(0.0)
            base = starts[ly, kv, h, d]
            pred = base
            for t in range(tokens):
                residual = xs[ly, kv, h, t, d] - pred
                q = np.rint(residual * inv)
                # Escape when the step cannot reach the value (also a zero step, a value
                # off a constant channel).
                if abs(q) > reach[ly, kv] or (step == 0 and residual != 0):
                    symbols[ly, kv, h, t, d] = 0
                    value = exact[ly, kv, h, t, d]
                else:
                    symbols[ly, kv, h, t, d] = np.uint8(q + CENTER)
                    value = pred + np.float32(q) * step
                if kv == 0 and dpcm:  # the decoder's value predicts the next token
                    pred = value


@numba.njit(parallel=True, cache=True)
def _histograms(streams):  # type: ignore[no-untyped-def]
    counts = np.zeros((streams.shape[0], ALPHABET), np.int64)
    for s in numba.prange(streams.shape[0]):
        for v in streams[s]:
            counts[s, v] += 1
    return counts


@numba.njit(parallel=True, cache=True)
def _reconstruct(symbols, starts, steps, escaped, first, values, dpcm):  # type: ignore[no-untyped-def]
    """Values from symbols; stream u's escapes are escaped[first[u]:first[u + 1]], in the
    stream's (token-major) order."""
    layers, _, heads, tokens, dim = values.shape
    for u in numba.prange(layers * 2 * heads):
        ly, kv, h = u // (2 * heads), (u // heads) % 2, u % heads
        # This stream's escapes, one pass in its order: which (token, channel) each is for.
        e = first[u]
        for t in range(tokens):
            for d in range(dim):
                if symbols[ly, kv, h, t, d] == 0:
                    values[ly, kv, h, t, d] = escaped[e]
                    e += 1
        for d in range(dim):
            step = steps[ly, kv, h, d]
            pred = starts[ly, kv, h, d]
            for t in range(tokens):
                sym = symbols[ly, kv, h, t, d]
                if sym == 0:
                    v = values[ly, kv, h, t, d]
                else:
                    v = pred + np.float32(np.int32(sym) - CENTER) * step
                    values[ly, kv, h, t, d] = v
                if kv == 0 and dpcm:
                    pred = v
