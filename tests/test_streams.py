"""Start, Attach, Stop and GetActive against a real grpc.aio server: the stream lifecycle."""

from __future__ import annotations

import asyncio
import json

import pytest

from relay.client import RelayClient
from relay.client.errors import DeadlineExceeded, FailedPrecondition, Unavailable
from relay.domain.model import (
    ChunkBatch,
    EndReason,
    StopOutcome,
    StreamEnd,
    StreamState,
    UIMessage,
)
from relay.rpc.convert import message_to_pb
from relay.v1 import relay_pb2 as pb
from relay.v1 import relay_pb2_grpc
from tests.conftest import (
    Env,
    collect,
    ended_as,
    eventually,
    read_chunks,
    text_chunks,
    user,
)


@pytest.fixture(params=["embedded", "cluster"])
def relay_mode(request: pytest.FixtureRequest) -> str:
    """Every test here runs on SQLite and on PostgreSQL + Redis (conftest's `env`)."""
    return str(request.param)


async def test_echo_stream_completes_and_persists_the_answer(env: Env) -> None:
    started = await env.client.start("chat-1", [user("hello there")])
    chunks, end = await collect(env.client.attach(stream_id=started.stream_id))

    parsed = [json.loads(c) for c in chunks]
    assert [c["type"] for c in parsed] == [
        "start",
        "start-step",
        "text-start",
        "text-delta",
        "text-delta",
        "text-delta",
        "text-delta",
        "text-end",
        "finish-step",
        "finish",
    ]
    assert "".join(c["delta"] for c in parsed if c["type"] == "text-delta") == (
        "You said: hello there"
    )
    assert end.state is StreamState.COMPLETED
    assert end.final_offset == len(chunks)
    messages = await env.client.list_messages("chat-1")
    assert [m.role for m in messages] == ["user", "assistant"]
    assert (
        messages[1].id == parsed[0]["messageId"]
    )  # the start chunk's id, so no duplicate on reload
    assert messages[1].parts[-1] == {
        "type": "text",
        "text": "You said: hello there",
        "state": "done",
    }
    assert end.message == messages[1]
    assert await env.client.get_active("chat-1") is None


async def test_cancelled_reader_leaves_the_producer_running(env: Env) -> None:
    started = await env.client.start("chat-1", [user("hi")], producer="scripted")
    script = env.scripted.script(started.stream_id)
    script.put(*text_chunks(3))
    reader = env.client.attach(stream_id=started.stream_id)
    assert len(await read_chunks(reader, 6)) == 6
    await reader.aclose()  # the client goes away mid-stream: cancels the Attach call
    stream = env.relay.streams[started.stream_id]
    await eventually(lambda: stream.readers == 0)

    script.put({"type": "text-delta", "id": "t", "delta": "more"}, {"type": "text-end", "id": "t"})
    script.put(None)
    chunks, end = await collect(env.client.attach(stream_id=started.stream_id))

    assert not script.cancelled.is_set()
    assert end.state is StreamState.COMPLETED and len(chunks) == 8
    messages = await env.client.list_messages("chat-1")
    assert messages[-1].id == "msg-1"
    assert messages[-1].parts[-1]["text"] == "w0 w1 w2 more"


async def test_an_attach_closed_before_its_first_read_frees_its_reader_at_once(env: Env) -> None:
    """A client that opens an Attach and lets it go unread (the gateway's browser gone before
    the response began) cancels the call at once, not when the garbage collector finds it."""
    started = await env.client.start("chat-1", [user("hi")], producer="scripted")
    attached = await env.client.open_attach(stream_id=started.stream_id)
    stream = env.relay.streams[started.stream_id]
    await eventually(lambda: stream.readers == 1)
    await attached.events.aclose()  # never read; `attached` still holds it
    await eventually(lambda: stream.readers == 0)
    with pytest.raises(StopAsyncIteration):
        await anext(attached.events)
    env.scripted.script(started.stream_id).put(None)


