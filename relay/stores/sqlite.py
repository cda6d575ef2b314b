"""The embedded store: one SQLite file through aiosqlite, in WAL mode, both ports at once.

As the `ChatStore` it keeps chats, messages, stream records and leases; as the `StreamLog` it is
the journal of the replay buffer, which lives in the relay's memory: chunks are appended in runs
(one row per flush), and a stream's seal is its record's end. One relay per file (a lock), so the
log never needs to reach another instance: `follow` and the cancel signal have nobody to serve.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from relay.domain.errors import NotFound, Unavailable, chat_not_found
from relay.domain.model import (
    EndReason,
    StreamEnd,
    StreamState,
    UIMessage,
    dump_json,
    load_json,
)
from relay.domain.ports import (
    Begun,
    CancelRequest,
    ChunkRun,
    LoggedStream,
    StartSeen,
    StreamRecord,
)
from relay.stores.uncut import Uncut

T = TypeVar("T")
Work = Callable[[aiosqlite.Connection], Awaitable[T]]

log = logging.getLogger("relay.store")

SCHEMA_VERSION = 6

# Each entry migrates from version i to i + 1.
_MIGRATIONS: list[str] = [
    """
    CREATE TABLE chats (
        id TEXT PRIMARY KEY,
        active_stream_id TEXT
    );
    CREATE TABLE messages (
        chat_id TEXT NOT NULL,
        position INTEGER NOT NULL,
        id TEXT NOT NULL,
        role TEXT NOT NULL,
        parts TEXT NOT NULL,
        metadata TEXT,
        PRIMARY KEY (chat_id, id)
    );
    CREATE INDEX messages_in_order ON messages (chat_id, position);
    CREATE TABLE streams (
        id TEXT PRIMARY KEY,
        chat_id TEXT NOT NULL,
        request_id TEXT,
        producer TEXT NOT NULL,
        state TEXT NOT NULL,
        final_offset INTEGER,
        error_message TEXT NOT NULL DEFAULT '',
        end_message TEXT,
        created_at REAL NOT NULL,
        ended_at REAL
    );
    CREATE UNIQUE INDEX streams_by_request ON streams (chat_id, request_id)
        WHERE request_id IS NOT NULL;
    CREATE INDEX streams_by_state ON streams (state);
    CREATE INDEX streams_by_end ON streams (ended_at);
    CREATE TABLE chunks (
        stream_id TEXT NOT NULL,
        offset INTEGER NOT NULL,
        data TEXT NOT NULL,
        PRIMARY KEY (stream_id, offset)
    ) WITHOUT ROWID;
    """,
    # The journal keeps one row per run of chunks (what one flush wrote), not one per chunk: the
    # row count, not the bytes, is what costs the journal's writes.
    """
    CREATE TABLE chunk_runs (
        stream_id TEXT NOT NULL,
        first_offset INTEGER NOT NULL,
        count INTEGER NOT NULL,
        data TEXT NOT NULL,
        PRIMARY KEY (stream_id, first_offset)
    ) WITHOUT ROWID;
    INSERT INTO chunk_runs SELECT stream_id, offset, 1, data FROM chunks;
    DROP TABLE chunks;
    """,
    # Streams belong to the relay instance that runs their producer, which holds a lease.
    """
    ALTER TABLE streams ADD COLUMN owner TEXT NOT NULL DEFAULT '';
    CREATE TABLE leases (
        owner TEXT PRIMARY KEY,
        expires_at REAL NOT NULL
    );
    """,
    # A chat belongs to the subject whose Start created it; chats from before belong to the
    # anonymous subject "" (what every caller was then).
    """
    ALTER TABLE chats ADD COLUMN subject TEXT NOT NULL DEFAULT '';
    """,
    # Why a stream ended (EndReason's value); streams ended before read as unspecified ('').
    # The id of the last message of a stream's Start, and the tombstones of Stops that came
    # before the Start they name (by its request id or that message id).
    """
    ALTER TABLE streams ADD COLUMN end_reason TEXT NOT NULL DEFAULT '';
    ALTER TABLE streams ADD COLUMN message_id TEXT;
    CREATE INDEX streams_by_message ON streams (chat_id, message_id)
        WHERE message_id IS NOT NULL;
    CREATE TABLE stop_tombstones (
        chat_id TEXT NOT NULL,
        subject TEXT NOT NULL,
        kind TEXT NOT NULL,
        key TEXT NOT NULL,
        expires_at REAL NOT NULL,
        PRIMARY KEY (chat_id, subject, kind, key)
    );
    CREATE INDEX stop_tombstones_by_expiry ON stop_tombstones (expires_at);
    """,
    # A stream's own retention, as its Start asked (NULL: the relay's --retention-s).
    """
    ALTER TABLE streams ADD COLUMN retention_s REAL;
    CREATE INDEX streams_by_own_retention ON streams (ended_at) WHERE retention_s IS NOT NULL;
    """,
]

# Chunks of a run are joined by a newline: compact JSON never holds a raw one.
_RUN_SEPARATOR = "\n"


class SqliteStore:
    """Every operation is one transaction, run as a task of its own: a caller cancelled mid-way
    (a client deadline) stops waiting, but the transaction still commits or rolls back whole, so
    the connection is never left inside a transaction. SQLite and OS failures (disk full, a
    read-only file, a corrupt database) reach the caller as `Unavailable` with a plain message;
    the details go to the log, and `error` says why the store is failing until an operation
    succeeds again."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.error: str | None = None
        self._db: aiosqlite.Connection | None = None
        # aiosqlite runs statements one at a time, but coroutines could interleave statements of
        # two transactions between awaits: the lock keeps each transaction whole.
        self._lock = asyncio.Lock()
        self._uncut = Uncut()
        self._lock_file: int | None = None

    async def open(self) -> None:
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                self._lock_file = _lock_exclusively(self.path + ".lock")
                # A file that cannot be opened fails here: when aiosqlite's own connect fails,
                # its worker thread may still answer after the event loop closed (a stray
                # traceback).
                await asyncio.to_thread(_try_to_open, self.path)
            self._db = await aiosqlite.connect(self.path, isolation_level=None)
            await self._db.execute("PRAGMA journal_mode=WAL")
            await self._db.execute("PRAGMA synchronous=NORMAL")
            await self._migrate()
            # This relay holds the file's lock, so whoever held a lease here is gone: their
            # live streams are orphans now, not in `lease_s`.
            await self._run("void_leases", lambda db: db.execute("DELETE FROM leases"))
        except BaseException:
            await self.close()  # aiosqlite's thread would otherwise keep the process alive
            raise

    async def close(self) -> None:
        await self._uncut.drain()  # operations whose callers gave up: let them finish first
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()
        if self._lock_file is not None:
            os.close(self._lock_file)  # releases the lock
            self._lock_file = None

    async def probe(self) -> None:
        """A small write: fails (Unavailable) while the store cannot write."""
        await self._run(
            "probe", lambda db: db.execute("UPDATE schema_version SET version = version")
        )

    async def _migrate(self) -> None:
        async def migrate(db: aiosqlite.Connection) -> None:
            await db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = await _one(db, "SELECT version FROM schema_version")
            version = 0 if row is None else int(row[0])
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path} has schema version {version}; this relay knows up to "
                    f"{SCHEMA_VERSION}: upgrade the relay"
                )
            for script in _MIGRATIONS[version:]:
                for statement in filter(str.strip, script.split(";")):
                    await db.execute(statement)
            await db.execute("DELETE FROM schema_version")
            await db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))

        await self._run("migrate", migrate)

    async def _run(self, operation: str, work: Work[T]) -> T:
        """Runs `work` as one transaction in a task the caller's cancellation cannot cut."""
        if self._db is None:
            raise Unavailable("the relay's store is closed")
        return await self._uncut.run(self._transaction(operation, work))

    async def _transaction(self, operation: str, work: Work[T]) -> T:
        async with self._lock:
            db = self._db
            if db is None:
                raise Unavailable("the relay's store is closed")
            try:
                try:
                    await db.execute("BEGIN IMMEDIATE")
                    result = await work(db)
                    await db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        await db.execute("ROLLBACK")
                    raise
            except (sqlite3.Error, OSError) as exc:
                self.error = f"{operation}: {exc}"
                log.error(
                    "store operation failed",
                    extra={"operation": operation, "error": str(exc), "db": self.path},
                )
                raise Unavailable("the relay's store failed; retry later") from exc
        self.error = None
        return result

    async def save_messages(
        self, chat_id: str, messages: Sequence[UIMessage], replace_history: bool = False
    ) -> None:
        async def save(db: aiosqlite.Connection) -> None:
            await _ensure_chat(db, chat_id)
            if replace_history:
                await db.execute("DELETE FROM messages WHERE chat_id = ?", (chat_id,))
            for message in messages:
                await _upsert_message(db, chat_id, message)

        await self._run("save_messages", save)

    async def list_messages(self, chat_id: str, subject: str | None = None) -> list[UIMessage]:
        query = "SELECT id, role, parts, metadata FROM messages WHERE chat_id = ?"
        params: tuple[str, ...] = (chat_id,)
        if subject is not None:
            query += " AND EXISTS (SELECT 1 FROM chats WHERE id = ? AND subject = ?)"
            params += (chat_id, subject)
        rows = await self._run(
            "list_messages",
            lambda db: db.execute_fetchall(query + " ORDER BY position", params),
        )
        return [
            UIMessage(
                id=r[0],
                role=r[1],
                parts=load_json(r[2]),
                metadata=None if r[3] is None else load_json(r[3]),
            )
            for r in rows
        ]

    async def get_active(self, chat_id: str, subject: str | None = None) -> str | None:
        row = await self._run(
            "get_active",
            lambda db: _one(
                db, "SELECT active_stream_id, subject FROM chats WHERE id = ?", chat_id
            ),
        )
        if row is None or (subject is not None and row[1] != subject):
            return None
        return None if row[0] is None else str(row[0])

    async def chat_subject(self, chat_id: str) -> str | None:
        row = await self._run(
            "chat_subject",
            lambda db: _one(db, "SELECT subject FROM chats WHERE id = ?", chat_id),
        )
        return None if row is None else str(row[0])

    async def find_request(self, chat_id: str, request_id: str) -> str | None:
        row = await self._run(
            "find_request",
            lambda db: _one(
                db,
                "SELECT id FROM streams WHERE chat_id = ? AND request_id = ?",
                chat_id,
                request_id,
            ),
        )
        return None if row is None else str(row[0])

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
        async def begin(db: aiosqlite.Connection) -> Begun:
            await _ensure_chat(db, record.chat_id, subject)
            row = await _one(
                db, "SELECT active_stream_id, subject FROM chats WHERE id = ?", record.chat_id
            )
            if row[1] != subject:
                raise chat_not_found(record.chat_id)
            if row[0] != replaces:
                return Begun.LOST
            stopped = False
            if request_id or record.message_id:
                cursor = await db.execute(
                    "DELETE FROM stop_tombstones WHERE chat_id = ? AND subject = ?"
                    " AND expires_at >= ? AND ((kind = 'request' AND key = ?)"
                    " OR (kind = 'message' AND key = ?))",
                    (
                        record.chat_id,
                        subject,
                        record.created_at,
                        request_id or None,
                        record.message_id or None,
                    ),
                )
                stopped = cursor.rowcount > 0
            if stopped_only and not stopped:
                return Begun.LOST
            if replace_history and not stopped:
                await db.execute("DELETE FROM messages WHERE chat_id = ?", (record.chat_id,))
            for message in messages:
                await _upsert_message(db, record.chat_id, message)
            await db.execute(
                "INSERT INTO streams (id, chat_id, request_id, message_id, producer, owner, state,"
                " final_offset, end_reason, created_at, ended_at, retention_s)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.stream_id,
                    record.chat_id,
                    request_id or None,
                    record.message_id or None,
                    record.producer,
                    record.owner,
                    (StreamState.STOPPED if stopped else StreamState.LIVE).value,
                    0 if stopped else None,
                    EndReason.STOPPED_BEFORE_START.value if stopped else "",
                    record.created_at,
                    record.created_at if stopped else None,
                    record.retention_s,
                ),
            )
            if not (stopped and stopped_only):  # a live answer stays the active one
                await db.execute(
                    "UPDATE chats SET active_stream_id = ? WHERE id = ?",
                    (None if stopped else record.stream_id, record.chat_id),
                )
            return Begun.STOPPED_BEFORE_START if stopped else Begun.LIVE

        return await self._run("begin_stream", begin)

    async def stop_before_start(
        self, chat_id: str, subject: str, request_id: str, message_id: str, expires_at: float
    ) -> StartSeen:
        async def record(db: aiosqlite.Connection) -> StartSeen:
            row = await _one(db, "SELECT subject FROM chats WHERE id = ?", chat_id)
            if row is not None and row[0] != subject:
                return StartSeen(False)  # as for a chat that does not exist: nothing written
            if request_id:
                kind, key = "request", request_id
                found = await _one(
                    db,
                    "SELECT id FROM streams WHERE chat_id = ? AND request_id = ?",
                    chat_id,
                    request_id,
                )
                if found is not None:
                    return StartSeen(True, str(found[0]))
            else:
                kind, key = "message", message_id
                persisted = await _one(
                    db, "SELECT 1 FROM messages WHERE chat_id = ? AND id = ?", chat_id, message_id
                )
                if persisted is not None:
                    found = await _one(
                        db,
                        "SELECT streams.id FROM streams JOIN chats ON chats.id = streams.chat_id"
                        " WHERE streams.chat_id = ? AND streams.message_id = ?"
                        " ORDER BY streams.id IS chats.active_stream_id DESC,"
                        " streams.created_at DESC LIMIT 1",
                        chat_id,
                        message_id,
                    )
                    return StartSeen(True, None if found is None else str(found[0]))
            await db.execute(
                "INSERT INTO stop_tombstones VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (chat_id, subject, kind, key)"
                " DO UPDATE SET expires_at = MAX(expires_at, excluded.expires_at)",
                (chat_id, subject, kind, key, expires_at),
            )
            return StartSeen(False)

        return await self._run("stop_before_start", record)

    async def delete_stop_tombstones(self, before: float) -> int:
        async def delete(db: aiosqlite.Connection) -> int:
            cursor = await db.execute("DELETE FROM stop_tombstones WHERE expires_at < ?", (before,))
            return max(cursor.rowcount, 0)

        return await self._run("delete_stop_tombstones", delete)

    async def end_stream(
        self, stream_id: str, chat_id: str, end: StreamEnd, ended_at: float
    ) -> StreamEnd:
        async def record_end(db: aiosqlite.Connection) -> StreamEnd:
            cursor = await db.execute(
                "UPDATE streams SET state = ?, final_offset = ?, error_message = ?,"
                " end_message = ?, end_reason = ?, ended_at = ? WHERE id = ? AND state = ?",
                (
                    end.state.value,
                    end.final_offset,
                    end.error_message,
                    None if end.message is None else dump_json(end.message.to_json()),
                    end.reason.value,
                    ended_at,
                    stream_id,
                    StreamState.LIVE.value,
                ),
            )
            if cursor.rowcount == 0:  # ended already (or unknown): the first end holds
                row = await _one(db, f"{_RECORD_COLUMNS} WHERE id = ?", stream_id)
                if row is None:
                    raise NotFound(f"stream {stream_id} not found")
                recorded = _record(row).end
                assert recorded is not None
                return recorded
            if end.message is not None:
                await _upsert_message(db, chat_id, end.message)
            await db.execute(
                "UPDATE chats SET active_stream_id = NULL WHERE id = ? AND active_stream_id = ?",
                (chat_id, stream_id),
            )
            return end

        return await self._run("end_stream", record_end)

    async def clear_active(self, chat_id: str, stream_id: str) -> bool:
        async def clear(db: aiosqlite.Connection) -> bool:
            cursor = await db.execute(
                "UPDATE chats SET active_stream_id = NULL WHERE id = ? AND active_stream_id = ?",
                (chat_id, stream_id),
            )
            return cursor.rowcount > 0

        return await self._run("clear_active", clear)

    async def get_stream(self, stream_id: str) -> StreamRecord | None:
        row = await self._run(
            "get_stream", lambda db: _one(db, f"{_RECORD_COLUMNS} WHERE id = ?", stream_id)
        )
        return None if row is None else _record(row)

    async def orphaned_streams(self, now: float) -> list[StreamRecord]:
        rows = await self._run(
            "orphaned_streams",
            lambda db: db.execute_fetchall(
                f"{_RECORD_COLUMNS} WHERE state = ? AND NOT EXISTS (SELECT 1 FROM leases"
                " WHERE leases.owner = streams.owner AND leases.expires_at >= ?)",
                (StreamState.LIVE.value, now),
            ),
        )
        return [_record(row) for row in rows]

    async def renew_lease(self, owner: str, expires_at: float) -> None:
        await self._run(
            "renew_lease",
            lambda db: db.execute(
                "INSERT INTO leases VALUES (?, ?)"
                " ON CONFLICT (owner) DO UPDATE SET expires_at = excluded.expires_at",
                (owner, expires_at),
            ),
        )

    async def lease_expires_at(self, owner: str) -> float | None:
        row = await self._run(
            "lease_expires_at",
            lambda db: _one(db, "SELECT expires_at FROM leases WHERE owner = ?", owner),
        )
        return None if row is None else float(row[0])

    async def drop_lease(self, owner: str) -> None:
        await self._run(
            "drop_lease", lambda db: db.execute("DELETE FROM leases WHERE owner = ?", (owner,))
        )

    async def delete_expired(self, now: float, retention_s: float) -> list[str]:
        async def delete(db: aiosqlite.Connection) -> list[str]:
            rows = await db.execute_fetchall(
                "SELECT id FROM streams WHERE retention_s IS NULL AND ended_at < ?"
                " UNION ALL SELECT id FROM streams"
                " WHERE retention_s IS NOT NULL AND ended_at < ? - retention_s",
                (now - retention_s, now),
            )
            ids = [str(r[0]) for r in rows]
            for stream_id in ids:
                await db.execute("DELETE FROM chunk_runs WHERE stream_id = ?", (stream_id,))
                await db.execute("DELETE FROM streams WHERE id = ?", (stream_id,))
            return ids

        return await self._run("delete_expired", delete)

    # -- the StreamLog port --------------------------------------------------------------------

    async def create(self, stream_id: str, chat_id: str, owner: str) -> None:
        """Nothing to write: the stream's record is its log's header."""

    async def append(self, runs: Sequence[ChunkRun]) -> set[str]:
        async def journal(db: aiosqlite.Connection) -> set[str]:
            ids = sorted({run.stream_id for run in runs})
            marks = ",".join("?" * len(ids))
            rows = await db.execute_fetchall(
                f"SELECT id FROM streams WHERE id IN ({marks}) AND state != ?",
                (*ids, StreamState.LIVE.value),
            )
            sealed = {str(row[0]) for row in rows}
            await _journal(db, [run for run in runs if run.stream_id not in sealed])
            return sealed

        return await self._run("journal", journal) if runs else set()

    async def seal(self, stream_id: str, end: StreamEnd, retention_s: float) -> StreamEnd:
        """The record's end is the seal (`end_stream` wrote it): returns that one."""
        record = await self.get_stream(stream_id)
        return end if record is None or record.end is None else record.end

    async def load(self, stream_id: str) -> LoggedStream | None:
        async def load(db: aiosqlite.Connection) -> LoggedStream | None:
            row = await _one(db, f"{_RECORD_COLUMNS} WHERE id = ?", stream_id)
            if row is None:
                return None
            record = _record(row)
            chunks = await _journaled_chunks(db, stream_id)
            if record.end is not None:
                del chunks[record.end.final_offset :]
            return LoggedStream(stream_id, record.chat_id, chunks, record.end)

        return await self._run("load_stream", load)

    async def follow(
        self, stream_id: str, from_offset: int
    ) -> AsyncIterator[list[str] | StreamEnd]:
        # Every live stream of an embedded relay is in its memory: nothing follows this log.
        raise Unavailable(f"stream {stream_id} is not served by this relay")
        yield []  # pragma: no cover (makes this an async generator)

    async def signal_cancel(self, owner: str, stream_id: str, request: CancelRequest) -> None:
        """Nobody to signal: the file's one relay owns every live stream (see class doc)."""

    async def cancels(self, owner: str) -> AsyncIterator[tuple[str, CancelRequest]]:
        await asyncio.Event().wait()  # no other relay can send one
        yield ("", CancelRequest(StreamState.STOPPED))  # pragma: no cover

    async def delete(self, stream_ids: Sequence[str]) -> None:
        async def delete(db: aiosqlite.Connection) -> None:
            await db.executemany(
                "DELETE FROM chunk_runs WHERE stream_id = ?", [(i,) for i in stream_ids]
            )

        await self._run("delete_logs", delete)


