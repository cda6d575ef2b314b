"""The AI SDK UI message stream over SSE: one `data:` event per chunk, `[DONE]`, then close."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable

from relay.model import ChunkBatch, StreamEnd, StreamState, dump_json

HEADERS = {
    "content-type": "text/event-stream",
    "cache-control": "no-cache",
    "connection": "keep-alive",
    "x-vercel-ai-ui-message-stream": "v1",
    "x-accel-buffering": "no",
}
DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"

Events = AsyncGenerator[ChunkBatch | StreamEnd, None]


def encode_batch(batch: ChunkBatch) -> bytes:
    """Each chunk with its offset as the SSE id, so a client can resume with Last-Event-ID."""
    return "".join(
        f"id: {batch.first_offset + i}\ndata: {chunk}\n\n" for i, chunk in enumerate(batch.chunks)
    ).encode()


def encode_end(end: StreamEnd) -> bytes:
    """What a client must see of the end beyond the producer's own chunks, then [DONE]."""
    if end.state is StreamState.STOPPED:
        tail = dump_json({"type": "abort"})
    elif end.state in (StreamState.FAILED, StreamState.INTERRUPTED):
        tail = dump_json({"type": "error", "errorText": end.error_message or end.state.value})
    else:
        return DONE
    return f"data: {tail}\n\n".encode() + DONE


def error_event(message: str) -> bytes:
    return f"data: {dump_json({'type': 'error', 'errorText': message})}\n\n".encode() + DONE


async def stream_events(
    events: Events,
    first: ChunkBatch | StreamEnd,
    *,
    keepalive_s: float,
    on_chunks: Callable[[int], None],
    on_error: Callable[[BaseException], str],
) -> AsyncIterator[bytes]:
    """Writes `first` and the rest of `events` as SSE, with keep-alive comments while idle.

    When the HTTP client goes away the server cancels this generator; the read in flight is then
    cancelled, which cancels the Attach call: this reader ends, the producer goes on.
    """
    pending: asyncio.Future[ChunkBatch | StreamEnd] | None = None
    try:
        event: ChunkBatch | StreamEnd = first
        while isinstance(event, ChunkBatch):
            on_chunks(len(event.chunks))
            yield encode_batch(event)
            pending = asyncio.ensure_future(anext(events))
            while not (await asyncio.wait({pending}, timeout=keepalive_s))[0]:
                yield KEEPALIVE
            try:
                event = pending.result()
            except StopAsyncIteration:
                yield error_event("the relay ended the stream without an end event")
                return
            except Exception as exc:  # the relay went away mid-stream: the client may resume
                yield error_event(on_error(exc))
                return
        yield encode_end(event)
    finally:
        if pending is not None and not pending.done():
            # Never await here: the server's cancellation would interrupt it. The cancelled read
            # closes the generator, whose cleanup cancels the gRPC call.
            pending.cancel()
        else:
            await events.aclose()
