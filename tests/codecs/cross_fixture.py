"""Synthetic KV with a cross-layer structure, and cachegen profiles with maps fitted on it,
for the tests of `cachegen-x` (and of every codec, which include it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kvstore.codecs.cachegen_profile import CacheGenProfile, fit_cross


def inv_freq(dim: int, base: float = 10000.0) -> np.ndarray:
    return 1.0 / base ** (np.arange(0, dim, 2) / dim)


class LayeredKV:
    """KV whose layer l's channels (K before RoPE, then V) are a fixed linear map of layer
    l-1's plus noise, layer 0 a slow random walk; K rotated by RoPE at the given positions."""

    def __init__(
        self,
        layers: int,
        heads: int,
        dim: int,
        seed: int = 0,
        gain: float = 1.4,
        v_from_k: float = 0.0,
    ) -> None:
        """`gain`: how much a layer's map scales a typical vector (1 for deep models, whose
        values would otherwise outgrow float16); `v_from_k`: the share of a layer's V that
        is a fixed linear map of its own K (before RoPE), as in a model where both project
        one hidden state (0: V as independent of K as the noise makes it)."""
        rng = np.random.default_rng(seed)
        self.layers, self.heads, self.dim = layers, heads, dim
        c = 2 * heads * dim
        self.maps = [rng.normal(0, gain / np.sqrt(c), (c, c)) for _ in range(layers)]
        self.k_to_v = rng.normal(0, 1 / np.sqrt(c // 2), (c // 2, c // 2))
        self.v_from_k = v_from_k
        self.inv_freq = inv_freq(dim)

    def sample(self, tokens: int, position: int = 0, seed: int = 0) -> np.ndarray:
        """float64 `[layers, 2, tokens, heads, dim]`."""
        rng = np.random.default_rng(seed)
        c = 2 * self.heads * self.dim
        x = np.cumsum(rng.normal(0, 0.06, (tokens, c)), 0) + rng.normal(0, 1, (1, c))
        kv = np.empty((self.layers, 2, tokens, self.heads, self.dim))
        half = self.dim // 2
        ang = (position + np.arange(tokens))[:, None, None] * self.inv_freq[None, None, :]
        cos, sin = np.cos(ang), np.sin(ang)
        for layer in range(self.layers):
            if layer:
                x = x @ self.maps[layer] + 0.1 * rng.normal(0, 1, (tokens, c))
            if self.v_from_k:
                x = x.copy()
                x[:, c // 2 :] *= 1 - self.v_from_k
                x[:, c // 2 :] += self.v_from_k * (x[:, : c // 2] @ self.k_to_v)
            ch = x.reshape(tokens, 2, self.heads, self.dim)
            x1, x2 = ch[:, 0, :, :half], ch[:, 0, :, half:]
            kv[layer, 0] = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
            kv[layer, 1] = ch[:, 1]
        return kv

    def tensor(self, tokens: int, position: int = 0, seed: int = 0, dtype=torch.float16):
        return torch.from_numpy(self.sample(tokens, position, seed)).to(dtype)

    def profile(
        self, fits: int = 3, tokens: int = 300, bits: int = 8, kv: bool = False
    ) -> CacheGenProfile:
        """A profile with `bits`-bit maps (8, the default; 16: the earlier kind), and with
        `kv`, V predicted from its layer's K too (`CrossLayer.kv_maps`)."""
        kvs = [self.sample(tokens, 0, 100 + s) for s in range(fits)]
        shape = (self.layers, 2, self.heads)
        cross = fit_cross(
            kvs, self.inv_freq, 1.0, np.ones(shape), np.full(shape, 1000.0), bits=bits, kv=kv
        )
        return CacheGenProfile(np.ones(shape), "layered", ("synthetic",), cross)

    def profile_file(self, path: Path, bits: int = 8, kv: bool = False) -> Path:
        self.profile(bits=bits, kv=kv).save(path)
        return path
