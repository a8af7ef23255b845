#!/usr/bin/env bash
# mypy over the kvstore distribution as it installs (see scripts/linktree.sh for why).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tree=$("$root/scripts/linktree.sh")
trap 'rm -rf "$tree"' EXIT
cd "$tree"
mypy --config-file "$root/pyproject.toml" -p kvstore
