"""The stream policy (issue 12, item 5): no-reader grace, max duration, max chunks and per-Start
retention, each with a fake clock. Nothing here waits for time to pass: the test moves the clock
and asks the relay to police its streams (`Relay.police`, what the policy loop does every
`policy_interval`) or to sweep, then waits on events (the producer's cancellation, the end).

A policy end is STOPPED, claimed and cancelled as a Stop is, and counted by its reason in the
relay's stats; every store keeps the reason, so a reader's end says it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio

from gateway.app import GatewaySettings, create_app
from gateway.server import parse_args, settings_of
from relay.client import errors as client_errors
from relay.domain.core import Relay
from relay.domain.errors import InvalidArgument, NotFound
from relay.domain.model import (
    EndReason,
    StartRequest,
    StopOutcome,
    StreamEnd,
    StreamPolicy,
    StreamState,
    dump_json,
)
from relay.domain.ports import ChatStore, StreamLog
from relay.producers import ProducerRegistry
from relay.server import parse_config
from relay.stores.postgres import PostgresChatStore
from relay.stores.redis_log import RedisStreamLog
from relay.stores.sqlite import SqliteStore
from tests.conftest import (
    Env,
    FakeClock,
    ScriptedProducer,
    cluster_stores,
    collect,
    eventually,
    read_chunks,
    text_chunks,
    user,
)
from tests.test_gateway import JSON_TYPE, serve

MODES = ["embedded", "cluster"]


@dataclass
class Policed:
    relay: Relay
    scripted: ScriptedProducer
    clock: FakeClock
    mode: str

    async def start(self, chat_id: str, policy: StreamPolicy | None = None) -> str:
        request = StartRequest(chat_id, [user("hi")], policy=policy or StreamPolicy())
        return (await self.relay.start(request)).stream_id

    async def feed(self, stream_id: str, *chunks: dict[str, Any]) -> None:
        """Gives the producer chunks and waits until the relay holds them."""
        stream = self.relay.streams[stream_id]
        expected = len(stream.chunks) + len(chunks)
        self.scripted.script(stream_id).put(*chunks)
        await eventually(lambda: len(stream.chunks) == expected)

    def seen(self, end: StreamEnd, reason: EndReason) -> bool:
        """Whether a reader's end carries `reason`."""
        return end.reason is reason


Opener = Callable[..., contextlib.AbstractAsyncContextManager[Policed]]


