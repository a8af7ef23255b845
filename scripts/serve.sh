#!/usr/bin/env bash
# Set up ./.venv and start kvstore-server with the cpu,ssd tiers under ./kvstore-data.
# Extra arguments go to kvstore-server (see kvstore-server --help).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/kvstore-server --tiers cpu,ssd --data-dir kvstore-data "$@"
