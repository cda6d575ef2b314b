"""The relay as a cluster of real processes: two relays (A and B) on one PostgreSQL database and
one Redis key prefix, a lease of 1 s. A stream's producer runs on the relay that started it; the
other serves its readers from a mirror of the Redis log, forwards Stop to the owner, and takes
the stream over (interrupted) when the owner dies. Also: a Redis restart mid-stream, and
stateless gateways pointed at different relays of one cluster.

Figures (Stop latency across instances, kill-to-interrupted time, first chunk across instances)
are printed; run with `-s` to see them. They are not asserted, except a generous bound on the
takeover time.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from relay.client import RelayClient
from relay.client.errors import Unavailable
from relay.domain.model import (
    ChunkBatch,
    ReplayMode,
    StopOutcome,
    StreamEnd,
    StreamState,
    UIMessage,
)
from tests.conftest import collect, ended_as, free_port, python_service, read_chunks, user
from tests.postgres_server import postgres_dsn  # noqa: F401 (a fixture)
from tests.redis_server import (  # noqa: F401 (fixtures)
    private_redis,
    redis_prefix,
    redis_url,
    stop_redis,
    url_port,
)
from tests.test_gateway import SseEvent, SseReader

pytestmark = pytest.mark.timeout(120)

LEASE_S = 1.0
Entry = dict[str, Any]


# -- processes -----------------------------------------------------------------------------------


@dataclass
class ProcessLog:
    """A process's JSON log lines (stderr), read as they come: the pipe never fills, and a test
    can wait for a line instead of sleeping."""

    entries: list[Entry] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def drain(self, stderr: asyncio.StreamReader) -> None:
        while line := await stderr.readline():
            try:
                entry = json.loads(line)
            except ValueError:
                entry = {"message": line.decode(errors="replace").rstrip()}
            async with self.changed:
                self.entries.append(entry)
                self.changed.notify_all()

    async def wait_for(self, match: Callable[[Entry], bool], timeout: float = 10.0) -> Entry:
        async with asyncio.timeout(timeout), self.changed:
            await self.changed.wait_for(lambda: any(match(e) for e in self.entries))
        return next(e for e in self.entries if match(e))

    def find(self, match: Callable[[Entry], bool]) -> list[Entry]:
        return [e for e in self.entries if match(e)]


@dataclass
class RelayProcess:
    name: str
    address: str
    process: asyncio.subprocess.Process
    client: RelayClient
    log: ProcessLog


@asynccontextmanager
async def logged_service(
    *args: str, ready: Callable[[Entry], bool]
) -> AsyncIterator[tuple[asyncio.subprocess.Process, ProcessLog]]:
    """`python_service`, its stderr read to the end in the background."""
    log = ProcessLog()
    drain: asyncio.Task[None] | None = None
    try:
        async with python_service(*args, ready=ready) as (process, entry):
            log.entries.append(entry)
            assert process.stderr is not None
            drain = asyncio.create_task(log.drain(process.stderr))
            yield process, log
    finally:
        if drain is not None:
            drain.cancel()
            with suppress(asyncio.CancelledError):
                await drain


@asynccontextmanager
async def relay_process(name: str, store: str, log_url: str) -> AsyncIterator[RelayProcess]:
    address = f"127.0.0.1:{free_port()}"
    async with (
        logged_service(
            "-m", "relay.server",
            "--address", address,
            "--store", store,
            "--log", log_url,
            "--lease-s", str(LEASE_S),
            "--instance-id", name,
            "--shutdown-grace-s", "0",
            ready=lambda entry: entry["message"] == "relay listening",
        ) as (process, log),
        RelayClient(address) as client,
    ):  # fmt: skip
        assert log.entries[0]["instance_id"] == name
        yield RelayProcess(name, address, process, client, log)


@asynccontextmanager
async def two_relays(store: str, log_url: str) -> AsyncIterator[tuple[RelayProcess, RelayProcess]]:
    async with AsyncExitStack() as stack:
        a, b = await asyncio.gather(
            stack.enter_async_context(relay_process("A", store, log_url)),
            stack.enter_async_context(relay_process("B", store, log_url)),
        )
        yield a, b


@pytest.fixture
async def cluster(
    postgres_dsn: str,  # noqa: F811
    redis_url: str,  # noqa: F811
    redis_prefix: str,  # noqa: F811
) -> AsyncIterator[tuple[RelayProcess, RelayProcess]]:
    """Relays A and B (processes) on a fresh database and a fresh Redis key prefix."""
    async with two_relays(postgres_dsn, f"{redis_url}?prefix={redis_prefix}") as relays:
        yield relays


# -- helpers ---------------------------------------------------------------------------------------


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Polls server-side state no event tells the test about."""
    async with asyncio.timeout(timeout):
        while not await check():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def text_of_chunks(chunks: Sequence[str]) -> str:
    decoded = [json.loads(c) for c in chunks]
    return "".join(c["delta"] for c in decoded if c["type"] == "text-delta")


