"""Domain pieces without sockets: message assembly, the echo producer, message parsing, Stream."""

from __future__ import annotations

import asyncio

import pytest

from relay.domain.assembler import MessageAssembler, stream_end
from relay.domain.errors import InvalidArgument
from relay.domain.model import (
    ChunkBatch,
    EndReason,
    Limits,
    StreamEnd,
    StreamState,
    UIMessage,
    dump_json,
    load_json,
    parse_message,
)
from relay.domain.ports import CancelRequest
from relay.domain.stream import Phase, Stream
from relay.producers import EchoProducer, ProduceRequest


def assemble(*chunks: dict[str, object]) -> UIMessage | None:
    assembler = MessageAssembler(fallback_id="fallback")
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.message()


def test_text_and_reasoning_parts_with_metadata() -> None:
    message = assemble(
        {"type": "start", "messageId": "m1", "messageMetadata": {"model": "x"}},
        {"type": "start-step"},
        {"type": "reasoning-start", "id": "r"},
        {"type": "reasoning-delta", "id": "r", "delta": "think"},
        {"type": "reasoning-end", "id": "r"},
        {"type": "text-start", "id": "t"},
        {"type": "text-delta", "id": "t", "delta": "Hel"},
        {"type": "text-delta", "id": "t", "delta": "lo"},
        {"type": "text-end", "id": "t"},
        {"type": "finish-step"},
        {"type": "finish", "messageMetadata": {"usage": 3}},
    )
    assert message == UIMessage(
        "m1",
        "assistant",
        [
            {"type": "step-start"},
            {"type": "reasoning", "text": "think", "state": "done"},
            {"type": "text", "text": "Hello", "state": "done"},
        ],
        {"model": "x", "usage": 3},
    )


def test_tool_calls_move_through_their_states() -> None:
    message = assemble(
        {"type": "tool-input-start", "toolCallId": "c1", "toolName": "weather"},
        {"type": "tool-input-delta", "toolCallId": "c1", "inputTextDelta": '{"city":'},
        {
            "type": "tool-input-available",
            "toolCallId": "c1",
            "toolName": "weather",
            "input": {"city": "Oslo"},
        },
        {"type": "tool-output-available", "toolCallId": "c1", "output": {"temp": 3}},
        {"type": "tool-input-start", "toolCallId": "c2", "toolName": "run", "dynamic": True},
        {"type": "tool-output-error", "toolCallId": "c2", "errorText": "boom"},
    )
    assert message is not None
    assert message.id == "fallback"
    assert message.parts == [
        {
            "type": "tool-weather",
            "toolCallId": "c1",
            "state": "output-available",
            "input": {"city": "Oslo"},
            "output": {"temp": 3},
        },
        {
            "type": "dynamic-tool",
            "toolName": "run",
            "toolCallId": "c2",
            "state": "output-error",
            "input": None,
            "errorText": "boom",
        },
    ]


def test_data_parts_replace_by_id_and_transient_ones_are_not_kept() -> None:
    message = assemble(
        {"type": "data-weather", "id": "w", "data": {"status": "loading"}},
        {"type": "data-weather", "id": "w", "data": {"status": "done"}},
        {"type": "data-note", "data": 1, "transient": True},
        {"type": "source-url", "sourceId": "s", "url": "https://example.com"},
        {"type": "error", "errorText": "ignored"},
    )
    assert message is not None
    assert message.parts == [
        {"type": "data-weather", "data": {"status": "done"}, "id": "w"},
        {"type": "source-url", "sourceId": "s", "url": "https://example.com"},
    ]


