"""The cluster's stream log: Redis Streams through redis-py asyncio (the `StreamLog` port).

One Redis stream per relay stream, key `{prefix}stream:{stream_id}`, with explicit entry ids so
that an id is an offset and no lookup table is needed:

- `0-1`: the header (chat_id, owner), written by `create`;
- `0-{k+2}`: the chunk at offset k (field `c`, its JSON text);
- `1-0`: the seal (state, final_offset, error, message): larger than any chunk's id, so nothing
  can be appended after it (XADD refuses ids below the top) and it is always the last entry.

Appends and seals are Lua scripts, so the fence (no chunk after a seal) and the first-seal-wins
rule hold against any number of relays writing at once. Cancel signals travel on pub/sub, one
channel per owning instance.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import suppress
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import NoScriptError, RedisError

from relay.domain.errors import Unavailable
from relay.domain.model import (
    EndReason,
    StreamEnd,
    StreamState,
    UIMessage,
    dump_json,
    load_json,
)
from relay.domain.ports import CancelRequest, ChunkRun, LogBehind, LoggedStream
from relay.stores.uncut import Uncut
from relay.stores.urls import without_password

T = TypeVar("T")
Redis = redis.asyncio.Redis
Work = Callable[[Redis], Awaitable[T]]

log = logging.getLogger("relay.log")

_FAILED = "the relay's stream log failed; retry later"
_GONE = "the stream's log is gone"
_ERRORS = (RedisError, OSError)

_HEADER_ID = "0-1"
_SEAL_ID = "1-0"
_BLOCK_MS = 1_000  # a follower's XREAD wait; well under the socket timeout
_READ_COUNT = 1_000  # entries per follower read
_BLOCKING_CONNECTIONS = 1_000
_SOCKET_TIMEOUT_S = 5.0
_HEALTH_CHECK_S = 10
_RESUBSCRIBE_MAX_S = 2.0

# KEYS[1] the log; ARGV chat_id, owner. Idempotent, so that a retried create cannot fail.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('XADD', KEYS[1], '0-1', 'chat_id', ARGV[1], 'owner', ARGV[2])
return 1
"""

# KEYS[1] the log; ARGV[1] the run's first offset, ARGV[2..] its chunks. Chunks the log holds
# already (a retried or overlapping run) are skipped; a sealed log takes nothing (the fence).
_APPEND = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1][1]
if top == '1-0' then return 'sealed' end
local next_offset = tonumber(string.sub(top, 3)) - 1
local first = tonumber(ARGV[1])
if #ARGV > 1 and first > next_offset then return {'gap', next_offset} end
for i = 2, #ARGV do
  local offset = first + i - 2
  if offset >= next_offset then
    redis.call('XADD', KEYS[1], '0-' .. string.format('%d', offset + 2), 'c', ARGV[i])
  end
end
return 'ok'
"""

# KEYS[1] the log; ARGV state, final_offset, error, retention (ms), message JSON ('' for none),
# reason (EndReason's value; a seal without it, from an older relay, reads as unspecified).
# Returns the fields of the seal that holds already, 'missing', or 'ok' (this one holds).
_SEAL = """
local sealed = redis.call('XRANGE', KEYS[1], '1-0', '1-0')
if #sealed > 0 then return sealed[1][2] end
if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
local fields = {'state', ARGV[1], 'final_offset', ARGV[2], 'error', ARGV[3], 'reason', ARGV[6]}
if ARGV[5] ~= '' then
  table.insert(fields, 'message')
  table.insert(fields, ARGV[5])
