"""`make fuzz`: schemathesis against a live gateway, with its OpenAPI document (/openapi.json).

Starts `python -m gateway.server --embedded-relay` on free loopback ports with a temporary
database and an echo producer without delay (streams are short), then runs schemathesis with
three checks: no 5xx (`not_a_server_error`), every status documented
(`status_code_conformance`), every JSON body valid against its schema
(`response_schema_conformance`). Exits with schemathesis' status; on failure the gateway's log
is printed too.

    python -m tests.fuzz_gateway                    # what `make fuzz` runs
    python -m tests.fuzz_gateway --max-examples 200 --seed 1
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKS = "not_a_server_error,status_code_conformance,response_schema_conformance"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until_up(url: str, gateway: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if gateway.poll() is not None:
            raise SystemExit(f"fuzz: the gateway exited ({gateway.returncode}) before it was up")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise SystemExit(f"fuzz: the gateway was not up within {timeout_s:g} s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fuzz_gateway", description=__doc__)
    parser.add_argument("--max-examples", type=int, default=30, help="test cases per operation")
    parser.add_argument("--seed", type=int, help="schemathesis' random seed (to reproduce a run)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="stream-relay-fuzz-") as tmp:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = Path(tmp) / "gateway.log"
        with log_path.open("wb") as log:
            gateway = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gateway.server",
                    "--embedded-relay",
                    "--relay",
                    "127.0.0.1:0",
                    "--address",
                    f"127.0.0.1:{port}",
                    "--log-format",
                    "text",
                    "--log-level",
                    "warning",
                ],
                cwd=ROOT,
                env={
                    **os.environ,
                    "PYTHONPATH": str(ROOT),
                    "RELAY_DB": str(Path(tmp) / "relay.sqlite3"),
                    "RELAY_ECHO_DELAY_MS": "0",
                    "RELAY_SHUTDOWN_GRACE_S": "1",
                },
                stderr=log,
            )
        try:
            wait_until_up(url, gateway)
            command = [
                str(Path(sys.executable).parent / "schemathesis"),
                "run",
                url + "/openapi.json",
                "--checks",
                CHECKS,
                "--max-examples",
                str(args.max_examples),
                "--workers",
                "1",
                "--request-timeout",
                "10",
                "--generation-database",
                "none",
                "--no-color",
                *(["--seed", str(args.seed)] if args.seed is not None else []),
            ]
            print("fuzz:", " ".join(command), flush=True)
            result = subprocess.run(command, cwd=tmp, check=False)
        finally:
            gateway.terminate()
            try:
                gateway.wait(timeout=15)
            except subprocess.TimeoutExpired:
                gateway.kill()
                gateway.wait()
        if result.returncode != 0 or gateway.returncode != 0:
            print(f"fuzz: the gateway's log (exit {gateway.returncode}):", file=sys.stderr)
            print(log_path.read_text(errors="replace")[-20_000:], file=sys.stderr)
        return result.returncode or gateway.returncode


if __name__ == "__main__":
    raise SystemExit(main())