def text_of_message(message: UIMessage) -> str:
    return "".join(p["text"] for p in message.parts if p["type"] == "text")


def partial_message(n: int) -> UIMessage:
    return UIMessage(f"partial-{n}", "assistant", [{"type": "text", "text": f"kept {n}"}])


def slow(chunks: int, delay_ms: int) -> dict[str, str]:
    return {"chunks": str(chunks), "delay_ms": str(delay_ms)}


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# -- 1. readers on the other instance --------------------------------------------------------------


async def test_readers_on_b_get_the_stream_of_a_gap_free_from_any_offset(
    cluster: tuple[RelayProcess, RelayProcess],
) -> None:
    a, b = cluster
    k = 7
    began = time.perf_counter()
    started = await a.client.start("chat", [user("hello cluster")], options=slow(300, 5))
    sid = started.stream_id
    on_a = asyncio.create_task(collect(a.client.attach(stream_id=sid)))
    from_zero = b.client.attach(stream_id=sid)
    first = await read_chunks(from_zero, 1)
    first_chunk_s = time.perf_counter() - began
    seen = first + await read_chunks(from_zero, k - len(first)) if len(first) < k else first
    # B's mirror holds >= k chunks now (its reader got them): an attach from k is in range.
    from_k = asyncio.create_task(collect(b.client.attach(stream_id=sid, from_offset=k)))
    rest_zero = asyncio.create_task(collect(from_zero))

    active_a, active_b = await a.client.get_active("chat"), await b.client.get_active("chat")
    assert active_a is not None and active_b is not None
    assert (active_a.stream_id, active_a.state) == (sid, StreamState.LIVE)
    assert (active_b.stream_id, active_b.state) == (sid, StreamState.LIVE)

    chunks_a, end_a = await on_a
    rest, end_zero = await rest_zero
    chunks_k, end_k = await from_k
    print(f"\n[cluster] first chunk via B, from Start on A: {first_chunk_s * 1000:.1f} ms")

    assert end_a.state is StreamState.COMPLETED
    assert end_a.final_offset == len(chunks_a) == 300 + 6
    assert seen + rest == chunks_a  # B from 0: every chunk once, in order
    assert chunks_k == chunks_a[k:]  # B from k: exactly k..end
    assert end_zero == end_k == end_a
    assert await a.client.get_active("chat") is None
    assert await b.client.get_active("chat") is None
    messages_a = await a.client.list_messages("chat")
    assert await b.client.list_messages("chat") == messages_a
    assert [m.role for m in messages_a] == ["user", "assistant"]
    assert messages_a[-1] == end_a.message
    assert text_of_message(messages_a[-1]) == text_of_chunks(chunks_a)
    replayed, again = await collect(b.client.attach(stream_id=sid))  # after the end, from B
    assert (replayed, again) == (chunks_a, end_a)


# -- 2. Stop on the other instance -----------------------------------------------------------------


