"""The cluster's chat store: PostgreSQL through an asyncpg pool (the `ChatStore` port).

Several relays share one database. Each operation is one transaction; the chat's row is the lock
that orders what happens to a chat (its active stream, its messages' positions), so two relays
that begin a stream on the same chat at once cannot both win, and two that save messages to it
cannot give two messages the same position. Chunks are not stored here: the `StreamLog` holds
them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg

from relay.domain.errors import NotFound, Unavailable, chat_not_found
from relay.domain.model import (
    EndReason,
    StreamEnd,
    StreamState,
    UIMessage,
    dump_json,
    load_json,
)
from relay.domain.ports import Begun, StartSeen, StreamRecord
from relay.stores.uncut import Uncut
from relay.stores.urls import without_password

T = TypeVar("T")
# `Any`: asyncpg ships no type information; the argument is an asyncpg.Connection inside a
# transaction.
Work = Callable[[Any], Awaitable[T]]

log = logging.getLogger("relay.store")

SCHEMA_VERSION = 4

# Each entry migrates from version i to i + 1. Parts and metadata are stored as the JSON text
# the relay wrote (not jsonb, which reorders keys and refuses "\u0000").
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
        owner TEXT NOT NULL,
        state TEXT NOT NULL,
        final_offset BIGINT,
        error_message TEXT NOT NULL DEFAULT '',
        end_message TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        ended_at DOUBLE PRECISION
    );
    CREATE UNIQUE INDEX streams_by_request ON streams (chat_id, request_id)
        WHERE request_id IS NOT NULL;
    CREATE INDEX streams_by_state ON streams (state);
    CREATE INDEX streams_by_end ON streams (ended_at);
    CREATE TABLE leases (
        owner TEXT PRIMARY KEY,
        expires_at DOUBLE PRECISION NOT NULL
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
        expires_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (chat_id, subject, kind, key)
    );
    CREATE INDEX stop_tombstones_by_expiry ON stop_tombstones (expires_at);
    """,
    # A stream's own retention, as its Start asked (NULL: the relay's --retention-s).
    """
    ALTER TABLE streams ADD COLUMN retention_s DOUBLE PRECISION;
    CREATE INDEX streams_by_own_retention ON streams (ended_at) WHERE retention_s IS NOT NULL;
    """,
]

# The key of the advisory lock that lets one relay at a time migrate a database ("relay" + 1).
_MIGRATION_LOCK = 0x72656C617901
# The class of the per-chat advisory locks ("rela") that order a Stop's check for the Start it
# names with that Start's begin_stream, also for a chat that has no row yet. (Two-key advisory
# locks do not share a key space with the one-key migration lock.)
_START_OR_STOP_LOCK = 0x72656C61

_LIVE = StreamState.LIVE.value
_FAILED = "the relay's store failed; retry later"
# Errors that mean the database or the way to it failed (not a bug in the relay).
_DATABASE_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


