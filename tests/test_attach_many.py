"""AttachMany: many readers on one call, each behaving as its own Attach."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Callable

import grpc
import pytest

from relay.client import ManyReadersEvent, ReaderRefused
from relay.domain.errors import AlreadyExists, NotFound, OutOfRange, ResourceExhausted
from relay.domain.model import Caller, ChunkBatch, StreamEnd, StreamState, dump_json
from relay.domain.multiplex import Multiplexer, ReaderEvent, Refused, Subscribed
from relay.domain.stream import Stream
from relay.v1 import relay_pb2 as pb
from tests.conftest import Env, eventually, text_chunks, user

# -- the Multiplexer alone: which events go together, in what order ---------------------------


@pytest.fixture(params=["embedded", "cluster"])
def relay_mode(request: pytest.FixtureRequest) -> str:
    """Every test here runs on SQLite and on PostgreSQL + Redis (conftest's `env`)."""
    return str(request.param)


def streams(*ids: str) -> dict[str, Stream]:
    return {stream_id: Stream(stream_id, "chat", 0.0) for stream_id in ids}


def multiplexer(
    known: dict[str, Stream], max_chars: int = 1 << 20, max_readers: int = 10
) -> Multiplexer:
    async def find(stream_id: str, chat_id: str, from_offset: int, caller: Caller) -> Stream:
        if stream_id not in known:
            raise NotFound(f"no stream {stream_id}")
        stream = known[stream_id]
        if from_offset > len(stream.chunks):
            raise OutOfRange("past the end")
        return stream

    return Multiplexer(find, max_batch=100, max_readers=max_readers, max_chars=max_chars)


async def next_batch(mux: Multiplexer) -> list[tuple[int, ReaderEvent]]:
    return await anext(aiter(mux.batches()))


async def test_news_of_many_streams_goes_out_in_one_batch() -> None:
    known = streams("a", "b", "c")
    mux = multiplexer(known)
    for tag, stream_id in enumerate("abc"):
        await mux.subscribe(tag, stream_id=stream_id)
    assert await next_batch(mux) == [
        (0, Subscribed("a")),
        (1, Subscribed("b")),
        (2, Subscribed("c")),
    ]
    assert [s.readers for s in known.values()] == [1, 1, 1]

    known["a"].append("a0", 2)
    known["c"].append("c0", 2)
    known["c"].append("c1", 2)
    assert await next_batch(mux) == [(0, ChunkBatch(0, ["a0"])), (2, ChunkBatch(0, ["c0", "c1"]))]

    end = StreamEnd(StreamState.COMPLETED, 1, "", None)
    known["b"].append("b0", 2)
    known["b"].finish(end, 1.0)
    assert await next_batch(mux) == [(1, ChunkBatch(0, ["b0"])), (1, end)]
    assert known["b"].readers == 0  # its end released the reader


async def test_refusals_and_a_tag_in_use_end_only_that_subscription() -> None:
    known = streams("a")
    known["a"].append("a0", 2)
    mux = multiplexer(known)
    await mux.subscribe(1, stream_id="a", from_offset=1)
    await mux.subscribe(1, stream_id="a")
    await mux.subscribe(2, stream_id="missing")
    await mux.subscribe(3, stream_id="a", from_offset=5)
    batch = await next_batch(mux)
    assert batch[0] == (1, Subscribed("a"))
    refusals = {tag: type(event.error) for tag, event in batch if isinstance(event, Refused)}
    assert refusals == {1: AlreadyExists, 2: NotFound, 3: OutOfRange}
    assert known["a"].readers == 1
    known["a"].append("a1", 2)
    assert await next_batch(mux) == [(1, ChunkBatch(1, ["a1"]))]


async def test_a_call_holds_at_most_its_limit_of_readers() -> None:
    known = streams("a")
    mux = multiplexer(known, max_readers=2)
    for tag in range(3):
        await mux.subscribe(tag, stream_id="a")
    batch = await next_batch(mux)
    assert batch[:2] == [(0, Subscribed("a")), (1, Subscribed("a"))]
    tag, refused = batch[2]
    assert tag == 2 and isinstance(refused, Refused)
    assert isinstance(refused.error, ResourceExhausted)
    mux.unsubscribe(0)  # a place is free again
    await mux.subscribe(3, stream_id="a")
    assert await next_batch(mux) == [(3, Subscribed("a"))]


async def test_a_full_batch_leaves_the_rest_for_the_next_one_in_order() -> None:
    known = streams("a", "b", "c")
    mux = multiplexer(known, max_chars=4)
    for tag, stream_id in enumerate("abc"):
        await mux.subscribe(tag, stream_id=stream_id)
    await next_batch(mux)
    for stream_id in "abc":
        known[stream_id].append(f"{stream_id}0", 2)
        known[stream_id].append(f"{stream_id}1", 2)
    assert await next_batch(mux) == [(0, ChunkBatch(0, ["a0", "a1"]))]
    assert await next_batch(mux) == [(1, ChunkBatch(0, ["b0", "b1"]))]
    assert await next_batch(mux) == [(2, ChunkBatch(0, ["c0", "c1"]))]


async def test_unsubscribe_and_close_release_every_reader() -> None:
    known = streams("a", "b")
    mux = multiplexer(known)
    await mux.subscribe(1, stream_id="a")
    await mux.subscribe(2, stream_id="b")
    await next_batch(mux)
    mux.unsubscribe(1)
    known["a"].append("a0", 2)
    known["b"].append("b0", 2)
    assert await next_batch(mux) == [(2, ChunkBatch(0, ["b0"]))]
    assert known["a"].readers == 0
    mux.close()
    assert known["b"].readers == 0
    known["b"].append("b1", 2)  # a closed multiplexer is no longer called back
    assert known["b"]._watchers == []


async def test_batches_end_when_subscriptions_are_done_and_every_reader_ended() -> None:
    known = streams("a")
    mux = multiplexer(known)
    await mux.subscribe(1, stream_id="a")
    mux.no_more_subscriptions()
    batches = mux.batches()
    assert await anext(batches) == [(1, Subscribed("a"))]
    end = StreamEnd(StreamState.COMPLETED, 0, "", None)
    known["a"].finish(end, 1.0)
    assert await anext(batches) == [(1, end)]
    with pytest.raises(StopAsyncIteration):
        await anext(batches)


# -- over gRPC ---------------------------------------------------------------------------------


async def gather(
    events: AsyncIterator[tuple[int, ManyReadersEvent]],
    into: dict[int, list[ManyReadersEvent]],
    done: Callable[[int, ManyReadersEvent], bool],
    tags: set[int],
) -> None:
    """Reads events into `into` until `done` held for each of `tags`."""
    pending = set(tags)
    while pending:
        tag, event = await anext(events)
        into[tag].append(event)
        if done(tag, event):
            pending.discard(tag)


def first_event(tag: int, event: ManyReadersEvent) -> bool:
    return True


def last_event(tag: int, event: ManyReadersEvent) -> bool:
    return isinstance(event, StreamEnd | ReaderRefused)


def chunks_of(events: list[ManyReadersEvent]) -> list[str]:
    return [c for e in events if isinstance(e, ChunkBatch) for c in e.chunks]


async def test_each_reader_gets_its_stream_in_order_then_its_end(env: Env) -> None:
    first = await env.client.start("chat-1", [user("one")], producer="scripted")
    second = await env.client.start("chat-2", [user("two")], producer="scripted")
    sent = {first.stream_id: text_chunks(5, "m1"), second.stream_id: text_chunks(7, "m2")}
    async with env.client.attach_many() as readers:
        readers.subscribe(1, stream_id=first.stream_id)
        readers.subscribe(2, chat_id="chat-2")
        readers.subscribe(3, stream_id="f" * 32)
        readers.subscribe(4, chat_id="chat-1", from_offset=0)
        events: dict[int, list[ManyReadersEvent]] = defaultdict(list)
        stream = aiter(readers)
        await gather(stream, events, first_event, {1, 2, 3, 4})
        for stream_id, chunks in sent.items():
            env.scripted.script(stream_id).put(*chunks, None)
        await gather(stream, events, last_event, {1, 2, 4})

    assert events[1][0] == Subscribed(first.stream_id)
    assert events[2][0] == Subscribed(second.stream_id)
    assert events[4][0] == Subscribed(first.stream_id)
    [refused] = events[3]
    assert isinstance(refused, ReaderRefused) and refused.code == "NOT_FOUND"
    expected_first = [dump_json(c) for c in sent[first.stream_id]]
    assert chunks_of(events[1]) == expected_first
    assert chunks_of(events[2]) == [dump_json(c) for c in sent[second.stream_id]]
    assert chunks_of(events[4]) == expected_first
    for tag, count in ((1, 8), (2, 10), (4, 8)):
        end = events[tag][-1]
        assert isinstance(end, StreamEnd) and end.final_offset == count
        assert end.state is StreamState.COMPLETED


async def test_cancelling_the_call_ends_its_readers_and_no_producer(env: Env) -> None:
    started = [
        await env.client.start(f"chat-{i}", [user("hi")], producer="scripted") for i in range(3)
    ]
    readers = env.client.attach_many()
    for tag, s in enumerate(started):
        readers.subscribe(tag, stream_id=s.stream_id)
    seen: set[int] = set()
    async for tag, event in readers:
        assert isinstance(event, Subscribed)
        seen.add(tag)
        if len(seen) == 3:
            break
    streams = [env.relay.streams[s.stream_id] for s in started]
    assert [s.readers for s in streams] == [1, 1, 1]

    readers.cancel()  # the gateway went away: every reader on the call goes, nothing else
    await eventually(lambda: all(s.readers == 0 for s in streams))
    for s in started:
        script = env.scripted.script(s.stream_id)
        assert not script.cancelled.is_set()
        script.put(*text_chunks(2), None)
    for stream in streams:
        end = await asyncio.wait_for(stream.wait_ended(), 10)
        assert end.state is StreamState.COMPLETED


async def test_unsubscribe_stops_one_reader_and_the_call_ends_after_the_last_end(
    env: Env,
) -> None:
    a = await env.client.start("chat-a", [user("a")], producer="scripted")
    b = await env.client.start("chat-b", [user("b")], producer="scripted")
    stream_a = env.relay.streams[a.stream_id]
    async with env.client.attach_many() as readers:
        readers.subscribe(1, stream_id=a.stream_id)
        readers.subscribe(2, stream_id=b.stream_id)
        received: dict[int, list[ManyReadersEvent]] = defaultdict(list)
        events = aiter(readers)
        await gather(events, received, first_event, {1, 2})
        readers.unsubscribe(1)
        await eventually(lambda: stream_a.readers == 0)
        readers.done_subscribing()
        env.scripted.script(a.stream_id).put(*text_chunks(2), None)
        env.scripted.script(b.stream_id).put(*text_chunks(2), None)
        async for tag, event in events:  # the call ends by itself after b's end
            received[tag].append(event)
    assert received[1] == [Subscribed(a.stream_id)]
    assert isinstance(received[2][-1], StreamEnd) and received[2][-1].final_offset == 5
    assert (await stream_a.wait_ended()).state is StreamState.COMPLETED


async def test_a_request_without_an_action_is_invalid_argument(env: Env) -> None:
    call = env.client._stub.AttachMany()
    await call.write(pb.AttachManyRequest())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
