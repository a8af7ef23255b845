"""CUDA source compiled once per device with CuPy, on first use."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any


def align(n: int, to: int = 16) -> int:
    """n rounded up to a multiple of `to` (buffer offsets, thread counts)."""
    return -(-n // to) * to


def with_values(source: str, values: Mapping[str, object]) -> str:
    """`source` with each key of `values` (placeholders such as `@LANES@`) replaced by its
    value: constants the kernels take from the Python modules they mirror."""
    for key, value in values.items():
        source = source.replace(key, str(value))
    return source


# What drops a module's device buffers kept between calls on a device (`keeps_scratch`).
_scratch_keepers: list[Callable[[int], None]] = []


def keeps_scratch(drop: Callable[[int], None]) -> Callable[[int], None]:
    """Register `drop(device)`, which lets go of the device buffers a module keeps between
    calls (they go back to CuPy's pool): `release_memory` calls it first."""
    _scratch_keepers.append(drop)
    return drop


def release_memory(device: int) -> None:
    """Give back to the driver what CuPy's pools keep cached once freed: device memory on
    `device` and pinned host memory (a cachegen GPU encode batch holds about six times its
    input on the device while it runs), with the buffers modules keep between calls
    (`keeps_scratch`). The ssd writer calls this when a burst of encoding ends, so a
    serving engine on the same GPU gets the memory back between bursts."""
    import cupy

    for drop in _scratch_keepers:
        drop(device)
    with cupy.cuda.Device(device):
        cupy.get_default_memory_pool().free_all_blocks()
    cupy.get_default_pinned_memory_pool().free_all_blocks()


class KernelModule:
    """The kernels `names` of CUDA C++ `source` (or of what calling it returns, the first
    time: for a source built from modules not to import before then), compiled by NVRTC the
    first time a device asks for one of them (CuPy is imported only then)."""

    def __init__(self, source: str | Callable[[], str], names: tuple[str, ...]) -> None:
        self._source = source
        self.names = names
        self._functions: dict[tuple[int, str], Any] = {}
        self._lock = threading.Lock()

    @property
    def source(self) -> str:
        with self._lock:
            if callable(self._source):
                self._source = self._source()
            return self._source

    def get(self, device: int, name: str) -> Any:
        fn = self._functions.get((device, name))
        if fn is None:
            import cupy

            source = self.source
            with self._lock, cupy.cuda.Device(device):
                if (device, name) not in self._functions:
                    module = cupy.RawModule(code=source, options=("-std=c++17",))
                    for n in self.names:
                        self._functions[(device, n)] = module.get_function(n)
            fn = self._functions[(device, name)]
        return fn
