"""The stored-value container: a fixed header, then the shape, then the payload.

Layout (little-endian):

    magic "KVSC" | version u8 | codec u8 | dtype u8 | ndim u8 | payload_len u64
    | payload_xxh3 u64 | created_ns u64 | shape i64 * ndim | header_xxh32 u32 | payload

`encode_header` / `decode_header` handle everything before the payload, so a tier can store
the header and the payload in separate records (no copy of a large payload to glue them) and
read headers alone when it rebuilds its index. `decode_header` rejects a truncated, corrupted
or foreign header with `ContainerError`, never with garbage.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

import xxhash

from kvstore.dtypes import BY_CODE, MAX_NDIM, dtype_by_name

MAGIC = b"KVSC"
VERSION = 1
CODEC_RAW = 0
_CODECS = {CODEC_RAW: "raw"}

_FIXED = struct.Struct("<4sBBBBQQQ")
_CRC = struct.Struct("<I")


class ContainerError(ValueError):
    """Bytes that are not a valid container of this version."""


def checksum(data: bytes | bytearray | memoryview) -> int:
    """xxh3-64 of a buffer; the checksum every stored value carries."""
    return xxhash.xxh3_64_intdigest(data)


@dataclass(frozen=True)
class ValueHeader:
    """What a container says about its payload."""

    dtype: str
    shape: tuple[int, ...]
    payload_len: int
    payload_checksum: int
    codec: int = CODEC_RAW
    created_ns: int = 0


def encode_header(header: ValueHeader) -> bytes:
    dt = dtype_by_name(header.dtype)
    if header.codec not in _CODECS:
        raise ContainerError(f"unknown codec id {header.codec}")
    if len(header.shape) > MAX_NDIM:
        raise ContainerError(f"shape has more than {MAX_NDIM} dimensions")
    created = header.created_ns or time.time_ns()
    body = _FIXED.pack(
        MAGIC,
        VERSION,
        header.codec,
        dt.code,
        len(header.shape),
        header.payload_len,
        header.payload_checksum,
        created,
    ) + struct.pack(f"<{len(header.shape)}q", *header.shape)
    return body + _CRC.pack(xxhash.xxh32_intdigest(body))


def decode_header(buf: bytes | memoryview) -> tuple[ValueHeader, int]:
    """Parse a header at the start of `buf`; returns it and its length in bytes."""
    view = memoryview(buf)
    if len(view) < _FIXED.size + _CRC.size:
        raise ContainerError(f"truncated container header ({len(view)} bytes)")
    magic, version, codec, dcode, ndim, plen, pcrc, created = _FIXED.unpack_from(view)
    if magic != MAGIC:
        raise ContainerError("not a kvstore container (bad magic)")
    if version != VERSION:
        raise ContainerError(f"container version {version} is not supported (expected {VERSION})")
    if ndim > MAX_NDIM:
        raise ContainerError(f"corrupted container header (ndim {ndim})")
    end = _FIXED.size + 8 * ndim
    if len(view) < end + _CRC.size:
        raise ContainerError("truncated container header (shape)")
    (crc,) = _CRC.unpack_from(view, end)
    if crc != xxhash.xxh32_intdigest(view[:end]):
        raise ContainerError("corrupted container header (checksum mismatch)")
    if codec not in _CODECS:
        raise ContainerError(f"container uses unknown codec id {codec}")
    if dcode not in BY_CODE:
        raise ContainerError(f"container uses unknown dtype code {dcode}")
    shape = struct.unpack_from(f"<{ndim}q", view, _FIXED.size)
    header = ValueHeader(BY_CODE[dcode].name, tuple(shape), plen, pcrc, codec, created)
    return header, end + _CRC.size