async def test_stop_via_b_cancels_the_producer_on_a(
    cluster: tuple[RelayProcess, RelayProcess],
) -> None:
    a, b = cluster
    requested = 5_000
    latencies: list[float] = []
    for n in range(20):
        chat = f"chat-{n}"
        partial = partial_message(n) if n % 2 == 0 else None
        started = await a.client.start(chat, [user("stop me")], options=slow(requested, 5))
        sid = started.stream_id
        reader_a = a.client.attach(stream_id=sid)
        reader_b = b.client.attach(stream_id=sid)
        seen_a = await read_chunks(reader_a, 3)
        seen_b = await read_chunks(reader_b, 3)

        began = time.perf_counter()
        result = await b.client.stop(chat, partial_message=partial)
        latencies.append(time.perf_counter() - began)

        assert result.outcome is StopOutcome.STOPPED and result.stream_id == sid
        assert result.end is not None
        end = result.end
        assert end.state is StreamState.STOPPED
        rest_a, end_a = await collect(reader_a)
        rest_b, end_b = await collect(reader_b)
        assert end_a == end_b == end
        assert len(seen_a) + len(rest_a) == len(seen_b) + len(rest_b) == end.final_offset
        assert seen_a + rest_a == seen_b + rest_b
        assert end.final_offset < requested // 2  # cancelled, not run to its end
        await until(lambda: _no_live_streams(a.client))
        ended = await a.log.wait_for(logged_end_of(sid))
        assert ended["state"] == "stopped" and ended["final_offset"] == end.final_offset
        messages = await a.client.list_messages(chat)
        assert messages == await b.client.list_messages(chat)
        if partial is not None:
            assert end.message == ended_as(partial) and messages[-1] == ended_as(partial)
        else:
            assert messages[-1].id == f"msg_{sid}"
            assert text_of_message(messages[-1]) == text_of_chunks(seen_a + rest_a)
        assert await a.client.get_active(chat) is None and await b.client.get_active(chat) is None
    p50, p99 = statistics.median(latencies), percentile(latencies, 0.99)
    print(
        f"\n[cluster] Stop via B of a producer on A, {len(latencies)} stops: "
        f"p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms"
    )


async def _no_live_streams(client: RelayClient) -> bool:
    return (await client.get_stats()).live_streams == 0


def logged_end_of(stream_id: str) -> Callable[[Entry], bool]:
    return lambda entry: entry["message"] == "stream ended" and entry.get("stream_id") == stream_id


# -- 3. the owner dies ---------------------------------------------------------------------------


async def test_sigkill_of_the_owner_interrupts_its_stream_on_b_within_the_lease(
    cluster: tuple[RelayProcess, RelayProcess],
) -> None:
    a, b = cluster
    started = await a.client.start("chat", [user("kill the owner")], options=slow(5_000, 5))
    sid = started.stream_id
    reader = b.client.attach(stream_id=sid)
    seen = await read_chunks(reader, 20)

    async def rest_with_time() -> tuple[list[str], StreamEnd, float]:
        chunks, end = await collect(reader)
        return chunks, end, time.perf_counter()

    following = asyncio.create_task(rest_with_time())
    killed_at = time.perf_counter()
    a.process.kill()
    await a.process.wait()
    rest, end, ended_at = await following
    took = ended_at - killed_at
    print(f"\n[cluster] SIGKILL of A -> the reader on B gets INTERRUPTED: {took * 1000:.0f} ms")

    assert end.state is StreamState.INTERRUPTED
    assert end.final_offset == len(seen) + len(rest) >= len(seen)
    assert end.final_offset < 5_000  # it did not run on somewhere
    assert took < 3 * LEASE_S + 2
    taken = await b.log.wait_for(lambda e: e.get("stream_id") == sid and e.get("owner") == "A")
    assert taken["message"] == "stream interrupted: its relay is gone"
    replayed, again = await collect(b.client.attach(stream_id=sid))
    assert replayed == seen + rest and again == end
    messages = await b.client.list_messages("chat")
    assert [m.role for m in messages] == ["user", "assistant"]
    assert messages[-1].id == f"msg_{sid}" and messages[-1] == end.message
    assert text_of_message(messages[-1]) == text_of_chunks(replayed)
    assert await b.client.get_active("chat") is None
    # The chat is free for a new answer, on B.
    again_started = await b.client.start("chat", [user("again")], options=slow(3, 0))
    _, fresh = await collect(b.client.attach(stream_id=again_started.stream_id))
    assert fresh.state is StreamState.COMPLETED


