"""Running out of GPU memory inside a transfer is reported as ResourceExhausted (CPU twin of
the device test in tests/e2e/test_transfer_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from kvstore.client._transfer import gpu_memory_errors
from kvstore.errors import ResourceExhausted


def _raise(exc: BaseException) -> None:
    with gpu_memory_errors("get_into"):
        raise exc


def _cupy_error(name: str, message: str) -> BaseException:
    cls = type(name, (Exception,), {"__module__": "cupy.cuda.memory"})
    return cls(message)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "exc",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 MiB"),
        _cupy_error("OutOfMemoryError", "Out of memory allocating 16,777,216 bytes"),
        _cupy_error("CUDARuntimeError", "cudaErrorMemoryAllocation: out of memory"),
        _cupy_error("CUDADriverError", "CUDA_ERROR_OUT_OF_MEMORY: out of memory"),
    ],
)
def test_out_of_gpu_memory_is_resource_exhausted(exc: BaseException) -> None:
    with pytest.raises(ResourceExhausted, match="get_into: the GPU ran out of memory"):
        _raise(exc)


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("out of memory"),  # not CUDA's
        _cupy_error("CUDARuntimeError", "cudaErrorInvalidValue: invalid argument"),
        RuntimeError("CUDA error: an illegal memory access was encountered"),
    ],
)
def test_other_errors_pass_through(exc: BaseException) -> None:
    with pytest.raises(type(exc)) as caught:
        _raise(exc)
    assert caught.value is exc
