"""The stored-value container: a fixed header, the shape, the codec's parameters, then the
payload the codec produced.

Layout (little-endian), version 2:

    magic "KVSC" | version u8 | codec u8 | dtype u8 | ndim u8
    | value_len u64 | value_xxh3 u64 | payload_len u64 | payload_xxh3 u64 | created_ns u64
    | params_len u16 | shape i64 * ndim | params (ASCII "key=value;...") | header_xxh32 u32
    | payload

The *value* is the tensor a reader gets back (for a lossy codec, the decoded tensor, not
the one that was encoded); the *payload* is what is stored. Each has its own checksum:
the payload's catches damage on disk before decoding, the value's catches a decoder that
went wrong. Version 1 containers (no parameters, payload = value, raw codec only) are
still read.

`encode_header` / `decode_header` handle everything before the payload, so a tier can store
the header and the payload in separate records (no copy of a large payload to glue them)
and read headers alone when it rebuilds its index; they need neither torch nor a codec, so
the server starts without importing either. `kvstore.codecs.values` makes and reads whole
containers through a codec. Every decoder rejects a truncated, corrupted or foreign
container with `ContainerError`, never with garbage. No pickle.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

import xxhash

from kvstore.dtypes import BY_CODE, MAX_NDIM, dtype_by_name
from kvstore.errors import InvalidArgument

MAGIC = b"KVSC"
VERSION = 2
CODEC_RAW = 0
MAX_PARAMS = 1024
# A decoder allocates the value a header names: bound it, so a forged header cannot make a
# reader allocate without limit.
MAX_VALUE_BYTES = 1 << 36

_FIXED_V1 = struct.Struct("<4sBBBBQQQ")
_FIXED = struct.Struct("<4sBBBBQQQQQH")
_CRC = struct.Struct("<I")


class ContainerError(ValueError):
    """Bytes a decoder refuses: truncated, corrupted, foreign, or inconsistent with what
    their header says."""


class MissingContext(ContainerError, InvalidArgument):
    """An intact container that needs something this process has not loaded to decode (a
    cachegen-x container's profile maps, `maps` their digest): not damage, so a store keeps
    it, and a client fetches the maps from its server (the Maps RPC). Also an
    InvalidArgument: a codec spec that names what is not loaded is refused as one."""

    def __init__(self, message: str, maps: str = "") -> None:
        super().__init__(message)
        self.maps = maps


def checksum(data: bytes | bytearray | memoryview) -> int:
    """xxh3-64 of a buffer; the checksum every stored value carries."""
    return xxhash.xxh3_64_intdigest(data)


@dataclass(frozen=True)
class ValueHeader:
    """What a container says about its value and its payload.

    `value_len` / `value_checksum` describe the tensor's bytes as a reader gets them;
    `payload_len` / `payload_checksum` the stored bytes (the same for the raw codec, and
    taken from the value when not given).
    """

    dtype: str
    shape: tuple[int, ...]
    value_len: int
    value_checksum: int
    codec: int = CODEC_RAW
    created_ns: int = 0
    payload_len: int = -1
    payload_checksum: int = -1
    params: str = ""

    def __post_init__(self) -> None:
        if self.payload_len < 0:
            object.__setattr__(self, "payload_len", self.value_len)
        if self.payload_checksum < 0:
            object.__setattr__(self, "payload_checksum", self.value_checksum)

    def param_dict(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for item in filter(None, self.params.split(";")):
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise ContainerError(f"corrupted codec parameters {self.params!r}")
            out[key] = value
        return out


def encode_header(header: ValueHeader) -> bytes:
    dt = dtype_by_name(header.dtype)
    if not 0 <= header.codec < 256:
        raise ContainerError(f"codec id {header.codec} does not fit a container")
    if len(header.shape) > MAX_NDIM:
        raise ContainerError(f"shape has more than {MAX_NDIM} dimensions")
    params = header.params.encode("ascii")
    if len(params) > MAX_PARAMS:
        raise ContainerError(f"codec parameters longer than {MAX_PARAMS} bytes")
    created = header.created_ns or time.time_ns()
    body = (
        _FIXED.pack(
            MAGIC,
            VERSION,
            header.codec,
            dt.code,
            len(header.shape),
            header.value_len,
            header.value_checksum,
            header.payload_len,
            header.payload_checksum,
            created,
            len(params),
        )
        + struct.pack(f"<{len(header.shape)}q", *header.shape)
        + params
    )
    return body + _CRC.pack(xxhash.xxh32_intdigest(body))


def decode_header(buf: bytes | bytearray | memoryview) -> tuple[ValueHeader, int]:
    """Parse a header at the start of `buf`; returns it and its length in bytes."""
    view = memoryview(buf)
    if len(view) < _FIXED_V1.size + _CRC.size:
        raise ContainerError(f"truncated container header ({len(view)} bytes)")
    magic, version = bytes(view[:4]), view[4]
    if magic != MAGIC:
        raise ContainerError("not a kvstore container (bad magic)")
    if version == 1:
        return _decode_v1(view)
    if version != VERSION:
        raise ContainerError(f"container version {version} is not supported (1 or {VERSION})")
    if len(view) < _FIXED.size + _CRC.size:
        raise ContainerError(f"truncated container header ({len(view)} bytes)")
    _, _, codec, dcode, ndim, vlen, vsum, plen, psum, created, nparams = _FIXED.unpack_from(view)
    if ndim > MAX_NDIM or nparams > MAX_PARAMS:
        raise ContainerError(f"corrupted container header (ndim {ndim}, params {nparams})")
    end = _FIXED.size + 8 * ndim + nparams
    if len(view) < end + _CRC.size:
        raise ContainerError("truncated container header (shape or parameters)")
    (crc,) = _CRC.unpack_from(view, end)
    if crc != xxhash.xxh32_intdigest(view[:end]):
        raise ContainerError("corrupted container header (checksum mismatch)")
    if dcode not in BY_CODE:
        raise ContainerError(f"container uses unknown dtype code {dcode}")
    shape = struct.unpack_from(f"<{ndim}q", view, _FIXED.size)
    try:
        params = bytes(view[_FIXED.size + 8 * ndim : end]).decode("ascii")
    except UnicodeDecodeError:
        raise ContainerError("corrupted codec parameters (not ASCII)") from None
    header = ValueHeader(
        BY_CODE[dcode].name, tuple(shape), vlen, vsum, codec, created, plen, psum, params
    )
    return header, end + _CRC.size


def _decode_v1(view: memoryview) -> tuple[ValueHeader, int]:
    _, _, codec, dcode, ndim, plen, psum, created = _FIXED_V1.unpack_from(view)
    if ndim > MAX_NDIM:
        raise ContainerError(f"corrupted container header (ndim {ndim})")
    end = _FIXED_V1.size + 8 * ndim
    if len(view) < end + _CRC.size:
        raise ContainerError("truncated container header (shape)")
    (crc,) = _CRC.unpack_from(view, end)
    if crc != xxhash.xxh32_intdigest(view[:end]):
        raise ContainerError("corrupted container header (checksum mismatch)")
    if codec != CODEC_RAW:
        raise ContainerError(f"container uses unknown codec id {codec}")
    if dcode not in BY_CODE:
        raise ContainerError(f"container uses unknown dtype code {dcode}")
    shape = struct.unpack_from(f"<{ndim}q", view, _FIXED_V1.size)
    return ValueHeader(BY_CODE[dcode].name, tuple(shape), plen, psum, codec, created), end + 4


def decode_stored(header: ValueHeader, payload: memoryview, dst: memoryview) -> None:
    """Fill `dst` (the value's bytes) from a stored payload whose checksum the caller has
    verified; checks the decoded value's checksum. ContainerError on any mismatch. A raw
    payload is copied here; any other codec's decoder is imported (with torch) on first use."""
    if len(dst) != header.value_len:
        raise ContainerError(f"value of {header.value_len} bytes does not fit {len(dst)}")
    if header.codec != CODEC_RAW:
        from kvstore.codecs.values import decode_coded

        decode_coded(header, payload, dst)
        return
    if len(payload) != header.value_len:
        raise ContainerError("raw payload and value lengths disagree")
    if header.value_checksum != header.payload_checksum:  # the payload is the value
        raise ContainerError("corrupted container header (raw checksums disagree)")
    dst[:] = payload
