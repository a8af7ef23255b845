"""Values for end-to-end tests: keys and random tensors whose bytes depend on a seed."""

from __future__ import annotations

import torch


def key(i: int) -> bytes:
    return i.to_bytes(4, "little") * 8


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random bit patterns (NaNs and negative zeros included): compare as bytes."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (int(torch.Size(shape).numel()) * dtype.itemsize,), generator=g)
    return raw.to(torch.uint8).view(dtype).reshape(shape)


def filler(c, n: int) -> None:  # type: ignore[no-untyped-def]
    """n MiB of other values through client `c`: what came before goes down to ssd (a
    server with a few MiB of cpu tier)."""
    for i in range(n):
        c.put(bytes([0xF0, i]) + bytes(30), torch.zeros(512 * 1024, dtype=torch.float16))


def gpu_ready() -> bool:
    """Whether this machine runs the GPU paths: a CUDA device, and CuPy for the kernels."""
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()
