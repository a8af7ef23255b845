"""KV codecs and the self-describing container they store values in.

`container` defines the byte format every value below the GPU is stored in: magic, version,
codec id, dtype, shape, payload length and an xxh3-64 checksum of the payload, the header
itself protected by its own checksum. No pickle. Today the only codec is `raw` (the payload
is the tensor's bytes); the lossy and entropy-coded codecs build on the same container.
"""

from __future__ import annotations

from kvstore.codecs.container import (
    CODEC_RAW,
    ContainerError,
    ValueHeader,
    checksum,
    decode_header,
    encode_header,
)

__all__ = [
    "CODEC_RAW",
    "ContainerError",
    "ValueHeader",
    "checksum",
    "decode_header",
    "encode_header",
]
