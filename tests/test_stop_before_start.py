"""A Stop that arrives before the Start it means (the user pressed Stop while the POST was still in
flight) stops that answer as it starts: both orders, each key (request id, last message id),
expiry, a stale Stop that must not kill a regenerate, subjects, and the interleavings where one
of the two is inside its store transaction when the other arrives.

Every test here runs on SQLite and on PostgreSQL + Redis (conftest's `env`), on the domain (the
Relay's own calls), with the fake clock for expiry. Across two relays: tests/test_cluster.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from relay.client import errors as client_errors
from relay.domain.errors import InvalidArgument, NotFound
from relay.domain.model import (
    Caller,
    EndReason,
    StartRequest,
    StopOutcome,
    StreamEnd,
    StreamState,
    UIMessage,
)
from tests.conftest import Env, collect, read_chunks, text_chunks, user
from tests.faults import FaultyStore
from tests.test_faults import faulty_relay

STOPPED_FIRST = StreamEnd(StreamState.STOPPED, 0, "", None, EndReason.STOPPED_BEFORE_START)
ALICE, BOB = Caller("alice"), Caller("bob")


@pytest.fixture(params=["embedded", "cluster"])
def relay_mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def a_start(
    chat_id: str = "chat-1", message_id: str = "u1", request_id: str = "", **fields: object
) -> StartRequest:
    return StartRequest(
        chat_id,
        [user("hi", message_id)],
        producer="scripted",
        request_id=request_id,
        **fields,  # type: ignore[arg-type]
    )


async def assert_stopped_before_start(env: Env, stream_id: str) -> None:
    """The stream ended STOPPED at offset 0 before any producer ran: a reader gets the end and
    no chunk, on the domain and through gRPC, and nothing is live."""
    assert stream_id not in env.scripted.scripts  # its producer never ran
    chunks, end = await collect((await env.relay.attach(stream_id=stream_id)).events)
    assert (chunks, end) == ([], STOPPED_FIRST)
    chunks, end = await collect(env.client.attach(stream_id=stream_id))
    assert (chunks, end) == ([], STOPPED_FIRST)
    assert await env.relay.get_active("chat-1") is None
    assert env.relay.live == 0


@pytest.mark.parametrize("key", ["request_id", "message_id"])
async def test_stop_then_start_the_answer_ends_as_it_starts(env: Env, key: str) -> None:
    request_id, message_id = ("r1", "") if key == "request_id" else ("", "u1")

    stopped = await env.relay.stop("chat-1", request_id=request_id, message_id=message_id)

    assert stopped.outcome is StopOutcome.STOPPED_BEFORE_START
    assert (stopped.stream_id, stopped.end) == ("", None)
    assert await env.relay.list_messages("chat-1") == []  # a Stop writes no message

    started = await env.relay.start(a_start(request_id="r1"))

    assert started.stopped_before_start and not started.deduplicated
    await assert_stopped_before_start(env, started.stream_id)
    assert await env.relay.list_messages("chat-1") == [user("hi", "u1")]  # saved as usual
    assert env.relay.stats().ended_by_reason == {"stopped_before_start": 1}
    # The same Start again (a retry): the same stream, no new one.
    again = await env.relay.start(a_start(request_id="r1"))
    assert again == dataclasses.replace(started, deduplicated=True)
    # The same Stop again: that Start has arrived, and its answer has ended.
    repeated = await env.relay.stop("chat-1", request_id=request_id, message_id=message_id)
    assert repeated.outcome is StopOutcome.ALREADY_ENDED
    assert (repeated.stream_id, repeated.end) == (started.stream_id, STOPPED_FIRST)
    # The tombstone was consumed: the next message's answer runs.
    following = await env.relay.start(a_start(message_id="u2", request_id="r2"))
    assert not following.stopped_before_start
    env.scripted.script(following.stream_id).put(*text_chunks(1), None)
    _, end = await collect((await env.relay.attach(stream_id=following.stream_id)).events)
    assert end.state is StreamState.COMPLETED


@pytest.mark.parametrize("key", ["request_id", "message_id"])
async def test_start_then_stop_the_live_answer_is_stopped(env: Env, key: str) -> None:
    started = await env.relay.start(a_start(request_id="r1"))
    script = env.scripted.script(started.stream_id)
    script.put(*text_chunks(2))
    await read_chunks((await env.relay.attach(stream_id=started.stream_id)).events, 5)

    request_id, message_id = ("r1", "") if key == "request_id" else ("", "u1")
    stopped = await env.relay.stop("chat-1", request_id=request_id, message_id=message_id)

    assert stopped.outcome is StopOutcome.STOPPED and stopped.stream_id == started.stream_id
    assert stopped.end is not None and stopped.end.reason is EndReason.STOP
    assert stopped.end.final_offset == 5 and script.cancelled.is_set()
    # Once ended, a Stop naming it says so, and leaves nothing behind for a later Start.
    repeated = await env.relay.stop("chat-1", request_id=request_id, message_id=message_id)
    assert repeated.outcome is StopOutcome.ALREADY_ENDED and repeated.end == stopped.end
    assert await env.relay.store.delete_stop_tombstones(1e12) == 0


async def test_a_stop_naming_another_start_leaves_the_live_answer_alone(env: Env) -> None:
    started = await env.relay.start(a_start(request_id="r1"))
    script = env.scripted.script(started.stream_id)
    # A Stop for an answer to a message not sent yet: remembered for that one only.
    remembered = await env.relay.stop("chat-1", message_id="u2")
    assert remembered.outcome is StopOutcome.STOPPED_BEFORE_START
    assert not script.cancelled.is_set()
    # With the stream id, the stream id decides (the keys are for a Start not seen yet).
    named = await env.relay.stop("chat-1", "0" * 32, request_id="r1")
    assert named.outcome is StopOutcome.NOT_ACTIVE and not script.cancelled.is_set()
    script.put(None)
    _, end = await collect((await env.relay.attach(stream_id=started.stream_id)).events)
    assert end.state is StreamState.COMPLETED


async def test_a_stale_stop_does_not_kill_a_regenerate_of_an_answered_message(env: Env) -> None:
    """The message a regenerate answers again is persisted already: a Stop naming it by that id
    finds the Start that answered it (ended) and remembers nothing."""
    first = await env.relay.start(a_start())
    env.scripted.script(first.stream_id).put(*text_chunks(1), None)
    _, answered = await collect((await env.relay.attach(stream_id=first.stream_id)).events)

    stale = await env.relay.stop("chat-1", message_id="u1")

    assert stale.outcome is StopOutcome.ALREADY_ENDED
    assert (stale.stream_id, stale.end) == (first.stream_id, answered)
    regenerate = await env.relay.start(a_start(replace_history=True))
    assert not regenerate.stopped_before_start
    script = env.scripted.script(regenerate.stream_id)
    await asyncio.wait_for(script.started.wait(), 10)  # its producer runs
    # By request id, a regenerate in flight can be stopped before it starts.
    assert (await env.relay.stop("chat-1", request_id="r9")).outcome is (
        StopOutcome.STOPPED_BEFORE_START
    )
    script.put(None)
    await collect((await env.relay.attach(stream_id=regenerate.stream_id)).events)
    again = await env.relay.start(a_start(replace_history=True, request_id="r9"))
    assert again.stopped_before_start


async def test_a_tombstone_expires_and_is_swept(env: Env) -> None:
    start_time = env.clock.now
    await env.relay.stop("chat-1", request_id="r1")  # expires at start_time + 60
    env.clock.now = start_time + 60  # still holds at its expiry
    assert (await env.relay.start(a_start(request_id="r1"))).stopped_before_start

    await env.relay.stop("chat-1", request_id="r2")  # expires at start_time + 120
    await env.relay.stop("chat-2", message_id="u1")  # never started: only the sweep frees it
    env.clock.now = start_time + 120.5
    late = await env.relay.start(a_start(message_id="u2", request_id="r2"))
    assert not late.stopped_before_start
    env.scripted.script(late.stream_id).put(None)
    await collect((await env.relay.attach(stream_id=late.stream_id)).events)

    await env.relay.sweep()
    assert await env.relay.store.delete_stop_tombstones(1e12) == 0  # the sweep freed both


async def test_another_subject_cannot_plant_a_tombstone(env: Env) -> None:
    first = await env.relay.start(a_start(request_id="r0"), ALICE)
    env.scripted.script(first.stream_id).put(None)
    await collect((await env.relay.attach(stream_id=first.stream_id, caller=ALICE)).events)

    # Alice's chat reads as one that does not exist for Bob: the same answer, nothing written.
    for request_id, message_id in (("r1", ""), ("", "u2"), ("r0", "")):
        planted = await env.relay.stop(
            "chat-1", caller=BOB, request_id=request_id, message_id=message_id
        )
        unknown = await env.relay.stop(
            "unknown-chat", caller=BOB, request_id=request_id, message_id=message_id
        )
        assert planted == unknown
        assert planted.outcome is StopOutcome.STOPPED_BEFORE_START
    started = await env.relay.start(a_start(message_id="u2", request_id="r1"), ALICE)
    assert not started.stopped_before_start
    env.scripted.script(started.stream_id).put(None)

    # On a chat that does not exist yet, the tombstone is the caller's: only its Start consumes
    # it (another subject's Start takes the chat and runs).
    await env.relay.stop("chat-new", caller=BOB, request_id="r1")
    taken = await env.relay.start(a_start("chat-new", request_id="r1"), ALICE)
    assert not taken.stopped_before_start
    env.scripted.script(taken.stream_id).put(None)
    with pytest.raises(NotFound):
        await env.relay.start(a_start("chat-new", request_id="r1"), BOB)
    await env.relay.stop("chat-bob", caller=BOB, request_id="r1")
    assert (await env.relay.start(a_start("chat-bob", request_id="r1"), BOB)).stopped_before_start


async def test_an_answer_stopped_before_start_is_not_charged_to_its_subject(env: Env) -> None:
    env.relay.limits = dataclasses.replace(env.relay.limits, live_streams_per_subject_max=1)
    await env.relay.stop("chat-1", caller=ALICE, request_id="r1")
    assert (await env.relay.start(a_start(request_id="r1"), ALICE)).stopped_before_start
    # Alice's one live answer is still hers to start.
    live = await env.relay.start(a_start("chat-2"), ALICE)
    assert not live.stopped_before_start
    env.scripted.script(live.stream_id).put(None)


async def test_bad_names_for_a_start_are_refused(env: Env) -> None:
    for request_id, message_id, error in (
        ("r" * 129, "", "request_id is longer than 128 characters"),
        ("\ud800", "", "request_id holds a lone surrogate"),
        ("", "m" * 257, "message_id is longer than 256 characters"),
        ("", "\udfff", "message_id holds a lone surrogate"),
    ):
        with pytest.raises(InvalidArgument, match=error):
            await env.relay.stop("chat-1", request_id=request_id, message_id=message_id)
    with pytest.raises(client_errors.InvalidArgument):
        await env.client.stop("chat-1", request_id="r" * 129)
    assert await env.relay.store.delete_stop_tombstones(1e12) == 0  # nothing recorded


async def test_through_grpc_both_orders(env: Env) -> None:
    stopped = await env.client.stop("chat-1", request_id="r1")
    assert stopped.outcome is StopOutcome.STOPPED_BEFORE_START and stopped.end is None
    started = await env.client.start("chat-1", [user("hi")], producer="scripted", request_id="r1")
    assert started.stopped_before_start
    chunks, end = await collect(env.client.attach(stream_id=started.stream_id))
    assert (chunks, end) == ([], STOPPED_FIRST)

    second = await env.client.start(
        "chat-1", [user("again", "u2")], producer="scripted", request_id="r2"
    )
    assert not second.stopped_before_start
    env.scripted.script(second.stream_id).put(*text_chunks(1))
    await read_chunks(env.client.attach(stream_id=second.stream_id), 4)
    result = await env.client.stop("chat-1", message_id="u2")
    assert result.outcome is StopOutcome.STOPPED and result.stream_id == second.stream_id


# -- interleavings on one relay: one side is inside its store transaction ----------------------


async def test_a_stop_arriving_while_its_start_is_being_recorded_stops_the_started_answer(
    tmp_path: Path,
) -> None:
    async with faulty_relay(tmp_path) as (r, scripted, store):
        assert isinstance(store, FaultyStore)
        held = store.block("begin_stream")
        starting = asyncio.ensure_future(r.relay.start(a_start(request_id="r1")))
        await held.entered.wait()  # the Start is inside its transaction
        stopping = asyncio.ensure_future(r.relay.stop("chat-1", request_id="r1"))
        await asyncio.sleep(0.01)
        assert not stopping.done()  # it waits for the Start (the chat's lock)
        assert "stop_before_start" not in store.calls
        store.heal("begin_stream")
        started = await starting
        assert not started.stopped_before_start
        stopped = await stopping
        assert stopped.outcome is StopOutcome.STOPPED and stopped.stream_id == started.stream_id
        assert stopped.end is not None and stopped.end.reason is EndReason.STOP
        assert scripted.script(started.stream_id).closed.is_set()


async def test_a_start_arriving_while_its_stop_is_being_recorded_ends_as_it_starts(
    tmp_path: Path,
) -> None:
    async with faulty_relay(tmp_path) as (r, scripted, store):
        assert isinstance(store, FaultyStore)
        held = store.block("stop_before_start")
        stopping = asyncio.ensure_future(r.relay.stop("chat-1", request_id="r1"))
        await held.entered.wait()  # the Stop is inside its transaction
        starting = asyncio.ensure_future(r.relay.start(a_start(request_id="r1")))
        await asyncio.sleep(0.01)
        assert not starting.done()  # it waits for the Stop (the chat's lock)
        assert "begin_stream" not in store.calls
        store.heal("stop_before_start")
        assert (await stopping).outcome is StopOutcome.STOPPED_BEFORE_START
        started = await starting
        assert started.stopped_before_start and started.stream_id not in scripted.scripts
        assert UIMessage("u1", "user", [{"type": "text", "text": "hi"}]) in (
            await r.relay.list_messages("chat-1")
        )


@pytest.mark.parametrize("supersede", [True, False])
async def test_a_late_stopped_start_leaves_a_newer_live_answer_and_its_history_alone(
    env: Env, supersede: bool
) -> None:
    """The user pressed Stop while POST 1 (u1, key r1) was in flight, then sent u2, whose POST
    overtook it and is streaming. POST 1 arrives late, with the whole history as the gateway
    sends it: it ends stopped at once, neither superseding u2's answer (or being refused for it,
    without supersede) nor cutting u2 from the history."""
    stop = await env.relay.stop("chat-1", request_id="r1")
    assert stop.outcome is StopOutcome.STOPPED_BEFORE_START
    both = [user("first", "u1"), user("second", "u2")]
    live = await env.relay.start(
        StartRequest("chat-1", both, replace_history=True, producer="scripted", request_id="r2")
    )
    script = env.scripted.script(live.stream_id)
    script.put(*text_chunks(2))

    late = await env.relay.start(
        StartRequest(
            "chat-1",
            [user("first", "u1")],
            replace_history=True,
            producer="scripted",
            request_id="r1",
            supersede=supersede,
        )
    )

    assert late.stopped_before_start and late.superseded_stream_id == ""
    assert late.stream_id not in env.scripted.scripts
    active = await env.relay.get_active("chat-1")
    assert active is not None and active.stream_id == live.stream_id
    assert active.state is StreamState.LIVE and not script.cancelled.is_set()
    assert [m.id for m in await env.relay.list_messages("chat-1")] == ["u1", "u2"]
    script.put({"type": "text-end", "id": "t"}, None)
    end = await env.relay.streams[live.stream_id].wait_ended()
    assert (end.state, end.reason) == (StreamState.COMPLETED, EndReason.FINISHED)


@pytest.mark.parametrize("key", ["request_id", "message_id"])
async def test_a_stop_or_start_key_with_control_characters_is_refused(env: Env, key: str) -> None:
    """No store can key by a NUL (PostgreSQL text holds none): refused as bad input, not a
    failing store, and nothing is recorded."""
    with pytest.raises(InvalidArgument, match="control characters"):
        await env.relay.stop("chat-1", **{key: "r\x001"})  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="control characters"):
        await env.relay.start(a_start(request_id="r\x001", message_id="u\x001"))
    assert await env.relay.list_messages("chat-1") == []
    assert env.relay.healthy
