#!/usr/bin/env bash
# Regenerate kvstore/v1/*_pb2*.py from proto/ with the pinned grpcio-tools (see pyproject).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. --pyi_out=. \
    proto/kvstore/v1/kvstore.proto
