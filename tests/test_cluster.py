"""Several relays as one, in one process: two Relay instances on one PostgreSQL database and one
Redis key prefix, each with its own scripted producers, so every order is set by the test.

What is proven here: a stream started on A is read through B gap-free with its end; Stop and
supersede through B cancel the producer on A; two Starts racing on two relays have one winner;
a relay whose lease lapsed loses its stream (B ends it) and is fenced from writing into it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
import redis

from relay.domain.core import Relay
from relay.domain.errors import FailedPrecondition, Unavailable
from relay.domain.model import (
    EndReason,
    JsonObject,
    StartRequest,
    StopOutcome,
    StreamEnd,
    StreamState,
    UIMessage,
    dump_json,
)
from relay.domain.ports import LoggedStream
from relay.producers import ProduceRequest, ProducerRegistry
from relay.stores.postgres import PostgresChatStore, Work
from relay.stores.redis_log import RedisStreamLog
from tests.conftest import (
    FakeClock,
    ScriptedProducer,
    collect,
    ended_as,
    eventually,
    free_port,
    read_chunks,
    text_chunks,
    user,
)
from tests.test_single_instance import run_to_exit


@dataclass
class Instance:
    relay: Relay
    scripted: ScriptedProducer


@contextlib.asynccontextmanager
async def instance(*args: Any, **options: Any) -> AsyncIterator[Instance]:
    """`build(...)`, open, closed after."""
    instance = build(*args, **options)
    await instance.relay.open()
    try:
        yield instance
    finally:
        await instance.relay.close(grace=0)


def build(
    name: str,
    dsn: str,
    url: str,
    prefix: str,
    lease_s: float = 10.0,
    journal_s: float = 0.001,
    log: type[RedisStreamLog] = RedisStreamLog,
    store: type[PostgresChatStore] = PostgresChatStore,
) -> Instance:
    scripted = ScriptedProducer()
    relay = Relay(
        store(dsn),
        ProducerRegistry({"scripted": scripted}, "scripted"),
        log=log(url, prefix),
        instance_id=name,
        lease_s=lease_s,
        journal_interval=journal_s,
        sweep_interval=None,
        retry_backoff=(0.001, 0.05),
    )
    return Instance(relay, scripted)


@pytest.fixture
async def pair(
    postgres_dsn: str, redis_url: str, redis_prefix: str
) -> AsyncIterator[tuple[Instance, Instance]]:
    async with (
        instance("relay-a", postgres_dsn, redis_url, redis_prefix) as a,
        instance("relay-b", postgres_dsn, redis_url, redis_prefix) as b,
    ):
        yield a, b


async def test_a_stream_started_on_a_is_read_through_b_from_any_offset_with_its_end(
    pair: tuple[Instance, Instance],
) -> None:
    a, b = pair
    started = await a.relay.start(StartRequest("chat-1", [user("hi")]))
    script = a.scripted.script(started.stream_id)
    sent = text_chunks(6)
    script.put(*sent[:4])
    from_start = await b.relay.attach(stream_id=started.stream_id)
    from_two = await b.relay.attach(chat_id="chat-1", from_offset=2)
    active = await b.relay.get_active("chat-1")
    assert active is not None and active.stream_id == started.stream_id
    assert active.state is StreamState.LIVE
    script.put(*sent[4:], None)

    chunks, end = await collect(from_start.events)
    later, end_later = await collect(from_two.events)
    on_a, end_on_a = await collect((await a.relay.attach(stream_id=started.stream_id)).events)

    assert chunks == on_a == [dump_json(c) for c in sent]
    assert later == chunks[2:]
    assert end == end_later == end_on_a and end.state is StreamState.COMPLETED
    assert await b.relay.list_messages("chat-1") == await a.relay.list_messages("chat-1")
    assert (await b.relay.list_messages("chat-1"))[-1].role == "assistant"
    assert await b.relay.get_active("chat-1") is None


async def test_stop_through_b_cancels_the_producer_on_a_and_persists_the_partial(
    pair: tuple[Instance, Instance],
) -> None:
    a, b = pair
    started = await a.relay.start(StartRequest("chat-1", [user("hi")]))
    script = a.scripted.script(started.stream_id)
    script.put(*text_chunks(3))
    reader = await b.relay.attach(stream_id=started.stream_id)
    partial = UIMessage("msg-1", "assistant", [{"type": "text", "text": "w0 w1 "}])

    result = await b.relay.stop("chat-1", partial=partial)

    assert script.cancelled.is_set()  # the producer on A saw the cancellation
    assert result.outcome is StopOutcome.STOPPED and result.end is not None
    assert result.end.state is StreamState.STOPPED
    chunks, end = await collect(reader.events)
    assert end == result.end and len(chunks) == end.final_offset
    assert result.end.reason is EndReason.STOP  # the cancel signal carried it to A
    assert (await a.relay.list_messages("chat-1"))[-1] == ended_as(partial)
    assert a.relay.live == 0
    again = await b.relay.stop("chat-1", started.stream_id)
    assert again.outcome is StopOutcome.ALREADY_ENDED and again.end == result.end


async def test_supersede_through_b_stops_the_answer_on_a(
    pair: tuple[Instance, Instance],
) -> None:
    a, b = pair
    first = await a.relay.start(StartRequest("chat-1", [user("hi")]))
    a.scripted.script(first.stream_id).put(*text_chunks(2))
    with pytest.raises(FailedPrecondition):
        await b.relay.start(StartRequest("chat-1", [user("again")]))

    second = await b.relay.start(StartRequest("chat-1", [user("again")], supersede=True))

    assert second.superseded_stream_id == first.stream_id
    assert a.scripted.script(first.stream_id).cancelled.is_set()
    stopped = await a.relay.streams[first.stream_id].wait_ended()
    assert stopped.state is StreamState.STOPPED
    active = await a.relay.get_active("chat-1")
    assert active is not None and active.stream_id == second.stream_id
    b.scripted.script(second.stream_id).put(None)


async def test_two_starts_racing_on_two_relays_have_one_winner(
    pair: tuple[Instance, Instance],
) -> None:
    a, b = pair
    results = await asyncio.gather(
        a.relay.start(StartRequest("chat-1", [user("from a")])),
        b.relay.start(StartRequest("chat-1", [user("from b")])),
        return_exceptions=True,
    )

    won = [r for r in results if not isinstance(r, BaseException)]
    lost = [r for r in results if isinstance(r, BaseException)]
    assert len(won) == 1 and len(lost) == 1, results
    assert isinstance(lost[0], FailedPrecondition)
    active = await b.relay.get_active("chat-1")
    assert active is not None and active.stream_id == won[0].stream_id
    for side in (a, b):
        if won[0].stream_id in side.scripted.scripts:
            side.scripted.script(won[0].stream_id).put(None)


async def test_a_relay_whose_lease_lapsed_loses_its_stream_and_is_fenced(
    postgres_dsn: str, redis_url: str, redis_prefix: str
) -> None:
    """A stops renewing its lease (a long pause, a partition) while its producer runs on. B's
    Stop finds the owner's lease lapsed and ends the stream itself, with the client's partial
    message; when A comes back, its writes into the stream are refused and its own end loses to
    B's: every reader, on either relay, gets B's end."""
    async with (
        instance("relay-a", postgres_dsn, redis_url, redis_prefix, lease_s=0.5) as a,
        # B's own lease loop runs every 10 s: the Stop, not the loop, finds A's lease lapsed.
        instance("relay-b", postgres_dsn, redis_url, redis_prefix, lease_s=30) as b,
    ):
        started = await a.relay.start(StartRequest("chat-1", [user("hi")]))
        script = a.scripted.script(started.stream_id)
        script.put(*text_chunks(2))
        for task in a.relay._background:  # A is cut off: no lease renewal, no cancel signals
            if task.get_name() in ("lease", "cancels"):
                task.cancel()
        partial = UIMessage("msg-1", "assistant", [{"type": "text", "text": "w0 "}])

        result = await b.relay.stop("chat-1", partial=partial)

        assert result.outcome is StopOutcome.STOPPED and result.end is not None
        assert result.end.state is StreamState.STOPPED
        assert not script.cancelled.is_set()  # A never heard of the Stop
        script.put({"type": "text-delta", "id": "t", "delta": "late "})  # A writes on: fenced
        await asyncio.wait_for(script.cancelled.wait(), 10)
        end_on_a = await a.relay.streams[started.stream_id].wait_ended()
        assert end_on_a == result.end
        chunks, end = await collect((await b.relay.attach(stream_id=started.stream_id)).events)
        assert end == result.end and len(chunks) == result.end.final_offset
        assert (await b.relay.list_messages("chat-1"))[-1] == ended_as(partial)


async def test_a_dead_relays_live_stream_is_interrupted_by_the_survivor(
    postgres_dsn: str, redis_url: str, redis_prefix: str
) -> None:
    """Without a Stop, the survivor's lease loop ends a dead owner's stream, from its log."""
    async with (
        instance("relay-b", postgres_dsn, redis_url, redis_prefix, lease_s=0.3) as b,
        instance("relay-a", postgres_dsn, redis_url, redis_prefix, lease_s=0.3) as a,
    ):
        started = await a.relay.start(StartRequest("chat-1", [user("hi")]))
        a.scripted.script(started.stream_id).put(*text_chunks(3))
        reader = await b.relay.attach(stream_id=started.stream_id)
        first = await anext(reader.events)  # chunks reached the log
        for task in a.relay._background:  # A dies: no renewal, nothing more it writes
            task.cancel()
        a.relay._give_up.set()
        chunks, end = await asyncio.wait_for(collect(reader.events), 10)
        assert end.state is StreamState.INTERRUPTED
        assert end.final_offset == len(getattr(first, "chunks", [])) + len(chunks)
        stored = await b.relay.list_messages("chat-1")
        assert stored[-1].role == "assistant"
        # Ended elsewhere, from the log: closed, and saying why, as its owner would have.
        assert end.reason is EndReason.RELAY_LOST and stored[-1] == end.message
        assert b.relay.stats().ended_by_reason == {"relay_lost": 1}  # counted by who ended it
        assert stored[-1].parts[-1]["state"] == "done"
        assert stored[-1].metadata == {
            "streamEnd": {
                "state": "interrupted",
                "reason": "relay_lost",
                "error": "the relay stopped while the stream was live",
            }
        }
        a.scripted.script(started.stream_id).put(None)


@pytest.mark.parametrize(
    ("store", "log", "says"),
    [
        ("postgresql://postgres@127.0.0.1:{closed}/relay", "{redis}", "cannot open the store"),
        ("{dsn}", "redis://127.0.0.1:{closed}/0", "cannot open the store"),
        ("{dsn}", "memory", "needs a shared log: --log redis://"),
        ("", "{redis}", "needs --store postgresql://"),
        ("{dsn}", "nats://127.0.0.1:4222", "--log must be memory or a redis:// URL"),
    ],
)
async def test_a_relay_that_cannot_reach_or_combine_its_stores_exits_with_the_reason(
    postgres_dsn: str, redis_url: str, tmp_path: Path, store: str, log: str, says: str
) -> None:
    closed = free_port()  # nothing listens there
    fill = {"closed": closed, "redis": redis_url, "dsn": postgres_dsn}
    args = ["--store", store.format(**fill)] if store else ["--db", str(tmp_path / "db")]
    code, stderr = await run_to_exit(
        "-m",
        "relay.server",
        "--address",
        f"127.0.0.1:{free_port()}",
        *args,
        "--log",
        log.format(**fill),
        "--log-format",
        "text",
    )
    assert code == 1, stderr
    assert says in stderr
    assert "Traceback" not in stderr


class LoadThenWait(RedisStreamLog):
    """A log whose next `load` waits for `meanwhile` after reading: what another relay does in
    that moment, the reader's relay learns only from the chat store."""

    meanwhile: Callable[[], Awaitable[None]] | None = None

    async def load(self, stream_id: str) -> LoggedStream | None:
        logged = await super().load(stream_id)
        step, self.meanwhile = self.meanwhile, None
        if step is not None:
            await step()
        return logged