# An answer cut in the middle of everything: a closed reasoning part, an open one, an open text,
# a tool whose input is still streaming and one waiting for its output, usage reported so far.
CUT: tuple[dict[str, object], ...] = (
    {"type": "start", "messageId": "m1", "messageMetadata": {"model": "x"}},
    {"type": "start-step"},
    {"type": "reasoning-start", "id": "r0"},
    {"type": "reasoning-delta", "id": "r0", "delta": "done thinking"},
    {"type": "reasoning-end", "id": "r0"},
    {"type": "tool-input-start", "toolCallId": "c1", "toolName": "ready"},
    {"type": "tool-input-available", "toolCallId": "c1", "toolName": "ready", "input": {"a": 1}},
    {"type": "message-metadata", "messageMetadata": {"usage": {"outputTokens": 7}}},
    {"type": "reasoning-start", "id": "r1"},
    {"type": "reasoning-delta", "id": "r1", "delta": "still"},
    {"type": "text-start", "id": "t"},
    {"type": "text-delta", "id": "t", "delta": "Hel"},
    {"type": "tool-input-start", "toolCallId": "c2", "toolName": "echo"},
    {"type": "tool-input-delta", "toolCallId": "c2", "inputTextDelta": '{"te'},
)


def test_a_completed_answer_is_persisted_as_assembled() -> None:
    assembled = assemble(*CUT)
    end = stream_end(StreamState.COMPLETED, 14, "", EndReason.FINISHED, assembled)
    assert end == StreamEnd(StreamState.COMPLETED, 14, "", assembled, EndReason.FINISHED)


@pytest.mark.parametrize(
    ("state", "reason", "error", "stream_end_metadata"),
    [
        (StreamState.STOPPED, EndReason.STOP, "", {"state": "stopped", "reason": "stop"}),
        (
            StreamState.INTERRUPTED,
            EndReason.RELAY_LOST,
            "the relay stopped",
            {"state": "interrupted", "reason": "relay_lost", "error": "the relay stopped"},
        ),
        (
            StreamState.FAILED,
            EndReason.PRODUCER_FAILED,
            "boom \ud800",  # a lone surrogate, as an exception's text may hold: made storable
            {"state": "failed", "reason": "producer_failed", "error": "boom \ufffd"},
        ),
        (
            StreamState.STOPPED,
            EndReason.UNSPECIFIED,  # from a relay that did not say why
            "",
            {"state": "stopped", "reason": "unspecified"},
        ),
    ],
)
def test_an_answer_that_did_not_complete_is_closed_and_says_why(
    state: StreamState, reason: EndReason, error: str, stream_end_metadata: dict[str, str]
) -> None:
    assembled = assemble(*CUT)
    assert assembled is not None
    end = stream_end(state, 14, error, reason, assembled)
    assert (end.state, end.final_offset, end.reason) == (state, 14, reason)
    assert end.error_message == stream_end_metadata.get("error", "")
    assert end.message == UIMessage(
        "m1",
        "assistant",
        [
            {"type": "step-start"},
            {"type": "reasoning", "text": "done thinking", "state": "done"},
            {
                "type": "tool-ready",
                "toolCallId": "c1",
                "state": "input-available",
                "input": {"a": 1},
            },
            {"type": "reasoning", "text": "still", "state": "done"},  # closed
            {"type": "text", "text": "Hel", "state": "done"},  # closed
            # Left as it is: incomplete input no chunk will finish (a model is never sent it).
            {"type": "tool-echo", "toolCallId": "c2", "state": "input-streaming", "input": None},
        ],
        {"model": "x", "usage": {"outputTokens": 7}, "streamEnd": stream_end_metadata},
    )
    dump_json(end.message.to_json())  # storable
    # The assembled message itself is untouched (the stream may be read again).
    assert assembled.parts[4] == {"type": "text", "text": "Hel", "state": "streaming"}


def test_a_clients_partial_keeps_its_text_closed_and_the_producers_usage() -> None:
    assembled = assemble(*CUT)
    partial = UIMessage(
        "m1",
        "assistant",
        [{"type": "text", "text": "He", "state": "streaming"}],
        {"model": "the client's", "seen": True, "usage": {"outputTokens": 0}},
    )
    end = stream_end(StreamState.STOPPED, 14, "", EndReason.STOP, assembled, partial)
    assert end.message == UIMessage(
        "m1",
        "assistant",
        [{"type": "text", "text": "He", "state": "done"}],  # the client's text, closed
        {
            "model": "the client's",
            "seen": True,
            "usage": {"outputTokens": 7},  # the producer's report, whatever the client said
            "streamEnd": {"state": "stopped", "reason": "stop"},
        },
    )
    # Without anything from the producer, the client's message alone.
    alone = stream_end(StreamState.STOPPED, 0, "", EndReason.STOP, None, partial)
    assert alone.message is not None and alone.message.metadata == {
        "model": "the client's",
        "seen": True,
        "usage": {"outputTokens": 0},
        "streamEnd": {"state": "stopped", "reason": "stop"},
    }