_RECORD_COLUMNS = (
    "SELECT id, chat_id, owner, producer, created_at, state, final_offset, error_message,"
    " end_message, ended_at, end_reason, message_id, retention_s FROM streams"
)


class StoreInUse(RuntimeError):
    """Another relay holds the database: one relay per SQLite file."""


def _lock_exclusively(path: str) -> int:
    """Takes the lock that makes a relay the only one on its database, or raises StoreInUse
    naming the holder. The kernel releases it when the process dies, however it dies, so a
    crashed relay never blocks its successor. (A second relay on the same file would recover
    the first one's live streams as interrupted and split its clients.)"""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(descriptor)
        raise StoreInUse(
            f"another relay (pid {holder}) is using it; run one relay per SQLite file "
            "(several relays need the cluster stores)"
        ) from None
    except BaseException:
        os.close(descriptor)
        raise
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, str(os.getpid()).encode(), 0)
    return descriptor


def _try_to_open(path: str) -> None:
    sqlite3.connect(path).close()


async def _one(db: aiosqlite.Connection, sql: str, *args: Any) -> Any:
    async with db.execute(sql, args) as cursor:
        return await cursor.fetchone()


async def _ensure_chat(db: aiosqlite.Connection, chat_id: str, subject: str = "") -> None:
    await db.execute("INSERT OR IGNORE INTO chats (id, subject) VALUES (?, ?)", (chat_id, subject))