async def test_deadline_on_a_reader_ends_only_that_reader(env: Env) -> None:
    started = await env.client.start("chat-1", [user("hi")], producer="scripted")
    script = env.scripted.script(started.stream_id)
    script.put(*text_chunks(1))
    with pytest.raises(DeadlineExceeded):
        await collect(env.client.attach(stream_id=started.stream_id, timeout=0.3))
    assert not script.cancelled.is_set()
    active = await env.client.get_active("chat-1")
    assert active is not None and active.state is StreamState.LIVE and active.offset == 4


async def test_stop_mid_stream_ends_every_reader_with_the_same_stopped_event(env: Env) -> None:
    started = await env.client.start("chat-1", [user("hi")], producer="scripted")
    script = env.scripted.script(started.stream_id)
    script.put(*text_chunks(2))
    readers = [env.client.attach(stream_id=started.stream_id) for _ in range(3)]
    for reader in readers:
        assert len(await read_chunks(reader, 5)) == 5
    partial = UIMessage("msg-1", "assistant", [{"type": "text", "text": "w0 w1 "}])

    result = await env.client.stop("chat-1", started.stream_id, partial)

    assert result.outcome is StopOutcome.STOPPED
    assert script.cancelled.is_set() and script.closed.is_set()  # the producer really stopped
    assert result.end is not None and result.end.state is StreamState.STOPPED
    # The client's partial as sent, with why it ended (for a reloaded page).
    assert result.end.final_offset == 5 and result.end.message == ended_as(partial)
    assert result.end.reason is EndReason.STOP
    ends = [await anext(reader) for reader in readers]
    assert all(end == result.end for end in ends)
    assert (await env.client.list_messages("chat-1"))[-1] == ended_as(partial)
    assert await env.client.get_active("chat-1") is None
    again = await env.client.stop("chat-1", started.stream_id)
    assert again.outcome is StopOutcome.ALREADY_ENDED and again.end == result.end
    assert (await env.client.stop("chat-1")).outcome is StopOutcome.NO_ACTIVE_STREAM


async def test_stop_without_a_partial_persists_what_the_relay_assembled(env: Env) -> None:
    started = await env.client.start("chat-1", [user("hi")], producer="scripted")
    script = env.scripted.script(started.stream_id)
    script.put(*text_chunks(2))
    await read_chunks(env.client.attach(stream_id=started.stream_id), 5)

    result = await env.client.stop("chat-1")

    assert result.outcome is StopOutcome.STOPPED and result.stream_id == started.stream_id
    saved = (await env.client.list_messages("chat-1"))[-1]
    # Its open text part is closed, and it says why it ended.
    assert saved == UIMessage(
        "msg-1",
        "assistant",
        [{"type": "step-start"}, {"type": "text", "text": "w0 w1 ", "state": "done"}],
        {"streamEnd": {"state": "stopped", "reason": "stop"}},
    )
    assert result.end is not None and result.end.message == saved


async def test_stop_returns_the_usage_the_producer_reported_so_far(env: Env) -> None:
    """A producer's `message-metadata` chunk carrying `usage` reaches the stop receipt (the
    `usage_json` of StopResponse), with or without the client's partial message."""
    stub = relay_pb2_grpc.RelayServiceStub(env.client.channel)
    usage = {"inputTokens": 12, "outputTokens": 3}
    stream_ids = []
    for chat_id, partial in (("chat-1", None), ("chat-2", UIMessage("msg-1", "assistant", []))):
        started = await env.client.start(chat_id, [user("hi")], producer="scripted")
        stream_ids.append(started.stream_id)
        script = env.scripted.script(started.stream_id)
        script.put(*text_chunks(1))
        script.put({"type": "message-metadata", "messageMetadata": {"usage": usage}})
        await read_chunks(env.client.attach(stream_id=started.stream_id), 5)
        request = pb.StopRequest(chat_id=chat_id)
        if partial is not None:
            request.partial_message.CopyFrom(message_to_pb(partial))

        response = await stub.Stop(request)

        assert response.outcome == pb.STOP_OUTCOME_STOPPED
        assert json.loads(response.usage_json) == usage
        assert json.loads(response.end.message.metadata_json)["usage"] == usage
        assert response.end.reason == pb.END_REASON_STOP
    # The client reads it from the receipt too.
    result = await env.client.stop("chat-1", stream_ids[0])
    assert result.outcome is StopOutcome.ALREADY_ENDED and result.usage == usage
    # No usage reported: none in the receipt.
    started = await env.client.start("chat-3", [user("hi")], producer="scripted")
    env.scripted.script(started.stream_id).put(*text_chunks(1))
    await read_chunks(env.client.attach(stream_id=started.stream_id), 4)
    response = await stub.Stop(pb.StopRequest(chat_id="chat-3"))
    assert response.outcome == pb.STOP_OUTCOME_STOPPED and response.usage_json == ""


