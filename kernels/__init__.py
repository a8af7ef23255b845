"""GPU kernels (CuPy) and their numba CPU twins.

Empty until the GPU data path lands: gather/scatter of KV blocks between the host arena,
the GPU pool and contiguous buffers. Nothing imports from here yet.
"""
