"""Every registered codec through one contract: round trips, `out`, specs, and decoders fed
random, truncated and bit-flipped containers (property-based, with hypothesis).

Codec-specific accuracy lives in each codec's own test file; this one holds them all to
the same rules: the container says everything needed to decode it, a lossless codec is
byte-exact, a lossy one returns the same tensor every time, and nothing damaged decodes.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from cross_fixture import LayeredKV
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore import codecs
from kvstore.codecs import ContainerError, codec_from_spec, codec_names, decode, decode_values
from kvstore.errors import InvalidArgument

KV_SHAPE = (2, 2, 40, 3, 16)  # [layers, 2, tokens, heads, head_dim]: small, odd token count


def kv(seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(KV_SHAPE, generator=g) * 2).to(dtype)


CODECS = codec_names()
# A codec that needs a file to exist gets one: cachegen-x (and -zstd) a profile with maps
# for KV_SHAPE.
_FILES = Path(tempfile.mkdtemp(prefix="kvstore-codec-tests-"))
atexit.register(shutil.rmtree, _FILES, True)
_X_PROFILE = LayeredKV(KV_SHAPE[0], KV_SHAPE[3], KV_SHAPE[4]).profile_file(_FILES / "x.json")
_XKV_PROFILE = LayeredKV(KV_SHAPE[0], KV_SHAPE[3], KV_SHAPE[4]).profile_file(
    _FILES / "xkv.json", kv=True
)
DEFAULT_SPECS = {name: name for name in CODECS} | {
    name: f"{name}:profile={_X_PROFILE}" for name in ("cachegen-x", "cachegen-x-zstd")
}
# Specs under names of their own (the same on every test worker).
for _name in ("cachegen-x", "cachegen-x-zstd"):
    DEFAULT_SPECS[f"{_name} kv-maps"] = f"{_name}:profile={_XKV_PROFILE}"


def spec_of(name: str) -> str:
    """The spec of codec `name` at its defaults, with the files it needs (other specs as
    they are)."""
    return DEFAULT_SPECS.get(name, name)


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_round_trip_keeps_shape_and_dtype(name: str, dtype: torch.dtype) -> None:
    codec = codec_from_spec(spec_of(name))
    t = kv(1, dtype)
    data = codec.encode(t)
    got = decode(data)
    assert got.dtype == t.dtype and got.shape == t.shape
    if codec.lossless:
        assert torch.equal(got, t)
    else:
        assert torch.isfinite(got).all()
        assert torch.equal(decode(data), got)  # deterministic
        err = (got.float() - t.float()).norm() / t.float().norm()
        assert err < 0.5, f"{name}: relative error {err:.3f}"


@pytest.mark.parametrize("name", CODECS)
def test_decode_into_out_and_refusals(name: str) -> None:
    codec = codec_from_spec(spec_of(name))
    t = kv(2)
    data = codec.encode(t)
    out = torch.empty_like(t)
    assert decode(data, out) is out
    assert torch.equal(out, decode(data))
    flat = torch.empty(t.numel(), dtype=t.dtype)  # same size, other shape: fine
    assert torch.equal(decode(data, flat).view(t.shape), out)
    with pytest.raises(InvalidArgument, match="out is"):
        decode(data, torch.empty(t.shape, dtype=torch.float32))
    with pytest.raises(InvalidArgument, match="out is"):
        decode(data, torch.empty(3, dtype=t.dtype))


@pytest.mark.parametrize("name", CODECS)
def test_codec_decodes_only_its_own_containers(name: str) -> None:
    other = "raw" if name != "raw" else "zstd"
    data = codec_from_spec(other).encode(kv(3))
    with pytest.raises(ContainerError, match=f"made by codec {other}"):
        codec_from_spec(spec_of(name)).decode(data)


def test_specs_are_parsed_strictly() -> None:
    assert codec_from_spec("zstd:level=5").spec() == "zstd:level=5,shuffle=1"
    assert codec_from_spec(" zstd : level = 7 ").params["level"] == 7
    with pytest.raises(InvalidArgument, match="unknown codec 'lz4'"):
        codec_from_spec("lz4")
    with pytest.raises(InvalidArgument, match="no parameter 'speed'"):
        codec_from_spec("zstd:speed=1")
    with pytest.raises(InvalidArgument, match="not a int"):
        codec_from_spec("zstd:level=high")
    with pytest.raises(InvalidArgument, match="1-19"):
        codec_from_spec("zstd:level=40")
    with pytest.raises(InvalidArgument, match="key=value"):
        codec_from_spec("zstd:level")


def test_zstd_shuffle_helps_on_real_looking_kv() -> None:
    """Nearby KV values share their high bytes; the shuffle lets zstd see that."""
    g = torch.Generator().manual_seed(5)
    t = (torch.randn(8, 2, 256, 4, 64, generator=g) * 0.5).to(torch.bfloat16)  # 1 MiB
    plain = len(codec_from_spec("zstd:shuffle=0").encode(t))
    shuffled = len(codec_from_spec("zstd:shuffle=1").encode(t))
    assert shuffled < 0.95 * plain


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int64])
@pytest.mark.parametrize("elements", [1, 3, 1000, 65_537])
def test_zstd_payload_is_the_byte_planes_of_the_value(dtype: torch.dtype, elements: int) -> None:
    """The stored layout (byte j of every element, plane after plane) is the format: older
    containers decode only if every build lays the planes out the same."""
    import zstandard

    g = torch.Generator().manual_seed(elements)
    t = torch.randint(-(2**15), 2**15, (elements,), generator=g).to(dtype)
    blob = codec_from_spec("zstd").encode(t)
    raw = t.view(torch.uint8).numpy()
    planes = raw.reshape(elements, t.element_size()).T.reshape(-1).tobytes()
    assert codecs.decode(blob).view(torch.uint8).equal(t.view(torch.uint8))
    stored = codec_from_spec("zstd").encode_payload(t)
    assert zstandard.ZstdDecompressor().decompress(stored) == planes


def test_every_codec_is_exported() -> None:
    assert {"raw", "zstd"} <= set(CODECS)
    assert codecs.decode is codecs.decode_value


# ------------------------------------------------------------ damaged containers

# Every codec at its defaults, the older payload formats a codec still reads, and cachegen-x
# (and -zstd) with V predicted from K too.
FUZZED = [*CODECS, "cachegen:version=1", "cachegen-x kv-maps", "cachegen-x-zstd kv-maps"]
_CONTAINERS = {name: codec_from_spec(spec_of(name)).encode(kv(4)) for name in FUZZED}
_FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _decodes_right_or_refuses(data: bytes, original: bytes) -> None:
    """A damaged container is refused; the only acceptable success is the right tensor."""
    try:
        got = decode(data)
    except ContainerError:
        return
    assert torch.equal(got, decode(original))


@pytest.mark.parametrize("name", FUZZED)
@_FUZZ
@given(cut=st.integers(min_value=0))
def test_truncated_containers_are_refused(name: str, cut: int) -> None:
    data = _CONTAINERS[name]
    n = cut % len(data)
    with pytest.raises(ContainerError):
        decode(data[:n])


@pytest.mark.parametrize("name", FUZZED)
@_FUZZ
@given(flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 7)), min_size=1))
def test_bit_flipped_containers_are_refused(name: str, flips: list[tuple[int, int]]) -> None:
    data = bytearray(_CONTAINERS[name])
    for pos, bit in flips:
        data[pos % len(data)] ^= 1 << bit
    _decodes_right_or_refuses(bytes(data), _CONTAINERS[name])


@_FUZZ
@given(junk=st.binary(max_size=4096))
def test_random_bytes_are_refused(junk: bytes) -> None:
    with pytest.raises(ContainerError):
        decode(junk)


@pytest.mark.parametrize("name", FUZZED)
@_FUZZ
@given(extra=st.binary(min_size=1, max_size=64))
def test_trailing_bytes_are_refused(name: str, extra: bytes) -> None:
    with pytest.raises(ContainerError, match="trailing"):
        decode(_CONTAINERS[name] + extra)


@pytest.mark.parametrize("alone", [4 << 20, 0])  # payloads hashed here / on host threads
def test_decode_values_into_cpu_tensors_and_refusing_a_damaged_one(
    alone: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch entry point on the CPU: every value into its tensor; one damaged container
    in the batch raises ContainerError (its payload checksum is checked on the host first,
    before any value is decoded)."""
    import kvstore.codecs.values as values_module

    monkeypatch.setattr(values_module, "_HASH_ALONE_BYTES", alone)
    g = torch.Generator().manual_seed(5)
    ts = [torch.randn((2, 2, 24, 2, 16), generator=g).to(torch.float16) for _ in range(3)]
    specs = ("zstd", "cachegen", "int8")
    blobs = [codec_from_spec(s).encode(t) for s, t in zip(specs, ts, strict=True)]
    outs = [torch.empty_like(t) for t in ts]
    decode_values(list(zip(blobs, outs, strict=True))).wait()
    for blob, out in zip(blobs, outs, strict=True):
        assert torch.equal(out, decode(blob))
    damaged = bytearray(blobs[1])
    damaged[-5] ^= 0x10
    fresh = [torch.full_like(t, float("nan")) for t in ts]
    with pytest.raises(ContainerError, match="checksum mismatch"):
        decode_values([(blobs[0], fresh[0]), (bytes(damaged), fresh[1]), (blobs[2], fresh[2])])
    assert all(t.isnan().all() for t in fresh)  # refused before anything was decoded


