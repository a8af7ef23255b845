"""cachegen decoding on the GPU (`kvstore.kernels.cachegen`): the same bits as the CPU
decoder for every dtype, level and predictor, batches of values of different shapes in one
launch, and damaged payloads or wrong checksums refused. Needs a CUDA GPU."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from kvstore.codecs import ContainerError, codec_from_spec, decode, decode_values
from kvstore.codecs.cachegen import LEVELS, VERSIONS, CacheGen
from kvstore.codecs.container import checksum
from kvstore.codecs.values import tensor_bytes
from kvstore.kernels.cachegen import Job, decode_on_gpu

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def smooth_kv(layers: int, tokens: int, heads: int, dim: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(layers, 2, 1, heads, dim, generator=g) * 2
    drift = torch.cumsum(torch.randn(layers, 2, tokens, heads, dim, generator=g) * 0.05, dim=2)
    return base + drift


def awkward_kv(dtype: torch.dtype) -> torch.Tensor:
    """Escapes (sinks, outliers, a float16 subnormal), zero steps and subnormal steps, a
    value near the top of float16's range; 37 tokens: two rANS segments, the second short."""
    t = smooth_kv(layers=4, tokens=37, heads=2, dim=24)
    t[:, :, 0] *= 30
    t[1, :, :, 1, 3] = 0.5
    t[2, 0, 20, 0, 5] = 1e-6
    t[3, 1, :, 0] *= 1e-4
    t[0, 1, 9, 1, 7] = 40.0
    t[2, 1, 4, 0, 0] = 60000.0
    return t.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [0, 1])
@pytest.mark.parametrize("level", sorted(LEVELS))
@pytest.mark.parametrize("version", VERSIONS)
def test_gpu_decode_is_bit_exact(dtype: torch.dtype, level: int, k: int, version: int) -> None:
    """Every payload format (version 2: a step per head; 1: per channel)."""
    t = awkward_kv(dtype)
    data = codec_from_spec(f"cachegen:level={level},k={k},version={version}").encode(t)
    want = decode(data)
    out = torch.full_like(t, float("nan"), device="cuda")
    assert decode(data, out) is out
    assert torch.equal(out.cpu(), want)


@pytest.mark.parametrize("piece_bytes", [16 << 20, 1, 50_000])
def test_a_batch_of_shapes_in_one_launch(piece_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Values of different shapes, dtypes and levels (head dims 64 and 128, 1 to 300
    tokens, a value with no tokens) decode together, each into its own tensor: copied and
    decoded in one piece, and in pieces of one value or of several."""
    import kvstore.kernels.cachegen as kc

    monkeypatch.setattr(kc, "PIECE_BYTES", piece_bytes)
    seen: list[list[tuple[int, int]]] = []
    pieces = kc.Staged.pieces
    monkeypatch.setattr(kc.Staged, "pieces", lambda self: seen.append(pieces(self)) or seen[-1])
    shapes = [(3, 1, 2, 64), (2, 300, 8, 128), (30, 256, 3, 64), (1, 0, 1, 64), (5, 33, 4, 32)]
    items, wants = [], []
    for i, (layers, tokens, heads, dim) in enumerate(shapes):
        dtype = (torch.float16, torch.bfloat16)[i % 2]
        t = smooth_kv(layers, tokens, heads, dim, seed=i).to(dtype)
        data = codec_from_spec(f"cachegen:level={i % 4},version={VERSIONS[i % 2]}").encode(t)
        items.append((data, torch.empty_like(t, device="cuda")))
        wants.append(decode(data))
    handle = decode_values(items)
    handle.wait()
    assert handle.is_done()
    for (_, out), want in zip(items, wants, strict=True):
        assert torch.equal(out.cpu(), want)
    runs = seen[-1]
    assert runs[0][0] == 0 and runs[-1][1] == len(items)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(runs))
    assert (len(runs) == 1) == (piece_bytes == 16 << 20)


def test_other_codecs_in_the_same_call_decode_on_the_cpu() -> None:
    t = smooth_kv(2, 40, 2, 32).to(torch.bfloat16)
    items = [(codec_from_spec(s).encode(t), torch.empty_like(t, device="cuda"))
             for s in ("int8", "cachegen", "zstd")]  # fmt: skip
    decode_values(items, torch.cuda.current_stream()).wait()
    for data, out in items:
        assert torch.equal(out.cpu(), decode(data))


def _job(t: torch.Tensor, payload: bytes, want: int) -> Job:
    return Job(CacheGen(), memoryview(payload), torch.empty_like(t, device="cuda"), want)


def test_damaged_streams_and_checksums_are_refused() -> None:
    """Behind the container's checksum (which would catch these first): a flipped stream
    byte is refused by the rANS checks or by the value's checksum, a wrong checksum is
    refused, and a truncated payload fails before anything launches."""
    t = smooth_kv(4, 64, 2, 64).to(torch.float16)
    codec = CacheGen()
    payload = codec.encode_payload(t)
    back = torch.empty_like(t)
    codec.decode_payload(memoryview(payload), back)
    right = checksum(tensor_bytes(back))
    decode_on_gpu([_job(t, payload, right)]).wait()  # the undamaged payload passes
    with pytest.raises(ContainerError, match="checksum"):
        decode_on_gpu([_job(t, payload, right ^ 1)]).wait()
    rng = np.random.default_rng(0)
    tail = len(payload) // 2  # inside the streams
    for _ in range(20):
        forged = bytearray(payload)
        forged[tail + int(rng.integers(len(payload) - tail))] ^= 1 << int(rng.integers(8))
        with pytest.raises(ContainerError):
            decode_on_gpu([_job(t, bytes(forged), right)]).wait()
    with pytest.raises(ContainerError):
        decode_on_gpu([_job(t, payload[: len(payload) // 3], right)])
