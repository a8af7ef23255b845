#!/usr/bin/env bash
# Run the GPU kernel and transfer tests under compute-sanitizer's memcheck (server processes
# the tests start included): any out-of-bounds or misaligned access, or a CUDA API error,
# fails the run. Needs a CUDA GPU, CuPy and compute-sanitizer. The tests that fill the GPU
# on purpose are left out: their refused allocations are API errors by design.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
exec compute-sanitizer --tool memcheck --print-limit 30 --error-exitcode 9 \
    --target-processes all "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider \
    tests/kernels/test_blocks.py tests/kernels/test_checksum.py tests/kernels/test_rope.py \
    tests/codecs/test_cachegen_gpu.py tests/e2e/test_transfer_gpu.py \
    -k "not full_gpu and not larger_than" "$@"
