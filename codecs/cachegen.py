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
  float16 quantization step: the root mean square over the head's channels of their
  residuals' spreads, divided by the level's resolution for that layer third and K or V
  (`LEVELS`). One step per head gives every channel the same absolute error, the least
  squared error for the size (water-filling): on SmolLM2's KV 30% less KL divergence of the
  model's predictions than a step per channel's own spread, at the same size;
- each token's residual quantized to q = round(residual / step), coded as symbol q + 127;
  a value further than `OUTLIER_SPREADS` of its channel's own spread from its prediction
  (an outlier), and every value of the chunk's first token (in the first chunk of a
  sequence, the attention sink, which moves the model's predictions most: exact, it
  halves the KL for 1.5% of the size), is an *escape*: symbol 0, its value stored as
  float16 beside the streams. Every value decodes within step / 2, or exactly as float16
  for an escape. K's first token, predicted by the previous one, is its start value,
  already float16: it codes as residual 0 (symbol 127) and decodes to that value, as
  exact as an escape without storing it twice;
- the symbols of each (layer, K/V, head) share one frequency table (packed in a few bits
  per symbol) and are rANS-coded (`kvstore.codecs.rans`) in streams of `SEGMENT_TOKENS`
  tokens (the last one of a chunk shorter). Streams decode independently: in parallel on
  the CPU, one GPU thread each (`kvstore.kernels.cachegen`), which is why there are many.

Input: `[layers, 2, tokens, heads, head_dim]` float16, bfloat16 or float32, finite, within
float16's range. Decoding computes values in float32 (K: x = x_prev + (symbol - 127) *
step, starting from the start value; V: x = mean + (symbol - 127) * step; an escape: its
stored value, which for K then predicts the next token) and rounds them to the value's
dtype to nearest even; the container checksums the result, so any other decoder must
reproduce these bits.

Payload, little-endian (format version 2, the container's `version` parameter):

    segment  u32  tokens per rANS stream (S)
    starts   f16  [layers, 2, heads, head_dim]
    steps    f16  [layers, 2, heads]: one per head (version 1: [layers, 2, heads, head_dim],
                  a step per channel, as the first quantizer set them; containers that do
                  not record a version are version 1, and `cachegen:version=1` still writes
                  it for readers from before version 2)
    escapes  u32  [units]: how many escapes each unit has
    tables_len u32, then the packed rANS tables (one model per unit)
    offsets  u32  [units * segments + 1], then the streams' bytes
    escaped  f16  the escapes' values, unit by unit, in token order

with units = layers * 2 * heads (in that order), each of tokens * head_dim symbols,
token-major, cut into segments = ceil(tokens / S) streams of S tokens' symbols (stream
u * segments + j holds tokens [j S, (j + 1) S) of unit u).