end
redis.call('XADD', KEYS[1], '1-0', unpack(fields))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 'ok'
"""


class RedisStreamLog:
    """Every write is one Lua script (or one pipeline of them), run as a task of its own: a caller
    cancelled mid-way stops waiting, but the script still runs whole, and every script is safe to
    run twice (redis-py retries a command whose connection failed). Redis failures reach the
    caller as `Unavailable` with a plain message; the details go to the log, and `error` says
    why the log is failing until an operation succeeds again."""

    def __init__(self, url: str, prefix: str = "relay:") -> None:
        self.url = url
        self.prefix = prefix
        self.error: str | None = None
        self._where = _describe(url)
        self._client: Redis | None = None
        # Followers and cancel subscribers hold a connection while they wait: their own pool, so
        # they never starve the writes.
        self._blocking: Redis | None = None
        self._uncut = Uncut()

    async def open(self) -> None:
        """Connects and pings. Raises `Unavailable`, naming the server (never the password), if
        Redis cannot be reached."""
        try:
            self._client = self._connect(max_connections=None)
            # No retries for followers: one that lost its connection ends (its readers attach
            # again), and none reconnects into a pool that is closing.
            self._blocking = self._connect(max_connections=_BLOCKING_CONNECTIONS, retries=0)
            await self._client.ping()
        except (*_ERRORS, ValueError) as exc:
            await self.close()
            reason = without_password(f"{type(exc).__name__}: {exc}", self.url)
            self.error = f"open: {reason}"
            log.error(
                "cannot connect to the stream log", extra={"redis": self._where, "error": reason}
            )
            raise Unavailable(f"cannot connect to Redis at {self._where}: {reason}") from None
        self._create = self._client.register_script(_CREATE)
        self._append = self._client.register_script(_APPEND)
        self._seal = self._client.register_script(_SEAL)

    def _connect(self, max_connections: int | None, retries: int = 3) -> Redis:
        return redis.asyncio.from_url(
            self.url,
            decode_responses=True,
            socket_timeout=_SOCKET_TIMEOUT_S,
            socket_connect_timeout=_SOCKET_TIMEOUT_S,
            health_check_interval=_HEALTH_CHECK_S,
            # A few quick retries ride out a blip; a server that stays away fails fast.
            retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries),
            max_connections=max_connections,
        )

    async def close(self) -> None:
        await self._uncut.drain()  # operations whose callers gave up: let them finish first
        clients, self._client, self._blocking = (self._client, self._blocking), None, None
        for client in clients:  # (no new call starts from here)
            if client is not None:
                with suppress(*_ERRORS):
                    await client.aclose()

    async def probe(self) -> None:
        """A small write: fails (Unavailable) while Redis cannot take writes."""
        await self._run("probe", lambda db: db.set(self.prefix + "probe", "1", px=10_000))

    async def create(self, stream_id: str, chat_id: str, owner: str) -> None:
        key = self._key(stream_id)
        await self._run(
            "create", lambda db: self._create(keys=[key], args=[chat_id, owner], client=db)
        )

    async def append(self, runs: Sequence[ChunkRun]) -> set[str]:
        if not runs:
            return set()

        async def append(db: Redis) -> list[Any]:
            # One round trip for all the runs. EVALSHA, not the pipeline's script support, which
            # would ask SCRIPT EXISTS first: if Redis lost the script (a restart), load it and
            # run the whole pipeline again (each run skips what it wrote the first time).
            for _ in range(2):
                async with db.pipeline(transaction=False) as pipe:
                    for run in runs:
                        key = self._key(run.stream_id)
                        pipe.evalsha(self._append.sha, 1, key, run.first_offset, *run.chunks)
                    results: list[Any] = await pipe.execute(raise_on_error=False)
                if not any(isinstance(result, NoScriptError) for result in results):
                    break
                await db.script_load(_APPEND)
            for result in results:
                if isinstance(result, Exception):
                    raise result
            return results

        results = await self._run("append", append)
        fenced: set[str] = set()
        behind: dict[str, int] = {}
        for run, result in zip(runs, results, strict=True):
            if result == "sealed":
                fenced.add(run.stream_id)
            elif result == "missing":
                # Deleted or expired while open (a Redis restart without persistence): nothing
                # can be appended to it any more, so it is fenced like a sealed one.
                log.warning(
                    "appending to a stream whose log is gone", extra={"stream_id": run.stream_id}
                )
                fenced.add(run.stream_id)
            elif isinstance(result, list):  # a gap: the log lost writes it had acknowledged
                log.warning(
                    "a stream's log is behind its writer; appending again from its end",
                    extra={"stream_id": run.stream_id, "log_ends_at": result[1]},
                )
                behind[run.stream_id] = int(result[1])
        if behind:
            raise LogBehind(behind)
        return fenced

    async def seal(self, stream_id: str, end: StreamEnd, retention_s: float) -> StreamEnd:
        key = self._key(stream_id)
        message = "" if end.message is None else dump_json(end.message.to_json())
        args = [
            end.state.value,
            end.final_offset,
            end.error_message,
            max(1, round(retention_s * 1000)),
            message,
            end.reason.value,
        ]
        result = await self._run("seal", lambda db: self._seal(keys=[key], args=args, client=db))
        if isinstance(result, list):  # sealed before: that end holds
            return _end(_pairs(result))
        if result == "missing":
            log.warning("sealing a stream whose log is gone", extra={"stream_id": stream_id})
        return end

    async def load(self, stream_id: str) -> LoggedStream | None:
        key = self._key(stream_id)
        entries = _entries(await self._run("load", lambda db: _any(db.xrange(key, "-", "+"))))
        if not entries:
            return None
        chat_id = ""
        chunks: list[str] = []
        end: StreamEnd | None = None
        for entry_id, fields in entries:
            if entry_id == _HEADER_ID:
                chat_id = fields["chat_id"]
            elif entry_id == _SEAL_ID:
                end = _end(fields)
            else:
                chunks.append(fields["c"])
        if end is not None:
            del chunks[end.final_offset :]  # a fenced writer's, slipped in before the seal
        return LoggedStream(stream_id, chat_id, chunks, end)

    async def follow(
        self, stream_id: str, from_offset: int
    ) -> AsyncIterator[list[str] | StreamEnd]:
        key = self._key(stream_id)
        last_id = f"0-{from_offset + 1}"  # XREAD returns the entries after it
        offset = from_offset
        block: int | None = None  # the first read does not wait: a missing log is found at once
        while True:
            entries = await self._read(key, last_id, block)
            block = _BLOCK_MS
            if not entries:
                if not await self._exists(key):
                    raise Unavailable(_GONE)
                continue
            chunks: list[str] = []
            end: StreamEnd | None = None
            for entry_id, fields in entries:
                if entry_id == _SEAL_ID:
                    end = _end(fields)
                elif "c" in fields:
                    chunks.append(fields["c"])
                last_id = entry_id
            if end is not None:
                # Chunks a fenced writer slipped in before the seal are not the stream's.
                del chunks[max(0, end.final_offset - offset) :]
            if chunks:
                offset += len(chunks)
                yield chunks
            if end is not None:
                yield end
                return

    async def _read(
        self, key: str, last_id: str, block: int | None
    ) -> list[tuple[str, dict[str, str]]]:
        if self._blocking is None:
            raise Unavailable("the relay's stream log is closed")
        try:
            reply: Any = await self._blocking.xread({key: last_id}, count=_READ_COUNT, block=block)
        except _ERRORS as exc:
            raise self._failed("follow", exc) from exc
        # RESP2: [[key, [(id, fields), ...]]]; nothing (None or []) when the wait timed out.
        return _entries(reply[0][1]) if reply else []

    async def _exists(self, key: str) -> bool:
        if self._client is None:
            raise Unavailable("the relay's stream log is closed")
        try:
            return bool(await self._client.exists(key))
        except _ERRORS as exc:
            raise self._failed("follow", exc) from exc

    async def signal_cancel(self, owner: str, stream_id: str, request: CancelRequest) -> None:
        message = None if request.message is None else request.message.to_json()
        payload = dump_json(
            {
                "stream_id": stream_id,
                "state": request.state.value,
                "message": message,
                "reason": request.reason.value,
            }
        )
        channel = self._channel(owner)
        await self._run("signal_cancel", lambda db: db.publish(channel, payload))

    async def cancels(self, owner: str) -> AsyncIterator[tuple[str, CancelRequest]]:
        channel = self._channel(owner)
        pause = 0.1
        while True:
            if self._blocking is None:
                raise Unavailable("the relay's stream log is closed")
            pubsub = self._blocking.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                pause = 0.1
                while True:
                    # A timeout, so that the health check (a PING when idle) finds a dead
                    # connection: with none, a silent network loss would wait forever.
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None and message["type"] == "message":
                        signal = _cancel_signal(message["data"])
                        if signal is not None:
                            yield signal
            except _ERRORS as exc:
                # Signals sent meanwhile are lost; their senders repeat them until the stream
                # is sealed.
                log.warning(
                    "lost the cancel channel; subscribing again",
                    extra={"redis": self._where, "error": without_password(str(exc), self.url)},
                )
            finally:
                with suppress(*_ERRORS):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(pause)
            pause = min(pause * 2, _RESUBSCRIBE_MAX_S)

    async def delete(self, stream_ids: Sequence[str]) -> None:
        if not stream_ids:
            return
        keys = [self._key(stream_id) for stream_id in stream_ids]
        await self._run("delete", lambda db: db.delete(*keys))

    def _key(self, stream_id: str) -> str:
        return f"{self.prefix}stream:{stream_id}"

    def _channel(self, owner: str) -> str:
        return f"{self.prefix}cancel:{owner}"

    async def _run(self, operation: str, work: Work[T]) -> T:
        """Runs `work` in a task the caller's cancellation cannot cut (no half-sent pipeline)."""
        if self._client is None:
            raise Unavailable("the relay's stream log is closed")
        return await self._uncut.run(self._attempt(operation, self._client, work))

    async def _attempt(self, operation: str, client: Redis, work: Work[T]) -> T:
        try:
            result = await work(client)
        except _ERRORS as exc:
            raise self._failed(operation, exc) from exc
        self.error = None
        return result

    def _failed(self, operation: str, exc: BaseException) -> Unavailable:
        reason = without_password(f"{type(exc).__name__}: {exc}", self.url)
        self.error = f"{operation}: {reason}"
        log.error(
            "stream log operation failed",
            extra={"operation": operation, "error": reason, "redis": self._where},
        )
        return Unavailable(_FAILED)


