"""The SSE event parser: `EventParser` turns an upstream body's raw bytes into its server-sent
events, (event type, data) pairs, for `chunks.Translator`."""

from __future__ import annotations

import re

from relay.producers.openai.errors import Failure

_LINE_END = re.compile(rb"\r\n|\r|\n")
_LINE_MAX = 4 * 1024 * 1024


class EventParser:
    """Server-sent events from raw body bytes: `feed` returns the (event type, data) of each event
    a blank line completes. Lines end at CRLF, LF or CR only (not at the other characters
    `str.splitlines` breaks on, which a model's text may hold). Comments, `id:` and `retry:` are
    ignored."""

    def __init__(self) -> None:
        self._pieces: list[bytes] = []  # the current line so far
        self._size = 0
        self._after_cr = False  # the last piece ended with CR: skip an LF that starts the next
        self._event = ""
        self._data: list[str] = []

    def feed(self, piece: bytes) -> list[tuple[str, str]]:
        events: list[tuple[str, str]] = []
        start = 1 if self._after_cr and piece.startswith(b"\n") else 0
        self._after_cr = False
        for end in _LINE_END.finditer(piece, start):
            self._pieces.append(piece[start : end.start()])
            line = b"".join(self._pieces).decode("utf-8", "replace")
            self._pieces, self._size = [], 0
            self._line(line, events)
            start = end.end()
            self._after_cr = end.group() == b"\r" and start == len(piece)
        if start < len(piece):
            self._pieces.append(piece[start:])
            self._size += len(piece) - start
            if self._size > _LINE_MAX:
                raise Failure(f"malformed upstream data: a line over {_LINE_MAX} bytes")
        return events

    def close(self) -> list[tuple[str, str]]:
        """The body ended: an event it left without its blank line still counts."""
        events: list[tuple[str, str]] = []
        if self._pieces:
            self._line(b"".join(self._pieces).decode("utf-8", "replace"), events)
            self._pieces = []
        self._line("", events)
        return events

    def _line(self, line: str, events: list[tuple[str, str]]) -> None:
        if line == "":
            if self._data:
                events.append((self._event, "\n".join(self._data)))
            self._event, self._data = "", []
            return
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
