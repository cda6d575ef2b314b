"""Structured logs, with the `extra` fields a call site passes: one JSON object per line, or, for a
person at a terminal (`--log-format text`, what `make run` uses), one line of text with the fields
as `key=value` after the message:

    2026-12-01T11:40:02 INFO relay stream started stream_id=9f3c... chat_id=chat-1 producer=echo
"""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any

# Not fields of a call site: the record's own, and uvicorn's copy of its message with colours.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update((k, v) for k, v in record.__dict__.items() if k not in _STANDARD)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


_BARE = re.compile(r"[^\s\"=\\\x00-\x1f\x7f]+")  # needs no quotes in key=value form
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _value(value: Any) -> str:
    if isinstance(value, dict | list | tuple):
        text = json.dumps(value, default=str, separators=(",", ":"))
    else:
        text = str(value)
    return text if _BARE.fullmatch(text) else json.dumps(text)


def _one_line(text: str) -> str:
    """`text` with its control characters escaped: a message cannot fake another log line or
    drive the terminal."""
    return json.dumps(text)[1:-1] if _CONTROL.search(text) else text


class TextFormatter(logging.Formatter):
    """`time LEVEL logger message key=value ...`: a value with spaces, quotes or `=` is quoted
    (JSON string escapes), so a line still splits into its fields."""

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(
            f"{key}={_value(value)}"
            for key, value in record.__dict__.items()
            if key not in _STANDARD
        )
        line = (
            f"{self.formatTime(record, '%Y-%m-%dT%H:%M:%S')} {record.levelname} {record.name} "
            f"{_one_line(record.getMessage())}"
        )
        if fields:
            line += " " + fields
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("json", "text")


def configure(level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