async def _any(reply: Awaitable[Any]) -> Any:
    """redis-py's declared reply types, which decode_responses makes wrong, as Any."""
    return await reply


def _entries(reply: Any) -> list[tuple[str, dict[str, str]]]:
    """Stream entries as redis-py gives them with decode_responses: (id, fields) pairs."""
    return [(entry_id, fields) for entry_id, fields in reply]


def _pairs(flat: Sequence[str]) -> dict[str, str]:
    """A Lua script's field list [name, value, ...] as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _end(fields: dict[str, str]) -> StreamEnd:
    message = None
    if fields.get("message"):
        message = _message(load_json(fields["message"]))
    return StreamEnd(
        StreamState(fields["state"]),
        int(fields["final_offset"]),
        fields["error"],
        message,
        EndReason.stored(fields.get("reason")),
    )


def _message(fields: Any) -> UIMessage:
    return UIMessage(fields["id"], fields["role"], fields["parts"], fields.get("metadata"))


def _cancel_signal(data: str) -> tuple[str, CancelRequest] | None:
    try:
        fields = load_json(data)
        message = None if fields["message"] is None else _message(fields["message"])
        reason = EndReason.stored(fields.get("reason"))  # absent: an older relay's signal
        return fields["stream_id"], CancelRequest(StreamState(fields["state"]), message, reason)
    except (ValueError, KeyError, TypeError) as exc:  # not a relay's: ignore it
        log.warning("ignored a malformed cancel signal", extra={"error": str(exc)})
        return None


def _describe(url: str) -> str:
    """host:port/db of a Redis URL, for messages: never its password."""
    try:
        parts = urlsplit(url)
        if parts.scheme == "unix":
            return parts.path or "the configured server"
        host = parts.hostname or "localhost"
        port = parts.port or 6379
    except ValueError:
        return "the configured server"
    if parts.scheme not in ("redis", "rediss"):
        return "the configured server"
    return f"{host}:{port}/{parts.path.lstrip('/') or '0'}"
