"""The README's Python session runs as written."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Env

QUICKSTART = Path(__file__).resolve().parent.parent / "examples" / "quickstart.py"


async def test_the_quickstart_session_runs(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("quickstart", QUICKSTART)
    assert spec is not None and spec.loader is not None
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)

    await quickstart.main(env.target)

    out = capsys.readouterr().out
    assert "disconnected after 5 chunks" in out
    assert "ended: completed after 46 chunks" in out
    assert "stop: stopped at offset" in out
    assert "active stream now: None" in out


def test_the_python_producer_example_needs_a_token_beyond_loopback() -> None:
    example = QUICKSTART.parent / "producer_python.py"
    root = str(QUICKSTART.parent.parent)
    result = subprocess.run(
        [sys.executable, str(example), "--host", "0.0.0.0", "--port", "0"],
        cwd=root,
        env={**os.environ, "PYTHONPATH": root, "PRODUCER_TOKEN": ""},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "listening beyond loopback needs a token" in result.stderr
