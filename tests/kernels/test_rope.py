"""rerotate_k and RopeConfig: re-rotated K against RoPE applied at the new positions from
the formulas, inv_freq against transformers' and an independent per-channel formula, the
NeoX pairing against transformers' Llama, untouched tail channels and V, refusals made
before anything is written, and the CUDA kernel against the numba twin bit for bit."""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from kvstore.kernels import RopeConfig, RopeError, RopeScaling, rerotate_k


def _cuda_devices() -> int:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # no cupy, no driver, no device: all mean no GPU here
        return 0


gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or _cuda_devices() == 0, reason="needs a CUDA GPU and CuPy"
)

try:
    import transformers  # noqa: F401

    HAVE_TRANSFORMERS = True
except ImportError:
    HAVE_TRANSFORMERS = False
needs_transformers = pytest.mark.skipif(
    not HAVE_TRANSFORMERS, reason="compares against transformers, which is not installed"
)

SCALINGS: dict[str, RopeScaling | None] = {
    "plain": None,
    "linear": RopeScaling("linear", 4.0),
    "dynamic": RopeScaling("dynamic", 2.0, 4096),
    "yarn": RopeScaling("yarn", 4.0, 2048),
    "llama3": RopeScaling("llama3", 8.0, 8192, low_freq_factor=1.0, high_freq_factor=4.0),
}
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def pair_index(cfg: RopeConfig) -> tuple[np.ndarray, np.ndarray]:
    """The channels x and y of each rotating pair."""
    half = cfg.pairs
    if cfg.pairing == "neox":
        return np.arange(half), np.arange(half) + half
    return np.arange(0, 2 * half, 2), np.arange(1, 2 * half, 2)


def rope(k: np.ndarray, pos: np.ndarray, cfg: RopeConfig) -> np.ndarray:
    """RoPE at `pos` of K [layers, tokens, heads, head_dim], in float64, from the formula:
    x' = x cos - y sin, y' = x sin + y cos, angle = pos * inv_freq."""
    xi, yi = pair_index(cfg)
    angle = pos.astype(np.float64)[:, None] * cfg.inv_freq()[None, :]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    out = k.astype(np.float64)
    x, y = out[..., xi], out[..., yi]
    out[..., xi], out[..., yi] = x * cos - y * sin, x * sin + y * cos
    return out


def pair_norm(k: np.ndarray, cfg: RopeConfig) -> np.ndarray:
    """|(x, y)| of the pair each channel rotates in (itself for channels that do not)."""
    xi, yi = pair_index(cfg)
    norm = np.abs(k).astype(np.float64)
    r = np.hypot(k[..., xi], k[..., yi])
    norm[..., xi], norm[..., yi] = r, r
    return norm


