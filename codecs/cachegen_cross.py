"""`cachegen-x`: cachegen with each layer's KV predicted from the layer below it.

A layer's K and V are two projections of the residual stream, and the layer below's K and
V pin much of that stream down: on SmolLM2 a linear map from layer l-1's channels (K with
RoPE undone, and V) leaves residuals of a third to a half of what cachegen's predictors
(the previous token, the channel mean) leave (`benchmarks/NOTES-codecs.md`, "Predicting
each layer from the one below"). So, for a chunk whose first token is at `position`:

- each layer's channels are K with RoPE undone at the chunk's true positions (a map that
  mixes heads and channels does not commute with RoPE), then V: `[tokens, 2, heads,
  head_dim]`;
- layer 0 is predicted by nothing; layer l >= 1 by `CrossLayer.predict` of layer l-1 *as
  decoded* (closed loop), an integer product exact on any machine (with the default 8-bit
  maps, int8 by int8 summed in int32 by torch's `_int_mm` on a host core with AMX or VNNI,
  by a float32 GEMM, exact for these sums, on one without); then the chunk's mean of what
  is left, per channel, is the float16
  start value. The kernels below write each layer's channels as the next map's integer
  inputs as they reconstruct them, and read the product's integers, so a layer costs one
  GEMM call and one kernel;
- with a version 3 profile's `kv_maps`, a layer's V is predicted from its own K as decoded
  too (the two are projections of one hidden state): the layer's K units are reconstructed
  first, then V's against the map's product plus K's (layer 0's V: K's alone): two kernel
  calls and one more, smaller GEMM a layer, on the host and on the GPU;
- the rest is cachegen's quantizer: one float16 step per (layer, K/V, head) from the
  residuals' spread over a resolution (`CROSS_LEVELS` times the profile's cross-layer
  weight), a value further than `OUTLIER_SPREADS` of its channel's spread and every value of
  the chunk's first token escaped to float16, symbols rANS-coded per unit in streams;
- decoding runs the layers in order: value = (prediction + start) + (symbol - 127) * step in
  float32, or the escape's value; K is then rotated back with float32 cos / sin tables of
  the positions (float64 angles; each entry the float32 nearest its true value, the same
  on every machine: `rounded_f32`) as x cos - x' sin, each product and the
  difference rounded (no fused multiply-add), and every value rounded to the dtype.

The decoder needs the profile's `CrossLayer`: containers record its digest (`maps`), and a
process decodes them once it has loaded that profile (a codec spec naming it, or
`register_cross`); otherwise the container is refused, with the digest in the message.

Payload, little-endian (format version 1): `position u64`, then a cachegen version 2
payload (`kvstore.codecs.cachegen`: segment, starts, steps per head, escapes, tables,
offsets, streams, escaped values), its starts and escapes those of the channels above.

The encoder takes the position from `for_position` (clients that put a prefix's chunks
know it); without one it searches for the position whose maps predict the chunk's first
tokens best (`find_position`), which finds a chunk's true start on SmolLM2's KV but costs
~0.1-0.5 s of a CPU core.
"""

from __future__ import annotations

import collections
import copy
import struct
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import mpmath
import numba
import numpy as np
import torch

from kvstore.codecs.base import Codec, ContainerError, ParamValue, kv_view, register
from kvstore.codecs.cachegen import (
    _F32,
    _KINDS,
    ALPHABET,
    CENTER,
    OUTLIER_SPREADS,
    REACH,
    SEGMENT_TOKENS,
    CacheGen,
    Payload,
    ZstdFrames,
    _gather_escapes,
    _histogram,
    _Layout,
    _Quantized,
    _store_at,
    _words,
    decode_symbols,
    load_profile,
    parse_payload,
)
from kvstore.codecs.cachegen_profile import (
    CrossLayer,
    channels_of,
    register_cross,
    registered_cross,
    rope_angles,
)
from kvstore.codecs.container import MissingContext
from kvstore.errors import InvalidArgument
from kvstore.kernels.floatbits import F16_MAX, f16_to_f32, f32_to_f16
from kvstore.keys import MAX_POSITION

# The resolution (residual spread over step) of a head of cross-layer weight 1, by level;
# a sequence's newest chunk is coded one level finer unless `newest` says otherwise. On
# SmolLM2's held-out prompts level 1 is 5.16x smaller than fp16 at 97.0-97.3% top-1
# agreement with 8-bit maps (benchmarks/NOTES-codecs.md).
CROSS_LEVELS: Mapping[int, float] = {0: 2.3, 1: 1.65, 2: 1.4, 3: 1.2}
# The position search without a given position: candidates every SEARCH_STEP tokens below
# SEARCH_LIMIT, scored on the first SEARCH_TOKENS tokens through layer 1, then every token
# within SEARCH_STEP of the SEARCH_KEEP best, scored on more tokens and layers.
SEARCH_LIMIT = 1 << 15
SEARCH_STEP = 16
SEARCH_KEEP = 32
SEARCH_TOKENS = 16
REFINE_TOKENS = 32
REFINE_LAYERS = 3