async def _upsert_message(db: aiosqlite.Connection, chat_id: str, message: UIMessage) -> None:
    await db.execute(
        "INSERT INTO messages (chat_id, position, id, role, parts, metadata) VALUES"
        " (?, (SELECT COALESCE(MAX(position), -1) + 1 FROM messages WHERE chat_id = ?), ?, ?, ?, ?)"
        " ON CONFLICT (chat_id, id) DO UPDATE SET"
        " role = excluded.role, parts = excluded.parts, metadata = excluded.metadata",
        (
            chat_id,
            chat_id,
            message.id,
            message.role,
            dump_json(message.parts),
            None if message.metadata is None else dump_json(message.metadata),
        ),
    )


async def _journal(db: aiosqlite.Connection, runs: Sequence[ChunkRun]) -> None:
    rows = [
        (run.stream_id, run.first_offset, len(run.chunks), _RUN_SEPARATOR.join(run.chunks))
        for run in runs
        if run.chunks
    ]
    if rows:
        # Runs may be written again, and a later one may start where an earlier one did and
        # reach further (a stream's end journals its tail from the last acknowledged chunk while
        # a flush of the same chunks is in flight): the longer run is kept.
        await db.executemany(
            "INSERT INTO chunk_runs VALUES (?, ?, ?, ?)"
            " ON CONFLICT (stream_id, first_offset) DO UPDATE"
            " SET count = excluded.count, data = excluded.data"
            " WHERE excluded.count > chunk_runs.count",
            rows,
        )


