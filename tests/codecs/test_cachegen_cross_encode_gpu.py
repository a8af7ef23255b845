"""cachegen-x encodes on the GPU (`kvstore.kernels.cachegen_cross_encode`) byte for byte
as on the host, with the checksum of the same decoded value; values it cannot take are
refused by name. Needs a CUDA GPU (the host encoder is its twin, tested everywhere)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from cross_fixture import LayeredKV

from kvstore.codecs import codec_from_spec, decode, decode_header
from kvstore.codecs.base import ValuesRefused
from kvstore.codecs.container import checksum
from kvstore.codecs.values import tensor_bytes
from tests.codecs.test_cachegen_cross_gpu import worlds

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

__all__ = ["worlds"]  # the decoder's worlds: the same shapes, maps and kv maps


def host(codec: object, t: torch.Tensor) -> tuple[bytes, int]:
    payload, back = codec.encode_with_value(t)  # type: ignore[attr-defined]
    return payload, checksum(tensor_bytes(back))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_encode_is_the_hosts(worlds: list[tuple[LayeredKV, Path]], dtype: torch.dtype) -> None:
    """Every world (8- and 16-bit maps, kv maps, float64 GEMMs), values at several positions
    and levels in one batch, chunks of several token counts (a partial one, one token)."""
    from kvstore.kernels.cachegen_cross_encode import encode_x_many_on_gpu

    for n, (world, path) in enumerate(worlds):
        for tokens in (256, 37, 1):
            codecs, values = [], []
            for j, position in enumerate([0, 512, 1024, 5]):
                spec = f"cachegen-x:level={j % 4},profile={path}"
                codecs.append(codec_from_spec(spec).for_position(position))
                values.append(world.tensor(tokens, position, seed=10 * n + j, dtype=dtype))
            got = encode_x_many_on_gpu(codecs, [v.cuda() for v in values])
            for c, v, (payload, value_sum) in zip(codecs, values, got, strict=True):
                assert (bytes(payload), value_sum) == host(c, v), (n, tokens, c.params)


def test_host_values_and_a_single_codec(worlds: list[tuple[LayeredKV, Path]]) -> None:
    """Host values copied to the GPU named, one codec for all, and a value whose codec has
    no position (searched for on the host, as the host encoder does)."""
    from kvstore.kernels.cachegen_cross_encode import encode_x_many_on_gpu

    world, path = worlds[5]  # SmolLM2's shape with kv maps
    codec = codec_from_spec(f"cachegen-x:level=1,profile={path}").for_position(768)
    values = [world.tensor(256, 768, seed=s) for s in (1, 2)]
    got = encode_x_many_on_gpu(codec, values, 0)
    assert [(bytes(p), s) for p, s in got] == [host(codec, v) for v in values]
    search = codec_from_spec(f"cachegen-x:level=1,profile={path}")
    ((payload, _),) = encode_x_many_on_gpu(search, values[:1], 0)
    assert bytes(payload) == search.encode_payload(values[0])


def test_the_container_from_a_cuda_tensor_decodes(worlds: list[tuple[LayeredKV, Path]]) -> None:
    world, path = worlds[0]
    codec = codec_from_spec(f"cachegen-x:level=2,profile={path}").for_position(256)
    t = world.tensor(256, 256, seed=7, dtype=torch.bfloat16)
    data = codec.encode(t.cuda())  # encode_value: on the GPU
    host_data = codec.encode(t)
    (got, at), (want, at_host) = decode_header(data), decode_header(host_data)
    assert replace(got, created_ns=0) == replace(want, created_ns=0)  # the same checksums
    assert data[at:] == host_data[at_host:]
    assert torch.equal(decode(data), decode(host_data))


def test_values_it_cannot_take_are_refused_by_name(worlds: list[tuple[LayeredKV, Path]]) -> None:
    from kvstore.kernels.cachegen_cross_encode import encode_x_many_on_gpu

    world, path = worlds[1]
    codec = codec_from_spec(f"cachegen-x:profile={path}").for_position(0)
    good = world.tensor(64, 0, seed=1, dtype=torch.float32).cuda()
    far = good.clone()
    far[1, 1, 3, 0, 2] = 1e6  # a V value past float16's range
    with pytest.raises(ValuesRefused, match="float16's range") as got:
        encode_x_many_on_gpu(codec, [good, far])
    assert got.value.indexes == [1]
    other = world.tensor(64, 0, seed=1)[:, :, :, :1].contiguous().cuda()  # one head of two
    with pytest.raises(ValuesRefused, match="KV heads") as got:
        encode_x_many_on_gpu(codec, [other, good])
    assert got.value.indexes == [0]
    ((payload, _),) = encode_x_many_on_gpu(codec, [good])  # nothing lost: it still encodes
    assert bytes(payload) == codec.encode_payload(good.cpu())


def test_batches_of_one_shape_share_a_plan_each_encoded_as_the_host(
    worlds: list[tuple[LayeredKV, Path]],
) -> None:
    """A batch of the shape, count and dtype of one before it runs that batch's CUDA graph
    in its buffers (the values, positions, levels and refusals each batch's own); the
    buffers go when the GPU's memory is given back."""
    import kvstore.kernels.cachegen_cross_encode as xe
    from kvstore.kernels._cuda import release_memory

    def plans() -> list[object]:
        return [p for ps in xe._idle.values() for p in ps if p.key[0] == 0 and p.key[-1] == 3]

    world, path = worlds[5]  # SmolLM2's shape with kv maps
    release_memory(0)
    assert plans() == []
    first = None
    for n in range(4):
        positions = [64 * n, 1000 + n, 5]
        codecs = [
            codec_from_spec(f"cachegen-x:level={(n + j) % 3},profile={path}").for_position(p)
            for j, p in enumerate(positions)
        ]
        values = [world.tensor(48, p, seed=10 * n + j) for j, p in enumerate(positions)]
        if n == 2:  # a value past float16's range: refused, and the next batch unharmed
            values[1][0, 0, 2, 1, 3] = 1e6
            with pytest.raises(ValuesRefused, match="float16's range") as refused:
                xe.encode_x_many_on_gpu(codecs, values, 0)
            assert refused.value.indexes == [1]
        else:
            got = xe.encode_x_many_on_gpu(codecs, values, 0)
            for c, v, (payload, value_sum) in zip(codecs, values, got, strict=True):
                assert (bytes(payload), value_sum) == host(c, v), (n, c.params)
        (plan,) = plans()
        first = first or plan
        assert plan is first and plan.graph is not None  # type: ignore[attr-defined]
    release_memory(0)
    assert plans() == []