async def test_a_stream_that_ends_while_b_reads_its_log_is_read_whole_through_b(
    postgres_dsn: str, redis_url: str, redis_prefix: str
) -> None:
    """B reads the log of a live stream, then its record, and A ends the stream in between: B
    used to take the record's end with the chunks it had read before, and serve the stream
    without its tail, COMPLETED, to every later reader (found by the cluster benchmark)."""
    async with instance("relay-a", postgres_dsn, redis_url, redis_prefix) as a:
        log = LoadThenWait(redis_url, redis_prefix)
        b = Relay(
            PostgresChatStore(postgres_dsn),
            ProducerRegistry({"scripted": ScriptedProducer()}, "scripted"),
            log=log,
            instance_id="relay-b",
            journal_interval=0.001,
            sweep_interval=None,
        )
        await b.open()
        try:
            started = await a.relay.start(StartRequest("chat-1", [user("hi")]))
            script = a.scripted.script(started.stream_id)
            sent = text_chunks(8)
            script.put(*sent[:3])
            on_a = await a.relay.attach(stream_id=started.stream_id)
            assert len((await anext(on_a.events)).chunks) >= 1  # type: ignore[union-attr]

            async def finish_on_a() -> None:
                script.put(*sent[3:], None)
                await a.relay.streams[started.stream_id].wait_ended()

            log.meanwhile = finish_on_a
            chunks, end = await collect((await b.attach(stream_id=started.stream_id)).events)

            assert end.state is StreamState.COMPLETED and end.final_offset == len(sent)
            assert chunks == [dump_json(c) for c in sent]
        finally:
            await b.close(grace=0)