def positions(rng: np.random.Generator, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions up to 100k, each token moved by its own delta, both ways; the second half
    of the tokens moves as one contiguous chunk (one shared delta)."""
    p = rng.integers(0, 100_000, tokens)
    q = rng.integers(0, 100_000, tokens)
    half = tokens // 2
    p[half:] = 1234 + np.arange(tokens - half)
    q[half:] = 98_000 + np.arange(tokens - half)
    d = q - p
    assert d.min() < 0 < d.max()
    return p, q


def rerotated(
    dtype: torch.dtype, cfg: RopeConfig, seed: int, shape: tuple[int, int, int] = (2, 48, 3)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(re-rotated K as float64, RoPE at q from the formula, pair norms) for a raw k."""
    rng = np.random.default_rng(seed)
    layers, tokens, heads = shape
    raw = rng.standard_normal((layers, tokens, heads, cfg.head_dim))
    p, q = positions(rng, tokens)
    stored = torch.from_numpy(rope(raw, p, cfg).astype(np.float32)).to(dtype)
    k: Any = stored.numpy() if dtype == torch.float32 else stored  # NumPy and torch inputs
    assert rerotate_k(k, p, q, cfg) is None
    got = torch.as_tensor(k).double().numpy()
    return got, rope(raw, q, cfg), pair_norm(raw, cfg)


@pytest.mark.parametrize("pairing", ["neox", "gptj"])
@pytest.mark.parametrize("scaling", list(SCALINGS))
def test_rerotated_float32_equals_rope_at_the_new_positions(pairing: str, scaling: str) -> None:
    cfg = RopeConfig(64, base=10000.0, pairing=pairing, scaling=SCALINGS[scaling])  # type: ignore[arg-type]
    got, want, norm = rerotated(torch.float32, cfg, seed=len(scaling))
    # float32 storage, float32 cos/sin and four float32 roundings: a few ulps of the pair
    assert np.all(np.abs(got - want) <= 2.0**-21 * norm)


@pytest.mark.parametrize("pairing", ["neox", "gptj"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rerotated_16_bit_is_within_its_rounding(pairing: str, dtype: torch.dtype) -> None:
    cfg = RopeConfig(128, base=500000.0, pairing=pairing, scaling=SCALINGS["llama3"])  # type: ignore[arg-type]
    got, want, norm = rerotated(dtype, cfg, seed=7)
    u = UNIT_ROUNDOFF[dtype]
    # The stored x and y are each off by u of their value (the pair's error at most u * norm
    # after the rotation), then the result is rounded once more; float16 subnormals are
    # exact to 2**-24 only.
    bound = (2 * u + 2.0**-20) * norm + 2.0**-24
    assert np.all(np.abs(got - want) <= bound)
    assert np.abs(got - want).max() > u * norm.max() / 64  # the bound is not vacuous


# ------------------------------------------------------------------------------ inv_freq


def formula_inv_freq(
    base: float, dim: int, scaling: RopeScaling | None, truncate: bool = True
) -> np.ndarray:
    """inv_freq channel by channel, written from the published formulas."""
    out = []
    for i in range(dim // 2):
        theta = base ** (-2 * i / dim)
        if scaling is None:
            out.append(theta)
            continue
        s, orig = scaling.factor, scaling.original_max_position_embeddings
        if scaling.kind == "linear":  # position interpolation: positions / s
            out.append(theta / s)
        elif scaling.kind == "dynamic":  # NTK-aware: a larger base
            out.append((base * s ** (dim / (dim - 2))) ** (-2 * i / dim))
        elif scaling.kind == "yarn":
            assert orig is not None
            # the channel that turns `rotations` times over the training length
            lo, hi = (
                dim * math.log(orig / (2 * math.pi * rotations)) / (2 * math.log(base))
                for rotations in (scaling.beta_fast, scaling.beta_slow)
            )
            if truncate:
                lo, hi = math.floor(lo), math.ceil(hi)
            lo, hi = max(lo, 0), min(hi, dim - 1)
            gamma = min(max((i - lo) / (hi - lo), 0.0), 1.0)  # 0: extrapolate, 1: interpolate
            out.append(theta / s * gamma + theta * (1 - gamma))
        else:
            assert orig is not None
            wavelength = 2 * math.pi / theta
            if wavelength < orig / scaling.high_freq_factor:
                out.append(theta)
            elif wavelength > orig / scaling.low_freq_factor:
                out.append(theta / s)
            else:
                lo, hi = scaling.low_freq_factor, scaling.high_freq_factor
                smooth = (orig / wavelength - lo) / (hi - lo)
                out.append((1 - smooth) * theta / s + smooth * theta)
    return np.array(out)


HF_CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # name: (rope_parameters, other LlamaConfig arguments)
    "plain": ({"rope_type": "default", "rope_theta": 10000.0}, {}),
    "linear": ({"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}, {}),
    "dynamic": ({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, {}),
    "yarn": (
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
         "original_max_position_embeddings": 2048},
        {"max_position_embeddings": 8192},
    ),
    "yarn-betas-untruncated": (
        {"rope_type": "yarn", "rope_theta": 1e6, "factor": 8.0, "beta_fast": 16.0,
         "beta_slow": 2.0, "truncate": False, "original_max_position_embeddings": 4096},
        {"max_position_embeddings": 32768},
    ),
    "llama3": (
        {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        {"max_position_embeddings": 131072},
    ),
    "partial-yarn": (
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
         "original_max_position_embeddings": 2048, "partial_rotary_factor": 0.5},
        {"max_position_embeddings": 8192},
    ),
}  # fmt: skip


@needs_transformers
@pytest.mark.parametrize("case", list(HF_CASES))
def test_inv_freq_equals_transformers_and_the_formula(case: str) -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    params, extra = HF_CASES[case]
    extra = {"max_position_embeddings": 4096, **extra}
    hf = LlamaConfig(hidden_size=1024, num_attention_heads=8, rope_parameters=dict(params), **extra)
    cfg = RopeConfig.from_hf(hf)
    assert cfg.head_dim == 128
    assert cfg.rotary_dim == int(128 * params.get("partial_rotary_factor", 1.0))
    kind = params["rope_type"]
    if kind == "default":
        theirs, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(hf)
    elif kind == "dynamic":  # the static NTK base is the dynamic one at (2 - 1/factor) x max
        seq_len = extra["max_position_embeddings"] * (2 - 1 / params["factor"])
        theirs, _ = ROPE_INIT_FUNCTIONS[kind](hf, seq_len=seq_len)
    else:
        theirs, _ = ROPE_INIT_FUNCTIONS[kind](hf)
    ours = cfg.inv_freq()
    assert ours.dtype == np.float64
    assert ours.shape == (cfg.pairs,)
    np.testing.assert_allclose(ours, theirs.double().numpy(), rtol=2e-6)  # theirs is float32
    formula = formula_inv_freq(cfg.base, 2 * cfg.pairs, cfg.scaling, params.get("truncate", True))
    np.testing.assert_allclose(ours, formula, rtol=1e-12)


def test_from_hf_reads_transformers_4_style_attributes() -> None:
    old = SimpleNamespace(  # rope_theta and rope_scaling side by side, GPT-NeoX's rotary_pct
        hidden_size=2048,
        num_attention_heads=16,
        max_position_embeddings=8192,
        rope_theta=25000.0,
        rotary_pct=0.25,
        rope_scaling={"type": "linear", "factor": 2.0},
    )
    cfg = RopeConfig.from_hf(old, pairing="gptj")
    assert cfg == RopeConfig(128, 32, 25000.0, "gptj", RopeScaling("linear", 2.0, 8192))
    old.rope_scaling = {"type": "longrope", "factor": 2.0}
    with pytest.raises(RopeError, match="longrope"):
        RopeConfig.from_hf(old)


# ------------------------------------------------------------------------------ transformers


@needs_transformers
@pytest.mark.parametrize("case", ["plain", "yarn", "llama3"])
def test_neox_pairing_matches_transformers_llama(case: str) -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import (
        LlamaRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    params, extra = HF_CASES[case]
    hf = LlamaConfig(
        hidden_size=512, num_attention_heads=4, rope_parameters=dict(params),
        **{"max_position_embeddings": 4096, **extra},
    )  # fmt: skip
    embed = LlamaRotaryEmbedding(hf)
    heads, tokens, dim = 4, 40, 128
    torch.manual_seed(0)
    raw = torch.randn(1, heads, tokens, dim)  # transformers' [batch, heads, seq, dim]
    rng = np.random.default_rng(1)
    # transformers computes angles in float32: at position 1000 they are off by ~3e-5 rad
    p, q = rng.integers(0, 1000, tokens), rng.integers(0, 1000, tokens)

    def transformers_k(pos: np.ndarray) -> torch.Tensor:
        cos, sin = embed(raw, torch.from_numpy(pos)[None])  # yarn's mscale included
        return apply_rotary_pos_emb(raw, raw, cos, sin)[1][0].transpose(0, 1).contiguous()

    k = transformers_k(p)[None]  # [layers=1, tokens, heads, dim]
    rerotate_k(k, p, q, RopeConfig.from_hf(hf))
    want = transformers_k(q)[None]
    assert (k - want).abs().max() <= 2e-4 * want.abs().max()


# ------------------------------------------------------------------------------ layouts


@pytest.mark.parametrize("pairing", ["neox", "gptj"])
def test_channels_past_rotary_dim_are_untouched(pairing: str) -> None:
    cfg = RopeConfig(64, rotary_dim=16, pairing=pairing)  # type: ignore[arg-type]
    rng = np.random.default_rng(3)
    k = rng.standard_normal((2, 30, 2, 64)).astype(np.float16)
    before = k.copy()
    p, q = positions(rng, 30)
    out = np.full_like(k, np.nan)
    rerotate_k(k, p, q, cfg, out=out)
    assert np.array_equal(k.view(np.uint16), before.view(np.uint16))  # the input is untouched
    rerotate_k(k, p, q, cfg)  # in place
    assert np.array_equal(out.view(np.uint16), k.view(np.uint16))
    assert np.array_equal(k[..., 16:].view(np.uint16), before[..., 16:].view(np.uint16))
    assert not np.array_equal(k[..., :16], before[..., :16])


def test_kv_layout_moves_k_and_leaves_v() -> None:
    cfg = RopeConfig(32, pairing="gptj", scaling=SCALINGS["yarn"])
    torch.manual_seed(4)
    kv = torch.randn(3, 2, 20, 2, 32).to(torch.bfloat16)
    before = kv.clone()
    p, q = positions(np.random.default_rng(4), 20)
    k_alone = kv[:, 0].clone()
    rerotate_k(k_alone, p, q, cfg)

    out = torch.full_like(kv, float("nan"))
    rerotate_k(kv, p, q, cfg, out=out)
    assert torch.equal(kv.view(torch.int16), before.view(torch.int16))
    rerotate_k(kv, p, q, cfg)
    for result in (kv, out):
        assert torch.equal(result[:, 1].view(torch.int16), before[:, 1].view(torch.int16))
        assert torch.equal(result[:, 0].view(torch.int16), k_alone.view(torch.int16))


def test_nan_results_are_the_positive_quiet_nan() -> None:
    # inf - inf is NaN: negative on x86, positive on NVIDIA GPUs; both kernels write +NaN
    k = np.full((1, 2, 1, 4), np.inf, np.float16)
    rerotate_k(k, [0, 0], [1, 2], RopeConfig(4))
    assert np.isnan(k).any()
    assert set(k.view(np.uint16)[np.isnan(k)].tolist()) == {0x7E00}


# ------------------------------------------------------------------------------ refusals


def _bad_calls() -> dict[str, Callable[[np.ndarray, RopeConfig], object]]:
    p = np.arange(8)
    return {
        "short from_pos": lambda k, c: rerotate_k(k, p[:7], p, c),
        "long to_pos": lambda k, c: rerotate_k(k, p, np.arange(9), c),
        "2-d positions": lambda k, c: rerotate_k(k, p, p.reshape(1, 8), c),
        "float positions": lambda k, c: rerotate_k(k, p, p + 0.5, c),
        "integer k": lambda k, c: rerotate_k(k.view(np.int32), p, p + 1, c),
        "3-d k": lambda k, c: rerotate_k(k[0], p, p + 1, c),
        "not KV": lambda k, c: rerotate_k(np.zeros((2, 3, 8, 2, 16), np.float32), p, p, c),
        "head_dim": lambda k, c: rerotate_k(k, p, p + 1, RopeConfig(8)),
        "strided k": lambda k, c: rerotate_k(k[..., ::2], p, p + 1, RopeConfig(8)),
        "out shape": lambda k, c: rerotate_k(k, p, p + 1, c, out=np.zeros_like(k[:1])),
        "out dtype": lambda k, c: rerotate_k(k, p, p + 1, c, out=k.astype(np.float16)),
        "out overlaps": lambda k, c: rerotate_k(
            k.reshape(-1)[:256].reshape(1, 8, 2, 16), p, p + 1, c,
            out=k.reshape(-1)[32:288].reshape(1, 8, 2, 16),
        ),
        "read-only k": lambda k, c: rerotate_k(np.lib.stride_tricks.as_strided(k, writeable=False),
                                               p, p + 1, c),
        "config": lambda k, c: rerotate_k(k, p, p + 1, {"head_dim": 16}),  # type: ignore[arg-type]
    }  # fmt: skip


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_arguments_are_refused_before_anything_is_written(case: str) -> None:
    cfg = RopeConfig(16)
    k = np.random.default_rng(5).standard_normal((2, 8, 2, 16)).astype(np.float32)
    before = k.copy()
    with pytest.raises(RopeError):
        _bad_calls()[case](k, cfg)
    assert np.array_equal(k.view(np.uint32), before.view(np.uint32))


@pytest.mark.parametrize(
    "make",
    [
        lambda: RopeConfig(64, rotary_dim=15),
        lambda: RopeConfig(64, rotary_dim=66),
        lambda: RopeConfig(64, rotary_dim=0),
        lambda: RopeConfig(64, pairing="interleaved"),  # type: ignore[arg-type]
        lambda: RopeConfig(64, base=1.0),
        lambda: RopeConfig(64, scaling=RopeScaling("yarn", 4.0)),
        lambda: RopeConfig(64, scaling=RopeScaling("longrope", 4.0)),  # type: ignore[arg-type]
        lambda: RopeConfig(64, scaling=RopeScaling("linear", 0.0)),
    ],
    ids=["odd rotary", "rotary > head", "no rotary", "pairing", "base", "yarn length", "longrope",
         "factor"],
)  # fmt: skip
def test_bad_configs_are_refused(make: Callable[[], RopeConfig]) -> None:
    with pytest.raises(RopeError):
        make()


# ------------------------------------------------------------------------------ GPU


def _random_k(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Normal values with some near each end of the dtype's range: subnormals, overflow."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(shape, generator=g)
    big = 3e4 if dtype == torch.float16 else 1e37
    tiny = 1e-6 if dtype == torch.float16 else 1e-39
    pick = torch.rand(shape, generator=g)
    k = torch.where(pick < 0.05, k * big, torch.where(pick > 0.95, k * tiny, k))
    return k.to(dtype)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pairing", ["neox", "gptj"])
@pytest.mark.parametrize("scaling", ["plain", "yarn"])
@pytest.mark.parametrize("aligned", [True, False], ids=["vectors", "words"])
def test_gpu_bits_equal_the_cpu_twin(
    dtype: torch.dtype, pairing: str, scaling: str, aligned: bool
) -> None:
    cfg = RopeConfig(128, base=1e6, pairing=pairing, scaling=SCALINGS[scaling])  # type: ignore[arg-type]
    shape = (4, 300, 8, 128)
    k = _random_k(shape, dtype, seed=11)
    p, q = positions(np.random.default_rng(11), 300)
    # one word off 16-byte alignment: the kernel falls back from vectors to words
    off = int(not aligned)
    on_gpu = torch.empty(k.numel() + 1, dtype=dtype, device="cuda")[off : off + k.numel()]
    on_gpu = on_gpu.view(shape).copy_(k)
    rerotate_k(k, p, q, cfg)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # the copy above
    event = rerotate_k(on_gpu, p, q, cfg, stream=stream)
    event.synchronize()
    assert event.done
    word = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(on_gpu.cpu().view(word), k.view(word))


@gpu
def test_gpu_kv_out_of_place_with_partial_rotary_equals_the_cpu_twin() -> None:
    import cupy

    cfg = RopeConfig(96, rotary_dim=32, pairing="gptj", scaling=SCALINGS["yarn"])
    kv = _random_k((3, 2, 70, 4, 96), torch.float16, seed=12)
    p, q = positions(np.random.default_rng(12), 70)
    out = torch.full_like(kv, float("nan"))
    rerotate_k(kv, p, q, cfg, out=out)
    gpu_kv = cupy.asarray(kv.numpy())
    gpu_out = cupy.full(gpu_kv.shape, cupy.nan, cupy.float16)
    stream = cupy.cuda.Stream(non_blocking=True)
    event = rerotate_k(gpu_kv, p, q, cfg, out=gpu_out, stream=stream)
    event.synchronize()
    assert np.array_equal(gpu_out.get().view(np.uint16), out.numpy().view(np.uint16))
    assert np.array_equal(gpu_kv.get().view(np.uint16), kv.numpy().view(np.uint16))
