"""The `kivi` codec: round trips, KIVI's grouping (K per channel, V per token) and its error
bound, the exact residual tokens, payload sizes, and rejection of what it cannot take."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kvstore.codecs.kivi  # noqa: F401  (registers the codec)
from kvstore.codecs.base import Codec, ContainerError, codec_from_spec
from kvstore.codecs.values import decode_value
from kvstore.errors import InvalidArgument

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def kivi(bits: int = 2, group: int = 32, residual: int = 32) -> Codec:
    return codec_from_spec(f"kivi:bits={bits},group={group},residual={residual}")


def kv_data(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Normal values shaped like real KV: K with outlier channels (scales over three orders
    of magnitude and offsets per channel), V with magnitudes varying by token. Grouping K by
    token or V by channel would break the per-group error bound on such data."""
    g = torch.Generator().manual_seed(seed)
    layers, _, tokens, heads, head_dim = shape
    x = torch.randn(shape, generator=g)
    x[:, 0] *= 10.0 ** torch.randint(-2, 2, (layers, 1, heads, head_dim), generator=g)
    x[:, 0] += 4 * torch.randn(layers, 1, heads, head_dim, generator=g)
    x[:, 1] *= 10.0 ** torch.randint(-2, 2, (layers, tokens, heads, 1), generator=g)
    return x.to(dtype)


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits, for comparisons that must be exact (signed zeros included)."""
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def half_step(lo: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
    """Half the scale the codec may store for groups spanning [lo, hi]: (hi - lo) / levels,
    widened by the float16 step its minimum may round down and the step its scale may
    round up."""
    lo_step = np.spacing(np.abs(lo).astype(np.float16)).astype(np.float64)
    scale = (hi - lo + lo_step) / (2**bits - 1)
    return (scale + np.spacing(scale.astype(np.float16)).astype(np.float64)) / 2


def error_bound(x: np.ndarray, quantized: int, group: int, bits: int) -> np.ndarray:
    """Per-element bound on |decoded - x| for the quantized tokens of float64 KV `x`
    ([layers, 2, q, heads, head_dim]): K groups run along tokens, V groups along channels."""
    k, v = x[:, 0, :quantized], x[:, 1, :quantized]
    bound = np.empty_like(x[:, :, :quantized])
    for t0 in range(0, quantized, group):
        g = k[:, t0 : t0 + group]
        lo, hi = g.min(axis=1, keepdims=True), g.max(axis=1, keepdims=True)
        bound[:, 0, t0 : t0 + group] = half_step(lo, hi, bits)
    for d0 in range(0, x.shape[-1], group):
        g = v[..., d0 : d0 + group]
        lo, hi = g.min(axis=-1, keepdims=True), g.max(axis=-1, keepdims=True)
        bound[:, 1, ..., d0 : d0 + group] = half_step(lo, hi, bits)
    return bound


def check_error(x: torch.Tensor, y: torch.Tensor, group: int, bits: int, residual: int) -> None:
    """Assert the bound (plus the output dtype's rounding) on every quantized element, and
    bit-exact residual tokens."""
    q = max(x.shape[2] - residual, 0)
    assert torch.equal(bits_of(y[:, :, q:]), bits_of(x[:, :, q:]))
    xs, ys = x[:, :, :q].double().numpy(), y[:, :, :q].double().numpy()
    err = np.abs(ys - xs)
    rounding = torch.finfo(x.dtype).eps * np.abs(ys) + 2.0**-24  # of the decoded value
    excess = err - error_bound(xs, q, group, bits) - rounding
    assert excess.max(initial=0) <= 0, f"error exceeds the bound by {excess.max()}"


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_through_container(dtype: torch.dtype, bits: int) -> None:
    codec = kivi(bits=bits)
    x = kv_data((2, 2, 70, 3, 40), dtype)
    y = decode_value(codec.encode(x))
    assert y.dtype == dtype and y.shape == x.shape
    check_error(x, y, 32, bits, 32)


def test_decode_into_given_out() -> None:
    codec = kivi()
    x = kv_data((2, 2, 50, 2, 16), torch.bfloat16)
    data = codec.encode(x)
    out = torch.full_like(x, 7.0)
    assert decode_value(data, out) is out
    assert torch.equal(bits_of(out), bits_of(decode_value(data)))
    flat = torch.empty(x.numel(), dtype=x.dtype)
    assert codec.decode(data, flat) is flat
    assert torch.equal(bits_of(flat.view(x.shape)), bits_of(out))


@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_tokens_come_back_bit_exact(dtype: torch.dtype) -> None:
    x = kv_data((2, 2, 40, 2, 8), dtype)
    x[0, 1, -1, 0, 0] = -0.0
    y = decode_value(kivi(residual=8).encode(x))
    assert torch.equal(bits_of(y[:, :, 32:]), bits_of(x[:, :, 32:]))
    assert not torch.equal(y[:, :, :32], x[:, :, :32])  # the rest is quantized


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("shape", "group", "residual"),
    [
        ((2, 2, 64, 2, 32), 16, 0),  # whole groups
        ((2, 2, 45, 3, 40), 16, 8),  # 37 quantized tokens and head_dim 40: partial groups
        ((1, 2, 9, 2, 6), 8, 0),  # head_dim shorter than a group, one partial token group
        ((1, 2, 33, 5, 7), 32, 0),  # a one-token K group, odd channels per token
    ],
)
def test_error_bound_per_group(
    shape: tuple[int, ...], group: int, residual: int, dtype: torch.dtype, bits: int
) -> None:
    x = kv_data(shape, dtype, seed=sum(shape))
    y = decode_value(kivi(bits, group, residual).encode(x))
    check_error(x, y, group, bits, residual)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [0, 1, 31, 32])
def test_chunk_no_longer_than_residual_is_kept_exactly(dtype: torch.dtype, tokens: int) -> None:
    x = kv_data((2, 2, tokens, 2, 8), dtype)
    codec = kivi(residual=32)
    payload = codec.encode_payload(x)
    assert len(payload) == x.numel() * x.element_size()
    y = decode_value(codec.encode(x))
    assert torch.equal(bits_of(y), bits_of(x))


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_groups_decode_exactly(dtype: torch.dtype, bits: int) -> None:
    g = torch.Generator().manual_seed(1)
    shape = (2, 2, 40, 3, 24)  # groups of 16: K over tokens 16 + 16 + 8, V over channels 16 + 8
    x = (torch.randint(-1000, 1000, shape, generator=g) / 64).to(dtype)  # exact in float16
    for t0 in (0, 16, 32):  # each K channel constant over each token group
        x[:, 0, t0 : t0 + 16] = x[:, 0, t0 : t0 + 1]
    for d0 in (0, 16):  # each V token and head constant over each channel group
        x[:, 1, ..., d0 : d0 + 16] = x[:, 1, ..., d0 : d0 + 1]
    x[0, :, :, 0] = 0.0  # and some all-zero groups
    y = decode_value(kivi(bits=bits, group=16, residual=0).encode(x))
    assert torch.equal(bits_of(y), bits_of(x))


@pytest.mark.parametrize(
    "shape", [(4,), (2, 16), (2, 2, 8, 16), (2, 3, 8, 2, 16), (1, 2, 8, 2, 16, 1)]
)
def test_rejects_tensors_not_laid_out_as_kv(shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidArgument, match="layers, 2, tokens"):
        kivi().encode(torch.zeros(shape, dtype=torch.float16))


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, torch.uint8])
def test_rejects_other_dtypes(dtype: torch.dtype) -> None:
    with pytest.raises(InvalidArgument):
        kivi().encode(torch.zeros((1, 2, 8, 2, 16), dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("token", [0, 47])  # a quantized token and a residual one
def test_rejects_non_finite_values(dtype: torch.dtype, bad: float, token: int) -> None:
    x = kv_data((1, 2, 48, 2, 16), dtype)
    x[0, 1, token, 1, 3] = bad
    with pytest.raises(InvalidArgument, match="finite"):
        kivi().encode(x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bad", [65505.0, -70000.0, 1e30])
def test_rejects_values_beyond_float16(dtype: torch.dtype, bad: float) -> None:
    x = kv_data((1, 2, 48, 2, 16), dtype)
    x[0, 0, 5, 0, 0] = bad
    if float(x[0, 0, 5, 0, 0]) in (65504.0, -65504.0):  # bf16 rounds 65505 to 65536: still out
        pytest.skip("the value rounds into float16's range in this dtype")
    with pytest.raises(InvalidArgument, match="float16"):
        kivi().encode(x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_float16_extremes_round_trip_finite(dtype: torch.dtype) -> None:
    top = 65280.0 if dtype == torch.bfloat16 else 65504.0  # the dtype's largest within float16
    x = torch.zeros((1, 2, 32, 1, 32), dtype=dtype)
    x[..., 0] = top  # the scale rounds up past the span: float16 output must not overflow
    x[..., 1] = -top
    x[:, :, 0] = top
    x[:, :, 1] = -top
    y = decode_value(kivi(residual=0).encode(x))
    assert bool(torch.isfinite(y).all())
    assert float((y.double() - x.double()).abs().max()) <= 2 * top / 3 / 2 * (1 + 2**-9)


@pytest.mark.parametrize(
    "spec",
    [
        "kivi:bits=3",
        "kivi:bits=8",
        "kivi:bits=0",
        "kivi:group=0",
        "kivi:group=12",
        "kivi:group=264",
        "kivi:group=-8",
        "kivi:residual=-1",
        "kivi:bits=two",
        "kivi:scale=1",
    ],
)
def test_rejects_bad_parameters(spec: str) -> None:
    with pytest.raises(InvalidArgument):
        codec_from_spec(spec)


def test_parameters_and_defaults() -> None:
    codec = codec_from_spec("kivi")
    assert (codec.codec_id, codec.lossless) == (4, False)
    assert codec.spec() == "kivi:bits=2,group=32,residual=32"
    assert codec_from_spec("kivi:group=8").params["group"] == 8
    assert codec_from_spec("kivi:bits=4,group=256,residual=0").spec() == (
        "kivi:bits=4,group=256,residual=0"
    )


def test_payload_of_wrong_length_is_refused() -> None:
    codec = kivi()
    x = kv_data((2, 2, 50, 2, 16), torch.float16)
    payload = codec.encode_payload(x)
    out = torch.empty_like(x)
    codec.decode_payload(memoryview(payload), out)
    for bad in (payload[:-1], payload + b"\0", payload[: len(payload) // 2], b""):
        with pytest.raises(ContainerError, match="payload"):
            codec.decode_payload(memoryview(bad), out)
    with pytest.raises(ContainerError):
        codec.decode_payload(memoryview(payload), torch.empty(x.numel(), dtype=x.dtype))


@pytest.mark.parametrize(("bits", "ratio"), [(2, 16 / 3), (4, 16 / 5)])
def test_ratio_vs_float16(bits: int, ratio: float) -> None:
    # Per element: `bits` of code, plus a float16 min and scale per 32 elements (one bit).
    x = kv_data((2, 2, 64, 8, 128), torch.float16)
    payload = kivi(bits=bits, group=32, residual=0).encode_payload(x)
    assert x.numel() * 2 / len(payload) == pytest.approx(ratio)


def test_llama_sized_chunk() -> None:
    x = kv_data((32, 2, 256, 8, 128), torch.bfloat16)  # a Llama-3-8B chunk of 256 tokens
    codec = kivi()
    data = codec.encode(x)
    assert 3.4 < x.numel() * 2 / len(data) < 3.5  # 224 tokens at 3 bits, 32 kept at 16
    check_error(x, decode_value(data), 32, 2, 32)
