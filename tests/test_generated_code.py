"""The committed generated code must be what `make proto` makes from the committed protos."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # protoc-gen-mypy and protoc-gen-mypy_grpc, from mypy-protobuf


@pytest.mark.parametrize("proto", ["relay", "producer"])
def test_generated_code_matches_the_proto(tmp_path: Path, proto: str) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            str(ROOT / "protos"),
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--plugin=protoc-gen-mypy={BIN / 'protoc-gen-mypy'}",
            f"--mypy_out={tmp_path}",
            f"--plugin=protoc-gen-mypy_grpc={BIN / 'protoc-gen-mypy_grpc'}",
            f"--mypy_grpc_out={tmp_path}",
            str(ROOT / f"protos/relay/v1/{proto}.proto"),
        ],
        check=True,
    )
    for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"):
        name = f"{proto}{suffix}"
        fresh = (tmp_path / "relay/v1" / name).read_text()
        committed = (ROOT / "relay/v1" / name).read_text()
        assert committed == fresh, f"relay/v1/{name} is stale: run `make proto` and commit"