async def test_stop_via_b_of_a_dead_owners_stream_ends_it_once_the_lease_lapsed(
    cluster: tuple[RelayProcess, RelayProcess],
) -> None:
    """A Stop via B for streams whose owner was SIGKILLed does not hang: B signals the dead
    owner until its lease lapses, then ends the stream itself. With a partial message it is
    STOPPED with that message, unless B's lease loop took the stream over first (INTERRUPTED:
    the first end recorded holds; the outcome may then say ALREADY_ENDED); without one,
    INTERRUPTED. Readers on B get that same end, and ListMessages its message."""
    a, b = cluster
    chats = {"with-partial": partial_message(1), "without": None}
    readers = {}
    for chat in chats:
        started = await a.client.start(chat, [user("stop after death")], options=slow(5_000, 5))
        readers[chat] = b.client.attach(stream_id=started.stream_id)
        await read_chunks(readers[chat], 5)
    following = {chat: asyncio.create_task(collect(reader)) for chat, reader in readers.items()}
    a.process.kill()
    await a.process.wait()
    killed_at = time.perf_counter()
    results = await asyncio.gather(
        *(b.client.stop(chat, partial_message=partial) for chat, partial in chats.items())
    )
    took = time.perf_counter() - killed_at
    for (chat, partial), result in zip(chats.items(), results, strict=True):
        assert result.end is not None
        end = result.end
        if end.state is StreamState.STOPPED:
            assert result.outcome is StopOutcome.STOPPED
        else:  # taken over by B's lease loop, maybe before this Stop could end it
            assert result.outcome in (StopOutcome.STOPPED, StopOutcome.ALREADY_ENDED)
        _, seen_end = await following[chat]
        assert seen_end == end
        messages = await b.client.list_messages(chat)
        assert messages[-1] == end.message
        if partial is None or end.state is StreamState.INTERRUPTED:
            assert end.state is StreamState.INTERRUPTED and end.message is not None
            assert end.message.id.startswith("msg_")
        else:
            assert end.state is StreamState.STOPPED and end.message == ended_as(partial)
    states = ", ".join(
        f"{chat}: {r.end.state.value}/{r.outcome.value}"
        for chat, r in zip(chats, results, strict=True)
        if r.end is not None
    )
    print(f"\n[cluster] Stop via B after SIGKILL of the owner: {took * 1000:.0f} ms ({states})")
    assert took < 3 * LEASE_S + 2


# -- 5. Redis restarts mid-stream ------------------------------------------------------------------


