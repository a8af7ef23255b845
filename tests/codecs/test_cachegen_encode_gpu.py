"""cachegen encoding on the GPU (`kvstore.kernels.cachegen_encode`): the same payload as the
CPU encoder and the checksum of the same decoded value, for every dtype, level, predictor
and payload format, awkward values included; values it cannot take refused. Needs a CUDA
GPU (the CPU encoder is its twin, tested everywhere)."""

from __future__ import annotations

import pytest
import torch

from kvstore.codecs import codec_from_spec, decode
from kvstore.codecs.base import ValuesRefused
from kvstore.codecs.cachegen import LEVELS, VERSIONS
from kvstore.codecs.container import checksum
from kvstore.codecs.values import tensor_bytes
from kvstore.errors import InvalidArgument
from tests.codecs.test_cachegen_gpu import awkward_kv, smooth_kv
from tests.codecs.test_codecs import stored_items

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def encode_both(spec: str, t: torch.Tensor) -> tuple[bytes, int, bytes, int]:
    from kvstore.kernels.cachegen_encode import encode_on_gpu

    codec = codec_from_spec(spec)
    cpu, back = codec.encode_with_value(t)
    gpu, value_sum = encode_on_gpu(codec, t.cuda())
    return cpu, checksum(tensor_bytes(back)), gpu, value_sum


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [0, 1])
@pytest.mark.parametrize("level", sorted(LEVELS))
@pytest.mark.parametrize("version", VERSIONS)
def test_gpu_encode_is_the_cpus(dtype: torch.dtype, level: int, k: int, version: int) -> None:
    t = awkward_kv(dtype)
    cpu, cpu_sum, gpu, gpu_sum = encode_both(f"cachegen:level={level},k={k},version={version}", t)
    assert gpu == cpu
    assert gpu_sum == cpu_sum


@pytest.mark.parametrize(
    "shape", [(30, 256, 3, 64), (2, 300, 8, 128), (3, 1, 2, 64), (1, 0, 1, 64), (2, 5, 1, 8)]
)
def test_shapes(shape: tuple[int, int, int, int]) -> None:
    """A SmolLM2-sized chunk, a long one with 128-channel heads, one token, none, and a
    value too short for the GPU's checksum (hashed on the host)."""
    t = smooth_kv(*shape, seed=sum(shape)).to(torch.float16)
    cpu, cpu_sum, gpu, gpu_sum = encode_both("cachegen", t)
    assert gpu == cpu and gpu_sum == cpu_sum


def test_a_host_value_is_copied_to_the_gpu_named() -> None:
    from kvstore.kernels.cachegen_encode import encode_on_gpu

    t = awkward_kv(torch.float16)
    codec = codec_from_spec("cachegen:level=1")
    assert encode_on_gpu(codec, t, 0) == encode_on_gpu(codec, t.cuda())
    assert encode_on_gpu(codec, t, 0)[0] == codec.encode_payload(t)
    part = t[:, :, 5:30]  # not contiguous: the tokens of a longer value
    assert not part.is_contiguous()
    assert encode_on_gpu(codec, part, 0)[0] == codec.encode_payload(part.contiguous())
    assert encode_on_gpu(codec, part.cuda(), 0)[0] == codec.encode_payload(part.contiguous())


def test_the_container_made_from_a_gpu_encode_decodes() -> None:
    t = awkward_kv(torch.bfloat16)
    codec = codec_from_spec("cachegen:level=2")
    want = codec.decode(codec.encode(t))
    data = codec.encode(t.cuda())  # encode_value: encoded on the GPU
    assert torch.equal(decode(data), want)


def test_values_out_of_range_are_refused() -> None:
    from kvstore.kernels.cachegen_encode import encode_on_gpu

    t = awkward_kv(torch.float32)
    t[1, 0, 3, 1, 2] = 1e6
    with pytest.raises(InvalidArgument, match="float16's range"):
        encode_on_gpu(codec_from_spec("cachegen"), t.cuda())
    t[1, 0, 3, 1, 2] = float("nan")
    with pytest.raises(InvalidArgument, match="float16's range"):
        encode_on_gpu(codec_from_spec("cachegen"), t.cuda())
    with pytest.raises(InvalidArgument, match="CUDA tensor"):
        encode_on_gpu(codec_from_spec("cachegen"), t)


