"""The gateway's SSE writer (gateway.sse.stream_events) on its own: how far it reads ahead of a
browser that does not read, bursts in one write, and the events closed however it ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

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
