"""GPU kernels (CuPy) and their numba CPU twins.

`blocks`: gather and scatter of fixed-size KV blocks by slot id, the primitive behind
pulling top-k retrieved blocks into one contiguous buffer and offloading them again.
CuPy is imported only when a GPU function is first called, so the CPU twins work on
machines without CUDA.
"""

from __future__ import annotations

from kvstore.kernels.blocks import (
    BlockError,
    check_blocks,
    gather_blocks,
    gather_blocks_cpu,
    scatter_blocks,
    scatter_blocks_cpu,
)

__all__ = [
    "BlockError",
    "check_blocks",
    "gather_blocks",
    "gather_blocks_cpu",
    "scatter_blocks",
    "scatter_blocks_cpu",
]