async def test_resuming_through_b_from_a_chunk_a_has_not_logged_yet_waits_for_it(
    postgres_dsn: str, redis_url: str, redis_prefix: str
) -> None:
    """A browser read chunk 3 from A and resumes through B before A's journal wrote it to the
    log: B must wait for it, not answer OUT_OF_RANGE (it did, within the journal window)."""
    async with (
        instance("relay-a", postgres_dsn, redis_url, redis_prefix, journal_s=3600) as a,
        instance("relay-b", postgres_dsn, redis_url, redis_prefix) as b,
    ):
        started = await a.relay.start(StartRequest("chat-1", [user("hi")]))
        script = a.scripted.script(started.stream_id)
        sent = text_chunks(5)
        script.put(*sent[:4])
        on_a = await a.relay.attach(stream_id=started.stream_id)
        assert len(await read_chunks(on_a.events, 4)) == 4  # the browser has seen 0-3

        resumed = await b.relay.attach(stream_id=started.stream_id, from_offset=4)
        script.put(*sent[4:], None)  # the end writes the journal's tail
        chunks, end = await collect(resumed.events)

        assert chunks == [dump_json(c) for c in sent[4:]]
        assert end.state is StreamState.COMPLETED and end.final_offset == len(sent)


async def test_a_relay_restarted_under_the_same_name_ends_its_earlier_runs_streams(
    postgres_dsn: str, redis_url: str, redis_prefix: str
) -> None:
    """With a fixed --instance-id, the earlier run's lease may still hold when the relay comes
    back: its live streams are orphans all the same (they stayed live, and a Stop looped)."""
    first = build("relay-a", postgres_dsn, redis_url, redis_prefix)
    await first.relay.open()
    started = await first.relay.start(StartRequest("chat-1", [user("hi")]))
    first.scripted.script(started.stream_id).put(*text_chunks(2))
    await read_chunks((await first.relay.attach(stream_id=started.stream_id)).events, 5)
    await first.relay._flush_journal()
    dying = [*first.relay._tasks, *first.relay._background]
    for task in dying:  # the process dies...
        task.cancel()
    # (each task's cancellation runs before the stores close: one still on a Redis call when
    # they closed could open a connection that nothing closes)
    await asyncio.gather(*dying, return_exceptions=True)
    await first.relay._close_stores()  # ...its lease left as it was

    async with instance("relay-a", postgres_dsn, redis_url, redis_prefix) as again:
        assert await again.relay.get_active("chat-1") is None  # ended at open: interrupted
        chunks, end = await collect((await again.relay.attach(stream_id=started.stream_id)).events)
        assert end.state is StreamState.INTERRUPTED and len(chunks) == end.final_offset == 5
        result = await asyncio.wait_for(again.relay.stop("chat-1"), 5)
        assert result.outcome is StopOutcome.NO_ACTIVE_STREAM