def test_an_answer_that_produced_nothing_persists_no_message() -> None:
    for state in StreamState:
        if state is not StreamState.LIVE:
            assert stream_end(state, 1, "", EndReason.UNSPECIFIED, assemble()).message is None


def test_nothing_produced_means_nothing_to_persist() -> None:
    assert assemble({"type": "start", "messageId": "m"}, {"type": "abort"}) is None


async def test_echo_is_deterministic_and_honours_its_options() -> None:
    history = [UIMessage("u", "user", [{"type": "text", "text": "a b"}])]
    request = ProduceRequest("c", "s1", history, {"chunks": "5", "delay_ms": "0"})
    first = [chunk async for chunk in EchoProducer().generate(request)]
    second = [chunk async for chunk in EchoProducer().generate(request)]
    assert first == second
    assert first[0] == {"type": "start", "messageId": "msg_s1"}
    deltas = [c["delta"] for c in first if c["type"] == "text-delta"]
    assert deltas == ["You ", "said: ", "a ", "b ", "You"]
    assert [c["type"] for c in first[-3:]] == ["text-end", "finish-step", "finish"]


@pytest.mark.parametrize(
    ("options", "error"),
    [({"chunks": "0"}, "between"), ({"delay_ms": "-1"}, "between"), ({"speed": "1"}, "unknown")],
)
def test_echo_refuses_bad_options(options: dict[str, str], error: str) -> None:
    with pytest.raises(InvalidArgument, match=error):
        EchoProducer().check_options(options)


def test_json_is_compact_utf8_and_big_integers_survive_the_round_trip() -> None:
    value = {"text": "naïve \u2028 \n", "big": 2**70, "n": [1, 2.5, None, True]}
    text = dump_json(value)
    assert text == '{"text":"naïve \u2028 \\n","big":1180591620717411303424,"n":[1,2.5,null,true]}'
    assert load_json(text) == value


@pytest.mark.parametrize("text", ["NaN", '{"a": Infinity}', "{", "", '{"a":1}x'])
def test_load_json_refuses_what_is_not_json(text: str) -> None:
    with pytest.raises(ValueError):
        load_json(text)


def test_parse_message_accepts_a_well_formed_message() -> None:
    parsed = parse_message("m", "user", '[{"type":"text","text":"hi"}]', '{"a":1}', Limits())
    assert parsed == UIMessage("m", "user", [{"type": "text", "text": "hi"}], {"a": 1})


async def test_a_reader_follows_appends_and_gets_the_end_after_every_chunk() -> None:
    stream = Stream("s", "c", 0.0)
    stream.append("a", 1)
    reader = stream.follow(0, max_batch=10)
    assert await anext(reader) == ChunkBatch(0, ["a"])
    waiting = asyncio.ensure_future(anext(reader))
    await asyncio.sleep(0)
    assert not waiting.done()  # nothing new: the reader waits, it does not spin
    stream.append("b", 1)
    stream.append("c", 1)
    assert await waiting == ChunkBatch(1, ["b", "c"])
    end = StreamEnd(StreamState.COMPLETED, 3)
    stream.finish(end, 1.0)
    assert await anext(reader) == end
    assert stream.readers == 1
    await reader.aclose()
    assert stream.readers == 0


def test_only_one_party_can_claim_the_end_of_a_stream() -> None:
    stream = Stream("s", "c", 0.0)
    assert stream.request_cancel(CancelRequest(StreamState.STOPPED))
    assert not stream.request_cancel(CancelRequest(StreamState.INTERRUPTED))
    stream.phase = Phase.ENDING
    fresh = Stream("t", "c", 0.0)
    fresh.phase = Phase.ENDING
    assert not fresh.request_cancel(CancelRequest(StreamState.STOPPED))
