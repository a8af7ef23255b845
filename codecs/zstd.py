"""`zstd`: lossless, Zstandard after a byte-plane shuffle.

The bytes of 16-bit floats are not alike: the high byte (sign, exponent, top of the
mantissa) of nearby KV values repeats, the low byte is close to noise. Grouping byte j of
every element together (a byte-plane shuffle, as Blosc does) hands the compressor one
compressible plane and one it can store nearly as is, instead of the two interleaved.
Parameters: `level` (Zstandard level, 1-19), `shuffle` (1 on, 0 off).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import torch
import zstandard

from kvstore.codecs.base import Codec, ContainerError, ParamValue, register
from kvstore.codecs.container import tensor_bytes
from kvstore.errors import InvalidArgument


@register
class Zstd(Codec):
    name = "zstd"
    codec_id = 1
    lossless = True
    PARAMS: ClassVar[Mapping[str, ParamValue]] = {"level": 3, "shuffle": 1}

    def check_params(self) -> None:
        if not 1 <= int(self.params["level"]) <= 19:
            raise InvalidArgument(f"zstd level must be 1-19, got {self.params['level']}")
        if self.params["shuffle"] not in (0, 1):
            raise InvalidArgument(f"zstd shuffle must be 0 or 1, got {self.params['shuffle']}")

    def encode_payload(self, tensor: torch.Tensor) -> bytes:
        data = np.frombuffer(tensor_bytes(tensor), np.uint8)
        k = tensor.element_size()
        if self.params["shuffle"] and k > 1 and data.size:
            data = np.ascontiguousarray(data.reshape(-1, k).T)  # plane j: byte j of each
        level = int(self.params["level"])
        return zstandard.ZstdCompressor(level=level).compress(data.data)

    def decode_payload(self, payload: memoryview, out: torch.Tensor) -> None:
        dst = np.frombuffer(tensor_bytes(out), np.uint8)
        try:
            raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=dst.size)
        except zstandard.ZstdError as exc:
            raise ContainerError(f"zstd payload does not decompress: {exc}") from None
        if len(raw) != dst.size:
            raise ContainerError(f"zstd payload holds {len(raw)} bytes, the value {dst.size}")
        planes = np.frombuffer(raw, np.uint8)
        k = out.element_size()
        if self.params["shuffle"] and k > 1 and dst.size:
            dst.reshape(-1, k)[:] = planes.reshape(k, -1).T
        else:
            dst[:] = planes