async def test_closing_a_relay_that_follows_another_ones_live_stream_does_not_wait_for_it(
    pair: tuple[Instance, Instance],
) -> None:
    a, b = pair
    started = await a.relay.start(StartRequest("chat-1", [user("hi")]))
    a.scripted.script(started.stream_id).put(*text_chunks(1))
    reader = await b.relay.attach(stream_id=started.stream_id)
    await read_chunks(reader.events, 4)

    await asyncio.wait_for(b.relay.close(grace=0), 5)  # A's answer is still live

    with pytest.raises(Unavailable):
        await collect(reader.events)
    assert a.relay.streams[started.stream_id].end is None
    a.scripted.script(started.stream_id).put(None)


class SilentFollower(RedisStreamLog):
    """A log whose followers hear nothing more (a follower that lost its connection)."""

    async def follow(
        self, stream_id: str, from_offset: int
    ) -> AsyncIterator[list[str] | StreamEnd]:
        await asyncio.Event().wait()
        yield []


async def test_a_stop_through_b_returns_when_b_no_longer_hears_the_stream(
    postgres_dsn: str, redis_url: str, redis_prefix: str
) -> None:
    """B's follower of A's stream hears nothing more while a Stop through B waits for the seal
    there: the Stop learns the end from the chat store instead of waiting forever."""
    async with (
        instance("relay-a", postgres_dsn, redis_url, redis_prefix) as a,
        instance("relay-b", postgres_dsn, redis_url, redis_prefix, log=SilentFollower) as b,
    ):
        started = await a.relay.start(StartRequest("chat-1", [user("hi")]))
        a.scripted.script(started.stream_id).put(*text_chunks(1))
        await read_chunks((await a.relay.attach(stream_id=started.stream_id)).events, 4)

        result = await asyncio.wait_for(b.relay.stop("chat-1"), 10)

        assert result.outcome is StopOutcome.STOPPED and result.end is not None
        assert result.end.state is StreamState.STOPPED
        assert a.scripted.script(started.stream_id).cancelled.is_set()


