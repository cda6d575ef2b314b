"""The StreamLog contract (relay.domain.ports) over Redis Streams: `RedisStreamLog`."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from subprocess import Popen

import pytest
import redis.asyncio

from relay.domain.errors import Unavailable
from relay.domain.model import EndReason, StreamEnd, StreamState, UIMessage, dump_json
from relay.domain.ports import CancelRequest, ChunkRun, LogBehind
from relay.stores.redis_log import RedisStreamLog
from tests.redis_server import private_redis, redis_prefix, redis_url, stop_redis, url_port  # noqa: F401

StartRedis = Callable[..., tuple[str, Popen[bytes]]]
WAIT_S = 10.0  # bounds every wait: a bug fails the test instead of hanging it


@pytest.fixture
async def stream_log(redis_url: str, redis_prefix: str) -> AsyncIterator[RedisStreamLog]:  # noqa: F811
    log = RedisStreamLog(redis_url, redis_prefix)
    await log.open()
    yield log
    await log.close()


def chunk(i: int) -> str:
    return dump_json({"type": "text-delta", "id": "t", "delta": f"word {i} "})


def chunks(start: int, stop: int) -> list[str]:
    return [chunk(i) for i in range(start, stop)]


async def new_stream(log: RedisStreamLog, count: int = 0, chat_id: str = "chat-1") -> str:
    stream_id = uuid.uuid4().hex
    await log.create(stream_id, chat_id, "owner-a")
    if count:
        assert await log.append([ChunkRun(stream_id, 0, chunks(0, count))]) == set()
    return stream_id


MESSAGE = UIMessage("m1", "assistant", [{"type": "text", "text": "hi"}], {"k": 1})
COMPLETED = StreamEnd(StreamState.COMPLETED, 3, "", MESSAGE)


class Follower:
    """Runs `follow` in a task; what it yields goes to a queue the test reads at its pace."""

    def __init__(self, log: RedisStreamLog, stream_id: str, from_offset: int) -> None:
        self.items: asyncio.Queue[list[str] | StreamEnd] = asyncio.Queue()
        self.task = asyncio.create_task(self._run(log, stream_id, from_offset))

    async def _run(self, log: RedisStreamLog, stream_id: str, from_offset: int) -> None:
        async for item in log.follow(stream_id, from_offset):
            self.items.put_nowait(item)

    async def chunks(self, count: int) -> list[str]:
        """The next `count` chunks (batches never cross the count the test expects)."""
        got: list[str] = []
        while len(got) < count:
            item = await asyncio.wait_for(self.items.get(), WAIT_S)
            assert isinstance(item, list), item
            got.extend(item)
        assert len(got) == count
        return got

    async def end(self) -> StreamEnd:
        item = await asyncio.wait_for(self.items.get(), WAIT_S)
        assert isinstance(item, StreamEnd), item
        await asyncio.wait_for(self.task, WAIT_S)  # it stops after the seal
        assert self.items.empty()
        return item

    async def stop(self) -> None:
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task


async def test_offsets_are_dense_and_load_returns_them(stream_log: RedisStreamLog) -> None:
    stream_id = await new_stream(stream_log)
    assert await stream_log.load(stream_id) is not None
    await stream_log.append([ChunkRun(stream_id, 0, chunks(0, 3))])
    await stream_log.append([ChunkRun(stream_id, 3, chunks(3, 5))])
    loaded = await stream_log.load(stream_id)
    assert loaded is not None
    assert (loaded.stream_id, loaded.chat_id, loaded.chunks, loaded.end) == (
        stream_id,
        "chat-1",
        chunks(0, 5),
        None,
    )
    assert await stream_log.load(uuid.uuid4().hex) is None
    assert stream_log.error is None


async def test_retried_and_overlapping_runs_are_not_doubled(stream_log: RedisStreamLog) -> None:
    stream_id = await new_stream(stream_log, 3)
    other = await new_stream(stream_log)
    await stream_log.append(
        [
            ChunkRun(stream_id, 0, chunks(0, 3)),  # all there already
            ChunkRun(stream_id, 1, chunks(1, 6)),  # overlaps
            ChunkRun(other, 0, chunks(0, 2)),
            ChunkRun(other, 0, chunks(0, 4)),  # the same stream twice in one call
            ChunkRun(stream_id, 6, []),
        ]
    )
    loaded, loaded_other = await stream_log.load(stream_id), await stream_log.load(other)
    assert loaded is not None and loaded.chunks == chunks(0, 6)
    assert loaded_other is not None and loaded_other.chunks == chunks(0, 4)


async def test_a_run_past_the_end_of_its_log_says_where_the_log_ends(
    stream_log: RedisStreamLog,
) -> None:
    """A log that lost writes (Redis back from an AOF written every second) tells its writer
    where it ends; the other runs of the batch are written."""
    stream_id = await new_stream(stream_log, 2)
    other = await new_stream(stream_log, 1)
    with pytest.raises(LogBehind) as behind:
        await stream_log.append(
            [ChunkRun(stream_id, 3, chunks(3, 4)), ChunkRun(other, 1, chunks(1, 3))]
        )
    assert behind.value.holds == {stream_id: 2}
    loaded, loaded_other = await stream_log.load(stream_id), await stream_log.load(other)
    assert loaded is not None and loaded.chunks == chunks(0, 2)
    assert loaded_other is not None and loaded_other.chunks == chunks(0, 3)


async def test_append_after_seal_is_fenced(stream_log: RedisStreamLog) -> None:
    sealed = await new_stream(stream_log, 3)
    open_one = await new_stream(stream_log, 1)
    await stream_log.seal(sealed, COMPLETED, 60)
    fenced = await stream_log.append(
        [ChunkRun(sealed, 3, chunks(3, 5)), ChunkRun(open_one, 1, chunks(1, 2))]
    )
    assert fenced == {sealed}
    loaded, loaded_open = await stream_log.load(sealed), await stream_log.load(open_one)
    assert loaded is not None and loaded.chunks == chunks(0, 3) and loaded.end == COMPLETED
    assert loaded_open is not None and loaded_open.chunks == chunks(0, 2)


async def test_a_missing_log_is_fenced(stream_log: RedisStreamLog) -> None:
    assert await stream_log.append([ChunkRun("gone", 0, chunks(0, 1))]) == {"gone"}
    assert await stream_log.load("gone") is None


async def test_first_seal_wins(stream_log: RedisStreamLog) -> None:
    stream_id = await new_stream(stream_log, 3)
    assert await stream_log.seal(stream_id, COMPLETED, 60) == COMPLETED
    stopped = StreamEnd(StreamState.STOPPED, 2, "stopped by the user")
    assert await stream_log.seal(stream_id, stopped, 60) == COMPLETED
    loaded = await stream_log.load(stream_id)
    assert loaded is not None and loaded.end == COMPLETED
    # An end without a message, with an error, round trips too.
    other = await new_stream(stream_log, 1)
    failed = StreamEnd(StreamState.FAILED, 1, "the producer failed: é")
    assert await stream_log.seal(other, failed, 60) == failed
    assert await stream_log.seal(other, COMPLETED, 60) == failed


async def test_a_seal_keeps_its_reason_and_one_without_reads_as_unspecified(
    stream_log: RedisStreamLog,
    redis_url: str,  # noqa: F811
    redis_prefix: str,  # noqa: F811
) -> None:
    stream_id = await new_stream(stream_log, 2)
    stopped = StreamEnd(StreamState.STOPPED, 2, "", MESSAGE, EndReason.STOPPED_BEFORE_START)
    assert await stream_log.seal(stream_id, stopped, 60) == stopped
    loaded = await stream_log.load(stream_id)
    assert loaded is not None and loaded.end == stopped
    # The seal that holds comes back with its reason to a later sealer.
    later = StreamEnd(StreamState.COMPLETED, 2, "", None, EndReason.FINISHED)
    assert await stream_log.seal(stream_id, later, 60) == stopped
    follower = Follower(stream_log, stream_id, 2)
    assert await follower.end() == stopped
    # A seal written by a relay that did not record reasons (no `reason` field).
    old = await new_stream(stream_log, 1)
    async with redis.asyncio.from_url(redis_url) as client:
        await client.xadd(
            f"{redis_prefix}stream:{old}",
            {"state": "interrupted", "final_offset": "1", "error": "gone"},
            id="1-0",
        )
    loaded = await stream_log.load(old)
    assert loaded is not None
    assert loaded.end == StreamEnd(StreamState.INTERRUPTED, 1, "gone", None, EndReason.UNSPECIFIED)


async def test_load_drops_chunks_past_the_seal(stream_log: RedisStreamLog) -> None:
    stream_id = await new_stream(stream_log, 5)  # a fenced writer's chunks 3 and 4 got in first
    await stream_log.seal(stream_id, COMPLETED, 60)
    loaded = await stream_log.load(stream_id)
    assert loaded is not None and loaded.chunks == chunks(0, 3) and loaded.end == COMPLETED


async def test_seal_sets_the_retention(
    stream_log: RedisStreamLog,
    redis_url: str,  # noqa: F811
    redis_prefix: str,  # noqa: F811
) -> None:
    stream_id = await new_stream(stream_log, 1)
    key = f"{redis_prefix}stream:{stream_id}"
    async with redis.asyncio.from_url(redis_url) as client:
        assert await client.pttl(key) == -1  # an open stream's log never expires
        await stream_log.seal(stream_id, StreamEnd(StreamState.COMPLETED, 1), 30)
        assert 0 < await client.pttl(key) <= 30_000


async def test_delete(stream_log: RedisStreamLog) -> None:
    first, second, kept = [await new_stream(stream_log, 2) for _ in range(3)]
    await stream_log.seal(first, StreamEnd(StreamState.COMPLETED, 2), 60)
    await stream_log.delete([first, second])
    await stream_log.delete([])
    assert await stream_log.load(first) is None
    assert await stream_log.load(second) is None
    assert await stream_log.load(kept) is not None


async def test_probe(stream_log: RedisStreamLog) -> None:
    await stream_log.probe()
    assert stream_log.error is None


@pytest.mark.parametrize("from_offset", [0, 2, 4])
async def test_follow_is_gap_free_live_and_ends_with_the_seal(
    stream_log: RedisStreamLog, from_offset: int
) -> None:
    stream_id = await new_stream(stream_log, 4)
    follower = Follower(stream_log, stream_id, from_offset)
    try:
        assert await follower.chunks(4 - from_offset) == chunks(from_offset, 4)
        # Appends made while it follows arrive, overlapping retries only once.
        await stream_log.append([ChunkRun(stream_id, 4, chunks(4, 6))])
        assert await follower.chunks(2) == chunks(4, 6)
        await stream_log.append([ChunkRun(stream_id, 5, chunks(5, 9))])
        assert await follower.chunks(3) == chunks(6, 9)
        end = StreamEnd(StreamState.STOPPED, 9, "", MESSAGE)
        await stream_log.seal(stream_id, end, 60)
        assert await follower.end() == end
    finally:
        follower.task.cancel()


async def test_follow_a_sealed_stream(stream_log: RedisStreamLog) -> None:
    stream_id = await new_stream(stream_log, 5)
    await stream_log.seal(stream_id, COMPLETED, 60)  # final offset 3: chunks 3 and 4 dropped
    for from_offset, expected in [(0, chunks(0, 3)), (2, chunks(2, 3)), (3, []), (5, [])]:
        items = [item async for item in stream_log.follow(stream_id, from_offset)]
        assert items == ([expected] if expected else []) + [COMPLETED]


async def test_follow_a_missing_log(stream_log: RedisStreamLog) -> None:
    with pytest.raises(Unavailable, match="gone"):
        await asyncio.wait_for(anext(aiter(stream_log.follow("gone", 0))), WAIT_S)


async def test_follow_stopped_by_its_reader_frees_its_connection(
    stream_log: RedisStreamLog,
) -> None:
    stream_id = await new_stream(stream_log, 1)
    followers = [Follower(stream_log, stream_id, 0) for _ in range(3)]
    for follower in followers:
        assert await follower.chunks(1) == chunks(0, 1)
    for follower in followers:  # each blocked in XREAD (or about to be)
        await follower.stop()
    # aclose of a generator that waits between items.
    items = stream_log.follow(stream_id, 0)
    assert await anext(items) == chunks(0, 1)
    await items.aclose()  # type: ignore[attr-defined]
    pool = stream_log._blocking.connection_pool  # type: ignore[union-attr]
    assert not pool._in_use_connections


async def test_cancel_signals_reach_their_owner_only(
    stream_log: RedisStreamLog,
    redis_url: str,  # noqa: F811
    redis_prefix: str,  # noqa: F811
) -> None:
    to_a, to_b = stream_log.cancels("a"), stream_log.cancels("b")
    next_a, next_b = asyncio.ensure_future(anext(to_a)), asyncio.ensure_future(anext(to_b))
    try:
        await subscribed(redis_url, f"{redis_prefix}cancel:a")
        await subscribed(redis_url, f"{redis_prefix}cancel:b")
        stop = CancelRequest(StreamState.STOPPED, MESSAGE, EndReason.SUPERSEDED)
        await stream_log.signal_cancel("a", "s1", stop)
        assert await asyncio.wait_for(next_a, WAIT_S) == ("s1", stop)  # its reason too
        interrupt = CancelRequest(StreamState.INTERRUPTED, reason=EndReason.RELAY_LOST)
        await stream_log.signal_cancel("b", "s2", interrupt)
        assert await asyncio.wait_for(next_b, WAIT_S) == ("s2", interrupt)  # not a's signal
        next_a = asyncio.ensure_future(anext(to_a))
        await stream_log.signal_cancel("a", "s3", interrupt)
        assert await asyncio.wait_for(next_a, WAIT_S) == ("s3", interrupt)
        # A signal from a relay that did not send reasons reads as unspecified.
        next_a = asyncio.ensure_future(anext(to_a))
        async with redis.asyncio.from_url(redis_url) as client:
            signal = {"stream_id": "s4", "state": "stopped", "message": None}
            await client.publish(f"{redis_prefix}cancel:a", dump_json(signal))
        assert await asyncio.wait_for(next_a, WAIT_S) == (
            "s4",
            CancelRequest(StreamState.STOPPED, None, EndReason.UNSPECIFIED),
        )
    finally:
        for pending in (next_a, next_b):
            pending.cancel()
        await to_a.aclose()  # type: ignore[attr-defined]
        await to_b.aclose()  # type: ignore[attr-defined]


async def subscribed(url: str, channel: str, count: int = 1) -> None:
    """Waits until `channel` has `count` subscribers (PUBLISH reaches only those present)."""
    async with redis.asyncio.from_url(url) as client:
        async with asyncio.timeout(WAIT_S):
            while (await client.pubsub_numsub(channel))[0][1] != count:  # noqa: ASYNC110
                await asyncio.sleep(0.01)


async def test_a_cancelled_append_still_completes(redis_url: str, redis_prefix: str) -> None:  # noqa: F811
    log = RedisStreamLog(redis_url, redis_prefix)
    await log.open()
    stream_id = await new_stream(log)
    run = ChunkRun(stream_id, 0, chunks(0, 5_000))
    caller = asyncio.create_task(log.append([run]))
    await asyncio.sleep(0)  # the append has started: its pipeline is on its way
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await log.close()  # waits for the append its caller gave up on
    log = RedisStreamLog(redis_url, redis_prefix)
    await log.open()
    try:
        loaded = await log.load(stream_id)
        assert loaded is not None and loaded.chunks == run.chunks
    finally:
        await log.close()


async def test_open_fails_plainly_when_redis_is_unreachable() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    log = RedisStreamLog(f"redis://:hunter2@127.0.0.1:{port}/0")
    with pytest.raises(Unavailable) as failure:
        await asyncio.wait_for(log.open(), WAIT_S)
    assert f"127.0.0.1:{port}" in str(failure.value)
    assert "hunter2" not in str(failure.value)
    assert log.error is not None and "hunter2" not in log.error
    with pytest.raises(Unavailable, match="closed"):
        await log.probe()


async def test_a_follower_fails_when_redis_dies(private_redis: StartRedis) -> None:  # noqa: F811
    url, server = private_redis(appendonly=False)
    log = RedisStreamLog(url)
    await log.open()
    try:
        stream_id = await new_stream(log, 2)
        follower = Follower(log, stream_id, 0)
        assert await follower.chunks(2) == chunks(0, 2)
        stop_redis(server)
        with pytest.raises(Unavailable, match="retry later"):
            await asyncio.wait_for(follower.task, WAIT_S)
        assert log.error is not None
        with pytest.raises(Unavailable):
            await log.append([ChunkRun(stream_id, 2, chunks(2, 3))])
    finally:
        await log.close()


async def test_cancels_resubscribe_after_a_restart(private_redis: StartRedis) -> None:  # noqa: F811
    url, server = private_redis(appendonly=True)
    log = RedisStreamLog(url)
    await log.open()
    signals = log.cancels("a")
    received = asyncio.ensure_future(anext(signals))
    try:
        await subscribed(url, "relay:cancel:a")
        stop_redis(server)
        url, server = private_redis(appendonly=True, port=url_port(url))
        await subscribed(url, "relay:cancel:a")
        assert not received.done()
        request = CancelRequest(StreamState.STOPPED)
        # The restart may still close the old subscription after redis-py has renewed it, and
        # the log then subscribes again: a signal published in between reaches nobody. Senders
        # repeat signals (Relay._signal_until_ended), and so does this test.
        async with asyncio.timeout(WAIT_S):
            while not received.done():
                await log.signal_cancel("a", "s1", request)
                await asyncio.wait([received], timeout=0.05)
        assert received.result() == ("s1", request)
        assert log.error is None
    finally:
        received.cancel()
        await signals.aclose()  # type: ignore[attr-defined]
        await log.close()


async def test_a_follower_fails_when_the_log_is_gone(stream_log: RedisStreamLog) -> None:
    stream_id = await new_stream(stream_log, 1)
    follower = Follower(stream_log, stream_id, 0)
    assert await follower.chunks(1) == chunks(0, 1)
    await stream_log.delete([stream_id])  # as if it had expired
    with pytest.raises(Unavailable, match="gone"):
        await asyncio.wait_for(follower.task, WAIT_S)
