"""KV codecs and the self-describing container they store values in.

- `container`: the byte format every value below the GPU is stored in (magic, version,
  codec id and parameters, dtype, shape, value and payload lengths and xxh3-64 checksums,
  the header protected by its own checksum). No pickle.
- `base`: the `Codec` interface (`encode(tensor) -> bytes`, `decode(bytes, out=None)`), the
  registry by name (`codec_from_spec("zstd:level=3")`) and the KV layout lossy codecs take.
- One module per codec: `raw`, `zstd` (lossless).

`decode(data, out=None)` decodes a container made by any registered codec.
"""

from __future__ import annotations

from kvstore.codecs import raw, zstd  # noqa: F401  (registers the codecs)
from kvstore.codecs.base import Codec, codec_from_spec, codec_names, kv_view, register
from kvstore.codecs.container import (
    CODEC_RAW,
    ContainerError,
    ValueHeader,
    checksum,
    decode_header,
    decode_value,
    encode_header,
    encode_value,
)

decode = decode_value

__all__ = [
    "CODEC_RAW",
    "Codec",
    "ContainerError",
    "ValueHeader",
    "checksum",
    "codec_from_spec",
    "codec_names",
    "decode",
    "decode_header",
    "decode_value",
    "encode_header",
    "encode_value",
    "kv_view",
    "register",
]
