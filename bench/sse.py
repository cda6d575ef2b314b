"""A minimal HTTP/1.1 client for the gateway's SSE responses, on bare asyncio streams.

An HTTP library would cost the reader more CPU than the gateway spends per event on this 2-core
machine; this reads the chunked body and splits it into SSE events, nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any


class HttpError(Exception):
    pass


class Connection:
    """One keep-alive-less HTTP/1.1 connection, opened before the timed request."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, address: str) -> Connection:
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 22)
        return cls(reader, writer)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()

    async def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str]]:
        payload = b"" if body is None else json.dumps(body).encode()
        lines = [f"{method} {path} HTTP/1.1", "host: 127.0.0.1", "connection: close"]
        if body is not None:
            lines += ["content-type: application/json", f"content-length: {len(payload)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        parsed = {}
        for line in header_lines:
            if ":" in line:
                name, value = line.split(":", 1)
                parsed[name.strip().lower()] = value.strip()
        return status, parsed

    async def body(self, headers: dict[str, str]) -> AsyncIterator[bytes]:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = await self.reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    return
                data = await self.reader.readexactly(size + 2)
                yield data[:-2]
        elif "content-length" in headers:
            yield await self.reader.readexactly(int(headers["content-length"]))
        else:
            while data := await self.reader.read(1 << 16):
                yield data


async def events(body: AsyncIterator[bytes]) -> AsyncIterator[list[tuple[int, bytes]]]:
    """SSE events in the batches they arrive: (id, data) with id -1 where there is none (the
    `[DONE]` event, an `abort` or `error` tail); comments (keep-alives) are dropped."""
    pending = b""
    async for data in body:
        pending += data
        if b"\n\n" not in data and b"\n\n" not in pending[-len(data) - 1 :]:
            continue
        *complete, pending = pending.split(b"\n\n")
        batch = []
        for event in complete:
            if event.startswith(b"id: "):
                newline = event.index(b"\n")
                batch.append((int(event[4:newline]), event[newline + 7 :]))
            elif event.startswith(b"data: "):
                batch.append((-1, event[6:]))
            elif not event.startswith(b":"):
                raise HttpError(f"not an SSE event: {event[:80]!r}")
        if batch:
            yield batch