async def test_a_finish_chunks_usage_is_kept_with_the_completed_answer(env: Env) -> None:
    started = await env.client.start("chat-1", [user("hi")], producer="scripted")
    usage = {"totalTokens": 9}
    env.scripted.script(started.stream_id).put(
        *text_chunks(1),
        {"type": "text-end", "id": "t"},
        {"type": "finish", "messageMetadata": {"usage": usage}},
        None,
    )
    _, end = await collect(env.client.attach(stream_id=started.stream_id))
    assert end.state is StreamState.COMPLETED and end.reason is EndReason.FINISHED
    assert end.message is not None and end.message.metadata == {"usage": usage}  # no streamEnd
    assert (await env.client.list_messages("chat-1"))[-1] == end.message


async def test_a_stop_for_an_old_stream_leaves_the_new_stream_alone(env: Env) -> None:
    old = await env.client.start("chat-1", [user("one")], producer="scripted")
    env.scripted.script(old.stream_id).put(*text_chunks(1), None)
    await collect(env.client.attach(stream_id=old.stream_id))
    new = await env.client.start("chat-1", [user("two", "u2")], producer="scripted")
    new_script = env.scripted.script(new.stream_id)

    stale = await env.client.stop("chat-1", old.stream_id)
    unknown = await env.client.stop("chat-1", "0" * 32)

    assert stale.outcome is StopOutcome.ALREADY_ENDED
    assert unknown.outcome is StopOutcome.NOT_ACTIVE
    active = await env.client.get_active("chat-1")
    assert active is not None and active.stream_id == new.stream_id
    assert active.state is StreamState.LIVE and not new_script.cancelled.is_set()


async def test_a_second_start_is_refused_unless_it_supersedes(env: Env) -> None:
    first = await env.client.start("chat-1", [user("one")], producer="scripted")
    env.scripted.script(first.stream_id).put(*text_chunks(2))
    await read_chunks(env.client.attach(stream_id=first.stream_id), 5)

    with pytest.raises(FailedPrecondition):
        await env.client.start("chat-1", [user("two", "u2")], producer="scripted")
    assert [m.id for m in await env.client.list_messages("chat-1")] == ["u1"]  # nothing changed

    second = await env.client.start(
        "chat-1", [user("two", "u2")], producer="scripted", supersede=True
    )
    assert second.superseded_stream_id == first.stream_id
    assert env.scripted.script(first.stream_id).cancelled.is_set()
    _, first_end = await collect(env.client.attach(stream_id=first.stream_id))
    assert first_end.state is StreamState.STOPPED
    assert [m.id for m in await env.client.list_messages("chat-1")] == ["u1", "msg-1", "u2"]
    active = await env.client.get_active("chat-1")
    assert active is not None and active.stream_id == second.stream_id


async def test_a_retried_start_with_the_same_request_id_returns_the_same_stream(env: Env) -> None:
    first = await env.client.start("chat-1", [user("one")], producer="scripted", request_id="r1")
    retry = await env.client.start("chat-1", [user("one")], producer="scripted", request_id="r1")
    assert retry.stream_id == first.stream_id and retry.deduplicated and not first.deduplicated
    assert len(env.relay.streams) == 1


@pytest.mark.parametrize("where", ["start", "middle", "end"])
async def test_attach_at_offsets_of_a_finished_stream(env: Env, where: str) -> None:
    started = await env.client.start("chat-1", [user("one")], producer="scripted")
    env.scripted.script(started.stream_id).put(*text_chunks(7), None)
    everything, _ = await collect(env.client.attach(stream_id=started.stream_id))
    offset = {"start": 0, "middle": 4, "end": len(everything)}[where]

    chunks, end = await collect(env.client.attach(stream_id=started.stream_id, from_offset=offset))

    assert chunks == everything[offset:]
    assert end.state is StreamState.COMPLETED and end.final_offset == len(everything)


