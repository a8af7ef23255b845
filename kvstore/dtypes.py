"""Tensor element types the store accepts, by wire name.

The wire names are torch's dtype names without the `torch.` prefix. Each has a stable one-byte
code used in the on-disk container; codes are never reused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvstore.errors import InvalidArgument

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DType:
    name: str
    code: int
    itemsize: int


_DTYPES = [
    DType("float16", 1, 2),
    DType("bfloat16", 2, 2),
    DType("float32", 3, 4),
    DType("float64", 4, 8),
    DType("float8_e4m3fn", 5, 1),
    DType("float8_e5m2", 6, 1),
    DType("int8", 7, 1),
    DType("uint8", 8, 1),
    DType("int16", 9, 2),
    DType("int32", 10, 4),
    DType("int64", 11, 8),
]
BY_NAME: dict[str, DType] = {d.name: d for d in _DTYPES}
BY_CODE: dict[int, DType] = {d.code: d for d in _DTYPES}

MAX_NDIM = 8


def dtype_by_name(name: str) -> DType:
    try:
        return BY_NAME[name]
    except KeyError:
        raise InvalidArgument(
            f"unknown dtype {name[:40]!r}; expected one of {', '.join(sorted(BY_NAME))}"
        ) from None


def dtype_by_code(code: int) -> DType:
    try:
        return BY_CODE[code]
    except KeyError:
        raise InvalidArgument(f"unknown dtype code {code}") from None


def expected_nbytes(dtype: str, shape: Sequence[int]) -> int:
    """Byte length of a contiguous tensor; rejects bad dtypes and shapes."""
    dt = dtype_by_name(dtype)
    if len(shape) > MAX_NDIM:
        raise InvalidArgument(f"shape has {len(shape)} dimensions; at most {MAX_NDIM} allowed")
    if shape and min(shape) < 0:
        raise InvalidArgument(f"shape {list(shape)} has a negative dimension")
    return math.prod(shape) * dt.itemsize


def dtype_name(t: torch.Tensor) -> str:
    """The wire name of a tensor's dtype: torch's name without `torch.`."""
    return str(t.dtype).removeprefix("torch.")