@pytest.mark.parametrize("restart", ["quick", "after_b_lost_the_log"])
async def test_a_redis_restart_mid_stream_loses_nothing_a_reader_was_given(
    postgres_dsn: str,  # noqa: F811
    private_redis: Callable[..., tuple[str, subprocess.Popen[bytes]]],  # noqa: F811
    restart: str,
) -> None:
    """Redis (appendonly, appendfsync always) is killed while A produces and B's reader follows
    the log, then started again on the same port: at once ("quick": as soon as A's journal write
    failed), or once B's mirror has given up on the log ("after_b_lost_the_log", ~1-2 s).

    Observed, both ways: the stream continues to COMPLETED. A keeps producing into memory while
    its journal writes fail ("could not journal chunks", health NOT_SERVING) and writes the
    backlog once Redis is back. Quick: redis-py's retries hide the outage from B's follower, its
    reader never notices. Slow: B's mirror loses the log and its reader, once caught up, gets
    UNAVAILABLE ("attach again"); attached again from its offset it gets the rest. Every reader's
    chunks are a prefix of the replay, which is the same via A and via B. A's cancel channel
    resubscribes: a Stop via B works after the restart.
    """
    url, server = private_redis(appendonly=True)
    async with two_relays(postgres_dsn, f"{url}?prefix=restart:") as (a, b):
        started = await a.client.start("chat", [user("redis restart")], options=slow(400, 10))
        sid = started.stream_id
        reader_a = asyncio.create_task(collect(a.client.attach(stream_id=sid)))
        reader_b = b.client.attach(stream_id=sid)
        before_b = await read_chunks(reader_b, 20)

        stop_redis(server)
        killed_at = time.perf_counter()
        await a.log.wait_for(lambda e: e["message"].startswith("could not journal chunks"))
        if restart == "after_b_lost_the_log":
            await b.log.wait_for(
                lambda e: e["message"] == "lost the log of a stream owned elsewhere"
            )
        _, server = private_redis(appendonly=True, port=url_port(url))
        down_s = time.perf_counter() - killed_at
        active = await a.client.get_active("chat")
        assert active is not None and active.state is StreamState.LIVE  # restarted mid-stream

        got_b, end_b, errors = await _read_on_with_reattach(b.client, sid, before_b, reader_b)
        chunks_a, end_a = await reader_a
        replay_a = await collect(a.client.attach(stream_id=sid))
        replay_b = await collect(b.client.attach(stream_id=sid))

        # The cancel channel of A works again: a Stop via B reaches the producer on A.
        later = await a.client.start("later", [user("stop me")], options=slow(5_000, 5))
        await read_chunks(b.client.attach(stream_id=later.stream_id), 1)
        async with asyncio.timeout(10):
            stopped = await b.client.stop("later")
        assert stopped.outcome is StopOutcome.STOPPED and stopped.end is not None
        assert stopped.end.state is StreamState.STOPPED and stopped.end.final_offset < 2_500

    print(
        f"\n[cluster] Redis restart ({restart}, down {down_s * 1000:.0f} ms) mid-stream: "
        f"ended {end_a.state.value}; B's reader attached again {errors}x"
    )
    assert replay_a == replay_b == (chunks_a, end_a)
    assert got_b == chunks_a[: len(got_b)] and before_b == chunks_a[: len(before_b)]
    assert end_b == end_a
    if restart == "after_b_lost_the_log":
        assert errors >= 1  # B's reader was told to attach again
    if end_a.state is StreamState.COMPLETED:
        assert end_a.final_offset == len(chunks_a) == 400 + 6
    else:  # "a clear error": what readers were given is still there
        assert end_a.error_message and end_a.final_offset >= len(got_b)


async def _read_on_with_reattach(
    client: RelayClient,
    stream_id: str,
    seen: list[str],
    events: AsyncIterator[ChunkBatch | StreamEnd],
) -> tuple[list[str], StreamEnd, int]:
    """Reads to the end; on UNAVAILABLE attaches again from the next offset (as a client
    would). Returns every chunk read, the end, and how many times it had to attach again."""
    chunks = list(seen)
    errors = 0
    async with asyncio.timeout(30):
        while True:
            try:
                async for event in events:
                    if isinstance(event, StreamEnd):
                        return chunks, event, errors
                    assert event.first_offset == len(chunks), "gap or duplicate in offsets"
                    chunks.extend(event.chunks)
                raise AssertionError("the Attach ended without a StreamEnd")
            except Unavailable:
                errors += 1
            await asyncio.sleep(0.05)  # Redis may still be away: a client's retry pause
            events = client.attach(stream_id=stream_id, from_offset=len(chunks))


# -- 6. stateless gateways on different relays ---------------------------------------------------


@asynccontextmanager
async def gateway_on(relay: RelayProcess) -> AsyncIterator[str]:
    port = free_port()
    async with logged_service(
        "-m", "gateway.server",
        "--address", f"127.0.0.1:{port}",
        "--relay", relay.address,
        ready=lambda entry: entry["message"].startswith("Uvicorn running on"),
    ):  # fmt: skip
        yield f"http://127.0.0.1:{port}"