async def test_attach_mid_live_stream_replays_then_follows_without_gap(env: Env) -> None:
    started = await env.client.start("chat-1", [user("one")], producer="scripted")
    script = env.scripted.script(started.stream_id)
    script.put(*text_chunks(5))  # 8 chunks
    first_reader = env.client.attach(stream_id=started.stream_id)
    await read_chunks(first_reader, 8)
    late = env.client.attach(stream_id=started.stream_id, from_offset=6, max_batch=1)
    assert await read_chunks(late, 2) == [
        json.dumps(c, separators=(",", ":")) for c in text_chunks(5)[6:8]
    ]
    script.put(*text_chunks(10)[8:], None)

    chunks, end = await collect(late)

    assert [json.loads(c)["delta"] for c in chunks] == [f"w{i} " for i in range(5, 10)]
    assert end.final_offset == 13


async def test_many_concurrent_readers_see_the_same_sequence(env: Env) -> None:
    started = await env.client.start("chat-1", [user("one")], producer="scripted")
    script = env.scripted.script(started.stream_id)
    readers = [
        asyncio.create_task(collect(env.client.attach(stream_id=started.stream_id)))
        for _ in range(20)
    ]
    stream = env.relay.streams[started.stream_id]
    await eventually(lambda: stream.readers == 20)
    script.put(*text_chunks(200), None)

    results = await asyncio.gather(*readers)

    assert all(chunks == results[0][0] and end == results[0][1] for chunks, end in results)
    assert len(results[0][0]) == 203


async def test_a_stalled_reader_never_slows_the_producer_or_other_readers(env: Env) -> None:
    started = await env.client.start("chat-1", [user("one")], producer="scripted")
    script = env.scripted.script(started.stream_id)
    stalled = env.client.attach(stream_id=started.stream_id, max_batch=1)
    script.put(*text_chunks(1))
    assert len(await read_chunks(stalled, 1)) == 1  # attached, then it stops reading
    script.put(*text_chunks(20_000)[4:], None)

    chunks, end = await collect(env.client.attach(stream_id=started.stream_id))

    # The producer finished and another reader got everything while the stalled one sat at 1.
    assert end.state is StreamState.COMPLETED and len(chunks) == 20_003
    assert script.closed.is_set()
    rest, stalled_end = await collect(stalled)
    assert len(rest) == 20_002 and stalled_end == end


async def test_a_failing_producer_ends_the_stream_failed_and_keeps_the_partial(env: Env) -> None:
    started = await env.client.start("chat-1", [user("one")], producer="scripted")
    env.scripted.script(started.stream_id).put(*text_chunks(2), RuntimeError("upstream broke"))

    chunks, end = await collect(env.client.attach(stream_id=started.stream_id))

    assert len(chunks) == 5 and end.state is StreamState.FAILED
    assert "upstream broke" in end.error_message
    assert (await env.client.list_messages("chat-1"))[-1].parts[-1]["text"] == "w0 w1 "
    assert await env.client.get_active("chat-1") is None


async def test_a_chunk_without_a_type_fails_the_stream(env: Env) -> None:
    started = await env.client.start("chat-1", [user("one")], producer="scripted")
    env.scripted.script(started.stream_id).put({"type": "start"}, {"delta": "no type"})
    chunks, end = await collect(env.client.attach(stream_id=started.stream_id))
    assert len(chunks) == 1 and end.state is StreamState.FAILED
    assert "'type'" in end.error_message


async def test_get_active_reports_the_live_stream_and_its_offset(env: Env) -> None:
    assert await env.client.get_active("chat-1") is None
    started = await env.client.start("chat-1", [user("one")], producer="scripted")
    env.scripted.script(started.stream_id).put(*text_chunks(2))
    await read_chunks(env.client.attach(chat_id="chat-1"), 5)
    active = await env.client.get_active("chat-1")
    assert active is not None
    assert (active.stream_id, active.state, active.offset) == (
        started.stream_id,
        StreamState.LIVE,
        5,
    )


