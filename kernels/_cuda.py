"""CUDA source compiled once per device with CuPy, on first use."""

from __future__ import annotations

from typing import Any


def align(n: int, to: int = 16) -> int:
    """n rounded up to a multiple of `to` (buffer offsets, thread counts)."""
    return -(-n // to) * to


class KernelModule:
    """The kernels `names` of CUDA C++ `source`, compiled by NVRTC the first time a device
    asks for one of them (CuPy is imported only then)."""

    def __init__(self, source: str, names: tuple[str, ...]) -> None:
        self.source = source
        self.names = names
        self._functions: dict[tuple[int, str], Any] = {}

    def get(self, device: int, name: str) -> Any:
        fn = self._functions.get((device, name))
        if fn is None:
            import cupy

            with cupy.cuda.Device(device):
                module = cupy.RawModule(code=self.source, options=("-std=c++17",))
                for n in self.names:
                    self._functions[(device, n)] = module.get_function(n)
            fn = self._functions[(device, name)]
        return fn
