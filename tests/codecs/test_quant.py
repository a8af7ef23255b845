"""`int8` and `fp8`: exact agreement with the documented formula, error bounds, per-channel K
and per-token V scales, zeros, refusals, payload checks and size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvstore.codecs import quant
from kvstore.codecs.base import ContainerError, codec_from_spec
from kvstore.codecs.values import decode_value
from kvstore.errors import InvalidArgument

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
NAMES = ["int8", "fp8"]
SHAPE = (2, 2, 37, 3, 16)  # [layers, 2, tokens, heads, head_dim]: small, odd token count
QMAX = {"int8": 127.0, "fp8": 448.0}


def kv(
    shape: tuple[int, ...] = SHAPE, seed: int = 0, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """KV-like values spanning many binades: channels scaled from 1e-4 to 1e3."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.logspace(-4, 3, shape[-1])
    return (torch.randn(shape, generator=g) * spread).to(dtype)


def scales(t: torch.Tensor, name: str) -> torch.Tensor:
    """Each element's group scale, by the documented grouping, broadcast to t's shape."""
    x = t.float().abs()
    k = x[:, 0].amax(dim=1, keepdim=True).expand_as(x[:, 0])  # over tokens
    v = x[:, 1].amax(dim=-1, keepdim=True).expand_as(x[:, 1])  # over head_dim
    return torch.stack([k, v], dim=1) / QMAX[name]


def reference(t: torch.Tensor, name: str) -> torch.Tensor:
    """The documented codec in plain torch: codes, then float32(code) * scale -> dtype."""
    x, s = t.float(), scales(t, name)
    q = torch.where(s > 0, x / torch.where(s > 0, s, 1.0), 0.0)
    if name == "fp8":
        codes = q.clamp(-448, 448).to(torch.float8_e4m3fn).float()
    else:
        codes = q.round().clamp(-127, 127)  # torch.round rounds half to even
    return (codes * s).to(t.dtype)


def rounding(t: torch.Tensor) -> torch.Tensor:
    """The most that rounding a float32 near each |t| into t's dtype moves it (half an ulp,
    relative for normals, absolute for subnormals)."""
    fi = torch.finfo(t.dtype)
    return t.float().abs() * fi.eps / 2 + fi.smallest_normal * fi.eps


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_matches_the_documented_formula(name: str, dtype: torch.dtype) -> None:
    t = kv(dtype=dtype)
    data = codec_from_spec(name).encode(t)
    got = decode_value(data)
    assert got.dtype == dtype and got.shape == t.shape
    assert torch.equal(got, reference(t, name))
    assert torch.equal(decode_value(bytearray(data)), got)  # a writable buffer decodes alike