class PostgresChatStore:
    """Every operation is one transaction, run as a task of its own: a caller cancelled mid-way
    (a client deadline) stops waiting, but the transaction still commits or rolls back whole.
    Database and network failures reach the caller as `Unavailable` with a plain message; the
    details go to the log, and `error` says why the store is failing until an operation succeeds
    again."""

    def __init__(
        self,
        dsn: str,
        *,
        command_timeout_s: float = 10.0,
        connect_timeout_s: float = 10.0,
        max_connections: int = 10,
    ) -> None:
        self.dsn = dsn
        self.error: str | None = None
        self._where = _describe(dsn)
        self._command_timeout_s = command_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._max_connections = max_connections
        self._pool: Any = None  # an asyncpg.Pool once open
        self._uncut = Uncut()

    async def open(self) -> None:
        """Connects and migrates the schema. Raises `Unavailable`, naming the server and the
        database (never the password), if the server cannot be reached or refuses the relay."""
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=1,
                max_size=self._max_connections,
                command_timeout=self._command_timeout_s,
                timeout=self._connect_timeout_s,
            )
        except (*_DATABASE_ERRORS, ValueError) as exc:
            reason = without_password(f"{type(exc).__name__}: {exc}", self.dsn)
            self.error = f"open: {reason}"
            log.error(
                "cannot connect to the chat store", extra={"db": self._where, "error": reason}
            )
            raise Unavailable(f"cannot connect to PostgreSQL at {self._where}: {reason}") from None
        try:
            await self._migrate()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        await self._uncut.drain()  # operations whose callers gave up: let them finish first
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), self._command_timeout_s)
            except _DATABASE_ERRORS as exc:  # a server gone or too slow: drop the connections
                log.warning("closing the chat store", extra={"db": self._where, "error": str(exc)})
                pool.terminate()
            except BaseException:
                pool.terminate()
                raise

    async def probe(self) -> None:
        """A small write: fails (Unavailable) while the store cannot write."""
        await self._run(
            "probe", lambda db: db.execute("UPDATE schema_version SET version = version")
        )

    async def _migrate(self) -> None:
        async def migrate(db: Any) -> None:
            # Relays that start together take turns: the second finds the schema up to date.
            await db.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            found = await db.fetchval("SELECT version FROM schema_version")
            version = 0 if found is None else int(found)
            if version > SCHEMA_VERSION:
                raise Unavailable(
                    f"the database at {self._where} has schema version {version}; this relay"
                    f" knows up to {SCHEMA_VERSION}: upgrade the relay"
                )
            if version == SCHEMA_VERSION:
                return
            for script in _MIGRATIONS[version:]:
                await db.execute(script)
            await db.execute("DELETE FROM schema_version")
            await db.execute("INSERT INTO schema_version VALUES ($1)", SCHEMA_VERSION)

        await self._run("migrate", migrate)

    async def _run(self, operation: str, work: Work[T]) -> T:
        """Runs `work` as one transaction in a task the caller's cancellation cannot cut."""
        if self._pool is None:
            raise Unavailable("the relay's store is closed")
        return await self._uncut.run(self._transaction(operation, work))

    async def _transaction(self, operation: str, work: Work[T]) -> T:
        pool = self._pool
        if pool is None:
            raise Unavailable("the relay's store is closed")
        try:
            async with pool.acquire(timeout=self._command_timeout_s) as db, db.transaction():
                result = await work(db)
        except _DATABASE_ERRORS as exc:
            self.error = f"{operation}: {type(exc).__name__}: {exc}"
            log.error(
                "store operation failed",
                extra={"operation": operation, "error": str(exc), "db": self._where},
            )
            raise Unavailable(_FAILED) from exc
        self.error = None
        return result

    async def save_messages(
        self, chat_id: str, messages: Sequence[UIMessage], replace_history: bool = False
    ) -> None:
        async def save(db: Any) -> None:
            await _lock_chat(db, chat_id)
            if replace_history:
                await db.execute("DELETE FROM messages WHERE chat_id = $1", chat_id)
            await _upsert_messages(db, chat_id, messages)

        await self._run("save_messages", save)

    async def list_messages(self, chat_id: str, subject: str | None = None) -> list[UIMessage]:
        query = "SELECT id, role, parts, metadata FROM messages WHERE chat_id = $1"
        params: tuple[str, ...] = (chat_id,)
        if subject is not None:
            query += " AND EXISTS (SELECT 1 FROM chats WHERE id = $1 AND subject = $2)"
            params += (subject,)
        rows = await self._run(
            "list_messages", lambda db: db.fetch(query + " ORDER BY position", *params)
        )
        return [
            UIMessage(
                id=r["id"],
                role=r["role"],
                parts=load_json(r["parts"]),
                metadata=None if r["metadata"] is None else load_json(r["metadata"]),
            )
            for r in rows
        ]

    async def chat_subject(self, chat_id: str) -> str | None:
        found: str | None = await self._run(
            "chat_subject",
            lambda db: db.fetchval("SELECT subject FROM chats WHERE id = $1", chat_id),
        )
        return found

    async def get_active(self, chat_id: str, subject: str | None = None) -> str | None:
        row = await self._run(
            "get_active",
            lambda db: db.fetchrow(
                "SELECT active_stream_id, subject FROM chats WHERE id = $1", chat_id
            ),
        )
        if row is None or (subject is not None and row["subject"] != subject):
            return None
        found: str | None = row["active_stream_id"]
        return found

    async def find_request(self, chat_id: str, request_id: str) -> str | None:
        found: str | None = await self._run(
            "find_request",
            lambda db: db.fetchval(
                "SELECT id FROM streams WHERE chat_id = $1 AND request_id = $2",
                chat_id,
                request_id,
            ),
        )
        return found

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
        async def begin(db: Any) -> Begun:
            await _lock_start_or_stop(db, record.chat_id)
            if replaces is None:
                # A new chat has no active stream: creating its row is the compare-and-set
                # succeeding, so a failed one writes nothing. It is bound to `subject`.
                await db.execute(
                    "INSERT INTO chats (id, subject) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    record.chat_id,
                    subject,
                )
            row = await db.fetchrow(
                "SELECT active_stream_id, subject FROM chats WHERE id = $1 FOR UPDATE",
                record.chat_id,
            )
            if row is not None and row["subject"] != subject:
                raise chat_not_found(record.chat_id)
            if row is None or row["active_stream_id"] != replaces:
                return Begun.LOST
            stopped = False
            if request_id or record.message_id:
                consumed = await db.fetch(
                    "DELETE FROM stop_tombstones WHERE chat_id = $1 AND subject = $2"
                    " AND expires_at >= $3 AND ((kind = 'request' AND key = $4)"
                    " OR (kind = 'message' AND key = $5)) RETURNING key",
                    record.chat_id,
                    subject,
                    record.created_at,
                    request_id or None,
                    record.message_id or None,
                )
                stopped = bool(consumed)
            if stopped_only and not stopped:
                return Begun.LOST
            if replace_history and not stopped:
                await db.execute("DELETE FROM messages WHERE chat_id = $1", record.chat_id)
            await _upsert_messages(db, record.chat_id, messages)
            await db.execute(
                "INSERT INTO streams (id, chat_id, request_id, message_id, producer, owner, state,"
                " final_offset, end_reason, created_at, ended_at, retention_s)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                record.stream_id,
                record.chat_id,
                request_id or None,
                record.message_id or None,
                record.producer,
                record.owner,
                StreamState.STOPPED.value if stopped else _LIVE,
                0 if stopped else None,
                EndReason.STOPPED_BEFORE_START.value if stopped else "",
                record.created_at,
                record.created_at if stopped else None,
                record.retention_s,
            )
            if not (stopped and stopped_only):  # a live answer stays the active one
                await db.execute(
                    "UPDATE chats SET active_stream_id = $1 WHERE id = $2",
                    None if stopped else record.stream_id,
                    record.chat_id,
                )
            return Begun.STOPPED_BEFORE_START if stopped else Begun.LIVE

        return await self._run("begin_stream", begin)

    async def stop_before_start(
        self, chat_id: str, subject: str, request_id: str, message_id: str, expires_at: float
    ) -> StartSeen:
        async def record(db: Any) -> StartSeen:
            # Ordered with the named Start's begin_stream, which takes the same lock: the Start
            # either committed before this reads, or it finds the tombstone.
            await _lock_start_or_stop(db, chat_id)
            owner = await db.fetchval("SELECT subject FROM chats WHERE id = $1", chat_id)
            if owner is not None and owner != subject:
                return StartSeen(False)  # as for a chat that does not exist: nothing written
            if request_id:
                kind, key = "request", request_id
                found = await db.fetchval(
                    "SELECT id FROM streams WHERE chat_id = $1 AND request_id = $2",
                    chat_id,
                    request_id,
                )
                if found is not None:
                    return StartSeen(True, str(found))
            else:
                kind, key = "message", message_id
                persisted = await db.fetchval(
                    "SELECT 1 FROM messages WHERE chat_id = $1 AND id = $2", chat_id, message_id
                )
                if persisted is not None:
                    found = await db.fetchval(
                        "SELECT streams.id FROM streams JOIN chats ON chats.id = streams.chat_id"
                        " WHERE streams.chat_id = $1 AND streams.message_id = $2"
                        " ORDER BY streams.id IS NOT DISTINCT FROM chats.active_stream_id DESC,"
                        " streams.created_at DESC LIMIT 1",
                        chat_id,
                        message_id,
                    )
                    return StartSeen(True, None if found is None else str(found))
            await db.execute(
                "INSERT INTO stop_tombstones (chat_id, subject, kind, key, expires_at)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (chat_id, subject, kind, key)"
                " DO UPDATE SET expires_at = GREATEST(stop_tombstones.expires_at,"
                " excluded.expires_at)",
                chat_id,
                subject,
                kind,
                key,
                expires_at,
            )
            return StartSeen(False)

        return await self._run("stop_before_start", record)

    async def delete_stop_tombstones(self, before: float) -> int:
        rows = await self._run(
            "delete_stop_tombstones",
            lambda db: db.fetch(
                "DELETE FROM stop_tombstones WHERE expires_at < $1 RETURNING key", before
            ),
        )
        return len(rows)

    async def end_stream(
        self, stream_id: str, chat_id: str, end: StreamEnd, ended_at: float
    ) -> StreamEnd:
        async def record_end(db: Any) -> StreamEnd:
            # The stream's row first, then the chat's: begin_stream locks the chat and inserts a
            # new stream row, so no transaction waits for these two the other way round.
            ended = await db.fetchval(
                "UPDATE streams SET state = $1, final_offset = $2, error_message = $3,"
                " end_message = $4, ended_at = $5, end_reason = $8"
                " WHERE id = $6 AND state = $7 RETURNING id",
                end.state.value,
                end.final_offset,
                _storable(end.error_message),
                None if end.message is None else dump_json(end.message.to_json()),
                ended_at,
                stream_id,
                _LIVE,
                end.reason.value,
            )
            if ended is None:  # ended already (or unknown): the first end holds
                row = await db.fetchrow(f"{_RECORD_COLUMNS} WHERE id = $1", stream_id)
                if row is None:
                    raise NotFound(f"stream {stream_id} not found")
                recorded = _record(row).end
                assert recorded is not None
                return recorded
            if end.message is not None:
                await _lock_chat(db, chat_id)
                await _upsert_messages(db, chat_id, [end.message])
            await db.execute(
                "UPDATE chats SET active_stream_id = NULL WHERE id = $1 AND active_stream_id = $2",
                chat_id,
                stream_id,
            )
            return end

        return await self._run("end_stream", record_end)

    async def clear_active(self, chat_id: str, stream_id: str) -> bool:
        async def clear(db: Any) -> bool:
            cleared = await db.fetchval(
                "UPDATE chats SET active_stream_id = NULL"
                " WHERE id = $1 AND active_stream_id = $2 RETURNING id",
                chat_id,
                stream_id,
            )
            return cleared is not None

        return await self._run("clear_active", clear)

    async def get_stream(self, stream_id: str) -> StreamRecord | None:
        row = await self._run(
            "get_stream", lambda db: db.fetchrow(f"{_RECORD_COLUMNS} WHERE id = $1", stream_id)
        )
        return None if row is None else _record(row)

    async def orphaned_streams(self, now: float) -> list[StreamRecord]:
        rows = await self._run(
            "orphaned_streams",
            lambda db: db.fetch(
                f"{_RECORD_COLUMNS} WHERE state = $1 AND NOT EXISTS (SELECT 1 FROM leases"
                " WHERE leases.owner = streams.owner AND leases.expires_at >= $2)"
                " ORDER BY created_at, id",
                _LIVE,
                now,
            ),
        )
        return [_record(row) for row in rows]

    async def renew_lease(self, owner: str, expires_at: float) -> None:
        await self._run(
            "renew_lease",
            lambda db: db.execute(
                "INSERT INTO leases (owner, expires_at) VALUES ($1, $2)"
                " ON CONFLICT (owner) DO UPDATE SET expires_at = excluded.expires_at",
                owner,
                expires_at,
            ),
        )

    async def lease_expires_at(self, owner: str) -> float | None:
        found = await self._run(
            "lease_expires_at",
            lambda db: db.fetchval("SELECT expires_at FROM leases WHERE owner = $1", owner),
        )
        return None if found is None else float(found)

    async def drop_lease(self, owner: str) -> None:
        await self._run(
            "drop_lease", lambda db: db.execute("DELETE FROM leases WHERE owner = $1", owner)
        )

    async def delete_expired(self, now: float, retention_s: float) -> list[str]:
        rows = await self._run(
            "delete_expired",
            lambda db: db.fetch(
                "DELETE FROM streams WHERE (retention_s IS NULL AND ended_at < $1)"
                " OR (retention_s IS NOT NULL AND ended_at < $2 - retention_s) RETURNING id",
                now - retention_s,
                now,
            ),
        )
        return [str(row["id"]) for row in rows]


