"""What the CUDA driver says about this machine's GPUs, asked of `libcuda` directly.

Loading `libcuda` through ctypes answers in milliseconds and needs neither torch nor cupy.

- `cuda_device_count()`: how many GPUs this process sees, or why none.
- `device_uuid(ordinal)`: a GPU's UUID as `nvidia-smi` prints it. Ordinals depend on each
  process's `CUDA_VISIBLE_DEVICES`; the UUID is how the daemon and a client agree on which
  GPU a pool lives on.
"""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def _driver() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    return lib if lib.cuInit(0) == 0 else None


def cuda_device_count() -> tuple[int, str]:
    """(number of CUDA devices, reason when zero)."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0, "no CUDA driver (libcuda.so.1) is installed"
    lib = _driver()
    if lib is None:
        return 0, "the CUDA driver found no usable GPU (cuInit failed)"
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return 0, "the CUDA driver reports no GPU"
    return count.value, ""


@functools.cache
def device_uuid(ordinal: int) -> str:
    """The UUID of this process's GPU `ordinal`, e.g. 'GPU-5d1c8c1e-0c5a-...'."""
    lib = _driver()
    if lib is None:
        raise RuntimeError("no CUDA driver: cannot name GPU devices")
    dev = ctypes.c_int(0)
    if lib.cuDeviceGet(ctypes.byref(dev), ordinal) != 0:
        raise RuntimeError(f"the CUDA driver has no device {ordinal}")
    raw = (ctypes.c_ubyte * 16)()
    get = getattr(lib, "cuDeviceGetUuid_v2", None) or lib.cuDeviceGetUuid
    if get(raw, dev) != 0:
        raise RuntimeError(f"the CUDA driver gave no UUID for device {ordinal}")
    h = bytes(raw).hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
