#!/usr/bin/env bash
# Set up ./.venv with the test tools and run every check: lint, format, types, tests.
# Extra arguments go to pytest (e.g. scripts/test.sh -k roundtrip).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "==> installing redis-server (Debian package) for the wire benchmark test"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    else
        echo "note: redis-server is not installed; the wire benchmark test will be skipped" >&2
    fi
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
python -m pytest "$@"