@pytest.mark.parametrize("name", NAMES)
def test_decode_into_out(name: str) -> None:
    codec = codec_from_spec(name)
    t = kv(seed=1, dtype=torch.float16)
    data = codec.encode(t)
    out = torch.full_like(t, float("nan"))
    assert codec.decode(data, out) is out
    assert torch.equal(out, decode_value(data))
    # The payload alone into `out` (what the container does), with no container around it.
    out2 = torch.empty_like(t)
    codec.decode_payload(memoryview(codec.encode_payload(t)), out2)
    assert torch.equal(out2, out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_error_is_within_half_a_scale(dtype: torch.dtype) -> None:
    t = kv(seed=2, dtype=dtype)
    got = decode_value(codec_from_spec("int8").encode(t))
    err = (got.float() - t.float()).abs()
    bound = scales(t, "int8") / 2 * (1 + 1e-5) + rounding(got)
    assert (err <= bound).all(), (err - bound).max()


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_error_is_within_e4m3_rounding(dtype: torch.dtype) -> None:
    """e4m3 keeps 3 mantissa bits: half an ulp is 2**-4 of the value, and below 2**-6
    (in units of the scale) subnormals are 2**-9 apart."""
    t = kv(seed=3, dtype=dtype)
    got = decode_value(codec_from_spec("fp8").encode(t))
    err = (got.float() - t.float()).abs()
    s = scales(t, "fp8")
    bound = (t.float().abs() * 2**-4 + s * 2**-10) * (1 + 1e-5) + rounding(got)
    assert (err <= bound).all(), (err - bound).max()


@pytest.mark.parametrize("name", NAMES)
def test_k_is_scaled_per_channel_and_v_per_token(name: str) -> None:
    """A huge K channel and a huge V token spoil no other channel or token: with one scale
    per token for K or per channel for V, their neighbours would lose all precision."""
    t = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    span = t.abs().max()
    k_channel, v_token = (1, 0, slice(None), 2, 5), (0, 1, 7, 1, slice(None))
    t[k_channel] *= 1e4
    t[v_token] *= 1e4
    err = (decode_value(codec_from_spec(name).encode(t)) - t).abs()
    outliers = err[k_channel].max() + err[v_token].max()
    err[k_channel] = 0
    err[v_token] = 0
    half_step = 1 / 254 if name == "int8" else 1 / 16  # of a group's range
    assert err.max() <= span * half_step
    assert outliers <= span * 1e4 * half_step


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zeros_decode_to_zeros(name: str, dtype: torch.dtype) -> None:
    zeros = torch.zeros(SHAPE, dtype=dtype)
    assert (decode_value(codec_from_spec(name).encode(zeros)) == 0).all()
    t = kv(seed=5, dtype=dtype)
    t[0, 0, :, 1, 3] = 0  # a zero K channel
    t[1, 1, 4, 2, :] = -0.0  # a zero V group
    got = decode_value(codec_from_spec(name).encode(t))
    assert (got[0, 0, :, 1, 3] == 0).all() and (got[1, 1, 4, 2, :] == 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_non_kv_tensors_are_refused(name: str) -> None:
    codec = codec_from_spec(name)
    with pytest.raises(InvalidArgument, match=r"\[layers, 2, tokens, heads, head_dim\]"):
        codec.encode(torch.randn(2, 3, 4, 5, 6))
    with pytest.raises(InvalidArgument, match=r"\[layers, 2, tokens, heads, head_dim\]"):
        codec.encode(torch.randn(2, 2, 4, 8))
    with pytest.raises(InvalidArgument, match="floating-point"):
        codec.encode(torch.ones(SHAPE, dtype=torch.int32))
    with pytest.raises(InvalidArgument, match="float16, bfloat16 or float32"):
        codec.encode(torch.randn(SHAPE, dtype=torch.float64))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("where", [(1, 0, 36, 2, 15), (0, 1, 0, 0, 0)])  # in K, in V
def test_non_finite_values_are_refused(
    name: str, dtype: torch.dtype, bad: float, where: tuple[int, ...]
) -> None:
    t = kv(seed=6, dtype=dtype)
    t[where] = bad
    with pytest.raises(InvalidArgument, match="lossless codec"):
        codec_from_spec(name).encode(t)


@pytest.mark.parametrize("name", NAMES)
def test_payload_of_the_wrong_length_is_refused(name: str) -> None:
    codec = codec_from_spec(name)
    t = kv(seed=7)
    payload = codec.encode_payload(t)
    out = torch.empty_like(t)
    for wrong in (payload[:-1], payload[:-4], payload + b"\0", b""):
        with pytest.raises(ContainerError, match=f"{name} payload of {len(wrong)} bytes"):
            codec.decode_payload(memoryview(wrong), out)
    with pytest.raises(ContainerError, match="decodes to KV"):
        codec.decode_payload(memoryview(payload), torch.empty(t.numel(), dtype=t.dtype))


@pytest.mark.parametrize("name", NAMES)
def test_payload_size_is_codes_plus_scales(name: str) -> None:
    layers, _, tokens, heads, dim = SHAPE
    for dtype, itemsize in [(torch.bfloat16, 2), (torch.float32, 4)]:
        payload = codec_from_spec(name).encode_payload(kv(dtype=dtype))
        codes = 2 * layers * tokens * heads * dim
        assert len(payload) == codes + 4 * (layers * heads * dim + layers * tokens * heads)
        assert len(payload) < codes * itemsize / 2 * 1.2  # about 1 byte a value, not 2 or 4


def test_empty_chunk_round_trips() -> None:
    t = torch.empty(2, 2, 0, 3, 16, dtype=torch.float16)
    got = decode_value(codec_from_spec("int8").encode(t))
    assert got.shape == t.shape and got.dtype == t.dtype


@pytest.mark.parametrize("name", NAMES)
def test_llama_8b_chunk(name: str) -> None:
    """One realistic chunk: Llama-3-8B, 256 tokens, bfloat16 (32 MiB): ratio and error."""
    t = kv((32, 2, 256, 8, 128), seed=8)
    data = codec_from_spec(name).encode(t)
    raw = t.numel() * t.element_size()
    assert 1.9 < raw / len(data) < 2  # half, less the scales (2.3%) and the header
    got = decode_value(data)
    err = ((got.float() - t.float()).norm() / t.float().norm()).item()
    assert err < (0.01 if name == "int8" else 0.04), err


def test_fp8_code_matches_torch() -> None:
    """The kernels' float8 conversion agrees with torch's, subnormals and ties included.
    (Their float16 and bfloat16 conversions are tested in tests/kernels/test_floatbits.py.)"""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(4000, generator=g) * torch.logspace(-9, 5, 4000)
    y = (x / x.abs().max() * 448).clamp(-448, 448)
    y = torch.cat([y, torch.arange(0, 65, dtype=torch.float32) * 2**-10])  # e4m3 ties
    want8 = y.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    got8 = np.array([quant._fp8_code(v) for v in y.tolist()], dtype=np.uint8)
    assert np.array_equal(got8, want8)
