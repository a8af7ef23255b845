"""`zstd`: lossless, Zstandard after a byte-plane shuffle.

The bytes of 16-bit floats are not alike: the high byte (sign, exponent, top of the
mantissa) of nearby KV values repeats, the low byte is close to noise. Grouping byte j of
every element together (a byte-plane shuffle, as Blosc does) hands the compressor one
compressible plane and one it can store nearly as is, instead of the two interleaved.
Parameters: `level` (Zstandard level, 1-19; on bf16 KV level 1 both compresses better after
the shuffle and runs faster than 3), `shuffle` (1 on, 0 off). The shuffle is a parallel
numba kernel: numpy's strided transpose of 32 MiB took longer than compressing it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import numba
import numpy as np
import torch
import zstandard

from kvstore.codecs.base import Codec, ContainerError, ParamValue, register
from kvstore.codecs.values import tensor_bytes
from kvstore.errors import InvalidArgument


@register
class Zstd(Codec):
    name = "zstd"
    codec_id = 1
    lossless = True
    PARAMS: ClassVar[Mapping[str, ParamValue]] = {"level": 1, "shuffle": 1}

    def check_params(self) -> None:
        if not 1 <= int(self.params["level"]) <= 19:
            raise InvalidArgument(f"zstd level must be 1-19, got {self.params['level']}")
        if self.params["shuffle"] not in (0, 1):
            raise InvalidArgument(f"zstd shuffle must be 0 or 1, got {self.params['shuffle']}")

    def encode_payload(self, tensor: torch.Tensor) -> bytes:
        data = np.frombuffer(tensor_bytes(tensor), np.uint8)
        k = tensor.element_size()
        if self.params["shuffle"] and k > 1 and data.size:
            planes = np.empty_like(data)
            _shuffle(data, planes, k)
            data = planes
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
            _unshuffle(planes, dst, k)
        else:
            dst[:] = planes


# Element sizes the shuffle handles, as the unsigned words it reads them as: the store's
# dtypes are 1, 2, 4 or 8 bytes (1: nothing to shuffle).
_WORDS = {2: np.uint16, 4: np.uint32, 8: np.uint64}


@numba.njit(cache=True, nogil=True)
def _shuffle_words(words: np.ndarray, planes: np.ndarray) -> None:
    """planes[j * n + i] = byte j of words[i]: each byte of every element, plane after
    plane, one plane per pass over whole words (the loops vectorize: 3-8 GB/s on one core,
    where the byte-by-byte transpose it replaced did 0.65, and 1.6 on every core)."""
    n = words.size
    mask = words.dtype.type(0xFF)
    for j in range(planes.size // n):
        shift = words.dtype.type(8 * j)
        plane = planes[j * n : (j + 1) * n]
        for i in range(n):
            plane[i] = np.uint8((words[i] >> shift) & mask)


@numba.njit(cache=True, nogil=True)
def _unshuffle_words(planes: np.ndarray, words: np.ndarray) -> None:
    """The inverse of `_shuffle_words`."""
    n = words.size
    for i in range(n):
        words[i] = 0
    for j in range(planes.size // n):
        shift = words.dtype.type(8 * j)
        plane = planes[j * n : (j + 1) * n]
        for i in range(n):
            words[i] |= words.dtype.type(plane[i]) << shift


@numba.njit(cache=True, nogil=True)
def _shuffle_pairs(words: np.ndarray, planes: np.ndarray) -> None:
    """`_shuffle_words` for 16-bit elements (fp16 and bf16 KV) in one pass: 13-19 GB/s."""
    n = words.size
    for i in range(n):
        w = words[i]
        planes[i] = np.uint8(w & np.uint16(0xFF))
        planes[n + i] = np.uint8(w >> np.uint16(8))


@numba.njit(cache=True, nogil=True)
def _unshuffle_pairs(planes: np.ndarray, words: np.ndarray) -> None:
    n = words.size
    for i in range(n):
        words[i] = np.uint16(planes[i]) | (np.uint16(planes[n + i]) << np.uint16(8))


def _shuffle(src: np.ndarray, planes: np.ndarray, k: int) -> None:
    """Serial and without the GIL: callers that code many values at once do it on threads
    of their own, where a parallel kernel in each oversubscribed the cores."""
    (_shuffle_pairs if k == 2 else _shuffle_words)(src.view(_WORDS[k]), planes)


def _unshuffle(planes: np.ndarray, dst: np.ndarray, k: int) -> None:
    (_unshuffle_pairs if k == 2 else _unshuffle_words)(planes, dst.view(_WORDS[k]))
