"""float32 to and from float16 and bfloat16, at the bit level, for numba kernels.

numba has neither 16-bit float type on the CPU, so kernels read and write such values as
their bits (uint16 words) and convert them with these scalar functions:

- `f16_to_f32(h)`, `bf16_to_f32(h)`: the float32 value of float16 or bfloat16 bits `h`,
  exactly (float16 inf and NaN stay inf and NaN).
- `f32_to_f16(x, saturate)`: the float16 bits of float32 `x`, rounded to nearest even.
  Past the largest float16 (`F16_MAX`), `saturate=False` gives inf as IEEE rounding does,
  for callers that check for non-finite results; `saturate=True` gives ±65504, for callers
  whose rounding can step just past the range of finite inputs. NaN becomes 0x7E00 with
  its sign in both. On a CPU with F16C it is the CPU's own conversion (an LLVM `fptrunc`
  to half, which vectorizes) with selects for NaN and saturation; elsewhere the same bits
  in integer arithmetic (`f32_to_f16_integer`; the two agree on all 2**32 inputs).
- `f32_to_bf16(x)`: the bfloat16 bits of float32 `x`, rounded to nearest even. NaN is
  not special-cased: the quiet NaN that arithmetic makes stays NaN, but one whose payload
  lies all in the low 16 bits becomes inf, and rounding can carry one whose upper payload
  bits are all set into a zero. A check would cost the int8 and fp8 decoders 15% (a select
  in their vectorized loop) for NaNs that no codec makes.

The bits come back as an int holding the 16 bits, sign included, to store into a uint16
array. Stored lossy values are checksummed as they decode, so a change here that moves a
single output bit breaks existing data: `tests/kernels/test_floatbits.py` pins the results
to torch's conversions.

`CUDA_FLOATBITS` is the same set as CUDA device functions, for the CuPy kernels whose
output must equal their numba twins' bit for bit (`kvstore.kernels.cachegen`, `.rope`):
`f16_to_f32`, `f32_to_f16` (inf past the range), `bf16_to_f32`, `f32_to_bf16`, on `u32`
words. They need no cuda_fp16 header, and flushing float32 subnormals to zero (CuPy
compiles with -ftz=true) does not change their results: a float32 subnormal rounds to a
float16 or bfloat16 zero either way.

numba's cache keys a compiled kernel on its own source file only: after editing this
module, delete the callers' cached kernels (`*.nbi` and `*.nbc` in their `__pycache__`),
which otherwise keep the old conversions.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

F16_MAX = 65504.0

# How kernels that work on a value's words tell its dtype apart (the codecs' numba kernels,
# the GPU decoder and the RoPE kernels): float32 takes two 16-bit words per value.
WORDS_F32, WORDS_F16, WORDS_BF16 = 0, 1, 2
WORD_KINDS = {"float32": WORDS_F32, "float16": WORDS_F16, "bfloat16": WORDS_BF16}


def host_words(t: Any) -> np.ndarray:
    """The elements of a host torch tensor of 4- or 2-byte floats as unsigned words of their
    size (uint32, uint16), the same shape and strides, sharing its memory, no copy: what
    the numba kernels read and write (numba has no 16-bit floats)."""
    import torch

    signed, word = (torch.int32, np.uint32) if t.element_size() == 4 else (torch.int16, np.uint16)
    return t.detach().view(signed).numpy().view(word)


@numba.njit(cache=True, nogil=True)
def f16_to_f32(h: int | np.integer) -> np.float32:
    """The float32 value of float16 bits `h`."""
    b = np.int64(h)
    mag = b & 0x7FFF
    if mag < 0x400:  # zero or subnormal: mantissa * 2**-24, exact in float32
        v = np.float32(mag) * np.float32(2.0**-24)
    elif mag >= 0x7C00:  # inf or NaN
        v = np.uint32((mag << 13) | 0x7F800000).view(np.float32)
    else:  # rebias the exponent from 15 to 127
        v = np.uint32((mag << 13) + (112 << 23)).view(np.float32)
    return -v if b & 0x8000 else v


@numba.njit(cache=True, nogil=True)
def bf16_to_f32(h: int | np.integer) -> np.float32:
    """The float32 value of bfloat16 bits `h`: its upper half."""
    return np.uint32(np.int64(h) << 16).view(np.float32)


@intrinsic
def _fptrunc_f16(typingctx: Any, x: Any) -> Any:
    """The float16 bits of float32 `x` by the CPU's own conversion (F16C's vcvtps2ph, which
    LLVM vectorizes): rounded to nearest even, inf past the range, NaN kept a NaN."""
    sig = types.uint16(types.float32)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


# Without F16C, LLVM would call a runtime routine numba does not link: the integer path.
_HARDWARE_F16 = bool(llvm.get_host_cpu_features().get("f16c", False))


@numba.njit(cache=True, nogil=True)
def f32_to_f16(x: float | np.floating, saturate: bool) -> np.int64:
    """The float16 bits of float32 `x`, rounded to nearest even; past ±65504, ±inf or, if
    `saturate`, ±65504. NaN: 0x7E00 with its sign."""
    if not _HARDWARE_F16:
        return f32_to_f16_integer(x, saturate)
    u = np.int64(np.float32(x).view(np.uint32))
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    # Selects, not branches, around the CPU's conversion, so that the loops calling this
    # vectorize (cachegen's decoder stores its values ~1.5x faster).
    h = np.int64(_fptrunc_f16(np.float32(x)))  # type: ignore[call-arg]  # typingctx: numba
    h = (0x7E00 | sign) if a > 0x7F800000 else h  # one NaN, as the integer path makes
    return (0x7BFF | sign) if saturate and 0x477FF000 <= a <= 0x7F800000 else h


@numba.njit(cache=True, nogil=True)
def f32_to_f16_integer(x: float | np.floating, saturate: bool) -> np.int64:
    """`f32_to_f16` in integer arithmetic, for CPUs without F16C (same bits)."""
    u = np.int64(np.float32(x).view(np.uint32))
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    if a >= 0x477FF000:  # 65520 (halfway to 2**16) and up round past 65504; NaN stays NaN
        h = np.int64(0x7E00 if a > 0x7F800000 else (0x7BFF if saturate else 0x7C00))
    elif a < 0x38800000:  # below 2**-14, a float16 subnormal: adding 0.5 (ulp 2**-24)
        # makes the FPU round to a multiple of 2**-24, which the low bits then count
        s = np.uint32(a).view(np.float32) + np.float32(0.5)
        h = np.int64(np.float32(s).view(np.uint32)) - 0x3F000000
    else:  # rebias the exponent, round the 13 dropped bits to nearest even
        h = (a - (112 << 23) + 0xFFF + ((a >> 13) & 1)) >> 13
    return h | sign


@numba.njit(cache=True, nogil=True)
def f32_to_bf16(x: float | np.floating) -> np.int64:
    """The bfloat16 bits of float32 `x`, rounded to nearest even (no NaN check)."""
    u = np.int64(np.float32(x).view(np.uint32))
    return (u + 0x7FFF + ((u >> 16) & 1)) >> 16


CUDA_FLOATBITS = r"""
typedef unsigned int u32;