_RECORD_COLUMNS = (
    "SELECT id, chat_id, owner, producer, created_at, state, final_offset, error_message,"
    " end_message, ended_at, end_reason, message_id, retention_s FROM streams"
)


async def _lock_start_or_stop(db: Any, chat_id: str) -> None:
    """Orders a Stop that names a Start with every begin_stream of the chat (until the
    transaction ends). An advisory lock, not the chat's row: a first message's chat has none
    yet. Chats whose ids hash alike only take turns."""
    await db.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", _START_OR_STOP_LOCK, chat_id)


async def _lock_chat(db: Any, chat_id: str) -> None:
    """Creates the chat's row if need be and locks it until the transaction ends: what orders
    the chat's writers (message positions, the active stream)."""
    await db.execute("INSERT INTO chats (id) VALUES ($1) ON CONFLICT DO NOTHING", chat_id)
    await db.execute("SELECT 1 FROM chats WHERE id = $1 FOR UPDATE", chat_id)


async def _upsert_messages(db: Any, chat_id: str, messages: Sequence[UIMessage]) -> None:
    """New messages go after the chat's last one; a known id keeps its position. The caller holds
    the chat's lock, so the last position cannot move meanwhile."""
    if not messages:
        return
    # One statement per message (a batch may name an id twice: the later one wins, as in
    # SQLite); executemany sends them in one round trip and each sees the ones before it.
    await db.executemany(
        "INSERT INTO messages (chat_id, position, id, role, parts, metadata) VALUES"
        " ($1, (SELECT COALESCE(MAX(position), -1) + 1 FROM messages WHERE chat_id = $1),"
        " $2, $3, $4, $5)"
        " ON CONFLICT (chat_id, id) DO UPDATE SET"
        " role = excluded.role, parts = excluded.parts, metadata = excluded.metadata",
        [
            (
                chat_id,
                message.id,
                message.role,
                dump_json(message.parts),
                None if message.metadata is None else dump_json(message.metadata),
            )
            for message in messages
        ],
    )


