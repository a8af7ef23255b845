"""cachegen: anchors, deltas and rANS. Round trips within the quantization bounds, levels
trading size for error, token locality paying off, and forged payloads refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvstore.codecs import ContainerError, codec_from_spec, decode
from kvstore.codecs.cachegen import LEVELS, CacheGen
from kvstore.errors import InvalidArgument


def smooth_kv(layers: int = 6, tokens: int = 70, heads: int = 2, dim: int = 32) -> torch.Tensor:
    """KV whose channels drift slowly along the tokens, as real KV does."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(layers, 2, 1, heads, dim, generator=g) * 2
    drift = torch.cumsum(torch.randn(layers, 2, tokens, heads, dim, generator=g) * 0.05, dim=2)
    return base + drift


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("level", sorted(LEVELS))
def test_round_trip_within_the_quantization_bounds(dtype: torch.dtype, level: int) -> None:
    t = smooth_kv().to(dtype)
    codec = codec_from_spec(f"cachegen:level={level}")
    got = decode(codec.encode(t))
    assert got.dtype == dtype and got.shape == t.shape
    x = t.float()
    # Per channel: anchors within half an 8-bit step of their channel's largest anchor,
    # deltas within half a delta step of their channel's largest delta (+ rounding).
    amax = x[:, :, ::16].abs().amax(dim=2, keepdim=True)
    bins = np.array([CacheGen(level=level)._bins(t.shape[0])]).reshape(-1, 1, 1, 1, 1)
    half = torch.from_numpy(bins // 2).float()
    anchors_hat = got.float()[:, :, ::16].repeat_interleave(16, dim=2)[:, :, : t.shape[2]]
    dmax = (x - anchors_hat).abs().amax(dim=2, keepdim=True)
    bound = amax / 126.9 + dmax / half * 0.51 + x.abs() * 2**-7 + 1e-6
    assert ((got.float() - x).abs() <= bound).all()


def test_levels_trade_size_for_error() -> None:
    t = smooth_kv(tokens=256).to(torch.bfloat16)
    sizes, errors = [], []
    for level in sorted(LEVELS):
        data = codec_from_spec(f"cachegen:level={level}").encode(t)
        sizes.append(len(data))
        errors.append(rel_err(decode(data), t))
    assert sizes == sorted(sizes, reverse=True) and errors == sorted(errors)
    assert t.numel() * 2 / sizes[1] > 2.5  # level 1 on smooth KV


def test_locality_pays_off() -> None:
    """The same values with the tokens shuffled lose the deltas' advantage: a level's bins
    are spread over each channel's largest delta, so the size stays and the error grows."""
    t = smooth_kv(tokens=256).to(torch.bfloat16)
    shuffled = t[:, :, torch.randperm(256, generator=torch.Generator().manual_seed(0))]
    codec = codec_from_spec("cachegen")
    ordered_data, shuffled_data = codec.encode(t), codec.encode(shuffled)
    assert len(ordered_data) < 1.1 * len(shuffled_data)
    assert 2 * rel_err(decode(ordered_data), t) < rel_err(decode(shuffled_data), shuffled)


def test_beats_plain_quantization_at_equal_error() -> None:
    t = smooth_kv(tokens=256).to(torch.bfloat16)
    cg = codec_from_spec("cachegen:level=1").encode(t)
    i8 = codec_from_spec("int8").encode(t)
    assert len(cg) < len(i8) and rel_err(decode(cg), t) < rel_err(decode(i8), t)


@pytest.mark.parametrize("tokens", [0, 1, 15, 16, 17, 33])
def test_edge_token_counts(tokens: int) -> None:
    t = smooth_kv(layers=3, tokens=tokens).to(torch.float16)
    got = decode(codec_from_spec("cachegen:anchor=16").encode(t))
    assert got.shape == t.shape
    if tokens:
        assert rel_err(got, t) < 0.05


def test_constant_and_zero_values() -> None:
    z = torch.zeros(2, 2, 20, 1, 8, dtype=torch.bfloat16)
    assert torch.equal(decode(codec_from_spec("cachegen").encode(z)), z)
    c = torch.full((2, 2, 20, 1, 8), 0.75, dtype=torch.float16)
    got = decode(codec_from_spec("cachegen").encode(c))
    assert torch.equal(got[:, :, 1:16], c[:, :, 1:16])  # deltas absorb the anchor's error
    assert rel_err(got, c) < 1e-3


def test_refusals() -> None:
    codec = codec_from_spec("cachegen")
    with pytest.raises(InvalidArgument, match="layers, 2, tokens"):
        codec.encode(torch.zeros(4, 8))
    bad = smooth_kv(layers=1, tokens=4)
    bad[0, 0, 0, 0, 0] = float("inf")
    with pytest.raises(InvalidArgument, match="finite"):
        codec.encode(bad)
    with pytest.raises(InvalidArgument, match="finite"):
        codec.encode(smooth_kv(layers=1, tokens=4) * 1e6)
    with pytest.raises(InvalidArgument, match="level"):
        codec_from_spec("cachegen:level=9")
    with pytest.raises(InvalidArgument, match="anchor"):
        codec_from_spec("cachegen:anchor=1")


def test_forged_payloads_are_refused_without_crashing() -> None:
    t = smooth_kv(layers=2, tokens=40).to(torch.bfloat16)
    codec = CacheGen()
    payload = codec.encode_payload(t)
    out = torch.empty_like(t)
    for cut in (0, 10, len(payload) // 2, len(payload) - 1):
        with pytest.raises(ContainerError):
            codec.decode_payload(memoryview(payload[:cut]), out)
    rng = np.random.default_rng(0)
    refused = 0
    for _ in range(200):  # bytes flipped behind the container's checksum
        forged = bytearray(payload)
        forged[int(rng.integers(len(forged)))] ^= 1 << int(rng.integers(8))
        try:
            codec.decode_payload(memoryview(bytes(forged)), out)
        except ContainerError:
            refused += 1
    assert refused > 0  # the rest decode to some tensor; the container's checksums catch them
    with pytest.raises(ContainerError, match="shape"):
        codec.decode_payload(memoryview(payload), torch.empty(4, 4))