@register
class CacheGenX(CacheGen):
    name = "cachegen-x"
    codec_id = 7
    # maps: the digest of the profile's cross-layer maps (recorded in containers; set from
    # the profile when a spec names one). position: the absolute position of the value's
    # first token (`for_position`), -1 to search for it. newest: the level of a sequence's
    # newest chunk, -1 for one finer than `level`. profile: as cachegen's.
    PARAMS: ClassVar[Mapping[str, ParamValue]] = {
        "level": 1,
        "maps": "",
        "profile": "",
        "position": -1,
        "newest": -1,
        "version": 1,
    }
    ENCODER_ONLY = frozenset({"profile", "newest", "position"})
    LEGACY_PARAMS: ClassVar[Mapping[str, ParamValue]] = {}
    VERSIONS: ClassVar[tuple[int, ...]] = (1,)
    # Tokens per rANS stream; None: one segment a unit (zstd frames).
    SEGMENT: ClassVar[int | None] = SEGMENT_TOKENS
    # The GPU encoder runs the layers one after another, a few launches each however many
    # values the batch holds: on an H200, 22 SmolLM2 chunks (118 MB) took 29 ms, 5 took 17.
    GPU_BATCH_BYTES: ClassVar[int | None] = 64 << 20

    def check_params(self) -> None:
        self.check_levels(CROSS_LEVELS)
        if not -1 <= int(self.params["position"]) < MAX_POSITION:
            raise InvalidArgument(f"cachegen-x position {self.params['position']} out of range")
        self._newest: Codec | None = None
        self._profile = load_profile(str(self.params["profile"]))
        digest = str(self.params["maps"])
        if self._profile is not None:
            if self._profile.cross is None:
                raise InvalidArgument(
                    f"cachegen profile {self.params['profile']} has no cross-layer maps (fit "
                    "it again with this build's cachegen_profile tool)"
                )
            if digest and digest != self._profile.cross.digest:
                raise InvalidArgument(
                    f"cachegen-x maps={digest} but profile {self.params['profile']} has maps "
                    f"{self._profile.cross.digest}"
                )
            self.cross = self._profile.cross
            self.params["maps"] = register_cross(self.cross)
            return
        if not digest:
            raise InvalidArgument("cachegen-x needs a profile with cross-layer maps (profile=FILE)")
        cross = registered_cross(digest)
        if cross is None:
            raise MissingContext(
                f"cachegen-x maps {digest} are not loaded in this process: give it the "
                "cachegen profile they come from (a codec spec with profile=FILE)",
                maps=digest,
            )
        self.cross = cross

    def for_newest(self) -> Codec:
        """This codec one level finer (or at `newest`), at the same position."""
        level, newest = int(self.params["level"]), int(self.params["newest"])
        if newest == -1:
            newest = max(level - 1, 0)
        if newest == level:
            return self
        if self._newest is None:  # one instance per position (twins share the cache)
            self._newest = type(self)(**{**self.params, "level": newest, "newest": newest})
        finer = self._newest
        position = int(self.params["position"])
        return finer.for_position(position) if position >= 0 else finer

    def for_position(self, position: int, shape: Sequence[int] | None = None) -> Codec:
        if position < 0 or position >= MAX_POSITION:
            raise InvalidArgument(f"cachegen-x position {position} out of range")
        if position == self.params["position"]:
            return self
        twin = copy.copy(self)
        twin.params = {**self.params, "position": int(position)}
        return twin

    @classmethod
    def gpu_decoder(cls) -> Callable[[Sequence[Any], Any], Any] | None:
        if cls.HOST_ONLY:
            return None
        from kvstore.kernels.cachegen_cross import decode_x_on_gpu

        return decode_x_on_gpu

    @classmethod
    def gpu_encoder(cls) -> Callable[..., list[tuple[memoryview, int]]] | None:
        if cls.HOST_ONLY:
            return None
        from kvstore.kernels.cachegen_cross_encode import encode_x_many_on_gpu

        return encode_x_many_on_gpu

    def gpu_batch(self) -> tuple[str, str, int]:
        # The GPU encoder takes a codec per value: positions and levels may differ.
        return (self.name, self.cross.digest, int(self.params["version"]))

    @property
    def head_steps(self) -> bool:
        return True

    def resolution(self, layers: int, heads: int) -> np.ndarray:
        self._check_shape(layers, heads, self.cross.head_dim)
        return np.float32(CROSS_LEVELS[int(self.params["level"])]) * self.cross.weights

    def check_value_shape(self, shape: Sequence[int]) -> None:
        """ContainerError unless a value of `shape` is KV its maps are for."""
        if len(shape) != 5 or shape[1] != 2:
            raise ContainerError(f"cachegen-x cannot decode into shape {tuple(shape)}")
        try:
            self._check_shape(shape[0], shape[3], shape[4])
        except InvalidArgument as exc:
            raise ContainerError(str(exc)) from None

    def _check_shape(self, layers: int, heads: int, head_dim: int) -> None:
        c = self.cross
        if (layers, heads, head_dim) != (c.layers, c.heads, c.head_dim):
            raise InvalidArgument(
                f"cachegen-x maps {self.params['maps']} are for {c.layers} layers x {c.heads} "
                f"KV heads x {c.head_dim}, not KV of {layers} x {heads} x {head_dim}"
            )

    # -------------------------------------------------------------------------- encoding

    def _encode(self, tensor: torch.Tensor, back: torch.Tensor | None) -> bytes:
        kv_view(tensor, self.name)
        x = tensor.detach().float().numpy()
        layers, _, tokens, heads, dim = x.shape
        self._check_shape(layers, heads, dim)
        position = int(self.params["position"])
        if position < 0:  # the search reads the values: checked first
            if not _within_f16(x):
                raise InvalidArgument(_NOT_F16.format(self.name))
            position = find_position(self.cross, x)
        c = self.cross
        ch = np.empty((layers, tokens, 2, heads, dim), np.float32)
        cos, sin = rope_tables(c, position, tokens)
        bad = _channels(x, cos, sin, np.float32(1 / c.rope_scale**2), ch)
        if bad == _BAD_VALUE:
            raise InvalidArgument(_NOT_F16.format(self.name))
        if bad:
            raise InvalidArgument(
                f"{self.name}: K with RoPE undone leaves float16's range; store this value "
                "with another codec"
            )
        lay = _Layout(layers, tokens, heads, dim, self.SEGMENT or max(tokens, 1))
        res = self.resolution(layers, heads)
        starts = np.empty((layers, 2, heads, dim), np.uint16)
        steps = np.empty((layers, 2, heads, dim), np.uint16)
        symbols = lay.padded_symbols()
        counts = np.empty((lay.units, ALPHABET), np.int64)
        marked = np.empty((lay.units, tokens), np.bool_)
        xhat = np.empty((layers, tokens, 2, heads, dim), np.float32)
        below = np.empty((tokens, c.channels), c.input_dtype)
        # One thread (a server's host thread coding a value): kernels that never start
        # numba's pool, which costs its threads a launch each per layer and kernel.
        code = _code_layer if numba.get_num_threads() > 1 else _code_layer_1
        for layer in range(layers):
            for acc, scale, units in _passes(c, below, layer):
                code(
                    *units, ch[layer], acc, scale, c.input_scale(layer),
                    float(c.input_limit), res[layer], layer, starts, steps, symbols, counts,
                    marked, xhat[layer], below,
                )  # fmt: skip
        escapes = counts[:, 0]
        first = np.zeros(lay.units + 1, np.int64)
        np.cumsum(escapes, out=first[1:])
        escaped = np.empty(first[-1], np.uint16)
        if escaped.size:  # their values from the channels laid out as a float32 value's words
            words = _words(torch.from_numpy(np.ascontiguousarray(ch.transpose(0, 2, 1, 3, 4))))
            _gather_escapes(words, _F32, heads, symbols, marked, first, escaped)
        if back is not None:
            _rotate_out(self.cross, xhat, position, back)
        qz = _Quantized(lay, starts, steps, symbols, counts, escapes, escaped, first)
        return self.coded(qz, struct.pack("<Q", position))

    # -------------------------------------------------------------------------- decoding

    def parse(
        self, payload: memoryview, shape: Sequence[int], tables: bool = True
    ) -> tuple[int, Payload]:
        """A payload for a value of `shape` split into its first token's position and the
        cachegen payload after it (`parse_payload`, `tables` as there); ContainerError if
        they do not fit these maps or it."""
        position = self._position(payload, shape)
        return position, parse_payload(payload[8:], tuple(shape), 2, tables)

    def _position(self, payload: memoryview, shape: Sequence[int]) -> int:
        """The position a payload for a value of `shape` records; ContainerError if there
        is none, or these maps are not for that shape."""
        if len(payload) < 8:
            raise ContainerError(f"{self.name} payload is truncated")
        (position,) = struct.unpack_from("<Q", payload, 0)
        if position >= MAX_POSITION:
            raise ContainerError(f"{self.name} payload records position {position}")
        self.check_value_shape(shape)
        return int(position)

    def symbols(
        self, payload: memoryview, shape: Sequence[int]
    ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """A payload for a value of `shape`, entropy-decoded: its position, symbols `[units,
        tokens or more, head_dim]`, starts, steps `[layers, 2, heads]`, escapes' values and
        their first index a unit; ContainerError if it does not fit."""
        position, p = self.parse(payload, shape)
        starts, steps = np.ascontiguousarray(p.starts), np.ascontiguousarray(p.steps[..., 0])
        return position, decode_symbols(p), starts, steps, p.escaped, p.first

    def decode_payload(self, payload: memoryview, out: torch.Tensor) -> None:
        position, symbols, starts, steps, escaped, first = self.symbols(payload, out.shape)
        layers, _, tokens = out.shape[:3]
        c = self.cross
        cos, sin = rope_tables(c, position, tokens)
        target = _target(out)
        kind, words = _KINDS[target.dtype], _words(target)
        # Each layer's decoded channels as the next layer's map reads them (integers), and
        # the map's product: the prediction, scaled inside the kernel. (The last layer's
        # channels feed no map: they are scaled as the one before's, and not read.) The
        # kernel writes the layer's output too, K rotated back.
        below = np.empty((tokens, c.channels), c.input_dtype)
        decode_layer = _decode_layer if numba.get_num_threads() > 1 else _decode_layer_1
        for layer in range(layers):
            for acc, scale, units in _passes(c, below, layer):
                if not decode_layer(
                    *units, symbols, starts, steps, escaped, first, acc, scale,
                    c.input_scale(layer), float(c.input_limit), layer, cos, sin,
                    kind, words, below,
                ):  # fmt: skip
                    raise ContainerError("cachegen-x escapes disagree with the streams")
        if target is not out:
            out.copy_(target)


@register
class CacheGenXZstd(ZstdFrames, CacheGenX):
    """`cachegen-x` with zstd frames in place of rANS streams (`ZstdFrames`, as
    `cachegen-zstd` is to `cachegen`): the same quantizer, so the same decoded value to the
    bit. On SmolLM2's chunks the payloads are ~1% larger (5.12x against 5.16x at level 1)
    and their symbols decode ~3x faster, which is most of a host decode's gain: for tiers
    whose reads land in host memory (no GPU decoder). A profile's `cachegen-zstd` codes
    values put with their position with this.

    Payload, little-endian (format version 1): `position u64`, then a `cachegen-zstd`
    payload of the channels (`kvstore.codecs.cachegen.CacheGenZstd`)."""

    name = "cachegen-x-zstd"
    codec_id = 8
    SEGMENT = None

    def coded(self, qz: _Quantized, prefix: bytes = b"") -> bytes:
        return b"".join((prefix, self.framed(qz).data))

    def symbols(
        self, payload: memoryview, shape: Sequence[int]
    ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        position = self._position(payload, shape)
        symbols, starts, steps, escaped, first = self.unframed(payload[8:], tuple(shape))
        return position, symbols, starts, np.ascontiguousarray(steps[..., 0]), escaped, first


# Layer 0's "product": no rows, so its kernels predict nothing.
_NO_PRODUCT = np.empty((0, 0), np.float64)
_NO_PRODUCT.flags.writeable = False


def _passes(
    c: CrossLayer, below: np.ndarray, layer: int
) -> Iterator[tuple[np.ndarray, np.ndarray, tuple[int, int]]]:
    """Layer `layer`'s kernel calls in order, as (product, its columns' scale, (first unit,
    end)), `below` holding layer - 1's channels as its map reads them: every unit against
    the map's product (layer 0: none); with `kv_maps`, K's units, then V's against that
    product plus this layer's K (in `below` once K's call has run) times its kv map."""
    units = 2 * c.heads
    acc = c.product(below, layer) if layer else _NO_PRODUCT
    scale = c.out_scale[max(layer - 1, 0)]
    if not c.has_kv:
        yield acc, scale, (0, units)
        return
    yield acc, scale, (0, c.heads)
    half = c.channels // 2
    kvp = c.kv_product(below[:, :half], layer)
    if layer:
        acc[:, half:] += kvp  # integers: exact (sums below 2^31)
    else:
        acc = np.zeros((len(below), c.channels), np.int32)
        acc[:, half:] = kvp
    yield acc, c.v_out_scale(layer), (c.heads, units)


def _rotate_out(cross: CrossLayer, xhat: np.ndarray, position: int, out: torch.Tensor) -> None:
    """`out` (the value's dtype and shape) = the decoded channels `xhat` `[layers, tokens, 2,
    heads, dim]` with RoPE applied back to K at positions position.., rounded to its dtype."""
    cos, sin = rope_tables(cross, position, xhat.shape[1])
    target = _target(out)
    _output(xhat, cos, sin, _KINDS[target.dtype], _words(target))
    if target is not out:
        out.copy_(target)


def _target(out: torch.Tensor) -> torch.Tensor:
    """What the kernels write for `out`: itself, or float32 to be copied into it (a dtype
    they do not write, or not contiguous)."""
    if out.dtype in _KINDS and out.is_contiguous():
        return out
    return torch.empty(out.shape, dtype=torch.float32)


# The last tables made, by (maps, position, tokens): prefix chunks sit at the same few
# positions request after request, and a GPU batch's host time went ~15% to these.
_TABLES_KEPT = 256  # 64 KiB each for SmolLM2's 256-token chunks
_tables: collections.OrderedDict[tuple[str, int, int], tuple[np.ndarray, np.ndarray]] = (
    collections.OrderedDict()
)
_tables_lock = threading.Lock()


def rope_tables(cross: CrossLayer, position: int, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 cos and sin `[tokens, head_dim / 2]` of positions position.. that every
    decoder rotates K back with (the GPU's are these, copied): float64 angles, then each
    entry the float32 nearest its true value times the RoPE scale (`rounded_f32`: the same
    on every machine). Read-only (shared by every caller)."""
    key = (cross.digest, int(position), int(tokens))
    with _tables_lock:
        got = _tables.get(key)
        if got is not None:
            _tables.move_to_end(key)
            return got
    ang = rope_angles(cross.inv_freq, position, tokens)
    got = (
        rounded_f32(np.cos, mpmath.cos, ang, cross.rope_scale),
        rounded_f32(np.sin, mpmath.sin, ang, cross.rope_scale),
    )
    for a in got:
        a.flags.writeable = False
    with _tables_lock:
        _tables[key] = got
        while len(_tables) > _TABLES_KEPT:
            _tables.popitem(last=False)
    return got


# How near (in float64 ulps of the value) a float32 rounding tie a table entry's float64
# value may lie before it is computed again exactly: past numpy's error on any CPU (its
# float64 cos / sin are within an ulp or two, SVML's on AVX-512 as glibc's).
_TIE_ULPS = 8


def rounded_f32(
    fn: Callable[[np.ndarray], np.ndarray],
    exact: Callable[[Any], Any],
    ang: np.ndarray,
    scale: float,
) -> np.ndarray:
    """float32 `fn(ang) * scale`, each entry the float32 nearest the true value: the same
    bits on every machine. numpy's float64 `fn` can differ by an ulp from CPU to CPU, which
    rounds an entry to the other float32 where its value lies next to a tie between two,
    and a decoder whose table differs from the encoder's decodes other bits (the checksum
    then refuses the value). Entries within `_TIE_ULPS` of a tie are computed again with
    mpmath's `exact` at 160 bits; on SmolLM2's frequencies none of the first 32K positions'
    2M entries is that near one."""
    v = fn(ang) * scale
    f = v.astype(np.float32)
    f64 = f.astype(np.float64)
    side = np.where(v > f64, np.float32(np.inf), np.float32(-np.inf))
    other = np.nextafter(f, side)  # the float32 on v's far side of f
    mid = (f64 + other.astype(np.float64)) / 2
    near = np.abs(v - mid) <= _TIE_ULPS * np.spacing(np.abs(v))
    if near.any():
        with mpmath.workprec(160):
            for i in zip(*np.nonzero(near), strict=True):
                true = exact(mpmath.mpf(float(ang[i]))) * mpmath.mpf(float(scale))
                a, b = float(f[i]), float(other[i])
                f[i] = a if abs(true - a) <= abs(true - b) else b
    return f


def find_position(cross: CrossLayer, x: np.ndarray) -> int:
    """The position of KV `x`'s first token (`[layers, 2, tokens, heads, dim]`) whose maps
    predict it best (open loop, each candidate's residual mean removed): every
    `SEARCH_STEP` tokens below `SEARCH_LIMIT` on its first `SEARCH_TOKENS` tokens through
    layer 1, then every token near the `SEARCH_KEEP` best on `REFINE_TOKENS` tokens through layer
    `REFINE_LAYERS` - 1. The encoder's guess, in float32; not part of the format."""
    layers, tokens = x.shape[0], x.shape[2]
    if layers < 2 or tokens == 0:
        return 0
    coarse = np.arange(0, SEARCH_LIMIT, SEARCH_STEP)
    misfit = _misfit(cross, x, coarse, SEARCH_TOKENS, 2)
    best = coarse[np.argsort(misfit)[:SEARCH_KEEP]]
    near = np.unique((best[:, None] + np.arange(1 - SEARCH_STEP, SEARCH_STEP)).clip(0))
    return int(near[np.argmin(_misfit(cross, x, near, REFINE_TOKENS, REFINE_LAYERS))])


def _misfit(
    cross: CrossLayer, x: np.ndarray, candidates: np.ndarray, n: int, depth: int
) -> np.ndarray:
    """Per candidate position, the squared residual of the maps' predictions of layers
    1..depth-1 on x's first n tokens with RoPE undone at that position (batches of them
    in one product)."""
    depth = min(depth, x.shape[0])
    base = channels_of(x[:depth, :, :n], cross.inv_freq, cross.rope_scale, 0)
    depth, n, _ = base.shape
    heads, dim = cross.heads, cross.head_dim
    half = dim // 2
    base = base.reshape(depth, n, 2, heads, dim)
    total = np.zeros(candidates.size)
    batch = max(1, 4096 // n)
    for a in range(0, candidates.size, batch):
        p = candidates[a : a + batch].astype(np.float64)
        ang = p[:, None] * cross.inv_freq[None, :]  # RoPE undone by a further p positions
        c, s = np.cos(ang)[:, None, None, :], np.sin(ang)[:, None, None, :]
        ch = np.empty((depth, p.size, n, 2, heads, dim), np.float32)
        for layer in range(depth):
            k = base[layer, :, 0][None]  # [1, n, heads, dim]
            x1, x2 = k[..., :half], k[..., half:]
            ch[layer, :, :, 0, :, :half] = x1 * c + x2 * s
            ch[layer, :, :, 0, :, half:] = x2 * c - x1 * s
            ch[layer, :, :, 1] = base[layer, :, 1][None]
        flat = ch.reshape(depth, p.size, n, -1)
        for layer in range(1, depth):
            below = flat[layer - 1].reshape(p.size * n, -1)
            r = flat[layer] - (below @ cross.float_map(layer)).reshape(flat[layer].shape)
            r -= r.mean(axis=1, keepdims=True)
            total[a : a + p.size] += np.square(r).sum(axis=(1, 2))
    return total


# ------------------------------------------------------------------------------ kernels


@numba.njit(parallel=True, cache=True, nogil=True)
def _within_f16(x: np.ndarray) -> bool:
    """Whether every value of `x` (float32, any shape) is finite and within float16's range."""
    flat = x.reshape(-1)
    rows = max(1, flat.size // 65536)
    ok = np.ones(rows, np.bool_)
    for r in numba.prange(rows):
        bad = False
        for i in range(r * flat.size // rows, (r + 1) * flat.size // rows):
            bad |= not abs(flat[i]) <= F16_MAX
        ok[r] = not bad
    return bool(ok.all())


_NOT_F16 = (
    "{} needs finite values within float16's range; store this value with a lossless codec "
    "(raw or zstd)"
)
# What `_channels` finds: a channel (K with RoPE undone) past float16's range, or a value.
_BAD_CHANNEL, _BAD_VALUE = 1, 2


@numba.njit(parallel=True, cache=True, nogil=True)
def _channels(
    x: np.ndarray, cos: np.ndarray, sin: np.ndarray, unscale: np.float32, ch: np.ndarray
) -> int:
    """ch `[layers, tokens, 2, heads, dim]` = the channels the maps read from KV x (float32
    `[layers, 2, tokens, heads, dim]`): K with RoPE undone by the decoders' tables cos / sin
    `[tokens, dim / 2]` (`rope_tables`: the RoPE scale in them, so `unscale` = 1 / scale^2),
    in float32 (the encoder's side: not part of the format), and V. 0, or `_BAD_VALUE` if a
    value of x is not finite within float16's range, else `_BAD_CHANNEL` if a channel is
    not: both checked in the one pass over x."""
    layers, tokens, _, heads, dim = ch.shape
    half = dim // 2
    found = np.zeros(layers * tokens, np.int8)
    for i in numba.prange(layers * tokens):
        ly, t = i // tokens, i % tokens
        co, si = cos[t], sin[t]
        value, channel = False, False
        for h in range(heads):
            k, out = x[ly, 0, t, h], ch[ly, t, 0, h]
            a, b = k[:half], k[half:]
            lo, hi = out[:half], out[half:]
            for d in range(half):
                lo[d] = (a[d] * co[d] + b[d] * si[d]) * unscale
                hi[d] = (b[d] * co[d] - a[d] * si[d]) * unscale
            v, vout = x[ly, 1, t, h], ch[ly, t, 1, h]
            for d in range(dim):
                vout[d] = v[d]
                value |= not (abs(k[d]) <= F16_MAX and abs(v[d]) <= F16_MAX)
                channel |= not abs(out[d]) <= F16_MAX
        found[i] = _BAD_VALUE if value else (_BAD_CHANNEL if channel else 0)
    return int(found.max()) if found.size else 0


@numba.njit(cache=True, nogil=True)
def _code_unit(
    x: np.ndarray,
    acc: np.ndarray,
    out_scale: np.ndarray,
    in_scale: np.ndarray,
    limit: float,
    res: np.ndarray,
    layer: int,
    starts: np.ndarray,
    steps: np.ndarray,
    symbols: np.ndarray,
    counts: np.ndarray,
    marked: np.ndarray,
    xhat: np.ndarray,
    below: np.ndarray,
    j: int,
) -> None:
    """Unit j (K's heads, then V's) of one layer's channels x `[tokens, 2, heads, dim]`
    (float32) against their prediction from the map's product `acc` (as `_decode_unit`
    reads it): the float16 bits of its starts and step (into starts / steps `[layers, 2,
    heads, dim]` at `layer`), its symbols, their counts and the tokens with an escape (at
    the unit's rows), `xhat`: its channels as decoded, and `below`: them as the next
    layer's map reads them. (Rows taken as slices, as in `_decode_unit`.)"""
    tokens, _, heads, dim = x.shape
    kv, h = j // heads, j % heads
    u = (layer * 2 + kv) * heads + h
    at = (kv * heads + h) * dim  # the unit's first channel
    outs = out_scale[at : at + dim]
    ins = in_scale[at : at + dim]
    pred = np.zeros(dim, np.float32)
    # The residuals from the prediction, kept in xhat until they are reconstructed.
    for t in range(tokens):
        _predict_row(acc, outs, at, t, pred)
        r, xt = xhat[t, kv, h], x[t, kv, h]
        for d in range(dim):
            r[d] = xt[d] - pred[d]
    lo = 1 if tokens > 1 else 0  # the first token is stored exactly
    mean = np.zeros(dim, np.float64)
    for t in range(lo, tokens):
        r = xhat[t, kv, h]
        for d in range(dim):
            mean[d] += r[d]
    n = max(tokens - lo, 1)
    for d in range(dim):
        mean[d] /= n
    sq = np.zeros(dim, np.float64)
    for t in range(lo, tokens):
        r = xhat[t, kv, h]
        for d in range(dim):
            e = np.float64(r[d]) - mean[d]
            sq[d] += e * e
    start = np.empty(dim, np.float32)
    spread = np.empty(dim, np.float32)
    rms = np.float32(0.0)
    for d in range(dim):
        spread[d] = np.sqrt(sq[d] / n)
        rms += spread[d] * spread[d]
        bits = f32_to_f16(np.float32(mean[d]), True)
        starts[layer, kv, h, d] = bits
        start[d] = f16_to_f32(bits)
    rms = np.float32(np.sqrt(rms / dim))
    bits = f32_to_f16(rms / res[kv, h], True)
    step = f16_to_f32(bits)
    inv = np.float32(1.0) / step if step > 0 else np.float32(0.0)
    far = np.empty(dim, np.float32)
    for d in range(dim):
        steps[layer, kv, h, d] = bits
        f = np.ceil(OUTLIER_SPREADS * spread[d] * inv)
        far[d] = min(max(f, np.float32(1.0)), np.float32(REACH))
    for t in range(tokens):
        _predict_row(acc, outs, at, t, pred)
        xr, xt, sym = xhat[t, kv, h], x[t, kv, h], symbols[u, t]
        escapes = False
        for d in range(dim):
            base = pred[d] + start[d]
            residual = xt[d] - base
            q = np.rint(residual * inv)
            escape = (abs(q) > far[d]) | ((step == 0) & (residual != 0)) | (t == 0)
            q = min(max(q, -far[d]), far[d])
            sym[d] = 0 if escape else np.uint8(np.int32(q) + CENTER)
            xr[d] = base + q * step  # q * step is exact
            escapes |= escape
        marked[u, t] = escapes
        if escapes:
            for d in range(dim):
                if sym[d] == 0:
                    xr[d] = f16_to_f32(f32_to_f16(xt[d], True))
        nxt = below[t, at : at + dim]
        for d in range(dim):
            nxt[d] = min(max(np.rint(xr[d] * ins[d]), -limit), limit)
    _histogram(symbols, u, tokens, counts)


@numba.njit(parallel=True, cache=True, nogil=True)
def _code_layer(unit_lo: int, unit_hi: int, *args: Any) -> None:
    """`_code_unit(*args, j)` for units j = unit_lo..unit_hi - 1 (K's heads, then V's), in
    parallel."""
    for n_th in numba.prange(unit_hi - unit_lo):
        _code_unit(*args, unit_lo + n_th)  # type: ignore[call-arg]


@numba.njit(cache=True, nogil=True)
def _code_layer_1(unit_lo: int, unit_hi: int, *args: Any) -> None:
    """`_code_layer` on the calling thread alone (numba's thread pool never started)."""
    for j in range(unit_lo, unit_hi):
        _code_unit(*args, j)  # type: ignore[call-arg]


@numba.njit(cache=True, nogil=True)
def _decode_unit(
    symbols: np.ndarray,
    starts: np.ndarray,
    steps: np.ndarray,
    escaped: np.ndarray,
    first: np.ndarray,
    acc: np.ndarray,
    out_scale: np.ndarray,
    in_scale: np.ndarray,
    limit: float,
    layer: int,
    cos: np.ndarray,
    sin: np.ndarray,
    kind: int,
    words: np.ndarray,
    below: np.ndarray,
    j: int,
) -> bool:
    """Unit j (K's heads, then V's) of layer `layer` of the value whose 16-bit words are
    `words` `[layers, 2, tokens, words]` (a `kind` of dtype), from its units' symbols,
    starts `[layers, 2, heads, dim]`, steps `[layers, 2, heads]`, escapes and its map's
    integer product `acc` `[tokens, channels]` (empty for layer 0: no prediction), as
    `_code_unit` made them: the prediction
    float32(acc * out_scale) as `CrossLayer.predict` makes it, K rotated back by cos / sin
    as `_output` does; `below` `[tokens, channels]` = the channels as the next layer's map
    reads them, clip(rint(x * in_scale), +-limit). False if its escapes do not add up.
    (Rows are taken as slices and indexed by loop counters: numba checks `array[t, at + d]`
    for a negative index, and such a loop does not vectorize.)"""
    tokens = below.shape[0]
    heads, dim = steps.shape[2], starts.shape[3]
    ok = True
    kv, h = j // heads, j % heads
    u = (layer * 2 + kv) * heads + h
    at = (kv * heads + h) * dim  # the unit's first channel
    step = steps[layer, kv, h]
    e = first[u]
    start = starts[layer, kv, h]
    outs = out_scale[at : at + dim]
    ins = in_scale[at : at + dim]
    pred = np.zeros(dim, np.float32)
    x = np.empty(dim, np.float32)
    turned = np.empty(dim, np.float32)
    for t in range(tokens):
        _predict_row(acc, outs, at, t, pred)
        sym = symbols[u, t]
        escapes = False
        for d in range(dim):
            s = sym[d]
            x[d] = (pred[d] + start[d]) + (np.float32(s) - np.float32(CENTER)) * step
            escapes |= s == 0
        if escapes:
            for d in range(dim):
                if sym[d] == 0:
                    if e == first[u + 1]:
                        ok = False
                    else:
                        x[d] = escaped[e]
                        e += 1
        nxt = below[t, at : at + dim]
        for d in range(dim):
            nxt[d] = min(max(np.rint(x[d] * ins[d]), -limit), limit)
        if kv == 0:
            _rotate_row(x, cos[t], sin[t], turned)
            _store_at(turned, kind, words, layer, 0, t, h * dim)
        else:
            _store_at(x, kind, words, layer, 1, t, h * dim)
    if e != first[u + 1]:
        ok = False
    return ok


@numba.njit(parallel=True, cache=True, nogil=True)
def _decode_layer(unit_lo: int, unit_hi: int, *args: Any) -> bool:
    """`_decode_unit(*args, j)` for units j = unit_lo..unit_hi - 1 (K's heads, then V's),
    in parallel; False if one's escapes do not add up."""
    ok = np.ones(unit_hi - unit_lo, np.bool_)
    for n_th in numba.prange(unit_hi - unit_lo):
        ok[n_th] = _decode_unit(*args, unit_lo + n_th)  # type: ignore[call-arg]
    return bool(ok.all())


@numba.njit(cache=True, nogil=True)
def _decode_layer_1(unit_lo: int, unit_hi: int, *args: Any) -> bool:
    """`_decode_layer` on the calling thread alone (numba's thread pool never started)."""
    ok = True
    for j in range(unit_lo, unit_hi):
        ok &= _decode_unit(*args, j)  # type: ignore[call-arg]
    return ok


@numba.njit(cache=True, nogil=True, inline="always")
def _rotate_row(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, out: np.ndarray) -> None:
    """out = one head's K channels `x` `[dim]` rotated by a token's cos / sin `[dim / 2]`
    (rotate-half pairs (d, d + dim / 2)), each product and the sum rounded to float32 (no
    fused multiply-add): the same bits wherever it runs."""
    half = cos.size
    for d in range(half):
        a, b = x[d], x[d + half]
        c, s = cos[d], sin[d]
        ac = a * c
        bs = b * s
        bc = b * c
        as_ = a * s
        out[d] = ac - bs
        out[d + half] = bc + as_


@numba.njit(cache=True, nogil=True, inline="always")
def _predict_row(acc: np.ndarray, outs: np.ndarray, at: int, t: int, pred: np.ndarray) -> None:
    """pred `[dim]` = token t's prediction of the unit whose channels start at `at`:
    float32(acc * out_scale) (`CrossLayer.predict`), or left as it is (zeros) for layer 0,
    which has no product."""
    if acc.shape[0]:
        row = acc[t, at : at + pred.size]
        for d in range(pred.size):
            pred[d] = np.float64(row[d]) * outs[d]


@numba.njit(parallel=True, cache=True, nogil=True)
def _output(
    xhat: np.ndarray, cos: np.ndarray, sin: np.ndarray, kind: int, words: np.ndarray
) -> None:
    """words `[layers, 2, tokens, words]` = xhat `[layers, tokens, 2, heads, dim]` with K
    rotated by cos / sin `[tokens, dim / 2]` (`_rotate_row`), then rounded to the dtype:
    the encoder's value, as `_decode_layer` writes the decoder's."""
    layers, tokens, _, heads, dim = xhat.shape
    for i in numba.prange(layers * tokens):
        layer, t = i // tokens, i % tokens
        turned = np.empty(dim, np.float32)
        for h in range(heads):
            _rotate_row(xhat[layer, t, 0, h], cos[t], sin[t], turned)
            _store_at(turned, kind, words, layer, 0, t, h * dim)
            _store_at(xhat[layer, t, 1, h], kind, words, layer, 1, t, h * dim)
