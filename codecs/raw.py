"""`raw`: the tensor's bytes as they are. The default, and what every memory tier holds."""

from __future__ import annotations

import torch

from kvstore.codecs.base import Codec, ContainerError, register
from kvstore.codecs.container import CODEC_RAW
from kvstore.codecs.values import tensor_bytes


@register
class Raw(Codec):
    name = "raw"
    codec_id = CODEC_RAW
    lossless = True

    def encode_payload(self, tensor: torch.Tensor) -> bytes:
        return bytes(tensor_bytes(tensor))

    def decode_payload(self, payload: memoryview, out: torch.Tensor) -> None:
        dst = tensor_bytes(out)
        if len(payload) != len(dst):
            raise ContainerError(f"raw payload of {len(payload)} bytes for a {len(dst)}-byte value")
        dst[:] = payload
