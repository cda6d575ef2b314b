"""One answer stream: its ordered chunks (the replay buffer), its end, and the readers following it.

The buffer is a plain list shared by every reader. A reader is nothing but an offset into it, so a
stalled reader holds no memory of its own and never slows the producer or the other readers: the
producer appends and moves on; readers catch up in batches when they can.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import AsyncGenerator, Callable, Iterator

from relay.domain.assembler import MessageAssembler
from relay.domain.errors import RelayError
from relay.domain.model import ChunkBatch, ReplayMode, StreamEnd, StreamPolicy
from relay.domain.ports import CancelRequest
from relay.domain.replay import Compaction

# A batch stops growing past this many characters (at least one chunk goes), so that a response
# stays under the 4 MB a gRPC client accepts by default even when chunks are large.
BATCH_MAX_CHARS = 256 * 1024


def _within(chunks: list[str], max_chars: int) -> list[str]:
    total = 0
    for count, chunk in enumerate(chunks):
        total += len(chunk)
        if total > max_chars:
            return chunks[: max(count, 1)]
    return chunks


def batch_size(requested: int, most: int) -> int:
    """The chunks a reader gets at most per batch: what it asked for (0: no preference), capped."""
    return min(requested or most, most)


NO_POLICY = StreamPolicy()  # nothing ends the stream on its own


class Phase(enum.Enum):
    LIVE = "live"  # the producer runs; chunks may still be appended
    ENDING = "ending"  # the producer is done; the end is being persisted
    ENDED = "ended"  # `end` is set and every reader has been woken


class Stream:
    def __init__(
        self,
        stream_id: str,
        chat_id: str,
        created_at: float,
        owner: str = "",
        *,
        policy: StreamPolicy = NO_POLICY,
        retention: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.id = stream_id
        self.chat_id = chat_id
        self.created_at = created_at
        # When the relay ends it on its own (None: never): what its owner polices, the relay's
        # defaults and its Start's policy resolved. `retention`: how long it is kept once ended
        # (None: the relay's `--retention-s`).
        self.policy = policy
        self.retention = retention
        self._clock = clock
        # The relay instance that runs the producer. Elsewhere this stream is a mirror, filled
        # from the stream log for the readers there (`task` stays None).
        self.owner = owner
        self.chunks: list[str] = []
        self.bytes = 0
        self.phase = Phase.LIVE
        self.end: StreamEnd | None = None
        self.ended_at: float | None = None
        self.cancel_request: CancelRequest | None = None
        self.task: asyncio.Task[None] | None = None
        self.assembler = MessageAssembler(fallback_id=f"msg_{stream_id}")
        self.journaled = 0  # chunks [0, journaled) are in the journal (acknowledged by the store)
        self.readers = 0  # Attach calls and AttachMany subscriptions reading it, on this relay
        self.unread_since: float | None = created_at  # since when `readers` is 0 (None: read)
        # One-shot callbacks of readers that caught up, run by the next append or the end: an
        # append with nobody waiting, the common case, costs one check.
        self._watchers: list[Callable[[], None]] = []
        self._ended = asyncio.Event()
        self.failure: RelayError | None = None  # a mirror whose log failed: readers get it
        self._compaction: Compaction | None = None  # for replays: made at the first, extended

    @classmethod
    def finished(
        cls,
        stream_id: str,
        chat_id: str,
        chunks: list[str],
        end: StreamEnd,
        ended_at: float,
        retention: float | None = None,
    ) -> Stream:
        """A stream restored from the journal, already ended."""
        stream = cls(stream_id, chat_id, ended_at, retention=retention)
        stream.chunks = chunks
        stream.journaled = len(chunks)
        stream.finish(end, ended_at)
        return stream

    @classmethod
    def mirror(
        cls,
        stream_id: str,
        chat_id: str,
        created_at: float,
        owner: str,
        chunks: list[str],
        retention: float | None = None,
    ) -> Stream:
        """A live stream another relay owns, from what its log holds so far; whoever follows
        the log appends the rest (`append`, `logged`) and ends it (`finish`). Its owner polices
        it: a mirror's policy is none."""
        stream = cls(stream_id, chat_id, created_at, owner, retention=retention)
        stream.chunks = chunks
        stream.journaled = len(chunks)
        return stream

    def run(self, task: asyncio.Task[None]) -> None:
        """The producer's task: the one a cancel claim cancels."""
        self.task = task

    def producer_done(self) -> CancelRequest | None:
        """The producer has stopped, one way or another: the end is being persisted. Returns
        the cancel claim, if one was made (it decides the end's state)."""
        self.phase = Phase.ENDING
        return self.cancel_request

    def logged(self, offset: int) -> None:
        """The log has acknowledged chunks up to `offset`."""
        self.journaled = max(self.journaled, offset)

    def log_lost(self, offset: int) -> None:
        """The log holds chunks only up to `offset` (it lost writes): they are written again."""
        self.journaled = min(self.journaled, offset)

    def append(self, chunk: str, size: int) -> None:
        self.chunks.append(chunk)
        self.bytes += size
        if self._watchers:
            self._wake()

    def extend(self, chunks: list[str], size: int) -> None:
        """Appends a batch (`size`: the bytes of all its chunks), waking the readers once."""
        self.chunks.extend(chunks)
        self.bytes += size
        if self._watchers:
            self._wake()

    def reader_joined(self) -> None:
        """A reader (an Attach or an AttachMany subscription) follows the stream."""
        self.readers += 1
        self.unread_since = None

    def reader_left(self) -> None:
        """A reader is gone; the last one starts the no-reader grace."""
        self.readers -= 1
        if self.readers == 0:
            self.unread_since = self._clock()

    def watch(self, callback: Callable[[], None]) -> None:
        """Calls `callback` once, at the next append or at the end."""
        self._watchers.append(callback)

    def unwatch(self, callback: Callable[[], None]) -> None:
        with contextlib.suppress(ValueError):
            self._watchers.remove(callback)

    def fail_readers(self, error: RelayError) -> None:
        """A mirror that can no longer follow its log: its readers, once caught up, get `error`
        (they can attach again) instead of waiting for chunks that will not come."""
        self.failure = error
        self._wake()

    def _wake(self) -> None:
        watchers, self._watchers = self._watchers, []
        for callback in watchers:
            callback()

    def read(self, offset: int, max_batch: int) -> ChunkBatch | StreamEnd | None:
        """What a reader at `offset` gets next: chunks, then the end; None if it must wait."""
        if offset < len(self.chunks):
            batch = self.chunks[offset : offset + max_batch]
            if sum(map(len, batch)) > BATCH_MAX_CHARS:
                batch = _within(batch, BATCH_MAX_CHARS)
            return ChunkBatch(offset, batch)
        if self.end is None and self.failure is not None:
            raise self.failure
        return self.end

    def prefix(
        self, offset: int, mode: ReplayMode, max_batch: int
    ) -> tuple[Iterator[ChunkBatch], int]:
        """What a reader in `mode` from `offset` gets before the chunks as stored (batches,
        made as they are read), and the offset those continue from (relay.domain.replay). A
        part-safe resume from past what this relay holds (a mirror behind its owner) is a
        snapshot of what it holds, then the rest."""
        if mode is ReplayMode.EXACT:
            return iter(()), offset
        held = len(self.chunks)
        end = held if mode is ReplayMode.COMPACT else min(offset, held)
        if end == 0:
            return iter(()), 0
        if self._compaction is None:
            self._compaction = Compaction()
        self._compaction.extend(self.chunks, held)  # the chunks new since the last replay
        return self._compaction.batches(self.chunks, end, max_batch, BATCH_MAX_CHARS), end

    @property
    def replay_bytes(self) -> int:
        """What the stream's compaction holds beyond its chunks (none until a replay asks)."""
        return 0 if self._compaction is None else self._compaction.held_bytes

    def request_cancel(self, request: CancelRequest) -> bool:
        """Claims the right to end a live stream; False if it is ending, ended or already claimed.

        Synchronous, so a Stop and a producer that completes at the same moment cannot both win.
        """
        if self.phase is not Phase.LIVE or self.cancel_request is not None:
            return False
        self.cancel_request = request
        return True

    def cancel_producer(self) -> None:
        if self.phase is Phase.LIVE and self.task is not None:
            self.task.cancel()

    def finish(self, end: StreamEnd, now: float) -> None:
        """Ends the stream once (a later call changes nothing). Chunks past the end's final
        offset are dropped: a relay that lost the stream wrote them after another sealed it."""
        if self.end is not None:
            return
        del self.chunks[end.final_offset :]
        if self._compaction is not None and self._compaction.upto > end.final_offset:
            self._compaction = None  # it took in chunks the end drops
        self.end = end
        self.ended_at = now
        self.phase = Phase.ENDED
        self._wake()
        self._ended.set()

    async def wait_ended(self) -> StreamEnd:
        """Waits for the end; cancelling the waiter never touches the stream."""
        await self._ended.wait()
        assert self.end is not None
        return self.end

    async def follow(
        self, offset: int, max_batch: int, replay: ReplayMode = ReplayMode.EXACT
    ) -> AsyncGenerator[ChunkBatch | StreamEnd, None]:
        """Replays from `offset` (as `replay` says), follows live, then yields the end: no gap,
        no duplicate."""
        self.reader_joined()
        try:
            prefix, offset = self.prefix(offset, replay, max_batch)
            for batch in prefix:
                yield batch
            while True:
                event = self.read(offset, max_batch)
                if isinstance(event, ChunkBatch):
                    yield event
                    offset += len(event.chunks)
                elif event is not None:
                    yield event
                    return
                else:
                    await self._changed()
        finally:
            self.reader_left()

    async def _changed(self) -> None:
        waiter = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not waiter.done():
                waiter.set_result(None)

        self.watch(wake)
        try:
            await waiter
        except asyncio.CancelledError:  # woken, the callback is gone already; cancelled, not
            self.unwatch(wake)
            raise
