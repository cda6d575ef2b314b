"""The gateway's SSE writer (gateway.sse.stream_events) on its own: how far it reads ahead of a
browser that does not read, bursts in one write, and the events closed however it ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import cast

from starlette.types import Message

from gateway import sse
from relay.domain.model import ChunkBatch, StreamEnd, StreamState


class Source:
    """Events as the relay client gives them: `count` one-chunk batches ready at once, then
    (if `end`) the stream's end; counts what was taken and whether it was closed."""

    def __init__(self, count: int, end: bool = True) -> None:
        self.count = count
        self.end = end
        self.taken = 0
        self.closed = asyncio.Event()

    async def events(self) -> AsyncGenerator[ChunkBatch | StreamEnd, None]:
        try:
            for offset in range(self.count):
                self.taken += 1
                yield ChunkBatch(offset, [f'{{"type":"text-delta","id":"t","delta":"{offset}"}}'])
            if self.end:
                yield StreamEnd(StreamState.COMPLETED, self.count)
            else:
                await asyncio.Event().wait()  # a live stream with nothing more yet
        finally:
            self.closed.set()


def writer(source: Source, keepalive_s: float = 60) -> AsyncGenerator[bytes, None]:
    return sse.stream_events(  # type: ignore[return-value]
        source.events(), keepalive_s=keepalive_s, on_event=lambda _: None, on_error=str
    )


async def settle() -> None:
    """Lets every task run until all wait (no I/O here: a bounded number of turns)."""
    for _ in range(50):
        await asyncio.sleep(0)


async def test_a_browser_that_does_not_read_holds_the_events_back_in_the_client() -> None:
    source = Source(1_000)
    out = writer(source)
    first = await anext(out)  # then this browser reads nothing more
    await settle()
    # One burst written, and READ_AHEAD more read; the rest stays with the relay client.
    assert first.count(b"data: ") == sse.READ_AHEAD
    assert source.taken == 2 * sse.READ_AHEAD
    rest = b"".join([piece async for piece in out])
    assert rest.count(b"data: ") == 1_000 - sse.READ_AHEAD + 1  # and [DONE]
    assert rest.endswith(sse.DONE) and source.closed.is_set()


async def test_events_are_written_in_order_each_once() -> None:
    source = Source(100)
    body = b"".join([piece async for piece in writer(source)])
    ids = [int(line.split()[1]) for line in body.split(b"\n") if line.startswith(b"id: ")]
    assert ids == list(range(100)) and body.endswith(sse.DONE)


async def test_a_browser_gone_while_the_reader_is_ahead_closes_the_events() -> None:
    source = Source(1_000)
    out = writer(source)
    await anext(out)
    await settle()  # the reader waits for room, READ_AHEAD events ahead
    assert not source.closed.is_set()
    await out.aclose()  # the server closes the response: the browser went away
    await asyncio.wait_for(source.closed.wait(), 5)
    assert source.taken == 2 * sse.READ_AHEAD


async def test_a_browser_gone_while_waiting_for_the_next_event_closes_the_events() -> None:
    source = Source(3, end=False)
    out = writer(source)
    assert (await anext(out)).count(b"data: ") == 3
    waiting = asyncio.ensure_future(anext(out))  # nothing comes: the writer waits
    await settle()
    waiting.cancel()  # the server cancels the response
    await asyncio.gather(waiting, return_exceptions=True)
    await out.aclose()
    await asyncio.wait_for(source.closed.wait(), 5)


async def test_an_idle_stream_gets_keepalives_then_its_events() -> None:
    source = Source(0, end=False)
    out = writer(source, keepalive_s=0.01)
    assert await anext(out) == sse.KEEPALIVE
    assert await anext(out) == sse.KEEPALIVE
    await out.aclose()
    await asyncio.wait_for(source.closed.wait(), 5)


class Browser:
    """An ASGI client for SseResponse: `gone` set, it disconnects; what was sent is kept."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()
        self.sent: list[Message] = []
        self.asked = 0

    async def receive(self) -> Message:
        self.asked += 1
        if self.asked == 1:
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)


SCOPE = {"type": "http", "asgi": {"version": "3.0"}, "method": "GET", "path": "/", "headers": []}


class Subscription:
    """A source closable before its first read, as the relay client's shared reads are."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> ChunkBatch | StreamEnd:
        await asyncio.Event().wait()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self.closed.set()


async def test_a_browser_gone_while_the_head_is_written_closes_the_source() -> None:
    """The body never starts (its head's write paused, then the browser left): the response
    closes the relay events it was given, which the body, never started, cannot."""
    source = Subscription()
    browser = Browser()
    head_sent = asyncio.Event()

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            head_sent.set()
            await asyncio.Event().wait()  # the socket write paused

    released = asyncio.Event()
    events = cast(sse.Events, source)  # the part of an AsyncGenerator the writer uses
    body = sse.stream_events(events, keepalive_s=60, on_event=lambda _: None, on_error=str)
    response = sse.SseResponse(body, on_close=released.set, source=events)
    serving = asyncio.ensure_future(response(SCOPE, browser.receive, send))
    await head_sent.wait()
    browser.gone.set()
    await asyncio.wait_for(serving, 5)
    assert released.is_set() and source.closed.is_set()


async def test_a_read_cancelled_under_the_reader_ends_with_an_error_and_done() -> None:
    """The events raise CancelledError though nobody cancelled this response (the gRPC call
    was cancelled elsewhere): the browser gets an error saying to resume and [DONE]."""

    async def events() -> AsyncGenerator[ChunkBatch | StreamEnd, None]:
        yield ChunkBatch(0, ['{"type":"text-delta","id":"t","delta":"0"}'])
        raise asyncio.CancelledError  # as grpc.aio's read of a call cancelled under it

    browser = Browser()
    body = sse.stream_events(events(), keepalive_s=60, on_event=lambda _: None, on_error=str)
    serving = asyncio.ensure_future(sse.SseResponse(body)(SCOPE, browser.receive, browser.send))
    await asyncio.wait_for(serving, 5)
    written = b"".join(m["body"] for m in browser.sent if m["type"] == "http.response.body")
    assert b'"type":"error"' in written and written.endswith(sse.DONE)
    browser.gone.set()
