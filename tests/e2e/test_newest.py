"""The newest chunk of a sequence (`put_prefix` marks its last whole chunk and a partial one
after it; `put(newest=True)` and `batch_put(newest=...)` any value) is coded finer by a lossy
ssd codec that has a setting for it (`cachegen:newest=LEVEL`); the others at the level."""

from __future__ import annotations

import pytest
import torch

from kvstore.codecs import codec_from_spec, decode
from kvstore.errors import InvalidArgument

MiB = 1 << 20
CHUNK = 256  # the server's default --chunk-tokens
DIMS = (4, 2, 0, 4, 64)  # [layers, K/V, tokens, heads, head_dim]: 4 KiB of float16 a token


def kv(tokens: int, seed: int) -> torch.Tensor:
    """KV-like float16: channels with their own offsets, drifting slowly along the tokens."""
    g = torch.Generator().manual_seed(seed)
    shape = (DIMS[0], 2, tokens, *DIMS[3:])
    base = torch.randn(DIMS[0], 2, 1, *DIMS[3:], generator=g) * 2
    return (base + torch.cumsum(torch.randn(shape, generator=g) * 0.05, dim=2)).to(torch.float16)


def coded(spec: str, value: torch.Tensor) -> torch.Tensor:
    """What `spec` decodes `value` to: the bits a server storing it through `spec` serves."""
    return decode(codec_from_spec(spec).encode(value))


def test_a_prefix_s_newest_chunks_are_coded_finer_on_ssd(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server(
        "--cpu-bytes", "8MiB", "--ssd-bytes", "64MiB", "--codec", "ssd=cachegen:level=3,newest=0"
    )  # fmt: skip
    with srv.client() as c:
        tokens = list(range(1000, 1000 + 4 * CHUNK + 100))  # 4 whole chunks and a partial
        prefix = kv(len(tokens), 1)
        assert c.put_prefix(tokens, prefix) == 5
        keys = c.prefix_keys(tokens)
        filler = [bytes([0xF0, i]) + bytes(30) for i in range(12)]
        for i, k in enumerate(filler):  # 12 MiB more: the prefix goes down to ssd
            c.put(k, kv(CHUNK, 100 + i))
        where = {e.header.key: e.tier for e in c.entries(c.namespace)}
        assert all(where[k] == "ssd" for k in keys)
        for i, k in enumerate(keys):
            chunk = prefix[:, :, i * CHUNK : (i + 1) * CHUNK].contiguous()
            level = 0 if i >= 3 else 3  # the last whole chunk and the partial one: finer
            got = c.get(k)
            assert got is not None and torch.equal(got, coded(f"cachegen:level={level}", chunk)), i


def test_values_a_client_marks_newest(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server(
        "--cpu-bytes", "4MiB", "--ssd-bytes", "64MiB", "--codec", "ssd=cachegen:level=3,newest=1"
    )  # fmt: skip
    keys = [bytes([0xA0, i]) + bytes(30) for i in range(8)]
    values = [kv(CHUNK, i) for i in range(8)]
    with srv.client() as c:
        c.put(keys[0], values[0], newest=True)
        c.put(keys[1], values[1])
        # Keys as any bytes-like object, in the put and in `newest`.
        c.batch_put([bytearray(k) for k in keys[2:]], values[2:], newest=[memoryview(keys[4])])
        with pytest.raises(InvalidArgument, match="newest names a key this put does not store"):
            c.batch_put(keys[:1], values[:1], newest=[keys[5]])
        for i in range(8):  # 8 MiB more: every value above goes down to ssd
            c.put(bytes([0xB0, i]) + bytes(30), kv(CHUNK, 50 + i))
        for i, k in enumerate(keys):
            level = 1 if i in (0, 4) else 3
            got = c.get(k)
            assert got is not None and torch.equal(got, coded(f"cachegen:level={level}", values[i]))
