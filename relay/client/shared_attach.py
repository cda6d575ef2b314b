"""Attach for many readers over one AttachMany call, with `RelayClient.open_attach`'s interface.

A gateway serving many browsers would otherwise hold one Attach call per browser, and pay one gRPC
message per chunk per browser; through one AttachMany call the relay sends the news of many streams
in one message. Each reader still gets an `Attached`: the stream's id, then its events in order.

A reader's events wait in a queue for its consumer (a browser connection). So that a stalled
browser never makes this process hold a whole stream, a reader with `pause_after` batches waiting
is unsubscribed, and subscribed again from the offset it had reached once its consumer has read
them: the relay keeps the buffer, as it does for a stalled Attach.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

from relay.client import ClosableEvents, ManyReaders, ReaderRefused, RelayClient
from relay.client.errors import Cancelled, RelayError, Unavailable
from relay.domain.model import Attached, ChunkBatch, ReplayMode, StreamEnd
from relay.domain.multiplex import Subscribed

Event = ChunkBatch | StreamEnd


@dataclass(eq=False)
class _Reader:
    tag: int
    stream_id: str = ""
    subject: str = ""  # whom the reader acts for ("" : the call's subject)
    offset: int = 0  # the offset after the last chunk queued
    events: asyncio.Queue[Event | BaseException] = field(default_factory=asyncio.Queue)
    accepted: asyncio.Future[str] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    paused: bool = False


class SharedAttach:
    def __init__(self, client: RelayClient, *, pause_after: int = 64) -> None:
        self._client = client
        self._pause_after = pause_after
        self._tags = itertools.count(1)
        self._readers: dict[int, _Reader] = {}  # by their current tag
        self._call: ManyReaders | None = None
        self._dispatcher: asyncio.Task[None] | None = None

    async def open_attach(
        self,
        *,
        stream_id: str = "",
        chat_id: str = "",
        from_offset: int = 0,
        replay: ReplayMode = ReplayMode.EXACT,
        subject: str | None = None,
    ) -> Attached:
        """Returns once the relay has accepted the reader; raises the error Attach would have
        raised (relay.client.errors) if it refuses. Closing `events` ends only this reader.
        `subject`: whom this reader acts for (each reader of the shared call names its own)."""
        reader = _Reader(next(self._tags), subject=subject or "", offset=from_offset)
        self._subscribe(reader, stream_id=stream_id, chat_id=chat_id, replay=replay)
        try:
            reader.stream_id = await reader.accepted
        except BaseException:
            self._unsubscribe(reader)
            raise
        return Attached(reader.stream_id, _ReaderEvents(self, reader))

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._dispatcher is not None:
            await asyncio.gather(self._dispatcher, return_exceptions=True)

    async def _next(self, reader: _Reader) -> Event:
        if reader.paused and reader.events.empty():
            reader.paused = False
            reader.tag = next(self._tags)
            # Exactly from where it was: its consumer has everything before, in any mode.
            self._subscribe(reader, stream_id=reader.stream_id)
        event = await reader.events.get()
        if isinstance(event, BaseException):
            raise event
        return event

    def _subscribe(
        self,
        reader: _Reader,
        *,
        stream_id: str = "",
        chat_id: str = "",
        replay: ReplayMode = ReplayMode.EXACT,
    ) -> None:
        call = self._connected()
        self._readers[reader.tag] = reader
        call.subscribe(
            reader.tag,
            stream_id=stream_id,
            chat_id=chat_id,
            from_offset=reader.offset,
            replay=replay,
            subject=reader.subject,
        )

    def _unsubscribe(self, reader: _Reader) -> None:
        if self._readers.pop(reader.tag, None) is not None and self._call is not None:
            self._call.unsubscribe(reader.tag)

    def _connected(self) -> ManyReaders:
        if self._call is None:
            self._call = self._client.attach_many()
            self._dispatcher = asyncio.create_task(self._dispatch(self._call))
        return self._call

    async def _dispatch(self, call: ManyReaders) -> None:
        try:
            async for tag, event in call:
                reader = self._readers.get(tag)
                if reader is not None:
                    self._deliver(reader, event)
        except RelayError as exc:
            self._lost(call, exc)
        except asyncio.CancelledError:
            self._lost(call, Cancelled("the shared Attach was closed"))
            raise
        else:
            self._lost(call, Unavailable("the relay ended the call"))

    def _lost(self, call: ManyReaders, failure: RelayError) -> None:
        """Every reader of a broken call learns it; the next open_attach dials a new call."""
        if self._call is call:
            self._call = None
        readers, self._readers = self._readers, {}
        for reader in readers.values():
            _fail(reader, failure)

    def _deliver(self, reader: _Reader, event: Subscribed | ReaderRefused | Event) -> None:
        if isinstance(event, Subscribed):
            if not reader.accepted.done():
                reader.accepted.set_result(event.stream_id)
            return
        if isinstance(event, ReaderRefused):  # at open_attach, or a paused reader coming back
            del self._readers[reader.tag]
            _fail(reader, event.error())
            return
        reader.events.put_nowait(event)
        if isinstance(event, StreamEnd):
            del self._readers[reader.tag]
            return
        reader.offset = event.next_offset
        if reader.events.qsize() >= self._pause_after:
            self._unsubscribe(reader)
            reader.paused = True


def _fail(reader: _Reader, failure: RelayError) -> None:
    """open_attach raises `failure` if the reader was not accepted yet, else its next read does."""
    if reader.accepted.done():
        reader.events.put_nowait(failure)
    else:
        reader.accepted.set_exception(failure)


class _ReaderEvents(ClosableEvents):
    """A reader's events: closing them unsubscribes it."""

    def __init__(self, shared: SharedAttach, reader: _Reader) -> None:
        self._shared = shared
        self._reader = reader

    async def _next(self) -> Event:
        return await self._shared._next(self._reader)

    def _release(self) -> None:
        self._shared._unsubscribe(self._reader)