def test_a_batch_encodes_each_value_as_alone() -> None:
    """Values of several shapes, dtypes and places in one call: those of one shape and
    dtype share the kernels' launches and the tables, and each payload and checksum is
    still the CPU's for that value alone."""
    from kvstore.kernels.cachegen_encode import encode_many_on_gpu

    codec = codec_from_spec("cachegen:level=2")
    values = [
        awkward_kv(torch.float16).cuda(),
        smooth_kv(2, 300, 8, 128, seed=1).to(torch.float16),  # on the host
        awkward_kv(torch.bfloat16).cuda(),
        smooth_kv(4, 40, 3, 64, seed=2).half().cuda(),
        awkward_kv(torch.float16).flip(2).contiguous(),  # the first one's shape, on the host
        smooth_kv(2, 5, 1, 8, seed=3).to(torch.float16).cuda(),  # hashed on the host
        smooth_kv(2, 0, 1, 8, seed=4).to(torch.float16).cuda(),
    ]
    got = encode_many_on_gpu(codec, values, 0)
    assert len(got) == len(values)
    for i, v in enumerate(values):
        payload, back = codec.encode_with_value(v.cpu())
        assert got[i] == (payload, checksum(tensor_bytes(back))), i
    assert encode_many_on_gpu(codec, [], 0) == []


def test_a_value_out_of_range_in_a_batch_is_named() -> None:
    from kvstore.kernels.cachegen_encode import encode_many_on_gpu

    good = awkward_kv(torch.float32).cuda()
    bad = good.clone()
    bad[0, 1, 2, 0, 3] = float("inf")
    with pytest.raises(InvalidArgument, match="value 2: cachegen needs finite values"):
        encode_many_on_gpu(codec_from_spec("cachegen"), [good, good, bad, good])
    # Every refused value is named, so that the others can be sent again without them.
    flat = torch.ones(8, device="cuda")  # not the KV layout
    with pytest.raises(ValuesRefused, match="value 1: codec 'cachegen' needs KV") as info:
        encode_many_on_gpu(codec_from_spec("cachegen"), [good, flat, bad, good, bad])
    assert info.value.indexes == [1]  # the layout is checked before anything is encoded
    with pytest.raises(ValuesRefused, match=r"value 1: .*\(and 1 more values\)") as info:
        encode_many_on_gpu(codec_from_spec("cachegen"), [good, bad, good, bad])
    assert info.value.indexes == [1, 3]


def test_stored_batches_have_the_hosts_headers_and_payloads() -> None:
    from kvstore.codecs.values import encode_stored, encode_stored_many

    codec = codec_from_spec("cachegen:level=1")
    items = stored_items([smooth_kv(3, 64, 2, 64, seed=s).to(torch.bfloat16) for s in range(3)])
    want = [encode_stored(codec, h, b) for h, b in items]
    assert encode_stored_many(codec, items, 0) == want


def test_a_value_still_being_written_by_torch_is_encoded_once_written() -> None:
    """The encoder's own stream waits for what torch queued on the current stream: here a
    long spin and then the copy that writes the value, both still running when it is called."""
    from kvstore.kernels.cachegen_encode import encode_many_on_gpu

    codec = codec_from_spec("cachegen:level=1")
    want = smooth_kv(4, 64, 2, 64, seed=9).half()
    x = torch.zeros_like(want, device="cuda")
    host = want.pin_memory()
    encode_many_on_gpu(codec, [x])  # warm: CuPy's pools would otherwise sync the device
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # ~0.1 s of spinning before the copy below
    x.copy_(host, non_blocking=True)
    ((payload, _),) = encode_many_on_gpu(codec, [x])
    assert payload == codec.encode_payload(want)
