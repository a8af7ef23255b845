"""Whether this machine can run the gpu tier, asked of the CUDA driver directly.

Loading `libcuda` through ctypes answers in milliseconds and needs neither torch nor cupy.
"""

from __future__ import annotations

import ctypes


def cuda_device_count() -> tuple[int, str]:
    """(number of CUDA devices, reason when zero)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0, "no CUDA driver (libcuda.so.1) is installed"
    if lib.cuInit(0) != 0:
        return 0, "the CUDA driver found no usable GPU (cuInit failed)"
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return 0, "the CUDA driver reports no GPU"
    return count.value, ""
