"""The float16 and bfloat16 conversions of `kvstore.kernels.floatbits` against torch's: every
16-bit input, and float32 inputs on and either side of every rounding tie, subnormals,
signed zeros and overflow included, in both float16 overflow modes.

The conversions run inside jitted loops, as the codecs' kernels call them."""

from __future__ import annotations

import math

import numba
import numpy as np
import pytest
import torch

from kvstore.kernels.floatbits import (
    F16_MAX,
    bf16_to_f32,
    f16_to_f32,
    f32_to_bf16,
    f32_to_f16,
    f32_to_f16_integer,
)

EVERY_16 = np.arange(2**16, dtype=np.uint16)  # every 16-bit pattern


@numba.njit
def to_f32(bits: np.ndarray, bf16: bool) -> np.ndarray:
    out = np.empty(bits.size, np.float32)
    for i in range(bits.size):
        out[i] = bf16_to_f32(bits[i]) if bf16 else f16_to_f32(bits[i])
    return out


@numba.njit
def to_f16(x: np.ndarray, saturate: bool, integer: bool = False) -> np.ndarray:
    """`f32_to_f16` over `x`; with `integer`, its integer path (CPUs without F16C)."""
    out = np.empty(x.size, np.uint16)
    for i in range(x.size):
        out[i] = f32_to_f16_integer(x[i], saturate) if integer else f32_to_f16(x[i], saturate)
    return out


@numba.njit
def to_bf16(x: np.ndarray) -> np.ndarray:
    out = np.empty(x.size, np.uint16)
    for i in range(x.size):
        out[i] = f32_to_bf16(x[i])
    return out


def bits_of(t: torch.Tensor) -> np.ndarray:
    if t.element_size() == 4:
        return t.view(torch.int32).numpy().view(np.uint32)
    return t.view(torch.int16).numpy().view(np.uint16)


def around_ties(dtype: torch.dtype) -> np.ndarray:
    """float32 values halfway between each two adjacent finite magnitudes of `dtype` (and
    between its largest and the next power of two, where rounding overflows), and the
    float32 values just below and above each, both signs; then values over every binade,
    signed zeros, infinities and the extremes of float32."""
    top = torch.finfo(dtype).max
    mags = torch.arange(0, 2**15, dtype=torch.int32).to(torch.int16).view(dtype).double()
    mags = mags[mags <= top]
    mags = torch.cat([mags, torch.tensor([2.0 ** math.ceil(math.log2(top))])])
    mid = ((mags[:-1] + mags[1:]) / 2).float().numpy()  # exact: a few more bits than dtype
    up = np.nextafter(mid, np.float32(np.inf))
    down = np.nextafter(mid, np.float32(0))
    g = torch.Generator().manual_seed(9)
    spread = (torch.randn(4000, generator=g) * torch.logspace(-45, 38, 4000)).numpy()
    fi = np.finfo(np.float32)
    special = np.array([0.0, np.inf, F16_MAX, fi.max, fi.smallest_subnormal], np.float32)
    x = np.concatenate([mid, up, down, spread.astype(np.float32), special])
    return np.concatenate([x, -x])


def test_f16_to_f32_every_input() -> None:
    f16 = torch.from_numpy(EVERY_16.view(np.int16)).view(torch.float16)
    got = to_f32(EVERY_16, False)
    nan = torch.isnan(f16).numpy()
    assert np.array_equal(got[~nan].view(np.uint32), bits_of(f16[~nan].float()))
    assert np.isnan(got[nan]).all()


def test_bf16_to_f32_every_input() -> None:
    bf16 = torch.from_numpy(EVERY_16.view(np.int16)).view(torch.bfloat16)
    assert np.array_equal(to_f32(EVERY_16, True).view(np.uint32), bits_of(bf16.float()))


def test_f32_to_f16_rounds_to_nearest_even_and_overflows_to_inf() -> None:
    x = around_ties(torch.float16)
    want = bits_of(torch.from_numpy(x).to(torch.float16))
    assert np.array_equal(to_f16(x, False), want)
    assert (want == 0x7C00).any() and (want == 0xFC00).any() and (want == 0x0001).any()


def test_f32_to_f16_saturating_stops_at_65504() -> None:
    x = around_ties(torch.float16)
    want = bits_of(torch.from_numpy(x).to(torch.float16))
    want = np.where((want & 0x7FFF) == 0x7C00, (want & 0x8000) | 0x7BFF, want)
    assert np.array_equal(to_f16(x, True), want)


def test_f32_to_f16_keeps_nan() -> None:
    nans = np.array([np.nan, -np.nan, np.uint32(0x7F800001).view(np.float32)], np.float32)
    for saturate in (False, True):
        assert ((to_f16(nans, saturate) & 0x7FFF) > 0x7C00).all()


@pytest.mark.parametrize("saturate", [False, True])
def test_f32_to_f16_paths_agree(saturate: bool) -> None:
    """The CPU's conversion (with F16C) and the integer path (without) give the same bits,
    NaN payloads included (checked once over all 2**32 inputs; here ties, random patterns
    and every exponent's edges)."""
    rng = np.random.default_rng(4)
    patterns = rng.integers(0, 2**32, 1 << 22, dtype=np.uint64).astype(np.uint32)
    exps = (np.arange(256, dtype=np.uint32) << 23)[:, None] + np.array([0, 1, 0x7FFFFF], np.uint32)
    x = np.concatenate([around_ties(torch.float16), patterns.view(np.float32)])
    x = np.concatenate(
        [x, exps.ravel().view(np.float32), (exps.ravel() | 1 << 31).view(np.float32)]
    )
    assert np.array_equal(to_f16(x, saturate), to_f16(x, saturate, integer=True))


def test_f32_to_bf16_rounds_to_nearest_even() -> None:
    x = around_ties(torch.bfloat16)
    want = bits_of(torch.from_numpy(x).to(torch.bfloat16))
    assert np.array_equal(to_bf16(x), want)
    assert (want == 0x7F80).any() and (want == 0x0001).any()  # overflow and subnormals
    assert (to_bf16(np.array([np.nan], np.float32))[0] & 0x7FFF) > 0x7F80
