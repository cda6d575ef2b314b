"""The embedded store's journal: runs of chunks, schema migration, and retried writes."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from relay.domain.core import Relay
from relay.domain.model import EndReason, StartRequest, StreamEnd, StreamState, dump_json
from relay.domain.ports import ChunkRun, StreamRecord
from relay.producers import ProducerRegistry
from relay.stores.sqlite import _MIGRATIONS, SCHEMA_VERSION, SqliteStore
from tests.conftest import ScriptedProducer, text_chunks, user

STREAM = "0" * 32


async def test_a_version_1_database_keeps_its_chunks_after_the_migration(tmp_path: Path) -> None:
    db = tmp_path / "v1.sqlite3"
    with sqlite3.connect(db) as connection:
        connection.executescript(_MIGRATIONS[0])
        connection.executescript(
            "CREATE TABLE schema_version (version INTEGER NOT NULL);"
            "INSERT INTO schema_version VALUES (1);"
            "INSERT INTO chats VALUES ('chat-1', NULL);"
            "INSERT INTO streams"
            " (id, chat_id, producer, state, final_offset, created_at, ended_at)"
            f" VALUES ('{STREAM}', 'chat-1', 'echo', 'completed', 3, 1.0, 2.0);"
        )
        # Out of order on purpose: offsets, not insertion, order the chunks.
        for offset in (2, 0, 1):
            connection.execute(
                "INSERT INTO chunks VALUES (?, ?, ?)", (STREAM, offset, f'{{"n":{offset}}}')
            )
    connection.close()

    store = SqliteStore(db)
    await store.open()
    try:
        stored = await store.load(STREAM)
    finally:
        await store.close()
    assert stored is not None and stored.end is not None
    assert stored.chunks == ['{"n":0}', '{"n":1}', '{"n":2}']
    assert stored.end.final_offset == 3
    with sqlite3.connect(db) as connection:
        tables = {r[0] for r in connection.execute("SELECT name FROM sqlite_master")}
        version = connection.execute("SELECT version FROM schema_version").fetchone()[0]
        subjects = connection.execute("SELECT id, subject FROM chats").fetchall()
    connection.close()
    assert "chunks" not in tables and "chunk_runs" in tables
    assert version == SCHEMA_VERSION
    assert subjects == [("chat-1", "")]  # chats from before subjects belong to the anonymous one


async def test_streams_ended_before_reasons_were_recorded_read_as_unspecified(
    tmp_path: Path,
) -> None:
    """A version 4 database (before end reasons) with an ended stream, migrated on open."""
    db = tmp_path / "v4.sqlite3"
    with sqlite3.connect(db) as connection:
        for script in _MIGRATIONS[:4]:
            connection.executescript(script)
        connection.executescript(
            "CREATE TABLE schema_version (version INTEGER NOT NULL);"
            "INSERT INTO schema_version VALUES (4);"
            "INSERT INTO chats (id) VALUES ('chat-1');"
            "INSERT INTO streams"
            " (id, chat_id, producer, state, final_offset, created_at, ended_at)"
            f" VALUES ('{STREAM}', 'chat-1', 'echo', 'stopped', 2, 1.0, 2.0);"
        )
    connection.close()
    store = SqliteStore(db)
    await store.open()
    try:
        stored = await store.get_stream(STREAM)
        loaded = await store.load(STREAM)
    finally:
        await store.close()
    expected = StreamEnd(StreamState.STOPPED, 2, "", None, EndReason.UNSPECIFIED)
    assert stored is not None and stored.end == expected
    assert loaded is not None and loaded.end == expected


async def test_overlapping_runs_read_once_and_a_gap_ends_the_replay(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db")
    await store.open()
    try:
        await store.begin_stream(StreamRecord(STREAM, "chat-1", "relay-a", "echo", 1.0), "", None)
        chunks = [dump_json({"type": "text-delta", "id": "t", "delta": f"{i}\n"}) for i in range(9)]
        await store.append([ChunkRun(STREAM, 0, chunks[0:3])])
        await store.append([ChunkRun(STREAM, 1, chunks[1:5])])  # a retried write overlaps
        await store.append([ChunkRun(STREAM, 7, chunks[7:9])])  # 5 and 6 were never written
        stored = await store.load(STREAM)
    finally:
        await store.close()
    assert stored is not None
    assert stored.chunks == chunks[0:5]


async def test_a_longer_run_from_the_same_offset_replaces_the_shorter(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db")
    await store.open()
    try:
        await store.begin_stream(StreamRecord(STREAM, "chat-1", "relay-a", "echo", 1.0), "", None)
        chunks = [dump_json({"type": "text-delta", "id": "t", "delta": f"{i}"}) for i in range(5)]
        await store.append([ChunkRun(STREAM, 0, chunks[0:3])])  # a flush in flight
        await store.append([ChunkRun(STREAM, 0, chunks[0:5])])  # the end's tail, from 0 too
        await store.append([ChunkRun(STREAM, 0, chunks[0:2])])  # a stale retry changes nothing
        stored = await store.load(STREAM)
    finally:
        await store.close()
    assert stored is not None
    assert stored.chunks == chunks


class FlakyJournalStore(SqliteStore):
    """Fails the first journal write, as a full disk would; reports every attempt."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.failures_left = 1
        self.attempts: asyncio.Queue[bool] = asyncio.Queue()

    async def append(self, runs: Sequence[ChunkRun]) -> set[str]:
        if self.failures_left:
            self.failures_left -= 1
            self.attempts.put_nowait(False)
            raise OSError("disk full")
        fenced = await super().append(runs)
        self.attempts.put_nowait(True)
        return fenced


async def test_chunks_of_a_failed_journal_write_are_written_by_the_next_flush(
    tmp_path: Path,
) -> None:
    store = FlakyJournalStore(tmp_path / "db")
    scripted = ScriptedProducer()
    relay = Relay(
        store,
        ProducerRegistry({"scripted": scripted}, "scripted"),
        journal_interval=0,
        sweep_interval=None,
    )
    await relay.open()
    try:
        started = await relay.start(StartRequest("chat-1", [user("hi")]))
        script = scripted.script(started.stream_id)
        sent = text_chunks(3)
        script.put(*sent[:3])
        assert await asyncio.wait_for(store.attempts.get(), 10) is False
        script.put(*sent[3:])
        async with asyncio.timeout(10):
            while True:  # the stream stays live: only journal flushes can write its chunks
                await store.attempts.get()
                stored = await store.load(started.stream_id)
                assert stored is not None
                if len(stored.chunks) >= len(sent):
                    break
        assert stored.chunks == [dump_json(chunk) for chunk in sent]
        assert relay.streams[started.stream_id].end is None
        script.put(None)
        end = await relay.streams[started.stream_id].wait_ended()
    finally:
        await relay.close(grace=0)
    assert end == StreamEnd(StreamState.COMPLETED, len(sent), "", end.message, EndReason.FINISHED)
