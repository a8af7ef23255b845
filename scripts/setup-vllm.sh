#!/usr/bin/env bash
# Create ./.venv-vllm for the vLLM connector tests: kvstore (editable) with its test
# tools, and vLLM's Python code without its CUDA dependencies, which its connector classes
# do not need on the CPU (tests/vllm_connector/requirements.txt, installed with --no-deps).
# A venv of its own: vLLM pins transformers and others to versions the main venv does not
# use.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null 2>&1 || python=python3
if [ ! -x .venv-vllm/bin/python ]; then
    echo "==> creating .venv-vllm with $("$python" --version)"
    "$python" -m venv .venv-vllm
fi
# shellcheck disable=SC1091
. .venv-vllm/bin/activate
python -m pip install --quiet --upgrade pip
if ! python -c 'import torch' >/dev/null 2>&1; then
    echo "==> installing torch ${KVSTORE_TORCH_VERSION:-2.13.0} into .venv-vllm"
    python -m pip install --quiet "torch==${KVSTORE_TORCH_VERSION:-2.13.0}"
fi
echo "==> installing kvstore and vLLM's connector classes into .venv-vllm"
python -m pip install --quiet -e . "pytest>=8" "pytest-timeout>=2.3"
python -m pip install --quiet --no-deps -r tests/vllm_connector/requirements.txt
