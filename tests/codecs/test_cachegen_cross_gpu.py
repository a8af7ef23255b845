"""cachegen-x decodes on the GPU bit for bit as on the host (needs a CUDA GPU and CuPy)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cross_fixture import LayeredKV

from kvstore.codecs import ContainerError, codec_from_spec, decode, decode_values

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[LayeredKV, Path]]:
    """Models' shapes and their profiles: SmolLM2's (30 x 3 x 64), a small one, heads of 128
    (a lane's K channels pair with its own: 4 a lane) and of 80 (they pair through the
    warp's shared row), with 8-bit maps; the small one with 16-bit maps; and with V
    predicted from K too (kv maps): SmolLM2's, the small one, and channels that are not a
    multiple of 8 (float64 GEMMs)."""
    out = []
    shapes = [(30, 3, 64, 8), (4, 2, 16, 8), (3, 2, 128, 8), (2, 1, 80, 8), (4, 2, 16, 16)]
    shapes += [(30, 3, 64, "kv"), (4, 2, 16, "kv"), (3, 1, 18, "kv")]
    for i, (layers, heads, dim, bits) in enumerate(shapes):
        kv = bits == "kv"
        world = LayeredKV(layers, heads, dim, seed=i, gain=1.0, v_from_k=0.8 if kv else 0.0)
        path = tmp_path_factory.mktemp("x") / "p.json"
        out.append((world, world.profile_file(path, bits=8 if kv else int(bits), kv=kv)))
    return out


@pytest.mark.parametrize(
    ("dtype", "split"),
    [(torch.float16, False), (torch.bfloat16, False), (torch.float32, False), (torch.half, True)],
)
def test_gpu_decode_is_the_host_decode(
    worlds: list[tuple[LayeredKV, Path]],
    dtype: torch.dtype,
    split: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch of values of several profiles, at several positions and token counts (a
    partial chunk, a single token), decodes on the GPU to the host decoder's bits; `split`:
    with the batch copied in pieces and each profile's values run as two halves (what
    batches of more than a few MiB do)."""
    import kvstore.kernels.cachegen as kc
    import kvstore.kernels.cachegen_cross as kx

    if split:
        monkeypatch.setattr(kc, "PIECE_BYTES", 2000)
        monkeypatch.setattr(kx, "SPLIT_ROWS", 1)
    items, wants = [], []
    for n, (world, path) in enumerate(worlds):
        for j, (tokens, position) in enumerate([(256, 0), (256, 512), (37, 1024), (1, 5)]):
            t = world.tensor(tokens, position, seed=10 * n + j, dtype=dtype)
            codec = codec_from_spec(f"cachegen-x:level={j % 4},profile={path}")
            blob = codec.for_position(position).encode(t)
            wants.append(decode(blob))
            items.append((blob, torch.empty(t.shape, dtype=dtype, device="cuda")))
    decode_values(items).wait()
    for (_, out), want in zip(items, wants, strict=True):
        assert torch.equal(out.cpu(), want)
    blob, out = items[1]
    assert decode(blob, out) is out and torch.equal(out.cpu(), wants[1])


def test_a_damaged_payload_is_refused_on_the_gpu(worlds: list[tuple[LayeredKV, Path]]) -> None:
    from kvstore.codecs import decode_header
    from kvstore.kernels.cachegen_cross import decode_x_on_gpu

    world, path = worlds[1]
    codec = codec_from_spec(f"cachegen-x:profile={path}").for_position(64)
    t = world.tensor(128, 64, seed=3)
    blob = codec.encode(t)
    header, at = decode_header(blob)
    out = torch.empty(t.shape, dtype=t.dtype, device="cuda")
    decode_x_on_gpu([(codec, memoryview(blob)[at:], out, header.value_checksum)]).wait()
    assert torch.equal(out.cpu(), decode(blob))
    payload = bytearray(memoryview(blob)[at:])
    payload[len(payload) // 2] ^= 0x5A  # inside the streams: a wrong symbol or a bad lane
    with pytest.raises(ContainerError):
        decode_x_on_gpu([(codec, memoryview(payload), out, header.value_checksum)]).wait()


@pytest.mark.parametrize("tokens", [[1], [5, 3], [16], [17]])
def test_small_batches_decode_as_on_the_host(
    worlds: list[tuple[LayeredKV, Path]], tokens: list[int]
) -> None:
    """Batches of a few rows (the int8 GEMM's shortest cases, one token and rows that are
    not a multiple of its tiles) decode to the host's bits."""
    world, path = worlds[0]
    codec = codec_from_spec(f"cachegen-x:level=1,profile={path}")
    items, wants = [], []
    for i, n in enumerate(tokens):
        t = world.tensor(n, 40 * i, seed=90 + i)
        blob = codec.for_position(40 * i).encode(t)
        wants.append(decode(blob))
        items.append((blob, torch.empty(t.shape, dtype=t.dtype, device="cuda")))
    decode_values(items).wait()
    for (_, out), want in zip(items, wants, strict=True):
        assert torch.equal(out.cpu(), want)