The kernels (numba, parallel over each layer's K and V) read and write the value's 16-bit
words in its own `[layers, 2, tokens, heads, head_dim]` order, whatever its dtype, and
convert them with `kvstore.kernels.floatbits` (numba has no float16 on the CPU): encoding
makes one pass over the value before rANS (predictions, steps, symbols and their counts;
then the escapes' values, from the few tokens that have one), decoding one pass after it,
rounding straight into the value's words.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numba
import numpy as np
import torch
import zstandard

from kvstore.codecs import rans
from kvstore.codecs.base import (
    DTYPE_WORDS,
    Codec,
    ContainerError,
    ParamValue,
    codec_class,
    kv_view,
    register,
)
from kvstore.codecs.cachegen_profile import CacheGenProfile, register_cross
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

# Residual spread / step for (K, V) in the first, middle and last third of the layers, by
# level: lower levels keep more. A Gaussian residual costs about log2(resolution) + 2 bits.
# Tuned on SmolLM2's KV with steps per head and the first token exact (NOTES-codecs.md):
# the first third of the layers finer, and V coarser than K; level 1 is the coarsest
# setting measured at >= 98.5% top-1 agreement there.
LEVELS: Mapping[int, tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    0: ((10.0, 8.0), (7.0, 5.5), (7.0, 5.5)),
    1: ((7.0, 6.0), (5.0, 4.0), (5.0, 4.0)),
    2: ((5.0, 4.0), (3.5, 3.0), (3.5, 3.0)),
    3: ((3.5, 3.0), (2.5, 2.0), (2.5, 2.0)),
}
# With a profile (`CacheGenProfile`): the resolution, by level, of a head of weight 1 (the
# weights' geometric mean), K or V.
PROFILE_LEVELS: Mapping[int, float] = {0: 3.0, 1: 2.3, 2: 1.9, 3: 1.65}
ALPHABET = 254  # 0: escape; 1..253: residuals of -126..126 steps
CENTER = 127
REACH = 126
# A residual beyond this many spreads of its channel escapes to an exact float16 value:
# such tokens (attention sinks, delimiters) draw much of the attention, so their error
# costs far more than their share, and storing them exactly costs little.
OUTLIER_SPREADS = 4.0
PRECISION = 12  # rANS frequency bits: tables small, coding within ~0.1% of the entropy
LANES = 4
# Tokens per rANS stream. Each stream costs its lanes' 4-byte final states (~2% of a
# 32-token stream at level 1); a 256-token chunk of a model with 8 KV heads over 32 layers
# makes 4096 streams, enough threads for a GPU to decode a few chunks at once.
SEGMENT_TOKENS = 32
VERSIONS = (1, 2)  # payload formats this build reads; it writes either

# How the kernels read and write a dtype's 16-bit words; any other dtype goes through
# float32.
_F32, _F16, _BF16 = WORDS_F32, WORDS_F16, WORDS_BF16
_KINDS = DTYPE_WORDS


@dataclass(frozen=True)
class _Layout:
    layers: int
    tokens: int
    heads: int
    head_dim: int

    segment: int = SEGMENT_TOKENS

    @property
    def units(self) -> int:
        """(layer, K/V, head) triples: one frequency table and one escape count each."""
        return self.layers * 2 * self.heads

    @property
    def per_unit(self) -> int:
        return self.tokens * self.head_dim

    @property
    def segments(self) -> int:
        """rANS streams per unit."""
        return -(-self.tokens // self.segment)

    @property
    def streams(self) -> int:
        return self.units * self.segments

    @property
    def channels(self) -> int:
        return self.units * self.head_dim

    def stream_models(self) -> np.ndarray:
        """The unit (frequency table) of each stream."""
        return np.repeat(np.arange(self.units, dtype=np.int32), self.segments)

    def stream_lengths(self) -> np.ndarray:
        """Symbols in each stream: a segment's, the last of each unit fewer."""
        n = np.full((self.units, self.segments), self.segment * self.head_dim, np.int64)
        if self.segments:
            n[:, -1] = (self.tokens - (self.segments - 1) * self.segment) * self.head_dim
        return n.reshape(-1)

    def padded_symbols(self) -> np.ndarray:
        """Room for every unit's symbols [units, segments * segment, head_dim]: its
        streams are the rows of `.reshape(streams, segment * head_dim)`. Zeros where there
        is padding; otherwise left unset, as the coders write every symbol (zeroing megabytes
        costs a memset with the GIL held)."""
        shape = (self.units, self.segments * self.segment, self.head_dim)
        if self.segments * self.segment == self.tokens:
            return np.empty(shape, np.uint8)
        return np.zeros(shape, np.uint8)


@register
class CacheGen(Codec):
    name = "cachegen"
    thread_teams = True
    codec_id = 5
    lossless = False
    # k=1: K predicted by the previous token; k=0: by its channel's mean, like V.
    # profile: a `CacheGenProfile` file (JSON) giving each head a resolution weight, read
    # by the encoder only and not recorded in containers; "" for the layer-third levels.
    # version: the payload format (module docstring); 1 for readers older than version 2.
    # newest: the level of a sequence's newest chunk (`Codec.for_newest`), -1 for `level`;
    # encoder-only: a container records the level it was coded at.
    PARAMS: ClassVar[Mapping[str, ParamValue]] = {
        "level": 1,
        "k": 1,
        "profile": "",
        "version": 2,
        "newest": -1,
    }
    ENCODER_ONLY = frozenset({"profile", "newest"})
    LEGACY_PARAMS: ClassVar[Mapping[str, ParamValue]] = {"version": 1}
    # A subclass without GPU kernels (its values decode and encode on the host) says so.
    HOST_ONLY: ClassVar[bool] = False
    # The codec of a value at a known position, with a profile that has cross-layer maps.
    CROSS: ClassVar[str] = "cachegen-x"
    VERSIONS: ClassVar[tuple[int, ...]] = VERSIONS

    def check_params(self) -> None:
        self.check_levels(LEVELS)
        if self.params["k"] not in (0, 1):
            raise InvalidArgument(f"cachegen k must be 0 or 1, got {self.params['k']}")
        # Read now: a bad file fails the spec (the server's start), not a demotion. Containers
        # do not name the profile (`ENCODER_ONLY`), so a codec built to decode one never
        # reads a file.
        self._profile: CacheGenProfile | None = load_profile(str(self.params["profile"]))
        self._newest: Codec | None = None
        self._cross: Codec | None = None

    def check_levels(self, levels: Mapping[int, Any]) -> None:
        """InvalidArgument unless `level` and `newest` are among `levels` (newest: or -1)
        and `version` among the formats this build writes."""
        if self.params["level"] not in levels:
            raise InvalidArgument(
                f"{self.name} level must be one of {sorted(levels)}, got {self.params['level']}"
            )
        if self.params["newest"] != -1 and self.params["newest"] not in levels:
            raise InvalidArgument(
                f"{self.name} newest must be -1 (the level) or one of {sorted(levels)}, got "
                f"{self.params['newest']}"
            )
        if self.params["version"] not in self.VERSIONS:
            raise InvalidArgument(
                f"{self.name} version must be one of {self.VERSIONS}, got {self.params['version']}"
            )

    def for_newest(self) -> Codec:
        newest = int(self.params["newest"])
        if newest in (-1, self.params["level"]):
            return self
        if self._newest is None:  # one instance: the ssd writer batches values by codec
            self._newest = type(self)(**{**self.params, "level": newest, "newest": -1})
        return self._newest

    def for_position(self, position: int, shape: Sequence[int] | None = None) -> Codec:
        """With a profile that has cross-layer maps and a value of the shape they are for
        (when given), `cachegen-x` (`cachegen-x-zstd` for `cachegen-zstd`: `CROSS`) at
        this level for a value at `position` (`kvstore.codecs.cachegen_cross`; ask it, not
        this codec, for its choice for the newest chunk); else this codec."""
        cross = self._profile.cross if self._profile is not None else None
        if cross is None:
            return self
        if shape is not None and not (
            len(shape) == 5
            and shape[1] == 2
            and (shape[0], shape[3], shape[4]) == (cross.layers, cross.heads, cross.head_dim)
        ):
            return self
        if self._cross is None:
            self._cross = codec_class(self.CROSS)(
                level=self.params["level"],
                profile=self.params["profile"],
                newest=self.params["newest"],
            )
        return self._cross.for_position(position)

    @classmethod
    def gpu_decoder(cls) -> Callable[[Sequence[Any], Any], Any] | None:
        if cls.HOST_ONLY:
            return None
        from kvstore.kernels.cachegen import decode_on_gpu

        return decode_on_gpu

    @classmethod
    def gpu_encoder(cls) -> Callable[..., list[tuple[memoryview, int]]] | None:
        if cls.HOST_ONLY:
            return None
        from kvstore.kernels.cachegen_encode import encode_many_on_gpu

        return encode_many_on_gpu

    def resolution(self, layers: int, heads: int) -> np.ndarray:
        """[layers, 2, heads] residual spread over step, K then V: with a profile, the
        level's `PROFILE_LEVELS` resolution times the head's weight; without, each third of
        the depth takes the level's `LEVELS` setting for it."""
        level = int(self.params["level"])
        profile = self._profile
        if profile is not None:
            profile.check_shape(layers, heads)
            return np.float32(PROFILE_LEVELS[level]) * profile.weights
        per_third = np.array(LEVELS[level], np.float32)  # [3, 2]
        third = np.arange(layers) * 3 // max(layers, 1)
        return np.repeat(per_third[third][:, :, None], heads, axis=2)

    def encode_payload(self, tensor: torch.Tensor) -> bytes:
        return bytes(self._encode(tensor, None))

    def encode_with_value(
        self, tensor: torch.Tensor, out: torch.Tensor | None = None
    ) -> tuple[bytes | memoryview, torch.Tensor]:
        """The payload and, computed on the way rather than by decoding it, the value it
        decodes to (the kernels reconstruct each token as the decoder does, to predict the
        next one), in `out` if given."""
        if tensor.dtype not in _KINDS:
            return super().encode_with_value(tensor, out)
        back = torch.empty(tensor.shape, dtype=tensor.dtype) if out is None else out
        return self._encode(tensor, back), back

    def _encode(self, tensor: torch.Tensor, back: torch.Tensor | None) -> bytes | memoryview:
        return self.coded(self._quantize(tensor, back, SEGMENT_TOKENS))

    def coded(self, qz: _Quantized, prefix: bytes = b"") -> bytes:
        """The payload of a quantized value: `prefix`, then its symbols rANS-coded in
        streams, framed with its starts, steps, tables and escapes."""
        freqs = rans.quantize_freqs(qz.counts, PRECISION)
        data, offsets = _code_streams(qz.layout, qz.symbols, freqs)
        frames = self.frame_payloads(
            qz.layout, 1, qz.starts, qz.steps, qz.escapes, freqs, offsets, qz.escaped,
            qz.first, prefix=np.frombuffer(prefix, np.uint8)[None] if prefix else None,
        )  # fmt: skip
        at, (o0, o1) = int(frames.data_at[0]), frames.streams(0)
        frames.out[at : at + o1 - o0] = np.frombuffer(data, np.uint8)
        (payload,) = frames.payloads()
        return payload.tobytes()

    def _quantize(
        self,
        tensor: torch.Tensor,
        back: torch.Tensor | None,
        segment: int,
        histogram: bool = True,
    ) -> _Quantized:
        """Everything but the entropy coding: starts, steps, symbols (in a layout of
        `segment`-token streams) and their counts (with `histogram`; else only the escapes
        are counted), the escapes; `back`, if given, filled with the value the payload
        decodes to."""
        kv_view(tensor, self.name)  # the layout check
        x = tensor.detach()
        if x.dtype not in _KINDS:
            x = x.float()
        layers, _, tokens, heads, head_dim = x.shape
        lay = _Layout(layers, tokens, heads, head_dim, segment)
        res = self.resolution(layers, heads)
        shape4 = (layers, 2, heads, head_dim)
        starts = np.empty(shape4, np.uint16)  # float16 bits
        steps = np.empty(shape4, np.uint16)
        symbols = lay.padded_symbols()
        counts = np.empty((lay.units, ALPHABET if histogram else 1), np.int64)
        marked = np.empty((lay.units, tokens), np.bool_)  # tokens with an escape
        ok = np.empty((layers, 2), np.bool_)
        words, kind = _words(x), _KINDS[x.dtype]
        dpcm = bool(self.params["k"])
        decoded = _words(back) if back is not None else np.empty((0, 2, 0, 0), np.uint16)
        _encode(words, kind, dpcm, res, starts, steps, symbols, counts, marked, decoded, ok)
        if not ok.all():
            raise InvalidArgument(
                "cachegen needs finite values within float16's range; store this value with "
                "a lossless codec (raw or zstd)"
            )
        escapes = counts[:, 0]
        first = np.zeros(lay.units + 1, np.int64)
        np.cumsum(escapes, out=first[1:])
        escaped = np.empty(first[-1], np.uint16)
        _gather_escapes(words, kind, heads, symbols, marked, first, escaped)
        return _Quantized(lay, starts, steps, symbols, counts, escapes, escaped, first)

    @property
    def head_steps(self) -> bool:
        """Whether payloads store one step per head (version 2), not one per channel."""
        return self.params["version"] == 2

    def frame_payloads(
        self,
        lay: _Layout,
        values: int,
        starts: np.ndarray,
        steps: np.ndarray,
        escapes: np.ndarray,
        freqs: np.ndarray,
        offsets: np.ndarray,
        escaped: np.ndarray,
        first: np.ndarray | None = None,
        alloc: Callable[[int], np.ndarray] = lambda n: np.empty(n, np.uint8),
        prefix: np.ndarray | None = None,
    ) -> PayloadFrames:
        """The payloads of `values` values of layout `lay`, all but their streams' bytes,
        written by one parallel kernel into one buffer from `alloc(n)` (uint8; the GPU
        encoder's is pinned, for its streams to be copied straight into their places):
        float16 bits of starts and steps (`[layers, 2, heads, dim]` a value), escape counts
        and frequency tables per unit, stream offsets (`[values * streams + 1]`, from 0),
        and the escapes' float16 bits, unit after unit, whose prefix sums `first` (`[values
        * units + 1]`) the caller may already have; each after its row of `prefix` (uint8
        `[values, n]`: what a codec's payload has before cachegen's), if given."""
        nu, ns, dim = lay.units, lay.streams, lay.head_dim
        escapes = np.ascontiguousarray(escapes, np.int64)
        if first is None:
            first = np.zeros(values * nu + 1, np.int64)
            np.cumsum(escapes, out=first[1:])
        offsets = np.ascontiguousarray(offsets, np.int64)
        n_steps = nu if self.head_steps else nu * dim
        fixed = 4 + 2 * nu * dim + 2 * n_steps + 4 * nu + 4 + rans.packed_bound(nu, ALPHABET)
        fixed += 4 * (ns + 1)
        each = np.arange(values + 1)
        head = 0 if prefix is None else prefix.shape[1]
        sizes = head + fixed + np.diff(offsets[each * ns]) + 2 * np.diff(first[each * nu])
        bounds = np.zeros(values + 1, np.int64)
        np.cumsum(sizes, out=bounds[1:])
        out = alloc(int(bounds[-1]))
        if prefix is not None:
            for v in range(values):
                out[bounds[v] : bounds[v] + head] = prefix[v]
        ends = np.empty(values, np.int64)
        data_at = np.empty(values, np.int64)
        _join(
            lay.segment, nu, ns, dim, n_steps == nu,
            np.ascontiguousarray(starts, np.uint16).reshape(-1),
            np.ascontiguousarray(steps, np.uint16).reshape(-1),
            escapes, np.ascontiguousarray(freqs, np.uint16), offsets,
            np.ascontiguousarray(escaped, np.uint16).reshape(-1),
            first, out, bounds[:-1] + head, data_at, ends,
        )  # fmt: skip
        return PayloadFrames(out, bounds, data_at, ends, offsets, ns)

    def decode_payload(self, payload: memoryview, out: torch.Tensor) -> None:
        p = parse_payload(payload, tuple(out.shape), int(self.params["version"]))
        self._reconstruct(decode_symbols(p), p.starts, p.steps, p.escaped, p.first, out)

    def _reconstruct(
        self,
        symbols: np.ndarray,
        starts: np.ndarray,
        steps: np.ndarray,
        escaped: np.ndarray,
        first: np.ndarray,
        out: torch.Tensor,
    ) -> None:
        """The values from their symbols `[units, tokens or more, head_dim]` into `out`."""
        layers = out.shape[0]
        # Straight into `out`'s words where the kernels know its dtype; through float32
        # otherwise, which torch's copy then rounds.
        direct = out.dtype in _KINDS and out.is_contiguous()
        target = out if direct else torch.empty(out.shape, dtype=torch.float32)
        ok = np.empty((layers, 2), np.bool_)
        dpcm = bool(self.params["k"])
        kind = _KINDS[target.dtype]
        _decode(symbols, starts, steps, escaped, first, dpcm, kind, _words(target), ok)
        if not ok.all():
            raise ContainerError("cachegen escapes disagree with the streams")
        if not direct:
            out.copy_(target)


class ZstdFrames:
    """The entropy stage of `cachegen-zstd` and `cachegen-x-zstd`: a value quantized in one
    segment a unit (`_Quantized`) coded as one zstd frame per unit (Huffman-coded literals
    with the frame's own table, and whatever repeats LZ finds) in place of rANS streams.
    There is no GPU decoder, so a CUDA `out` is filled by a host decode and a copy: for
    tiers whose reads land in host memory."""

    name: ClassVar[str]
    # zstd's level 1, with matches of 7 symbols or more only and small tables: shorter
    # matches cost more time than they save bytes on these symbols; both sizes and times
    # measured on SmolLM2's KV (NOTES-codecs.md). Decoders need none of it.
    ZSTD_PARAMS: ClassVar[Mapping[str, int]] = {
        "window_log": 15,
        "hash_log": 10,
        "min_match": 7,
        "write_content_size": 1,
    }

    HOST_ONLY = True  # no GPU kernels

    def framed(self, qz: _Quantized) -> np.ndarray:
        """The payload of a value quantized in one segment a unit: its starts, steps and
        escape counts, the frames' offsets, the frames, the escapes' values (uint8)."""
        lay = qz.layout
        n = lay.units
        sizes: np.ndarray = np.zeros(n, np.int64)
        runs: list[np.ndarray] = []
        if n:
            zc = self._compressor()
            # One call for every frame, without the GIL throughout (a call per frame took
            # and gave back the GIL 180 times a SmolLM2 chunk: 12 threads encoding at once
            # then ran ~4x one thread's rate, NOTES-codecs.md). On the kernels' threads,
            # one in a host pool thread.
            if lay.per_unit:
                units = zstandard.BufferWithSegments(qz.symbols.data, _segments(n, lay.per_unit))
                coded = zc.multi_compress_to_buffer(units, threads=_threads(n))
                sizes, runs = _frame_runs(coded, n)
            else:  # no tokens: empty frames (zstd takes no empty source in one call)
                empty = np.frombuffer(zc.compress(b""), np.uint8)
                sizes, runs = np.full(n, empty.size, np.int64), [empty] * n
        offsets = np.zeros(n + 1, "<u4")
        np.cumsum(sizes, out=offsets[1:])
        parts = [
            qz.starts.astype("<u2"),
            np.ascontiguousarray(qz.steps[..., 0]).astype("<u2"),
            qz.escapes.astype("<u4"),
            offsets,
            *runs,
            qz.escaped.astype("<u2"),
        ]
        return _concatenated(parts)

    def _compressor(self) -> zstandard.ZstdCompressor:
        """This thread's compressor (its zstd context is reused from value to value; a
        compressor is not to be shared between threads)."""
        key = f"compressor_{type(self).__name__}"
        zc = getattr(_local, key, None)
        if zc is None:
            params = zstandard.ZstdCompressionParameters.from_level(1, **self.ZSTD_PARAMS)
            zc = zstandard.ZstdCompressor(compression_params=params)
            setattr(_local, key, zc)
        return zc

    def unframed(
        self, payload: memoryview, shape: tuple[int, ...]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """What `framed` made, for a value of `shape`: its symbols `[units, tokens,
        head_dim]`, starts, steps, escapes' values and their first index a unit (as
        `_reconstruct` takes them); ContainerError for a payload that does not fit them."""
        layers, _, tokens, heads, head_dim = shape
        lay = _Layout(layers, tokens, heads, head_dim, max(tokens, 1))
        n, ch = lay.units, lay.channels
        buf = np.frombuffer(payload, np.uint8)
        head = 2 * ch + 2 * n + 4 * n + 4 * (n + 1)
        if buf.size < head:
            raise ContainerError(f"{self.name} payload is truncated")
        starts, steps, escapes, pos = _value_fields(buf, 0, lay, n, self.name)
        offsets = buf[pos : pos + 4 * (n + 1)].view("<u4").astype(np.int64)
        pos += 4 * (n + 1)
        first, _, escaped = _escapes_after(buf, pos, offsets, escapes, lay, self.name, "frames")
        symbols = lay.padded_symbols()
        if lay.per_unit and n:
            # Every frame in one call, without the GIL, on the kernels' threads. The sizes
            # are ours, not the frames' headers: a forged header cannot make us allocate,
            # and a frame that decodes to any other size is refused.
            sizes = np.full(n, lay.per_unit, np.uint64).tobytes()
            zd = zstandard.ZstdDecompressor()
            try:
                frames = zstandard.BufferWithSegments(
                    payload[pos : pos + offsets[-1]], _segments(n, offsets)
                )
                got = zd.multi_decompress_to_buffer(
                    frames, decompressed_sizes=sizes, threads=_threads(n)
                )
            except (zstandard.ZstdError, ValueError) as exc:
                raise ContainerError(
                    f"{self.name} frames are corrupt or of the wrong size: {exc}"
                ) from None
            for u in range(n):
                piece = np.frombuffer(got[u], np.uint8)  # type: ignore[call-overload]
                if piece.size != lay.per_unit:
                    raise ContainerError(f"{self.name} frame {u} has the wrong size")
                symbols[u, :tokens] = piece.reshape(tokens, head_dim)
        if symbols.size and symbols.max() >= ALPHABET:
            raise ContainerError(f"{self.name} frames hold symbols outside the alphabet")
        return symbols, starts, steps, escaped, first


@register
class CacheGenZstd(ZstdFrames, CacheGen):
    """`cachegen` with zstd's entropy coder in place of rANS (`ZstdFrames`): the same
    quantizer, so the same symbols and the same decoded value to the bit.

    On SmolLM2's KV (NOTES-codecs.md) the payloads are 2-4% smaller than cachegen's at its
    plain levels (no frequency tables to store) and ~1% larger with a profile's coarsest
    heads (Huffman codes spend at least a bit a symbol); the frames decode ~3x faster than
    the rANS streams (the whole decode 1.6-1.8x on a CPU core) and encode ~2x faster.

    Payload, little-endian (version 1):

        starts   f16  [layers, 2, heads, head_dim]
        steps    f16  [layers, 2, heads]
        escapes  u32  [units]
        offsets  u32  [units + 1], from 0; then the frames, back to back
        escaped  f16  the escapes' values, unit by unit, in token order

    Frame u holds unit u's tokens * head_dim symbols, token-major, and records that size."""

    name = "cachegen-zstd"
    codec_id = 6
    PARAMS: ClassVar[Mapping[str, ParamValue]] = {**CacheGen.PARAMS, "version": 1}
    LEGACY_PARAMS: ClassVar[Mapping[str, ParamValue]] = {}
    VERSIONS: ClassVar[tuple[int, ...]] = (1,)
    CROSS = "cachegen-x-zstd"

    def _encode(self, tensor: torch.Tensor, back: torch.Tensor | None) -> memoryview:
        kv_view(tensor, self.name)  # the layout check, before reading the shape
        tokens = tensor.shape[2]
        qz = self._quantize(tensor, back, max(tokens, 1), histogram=False)
        return self.framed(qz).data

    def decode_payload(self, payload: memoryview, out: torch.Tensor) -> None:
        shape = tuple(out.shape)
        if len(shape) != 5 or shape[1] != 2:
            raise ContainerError(f"{self.name} cannot decode into shape {shape}")
        self._reconstruct(*self.unframed(payload, shape), out)


def _segments(n: int, sizes: int | np.ndarray) -> bytes:
    """zstandard's segments (offset, length: uint64 pairs) of `n` frames back to back:
    of `sizes` bytes each, or delimited by the offsets `sizes` (`[n + 1]`, from 0)."""
    seg = np.empty((n, 2), np.uint64)
    if isinstance(sizes, int):
        seg[:, 0] = np.arange(n, dtype=np.uint64) * np.uint64(sizes)
        seg[:, 1] = sizes
    else:
        seg[:, 0] = sizes[:-1]
        seg[:, 1] = np.diff(sizes)
    return seg.tobytes()


def _frame_runs(coded: Any, n: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The sizes of the `n` frames of `multi_compress_to_buffer`'s result `coded`, and the
    frames as uint8 arrays of consecutive frames: zstd writes each of its threads' frames
    back to back in one buffer of its own, so a run of frames that continue one another is
    viewed (not copied) as one array, which lives as long as `coded`. Their copy into the
    payload is then one large NumPy copy per run, made without the GIL, where joining 180
    frames' bytes copied them all with it held."""
    segs = [coded[u] for u in range(n)]
    sizes = np.fromiter((len(s) for s in segs), np.int64, n)
    at = np.fromiter((s.offset for s in segs), np.int64, n)
    # A frame continues the run when it starts where the one before it ends; one that
    # starts a new buffer starts at its offset 0, never at the end of a frame.
    bounds = [0, *(np.flatnonzero(at[1:] != at[:-1] + sizes[:-1]) + 1).tolist(), n]
    runs = []
    for a, b in itertools.pairwise(bounds):
        first = np.frombuffer(segs[a], np.uint8)
        length = int(at[b - 1] + sizes[b - 1] - at[a])
        run = (ctypes.c_uint8 * length).from_address(first.ctypes.data)
        runs.append(np.ctypeslib.as_array(run))
    return sizes, runs


def _concatenated(parts: Sequence[np.ndarray]) -> np.ndarray:
    """The bytes of contiguous arrays `parts`, one after another, in one new uint8 array;
    NumPy copies large parts without the GIL (and the fresh memory's page faults with them)."""
    flat = [p.reshape(-1).view(np.uint8) for p in parts]
    out = np.empty(sum(f.size for f in flat), np.uint8)
    pos = 0
    for f in flat:
        out[pos : pos + f.size] = f
        pos += f.size
    return out


def _threads(frames: int) -> int:
    """zstd's threads for `frames` frames: the kernels' (one in a host pool thread)."""
    return max(1, min(numba.get_num_threads(), frames))


@dataclass(frozen=True)
class _Quantized:
    """A value quantized (`CacheGen._quantize`), not yet entropy-coded."""

    layout: _Layout
    starts: np.ndarray  # uint16 float16 bits [layers, 2, heads, head_dim]
    steps: np.ndarray  # the same, every channel of a head equal
    symbols: np.ndarray  # uint8 [units, padded tokens, head_dim]
    counts: np.ndarray  # int64 [units, ALPHABET], or [units, 1]: the escapes only
    escapes: np.ndarray  # int64 [units]
    escaped: np.ndarray  # uint16 float16 bits of the escapes' values, unit by unit
    first: np.ndarray  # int64 [units + 1]: prefix sums of `escapes`


@dataclass(frozen=True)
class PayloadFrames:
    """`CacheGen.frame_payloads`' buffer: value v's payload is out[bounds[v]:ends[v]], its
    streams' bytes (`streams(v)` of the streams' data) to be copied to out[data_at[v]]."""

    out: np.ndarray  # uint8
    bounds: np.ndarray  # int64 [values + 1]
    data_at: np.ndarray  # int64 [values]
    ends: np.ndarray  # int64 [values]
    offsets: np.ndarray  # int64 [values * streams + 1]: the streams in the data, from 0
    per_value: int  # streams a value

    def streams(self, v: int) -> tuple[int, int]:
        """Where value v's streams lie in the streams' data."""
        return int(self.offsets[v * self.per_value]), int(self.offsets[(v + 1) * self.per_value])

    def payloads(self) -> list[memoryview]:
        view = memoryview(self.out.data)
        return [view[self.bounds[v] : self.ends[v]] for v in range(self.ends.size)]


@dataclass(frozen=True)
class Payload:
    """A cachegen payload's parts, checked for consistency (not yet decoded)."""

    layout: _Layout
    starts: np.ndarray  # float32 [layers, 2, heads, head_dim]
    steps: np.ndarray  # float32 [layers, 2, heads, head_dim]
    first: np.ndarray  # int64 [units + 1]: unit u's escapes are escaped[first[u]:first[u+1]]
    freqs: np.ndarray | None  # uint16 [units, ALPHABET]; None: not unpacked (`tables`)
    tables: np.ndarray  # uint8: the packed tables (`rans.unpack_tables`)
    offsets: np.ndarray  # int64 [streams + 1], from 0
    data: memoryview  # the streams' bytes
    escaped: np.ndarray  # float32 [escapes]


def _value_fields(
    buf: np.ndarray, pos: int, lay: _Layout, n_steps: int, name: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The float16 starts and `n_steps` steps (per channel, whatever their count) and the
    units' escape counts from buf[pos:], which the caller has checked holds them; and the
    position after them. ContainerError (naming `name`) for a non-finite start or step."""
    ch, n = lay.channels, lay.units
    shape4 = (lay.layers, 2, lay.heads, lay.head_dim)
    starts = buf[pos : pos + 2 * ch].view("<f2").astype(np.float32).reshape(shape4)
    pos += 2 * ch
    steps = buf[pos : pos + 2 * n_steps].view("<f2").astype(np.float32)
    steps = np.ascontiguousarray(np.broadcast_to(steps.reshape(*shape4[:3], -1), shape4))
    if not (np.isfinite(starts).all() and np.isfinite(steps).all()):
        raise ContainerError(f"{name} payload has non-finite starts or steps")
    pos += 2 * n_steps
    escapes = buf[pos : pos + 4 * n].view("<u4").astype(np.int64)
    return starts, steps, escapes, pos + 4 * n


def _escapes_after(
    buf: np.ndarray,
    pos: int,
    offsets: np.ndarray,
    escapes: np.ndarray,
    lay: _Layout,
    name: str,
    parts: str,
) -> tuple[np.ndarray, int, np.ndarray]:
    """Check that the coded data from buf[pos:] (delimited by `offsets`, from 0) and then
    the escapes' float16 values fill the payload: the escapes' prefix sums per unit, where
    their values start, and the values. ContainerError (naming the codec `name` and its
    coded `parts`) if they do not."""
    if escapes.size and escapes.max() > lay.per_unit:
        raise ContainerError(f"{name} payload counts more escapes than values")
    first = np.zeros(lay.units + 1, np.int64)
    np.cumsum(escapes, out=first[1:])
    end = buf.size - 2 * int(first[-1])
    if offsets[0] != 0 or pos + offsets[-1] != end or np.any(np.diff(offsets) < 0):
        raise ContainerError(f"{name} {parts} and escapes do not fill the payload")
    return first, end, buf[end:].view("<f2").astype(np.float32)


def parse_payload(
    payload: memoryview, shape: tuple[int, ...], version: int, tables: bool = True
) -> Payload:
    """Split a payload of format `version` for a value of `shape` into its parts (steps
    per channel whatever the version); ContainerError if they do not fit together
    (truncated, or a field out of range). With `tables=False` the rANS tables are left
    packed (`freqs` None), for a batch that unpacks them all at once
    (`rans.unpack_tables_into`)."""
    if len(shape) != 5 or shape[1] != 2:
        raise ContainerError(f"cachegen cannot decode into shape {shape}")
    layers, _, tokens, heads, head_dim = shape
    buf = np.frombuffer(payload, np.uint8)
    if buf.size < 4:
        raise ContainerError("cachegen payload is truncated")
    (segment,) = struct.unpack_from("<I", payload, 0)
    if not 1 <= segment <= 1 << 16:
        raise ContainerError(f"cachegen payload has a bad stream segment of {segment} tokens")
    lay = _Layout(layers, tokens, heads, head_dim, segment)
    ch, n = lay.channels, lay.units
    n_steps = ch if version == 1 else n
    pos = 4
    head = pos + 2 * ch + 2 * n_steps + 4 * n
    if buf.size < head + 4:
        raise ContainerError("cachegen payload is truncated")
    starts, steps, escapes, pos = _value_fields(buf, pos, lay, n_steps, "cachegen")
    (n_tables,) = struct.unpack_from("<I", payload, head)
    pos = head + 4
    n_offsets = 4 * (lay.streams + 1)
    if buf.size < pos + n_tables + n_offsets:
        raise ContainerError("cachegen payload is truncated (tables or offsets)")
    packed = buf[pos : pos + n_tables]
    freqs = rans.unpack_tables(bytes(packed), n, ALPHABET, PRECISION) if tables else None
    pos += n_tables
    offsets = buf[pos : pos + n_offsets].view("<u4").astype(np.int64)
    pos += n_offsets
    first, end, escaped = _escapes_after(buf, pos, offsets, escapes, lay, "cachegen", "streams")
    return Payload(lay, starts, steps, first, freqs, packed, offsets, payload[pos:end], escaped)


def decode_symbols(p: Payload) -> np.ndarray:
    """The symbols `[units, padded tokens, head_dim]` of a parsed payload's rANS streams."""
    lay = p.layout
    symbols = lay.padded_symbols()
    assert p.freqs is not None, "parsed with its tables"
    rans.decode_streams(
        p.data,
        p.offsets,
        lay.stream_models(),
        p.freqs,
        PRECISION,
        lay.segment * lay.head_dim,
        LANES,
        out=symbols.reshape(lay.streams, lay.segment * lay.head_dim),
        lengths=lay.stream_lengths(),
    )
    return symbols


_profiles: dict[tuple[str, int, int], CacheGenProfile] = {}
_profiles_lock = threading.Lock()


def load_profile(path: str) -> CacheGenProfile | None:
    """The profile in file `path` ("" for none), read once per version of the file (a
    profile with cross-layer maps is megabytes of JSON, and every codec built from a spec
    naming it reads it); InvalidArgument for a path a spec cannot carry or a bad file."""
    if not path:
        return None
    if set(path) & set(",;= ") or not path.isascii():
        raise InvalidArgument(
            f"cachegen profile path {path!r} must be ASCII without spaces, commas, "
            f"semicolons or '=' (a spec separates parameters with them)"
        )
    try:
        st = os.stat(path)
    except OSError as exc:
        raise InvalidArgument(f"cannot read cachegen profile {path}: {exc}") from None
    key = (os.path.abspath(path), st.st_mtime_ns, st.st_size)
    with _profiles_lock:
        profile = _profiles.get(key)
    if profile is None:
        profile = CacheGenProfile.load(path)
        with _profiles_lock:
            _profiles[key] = profile
        if profile.cross is not None:  # what this process stored through it, it can read
            register_cross(profile.cross)
    return profile


@numba.njit(cache=True, nogil=True)
def _put_le(out: np.ndarray, pos: int, value: int, width: int) -> int:
    """`value` as `width` little-endian bytes at out[pos]; the position after them."""
    for b in range(width):
        out[pos + b] = (value >> (8 * b)) & 0xFF
    return pos + width


@numba.njit(parallel=True, cache=True, nogil=True)
def _join(
    segment: int,
    units: int,
    streams: int,
    dim: int,
    head_steps: bool,
    starts: np.ndarray,
    steps: np.ndarray,
    escapes: np.ndarray,
    freqs: np.ndarray,
    offsets: np.ndarray,
    escaped: np.ndarray,
    first: np.ndarray,
    out: np.ndarray,
    bounds: np.ndarray,
    data_at: np.ndarray,
    ends: np.ndarray,
) -> None:
    """`CacheGen.frame_payloads`: value v's payload written from out[bounds[v]] (room for
    its worst case) to out[ends[v]], a value per thread, all but its streams' bytes, whose
    place it leaves from out[data_at[v]]. The format is the module docstring's;
    `head_steps`: one step per unit (payload version 2), the first of its channels' (all
    equal)."""
    for v in numba.prange(ends.size):
        pos = _put_le(out, bounds[v], segment, 4)
        c0 = v * units * dim
        for i in range(units * dim):
            pos = _put_le(out, pos, starts[c0 + i], 2)
        for i in range(units if head_steps else units * dim):
            pos = _put_le(out, pos, steps[c0 + (i * dim if head_steps else i)], 2)
        for u in range(units):
            pos = _put_le(out, pos, escapes[v * units + u], 4)
        n = rans._pack(freqs[v * units : (v + 1) * units], out[pos + 4 :])
        pos = _put_le(out, pos, n, 4) + n
        o0, o1 = offsets[v * streams], offsets[(v + 1) * streams]
        for k in range(streams + 1):
            pos = _put_le(out, pos, offsets[v * streams + k] - o0, 4)
        data_at[v] = pos  # the caller copies the streams: NumPy's copy is 3x numba's here
        pos += o1 - o0
        for i in range(first[v * units], first[(v + 1) * units]):
            pos = _put_le(out, pos, escaped[i], 2)
        ends[v] = pos


def _code_streams(lay: _Layout, symbols: np.ndarray, freqs: np.ndarray) -> tuple[bytes, np.ndarray]:
    """rANS-code each unit's segments (rows of `symbols` [units, padded tokens, dim]) with
    the unit's model: the coded streams back to back, and the offsets [streams + 1]
    delimiting them."""
    return rans.encode_streams(
        symbols.reshape(lay.streams, lay.segment * lay.head_dim),
        lay.stream_models(),
        freqs,
        PRECISION,
        LANES,
        lengths=lay.stream_lengths(),
    )


def _words(t: torch.Tensor) -> np.ndarray:
    """A contiguous KV tensor of 16- or 32-bit floats as its 16-bit words
    `[layers, 2, tokens, words per token]`, without a copy. The kernels take this whole
    array (always C-contiguous) and index it, rather than slices of it that numba would
    type differently from shape to shape."""
    layers, _, tokens, heads, head_dim = t.shape
    words = t.contiguous().view(torch.int16).numpy().view(np.uint16)
    return words.reshape(layers, 2, tokens, heads * head_dim * t.element_size() // 2)


# The kernels work on one (layer, K/V) at a time, token by token, all heads at once: the
# value's own order, so that they read and write it in long runs. Their helpers take whole
# arrays and indices rather than a view of a row: a call per head, each making and
# reference-counting views, made a first version three times slower. Arrays per channel are
# [heads, dim], indexed [h, d] by loop counters rather than by h * dim + d: numba wraps
# negative indices around, and only for loop counters can LLVM see that there are none and
# vectorize the loops.


@numba.njit(cache=True, nogil=True)
def _load(words: np.ndarray, kind: int, ly: int, kv: int, t: int, x: np.ndarray) -> bool:
    """x[t] (float32) = the values whose 16-bit words are words[ly, kv, t]; whether they
    are all finite and within float16's range."""
    n = x.shape[1]
    if kind == _F32:
        for c in range(n):
            bits = np.uint32(words[ly, kv, t, 2 * c]) | np.uint32(words[ly, kv, t, 2 * c + 1]) << 16
            x[t, c] = np.uint32(bits).view(np.float32)
    elif kind == _BF16:
        for c in range(n):
            x[t, c] = bf16_to_f32(words[ly, kv, t, c])
    else:
        for c in range(n):
            x[t, c] = f16_to_f32(words[ly, kv, t, c])
    bad = False
    for c in range(n):
        bad |= not abs(x[t, c]) <= F16_MAX
    return not bad


@numba.njit(cache=True, nogil=True)
def _value(words: np.ndarray, kind: int, ly: int, kv: int, t: int, c: int) -> np.float32:
    """The float32 value of channel c (head * dim + index) of words[ly, kv, t]."""
    if kind == _F32:
        bits = np.uint32(words[ly, kv, t, 2 * c]) | np.uint32(words[ly, kv, t, 2 * c + 1]) << 16
        return np.uint32(bits).view(np.float32)
    if kind == _BF16:
        return bf16_to_f32(words[ly, kv, t, c])
    return f16_to_f32(words[ly, kv, t, c])


@numba.njit(cache=True, nogil=True)
def _store(value: np.ndarray, kind: int, words: np.ndarray, ly: int, kv: int, t: int) -> None:
    """words[ly, kv, t] = float32 `value` rounded to the dtype to nearest even, as torch
    rounds (float16 past its range to inf)."""
    _store_at(value, kind, words, ly, kv, t, 0)


@numba.njit(cache=True, nogil=True, inline="always")
def _store_at(
    value: np.ndarray, kind: int, words: np.ndarray, ly: int, kv: int, t: int, at: int
) -> None:
    """`_store` of the `value.size` values from channel `at` of (ly, kv, t) on."""
    n = value.size
    if kind == _F32:
        row = words[ly, kv, t, 2 * at : 2 * (at + n)]
        for c in range(n):
            bits = np.float32(value[c]).view(np.uint32)
            row[2 * c] = bits & 0xFFFF
            row[2 * c + 1] = bits >> 16
    elif kind == _BF16:
        row = words[ly, kv, t, at : at + n]
        for c in range(n):
            row[c] = f32_to_bf16(value[c])
    else:
        row = words[ly, kv, t, at : at + n]
        for c in range(n):
            row[c] = f32_to_f16(value[c], False)


# ------------------------------------------------------------------------------ encoding

# Per-thread state of the host encoders (`CacheGenZstd._compressor`).
_local = threading.local()


@numba.njit(cache=True, nogil=True)
def _channel_model(x: np.ndarray, dpcm: bool, start: np.ndarray, spread: np.ndarray) -> None:
    """Per channel of x [tokens, channels]: the start value (K: the first token; V: the
    mean) and the spread (root mean square) of the residuals the predictor leaves. Sums in
    float64, each channel's over the tokens in order."""
    tokens, n = x.shape
    if tokens == 0:
        start[:] = 0
        spread[:] = 0
        return
    acc = np.zeros(n, np.float64)
    if dpcm:  # K: differences along the tokens
        for t in range(1, tokens):
            for c in range(n):
                e = x[t, c] - x[t - 1, c]
                acc[c] += e * e
        for c in range(n):
            start[c] = x[0, c]
            spread[c] = np.sqrt(acc[c] / max(tokens - 1, 1))
    else:  # V: around the channel mean
        mean = np.zeros(n, np.float64)
        for t in range(tokens):
            for c in range(n):
                mean[c] += x[t, c]
        for c in range(n):
            mean[c] /= tokens
        for t in range(tokens):
            for c in range(n):
                e = x[t, c] - mean[c]
                acc[c] += e * e
        for c in range(n):
            start[c] = mean[c]
            spread[c] = np.sqrt(acc[c] / tokens)


@numba.njit(cache=True, nogil=True)
def _histogram(symbols: np.ndarray, u: int, tokens: int, counts: np.ndarray) -> None:
    """counts[u, s] = occurrences of s in the first `tokens` tokens of symbols[u]. Four
    partial tables, so that runs of one symbol do not chain their increments through
    memory."""
    part = np.zeros((4, 256), np.int64)
    flat = symbols[u].reshape(-1)
    n = tokens * symbols.shape[2]
    body = n - n % 4
    for i in range(0, body, 4):
        part[0, flat[i]] += 1
        part[1, flat[i + 1]] += 1
        part[2, flat[i + 2]] += 1
        part[3, flat[i + 3]] += 1
    for i in range(body, n):
        part[0, flat[i]] += 1
    for s in range(counts.shape[1]):
        counts[u, s] = part[0, s] + part[1, s] + part[2, s] + part[3, s]


@numba.njit(parallel=True, cache=True, nogil=True)
def _encode(
    words: np.ndarray,
    kind: int,
    dpcm: bool,
    res: np.ndarray,
    starts: np.ndarray,
    steps: np.ndarray,
    symbols: np.ndarray,
    counts: np.ndarray,
    marked: np.ndarray,
    decoded: np.ndarray,
    ok: np.ndarray,
) -> None:
    """All but the escapes' values and the rANS coding: from words [layers, 2, tokens,
    words], the float16 bits of starts and steps [layers, 2, heads, dim], symbols
    [units, tokens or more, dim], their counts [units, ALPHABET] (escapes: counts[:, 0];
    if counts is [units, 1], only the escapes are counted), and marked [units, tokens]:
    whether the token has an escape in the unit; and unless it is empty, `decoded` (words'
    shape and dtype): the value as the decoder will write it.
    ok[layer, K/V] is False if a value is out of float16's range; the rest is then left
    unfinished. K is quantized closed-loop against the decoded previous token."""
    for i in numba.prange(words.shape[0] * 2):
        ok[i // 2, i % 2] = _encode_unit(
            words, kind, i, dpcm, res, starts, steps, symbols, counts, marked, decoded
        )


@numba.njit(cache=True, nogil=True)
def _encode_unit(
    words: np.ndarray,
    kind: int,
    i: int,
    dpcm: bool,
    res: np.ndarray,
    starts: np.ndarray,
    steps: np.ndarray,
    symbols: np.ndarray,
    counts: np.ndarray,
    marked: np.ndarray,
    decoded: np.ndarray,
) -> bool:
    """`_encode` for K (i even) or V (i odd) of layer i // 2; False if a value is out of
    float16's range."""
    _, _, tokens, _ = words.shape
    heads, dim = starts.shape[2], starts.shape[3]
    n = heads * dim
    ly, kv = i // 2, i % 2
    x = np.empty((tokens, heads, dim), np.float32)
    flat = x.reshape(tokens, n)
    good = True
    for t in range(tokens):
        good &= _load(words, kind, ly, kv, t, flat)
    if not good:
        return False
    closed_loop = kv == 0 and dpcm
    start = np.empty((heads, dim), np.float32)
    spread = np.empty((heads, dim), np.float32)
    _channel_model(flat, closed_loop, start.reshape(n), spread.reshape(n))
    pred = np.empty((heads, dim), np.float32)
    step = np.empty((heads, dim), np.float32)
    inv = np.empty((heads, dim), np.float32)
    limit = np.empty((heads, dim), np.float32)
    for h in range(heads):
        # One step for the whole head: the same absolute error in every channel, which for
        # a given size is the least squared error (water-filling), rather than the same
        # share of each channel's own spread: on SmolLM2's KV, 30% less KL at equal size.
        rms = np.float32(0.0)
        for d in range(dim):
            rms += spread[h, d] * spread[h, d]
        rms = np.float32(np.sqrt(rms / dim))
        for d in range(dim):
            bits = f32_to_f16(start[h, d], True)
            starts[ly, kv, h, d] = bits
            pred[h, d] = f16_to_f32(bits)
            bits = f32_to_f16(rms / res[ly, kv, h], True)
            steps[ly, kv, h, d] = bits
            step[h, d] = f16_to_f32(bits)
            inv[h, d] = np.float32(1.0) / step[h, d] if step[h, d] > 0 else np.float32(0.0)
            # Escapes beyond OUTLIER_SPREADS of the channel's own spread.
            far = np.ceil(OUTLIER_SPREADS * spread[h, d] * inv[h, d])
            limit[h, d] = min(max(far, np.float32(1.0)), np.float32(REACH))
    value = np.empty((heads, dim), np.float32)
    for t in range(tokens):
        for h in range(heads):
            u = i * heads + h
            escapes = False
            for d in range(dim):  # branch-free, so that it vectorizes
                residual = x[t, h, d] - pred[h, d]
                q = np.rint(residual * inv[h, d])
                # Escape when the step cannot reach the value (also a zero step, a value off
                # a constant channel), and always for the chunk's first token unless it is
                # K's start value, which already holds it as float16: residual 0, symbol 127.
                escape = (
                    (abs(q) > limit[h, d])
                    | ((step[h, d] == 0) & (residual != 0))
                    | ((t == 0) & (not closed_loop))
                )
                q = min(max(q, -limit[h, d]), limit[h, d])
                symbols[u, t, d] = 0 if escape else np.uint8(np.int32(q) + CENTER)
                value[h, d] = pred[h, d] + q * step[h, d]  # an exact product
                escapes |= escape
            marked[u, t] = escapes
            if escapes:  # these decode to their values rounded to float16
                for d in range(dim):
                    if symbols[u, t, d] == 0:
                        value[h, d] = f16_to_f32(f32_to_f16(x[t, h, d], True))
        if decoded.size:  # rounded as the decoder's `_store` rounds it
            _store(value.reshape(n), kind, decoded, ly, kv, t)
        if closed_loop:  # the decoder's value predicts the next token
            pred[:] = value
    for h in range(heads):
        u = i * heads + h
        if counts.shape[1] > 1:
            _histogram(symbols, u, tokens, counts)
        else:  # a coder without frequency tables needs the escapes' count alone
            e = 0
            for t in range(tokens):
                if marked[u, t]:
                    for d in range(dim):
                        e += symbols[u, t, d] == 0
            counts[u, 0] = e
    return True


@numba.njit(parallel=True, cache=True, nogil=True)
def _gather_escapes(
    words: np.ndarray,
    kind: int,
    heads: int,
    symbols: np.ndarray,
    marked: np.ndarray,
    first: np.ndarray,
    escaped: np.ndarray,
) -> None:
    """escaped[first[u]:first[u + 1]] = the float16 bits of stream u's escapes, in its
    (token-major) order; only the tokens `_encode` marked are looked at."""
    layers, _, tokens, _ = words.shape
    dim = symbols.shape[2]
    for i in numba.prange(layers * 2):
        ly, kv = i // 2, i % 2
        for h in range(heads):
            u = i * heads + h
            pos = first[u]
            for t in range(tokens):
                if not marked[u, t]:
                    continue
                for d in range(dim):
                    if symbols[u, t, d] == 0:
                        x = _value(words, kind, ly, kv, t, h * dim + d)
                        escaped[pos] = f32_to_f16(x, True)
                        pos += 1


# ------------------------------------------------------------------------------ decoding


@numba.njit(parallel=True, cache=True, nogil=True)
def _decode(
    symbols: np.ndarray,
    starts: np.ndarray,
    steps: np.ndarray,
    escaped: np.ndarray,
    first: np.ndarray,
    dpcm: bool,
    kind: int,
    words: np.ndarray,
    ok: np.ndarray,
) -> None:
    """Values from symbols [units, tokens or more, dim] into words [layers, 2, tokens,
    words]; unit u's escapes are escaped[first[u]:first[u + 1]], in the unit's
    (token-major) order. ok[layer, K/V] is False if a unit has more or fewer escapes than
    that; its values are then left unfinished."""
    for i in numba.prange(words.shape[0] * 2):
        ok[i // 2, i % 2] = _decode_unit(
            symbols, starts, steps, escaped, first, dpcm, kind, i, words
        )


@numba.njit(cache=True, nogil=True)
def _decode_unit(
    symbols: np.ndarray,
    starts: np.ndarray,
    steps: np.ndarray,
    escaped: np.ndarray,
    first: np.ndarray,
    dpcm: bool,
    kind: int,
    i: int,
    words: np.ndarray,
) -> bool:
    """`_decode` for K (i even) or V (i odd) of layer i // 2; False if a stream's escapes
    do not add up."""
    _, _, tokens, _ = words.shape
    heads, dim = starts.shape[2], starts.shape[3]
    ly, kv = i // 2, i % 2
    closed_loop = kv == 0 and dpcm
    pred = starts[ly, kv].copy()
    step = steps[ly, kv]
    value = np.empty((heads, dim), np.float32)
    flat = value.reshape(heads * dim)
    e = first[i * heads : (i + 1) * heads].copy()  # each stream's next escape
    for t in range(tokens):
        for h in range(heads):
            u = i * heads + h
            escapes = False
            for d in range(dim):
                s = symbols[u, t, d]
                # The product is exact: the result does not depend on FMA contraction.
                value[h, d] = pred[h, d] + (np.float32(s) - np.float32(CENTER)) * step[h, d]
                escapes |= s == 0
            if escapes:
                for d in range(dim):
                    if symbols[u, t, d] == 0:
                        if e[h] == first[u + 1]:  # more escapes than the stream has
                            return False
                        value[h, d] = escaped[e[h]]
                        e[h] += 1
        _store(flat, kind, words, ly, kv, t)
        if closed_loop:  # this token's value predicts the next
            pred[:] = value
    return bool(np.all(e == first[i * heads + 1 : (i + 1) * heads + 1]))  # not fewer