def _record(row: Any) -> StreamRecord:
    stream_id, chat_id, owner, producer, created_at, state, final_offset = row[:7]
    error_message, end_message, ended_at, reason, message_id, retention_s = row[7:]
    end = None
    if state != StreamState.LIVE.value:
        message = None
        if end_message is not None:
            fields = load_json(end_message)
            message = UIMessage(
                fields["id"], fields["role"], fields["parts"], fields.get("metadata")
            )
        end = StreamEnd(
            StreamState(state),
            int(final_offset),
            error_message,
            message,
            EndReason.stored(reason),
        )
    return StreamRecord(
        stream_id,
        chat_id,
        owner,
        producer,
        created_at,
        end,
        ended_at,
        retention_s=retention_s,
        message_id=message_id or "",
    )


async def _journaled_chunks(db: aiosqlite.Connection, stream_id: str) -> list[str]:
    run_rows = await db.execute_fetchall(
        "SELECT first_offset, count, data FROM chunk_runs"
        " WHERE stream_id = ? ORDER BY first_offset",
        (stream_id,),
    )
    chunks: list[str] = []
    for first_offset, count, data in run_rows:
        if first_offset > len(chunks):  # a run that was never written: keep what is contiguous
            log.warning(
                "the journal of a stream has a gap",
                extra={"stream_id": stream_id, "offset": len(chunks)},
            )
            break
        run = str(data).split(_RUN_SEPARATOR)
        assert len(run) == count, f"stream {stream_id}: a run at {first_offset} is not {count} long"
        chunks.extend(run[len(chunks) - first_offset :])  # runs may overlap after a retried write
    return chunks
