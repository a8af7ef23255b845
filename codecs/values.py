"""Whole values through codecs: tensors to containers and back, and a stored payload to a
value's bytes.

- `encode_value(codec, tensor) -> bytes` / `decode_value(data, out=None) -> tensor`: a whole
  container (header, parameters, payload) for clients and tools.
- `encode_stored(codec, header, value)`: what a tier does with a value's bytes in place
  (the header and the payload kept apart; the raw codec without a copy);
  `encode_stored_many` a batch of them, on a GPU when the codec encodes there. Decoding them is
  `container.decode_stored`, which comes here (`decode_coded`) only for a codec other than
  raw, so reading raw records never imports torch.
- `decode_values([(data, out), ...], stream)`: many containers at once; those of a codec
  with a GPU decoder (cachegen) decode into their CUDA `out` tensors as one asynchronous
  batch of kernels.
- `tensor_bytes(t)`: a contiguous CPU tensor's bytes as a memoryview, without a copy.

Every decode checks the payload's checksum before decoding and the value's after.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kvstore import threads
from kvstore.codecs.base import Codec, codec_by_id
from kvstore.codecs.container import (
    CODEC_RAW,
    MAX_VALUE_BYTES,
    ContainerError,
    MissingContext,
    ValueHeader,
    checksum,
    decode_header,
    decode_stored,
    encode_header,
)
from kvstore.dtypes import dtype_name
from kvstore.errors import InvalidArgument
from kvstore.scratch import HostScratch


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    flat = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    return memoryview(flat.numpy().data).cast("B")


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
    return _stored(codec, header, _as_tensor(header, value))


def encode_stored_many(
    codec: Codec | Sequence[Codec],
    items: Sequence[tuple[ValueHeader, memoryview]],
    device: int | None,
) -> list[tuple[ValueHeader, memoryview | bytes]]:
    """`encode_stored` of each (header, bytes) through `codec`, or a codec each of one
    `Codec.gpu_batch`: on CUDA GPU `device` as one batch when the codec encodes there
    (`Codec.gpu_encoder`), the bytes copied to it (fastest from pinned memory); else, or
    with `device` None, one by one on the host. The same headers and payloads either way.
    Raises InvalidArgument when the codec cannot take one of the values, before any is
    returned."""
    codecs = each_codec(codec, len(items))
    if not codecs:
        return []
    encoder = gpu_encoder_of(codecs[0]) if device is not None else None
    if encoder is None:
        return [encode_stored(c, h, value) for c, (h, value) in zip(codecs, items, strict=True)]
    values = [_as_tensor(header, value) for header, value in items]
    coded = encoder(one_or_each(codecs), values, device)
    return [
        (_coded_header(c, header, payload, value_sum), payload)
        for c, (header, _), (payload, value_sum) in zip(codecs, items, coded, strict=True)
    ]


def each_codec(codec: Codec | Sequence[Codec], n: int) -> list[Codec]:
    """A codec for each of `n` values: `codec` n times, or the `n` codecs given (one per
    value); InvalidArgument for a count that is not n."""
    codecs = [codec] * n if isinstance(codec, Codec) else list(codec)
    if len(codecs) != n:
        raise InvalidArgument(f"{len(codecs)} codecs for {n} values")
    return codecs


def one_or_each(codecs: Sequence[Codec]) -> Codec | list[Codec]:
    """The codec of all of `codecs` when they are one, else the list (one per value)."""
    return codecs[0] if codecs and all(c is codecs[0] for c in codecs) else list(codecs)


def _as_tensor(header: ValueHeader, value: memoryview) -> torch.Tensor:
    """The value `header` describes, as a tensor over its bytes (no copy)."""
    dt = _check_value(header)
    t = torch.frombuffer(value, dtype=dt) if len(value) else torch.empty(0, dtype=dt)
    return t.view(header.shape)


def gpu_encoder_of(codec: Codec) -> Callable[..., list[tuple[memoryview, int]]] | None:
    """The function that encodes `codec`'s values on a GPU: for a lossy codec that encodes
    there (`Codec.gpu_encoder`; a lossless one's stored checksum is the value's own, which
    needs no encoder to tell it); else None."""
    return None if codec.lossless else codec.gpu_encoder()


def _gpu_encoder(
    codec: Codec, t: torch.Tensor
) -> Callable[..., list[tuple[memoryview, int]]] | None:
    """The function that encodes `t` on its GPU: for a tensor on one and a codec that
    encodes there (`gpu_encoder_of`); else None."""
    return gpu_encoder_of(codec) if t.is_cuda else None


# Payloads of a batch (`decode_values`) with fewer bytes than this in all are hashed here.
_HASH_ALONE_BYTES = 4 << 20
_DECODED = HostScratch()  # the values lossy codecs decode to while they encode


def _stored(
    codec: Codec, header: ValueHeader, t: torch.Tensor
) -> tuple[ValueHeader, bytes | memoryview]:
    """`encode_stored` of the value `t`: on the host, or on its GPU if it is on one (a codec
    that encodes there)."""
    value_sum = header.value_checksum
    encoder = _gpu_encoder(codec, t)
    payload: bytes | memoryview
    if codec.lossless:
        payload = codec.encode_payload(t)
    elif encoder is not None:
        ((payload, value_sum),) = encoder(codec, [t])
    else:
        decoded = None  # only its checksum is kept: this thread's scratch, on the host
        if not t.is_cuda:
            decoded = _DECODED.tensor(t.shape, t.dtype)
        payload, back = codec.encode_with_value(t, decoded)
        value_sum = checksum(tensor_bytes(back))
    return _coded_header(codec, header, payload, value_sum), payload


def _coded_header(
    codec: Codec, header: ValueHeader, payload: bytes | memoryview, value_sum: int
) -> ValueHeader:
    """`header` of a value stored as `payload` by `codec`, which decodes to a value of
    checksum `value_sum`."""
    return ValueHeader(
        header.dtype,
        header.shape,
        header.value_len,
        value_sum,
        codec.codec_id,
        header.created_ns,
        len(payload),
        checksum(payload),
        codec.container_params(),
    )


def decode_coded(header: ValueHeader, payload: memoryview, dst: memoryview) -> None:
    """`container.decode_stored` for a codec other than raw (the raw path needs no torch)."""
    dt = _check_value(header)
    codec = codec_by_id(header.codec, header.param_dict())
    out = torch.frombuffer(dst, dtype=dt) if len(dst) else torch.empty(0, dtype=dt)
    try:
        codec.decode_payload(payload, out.view(header.shape))
    except (ValueError, IndexError) as exc:
        if isinstance(exc, ContainerError):
            raise
        if codec.thread_teams and threads.threadsafe_layer() is None:
            # numba refused to run the kernels here (`forbid_unsafe_layer`): this machine's
            # failing, not the value's, which is kept for one that can decode it.
            raise MissingContext(
                f"codec {codec.name} cannot decode on this machine: numba has no thread-safe "
                f"threading layer (install the libgomp1 package): {exc}"
            ) from None
        raise ContainerError(f"codec {codec.name} could not decode the payload: {exc}") from None
    if checksum(dst) != header.value_checksum:
        raise ContainerError(f"codec {codec.name} decoded a value that fails its checksum")


def encode_value(codec: Codec, tensor: torch.Tensor) -> bytes:
    """A whole container of `tensor` encoded by `codec`: on the tensor's GPU if it is on one
    and the codec encodes there (`Codec.gpu_encoder`), else on the CPU."""
    if not isinstance(tensor, torch.Tensor):
        raise InvalidArgument(f"codecs encode torch tensors, not {type(tensor).__name__}")
    t = tensor.detach()
    if _gpu_encoder(codec, t) is None:
        t = t.to("cpu")
    t = t.contiguous()
    # A lossy codec's value checksum is of what it decodes to: `_stored` computes it.
    header = ValueHeader(
        dtype_name(t),
        tuple(t.shape),
        t.numel() * t.element_size(),
        checksum(tensor_bytes(t)) if codec.lossless else 0,
    )
    stored, payload = _stored(codec, header, t)
    return b"".join((encode_header(stored), payload))  # one copy of the payload


def _open(
    data: bytes | bytearray | memoryview,
    out: torch.Tensor | None,
    expect: Codec | None,
    hashed: bool = True,
) -> tuple[ValueHeader, memoryview, Codec, torch.dtype]:
    """A container's header, checked payload (not its checksum unless `hashed`: then see
    `_check_payloads`), codec and dtype; `out` checked against it."""
    header, start = decode_header(data)
    payload = memoryview(data)[start:]
    if len(payload) != header.payload_len:
        what = "truncated" if len(payload) < header.payload_len else "has trailing bytes"
        raise ContainerError(
            f"container {what}: payload of {len(payload)} bytes, header says {header.payload_len}"
        )
    if hashed:
        _check_payloads([(header, payload)])
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
    return header, payload, codec, dt


def _check_payloads(opened: Sequence[tuple[ValueHeader, memoryview]]) -> None:
    """ContainerError unless each payload has its header's checksum. Many payloads are
    hashed on the host threads (xxhash releases the GIL): on the H200 machine's host, 22
    SmolLM2 chunks of cachegen-x (23 MB) took 1.7 ms one by one and 1.1 ms so; a GPU batch
    of 220 spends ~200 ms on the host in all."""
    payloads = [p for _, p in opened]
    many = len(payloads) > 1 and sum(len(p) for p in payloads) >= _HASH_ALONE_BYTES
    sums = threads.host_pool().map(checksum, payloads) if many else map(checksum, payloads)
    for (header, _), got in zip(opened, sums, strict=True):
        if got != header.payload_checksum:
            raise ContainerError("corrupted container payload (checksum mismatch)")


def decode_value(
    data: bytes | bytearray | memoryview,
    out: torch.Tensor | None = None,
    expect: Codec | None = None,
) -> torch.Tensor:
    """The tensor in a container (into `out` when given: any device, matching dtype and
    size). Raises ContainerError for anything damaged, truncated or foreign. A codec that
    decodes on the GPU (`Codec.gpu_decoder`) does so into a CUDA `out`."""
    return _decode_opened(*_open(data, out, expect), out)


def _decode_opened(
    header: ValueHeader,
    payload: memoryview,
    codec: Codec,
    dt: torch.dtype,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """`decode_value` of a container `_open` checked."""
    decoder = codec.gpu_decoder() if out is not None and out.is_cuda else None
    if out is not None and decoder is not None:
        decoder([(codec, payload, out.view(header.shape), header.value_checksum)], None).wait()
        return out
    direct = out is not None and out.device.type == "cpu"
    if out is not None and direct:
        target = out.view(header.shape)
    else:
        target = torch.empty(header.shape, dtype=dt)
    decode_stored(header, payload, tensor_bytes(target))
    if out is None:
        return target
    if not direct:
        out.view(header.shape).copy_(target)
    return out


class Decoding:
    """Containers being decoded (`decode_values`): `wait()` returns once every value is in
    place, raising ContainerError for a damaged one; `is_done()` does not block."""

    def __init__(self, launched: list[Any]) -> None:
        self._launched = launched

    def is_done(self) -> bool:
        return all(h.is_done() for h in self._launched)

    def wait(self) -> None:
        for h in self._launched:
            h.wait()


def decode_values(
    items: Sequence[tuple[bytes | bytearray | memoryview, torch.Tensor]], stream: Any = None
) -> Decoding:
    """Decode each container into its `out` tensor. Values of a codec that decodes on the
    GPU, going to CUDA tensors, decode there as one batch on `stream` (a CuPy or torch
    stream, None for the current one), asynchronously: `wait()` on the result. The rest
    decode on the CPU before this returns. Headers and payload checksums are checked on the
    host first; a bad one raises ContainerError before anything is launched."""
    batches: dict[Callable[..., Any], list[tuple[Codec, memoryview, torch.Tensor, int]]] = {}
    cpu = []
    opened = [_open(data, out, None, hashed=False) for data, out in items]
    _check_payloads([(header, payload) for header, payload, _, _ in opened])
    for (_, out), parts in zip(items, opened, strict=True):
        header, payload, codec, _ = parts
        decoder = codec.gpu_decoder() if out.is_cuda else None
        if decoder is None:
            cpu.append((parts, out))
        else:
            job = (codec, payload, out.view(header.shape), header.value_checksum)
            batches.setdefault(decoder, []).append(job)
    for parts, out in cpu:
        _decode_opened(*parts, out)
    return Decoding([decoder(jobs, stream) for decoder, jobs in batches.items()])
