"""The store: chats, messages, the active stream reference, stream states and the chunk journal.

One small interface; `relay.sqlite_store.SqliteStore` is the embedded implementation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from relay.model import StreamEnd, UIMessage


@dataclass(frozen=True, slots=True)
class ChunkRun:
    """Chunks of one stream to journal, starting at `first_offset`."""

    stream_id: str
    first_offset: int
    chunks: Sequence[str]


@dataclass(frozen=True, slots=True)
class StoredStream:
    stream_id: str
    chat_id: str
    chunks: list[str]
    end: StreamEnd | None  # None while the stream was live
    ended_at: float | None


class Store(Protocol):
    """Every operation is all or nothing, also when its caller is cancelled mid-way: it then runs
    to its end without a waiter. A store that cannot do its work raises `relay.errors.Unavailable`
    with a message fit for clients, and `error` says why until an operation succeeds again."""

    error: str | None

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def probe(self) -> None:
        """A small write, to learn whether the store works again after a failure."""

    async def save_messages(
        self, chat_id: str, messages: Sequence[UIMessage], replace_history: bool = False
    ) -> None:
        """Upserts messages by id (new ones appended); with replace_history, drops all others."""

    async def list_messages(self, chat_id: str) -> list[UIMessage]: ...

    async def get_active(self, chat_id: str) -> str | None: ...

    async def find_request(self, chat_id: str, request_id: str) -> str | None:
        """The stream an earlier Start with this idempotency key created, if still retained."""

    async def begin_stream(
        self, stream_id: str, chat_id: str, producer: str, request_id: str, created_at: float
    ) -> None:
        """Records a live stream and makes it the chat's active stream, in one transaction."""

    async def journal(self, runs: Sequence[ChunkRun]) -> None: ...

    async def end_stream(
        self, stream_id: str, chat_id: str, end: StreamEnd, tail: ChunkRun, ended_at: float
    ) -> None:
        """In one transaction: journals the tail, records the end, persists the end's message and
        clears the chat's active stream if it still points to this stream (compare-and-clear)."""

    async def clear_active(self, chat_id: str, stream_id: str) -> bool:
        """Compare-and-clear: clears the chat's active stream only if it is `stream_id`."""

    async def load_stream(self, stream_id: str) -> StoredStream | None: ...

    async def live_streams(self) -> list[StoredStream]:
        """Streams recorded as live: after a crash, the ones to mark interrupted."""

    async def delete_ended_before(self, before: float) -> list[str]:
        """Frees streams (and their chunks) that ended before `before`; returns their ids."""