async def test_a_log_that_lost_writes_gets_them_again_from_the_owner(
    pair: tuple[Instance, Instance], redis_url: str, redis_prefix: str
) -> None:
    """Redis came back from an AOF written every second: the log of a live stream lacks its last
    chunks. The owner still holds them: it writes them again, and the stream ends whole (its
    journal and its end were refused forever)."""
    a, b = pair
    started = await a.relay.start(StartRequest("chat-1", [user("hi")]))
    script = a.scripted.script(started.stream_id)
    sent = text_chunks(6)
    script.put(*sent[:5])
    stream = a.relay.streams[started.stream_id]
    await eventually(lambda: stream.journaled == 5)
    key = f"{redis_prefix}stream:{started.stream_id}"
    with redis.Redis.from_url(redis_url) as client:  # offsets 3 and 4 are lost, as on a replay
        kept = client.xrange(key, "-", "0-4")  # of an AOF that missed its last second
        client.delete(key)
        for entry_id, fields in kept:
            client.xadd(key, fields, id=entry_id)

    script.put(*sent[5:], None)
    end = await asyncio.wait_for(stream.wait_ended(), 10)

    assert end.state is StreamState.COMPLETED and end.final_offset == len(sent)
    chunks, through_b = await collect((await b.relay.attach(stream_id=started.stream_id)).events)
    assert chunks == [dump_json(c) for c in sent] and through_b == end


async def test_readers_elsewhere_get_the_end_of_an_owner_that_died_before_sealing(
    postgres_dsn: str, redis_url: str, redis_prefix: str
) -> None:
    """A recorded its stream's end in PostgreSQL and died before sealing the Redis log: B's
    follower finds the end in the record (it waited until the retention passed)."""
    async with (
        instance("relay-a", postgres_dsn, redis_url, redis_prefix) as a,
        instance("relay-b", postgres_dsn, redis_url, redis_prefix, lease_s=0.2) as b,
    ):
        started = await a.relay.start(StartRequest("chat-1", [user("hi")]))
        script = a.scripted.script(started.stream_id)
        script.put(*text_chunks(1))
        reader = await b.relay.attach(stream_id=started.stream_id)
        await read_chunks(reader.events, 4)
        sealed, revived = asyncio.Event(), asyncio.Event()
        seal = a.relay.log.seal

        async def no_seal(stream_id: str, end: StreamEnd, retention_s: float) -> StreamEnd:
            sealed.set()  # A dies here: its end is recorded, its log not sealed
            await revived.wait()
            return await seal(stream_id, end, retention_s)

        a.relay.log.seal = no_seal  # type: ignore[method-assign]
        script.put(None)
        await sealed.wait()

        try:
            rest, end = await asyncio.wait_for(collect(reader.events), 10)
        finally:
            revived.set()  # (so that A can close)

        assert end.state is StreamState.COMPLETED and end.final_offset == 4 and rest == []


