"""GPU kernels (CuPy) and their numba CPU twins.

- `blocks`: gather and scatter of fixed-size KV blocks by slot id, the primitive behind
  pulling top-k retrieved blocks into one contiguous buffer and offloading them again.
- `checksum`: XXH3-64 of many buffers at once on the GPU, identical to `xxhash.xxh3_64`,
  so values moved at PCIe speed are checked where they are.
- `floatbits`: float32 to and from float16 / bfloat16 bit patterns inside numba kernels
  (numba has no 16-bit floats on the CPU), rounding as torch does; the codecs share it.
- `rope`: re-rotation of stored K from the positions it was computed at to new ones (RoPE
  with linear, NTK, YaRN or Llama 3 scaling), for reusing a document chunk's KV anywhere in
  a prompt; `RopeConfig.from_hf` reads a transformers config.

CuPy is imported only when a GPU function is first called, so the CPU twins work on
machines without CUDA.
"""

from __future__ import annotations

from kvstore.kernels.blocks import (
    BlockError,
    DeviceBuffer,
    check_blocks,
    gather_blocks,
    gather_blocks_cpu,
    scatter_blocks,
    scatter_blocks_cpu,
)
from kvstore.kernels.checksum import xxh3_64_gpu, xxh3_64_phased
from kvstore.kernels.rope import RopeConfig, RopeError, RopeScaling, rerotate_k

__all__ = [
    "BlockError",
    "DeviceBuffer",
    "RopeConfig",
    "RopeError",
    "RopeScaling",
    "check_blocks",
    "gather_blocks",
    "gather_blocks_cpu",
    "rerotate_k",
    "scatter_blocks",
    "scatter_blocks_cpu",
    "xxh3_64_gpu",
    "xxh3_64_phased",
]
