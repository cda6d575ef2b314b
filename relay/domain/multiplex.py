"""Many readers of many streams, served together: what is new on any of them, in batches.

A reader of its own (`Stream.follow`) costs one message per batch it sends; a client following a
thousand slow streams would pay a thousand messages for a thousand chunks. A Multiplexer keeps
each reader as an offset and a tag, notes which readers have something new (a stream calls back
on append), and hands out everything ready at once, so one message carries the news of many
streams. Each reader still gets its stream's chunks in order, no gap, no duplicate, then its end.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

from relay.domain.errors import AlreadyExists, RelayError, ResourceExhausted
from relay.domain.model import ANONYMOUS, Caller, ChunkBatch, ReplayMode, StreamEnd
from relay.domain.stream import BATCH_MAX_CHARS, Stream, batch_size


@dataclass(frozen=True, slots=True)
class Subscribed:
    """A reader was accepted; its chunks follow."""

    stream_id: str


@dataclass(frozen=True, slots=True)
class Refused:
    """A reader was refused, as its Attach would have been; nothing else follows for its tag."""

    error: RelayError


ReaderEvent = Subscribed | Refused | ChunkBatch | StreamEnd

# (stream_id, chat_id, from_offset, caller) -> the checked stream to read
FindStream = Callable[[str, str, int, Caller], Awaitable[Stream]]


class _Reader:
    __slots__ = ("max_batch", "offset", "prefix", "stream", "tag", "wake", "watching")

    def __init__(
        self, tag: int, stream: Stream, offset: int, max_batch: int, replay: ReplayMode
    ) -> None:
        self.tag = tag
        self.stream = stream
        self.max_batch = max_batch
        # Sent before the chunks from `offset`, batch by batch; None once sent.
        prefix, self.offset = stream.prefix(offset, replay, max_batch)
        self.prefix: Iterator[ChunkBatch] | None = prefix
        self.watching = False
        self.wake: Callable[[], None] = lambda: None


class Multiplexer:
    def __init__(
        self,
        find_stream: FindStream,
        max_batch: int,
        max_readers: int = 10_000,
        max_chars: int = BATCH_MAX_CHARS,
    ) -> None:
        self._find_stream = find_stream
        self._max_readers = max_readers
        self._max_batch = max_batch  # per reader per batch, as Attach's max_batch
        self._max_chars = max_chars  # per batch of events, as per reader batch: under 4 MB
        self._readers: dict[int, _Reader] = {}
        self._pending: set[int] = set()  # tags whose subscription is being checked
        self._notices: list[tuple[int, ReaderEvent]] = []  # Subscribed/Refused, sent first
        self._ready: dict[int, None] = {}  # tags that may have something to send, in order
        self._wakeup: asyncio.Future[None] | None = None
        self._no_more_subscriptions = False
        self._failure: Exception | None = None

    async def subscribe(
        self,
        tag: int,
        *,
        stream_id: str = "",
        chat_id: str = "",
        from_offset: int = 0,
        max_batch: int = 0,
        replay: ReplayMode = ReplayMode.EXACT,
        caller: Caller = ANONYMOUS,
    ) -> None:
        """Adds a reader; its Subscribed or Refused event comes before anything else of `tag`."""
        if tag in self._readers or tag in self._pending:
            self._notify(tag, Refused(AlreadyExists(f"tag {tag} is in use by another reader")))
            return
        if len(self._readers) + len(self._pending) >= self._max_readers:
            error = ResourceExhausted(f"the call has {self._max_readers} readers, its limit")
            self._notify(tag, Refused(error))
            return
        self._pending.add(tag)
        try:
            stream = await self._find_stream(stream_id, chat_id, from_offset, caller)
        except RelayError as exc:
            self._notify(tag, Refused(exc))
            return
        finally:
            self._pending.discard(tag)
        batch = batch_size(max_batch, self._max_batch)
        reader = _Reader(tag, stream, from_offset, batch, replay)
        reader.wake = lambda: self._on_append(reader)
        stream.reader_joined()
        self._readers[tag] = reader
        self._notify(tag, Subscribed(stream.id))
        self._mark_ready(tag)

    def refuse(self, tag: int, error: RelayError) -> None:
        """Refuses a subscription the caller may not make (e.g. for a subject it may not name)."""
        self._notify(tag, Refused(error))

    def unsubscribe(self, tag: int) -> None:
        """Removes a reader; nothing more of `tag` is handed out (an unknown tag is ignored)."""
        reader = self._readers.pop(tag, None)
        if reader is not None:
            self._release(reader)

    def no_more_subscriptions(self) -> None:
        """The batches end once every reader has ended."""
        self._no_more_subscriptions = True
        self._wake()

    def fail(self, error: Exception) -> None:
        """Ends the batches with `error` (the caller broke the protocol, or subscribing failed)."""
        self._failure = error
        self._wake()

    def close(self) -> None:
        for reader in self._readers.values():
            self._release(reader)
        self._readers.clear()

    async def batches(self) -> AsyncIterator[list[tuple[int, ReaderEvent]]]:
        """Everything ready, a batch at a time; each tag's events in order."""
        while True:
            if self._failure is not None:
                raise self._failure
            if self._notices or self._ready:
                yield self._take()
            elif self._no_more_subscriptions and not self._readers and not self._pending:
                return
            else:
                self._wakeup = asyncio.get_running_loop().create_future()
                try:
                    await self._wakeup
                finally:
                    self._wakeup = None

    def _take(self) -> list[tuple[int, ReaderEvent]]:
        events, self._notices = self._notices, []
        ready, self._ready = self._ready, {}
        budget = self._max_chars
        tags = iter(ready)
        for tag in tags:
            reader = self._readers.get(tag)
            if reader is None:  # unsubscribed meanwhile
                continue
            stream = reader.stream
            prefix = None if reader.prefix is None else next(reader.prefix, None)
            if prefix is None:
                reader.prefix = None
            else:
                events.append((tag, prefix))
                self._ready[tag] = None  # the rest of it, or the stream's chunks: next batch
                budget -= sum(map(len, prefix.chunks))
                if budget <= 0:
                    self._ready = dict.fromkeys([*tags, *self._ready])
                    break
                continue
            try:
                event = stream.read(reader.offset, reader.max_batch)
            except RelayError as exc:  # a mirror whose log failed: this reader ends, not all
                events.append((tag, Refused(exc)))
                self.unsubscribe(tag)
                continue
            if event is None:
                self._watch(reader)
                continue
            events.append((tag, event))
            if isinstance(event, StreamEnd):
                self.unsubscribe(tag)
                continue
            reader.offset += len(event.chunks)
            if reader.offset < len(stream.chunks):
                self._ready[tag] = None  # more is there already: next batch
            elif stream.end is not None:  # the end goes with the last chunks
                events.append((tag, stream.end))
                self.unsubscribe(tag)
            else:
                self._watch(reader)
            budget -= sum(map(len, event.chunks))
            if budget <= 0:
                # The rest wait for the next batch, ahead of the readers just served.
                self._ready = dict.fromkeys([*tags, *self._ready])
                break
        return events

    @staticmethod
    def _watch(reader: _Reader) -> None:
        reader.watching = True
        reader.stream.watch(reader.wake)

    def _on_append(self, reader: _Reader) -> None:
        reader.watching = False
        self._mark_ready(reader.tag)

    def _mark_ready(self, tag: int) -> None:
        self._ready[tag] = None
        self._wake()

    def _notify(self, tag: int, event: ReaderEvent) -> None:
        self._notices.append((tag, event))
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    @staticmethod
    def _release(reader: _Reader) -> None:
        if reader.watching:
            reader.stream.unwatch(reader.wake)
            reader.watching = False
        reader.stream.reader_left()
