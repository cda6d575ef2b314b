"""The relay's two storage ports, split by what they hold (DESIGN §5).

- `StreamLog`: per stream, chunks at dense offsets 0, 1, 2, ... and a terminal entry (the seal)
  that is durable state: a reader arriving late, on any instance, still finds the end. It also
  carries the cancel signal from whoever calls Stop to the instance that owns the producer.
- `ChatStore`: chats, messages, stream records, the chat's active-stream pointer (compare-and-set,
  compare-and-clear), idempotency keys and instance leases.

Embedded (the default): `relay.stores.sqlite.SqliteStore` is both, in one SQLite file; the replay
buffer in memory is the live part of the log. Cluster: `relay.stores.redis_log.RedisStreamLog`
(Redis Streams) and `relay.stores.postgres.PostgresChatStore`.

Every operation is all or nothing, also when its caller is cancelled mid-way: it then runs to its
end without a waiter. An implementation that cannot do its work raises
`relay.domain.errors.Unavailable` with a message fit for clients, and `error` says why until an
operation succeeds again.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from relay.domain.model import EndReason, StreamEnd, StreamState, UIMessage


class LogBehind(Exception):
    """Raised by `StreamLog.append` when a log holds less than a run assumes (it lost writes:
    a Redis restarted from an AOF written every second). `holds` gives, per stream, the offset
    its log ends at: the writer appends again from there. The other runs are written."""

    def __init__(self, holds: dict[str, int]) -> None:
        super().__init__(f"logs behind their writer: {holds}")
        self.holds = holds


@dataclass(frozen=True, slots=True)
class ChunkRun:
    """Chunks of one stream to append, starting at `first_offset`."""

    stream_id: str
    first_offset: int
    chunks: Sequence[str]


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """Why a live producer is cancelled, and the message the client asks to persist."""

    state: StreamState  # STOPPED (by Stop or supersede) or INTERRUPTED (shutdown, lost lease)
    message: UIMessage | None = None
    reason: EndReason = EndReason.UNSPECIFIED


@dataclass(frozen=True, slots=True)
class LoggedStream:
    """What a log holds of one stream: its chunks [0, final offset) and its seal, if sealed."""

    stream_id: str
    chat_id: str
    chunks: list[str]
    end: StreamEnd | None  # None while the stream is open


@dataclass(frozen=True, slots=True)
class StreamRecord:
    """A chat store's record of one stream."""

    stream_id: str
    chat_id: str
    owner: str  # the instance that runs (or ran) its producer
    producer: str
    created_at: float
    end: StreamEnd | None = None  # None while live
    ended_at: float | None = None
    # How long the stream is kept once ended, as its Start asked (None: the relay's retention).
    retention_s: float | None = None
    message_id: str = ""  # the id of the last message its Start sent ("": none)


class Begun(enum.IntEnum):
    """What `ChatStore.begin_stream` did. Truthy when the stream was recorded."""

    LOST = 0  # the compare-and-set failed: nothing written
    LIVE = 1  # the stream is live and the chat's active stream
    # A Stop naming this Start came first (its tombstone is consumed): the stream is recorded
    # already ended STOPPED at offset 0, and the chat has no active stream.
    STOPPED_BEFORE_START = 2


@dataclass(frozen=True, slots=True)
class StartSeen:
    """What the chat store knows of the Start a Stop names (`ChatStore.stop_before_start`)."""

    arrived: bool  # False: not yet; a tombstone waits for it
    stream_id: str | None = None  # its stream, when it arrived and its record is kept


class StreamLog(Protocol):
    error: str | None

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def probe(self) -> None:
        """A small write, to learn whether the log works again after a failure."""

    async def create(self, stream_id: str, chat_id: str, owner: str) -> None:
        """Opens an empty log for a new stream (before its first append)."""

    async def append(self, runs: Sequence[ChunkRun]) -> set[str]:
        """Appends runs, several streams at once. A run may be written again and may overlap
        what the log holds (a retried write): chunks already there are skipped, never doubled.
        Returns the ids of streams that are sealed (their runs are not written): the fence that
        keeps an instance that lost a stream from writing into it. Raises LogBehind for runs
        that start past the end of their log."""

    async def seal(self, stream_id: str, end: StreamEnd, retention_s: float) -> StreamEnd:
        """Writes the terminal entry, unless the stream has one: returns the end that holds.
        The log is freed `retention_s` after the seal (the stream's own retention, if its Start
        set one), or by `delete`, whichever comes first."""

    async def load(self, stream_id: str) -> LoggedStream | None:
        """The stream's chunks so far and its seal; None if unknown or expired. Chunks past a
        seal's final offset (a fenced writer's) are not part of the stream and are dropped."""

    def follow(self, stream_id: str, from_offset: int) -> AsyncIterator[list[str] | StreamEnd]:
        """Chunks from `from_offset` as they are appended, then the seal (last item): what an
        instance that does not own the stream serves its readers from."""
        ...

    async def signal_cancel(self, owner: str, stream_id: str, request: CancelRequest) -> None:
        """Asks the instance `owner` to cancel the producer of `stream_id` (best effort: the
        caller repeats it until the stream is sealed or the owner's lease has lapsed)."""

    def cancels(self, owner: str) -> AsyncIterator[tuple[str, CancelRequest]]:
        """The cancel signals sent to `owner`, for as long as the iteration runs."""
        ...

    async def delete(self, stream_ids: Sequence[str]) -> None:
        """Frees the logs of these streams now (their retention has passed)."""