# -- a Stop and the Start it names, on two relays ------------------------------------------------

T = TypeVar("T")
STOPPED_FIRST = StreamEnd(StreamState.STOPPED, 0, "", None, EndReason.STOPPED_BEFORE_START)


@dataclass
class Hold:
    reached: asyncio.Event = field(default_factory=asyncio.Event)  # its work is done
    go: asyncio.Event = field(default_factory=asyncio.Event)  # set: it commits


class PausingPostgres(PostgresChatStore):
    """`hold("begin_stream")` holds the next begin_stream inside its transaction, its work done
    and its locks held, until the test sets `go`: the moment another relay's transaction on the
    same chat could slip past it if nothing ordered the two."""

    def __init__(self, dsn: str) -> None:
        super().__init__(dsn)
        self.holds: dict[str, Hold] = {}

    def hold(self, operation: str) -> Hold:
        hold = self.holds[operation] = Hold()
        return hold

    async def _transaction(self, operation: str, work: Work[T]) -> T:
        hold = self.holds.pop(operation, None)
        if hold is None:
            return await super()._transaction(operation, work)

        async def held(db: Any) -> T:
            result = await work(db)
            hold.reached.set()
            await hold.go.wait()
            return result

        return await super()._transaction(operation, held)


async def until_it_waits_for_a_lock_or_ends(dsn: str, call: asyncio.Future[Any]) -> None:
    """Until `call` waits for a lock in PostgreSQL (it tells nobody: we ask), or it has ended
    (it did not wait: what the test then asserts of its result shows what went wrong)."""

    async def a_backend_waits() -> None:
        connection = await asyncpg.connect(dsn)
        try:
            while not await connection.fetchval(  # noqa: ASYNC110
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND datname = current_database()"
            ):
                await asyncio.sleep(0.01)
        finally:
            await connection.close()

    waiting = asyncio.ensure_future(a_backend_waits())
    try:
        await asyncio.wait([waiting, call], timeout=10, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
        await asyncio.wait([waiting])
    assert waiting.done() or call.done(), "neither waited for a lock nor ended"


async def test_a_stop_on_b_before_the_start_on_a_ends_the_answer_as_it_starts(
    pair: tuple[Instance, Instance],
) -> None:
    a, b = pair
    for chat_id, request_id, message_id in (("chat-1", "r1", ""), ("chat-2", "", "u1")):
        stopped = await b.relay.stop(chat_id, request_id=request_id, message_id=message_id)
        assert stopped.outcome is StopOutcome.STOPPED_BEFORE_START

        started = await a.relay.start(StartRequest(chat_id, [user("hi")], request_id="r1"))

        assert started.stopped_before_start and started.stream_id not in a.scripted.scripts
        for relay in (b.relay, a.relay):  # a reader anywhere gets the end at once
            chunks, end = await collect((await relay.attach(stream_id=started.stream_id)).events)
            assert (chunks, end) == ([], STOPPED_FIRST)
        assert await b.relay.get_active(chat_id) is None and a.relay.live == 0
        again = await b.relay.stop(chat_id, request_id=request_id, message_id=message_id)
        assert again.outcome is StopOutcome.ALREADY_ENDED and again.end == STOPPED_FIRST


async def test_a_stop_on_b_while_the_start_on_a_commits_stops_the_started_answer(
    postgres_dsn: str, redis_url: str, redis_prefix: str
) -> None:
    """Start first: A's begin_stream has recorded the stream, not committed, when B's Stop
    comes. B's check waits for it (the chat's lock), then finds the stream and stops it.
    Without that order, B would find no stream, plant a tombstone nobody consumes and answer
    STOPPED_BEFORE_START while the answer ran on."""
    async with (
        instance("relay-a", postgres_dsn, redis_url, redis_prefix, store=PausingPostgres) as a,
        instance("relay-b", postgres_dsn, redis_url, redis_prefix) as b,
    ):
        assert isinstance(a.relay.store, PausingPostgres)
        hold = a.relay.store.hold("begin_stream")
        starting = asyncio.ensure_future(
            a.relay.start(StartRequest("chat-1", [user("hi")], request_id="r1"))
        )
        try:
            await hold.reached.wait()
            stopping = asyncio.ensure_future(b.relay.stop("chat-1", request_id="r1"))
            await until_it_waits_for_a_lock_or_ends(postgres_dsn, stopping)
        finally:
            hold.go.set()

        started = await starting
        stopped = await stopping

        assert not started.stopped_before_start
        assert stopped.outcome is StopOutcome.STOPPED and stopped.stream_id == started.stream_id
        assert stopped.end is not None and stopped.end.reason is EndReason.STOP
        ended_on_a = await a.relay.streams[started.stream_id].wait_ended()
        assert ended_on_a == stopped.end and a.relay.live == 0
        assert await a.relay.store.delete_stop_tombstones(1e12) == 0  # none was planted


async def test_a_start_on_a_while_the_stop_on_b_commits_ends_as_it_starts(
    postgres_dsn: str, redis_url: str, redis_prefix: str
) -> None:
    """Stop first: B's tombstone is written, not committed, when A's Start comes. A's
    begin_stream waits for it (the chat's lock), then consumes it. Without that order, A would
    not see the tombstone and its answer would run although B answered STOPPED_BEFORE_START."""
    async with (
        instance("relay-a", postgres_dsn, redis_url, redis_prefix) as a,
        instance("relay-b", postgres_dsn, redis_url, redis_prefix, store=PausingPostgres) as b,
    ):
        assert isinstance(b.relay.store, PausingPostgres)
        hold = b.relay.store.hold("stop_before_start")
        stopping = asyncio.ensure_future(b.relay.stop("chat-1", request_id="r1"))
        try:
            await hold.reached.wait()
            starting = asyncio.ensure_future(
                a.relay.start(StartRequest("chat-1", [user("hi")], request_id="r1"))
            )
            await until_it_waits_for_a_lock_or_ends(postgres_dsn, starting)
        finally:
            hold.go.set()

        stopped = await stopping
        started = await starting

        assert stopped.outcome is StopOutcome.STOPPED_BEFORE_START
        assert started.stopped_before_start and started.stream_id not in a.scripted.scripts
        chunks, end = await collect((await b.relay.attach(stream_id=started.stream_id)).events)
        assert (chunks, end) == ([], STOPPED_FIRST)
        assert await b.relay.list_messages("chat-1") == [user("hi")]


async def test_a_stop_on_another_relay_after_a_policy_end_reports_that_end_not_a_stop(
    postgres_dsn: str, redis_url: str, redis_prefix: str
) -> None:
    """A's policy claimed the stream (no reader there) and its producer is winding down when a
    Stop for it reaches B: B gets the policy's end and says ALREADY_ENDED, as A would, not
    STOPPED (the gateway would tell the user their Stop did it)."""
    released = asyncio.Event()

    class Lingering:
        def check_options(self, options: Mapping[str, str]) -> None:
            pass

        async def generate(self, request: ProduceRequest) -> AsyncGenerator[JsonObject, None]:
            for chunk in text_chunks(1):
                yield chunk
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                await released.wait()  # winds down only when the test says
                raise

    clock = FakeClock()

    def relay(name: str, **policy: Any) -> Relay:
        return Relay(
            PostgresChatStore(postgres_dsn),
            ProducerRegistry({"lingering": Lingering()}, "lingering"),
            log=RedisStreamLog(redis_url, redis_prefix),
            instance_id=name,
            journal_interval=0.001,
            sweep_interval=None,
            policy_interval=None,
            clock=clock,
            **policy,
        )

    a, b = relay("relay-a", no_reader_grace_s=10.0), relay("relay-b")
    await a.open()
    await b.open()
    try:
        stream_id = (await a.start(StartRequest("chat-1", [user("hi")]))).stream_id
        reader = await b.attach(stream_id=stream_id)  # read on B only: none on A
        await read_chunks(reader.events, 4)
        clock.now += 11
        assert a.police() == [stream_id]
        stopping = asyncio.create_task(b.stop("chat-1", stream_id))
        await asyncio.sleep(0)
        released.set()
        result = await stopping
        assert result.end is not None and result.end.reason is EndReason.NO_READER
        assert result.outcome is StopOutcome.ALREADY_ENDED
    finally:
        await a.close(grace=0)
        await b.close(grace=0)
