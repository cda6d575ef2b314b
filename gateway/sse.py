"""The AI SDK UI message stream over SSE: one `data:` event per chunk, `[DONE]`, then close."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from relay.domain.model import ChunkBatch, StreamEnd, StreamState, dump_json, load_json

HEADERS = {
    "content-type": "text/event-stream",
    "cache-control": "no-cache",
    "connection": "keep-alive",
    "x-vercel-ai-ui-message-stream": "v1",
    "x-accel-buffering": "no",
}
DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"
# What a reader gets when the gateway shuts down under it: the answer goes on in the relay.
RESTARTING = "the server is restarting; resume to continue"

Events = AsyncGenerator[ChunkBatch | StreamEnd, None]


def encode_batch(batch: ChunkBatch) -> bytes:
    """Each chunk with its offset as the SSE id (for a compacted chunk, the offset of the last
    chunk it stands for), so a client can resume with Last-Event-ID."""
    if batch.offsets is None:
        first = batch.first_offset
        return "".join(
            f"id: {first + i}\ndata: {chunk}\n\n" for i, chunk in enumerate(batch.chunks)
        ).encode()
    return "".join(
        f"id: {offset}\ndata: {chunk}\n\n"
        for offset, chunk in zip(batch.offsets, batch.chunks, strict=True)
    ).encode()


# A reader gets exactly one of these last, before [DONE]: the producer's, or else the gateway's.
TERMINAL_TYPES = ("error", "abort")


def is_terminal(chunk: str) -> bool:
    """Whether `chunk` (as stored: compact JSON) is an `error` or `abort` chunk."""
    if '"error"' not in chunk and '"abort"' not in chunk:  # most chunks: no parse
        return False
    try:
        parsed = load_json(chunk)
    except ValueError:
        return False
    return isinstance(parsed, dict) and parsed.get("type") in TERMINAL_TYPES


def encode_end(end: StreamEnd, terminal_sent: bool = False) -> bytes:
    """What a client must see of the end beyond the producer's own chunks, then [DONE]: an
    `abort` for a stopped stream, an `error` for a failed or interrupted one, unless the reader
    got one already (`terminal_sent`: a producer that reports its own error, maybe before a
    `finish`)."""
    if terminal_sent or end.state is StreamState.COMPLETED:
        return DONE
    if end.state is StreamState.STOPPED:
        tail = dump_json({"type": "abort"})
    else:
        tail = dump_json({"type": "error", "errorText": end.error_message or end.state.value})
    return f"data: {tail}\n\n".encode() + DONE


def error_event(message: str, terminal_sent: bool = False) -> bytes:
    if terminal_sent:
        return DONE
    return f"data: {dump_json({'type': 'error', 'errorText': message})}\n\n".encode() + DONE


READ_AHEAD = 8  # events read ahead of the writer at most: a burst goes out in one write


class _NoEnd:
    """The events ended without an end event."""


async def stream_events(
    events: Events,
    *,
    keepalive_s: float,
    on_event: Callable[[ChunkBatch | StreamEnd], None],
    on_error: Callable[[BaseException], str],
    draining: asyncio.Event | None = None,
) -> AsyncIterator[bytes]:
    """Writes `events` as SSE, with keep-alive comments while none comes (e.g. before a slow
    model's first token).

    One task reads `events` a few events ahead of the writer, which takes what is ready without
    a task or a wait of its own per event (at 50 chunks/s per browser, those were a fifth of the
    gateway's CPU), and writes a burst in one piece. The reader goes no further ahead than
    READ_AHEAD: a browser that does not read holds its events back in the relay client, not here.

    When the HTTP client goes away the server cancels this generator, which cancels the read in
    flight and so the Attach call: this reader ends, the producer goes on. When `draining` is set
    (the gateway is shutting down) the stream ends at once with an `error` chunk saying to
    resume, then [DONE], so the server can close the connection cleanly.
    """
    loop = asyncio.get_running_loop()
    ready: collections.deque[ChunkBatch | StreamEnd | BaseException | _NoEnd] = collections.deque()
    wake: asyncio.Future[None] | None = None  # the writer's, while it waits
    room: asyncio.Future[None] | None = None  # the reader's, while it is far enough ahead

    def signal(future: asyncio.Future[None] | None) -> None:
        if future is not None and not future.done():
            future.set_result(None)

    async def read() -> None:
        nonlocal room
        try:
            try:
                async for event in events:
                    ready.append(event)
                    signal(wake)
                    if isinstance(event, StreamEnd):
                        break
                    while len(ready) >= READ_AHEAD:
                        room = loop.create_future()
                        await room
                else:
                    ready.append(_NoEnd())
            except Exception as exc:  # the relay went away mid-stream: the client may resume
                ready.append(exc)
            except asyncio.CancelledError as exc:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise  # this reader is being cancelled (the client went away)
                # The read was cancelled under it (its gRPC call cancelled elsewhere): the
                # client gets an error saying to resume, and [DONE], not a cut connection.
                ready.append(ConnectionError(f"the relay call was cancelled ({exc})"))
            finally:
                signal(wake)
        finally:
            # Also when cancelled while ahead of the writer: the events' cleanup ends the read
            # (cancels the Attach call, or unsubscribes) at once, not when garbage collected.
            await events.aclose()

    reading = loop.create_task(read())
    reading.add_done_callback(lambda _: signal(wake))
    stopping = asyncio.ensure_future((draining or asyncio.Event()).wait())
    stopping.add_done_callback(lambda _: signal(wake))
    terminal_sent = False  # whether this reader got an error or abort chunk already
    try:
        while True:
            while not ready and not stopping.done():
                if reading.done():
                    reading.result()  # cancelled under us: as the read would have raised
                wake = loop.create_future()
                timer = loop.call_later(keepalive_s, signal, wake)
                try:
                    await wake
                finally:
                    timer.cancel()
                    wake = None
                if not ready and not stopping.done() and not reading.done():
                    yield KEEPALIVE
            if stopping.done():
                yield error_event(RESTARTING, terminal_sent)
                return
            out: list[bytes] = []
            while ready:
                item = ready.popleft()
                if isinstance(item, _NoEnd):
                    message = "the relay ended the stream without an end event"
                    yield b"".join(out) + error_event(message, terminal_sent)
                    return
                if isinstance(item, BaseException):
                    yield b"".join(out) + error_event(on_error(item), terminal_sent)
                    return
                on_event(item)
                if isinstance(item, StreamEnd):
                    yield b"".join(out) + encode_end(item, terminal_sent)
                    return
                terminal_sent = terminal_sent or any(map(is_terminal, item.chunks))
                out.append(encode_batch(item))
            signal(room)
            yield b"".join(out)
    finally:
        # Never await here: the server's cancellation would interrupt it. The cancelled read
        # closes the events, whose cleanup cancels the gRPC call.
        stopping.cancel()
        reading.cancel()


class SseResponse(StreamingResponse):
    """A streaming response that notices a client going away at once, not at its next write.

    Starlette only learns of a disconnect when a write fails, and an idle SSE stream may not write
    for a while: the reader, and its Attach on the relay, would outlive the client until then.
    `on_close` is called once the response is over, however it ends (also if it never started),
    and `source` (the relay events the body reads) is closed then: a body that never started
    (the client went away while the head was being sent) cannot close what it holds.
    """

    def __init__(
        self,
        content: AsyncIterator[bytes],
        *,
        headers: Mapping[str, str] | None = None,
        on_close: Callable[[], None] | None = None,
        source: Events | None = None,
    ) -> None:
        super().__init__(content, headers=headers)
        self.on_close = on_close
        self.source = source

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    with contextlib.suppress(OSError):  # the client went away mid-write
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:  # a generator cancelled while suspended at a yield
                await close()
        finally:
            if self.on_close is not None:
                self.on_close()
            if self.source is not None:
                # Never suspends: the relay client's events close without waiting (a never
                # started generator at once; a subscription or a call is cancelled, not awaited).
                # One the body is still reading is "already running": the body's reader, being
                # cancelled, closes it.
                with contextlib.suppress(RuntimeError):
                    await self.source.aclose()