async def test_replace_history_keeps_only_the_given_messages(env: Env) -> None:
    first = await env.client.start("chat-1", [user("one")])
    await collect(env.client.attach(stream_id=first.stream_id))
    assert len(await env.client.list_messages("chat-1")) == 2
    regenerated = await env.client.start("chat-1", [user("one")], replace_history=True)
    await collect(env.client.attach(stream_id=regenerated.stream_id))
    messages = await env.client.list_messages("chat-1")
    assert [m.id for m in messages] == ["u1", f"msg_{regenerated.stream_id}"]


async def test_shutdown_interrupts_live_streams_and_keeps_their_partial(env: Env) -> None:
    started = await env.client.start("chat-1", [user("one")], producer="scripted")
    script = env.scripted.script(started.stream_id)
    script.put(*text_chunks(2))
    reader = env.client.attach(stream_id=started.stream_id)
    await read_chunks(reader, 5)

    await env.relay.close(grace=0)

    assert script.cancelled.is_set()
    end = await anext(reader)
    assert isinstance(end, StreamEnd) and end.state is StreamState.INTERRUPTED
    assert end.message is not None and end.message.parts[-1]["text"] == "w0 w1 "
    with pytest.raises(Unavailable):
        await env.client.start("chat-2", [user("one")])


async def test_stop_racing_a_completing_producer_has_one_outcome(env: Env) -> None:
    started = await env.client.start("chat-1", [user("one")], producer="scripted")
    script = env.scripted.script(started.stream_id)
    script.put(*text_chunks(1))
    await read_chunks(env.client.attach(stream_id=started.stream_id), 4)
    script.put(None)  # the producer completes while the Stop is on its way
    result = await env.client.stop("chat-1", started.stream_id)
    _, end = await collect(env.client.attach(stream_id=started.stream_id))
    assert result.end == end
    expected = {
        StopOutcome.STOPPED: StreamState.STOPPED,
        StopOutcome.ALREADY_ENDED: StreamState.COMPLETED,
    }
    assert expected[result.outcome] is end.state
    assert isinstance(end, StreamEnd) and not isinstance(end, ChunkBatch)


async def test_stats_count_live_streams_readers_and_chunks(env: Env) -> None:
    started = await env.client.start("chat-1", [user("one")], producer="scripted")
    env.scripted.script(started.stream_id).put(*text_chunks(2))
    reader = env.client.attach(stream_id=started.stream_id)
    await read_chunks(reader, 5)
    stats = await env.client.get_stats()
    assert (stats.live_streams, stats.retained_streams, stats.readers) == (1, 1, 1)
    assert stats.buffered_chunks == 5
    await env.client.stop("chat-1")
    await collect(reader)
    await eventually(lambda: env.relay.stats().readers == 0)
    assert (await env.client.get_stats()).live_streams == 0


async def test_large_chunks_come_in_responses_a_default_client_accepts(env: Env) -> None:
    started = await env.client.start("chat-1", [user("hi")], producer="scripted")
    big = [{"type": "text-delta", "id": "t", "delta": f"{i}" + "x" * 200_000} for i in range(30)]
    env.scripted.script(started.stream_id).put(*big, None)
    stream = env.relay.streams[started.stream_id]
    await stream.wait_ended()  # 6 MB wait in the buffer: one unbounded batch would carry them all
    # 4 MB is what gRPC clients accept by default, in every language.
    async with RelayClient(env.target, max_message_bytes=4 << 20) as client:
        chunks, end = await collect(client.attach(stream_id=started.stream_id))
        async with client.attach_many() as readers:
            readers.subscribe(1, stream_id=started.stream_id)
            many: list[str] = []
            async for _, event in readers:
                if isinstance(event, StreamEnd):
                    break
                if isinstance(event, ChunkBatch):
                    many.extend(event.chunks)
    assert len(chunks) == len(many) == end.final_offset == 30
    assert chunks == many == stream.chunks