@pytest.fixture(params=MODES)
def opened(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> Opener:
    """Opens a relay (scripted producer, the fake clock, no policy loop, no sweeper) on SQLite
    or on PostgreSQL + Redis; each call reopens the same database."""
    mode = str(request.param)

    @contextlib.asynccontextmanager
    async def open_relay(**options: Any) -> AsyncIterator[Policed]:
        log: StreamLog | None = None
        store: ChatStore
        if mode == "cluster":
            store, log = cluster_stores(request)
        else:
            store = SqliteStore(tmp_path / "relay.db")
        scripted = ScriptedProducer()
        relay = Relay(
            store,
            ProducerRegistry({"scripted": scripted}, "scripted"),
            log=log,
            journal_interval=0.001,
            sweep_interval=None,
            retry_backoff=(0.001, 0.05),
            clock=clock,
            **{"policy_interval": None, **options},
        )
        await relay.open()
        try:
            yield Policed(relay, scripted, clock, mode)
        finally:
            await relay.close(grace=0)

    return open_relay


# -- no reader ---------------------------------------------------------------------------------


async def test_no_reader_grace_stops_a_stream_nobody_reads(opened: Opener) -> None:
    async with opened(no_reader_grace_s=30.0) as p:
        stream_id = await p.start("chat-1")
        await p.feed(stream_id, *text_chunks(2))
        script = p.scripted.script(stream_id)

        p.clock.now += 29.999
        assert p.relay.police() == []  # within the grace (it began at the start: no reader yet)
        p.clock.now += 0.001
        assert p.relay.police() == [stream_id]

        await asyncio.wait_for(script.cancelled.wait(), 10)  # the producer saw a cancellation
        end = await p.relay.streams[stream_id].wait_ended()
        assert end.state is StreamState.STOPPED and end.final_offset == 5
        assert p.seen(end, EndReason.NO_READER)
        # Persisted as a Stop's would be: the partial answer, the active stream cleared.
        answer = (await p.relay.list_messages("chat-1"))[-1]
        assert answer.role == "assistant" and answer.parts[-1]["text"] == "w0 w1 "
        assert await p.relay.get_active("chat-1") is None
        # A reader arriving later gets the same end.
        assert await collect((await p.relay.attach(stream_id=stream_id)).events) == (
            p.relay.streams[stream_id].chunks,
            end,
        )
        assert p.relay.stats().ended_by_reason == {"no_reader": 1}
        assert p.relay.police() == []  # once


async def test_a_stream_that_is_read_is_not_stopped_however_long(opened: Opener) -> None:
    async with opened(no_reader_grace_s=30.0) as p:
        stream_id = await p.start("chat-1")
        await p.feed(stream_id, *text_chunks(1))
        reader = await p.relay.attach(stream_id=stream_id)
        assert len(await read_chunks(reader.events, 4)) == 4  # reading: counted

        p.clock.now += 3600
        assert p.relay.police() == []

        p.scripted.script(stream_id).put(None)
        chunks, end = await collect(reader.events)
        assert end.state is StreamState.COMPLETED and end.final_offset == 4 and chunks == []
        assert p.relay.stats().ended_by_reason == {"finished": 1}


async def test_a_reader_arriving_within_the_grace_resets_it(opened: Opener) -> None:
    async with opened(no_reader_grace_s=30.0) as p:
        stream_id = await p.start("chat-1")
        await p.feed(stream_id, *text_chunks(1))
        stream = p.relay.streams[stream_id]
        start = p.clock.now

        # An Attach from +20 to +25: the grace begins again when it leaves.
        p.clock.now = start + 20
        reader = await p.relay.attach(stream_id=stream_id)
        await anext(reader.events)
        assert stream.readers == 1
        p.clock.now = start + 25
        await reader.events.aclose()
        assert stream.readers == 0
        p.clock.now = start + 54.999
        assert p.relay.police() == []

        # An AttachMany subscription from +54.999 to +60: the same.
        many = p.relay.multiplexer()
        await many.subscribe(1, stream_id=stream_id)
        assert stream.readers == 1
        p.clock.now = start + 80
        assert p.relay.police() == []  # read: no grace runs
        p.clock.now = start + 60 + 1000
        many.unsubscribe(1)  # leaves at +1060
        assert p.relay.police() == []
        p.clock.now += 29.999
        assert p.relay.police() == []
        p.clock.now += 0.001
        assert p.relay.police() == [stream_id]
        end = await stream.wait_ended()
        assert end.state is StreamState.STOPPED and p.seen(end, EndReason.NO_READER)


# -- budgets ------------------------------------------------------------------------------------


async def test_max_duration_stops_the_producer_even_while_it_is_read(opened: Opener) -> None:
    async with opened() as p:
        stream_id = await p.start("chat-1", StreamPolicy(max_duration_s=60.0))
        await p.feed(stream_id, *text_chunks(3))
        reader = await p.relay.attach(stream_id=stream_id)

        p.clock.now += 59.999
        assert p.relay.police() == []
        p.clock.now += 0.001
        assert p.relay.police() == [stream_id]

        chunks, end = await collect(reader.events)
        assert end.state is StreamState.STOPPED and end.final_offset == len(chunks) == 6
        assert p.seen(end, EndReason.MAX_DURATION)
        assert p.scripted.script(stream_id).cancelled.is_set()
        assert p.relay.stats().ended_by_reason == {"max_duration": 1}


async def test_max_chunks_keeps_exactly_the_budget(opened: Opener) -> None:
    async with opened() as p:
        # The producer yields past the budget at once (no await between its chunks): the
        # chunk that reaches it is the last one kept, the next ends the stream and is dropped.
        eager = await p.start("chat-1", StreamPolicy(max_chunks=5))
        sent = text_chunks(6)
        p.scripted.script(eager).put(*sent, None)
        chunks, end = await collect((await p.relay.attach(stream_id=eager)).events)
        assert end.state is StreamState.STOPPED and end.final_offset == 5
        assert chunks == [dump_json(chunk) for chunk in sent[:5]]
        assert p.seen(end, EndReason.MAX_CHUNKS)
        answer = (await p.relay.list_messages("chat-1"))[-1]
        assert answer.parts[-1]["text"] == "w0 w1 "

        # A producer that waits after the chunk that reaches the budget is cancelled at its
        # next chunk, which is dropped.
        waiting = await p.start("chat-2", StreamPolicy(max_chunks=4))
        script = p.scripted.script(waiting)
        script.put(*text_chunks(1))
        await eventually(lambda: len(p.relay.streams[waiting].chunks) == 4)
        assert not script.cancelled.is_set()
        script.put({"type": "text-end", "id": "t"})
        await asyncio.wait_for(script.cancelled.wait(), 10)
        end = await p.relay.streams[waiting].wait_ended()
        assert end.state is StreamState.STOPPED and end.final_offset == 4
        assert p.relay.stats().ended_by_reason == {"max_chunks": 2}

        # An answer whose last chunk reaches the budget exactly completes, as it would have.
        exact = await p.start("chat-3", StreamPolicy(max_chunks=5))
        p.scripted.script(exact).put(*text_chunks(2), None)
        end = await p.relay.streams[exact].wait_ended()
        assert (end.state, end.final_offset) == (StreamState.COMPLETED, 5)


async def test_relay_defaults_are_upper_bounds_a_start_can_only_tighten(opened: Opener) -> None:
    async with opened(max_duration_s=100.0, max_chunks=50) as p:
        policy = p.relay._stream_policy
        assert policy(StreamPolicy()) == StreamPolicy(None, 100.0, 50, None)
        assert policy(StreamPolicy(max_duration_s=500, max_chunks=10)) == StreamPolicy(
            None, 100.0, 10, None
        )
        assert policy(StreamPolicy(no_reader_grace_s=5, max_duration_s=20)) == StreamPolicy(
            5.0, 20.0, 50, None
        )

        looser = await p.start("chat-1", StreamPolicy(max_duration_s=500.0))
        await p.feed(looser, *text_chunks(1))
        tighter = await p.start("chat-2", StreamPolicy(max_duration_s=20.0))
        await p.feed(tighter, *text_chunks(1))
        p.clock.now += 20
        assert p.relay.police() == [tighter]
        p.clock.now += 80
        assert p.relay.police() == [looser]  # at the relay's 100 s, not the 500 asked for
        for stream_id in (looser, tighter):
            end = await p.relay.streams[stream_id].wait_ended()
            assert end.state is StreamState.STOPPED and end.final_offset == 4


async def test_only_the_owner_polices_a_stream(
    postgres_dsn: str, redis_url: str, redis_prefix: str
) -> None:
    """A relay serving readers of another relay's stream (its mirror) never ends it."""
    clock = FakeClock()
    owner_scripted = ScriptedProducer()

    def relay(name: str, scripted: ScriptedProducer, **options: Any) -> Relay:
        return Relay(
            PostgresChatStore(postgres_dsn),
            ProducerRegistry({"scripted": scripted}, "scripted"),
            log=RedisStreamLog(redis_url, redis_prefix),
            instance_id=name,
            journal_interval=0.001,
            sweep_interval=None,
            policy_interval=None,
            clock=clock,
            **options,
        )

    a = relay("relay-a", owner_scripted)
    b = relay("relay-b", ScriptedProducer(), no_reader_grace_s=1.0, max_duration_s=1.0)
    await a.open()
    await b.open()
    try:
        started = await a.start(StartRequest("chat-1", [user("hi")]))
        owner_scripted.script(started.stream_id).put(*text_chunks(1))
        reader = await b.attach(stream_id=started.stream_id)  # b follows a's log
        assert len(await read_chunks(reader.events, 4)) == 4
        await reader.events.aclose()
        clock.now += 3600
        assert b.police() == [] and a.police() == []
        owner_scripted.script(started.stream_id).put(None)
        end = await a.streams[started.stream_id].wait_ended()
        assert end.state is StreamState.COMPLETED
    finally:
        await b.close(grace=0)
        await a.close(grace=0)


# -- one winner ------------------------------------------------------------------------------


async def test_a_stop_racing_a_policy_end_has_one_winner(opened: Opener) -> None:
    async with opened(max_duration_s=10.0) as p:
        # The policy claims first: the Stop finds the stream ended by it.
        first = await p.start("chat-1")
        await p.feed(first, *text_chunks(1))
        p.clock.now += 10
        assert p.relay.police() == [first]
        stop = await p.relay.stop("chat-1", first)
        assert stop.outcome is StopOutcome.ALREADY_ENDED and stop.end is not None
        assert stop.end.state is StreamState.STOPPED and stop.end.final_offset == 4
        assert p.seen(stop.end, EndReason.MAX_DURATION)

        # The Stop claims first (its producer is cancelled by then): the policy finds nothing.
        second = await p.start("chat-2")
        await p.feed(second, *text_chunks(2))
        stopping = asyncio.create_task(p.relay.stop("chat-2", second))
        await asyncio.wait_for(p.scripted.script(second).cancelled.wait(), 10)
        p.clock.now += 10
        assert p.relay.police() == []
        stop = await stopping
        assert stop.outcome is StopOutcome.STOPPED and stop.end is not None
        assert stop.end.final_offset == 5 and p.seen(stop.end, EndReason.STOP)

        assert p.relay.stats().ended_by_reason == {"max_duration": 1, "stop": 1}


# -- per-Start retention -----------------------------------------------------------------------


async def test_a_start_keeps_its_stream_for_its_own_retention(
    opened: Opener, request: pytest.FixtureRequest
) -> None:
    async with opened(retention=600.0) as p:
        short = await p.start("chat-short", StreamPolicy(retention_s=60.0))
        usual = await p.start("chat-usual")
        long = await p.start("chat-long", StreamPolicy(retention_s=1200.0))
        for stream_id in (short, usual, long):  # all end at the same moment
            p.scripted.script(stream_id).put(*text_chunks(1), None)
            await p.relay.streams[stream_id].wait_ended()
        ended_at = p.clock.now

        if p.mode == "cluster":  # the Redis log expires with the stream's own retention too
            url = request.getfixturevalue("redis_url")
            prefix = request.getfixturevalue("redis_prefix")
            client = redis.asyncio.from_url(url)
            try:
                ttl = {s: await client.pttl(f"{prefix}stream:{s}") for s in (short, usual, long)}
            finally:
                await client.aclose()
            assert 0 < ttl[short] <= 60_000 < ttl[usual] <= 600_000 < ttl[long] <= 1_200_000

        async def swept_at(offset: float) -> list[str]:
            p.clock.now = ended_at + offset
            return await p.relay.sweep()

        assert await swept_at(60.0) == []
        assert await swept_at(60.001) == [short]
        assert await swept_at(600.0) == []
        assert await swept_at(600.001) == [usual]
        assert await swept_at(1200.0) == []
        assert await swept_at(1200.001) == [long]
        for stream_id in (short, usual, long):
            assert stream_id not in p.relay.streams
            with pytest.raises(NotFound):
                await p.relay.attach(stream_id=stream_id)
            assert await p.relay.log.load(stream_id) is None


async def test_a_stream_s_own_retention_survives_a_restart(opened: Opener) -> None:
    async with opened(retention=600.0) as p:
        short = await p.start("chat-short", StreamPolicy(retention_s=60.0))
        long = await p.start("chat-long", StreamPolicy(retention_s=1200.0))
        for stream_id in (short, long):
            p.scripted.script(stream_id).put(*text_chunks(1), None)
            await p.relay.streams[stream_id].wait_ended()
        ended_at = p.clock.now

    async with opened(retention=600.0) as p:
        # Known only to the store now: read back (the relay keeps it in memory again), then swept.
        reread = await p.relay.attach(stream_id=long)
        assert (await collect(reread.events))[1].final_offset == 4
        p.clock.now = ended_at + 60.001
        assert await p.relay.sweep() == [short]
        p.clock.now = ended_at + 600.001
        assert await p.relay.sweep() == []
        # Past the relay's retention it leaves memory (a long retention pins none) but stays
        # in the store, read back when asked for.
        assert long not in p.relay.streams
        again = await p.relay.attach(stream_id=long)
        assert (await collect(again.events))[1].final_offset == 4
        p.clock.now = ended_at + 1200.001
        assert await p.relay.sweep() == [long]
        assert long not in p.relay.streams
        with pytest.raises(NotFound):
            await p.relay.attach(stream_id=long)


# -- refused policies --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        (StreamPolicy(no_reader_grace_s=-1.0), "policy.no_reader_grace_s"),
        (StreamPolicy(max_duration_s=math.nan), "policy.max_duration_s"),
        (StreamPolicy(max_duration_s=math.inf), "policy.max_duration_s"),
        (StreamPolicy(retention_s=-0.5), "policy.retention_s"),
        (StreamPolicy(retention_s=86_400.5), "policy.retention_s"),
    ],
)
async def test_a_bad_policy_is_refused_naming_its_field(
    env: Env, policy: StreamPolicy, field: str
) -> None:
    with pytest.raises(client_errors.InvalidArgument) as caught:
        await env.client.start("chat-1", [user("hi")], policy=policy)
    assert field in caught.value.message
    assert await env.client.list_messages("chat-1") == []  # nothing saved
    assert env.relay.live == 0


