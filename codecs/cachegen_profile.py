"""Per-head sensitivity profiles for `cachegen`: where a model's predictions tolerate error.

How much quantizing one (layer, K/V, head) moves a model's next-token distribution spans a
factor of ~1000 across SmolLM2's 180 heads (`benchmarks/NOTES-codecs.md`), and the effects
add up. A profile gives each head a resolution weight (residual spread over step, relative
to the level's), so that the bits go where the model is sensitive. The weights are read by
the encoder only: the steps they lead to are stored in every container, so a cachegen
decoder never needs the profile (a cachegen-x decoder needs its maps: below).

- `CacheGenProfile`: the weights `[layers, 2, heads]` (K then V), the model they were
  measured on and the texts they were fitted on; `load(path)` / `save(path)` as JSON (no
  pickle), `load` failing with InvalidArgument and a clear message for any bad file.
- `measure(model, texts)`: the per-head diagonal Fisher information of a transformers
  causal LM's continuation log-likelihood with respect to its prefix KV, and the spread of
  the residuals cachegen codes, over token-id sequences; `fit(...)` turns them into a
  profile. With a step Delta_h per head, quantizing costs KL ~ F_h Delta_h^2 / 24 (F_h:
  the head's Fisher information summed over its values) and about N_h log2(spread_h /
  Delta_h) bits; for a fixed KL the fewest bits take Delta_h^2 proportional to N_h / F_h,
  that is a resolution proportional to spread_h * sqrt(F_h / N_h). The weights are those,
  over their geometric mean.

    python -m kvstore.codecs.cachegen_profile --model DIR --text a.txt --text b.txt \\
        --out smollm2.cgprofile.json [--weights-only]
    kvstore-server ... --codec ssd=cachegen:profile=smollm2.cgprofile.json

Fit on text like what the store will hold, and never on the text a benchmark then scores.

A profile fitted from a model (version 2) also carries `CrossLayer`: per layer, an integer
map that predicts the layer's KV (K with RoPE undone, and V) from the layer below it as
decoded, the model's RoPE frequencies, and resolution weights for what that map leaves;
version 3 (the default fit; `--no-kv-maps` for version 2) adds per layer a map that
predicts its V from its own K as decoded too (`CrossLayer.kv_maps`).
`cachegen-x` (`kvstore.codecs.cachegen_cross`) codes with it; its containers name the
map by its content hash (`CrossLayer.digest`), and their decoders need the profile.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash
import zstandard

from kvstore.errors import InvalidArgument

FORMAT = "kvstore-cachegen-profile"
VERSION = 2
VERSIONS = (1, 2, 3)  # 1: weights only; 3: maps with V from its layer's K (`kv_maps`)
# Weights are clipped to this factor either side of their geometric mean: a head measured
# as insensitive still gets a step within reach of its values, and one measured as very
# sensitive does not take the whole budget on the strength of a few fitting prompts.
WEIGHT_RANGE = 8.0
CONTINUATION = 128  # scored tokens after each fitting prefix
# Labels drawn from the model per position (Fisher estimate). On SmolLM2, 12 instead of 4
# moved the log2 weights by 0.17 RMS (correlation 0.99): 4 is enough.
SAMPLES = 4


# Cross-layer maps (`CrossLayer`). Ridge regularization per sample: the map reads the layer
# below as *decoded*, and without an allowance for its quantization noise the fitted map
# amplifies it (on SmolLM2, lambda ~0 made the model's KL 5x worse; 0.02-0.2 x N was flat).
RIDGE = 0.1
# A layer's decoded values enter the map as integers, each channel scaled by a power of two,
# and each map column is an integer scaled by another. Maps are 8-bit (the default) or
# 16-bit (profiles fitted before 8-bit maps came, 2026-11-29); `MAP_FORMATS[bits]` = (the
# fitting texts' largest input magnitude is put in (top / 2, top], larger values clip at
# +-limit; each map column's largest entry is put in (top / 2, top]; entries and inputs
# within +-limit):
# - 8-bit: inputs and map entries within +-127, so a product's sum over up to 8192 input
#   channels stays below 2^31: exact in int32 (torch's `_int_mm`: with AMX or VNNI ~10x a
#   float64 GEMM on one core), in float64 (the GPU), and in float32 while no column's
#   absolute sum times 127 passes 2^24 (SmolLM2's: a tenth of that), which is the fastest
#   way on CPUs without those instructions (`_int8_way`).
#   On SmolLM2 the K and V errors are within 0.2% of the 16-bit maps' at the same size.
# - 16-bit: sums below 2^15 * 2^15 * 2^13 = 2^43, exact in float64.
# Either way every decoder (any CPU, a GPU) predicts the same bits whatever the order or
# fusing of a GEMM's additions.
MAP_FORMATS: dict[int, tuple[int, int, int]] = {8: (64, 127, 127), 16: (1 << 12, 1 << 14, 32767)}
MAP_BITS = 8
_MAP_DTYPES: dict[int, np.dtype[Any]] = {8: np.dtype(np.int8), 16: np.dtype(np.int16)}
MAX_CHANNELS = 8192
CROSS_CHUNK = 256  # tokens per chunk when fitting the residual spreads (the store's chunk)


class _PerHead:
    """`layers` and `heads` of a class whose `weights` are `[layers, 2, heads]`."""

    weights: np.ndarray

    @property
    def layers(self) -> int:
        return int(self.weights.shape[0])

    @property
    def heads(self) -> int:
        return int(self.weights.shape[2])


@dataclass(frozen=True)
class CrossLayer(_PerHead):
    """What `cachegen-x` needs besides the steps in its payloads: per layer l >= 1 an
    integer map predicting layer l's channels from layer l-1's, the RoPE that K's channels
    are taken out of, and the resolution weights of what the maps leave.

    Channels of a layer, `2 * heads * head_dim` of them: K with RoPE undone, then V, each
    `[heads, head_dim]`. Layer l's prediction from layer l-1's decoded channels x (float32):
    `xi = clip(rint(x * 2^in_exp[l-1]), +-limit)`, `acc = xi @ maps[l-1]` (integers, exact),
    `pred = float32(acc * 2^-out_exp[l-1])` (`predict`); limit = `input_limit`, 127 for
    8-bit maps and 32767 for 16-bit ones (`MAP_FORMATS`)."""

    inv_freq: np.ndarray
    """float64 `[head_dim // 2]`: RoPE's angle per position of each rotated pair (the model's
    `rotary_emb.inv_freq`; pairs are (d, d + head_dim / 2), the rotate-half layout)."""
    rope_scale: float
    """RoPE's cos and sin are multiplied by this (transformers' `attention_scaling`; 1.0 for
    plain RoPE)."""
    in_exp: np.ndarray
    """int16 `[layers - 1, channels]`: the input scale exponents of each map."""
    maps: np.ndarray
    """int16 `[layers - 1, channels, channels]`: (input channel, output channel)."""
    out_exp: np.ndarray
    """int16 `[layers - 1, channels]`: the output scale exponents."""
    weights: np.ndarray
    """float32 `[layers, 2, heads]`: resolution weights for the cross-layer residuals (layer
    0: its chunk's channel mean), as `CacheGenProfile.weights` are for cachegen's."""
    map_bits: int = 16
    """8 or 16: the maps' and inputs' integer width (`MAP_FORMATS`)."""
    kv_maps: np.ndarray | None = None
    """8-bit maps only, optional: int8 `[layers, heads * head_dim, heads * head_dim]`, (K
    channel, V channel): layer l's V is also predicted from its own K as decoded (K and V are
    projections of the same hidden state: on SmolLM2 this leaves ~0.3 bits less to code a V
    value), entering as `below` holds it for the next layer (scaled by in_exp[min(l, layers
    - 2)]'s K part, clipped); its products add to the map's (layer 0: to nothing, V's
    prediction is then this alone), scaled by out_exp[l - 1]'s V part (layer 0: `kv_out_exp`).
    Decoders then reconstruct a layer's K units before its V units."""
    kv_out_exp: np.ndarray | None = None
    """int16 `[heads * head_dim]` with `kv_maps`: layer 0's V output scale exponents."""
    _maps64: np.ndarray = field(init=False, repr=False, compare=False)  # 16-bit maps
    _maps8: torch.Tensor = field(init=False, repr=False, compare=False)  # 8-bit maps
    _f32_exact: np.ndarray = field(init=False, repr=False, compare=False)  # 8-bit: per map
    _maps32: dict[int, torch.Tensor] = field(init=False, repr=False, compare=False)
    _in_scale: np.ndarray = field(init=False, repr=False, compare=False)
    _out_scale: np.ndarray = field(init=False, repr=False, compare=False)
    # With kv maps: as torch int8, whether float32 sums each exactly, their float32 copies
    # once used, and layer 0's V output scales as a row of channels (`v_out_scale`).
    _kv8: torch.Tensor = field(init=False, repr=False, compare=False)
    _kv_f32_exact: np.ndarray = field(init=False, repr=False, compare=False)
    _kv32: dict[int, torch.Tensor] = field(init=False, repr=False, compare=False)
    _v_out0: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        w = np.asarray(self.weights, np.float32)
        if w.ndim != 3 or w.shape[1] != 2 or w.shape[0] < 2 or 0 in w.shape:
            raise InvalidArgument(
                f"cross-layer weights must be [layers >= 2, 2, heads], got {w.shape}"
            )
        if not (np.isfinite(w).all() and (w > 0).all()):
            raise InvalidArgument("cross-layer weights must be finite and positive")
        layers, _, heads = w.shape
        inv = np.asarray(self.inv_freq, np.float64).reshape(-1)
        dim = 2 * inv.size
        if inv.size == 0 or not np.isfinite(inv).all():
            raise InvalidArgument("cross-layer inv_freq must be finite and not empty")
        if not (math.isfinite(self.rope_scale) and self.rope_scale > 0):
            raise InvalidArgument(f"cross-layer rope_scale must be positive, got {self.rope_scale}")
        ch = 2 * heads * dim
        if self.map_bits not in MAP_FORMATS:
            raise InvalidArgument(f"cross-layer maps are 8- or 16-bit, not {self.map_bits}")
        limit = MAP_FORMATS[self.map_bits][2]
        if ch > MAX_CHANNELS:
            raise InvalidArgument(
                f"cross-layer maps take at most {MAX_CHANNELS} channels, not {ch}"
            )
        for name, shape in (
            ("in_exp", (layers - 1, ch)),
            ("maps", (layers - 1, ch, ch)),
            ("out_exp", (layers - 1, ch)),
        ):
            a = np.asarray(getattr(self, name))
            if a.shape != shape:
                raise InvalidArgument(
                    f"cross-layer {name} must be {list(shape)}, got {list(a.shape)}"
                )
            if name == "maps" and (np.abs(a.astype(np.int64)) > limit).any():
                raise InvalidArgument(
                    f"cross-layer {self.map_bits}-bit maps must be within +-{limit}"
                )
            if name != "maps" and (np.abs(a.astype(np.int64)) > 60).any():
                raise InvalidArgument(f"cross-layer {name} must be within +-60")
            a = np.ascontiguousarray(a, _MAP_DTYPES[self.map_bits] if name == "maps" else np.int16)
            if not a.flags.writeable:  # torch shares the map's memory (and never writes it)
                a = a.copy()
            object.__setattr__(self, name, a)
        self._check_kv(layers, ch // 2)
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "inv_freq", inv)
        object.__setattr__(self, "rope_scale", float(self.rope_scale))
        # The map as float64 (16-bit; an 8-bit one as a torch int8 tensor) and the scales as
        # factors, once: what `predict` multiplies.
        if self.map_bits == 8:
            object.__setattr__(self, "_maps8", torch.from_numpy(self.maps))
            # Per map: whether float32 sums its products exactly (every partial sum of a
            # column within 2^24, whatever the order), and its float32 copy once used.
            bound = np.abs(self.maps.astype(np.int32)).sum(axis=1).max(axis=1) * limit
            object.__setattr__(self, "_f32_exact", bound <= 1 << 24)
            object.__setattr__(self, "_maps32", {})
        else:
            object.__setattr__(self, "_maps64", self.maps.astype(np.float64))
        object.__setattr__(self, "_in_scale", np.ldexp(np.float32(1), self.in_exp.astype(np.int32)))
        object.__setattr__(self, "_out_scale", np.ldexp(1.0, -self.out_exp.astype(np.int32)))
        if self.kv_maps is not None:
            object.__setattr__(self, "_kv8", torch.from_numpy(self.kv_maps))
            kv_bound = np.abs(self.kv_maps.astype(np.int32)).sum(axis=1).max(axis=1) * limit
            object.__setattr__(self, "_kv_f32_exact", kv_bound <= 1 << 24)
            object.__setattr__(self, "_kv32", {})
            assert self.kv_out_exp is not None
            row = np.zeros(ch, np.float64)  # layer 0: K has no product (its chunk's mean)
            row[ch // 2 :] = np.ldexp(1.0, -self.kv_out_exp.astype(np.int32))
            object.__setattr__(self, "_v_out0", row)

    def _check_kv(self, layers: int, half: int) -> None:
        """Validate and normalize `kv_maps` / `kv_out_exp` (both or neither; 8-bit maps)."""
        if (self.kv_maps is None) != (self.kv_out_exp is None):
            raise InvalidArgument("cross-layer kv_maps and kv_out_exp come together")
        if self.kv_maps is None:
            return
        if self.map_bits != 8:
            raise InvalidArgument("cross-layer kv_maps need 8-bit maps")
        m = np.asarray(self.kv_maps)
        if m.shape != (layers, half, half):
            raise InvalidArgument(
                f"cross-layer kv_maps must be {[layers, half, half]}, got {list(m.shape)}"
            )
        if (np.abs(m.astype(np.int64)) > 127).any():
            raise InvalidArgument("cross-layer kv_maps must be within +-127")
        e = np.asarray(self.kv_out_exp)
        if e.shape != (half,) or (np.abs(e.astype(np.int64)) > 60).any():
            raise InvalidArgument(f"cross-layer kv_out_exp must be [{half}] within +-60")
        m = np.ascontiguousarray(m, np.int8)
        object.__setattr__(self, "kv_maps", m if m.flags.writeable else m.copy())
        object.__setattr__(self, "kv_out_exp", np.ascontiguousarray(e, np.int16))

    @property
    def input_limit(self) -> int:
        """The largest magnitude of a map's integer input (larger ones clip)."""
        return MAP_FORMATS[self.map_bits][2]

    @property
    def head_dim(self) -> int:
        return 2 * int(self.inv_freq.size)

    @property
    def channels(self) -> int:
        return 2 * self.heads * self.head_dim

    @property
    def digest(self) -> str:
        """16 hex digits of xxh3-64 over everything a decoder uses (not the weights): what
        a container names its map by. Computed once (it hashes megabytes)."""
        got = self.__dict__.get("_digest")
        if got is None:
            got = self.__dict__["_digest"] = self._hash()
        return str(got)

    def _hash(self) -> str:
        h = xxhash.xxh3_64()
        h.update(np.array([self.layers, self.heads, self.head_dim], "<i8").tobytes())
        h.update(self.inv_freq.astype("<f8").tobytes())
        h.update(np.array([self.rope_scale], "<f8").tobytes())
        if self.map_bits != 16:  # 16-bit maps hash as they did before 8-bit ones came
            h.update(np.array([self.map_bits], "<i8").tobytes())
        for a in (self.in_exp, self.maps, self.out_exp):
            h.update(a.astype("<i2").tobytes())
        if self.kv_maps is not None and self.kv_out_exp is not None:
            h.update(b"kv_maps")
            h.update(self.kv_maps.tobytes())
            h.update(self.kv_out_exp.astype("<i2").tobytes())
        return h.hexdigest()

    @property
    def in_scale(self) -> np.ndarray:
        """float32 `[layers - 1, channels]`: 2^in_exp, what layer l's decoded channels are
        multiplied by (then rounded and clipped) to enter layer l + 1's map."""
        return self._in_scale

    @property
    def out_scale(self) -> np.ndarray:
        """float64 `[layers - 1, channels]`: 2^-out_exp, what map l - 1's integer product
        is multiplied by (then rounded to float32) to predict layer l."""
        return self._out_scale

    @property
    def input_dtype(self) -> np.dtype:
        """What `product` takes its integer inputs as: int8 (8-bit maps) or float64."""
        return np.dtype(np.int8) if self.map_bits == 8 else np.dtype(np.float64)

    def product(self, xi: np.ndarray, layer: int) -> np.ndarray:
        """The exact integer product `[tokens, channels]` of inputs `xi` (integers within
        +-`input_limit`, `[tokens, channels]`) and layer `layer`'s (>= 1) map: int32 for
        8-bit maps, float64 for 16-bit ones."""
        m = layer - 1
        if self.map_bits == 8:
            return _product8(xi, self._maps8[m], bool(self._f32_exact[m]), self._maps32, m)
        return np.asarray(xi, np.float64) @ self._maps64[m]  # integers below 2^53: exact

    @property
    def has_kv(self) -> bool:
        """Whether V is also predicted from its layer's K (`kv_maps`)."""
        return self.kv_maps is not None

    def kv_product(self, ki: np.ndarray, layer: int) -> np.ndarray:
        """int32 `[tokens, heads * head_dim]`: layer `layer`'s K as `below` holds it (its K
        part, integers within +-127) times `kv_maps[layer]`, exact (as `product`)."""
        if self.kv_maps is None:
            raise InvalidArgument("these cross-layer maps have no kv_maps")
        exact = bool(self._kv_f32_exact[layer])
        return _product8(ki, self._kv8[layer], exact, self._kv32, layer)

    def v_out_scale(self, layer: int) -> np.ndarray:
        """float64 `[channels]`: what a product's columns are scaled by to predict layer
        `layer`'s V with `kv_maps` (its K part: as `out_scale`'s; layer 0: unused)."""
        return self._out_scale[layer - 1] if layer else self._v_out0

    def input_scale(self, layer: int) -> np.ndarray:
        """float32 `[channels]`: what layer `layer`'s decoded channels are scaled by as the
        next map's inputs (`input_row`)."""
        return self._in_scale[input_row(layer, self.layers)]

    def inputs(self, x: np.ndarray, layer: int) -> np.ndarray:
        """Layer `layer`'s decoded channels `x` (float32 `[tokens, channels]`, or its K part)
        as the next map (and `kv_maps`) read them: clip(rint(x * 2^in_exp), +-limit), the
        last layer scaled as the one before it."""
        xi = np.rint(x * self.input_scale(layer)[: x.shape[-1]])  # a power of two: exact
        return np.clip(xi, -self.input_limit, self.input_limit, out=xi)

    def predict(self, below: np.ndarray, layer: int, out: np.ndarray | None = None) -> np.ndarray:
        """Layer `layer`'s (>= 1) prediction, float32 `[tokens, channels]`, from layer - 1's
        decoded channels `below` (float32 `[tokens, channels]`), the same bits on any
        machine (see the class)."""
        acc = self.product(self.inputs(below, layer - 1), layer).astype(np.float64)
        acc *= self._out_scale[layer - 1]
        if out is None:
            return acc.astype(np.float32)
        out[...] = acc
        return out

    def predict_v(self, below: np.ndarray | None, k: np.ndarray, layer: int) -> np.ndarray:
        """With `kv_maps`: layer `layer`'s V prediction, float32 `[tokens, heads *
        head_dim]`, from layer - 1's decoded channels `below` (None for layer 0) and this
        layer's decoded K channels `k` (float32 `[tokens, heads * head_dim]`)."""
        half = self.channels // 2
        acc = self.kv_product(self.inputs(k, layer), layer).astype(np.int64)
        if layer:
            if below is None:
                raise InvalidArgument(f"layer {layer}'s V prediction needs the layer below")
            acc += self.product(self.inputs(below, layer - 1), layer)[:, half:]
        return (acc * self.v_out_scale(layer)[half:]).astype(np.float32)

    def float_map(self, layer: int) -> np.ndarray:
        """float32 `[channels, channels]`: layer `layer`'s map (>= 1) with its scales folded
        in, for estimates that need not be exact (`predict` is)."""
        cache = self.__dict__.setdefault("_float_maps", {})
        if layer not in cache:
            m = layer - 1
            scaled = self.maps[m].astype(np.float64) * self._in_scale[m].astype(np.float64)[:, None]
            cache[layer] = (scaled * self._out_scale[m][None, :]).astype(np.float32)
        return cache[layer]

    def to_doc(self) -> dict[str, Any]:
        packed = zstandard.ZstdCompressor(level=10).compress(
            self.maps.astype(_MAP_DTYPES[self.map_bits].newbyteorder("<")).tobytes()
        )
        doc: dict[str, Any] = {
            "map_bits": self.map_bits,
            "inv_freq": [float(f) for f in self.inv_freq],  # repr round-trips float64
            "rope_scale": self.rope_scale,
            "in_exp": self.in_exp.tolist(),
            "out_exp": self.out_exp.tolist(),
            "maps_zstd_base64": base64.b64encode(packed).decode("ascii"),
            "weights": np.round(self.weights.astype(np.float64), 5).tolist(),
            "digest": self.digest,
        }
        if self.kv_maps is not None and self.kv_out_exp is not None:
            kv = zstandard.ZstdCompressor(level=10).compress(self.kv_maps.tobytes())
            doc["kv_maps_zstd_base64"] = base64.b64encode(kv).decode("ascii")
            doc["kv_out_exp"] = self.kv_out_exp.tolist()
        return doc

    @classmethod
    def from_doc(cls, doc: Any, layers: int, heads: int) -> CrossLayer:
        if not isinstance(doc, dict):
            raise InvalidArgument("cross must be an object")
        try:
            inv = np.array(doc["inv_freq"], np.float64)
            ch = 2 * heads * 2 * inv.size
            bits = doc.get("map_bits", 16)  # absent in profiles fitted before 8-bit maps
            if bits not in _MAP_DTYPES:
                raise ValueError(f"map_bits must be 8 or 16, not {bits!r}")
            dtype = _MAP_DTYPES[bits].newbyteorder("<")
            raw = zstandard.ZstdDecompressor().decompress(
                base64.b64decode(doc["maps_zstd_base64"], validate=True),
                max_output_size=dtype.itemsize * (layers - 1) * ch * ch,
            )
            maps = np.frombuffer(raw, dtype).reshape(layers - 1, ch, ch)
            kv_maps = kv_out_exp = None
            if "kv_maps_zstd_base64" in doc:  # version 3
                kv_raw = zstandard.ZstdDecompressor().decompress(
                    base64.b64decode(doc["kv_maps_zstd_base64"], validate=True),
                    max_output_size=layers * (ch // 2) ** 2,
                )
                kv_maps = np.frombuffer(kv_raw, np.int8).reshape(layers, ch // 2, ch // 2)
                kv_out_exp = np.array(doc["kv_out_exp"], np.int64)
            cross = cls(
                inv,
                float(doc["rope_scale"]),
                np.array(doc["in_exp"], np.int64),
                maps,
                np.array(doc["out_exp"], np.int64),
                np.array(doc["weights"], np.float64),
                bits,
                kv_maps,
                kv_out_exp,
            )
        except (KeyError, TypeError, ValueError, zstandard.ZstdError) as exc:
            raise InvalidArgument(f"cross-layer part malformed: {exc}") from None
        if cross.weights.shape != (layers, 2, heads):
            raise InvalidArgument(f"cross-layer weights of shape {cross.weights.shape}")
        if doc.get("digest") != cross.digest:
            raise InvalidArgument("cross-layer maps do not match their digest (damaged file)")
        return cross


_INT_MM = getattr(torch, "_int_mm", None)
# How this process sums 8-bit maps' products on the host: "int_mm" (torch's `_int_mm`),
# "float32" (a GEMM, for maps where it is exact; float64 for others) or "float64".
# `_int_mm` is ~5x a float32 GEMM on a core with AMX or VNNI, and 30-60x slower than one
# on a core without (oneDNN's reference loop: on an AVX2 EPYC VM a chunk layer's 256x384x384
# product took 29 ms, float32 0.8), so the first product times them (`_int8_way`). None:
# not chosen yet.
_WAY: str | None = None
_WAY_SHAPE = (64, 256, 256)  # a few ms for the slowest way


def input_row(layer: int, layers: int) -> int:
    """The row of a model of `layers` layers' input scales (`in_exp`) that scales layer
    `layer`'s decoded channels as the next map's inputs: its own; the last layer's (which
    no map reads, but kv maps read its K) the one before's."""
    return min(layer, layers - 2)


def _product8(
    xi: np.ndarray, w8: torch.Tensor, f32_exact: bool, cache: dict[int, torch.Tensor], key: int
) -> np.ndarray:
    """int32 `xi @ w8`, exact, this process's fastest way (`_int8_way`): `xi` integers
    within +-127, `w8` an 8-bit map (int8 tensor); float32 only where `f32_exact` (every
    partial sum of a column within 2^24), with the map's float32 copy kept in `cache[key]`."""
    x8 = torch.from_numpy(np.ascontiguousarray(xi, np.int8))
    way = _int8_way()
    if way == "int_mm":
        return _INT_MM(x8, w8).numpy()  # type: ignore[misc]
    if way == "float32" and f32_exact:
        w32 = cache.get(key)
        if w32 is None:  # a race makes it twice: the same values
            w32 = cache[key] = w8.float()
        return torch.mm(x8.float(), w32).to(torch.int32).numpy()
    return torch.mm(x8.double(), w8.double()).to(torch.int32).numpy()


def _int8_way() -> str:
    """This process's way of summing 8-bit products, chosen on first use (two threads
    that find it unchosen both time the ways, and keep the same or an equally exact one)."""
    global _WAY
    if _WAY is None:
        _WAY = _fastest_int8_way()
    return _WAY


def _fastest_int8_way() -> str:
    """The fastest of the ways that are exact here, each timed on one product of
    `_WAY_SHAPE` (best of three, after a first call that is checked): `_int_mm` can be
    missing or refuse this CPU, and a torch set to reduced-precision float32 matmuls
    (`torch.backends.*.fp32_precision`) is not exact in float32."""
    m, k, n = _WAY_SHAPE
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(-127, 128, (m, k), dtype=np.int8))
    w = torch.from_numpy(rng.integers(-127, 128, (k, n), dtype=np.int8))
    want = x.long() @ w.long()
    w32, w64 = w.float(), w.double()
    ways: dict[str, Callable[[], torch.Tensor]] = {
        "float32": lambda: torch.mm(x.float(), w32).to(torch.int32),
        "float64": lambda: torch.mm(x.double(), w64).to(torch.int32),
    }
    if _INT_MM is not None:
        ways["int_mm"] = lambda: _INT_MM(x, w)  # type: ignore[misc]
    exact = {}
    for way, fn in ways.items():
        try:
            if torch.equal(fn().long(), want):
                exact[way] = fn
        except (RuntimeError, NotImplementedError):  # a torch without it for this CPU
            pass
    if not exact:  # float64 sums integers below 2^53 exactly: this is not a CPU torch runs on
        raise RuntimeError("no exact integer GEMM on this host (float64 GEMM inexact)")
    return min(exact, key=lambda way: _best_of(exact[way]))


def _best_of(fn: Callable[[], object], runs: int = 3) -> float:
    best = math.inf
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


_registry: dict[str, CrossLayer] = {}
_registry_lock = threading.Lock()


def register_cross(cross: CrossLayer) -> str:
    """Make `cachegen-x` containers naming `cross`'s digest decodable in this process (a
    codec spec naming its profile does this); the digest."""
    with _registry_lock:
        _registry[cross.digest] = cross
    return cross.digest


def registered_cross(digest: str) -> CrossLayer | None:
    """The maps of that digest loaded in this process, if any."""
    with _registry_lock:
        return _registry.get(digest)


MAPS_DIGEST = re.compile(r"[0-9a-f]{16}")


def maps_document(cross: CrossLayer) -> bytes:
    """`cross` as the JSON document a server's Maps RPC sends to clients that decode
    cachegen-x containers themselves (its shape and `CrossLayer.to_doc`); made once."""
    got = cross.__dict__.get("_document")
    if got is None:
        doc = {"layers": cross.layers, "heads": cross.heads, "cross": cross.to_doc()}
        got = cross.__dict__["_document"] = json.dumps(doc).encode()
    return bytes(got)


def maps_from_document(data: bytes, digest: str) -> CrossLayer:
    """The maps in a `maps_document`, which must be those named `digest` (InvalidArgument
    otherwise: damaged, or other maps)."""
    try:
        doc = json.loads(data)
        cross = CrossLayer.from_doc(doc["cross"], int(doc["layers"]), int(doc["heads"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument(f"cross-layer maps document malformed: {exc}") from None
    if cross.digest != digest:
        raise InvalidArgument(f"cross-layer maps {cross.digest} sent for {digest}")
    return cross


def rope_angles(inv_freq: np.ndarray, position: int, tokens: int) -> np.ndarray:
    """float64 `[tokens, head_dim // 2]`: the angles of positions position.. at each pair."""
    pos = np.arange(position, position + tokens, dtype=np.float64)
    return pos[:, None] * inv_freq[None, :]


def undo_rope(k: np.ndarray, inv_freq: np.ndarray, scale: float, position: int) -> np.ndarray:
    """K `[tokens, heads, head_dim]` after RoPE at positions position.. -> before (float64)."""
    ang = rope_angles(inv_freq, position, k.shape[0])[:, None, :]
    c, s = np.cos(ang), np.sin(ang)
    half = k.shape[-1] // 2
    x1, x2 = k[..., :half].astype(np.float64), k[..., half:].astype(np.float64)
    return np.concatenate([x1 * c + x2 * s, x2 * c - x1 * s], -1) / scale


def channels_of(kv: np.ndarray, inv_freq: np.ndarray, scale: float, position: int) -> np.ndarray:
    """float64 `[layers, tokens, 2 * heads * head_dim]`: each layer's channels as the maps
    read them (K with RoPE undone, then V) from KV `[layers, 2, tokens, heads, head_dim]`
    whose first token is at `position`."""
    layers, _, tokens = kv.shape[:3]
    out = np.empty((layers, tokens, 2, *kv.shape[3:]), np.float64)
    for layer in range(layers):
        out[layer, :, 0] = undo_rope(kv[layer, 0], inv_freq, scale, position)
        out[layer, :, 1] = kv[layer, 1]
    return out.reshape(layers, tokens, 2 * kv.shape[3] * kv.shape[4])


def _exponents(top: np.ndarray, target: int) -> np.ndarray:
    """Per entry, the power-of-two exponent that puts `top` (> 0; else 0) in
    (target / 2, target]: floor(log2(target / top)), clipped to +-40."""
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(target / np.maximum(top, 1e-30)))
    e[top <= 0] = 0
    return np.clip(e, -40, 40).astype(np.int16)


def fit_cross(
    kvs: Sequence[np.ndarray],
    inv_freq: np.ndarray,
    rope_scale: float,
    fisher: np.ndarray,
    values: np.ndarray,
    ridge: float = RIDGE,
    chunk: int = CROSS_CHUNK,
    bits: int = MAP_BITS,
    kv: bool = True,
) -> CrossLayer:
    """A `CrossLayer` from fitting KV `kvs` (each `[layers, 2, tokens, heads, head_dim]`,
    positions from 0) and the heads' Fisher information and value counts (`measure`):
    ridge maps with lambda = `ridge` x the sample count, quantized to integers, and weights
    from the spreads of what they leave on `chunk`-token chunks (open loop, each chunk's
    mean removed, its first token left out: the codec stores it exactly); `bits`-bit maps
    (`MAP_FORMATS`). With `kv` (8-bit maps), V is fitted from the layer below and its own
    layer's K together (`CrossLayer.kv_maps`; layer 0's V from its K alone, each chunk's
    mean removed, as the codec removes it)."""
    if kv and bits != 8:
        raise InvalidArgument("kv maps need 8-bit maps")
    input_top, map_top, limit = MAP_FORMATS[bits]
    xs = [channels_of(np.asarray(kv, np.float64), inv_freq, rope_scale, 0) for kv in kvs]
    layers, _, ch = xs[0].shape
    heads, dim = kvs[0].shape[3], kvs[0].shape[4]
    if layers < 2:
        raise InvalidArgument("cross-layer maps need a model of two layers or more")
    half = ch // 2
    in_exp = np.empty((layers - 1, ch), np.int16)
    out_exp = np.empty((layers - 1, ch), np.int16)
    maps = np.empty((layers - 1, ch, ch), _MAP_DTYPES[bits])
    for layer in range(1, layers):
        in_exp[layer - 1] = _exponents(
            np.abs(np.concatenate([c[layer - 1] for c in xs])).max(0), input_top
        )

    def quantized(m: np.ndarray, ie: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # A map for inputs scaled by 2^ie: its integer entries and output exponents.
        scaled = m * np.ldexp(1.0, -ie.astype(np.int32))[:, None]
        oe = _exponents(np.abs(scaled).max(axis=0), map_top)
        q = np.rint(scaled * np.ldexp(1.0, oe.astype(np.int32))[None, :])
        return np.clip(q, -limit, limit), oe

    def k_in(layer: int, c: np.ndarray) -> np.ndarray:
        # Layer `layer`'s K as kv_maps read it (as decoders hold it: scaled, clipped).
        scale = np.ldexp(1.0, in_exp[input_row(layer, layers), :half].astype(np.int32))
        return np.clip(np.rint(c[layer][:, :half] * scale), -limit, limit) / scale

    def centered(a: np.ndarray) -> np.ndarray:
        # Each `chunk`-token chunk of a sequence's rows around its mean.
        return np.concatenate(
            [a[s : s + chunk] - a[s : s + chunk].mean(0) for s in range(0, len(a), chunk)]
        )

    def ridge_fit(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.linalg.solve(x.T @ x + ridge * len(x) * np.eye(x.shape[1]), x.T @ y)

    kv_maps = np.zeros((layers, half, half), np.int8) if kv else None
    kv_out_exp = None
    for layer in range(1, layers):
        x = np.concatenate([c[layer - 1] for c in xs])
        y = np.concatenate([c[layer] for c in xs])
        q, oe = quantized(ridge_fit(x, y), in_exp[layer - 1])
        maps[layer - 1], out_exp[layer - 1] = q, oe
        if kv_maps is not None:  # V's columns again, from the layer below and this K
            k = np.concatenate([k_in(layer, c) for c in xs])
            ie = np.concatenate([in_exp[layer - 1], in_exp[input_row(layer, layers), :half]])
            q, oe = quantized(ridge_fit(np.concatenate([x, k], 1), y[:, half:]), ie)
            maps[layer - 1][:, half:], out_exp[layer - 1][half:] = q[:ch], oe
            kv_maps[layer] = q[ch:]
    if kv_maps is not None:  # layer 0's V from its K, around each chunk's mean
        k = np.concatenate([centered(k_in(0, c)) for c in xs])
        v = np.concatenate([centered(c[0][:, half:]) for c in xs])
        kv_maps[0], kv_out_exp = quantized(ridge_fit(k, v), in_exp[0, :half])
    ones = np.ones((layers, 2, heads), np.float32)
    provisional = CrossLayer(
        inv_freq, rope_scale, in_exp, maps, out_exp, ones, bits, kv_maps, kv_out_exp
    )
    sq = np.zeros((layers, 2, heads))
    n = 0
    for c in xs:
        tokens = c.shape[1]
        for layer in range(layers):
            below = c[layer - 1].astype(np.float32) if layer else None
            pred = np.zeros((tokens, ch), np.float32)
            if below is not None:
                pred = provisional.predict(below, layer)
            if provisional.has_kv:
                k = c[layer][:, :half].astype(np.float32)
                pred[:, half:] = provisional.predict_v(below, k, layer)
            r = (c[layer] - pred).reshape(tokens, 2, heads, dim)
            for a in range(0, tokens, chunk):
                part = r[a + 1 : a + chunk]
                if len(part):
                    part = part - part.mean(axis=0)
                    sq[layer] += (part**2).sum(axis=(0, 3))
        n += sum(max(min(chunk, c.shape[1] - a) - 1, 0) for a in range(0, c.shape[1], chunk))
    spread = np.sqrt(sq / max(n * dim, 1))
    weights = weights_from(fisher, spread, values)
    return CrossLayer(
        inv_freq, rope_scale, in_exp, maps, out_exp, weights, bits, kv_maps, kv_out_exp
    )


@dataclass(frozen=True)
class CacheGenProfile(_PerHead):
    """Resolution weights per (layer, K/V, head) for one model."""

    weights: np.ndarray
    """float32 `[layers, 2, heads]`: multiplies the level's resolution (spread over step)."""
    model: str = ""
    """The model measured (a name or path; informational)."""
    fitted_on: tuple[str, ...] = field(default_factory=tuple)
    """The texts the weights were fitted on (names; informational)."""
    cross: CrossLayer | None = None
    """The cross-layer maps `cachegen-x` codes with (version 2 profiles fitted from a model)."""

    def __post_init__(self) -> None:
        w = np.asarray(self.weights)
        if w.ndim != 3 or w.shape[1] != 2 or 0 in w.shape:
            raise InvalidArgument(
                f"cachegen profile weights must be [layers, 2, heads], got shape {w.shape}"
            )
        if not (np.isfinite(w).all() and (w > 0).all()):
            raise InvalidArgument("cachegen profile weights must be finite and positive")
        object.__setattr__(self, "weights", w.astype(np.float32))
        if self.cross is not None and (self.cross.layers, self.cross.heads) != w.shape[::2]:
            raise InvalidArgument(
                f"cross-layer part for {self.cross.layers} layers x {self.cross.heads} heads "
                f"in a profile of {w.shape[0]} x {w.shape[2]}"
            )

    def to_json(self) -> str:
        doc = {
            "format": FORMAT,
            "version": 1 if self.cross is None else 3 if self.cross.has_kv else VERSION,
            "model": self.model,
            "fitted_on": list(self.fitted_on),
            "layers": self.layers,
            "heads": self.heads,
            "weights": np.round(self.weights.astype(np.float64), 5).tolist(),
        }
        if self.cross is not None:
            doc["cross"] = self.cross.to_doc()
        return json.dumps(doc, indent=1)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> CacheGenProfile:
        """The profile in the JSON file `path`; InvalidArgument naming the file and the
        problem for a missing, unreadable or malformed one."""
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidArgument(f"cannot read cachegen profile {path}: {exc}") from None
        try:
            return cls._from_doc(doc)
        except InvalidArgument as exc:
            raise InvalidArgument(f"bad cachegen profile {path}: {exc}") from None

    @classmethod
    def _from_doc(cls, doc: Any) -> CacheGenProfile:
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise InvalidArgument(f"not a {FORMAT} file")
        if doc.get("version") not in VERSIONS:
            raise InvalidArgument(
                f"version {doc.get('version')!r}; this build reads {', '.join(map(str, VERSIONS))}"
            )
        try:
            weights = np.array(doc["weights"], dtype=np.float64)
        except (KeyError, TypeError, ValueError):
            raise InvalidArgument(
                "weights missing or not a [layers][2][heads] number array"
            ) from None
        if weights.shape != (doc.get("layers"), 2, doc.get("heads")):
            raise InvalidArgument(
                f"weights of shape {weights.shape} for layers={doc.get('layers')!r}, "
                f"heads={doc.get('heads')!r}"
            )
        fitted = doc.get("fitted_on", [])
        if not isinstance(fitted, list) or not all(isinstance(s, str) for s in fitted):
            raise InvalidArgument("fitted_on must be a list of names")
        cross = None
        if doc.get("version") in (2, 3) and doc.get("cross") is not None:
            layers, _, heads = np.shape(weights)
            cross = CrossLayer.from_doc(doc["cross"], layers, heads)
        return cls(weights, str(doc.get("model", "")), tuple(fitted), cross)

    def check_shape(self, layers: int, heads: int) -> None:
        """InvalidArgument unless the profile is for KV of `layers` layers, `heads` heads."""
        if (layers, heads) != (self.layers, self.heads):
            raise InvalidArgument(
                f"cachegen profile for {self.layers} layers x {self.heads} KV heads "
                f"({self.model or 'unnamed model'}) cannot code KV of {layers} x {heads}"
            )


def weights_from(fisher: np.ndarray, spread: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Resolution weights `[layers, 2, heads]` from each head's summed Fisher information,
    its residuals' spread (RMS) and its value count: spread * sqrt(fisher / values), over
    their geometric mean, clipped to `WEIGHT_RANGE` either side of it."""
    raw = spread * np.sqrt(np.maximum(fisher, 0) / np.maximum(values, 1))
    floor = raw[raw > 0].min() if (raw > 0).any() else 1.0
    raw = np.maximum(raw, floor)
    w = raw / math.exp(float(np.log(raw).mean()))
    return np.clip(w, 1 / WEIGHT_RANGE, WEIGHT_RANGE).astype(np.float32)


def residual_spread(kv: np.ndarray) -> np.ndarray:
    """`[layers, 2, heads]` RMS over each head's channels of the residuals cachegen codes
    (K: differences along the tokens; V: around the channel mean) of kv
    `[layers, 2, tokens, heads, dim]`."""
    x = kv.astype(np.float64)
    k = np.diff(x[:, 0], axis=1)
    v = x[:, 1] - x[:, 1].mean(axis=1, keepdims=True)
    return np.stack([np.sqrt((k**2).mean(axis=(1, 3))), np.sqrt((v**2).mean(axis=(1, 3)))], 1)


def measure(
    model: Any,
    sequences: Sequence[Sequence[int]],
    continuation: int = CONTINUATION,
    samples: int = SAMPLES,
    seed: int = 0,
    kvs: list[np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fisher, spread, values), each `[layers, 2, heads]`, summed (spread: RMS-averaged)
    over `sequences` of token ids: each is split into a prefix and its last `continuation`
    tokens, and the diagonal Fisher information of the continuation's next-token
    distributions with respect to the prefix KV (K after RoPE) is estimated from the
    gradients of labels drawn from the model itself (`samples` per position; their cross
    terms vanish in expectation, so the squared gradient of the summed log-likelihood is
    unbiased). Each prefix's KV (float16 values as float32 `[layers, 2, tokens, heads,
    dim]`) is appended to `kvs` if given."""
    import torch
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(seed)
    fisher: np.ndarray | None = None
    sq = values = None
    for ids in sequences:
        if len(ids) <= continuation + 1:
            raise InvalidArgument(f"a fitting text of {len(ids)} tokens is too short")
        prefix = len(ids) - continuation
        with torch.no_grad():
            out = model(input_ids=torch.tensor([list(ids[: prefix - 1])]), use_cache=True)
        layers = [
            torch.stack((layer.keys[0], layer.values[0])) for layer in out.past_key_values.layers
        ]  # [2, heads, tokens, dim] each
        kv = torch.stack(layers).to(torch.float16).float()  # as a store holds it
        kv.requires_grad_(True)
        grads = torch.zeros_like(kv)
        inputs = torch.tensor([list(ids[prefix - 1 : -1])])
        for _ in range(samples):
            cache = DynamicCache(config=model.config)
            for i in range(kv.shape[0]):
                cache.update(kv[i, 0].unsqueeze(0), kv[i, 1].unsqueeze(0), i)
            logits = model(input_ids=inputs, past_key_values=cache, use_cache=True).logits[0]
            logp = torch.log_softmax(logits.float(), -1)
            labels = torch.multinomial(logp.detach().exp(), 1, generator=gen)
            (g,) = torch.autograd.grad(logp.gather(1, labels).sum(), kv)
            grads += g.detach() ** 2
        # Not the first token (the attention sink): cachegen stores it exactly, and its
        # gradients, the largest, would otherwise decide the weights.
        f = (grads[:, :, :, 1:] / samples).sum(dim=(3, 4)).numpy()  # [layers, 2, heads]
        x = kv.detach().transpose(2, 3).numpy()  # [layers, 2, tokens, heads, dim]
        if kvs is not None:
            kvs.append(np.ascontiguousarray(x))
        s = residual_spread(x)
        n = np.full(f.shape, x.shape[2] * x.shape[4], np.float64)
        fisher = f if fisher is None else fisher + f
        sq = s**2 * n if sq is None else sq + s**2 * n
        values = n if values is None else values + n
    if fisher is None or sq is None or values is None:
        raise InvalidArgument("no fitting text given")
    return fisher, np.sqrt(sq / values), values


def fit(
    model: Any,
    sequences: Sequence[Sequence[int]],
    name: str = "",
    fitted_on: Sequence[str] = (),
    samples: int = SAMPLES,
    cross: bool = True,
    kv: bool = True,
) -> CacheGenProfile:
    """A profile for `model` fitted on `sequences` of token ids (see `measure`); with
    `cross`, its `CrossLayer` maps too (`fit_cross`, `kv` as there; the model's RoPE read
    from its `model.rotary_emb`)."""
    if samples < 1:
        raise InvalidArgument(f"samples must be >= 1, got {samples}")
    kvs: list[np.ndarray] = []
    fisher, spread, values = measure(model, sequences, samples=samples, kvs=kvs)
    part = None
    if cross:
        inv_freq, scale = model_rope(model)
        part = fit_cross(kvs, inv_freq, scale, fisher, values, kv=kv)
    return CacheGenProfile(weights_from(fisher, spread, values), name, tuple(fitted_on), part)


def model_rope(model: Any) -> tuple[np.ndarray, float]:
    """A transformers causal LM's RoPE: (inv_freq float64, attention scaling); InvalidArgument
    for a model without the rotary embedding cachegen-x knows (rotate-half, as Llama's)."""
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    inv = getattr(rotary, "inv_freq", None)
    if inv is None:
        raise InvalidArgument(
            f"{type(model).__name__} has no model.rotary_emb.inv_freq: cachegen-x's maps need "
            "a Llama-style RoPE (--weights-only fits the per-head weights alone)"
        )
    return inv.detach().double().cpu().numpy(), float(getattr(rotary, "attention_scaling", 1.0))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m kvstore.codecs.cachegen_profile",
        description="Measure a model's per-head sensitivity and write a cachegen profile.",
    )
    p.add_argument("--model", required=True, help="a transformers model directory, or a GGUF file")
    p.add_argument("--text", action="append", required=True, type=Path, help="a fitting text")
    p.add_argument("--out", required=True, type=Path, help="the profile file to write (JSON)")
    p.add_argument("--max-tokens", type=int, default=1152, help="tokens used of each text")
    p.add_argument("--samples", type=int, default=SAMPLES, help="labels drawn per position")
    p.add_argument(
        "--weights-only",
        action="store_true",
        help="no cross-layer maps (a version 1 profile: cachegen's per-head weights alone)",
    )
    p.add_argument(
        "--kv-maps",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also predict each layer's V from its own K (the default: a version 3 profile, "
        "better cachegen-x quality at the same size; --no-kv-maps: a version 2 profile, "
        "for servers of an earlier kvstore)",
    )
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(args.model)
    kwargs: dict[str, Any] = {"local_files_only": True}
    where = path
    if path.is_file():  # a GGUF file
        kwargs["gguf_file"] = path.name
        where = path.parent
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(where, **kwargs).float().eval()
    sequences = []
    for text in args.text:
        ids = tokenizer(text.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        sequences.append(list(ids)[: args.max_tokens])
    try:
        profile = fit(
            model, sequences, path.name, [t.name for t in args.text], args.samples,
            cross=not args.weights_only, kv=args.kv_maps,
        )  # fmt: skip
    except InvalidArgument as exc:
        print(f"cachegen_profile: {exc}", file=sys.stderr)
        return 2
    profile.save(args.out)
    maps = f", cross-layer maps {profile.cross.digest}" if profile.cross is not None else ""
    print(f"wrote {args.out}: {profile.layers} layers x 2 x {profile.heads} heads{maps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
