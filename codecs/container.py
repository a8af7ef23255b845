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
and read headers alone when it rebuilds its index. `encode_value` / `decode_value` make and
read whole containers through a codec. Every decoder rejects a truncated, corrupted or
foreign container with `ContainerError`, never with garbage. No pickle.
"""

from __future__ import annotations

import math
import struct
import time
from dataclasses import dataclass

import torch
import xxhash

from kvstore.codecs.base import Codec, ContainerError, codec_by_id
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

__all__ = ["CODEC_RAW", "ContainerError", "ValueHeader", "checksum"]


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


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    flat = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    return memoryview(flat.numpy().data).cast("B")


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _check_value(header: ValueHeader) -> torch.dtype:
    """The value's torch dtype, once its length is known to match its shape and bound."""
    dt: torch.dtype = getattr(torch, header.dtype)
    numel = math.prod(header.shape)
    if numel * torch.empty(0, dtype=dt).element_size() != header.value_len:
        raise ContainerError("corrupted container header (value length and shape disagree)")
    if header.value_len > MAX_VALUE_BYTES:
        raise ContainerError(f"container names a value of {header.value_len} bytes; too large")
    return dt


def encode_stored(
    codec: Codec, header: ValueHeader, value: memoryview
) -> tuple[ValueHeader, memoryview | bytes]:
    """A value's bytes (described by `header`) as a tier stores them: the header with the
    codec, its parameters, the payload's length and checksum, and the payload. The raw codec
    stores the bytes as they are, without a copy. A lossy codec's header carries the
    checksum of the value as it will decode, which then differs from `header`'s.

    Raises InvalidArgument when the codec cannot take this value (its shape or dtype)."""
    if codec.codec_id == CODEC_RAW:
        return header, value
    dt = _check_value(header)
    t = torch.frombuffer(value, dtype=dt) if len(value) else torch.empty(0, dtype=dt)
    t = t.view(header.shape)
    payload = codec.encode_payload(t)
    value_sum = header.value_checksum
    if not codec.lossless:
        back = torch.empty_like(t)
        codec.decode_payload(memoryview(payload), back)
        value_sum = checksum(tensor_bytes(back))
    params = ";".join(f"{k}={v}" for k, v in sorted(codec.params.items()))
    stored = ValueHeader(
        header.dtype,
        header.shape,
        header.value_len,
        value_sum,
        codec.codec_id,
        header.created_ns,
        len(payload),
        checksum(payload),
        params,
    )
    return stored, payload


def decode_stored(header: ValueHeader, payload: memoryview, dst: memoryview) -> None:
    """Fill `dst` (the value's bytes) from a stored payload whose checksum the tier has
    already verified; checks the decoded value's checksum. ContainerError on any mismatch."""
    if len(dst) != header.value_len:
        raise ContainerError(f"value of {header.value_len} bytes does not fit {len(dst)}")
    if header.codec == CODEC_RAW:
        if len(payload) != header.value_len:
            raise ContainerError("raw payload and value lengths disagree")
        dst[:] = payload
        return
    dt = _check_value(header)
    codec = codec_by_id(header.codec, header.param_dict())
    out = torch.frombuffer(dst, dtype=dt) if len(dst) else torch.empty(0, dtype=dt)
    try:
        codec.decode_payload(payload, out.view(header.shape))
    except (ValueError, IndexError) as exc:
        if isinstance(exc, ContainerError):
            raise
        raise ContainerError(f"codec {codec.name} could not decode the payload: {exc}") from None
    if checksum(dst) != header.value_checksum:
        raise ContainerError(f"codec {codec.name} decoded a value that fails its checksum")


def encode_value(codec: Codec, tensor: torch.Tensor) -> bytes:
    """A whole container of `tensor` encoded by `codec`."""
    if not isinstance(tensor, torch.Tensor):
        raise InvalidArgument(f"codecs encode torch tensors, not {type(tensor).__name__}")
    t = tensor.detach().to("cpu").contiguous()
    payload = codec.encode_payload(t)
    if codec.lossless:
        value_sum = checksum(tensor_bytes(t))
    else:  # the checksum of what readers will get back: decode once now
        back = torch.empty_like(t)
        codec.decode_payload(memoryview(payload), back)
        value_sum = checksum(tensor_bytes(back))
    header = ValueHeader(
        dtype_name(t),
        tuple(t.shape),
        t.numel() * t.element_size(),
        value_sum,
        codec.codec_id,
        0,
        len(payload),
        checksum(payload),
        ";".join(f"{k}={v}" for k, v in sorted(codec.params.items())),
    )
    return encode_header(header) + payload


def decode_value(
    data: bytes | bytearray | memoryview,
    out: torch.Tensor | None = None,
    expect: Codec | None = None,
) -> torch.Tensor:
    """The tensor in a container (into `out` when given: any device, matching dtype and
    size). Raises ContainerError for anything damaged, truncated or foreign."""
    header, start = decode_header(data)
    payload = memoryview(data)[start:]
    if len(payload) != header.payload_len:
        what = "truncated" if len(payload) < header.payload_len else "has trailing bytes"
        raise ContainerError(
            f"container {what}: payload of {len(payload)} bytes, header says {header.payload_len}"
        )
    if checksum(payload) != header.payload_checksum:
        raise ContainerError("corrupted container payload (checksum mismatch)")
    codec = codec_by_id(header.codec, header.param_dict())
    if expect is not None and type(codec) is not type(expect):
        raise ContainerError(f"container was made by codec {codec.name}, not {expect.name}")
    dt = _check_value(header)
    numel = header.value_len // torch.empty(0, dtype=dt).element_size()
    if out is not None and (out.dtype != dt or out.numel() != numel or not out.is_contiguous()):
        raise InvalidArgument(
            f"out is {dtype_name(out)} {tuple(out.shape)}; the value is {header.dtype} "
            f"{header.shape} (out must be contiguous)"
        )
    direct = out is not None and out.device.type == "cpu"
    if out is not None and direct:
        target = out.view(header.shape)
    else:
        target = torch.empty(header.shape, dtype=dt)
    try:
        codec.decode_payload(payload, target)
    except ContainerError:
        raise
    except (ValueError, IndexError) as exc:
        raise ContainerError(f"codec {codec.name} could not decode the payload: {exc}") from None
    if checksum(tensor_bytes(target)) != header.value_checksum:
        raise ContainerError(f"codec {codec.name} decoded a value that fails its checksum")
    if out is None:
        return target
    if not direct:
        out.view(header.shape).copy_(target)
    return out
