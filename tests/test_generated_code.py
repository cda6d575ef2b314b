"""The committed generated code must be what `make proto` makes from the committed proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            str(ROOT / "protos"),
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(ROOT / "protos/relay/v1/relay.proto"),
        ],
        check=True,
    )
    for name in ("relay_pb2.py", "relay_pb2.pyi", "relay_pb2_grpc.py"):
        fresh = (tmp_path / "relay/v1" / name).read_text()
        committed = (ROOT / "relay/v1" / name).read_text()
        assert committed == fresh, f"relay/v1/{name} is stale: run `make proto` and commit"
