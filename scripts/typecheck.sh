#!/usr/bin/env bash
# mypy over the kvstore distribution as it installs: codecs/, kernels/ and client/ appear
# as kvstore.codecs, kvstore.kernels and kvstore.client (package-dir mapping), which mypy
# cannot follow in the source tree, so it checks a tree of symlinks laid out like the wheel.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
cp -rs "$root/kvstore" "$tree/kvstore"
for sub in codecs kernels client; do
    cp -rs "$root/$sub" "$tree/kvstore/$sub"
done
find "$tree" -name __pycache__ -prune -exec rm -rf {} +
cd "$tree"
mypy --config-file "$root/pyproject.toml" -p kvstore