def chat_body(chat: str, options: dict[str, str]) -> dict[str, Any]:
    message = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}
    return {"id": chat, "messages": [message], "options": options}


async def read_events(sse: SseReader, n: int) -> list[SseEvent]:
    return [await sse.next() for _ in range(n)]


async def test_gateways_on_different_relays_resume_and_stop_each_others_answers(
    cluster: tuple[RelayProcess, RelayProcess],
) -> None:
    a, b = cluster
    async with (
        gateway_on(a) as via_a,
        gateway_on(b) as via_b,
        httpx.AsyncClient(timeout=15) as http,
    ):
        # Resume via B mid-answer: the whole stream to [DONE] (plain: chunk by chunk, as A sent
        # it; the compacted default is checked below).
        body = chat_body("resumed", slow(150, 10))
        async with http.stream("POST", via_a + "/api/chat", json=body) as posted:
            assert posted.status_code == 200
            on_a = SseReader(posted)
            head_a = await read_events(on_a, 5)
            path = "/api/chat/resumed/stream?replay=plain"
            async with http.stream("GET", via_b + path) as resumed:
                assert resumed.status_code == 200
                assert resumed.headers["x-stream-id"] == posted.headers["x-stream-id"]
                all_b = await SseReader(resumed).rest()
            all_a = head_a + await on_a.rest()
        assert [e.id for e in all_a] == list(range(150 + 6))
        assert [(e.id, e.data) for e in all_b] == [(e.id, e.data) for e in all_a]
        assert all_b[-1].chunk["type"] == "finish"
        saved = (await http.get(via_b + "/api/chat/resumed/messages")).json()["messages"]
        assert [m["role"] for m in saved] == ["user", "assistant"]
        # By stream id, compacted (what the resume route does by default): the same text.
        reader = b.client.attach(stream_id=posted.headers["x-stream-id"], replay=ReplayMode.COMPACT)
        compact = await anext(reader)
        await reader.aclose()
        assert isinstance(compact, ChunkBatch) and compact.offsets is not None
        merged = "".join(
            json.loads(c).get("delta", "") for c in compact.chunks if "text-delta" in c
        )
        assert merged == "".join(e.chunk.get("delta", "") for e in all_a)

        # Stop via B: both SSE streams end with an abort, the producer on A stops.
        body = chat_body("stopped", slow(5_000, 5))
        async with http.stream("POST", via_a + "/api/chat", json=body) as posted:
            stream_id = posted.headers["x-stream-id"]
            on_a = SseReader(posted)
            head_a = await read_events(on_a, 5)
            path = "/api/chat/stopped/stream?replay=plain"
            async with http.stream("GET", via_b + path) as resumed:
                on_b = SseReader(resumed)
                head_b = await read_events(on_b, 5)
                partial = {
                    "id": "p1",
                    "role": "assistant",
                    "parts": [{"type": "text", "text": "w"}],
                }
                stop = await http.post(
                    via_b + "/api/chat/stopped/stop",
                    json={"assistantMessage": partial, "activeStreamId": stream_id},
                )
                assert stop.status_code == 200, stop.text
                stopped = stop.json()
                rest_b = await on_b.rest()
            rest_a = await on_a.rest()
        assert stopped["stopped"] is True and stopped["state"] == "stopped"
        assert stopped["streamId"] == stream_id
        final = stopped["finalOffset"]
        assert final < 2_500
        for events in (head_a + rest_a, head_b + rest_b):
            assert [e.id for e in events[:-1]] == list(range(final))
            assert events[-1].chunk == {"type": "abort"}
        await until(lambda: _no_live_streams(a.client))
        saved = (await http.get(via_a + "/api/chat/stopped/messages")).json()["messages"]
        stream_end = {"state": "stopped", "reason": "stop"}
        assert saved[-1] == {**partial, "metadata": {"streamEnd": stream_end}}
        assert (await http.get(via_a + "/api/chat/stopped/stream")).status_code == 204
