#!/usr/bin/env bash
# Create ./.venv and install kvstore into it (editable). Safe to run again.
#   scripts/setup.sh          runtime only
#   scripts/setup.sh test     plus the test and lint tools
# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/debian.sh
. scripts/debian.sh
extras=${1:-}
python=${PYTHON:-}
if [ -z "$python" ]; then
    for candidate in python3.11 python3.12 python3.13 python3; do
        if command -v "$candidate" >/dev/null 2>&1; then python=$candidate; break; fi
    done
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "kvstore needs Python 3.11 or newer; found ${python:-none}. Set PYTHON=/path/to/python3.11." >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv with $("$python" --version)"
    "$python" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
if ! python -c 'import torch' >/dev/null 2>&1; then
    echo "==> installing torch ${KVSTORE_TORCH_VERSION:-2.13.0}"
    python -m pip install --quiet "torch==${KVSTORE_TORCH_VERSION:-2.13.0}"
fi
echo "==> installing kvstore${extras:+[$extras]} and its dependencies"
python -m pip install --quiet -e ".${extras:+[$extras]}"
# The lossy codecs' numba kernels run on several threads at once in a server, which needs
# a thread-safe threading layer: GNU OpenMP (Debian's libgomp1). Without it the server
# refuses rules naming those codecs (raw and zstd need none).
if ! python -c 'import sys; from kvstore.threads import threadsafe_layer; sys.exit(threadsafe_layer() is None)'; then
    debian_install libgomp1 "OpenMP for the codecs' numba kernels" \
        "numba finds no OpenMP (libgomp1) here: the cachegen, kivi, int8 and fp8 codecs will be refused; install libgomp1"
fi
