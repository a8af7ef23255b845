"""cuBLAS's GemmEx through its C API, on a handle of this module's own per thread and GPU.

CuPy's cuBLAS calls refuse to run while their stream is being captured into a CUDA graph
(its `setStream` raises NotImplementedError), which the cachegen-x GPU encoder does to
launch a batch's ~120 kernels as one graph. cuBLAS itself captures GEMMs as long as it
allocates nothing meanwhile: these handles have no workspace (`cublasSetWorkspace` with
none), so each GEMM picks a kernel that needs none, and a captured graph holds no memory
another launch could share. The library is the one CuPy loaded (found in this process's
maps), so both agree on versions.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

# cudaDataType and cublasComputeType_t values, and cublasOperation_t.
R_64F, R_8I, R_32I = 1, 3, 10
COMPUTE_64F, COMPUTE_32I = 70, 72
OP_N, OP_T = 0, 1
_GEMM_DEFAULT = -1

_lib: Any = None
_lib_lock = threading.Lock()
_local = threading.local()


def _library() -> Any:
    """libcublas as CuPy loaded it (ctypes), with the argument types of the calls made."""
    global _lib
    with _lib_lock:
        if _lib is None:
            import cupy

            cupy.cuda.device.get_cublas_handle()  # CuPy loads its libcublas
            with open("/proc/self/maps") as maps:
                paths = {line.split()[-1] for line in maps if "/libcublas.so" in line}
            if len(paths) != 1:
                raise RuntimeError(f"expected one libcublas loaded by CuPy, found {paths}")
            lib = ctypes.CDLL(paths.pop())
            p, i = ctypes.c_void_p, ctypes.c_int
            lib.cublasCreate_v2.argtypes = [ctypes.POINTER(p)]
            lib.cublasSetStream_v2.argtypes = [p, p]
            lib.cublasSetWorkspace_v2.argtypes = [p, p, ctypes.c_size_t]
            lib.cublasGemmEx.argtypes = [p, i, i, i, i, i, p, p, i, i, p, i, i, p, p, i, i, i, i]
            _lib = lib
        return _lib


def _check(status: int, call: str) -> None:
    if status != 0:
        raise RuntimeError(f"cuBLAS {call} failed with status {status}")


def handle(device: int) -> Any:
    """This thread's handle on GPU `device` (the current device), without workspace: made
    on first use (which a stream capture must not see)."""
    handles = _local.__dict__.setdefault("handles", {})
    made = handles.get(device)
    if made is None:
        lib = _library()
        made = ctypes.c_void_p()
        _check(lib.cublasCreate_v2(ctypes.byref(made)), "cublasCreate")
        _check(lib.cublasSetWorkspace_v2(made, None, 0), "cublasSetWorkspace")
        handles[device] = made
    return made


def gemm_ex(
    transa: int,
    m: int,
    n: int,
    k: int,
    alpha: Any,
    a: int,
    a_type: int,
    lda: int,
    b: int,
    ldb: int,
    beta: Any,
    c: int,
    c_type: int,
    ldc: int,
    compute: int,
) -> None:
    """C = alpha op(A) B + beta C (column-major, B of A's type; alpha and beta host
    arrays of the compute type, read now) on the current CuPy stream and device, which may
    be capturing a CUDA graph."""
    import cupy

    lib = _library()
    on = handle(cupy.cuda.Device().id)
    _check(lib.cublasSetStream_v2(on, cupy.cuda.get_current_stream().ptr), "cublasSetStream")
    _check(
        lib.cublasGemmEx(
            on, transa, OP_N, m, n, k, alpha.ctypes.data, a, a_type, lda, b, a_type, ldb,
            beta.ctypes.data, c, c_type, ldc, compute, _GEMM_DEFAULT,
        ),
        "cublasGemmEx",
    )  # fmt: skip