class ChatStore(Protocol):
    error: str | None

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def probe(self) -> None:
        """A small write, to learn whether the store works again after a failure."""

    async def save_messages(
        self, chat_id: str, messages: Sequence[UIMessage], replace_history: bool = False
    ) -> None:
        """Upserts messages by id (new ones appended); with replace_history, drops all others."""

    async def list_messages(self, chat_id: str, subject: str | None = None) -> list[UIMessage]:
        """The chat's messages in order; with `subject`, none unless the chat is bound to it
        (one read: a chat another subject creates meanwhile shows nothing)."""

    async def get_active(self, chat_id: str, subject: str | None = None) -> str | None:
        """The chat's active stream; with `subject`, None unless the chat is bound to it."""

    async def find_request(self, chat_id: str, request_id: str) -> str | None:
        """The stream an earlier Start with this idempotency key created, if still retained."""

    async def begin_stream(
        self,
        record: StreamRecord,
        request_id: str,
        replaces: str | None,
        messages: Sequence[UIMessage] = (),
        replace_history: bool = False,
        subject: str = "",
        stopped_only: bool = False,
    ) -> Begun:
        """Compare-and-set: if the chat's active stream is still `replaces` (None: no active
        stream), saves `messages` (as `save_messages`), records the live stream and makes it
        the chat's active stream, in one transaction, and returns LIVE; otherwise writes nothing
        and returns LOST (a Start that lost the race leaves the winner's history alone).
        A chat that does not exist yet is bound to `subject`; one bound to another subject
        raises NotFound and nothing is written.

        In the same transaction, a tombstone of `subject` on the chat that has not expired at
        `record.created_at` and names this Start (by `request_id`, or by `record.message_id`,
        its last message's id) is consumed: then the stream is recorded already ended (STOPPED,
        final offset 0, reason STOPPED_BEFORE_START, no message, ended at `created_at`),
        `messages` are saved without `replace_history` (a late Start must not rewrite a history
        that newer turns have grown), the chat is left without an active stream, and the result
        is STOPPED_BEFORE_START. With `stopped_only` (the caller checks for such a Stop before
        superseding the live answer `replaces`), the active stream is left as it is, and a
        Start no tombstone names writes nothing and gets LOST."""

    async def stop_before_start(
        self, chat_id: str, subject: str, request_id: str, message_id: str, expires_at: float
    ) -> StartSeen:
        """For a Stop naming a Start by `request_id` (else by `message_id`), in one transaction
        ordered with `begin_stream`'s for the same chat (on any instance): whether that Start
        has reached the store (a stream with that request id is recorded; the message is
        persisted in the chat), with its stream (the chat's active one if it is that Start's,
        else the latest), and if not, records a tombstone of `subject` for it that expires at
        `expires_at` (a repeated Stop extends it). A chat bound to another subject reads as one
        that does not exist: the answer is `arrived=False` and nothing is written."""

    async def delete_stop_tombstones(self, before: float) -> int:
        """Frees the tombstones that expired before `before`; returns how many."""

    async def chat_subject(self, chat_id: str) -> str | None:
        """The subject the chat is bound to (None: no such chat). A binding never changes."""

    async def end_stream(
        self, stream_id: str, chat_id: str, end: StreamEnd, ended_at: float
    ) -> StreamEnd:
        """If the stream is still live, in one transaction: records the end, upserts the end's
        message and clears the chat's active stream if it is this one (compare-and-clear).
        Returns the end that holds: `end`, or the one recorded earlier (first end wins)."""

    async def clear_active(self, chat_id: str, stream_id: str) -> bool:
        """Compare-and-clear: clears the chat's active stream only if it is `stream_id`."""

    async def get_stream(self, stream_id: str) -> StreamRecord | None: ...

    async def orphaned_streams(self, now: float) -> list[StreamRecord]:
        """Live streams whose owner holds no lease at `now`: the ones to end as interrupted."""

    async def renew_lease(self, owner: str, expires_at: float) -> None:
        """Creates or extends the lease of instance `owner`."""

    async def lease_expires_at(self, owner: str) -> float | None:
        """When the lease of `owner` lapses (None: it holds none)."""

    async def drop_lease(self, owner: str) -> None:
        """Gives the lease up (a clean shutdown, its streams all ended)."""

    async def delete_expired(self, now: float, retention_s: float) -> list[str]:
        """Frees the records of streams whose retention has passed at `now` (ended before
        `now - r`, where r is the record's own `retention_s`, else `retention_s`); returns their
        ids."""
