"""Bounds on slow clients: a request's headers and its body must arrive within a time limit.

uvicorn bounds the idle time between requests (`timeout_keep_alive`) and the size of a request's
head (h11's `max_incomplete_event_size`), but not the time a request takes to arrive: a client
trickling one byte a second held a connection, and its task, indefinitely.

- headers: `header_timeout_protocol` is uvicorn's h11 protocol with a timer from the moment the
  connection waits for a request (it opened, or the previous response ended) until the request's
  head is complete. On expiry a connection that sent part of a request gets a 408 JSON error;
  one that sent nothing is closed, as uvicorn closes an idle keep-alive connection.
- body: `BodyTimeout` bounds the time from a request's head to the end of its body. The route
  reading the body gets a 408 `HttpError` (answered with `connection: close`); a route that did
  not read it and is already answering sees the client as gone.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from gateway.errors import HttpError
from relay.domain.model import dump_json_bytes

_TIMEOUT_BODY = dump_json_bytes(
    {"error": {"code": "request_timeout", "message": "the request's headers came too slowly"}}
)
_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
    b"content-length: " + str(len(_TIMEOUT_BODY)).encode() + b"\r\nconnection: close\r\n\r\n"
) + _TIMEOUT_BODY


def header_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request head takes over `seconds`."""

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _waited: Any = None  # the cycle current when the wait for a request began

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._await_request()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._header_timer is not None and self.cycle is not self._waited:
                self._stop_timer()  # the request's head is complete: a new cycle began

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.cycle is not None and self.cycle.response_complete:
                self._await_request()  # the connection is kept alive for another request

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_timer()
            super().connection_lost(exc)

        def _await_request(self) -> None:
            self._stop_timer()
            if not self.transport.is_closing():
                self._waited = self.cycle
                self._header_timer = self.loop.call_later(seconds, self._expired)

        def _stop_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if self.cycle is not self._waited or self.transport.is_closing():
                return
            if self.conn.trailing_data[0]:  # part of a request came: say why it ends
                self.transport.write(_TIMEOUT_RESPONSE)
            self.transport.close()

    return HeaderTimeoutProtocol


class BodyTimeout:
    """ASGI middleware: a request's body must have arrived `seconds` after its head."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds
        body_done = False
        answering = False

        async def bounded_receive() -> Message:
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                if answering:  # too late for a status: end as if the client had gone
                    body_done = True
                    return {"type": "http.disconnect"}
                raise HttpError(
                    408,
                    "request_timeout",
                    f"the request body did not arrive within {self.seconds:g} s",
                    headers={"connection": "close"},
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def watched_send(message: Message) -> None:
            nonlocal answering
            if message["type"] == "http.response.start":
                answering = True
            await send(message)

        await self.app(scope, bounded_receive, watched_send)
