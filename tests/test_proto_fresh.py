"""The generated stubs in kvstore/v1 match proto/ compiled by the pinned grpcio-tools."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("kvstore_pb2.py", "kvstore_pb2.pyi", "kvstore_pb2_grpc.py")


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'proto'}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            str(ROOT / "proto/kvstore/v1/kvstore.proto"),
        ],
        check=True,
    )
    stale = [
        name
        for name in GENERATED
        if not filecmp.cmp(tmp_path / "kvstore/v1" / name, ROOT / "kvstore/v1" / name, False)
    ]
    assert not stale, f"stale generated files {stale}: run scripts/gen-proto.sh and commit them"