def stored_items(values: list[torch.Tensor]) -> list[tuple[Any, memoryview]]:
    """(header, bytes) of each host tensor, as a tier holds a value before encoding it."""
    from kvstore.codecs.container import ValueHeader, checksum
    from kvstore.codecs.values import tensor_bytes
    from kvstore.dtypes import dtype_name

    out = []
    for v in values:
        data = tensor_bytes(v)
        out.append((ValueHeader(dtype_name(v), tuple(v.shape), v.nbytes, checksum(data)), data))
    return out


@pytest.mark.parametrize("spec", ["raw", "zstd", "int8", "cachegen:level=1"])
def test_stored_batches_without_a_gpu_are_each_values_own(spec: str) -> None:
    """`encode_stored_many` with no GPU (or a codec that encodes on the host only) gives
    what `encode_stored` gives each value."""
    from kvstore.codecs.values import encode_stored, encode_stored_many

    codec = codec_from_spec(spec)
    g = torch.Generator().manual_seed(5)
    items = stored_items([torch.randn(2, 2, 40, 2, 32, generator=g).half() for _ in range(3)])
    got = encode_stored_many(codec, items, None)
    want = [encode_stored(codec, h, b) for h, b in items]
    assert [(h, bytes(p)) for h, p in got] == [(h, bytes(p)) for h, p in want]
    assert got[0][0].codec == codec.codec_id