async def test_a_negative_chunk_budget_is_refused(env: Env) -> None:
    # The wire's max_chunks is unsigned: only an in-process caller can send one.
    with pytest.raises(InvalidArgument, match=r"policy\.max_chunks"):
        await env.relay.start(
            StartRequest("chat-1", [user("hi")], policy=StreamPolicy(max_chunks=-1))
        )


def test_relay_flags_set_the_defaults_and_refuse_bad_values(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert parse_config([], {}).orphan_no_reader_grace_s == 0.0  # off by default
    config = parse_config(
        ["--orphan-max-chunks", "500"],
        {
            "RELAY_ORPHAN_NO_READER_GRACE_S": "120",
            "RELAY_ORPHAN_MAX_DURATION_S": "900",
            "RELAY_ORPHAN_MAX_CHUNKS": "9",
            "RELAY_RETENTION_MAX_S": "3600",
        },
    )
    assert (
        config.orphan_no_reader_grace_s,
        config.orphan_max_duration_s,
        config.orphan_max_chunks,
        config.retention_max_s,
    ) == (120.0, 900.0, 500, 3600.0)
    for bad in (["--orphan-max-duration-s", "-1"], ["--orphan-no-reader-grace-s", "nan"]):
        with pytest.raises(SystemExit):
            parse_config(bad, {})
        assert bad[0] in capsys.readouterr().err


def test_gateway_flags_set_the_policy_of_its_starts() -> None:
    assert settings_of(parse_args([])).stream_policy is None
    args = parse_args(["--stream-max-duration-s", "300", "--stream-retention-s", "3600"])
    assert settings_of(args).stream_policy == StreamPolicy(None, 300.0, None, 3600.0)
    with pytest.raises(Exception, match="--stream-max-chunks"):
        settings_of(parse_args(["--stream-max-chunks", "0"]))


# -- the loop, the wire and the metrics --------------------------------------------------------


async def test_the_policy_loop_polices_at_each_pause(opened: Opener) -> None:
    pauses: asyncio.Queue[float] = asyncio.Queue()
    resume = asyncio.Event()

    async def pause(seconds: float) -> None:
        pauses.put_nowait(seconds)
        await resume.wait()
        resume.clear()

    async with opened(policy_interval=1.0, policy_sleep=pause) as p:
        assert await asyncio.wait_for(pauses.get(), 10) == 1.0
        stream_id = await p.start("chat-1", StreamPolicy(max_duration_s=5.0))
        await p.feed(stream_id, *text_chunks(1))
        resume.set()  # a check before the budget is spent: nothing
        assert await asyncio.wait_for(pauses.get(), 10) == 1.0
        assert p.relay.streams[stream_id].end is None
        p.clock.now += 5
        resume.set()
        end = await asyncio.wait_for(p.relay.streams[stream_id].wait_ended(), 10)
        assert end.state is StreamState.STOPPED and p.relay.stats().ended_by_reason == {
            "max_duration": 1
        }


async def test_policy_ends_over_the_wire_are_counted_in_get_stats(env: Env) -> None:
    budget = await env.client.start(
        "chat-1", [user("hi")], producer="scripted", policy=StreamPolicy(max_chunks=2)
    )
    env.scripted.script(budget.stream_id).put(*text_chunks(3))
    chunks, end = await collect(env.client.attach(stream_id=budget.stream_id))
    assert end.state is StreamState.STOPPED and end.final_offset == len(chunks) == 2

    unread = await env.client.start(
        "chat-2", [user("hi")], producer="scripted", policy=StreamPolicy(no_reader_grace_s=5.0)
    )
    env.clock.now += 5
    assert env.relay.police() == [unread.stream_id]
    chunks, end = await collect(env.client.attach(stream_id=unread.stream_id))
    assert end.state is StreamState.STOPPED and end.final_offset == 0

    stats = await env.client.get_stats()
    assert stats.ended_by_reason == {"max_chunks": 1, "no_reader": 1}


async def test_the_gateway_sets_its_policy_on_every_start(env: Env) -> None:
    settings = GatewaySettings(relay_target=env.target, stream_policy=StreamPolicy(max_chunks=3))
    server, task, url = await serve(create_app(settings))
    body = {
        "id": "chat-1",
        "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}],
        "trigger": "submit-message",
        # A browser's policy is not a field the gateway reads: it changes nothing.
        "policy": {"max_chunks": 1000000, "retention_s": 86400},
    }
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            answer = await http.post(url + "/api/chat", json=body, headers=JSON_TYPE)
            metrics = (await http.get(url + "/metrics")).text
    finally:
        server.should_exit = True
        await task
    assert answer.status_code == 200
    (stream,) = env.relay.streams.values()
    assert stream.end is not None and stream.end.state is StreamState.STOPPED
    assert stream.end.final_offset == 3 and stream.retention is None
    assert 'stream_relay_streams_ended_total{reason="max_chunks"} 1.0' in metrics.splitlines()
