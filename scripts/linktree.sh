#!/usr/bin/env bash
# Print the path of a fresh tree of symlinks laid out like the installed distribution:
# codecs/, kernels/ and client/ appear as kvstore/codecs, kvstore/kernels, kvstore/client
# (the package-dir mapping in pyproject.toml). For tools that cannot follow the mapping
# (mypy) and for machines where the package is not installed (the GPU machine).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tree=$(mktemp -d)
cp -rs "$root/kvstore" "$tree/kvstore"
for sub in codecs kernels client; do
    cp -rs "$root/$sub" "$tree/kvstore/$sub"
done
find "$tree" -name __pycache__ -prune -exec rm -rf {} +
echo "$tree"