def _record(row: Any) -> StreamRecord:
    end = None
    ended_at = row["ended_at"]
    if row["state"] != _LIVE:
        message = None
        if row["end_message"] is not None:
            fields = load_json(row["end_message"])
            message = UIMessage(
                fields["id"], fields["role"], fields["parts"], fields.get("metadata")
            )
        end = StreamEnd(
            StreamState(row["state"]),
            int(row["final_offset"]),
            row["error_message"],
            message,
            EndReason.stored(row["end_reason"]),
        )
    return StreamRecord(
        row["id"],
        row["chat_id"],
        row["owner"],
        row["producer"],
        float(row["created_at"]),
        end,
        None if ended_at is None else float(ended_at),
        retention_s=None if row["retention_s"] is None else float(row["retention_s"]),
        message_id=row["message_id"] or "",
    )


def _storable(text: str) -> str:
    """PostgreSQL text cannot hold NUL (a producer's error message might): it becomes U+FFFD."""
    return text.replace("\x00", "\ufffd")


def _describe(dsn: str) -> str:
    """host:port/database of a DSN, for messages: never its user's password."""
    try:
        parts = urlsplit(dsn)
        host = parts.hostname or "localhost"
        port = parts.port or 5432
    except ValueError:
        return "the configured server"
    if parts.scheme not in ("postgres", "postgresql"):
        return "the configured server"
    database = parts.path.lstrip("/") or parts.username or "postgres"
    return f"{host}:{port}/{database}"
