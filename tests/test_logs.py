"""What an operator reads: log lines that keep their fields in both formats, `--help` that shows
each flag's default, and configuration errors that name the program that was run."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from gateway.server import parse_args
from relay import logs
from relay.server import parse_config
from tests.conftest import ROOT


def record(message: str, **fields: object) -> logging.LogRecord:
    entry = logging.LogRecord("relay", logging.INFO, __file__, 1, message, None, None)
    entry.__dict__.update(fields)
    return entry


def test_text_lines_keep_every_field_as_key_value() -> None:
    line = logs.TextFormatter().format(
        record(
            "stream started",
            stream_id="9f3c",
            chat_id="chat 1",
            final_offset=57,
            error='said "no"',
            empty="",
        )
    )
    head, fields = line.split(" INFO relay stream started ")
    assert len(head) == len("2026-12-01T11:40:02")
    assert (
        fields == 'stream_id=9f3c chat_id="chat 1" final_offset=57 error="said \\"no\\"" empty=""'
    )


def test_a_text_line_ends_with_its_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        entry = record("producer failed", stream_id="s1")
        entry.exc_info = sys.exc_info()
    line = logs.TextFormatter().format(entry)
    first, *rest = line.splitlines()
    assert first.endswith("producer failed stream_id=s1")
    assert rest[0] == "Traceback (most recent call last):" and rest[-1] == "ValueError: boom"


def test_json_lines_keep_the_same_fields() -> None:
    entry = json.loads(logs.JsonFormatter().format(record("relay listening", address="h:1")))
    assert (entry["message"], entry["address"], entry["level"]) == (
        "relay listening",
        "h:1",
        "info",
    )


def test_both_servers_help_shows_each_flags_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_config(["--help"], {})
    relay_help = " ".join(capsys.readouterr().out.split())
    assert "(default: 127.0.0.1:50051) [RELAY_ADDRESS]" in relay_help
    assert "(default: 600.0) [RELAY_RETENTION_S]" in relay_help
    assert "--log-format {json,text}" in relay_help and "key=value" in relay_help
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    gateway_help = capsys.readouterr().out
    # The description keeps its lines: the commands stand on their own.
    assert "\n    python -m gateway.server --embedded-relay" in gateway_help
    flat = " ".join(gateway_help.split())
    assert "(default: 127.0.0.1:8080) [GATEWAY_ADDRESS]" in flat
    assert "--log-level {debug,info,warning,error}" in flat


def test_a_bad_log_level_is_refused_naming_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_config(["--log-level", "loud"], {})
    assert "invalid choice: 'loud'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config([], {"RELAY_LOG_FORMAT": "yaml"})
    assert "RELAY_LOG_FORMAT='yaml' is not one of json, text" in capsys.readouterr().err


def test_the_embedded_relays_bad_setting_names_the_gateway() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gateway.server", "--embedded-relay"],
        cwd=ROOT,
        env={**os.environ, "RELAY_RETENTION_S": "ten minutes"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "stream-relay-gateway: error: RELAY_RETENTION_S='ten minutes' is not a valid float"
    )


def test_a_text_line_is_one_line_whatever_its_fields_hold() -> None:
    line = logs.TextFormatter().format(
        record(
            "two\nlines",
            ids=["a", "b"],
            esc="\x1b[31mred",
            nothing=None,
            color_message="uvicorn's colours",  # not a field of the call site
        )
    )
    assert line.count("\n") == 0
    assert line.endswith('two\\nlines ids="[\\"a\\",\\"b\\"]" esc="\\u001b[31mred" nothing=None')


def test_a_text_line_ends_with_its_stack_when_asked() -> None:
    entry = record("where am I")
    entry.stack_info = "Stack (most recent call last):\n  File x"
    assert (
        logs.TextFormatter()
        .format(entry)
        .endswith("where am I\nStack (most recent call last):\n  File x")
    )


def test_help_shows_the_codes_default_never_a_variables_value(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A variable may hold a secret (a password in a store URL): --help never prints it."""
    with pytest.raises(SystemExit):
        parse_config(["--help"], {"RELAY_LOG": "redis://:s3cret@redis.internal:6379/0"})
    out = " ".join(capsys.readouterr().out.split())
    assert "s3cret" not in out and "(default: memory) [RELAY_LOG]" in out


def test_log_levels_are_taken_in_any_case() -> None:
    assert parse_config(["--log-level", "INFO"], {}).log_level == "info"
    assert parse_config([], {"RELAY_LOG_LEVEL": "Warning"}).log_level == "warning"
    assert parse_args(["--log-level", "DEBUG"]).log_level == "debug"