__device__ __forceinline__ float f16_to_f32(u32 h) {
    u32 mag = h & 0x7FFF;
    float v;
    if (mag < 0x400) v = __fmul_rn((float)mag, 5.9604644775390625e-8f);  // * 2**-24, exact
    else if (mag >= 0x7C00) v = __uint_as_float((mag << 13) | 0x7F800000u);
    else v = __uint_as_float((mag << 13) + (112u << 23));
    return (h & 0x8000) ? -v : v;
}

__device__ __forceinline__ u32 f32_to_f16(float x) {  // to nearest even; inf past 65504
    u32 u = __float_as_uint(x);
    u32 sign = (u >> 16) & 0x8000;
    u32 a = u & 0x7FFFFFFF;
    u32 h;
    if (a >= 0x477FF000) {
        h = a > 0x7F800000 ? 0x7E00 : 0x7C00;
    } else if (a < 0x38800000) {  // a float16 subnormal: the FPU rounds to 2**-24 steps
        h = __float_as_uint(__fadd_rn(__uint_as_float(a), 0.5f)) - 0x3F000000;
    } else {
        h = (a - (112u << 23) + 0xFFF + ((a >> 13) & 1)) >> 13;
    }
    return h | sign;
}

__device__ __forceinline__ float bf16_to_f32(u32 h) { return __uint_as_float(h << 16); }

__device__ __forceinline__ u32 f32_to_bf16(float x) {  // to nearest even, no NaN check
    u32 u = __float_as_uint(x);
    return (u + 0x7FFF + ((u >> 16) & 1)) >> 16;
}

// A word of each kind (WORD_KINDS: 0 float32, 1 float16, 2 bfloat16) and its float value.
typedef unsigned short u16;
template <int KIND> struct Word;
template <> struct Word<0> {
    typedef u32 T;
    static __device__ __forceinline__ float load(u32 w) { return __uint_as_float(w); }
    static __device__ __forceinline__ u32 store(float v) { return __float_as_uint(v); }
};
template <> struct Word<1> {
    typedef u16 T;
    static __device__ __forceinline__ float load(u16 w) { return f16_to_f32(w); }
    static __device__ __forceinline__ u16 store(float v) { return (u16)f32_to_f16(v); }
};
template <> struct Word<2> {
    typedef u16 T;
    static __device__ __forceinline__ float load(u16 w) { return bf16_to_f32(w); }
    static __device__ __forceinline__ u16 store(float v) { return (u16)f32_to_bf16(v); }
};
"""
