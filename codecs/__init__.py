"""KV codecs and the self-describing container they store values in.

- `container`: the byte format every value below the GPU is stored in (magic, version,
  codec id and parameters, dtype, shape, value and payload lengths and xxh3-64 checksums,
  the header protected by its own checksum). No pickle. Needs neither torch nor numba.
- `base`: the `Codec` interface (`encode(tensor) -> bytes`, `decode(bytes, out=None)`), the
  registry by name (`codec_from_spec("zstd:level=3")`) and the KV layout lossy codecs take.
- `values`: whole containers from tensors and back (`encode_value`, `decode` /
  `decode_value`, `decode_values` for a batch, on the GPU where the codec can), and stored
  payloads to a value's bytes, for the tiers.
- One module per codec: `raw`, `zstd` (lossless); `int8`, `fp8` (`quant`), `kivi` and
  `cachegen` (lossy; cachegen also decodes on the GPU, `kvstore.kernels.cachegen`).
  `rans`: the entropy coder of the entropy-coded codecs; `cachegen_profile`: per-head
  sensitivity profiles of a model for cachegen's encoder, and the tool that measures them.

The container is imported eagerly; everything that needs torch is imported on first use,
so the server starts fast and pays for codecs only when it stores values through one.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kvstore.codecs.container import (
    CODEC_RAW,
    ContainerError,
    ValueHeader,
    checksum,
    decode_header,
    encode_header,
)

if TYPE_CHECKING:
    from kvstore.codecs.base import Codec, codec_from_spec, codec_names, kv_view, register
    from kvstore.codecs.values import decode_value, decode_values, encode_value

    decode = decode_value

_LAZY = {
    "Codec": ("base", "Codec"),
    "codec_from_spec": ("base", "codec_from_spec"),
    "codec_names": ("base", "codec_names"),
    "kv_view": ("base", "kv_view"),
    "register": ("base", "register"),
    "decode": ("values", "decode_value"),
    "decode_value": ("values", "decode_value"),
    "decode_values": ("values", "decode_values"),
    "encode_value": ("values", "encode_value"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'kvstore.codecs' has no attribute {name!r}")
    module, attr = _LAZY[name]
    return getattr(importlib.import_module(f"kvstore.codecs.{module}"), attr)


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
    "decode_values",
    "encode_header",
    "encode_value",
    "kv_view",
    "register",
]
