"""The stored-value container header: round trip, version 1 still read, and rejection of
anything damaged."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import xxhash

from kvstore.codecs import container
from kvstore.codecs.container import (
    CODEC_RAW,
    ContainerError,
    ValueHeader,
    checksum,
    decode_header,
    encode_header,
)
from kvstore.dtypes import BY_NAME

HEADER = ValueHeader(
    "bfloat16", (32, 2, 256, 8, 128), 32 * 2 * 256 * 8 * 128 * 2, 0xDEADBEEF, 0, 17
)


def test_checksum_is_xxh3_64() -> None:
    assert checksum(b"") == 0x2D06800538D394C2  # XXH3_64bits of the empty input
    data = bytes(range(256)) * 10
    assert checksum(data) == xxhash.xxh3_64_intdigest(data)
    assert checksum(data) == checksum(bytearray(data)) == checksum(memoryview(data))
    flipped = bytearray(data)
    flipped[1234] ^= 1
    assert checksum(flipped) != checksum(data)


@pytest.mark.parametrize("dtype", sorted(BY_NAME))
@pytest.mark.parametrize("shape", [(), (0,), (7,), (1, 2, 3, 4, 5, 6, 7, 8)])
def test_round_trip(dtype: str, shape: tuple[int, ...]) -> None:
    header = ValueHeader(dtype, shape, 123, 2**64 - 1, CODEC_RAW, 2**63)
    raw = encode_header(header)
    got, length = decode_header(raw)
    assert got == header
    assert length == len(raw) == 50 + 8 * len(shape) + 4


def test_round_trip_with_codec_parameters_and_a_separate_payload() -> None:
    header = ValueHeader("bfloat16", (2, 3), 12, 7, 4, 99, 5, 8, "bits=2;group=32")
    raw = encode_header(header)
    got, length = decode_header(raw)
    assert (got, length) == (header, len(raw))
    assert (got.payload_len, got.payload_checksum) == (5, 8)
    assert got.param_dict() == {"bits": "2", "group": "32"}


def test_version_1_containers_are_still_read() -> None:
    """Records written before codecs existed: raw payload, no parameters."""
    raw = _reseal(_fields(version=1))
    header, length = decode_header(raw)
    assert length == len(raw)
    assert (header.dtype, header.shape, header.value_len, header.codec) == ("float16", (1,), 2, 0)
    assert (header.payload_len, header.payload_checksum) == (2, header.value_checksum)


def test_decode_ignores_payload_after_header() -> None:
    raw = encode_header(HEADER)
    got, length = decode_header(raw + b"payload bytes" * 100)
    assert got == HEADER
    assert length == len(raw)
    got2, _ = decode_header(memoryview(raw + b"xyz"))
    assert got2 == HEADER


def test_zero_created_ns_is_stamped_now() -> None:
    header = ValueHeader("float16", (4,), 8, 1)
    got, _ = decode_header(encode_header(header))
    assert got.created_ns > 1_600_000_000 * 10**9


def test_every_single_byte_corruption_is_rejected() -> None:
    raw = encode_header(HEADER)
    for i in range(len(raw)):
        for bit in (0x01, 0x80):
            bad = bytearray(raw)
            bad[i] ^= bit
            with pytest.raises(ContainerError):
                decode_header(bytes(bad))


def test_every_truncation_is_rejected() -> None:
    raw = encode_header(HEADER)
    for n in range(len(raw)):
        with pytest.raises(ContainerError, match=r"truncated|checksum"):
            decode_header(raw[:n])


def test_foreign_bytes_are_rejected() -> None:
    with pytest.raises(ContainerError, match="magic"):
        decode_header(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(ContainerError):
        decode_header(bytes(100))


def _reseal(body: bytes) -> bytes:
    """A header body with a valid header checksum, so later checks are reached."""
    return body + struct.pack("<I", xxhash.xxh32_intdigest(body))


def _fields(**over: int) -> bytes:
    f = {"version": 1, "codec": 0, "dtype": BY_NAME["float16"].code, "ndim": 1}
    f.update(over)
    fixed = struct.pack(
        "<4sBBBBQQQ", b"KVSC", f["version"], f["codec"], f["dtype"], f["ndim"], 2, 0, 1
    )
    return fixed + struct.pack(f"<{f['ndim']}q", *([1] * f["ndim"]))


def test_sealed_but_invalid_fields_are_rejected() -> None:
    assert decode_header(_reseal(_fields()))[0].shape == (1,)
    with pytest.raises(ContainerError, match="version 3"):
        decode_header(_reseal(_fields(version=3)))
    with pytest.raises(ContainerError, match="codec id 200"):
        decode_header(_reseal(_fields(codec=200)))
    with pytest.raises(ContainerError, match="dtype code 0"):
        decode_header(_reseal(_fields(dtype=0)))
    with pytest.raises(ContainerError, match="ndim"):
        decode_header(_reseal(_fields(ndim=9)))


def test_encode_rejects_what_it_cannot_describe() -> None:
    with pytest.raises(ContainerError, match="codec"):
        encode_header(ValueHeader("float16", (1,), 2, 0, codec=300))
    with pytest.raises(ContainerError, match="parameters"):
        encode_header(ValueHeader("float16", (1,), 2, 0, params="x=" + "1" * 2000))
    with pytest.raises(ContainerError, match="dimensions"):
        encode_header(ValueHeader("float16", (1,) * 9, 2, 0))
    with pytest.raises(ValueError, match="dtype"):
        encode_header(ValueHeader("complex64", (1,), 8, 0))


def test_no_pickle_in_any_codec() -> None:
    """Nothing that reads stored bytes may unpickle them (torch.load and np.load can)."""
    folder = Path(container.__file__).parent
    for path in folder.glob("*.py"):
        source = path.read_text()
        for banned in ("import pickle", "pickle.load", "torch.load(", "allow_pickle=True"):
            assert banned not in source, f"{path.name} uses {banned}"
