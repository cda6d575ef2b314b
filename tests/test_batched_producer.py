"""Batched producers (issue 13, item 1): a producer may yield a list of chunks, taken as if it had
yielded each alone (order, offsets, limits, the chunk budget, a claimed stream), but appended at
once. The domain relay on SQLite with a producer the test feeds batch by batch; the gRPC producer
(each GenerateResponse one batch) is in tests/test_grpc_producer.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from relay.domain.core import Relay
from relay.domain.model import (
    ChunkBatch,
    EndReason,
    JsonObject,
    Limits,
    StartRequest,
    StreamEnd,
    StreamPolicy,
    StreamState,
    dump_json,
)
from relay.domain.ports import CancelRequest
from relay.domain.stream import Stream
from relay.producers import ProduceRequest, ProducerRegistry
from relay.stores.sqlite import SqliteStore
from tests.conftest import FakeClock, collect, eventually, text_chunks, user

# What the test feeds: a chunk, a batch, a call made between two yields (no await: the producer
# yields its next item before a cancellation can reach it), or None to end the answer.
Item = JsonObject | list[JsonObject] | Callable[[], None] | None


@dataclass
class Feed:
    items: asyncio.Queue[Item] = field(default_factory=asyncio.Queue)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    def put(self, *items: Item) -> None:
        for item in items:
            self.items.put_nowait(item)


class BatchingProducer:
    def __init__(self) -> None:
        self.feeds: dict[str, Feed] = {}

    def feed(self, stream_id: str) -> Feed:
        return self.feeds.setdefault(stream_id, Feed())

    def check_options(self, options: Mapping[str, str]) -> None:
        pass

    async def generate(
        self, request: ProduceRequest
    ) -> AsyncGenerator[JsonObject | list[JsonObject], None]:
        feed = self.feed(request.stream_id)
        try:
            # Queue.get returns at once when an item is there: fed items come without an await.
            while (item := await feed.items.get()) is not None:
                if callable(item):
                    item()
                else:
                    yield item
        except asyncio.CancelledError:
            feed.cancelled.set()
            raise


@dataclass
class Batched:
    relay: Relay
    producer: BatchingProducer
    clock: FakeClock

    async def start(self, chat_id: str, policy: StreamPolicy | None = None) -> tuple[str, Feed]:
        request = StartRequest(chat_id, [user("hi")], policy=policy or StreamPolicy())
        stream_id = (await self.relay.start(request)).stream_id
        return stream_id, self.producer.feed(stream_id)

    async def read(self, stream_id: str, from_offset: int = 0) -> tuple[list[str], StreamEnd]:
        attached = await self.relay.attach(stream_id=stream_id, from_offset=from_offset)
        return await collect(attached.events)


@asynccontextmanager
async def batched_relay(tmp_path: Path, limits: Limits | None = None) -> AsyncIterator[Batched]:
    producer, clock = BatchingProducer(), FakeClock()
    relay = Relay(
        SqliteStore(tmp_path / "relay.sqlite3"),
        ProducerRegistry({"batching": producer}, "batching"),
        limits,
        retention=600,
        journal_interval=0.001,
        sweep_interval=None,
        policy_interval=None,
        retry_backoff=(0.001, 0.05),
        clock=clock,
    )
    await relay.open()
    try:
        yield Batched(relay, producer, clock)
    finally:
        await relay.close(grace=0)


def deltas(first: int, count: int) -> list[JsonObject]:
    return [
        {"type": "text-delta", "id": "t", "delta": f"w{i} "} for i in range(first, first + count)
    ]


def words(first: int, count: int) -> str:
    return "".join(f"w{i} " for i in range(first, first + count))


def served(chunks: list[JsonObject]) -> list[str]:
    return [dump_json(chunk) for chunk in chunks]


# -- order and offsets -------------------------------------------------------------------------


async def test_batches_and_single_chunks_keep_their_order_and_offsets(tmp_path: Path) -> None:
    async with batched_relay(tmp_path) as b:
        stream_id, feed = await b.start("chat-1")
        head, tail = text_chunks(0), [{"type": "text-end", "id": "t"}, {"type": "finish"}]
        sent = [*head, *deltas(0, 10), *tail]
        live = await b.relay.attach(stream_id=stream_id)
        feed.put(head[0], head[1:])  # a chunk, then a batch of two
        stream = b.relay.streams[stream_id]
        await eventually(lambda: len(stream.chunks) == 3)

        # A reader waiting at offset 3 gets a batch appended at once in one event.
        first = await anext(live.events)
        assert first == ChunkBatch(0, served(head))
        feed.put(deltas(0, 6))
        assert await anext(live.events) == ChunkBatch(3, served(deltas(0, 6)))
        feed.put(deltas(6, 1), deltas(7, 3), [])  # a batch of one, an empty one
        # The journal gets every chunk of every batch, in order, while the stream is live.
        await eventually(lambda: stream.journaled == 13)
        logged = await b.relay.log.load(stream_id)
        assert logged is not None and logged.chunks == served(sent[:13]) and logged.end is None
        feed.put(tail, None)

        chunks, end = await collect(live.events)
        assert chunks == served(sent[9:])
        assert (end.state, end.final_offset) == (StreamState.COMPLETED, len(sent))
        # From an offset inside a batch: the rest of it, then the others.
        assert (await b.read(stream_id, from_offset=5))[0] == served(sent[5:])
        answer = (await b.relay.list_messages("chat-1"))[-1]
        assert answer.parts[-1] == {"type": "text", "text": words(0, 10), "state": "done"}


def test_a_stream_takes_a_batch_at_once_waking_its_readers_once() -> None:
    stream = Stream("s" * 32, "chat-1", 0.0)
    woken: list[int] = []
    stream.watch(lambda: woken.append(len(stream.chunks)))
    stream.watch(lambda: woken.append(len(stream.chunks)))
    stream.extend(['{"type":"a"}', '{"type":"bb"}'], 25)
    assert stream.chunks == ['{"type":"a"}', '{"type":"bb"}'] and stream.bytes == 25
    assert woken == [2, 2]  # each watcher once, after the whole batch


# -- a Stop, the chunk budget ------------------------------------------------------------------


async def test_a_batch_after_a_stop_claimed_the_stream_is_dropped(tmp_path: Path) -> None:
    """A batch split across a Stop: the batch before the claim is kept, the batch the producer
    yields after it (before the cancellation reaches it) adds nothing."""
    async with batched_relay(tmp_path) as b:
        stream_id, feed = await b.start("chat-1")
        stream = b.relay.streams[stream_id]

        def stop() -> None:  # what Stop does, at once: the claim, then the cancel
            assert stream.request_cancel(CancelRequest(StreamState.STOPPED))
            stream.cancel_producer()

        feed.put([*text_chunks(0), *deltas(0, 3)], stop, deltas(3, 4), {"type": "finish"})

        chunks, end = await b.read(stream_id)
        assert chunks == served([*text_chunks(0), *deltas(0, 3)])
        assert (end.state, end.final_offset) == (StreamState.STOPPED, 6)
        await asyncio.wait_for(feed.cancelled.wait(), 10)
        answer = (await b.relay.list_messages("chat-1"))[-1]
        assert answer.parts[-1]["text"] == words(0, 3)


async def test_a_stop_between_two_batches_ends_the_stream_after_the_first(tmp_path: Path) -> None:
    async with batched_relay(tmp_path) as b:
        stream_id, feed = await b.start("chat-1")
        feed.put([*text_chunks(0), *deltas(0, 2)])
        await eventually(lambda: len(b.relay.streams[stream_id].chunks) == 5)

        result = await b.relay.stop("chat-1", stream_id)
        feed.put(deltas(2, 5))  # the producer was cancelled before it could take this

        assert result.end is not None
        assert (result.end.state, result.end.final_offset) == (StreamState.STOPPED, 5)
        assert feed.cancelled.is_set()
        assert (await b.read(stream_id))[0] == served([*text_chunks(0), *deltas(0, 2)])


async def test_a_batch_crossing_the_chunk_budget_keeps_exactly_the_budget(tmp_path: Path) -> None:
    async with batched_relay(tmp_path) as b:
        # 3 + 4 chunks against a budget of 5: the second batch's first two are kept, the stream
        # ends as a chunk past the budget ends it, the rest of the batch dropped.
        crossing, feed = await b.start("chat-1", StreamPolicy(max_chunks=5))
        feed.put(text_chunks(0), deltas(0, 4), {"type": "finish"})  # then it waits
        chunks, end = await b.read(crossing)
        assert chunks == served([*text_chunks(0), *deltas(0, 2)])
        assert (end.state, end.final_offset, end.reason) == (
            StreamState.STOPPED,
            5,
            EndReason.MAX_CHUNKS,
        )
        await asyncio.wait_for(feed.cancelled.wait(), 10)

        # A batch reaching the budget exactly completes, as it would have.
        exact, feed = await b.start("chat-2", StreamPolicy(max_chunks=5))
        feed.put([*text_chunks(0), *deltas(0, 2)], None)
        _, end = await b.read(exact)
        assert (end.state, end.final_offset) == (StreamState.COMPLETED, 5)

        # A batch once the budget is reached: none of it, the stream ends.
        past, feed = await b.start("chat-3", StreamPolicy(max_chunks=5))
        feed.put([*text_chunks(0), *deltas(0, 2)], deltas(2, 3), None)
        _, end = await b.read(past)
        assert (end.state, end.final_offset, end.reason) == (
            StreamState.STOPPED,
            5,
            EndReason.MAX_CHUNKS,
        )
        assert b.relay.stats().ended_by_reason == {"max_chunks": 2, "finished": 1}


# -- a batch over the limits, a bad chunk in a batch -------------------------------------------

BIG: JsonObject = {"type": "text-delta", "id": "t", "delta": "x" * 300}  # 341 bytes of JSON


@pytest.mark.parametrize(
    ("limits", "error"),
    [
        (Limits(chunk_max_bytes=200), "a chunk of 341 bytes is over the 200 limit"),
        (Limits(stream_max_chunks=5), "the stream reached its limit of 5 chunks"),
        (Limits(stream_max_bytes=400), "the stream reached its limit of 400 bytes"),
        (Limits(buffered_bytes_max=400), "the relay holds its limit of 400 bytes of answers"),
    ],
    ids=["chunk-bytes", "stream-chunks", "stream-bytes", "buffered-bytes"],
)
async def test_a_batch_over_a_limit_fails_the_stream_at_the_chunk_past_it(
    tmp_path: Path, limits: Limits, error: str
) -> None:
    """Chunks of 30 to 60 bytes, then one of 341: each limit is passed by a chunk of the second
    batch (the 3rd: the 6th chunk, or the one that passes 400 bytes). The chunks before it are
    kept, none after it, and the error names it."""
    async with batched_relay(tmp_path, limits) as b:
        stream_id, feed = await b.start("chat-1")
        feed.put(text_chunks(0), [*deltas(0, 2), BIG, *deltas(2, 2)], None)

        chunks, end = await b.read(stream_id)

        assert chunks == served([*text_chunks(0), *deltas(0, 2)])
        assert (end.state, end.final_offset, end.reason) == (StreamState.FAILED, 5, EndReason.LIMIT)
        assert end.error_message == (
            f"{error} (the chunk at index 2 of a batch of 5; the 2 before it were kept)"
        )
        stream = b.relay.streams[stream_id]
        assert stream.bytes == sum(map(len, chunks))  # nothing past the limit is held
        answer = (await b.relay.list_messages("chat-1"))[-1]
        assert answer.parts[-1]["text"] == words(0, 2)


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ({"no": "type"}, "the producer yielded a chunk that is not an object with a 'type'"),
        ("text", "the producer yielded a chunk that is not an object with a 'type'"),
        (
            {"type": "text-delta", "id": "t", "delta": "\ud800"},
            "the producer yielded a chunk that is not JSON: a string holds a lone surrogate",
        ),
    ],
    ids=["no-type", "not-an-object", "not-json"],
)
async def test_a_bad_chunk_in_a_batch_fails_the_stream_naming_its_index(
    tmp_path: Path, bad: object, error: str
) -> None:
    async with batched_relay(tmp_path) as b:
        stream_id, feed = await b.start("chat-1")
        feed.put([*text_chunks(0), *deltas(0, 1), bad, *deltas(1, 1)], None)  # type: ignore[list-item]

        chunks, end = await b.read(stream_id)

        assert chunks == served([*text_chunks(0), *deltas(0, 1)])
        assert (end.state, end.final_offset) == (StreamState.FAILED, 4)
        assert end.error_message.startswith(error)
        assert end.error_message.endswith(
            "(the chunk at index 4 of a batch of 6; the 4 before it were kept)"
        )


async def test_a_single_chunk_over_a_limit_keeps_its_message(tmp_path: Path) -> None:
    """A chunk yielded alone (or a batch of one) fails with the message of old, no index."""
    async with batched_relay(tmp_path, Limits(chunk_max_bytes=200)) as b:
        alone_and_in_a_batch: list[Item] = [BIG, [BIG]]
        for n, item in enumerate(alone_and_in_a_batch):
            stream_id, feed = await b.start(f"chat-{n}")
            feed.put(text_chunks(0), item, None)
            _, end = await b.read(stream_id)
            assert end.error_message == "a chunk of 341 bytes is over the 200 limit"
