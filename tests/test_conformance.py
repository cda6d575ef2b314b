"""The echo producer's `parts` option (reasoning, tool and text parts in one step, for the
scenarios that resume inside each kind of part), and the conformance kit (conformance/) run with
the real AI SDK client against the gateway."""

from __future__ import annotations

import json

import pytest

from relay.domain.assembler import MessageAssembler
from relay.domain.errors import InvalidArgument
from relay.domain.model import ANONYMOUS, JsonObject
from relay.producers import EchoProducer, ProduceRequest
from relay.producers.profiles import build_registry
from tests.conftest import user


async def echo_chunks(text: str, options: dict[str, str]) -> list[JsonObject]:
    producer = EchoProducer(delay_ms=0)
    producer.check_options(options)
    request = ProduceRequest("chat", "s1", [user(text)], options)
    return [chunk async for chunk in producer.generate(request)]


def compact(chunks: list[JsonObject]) -> list[str]:
    """Chunks as the relay stores and serves them: compact JSON, keys in the producer's order."""
    return [json.dumps(c, separators=(",", ":"), ensure_ascii=False) for c in chunks]


TEXT_ANSWER = [
    '{"type":"start","messageId":"msg_s1"}',
    '{"type":"start-step"}',
    '{"type":"text-start","id":"t0"}',
    '{"type":"text-delta","id":"t0","delta":"You "}',
    '{"type":"text-delta","id":"t0","delta":"said: "}',
    '{"type":"text-delta","id":"t0","delta":"hi"}',
    '{"type":"text-end","id":"t0"}',
    '{"type":"finish-step"}',
    '{"type":"finish","finishReason":"stop"}',
]


@pytest.mark.parametrize("options", [{}, {"parts": "text"}, {"parts": " text "}])
async def test_echo_parts_text_is_todays_answer_byte_for_byte(options: dict[str, str]) -> None:
    assert compact(await echo_chunks("hi", options)) == TEXT_ANSWER


async def test_echo_parts_stream_each_part_in_order_and_assemble_to_the_message() -> None:
    chunks = await echo_chunks('a "b', {"parts": "reasoning,tool,text"})
    answer = 'You said: a "b'
    pieces = ["You ", "said: ", "a ", '"b']
    assert chunks[:2] == [{"type": "start", "messageId": "msg_s1"}, {"type": "start-step"}]
    assert chunks[-2:] == [{"type": "finish-step"}, {"type": "finish", "finishReason": "stop"}]
    reasoning = [{"type": "reasoning-start", "id": "r0"}]
    reasoning += [{"type": "reasoning-delta", "id": "r0", "delta": p} for p in pieces]
    reasoning += [{"type": "reasoning-end", "id": "r0"}]
    call = {"toolCallId": "call0", "toolName": "echo"}
    tool_deltas = chunks[2 + len(reasoning) + 1 : 2 + len(reasoning) + 1 + len(pieces)]
    tool = [{"type": "tool-input-start", **call}, *tool_deltas]
    tool += [
        {"type": "tool-input-available", **call, "input": {"text": answer}},
        {"type": "tool-output-available", "toolCallId": "call0", "output": {"words": 4}},
    ]
    text = [{"type": "text-start", "id": "t0"}]
    text += [{"type": "text-delta", "id": "t0", "delta": p} for p in pieces]
    text += [{"type": "text-end", "id": "t0"}]
    assert chunks[2:-2] == reasoning + tool + text

    # The tool input streams as JSON text, one piece per word, that parses to the input.
    assert [c["type"] for c in tool_deltas] == ["tool-input-delta"] * len(pieces)
    assert all(c["toolCallId"] == "call0" for c in tool_deltas)
    input_text = "".join(str(c["inputTextDelta"]) for c in tool_deltas)
    assert input_text == json.dumps({"text": answer}, separators=(",", ":"))
    assert json.loads(input_text) == {"text": answer}

    assembler = MessageAssembler("fallback")
    for chunk in chunks:
        assembler.add(chunk)
    message = assembler.message()
    assert message is not None
    assert message.id == "msg_s1"
    assert message.parts == [
        {"type": "step-start"},
        {"type": "reasoning", "text": answer, "state": "done"},
        {
            "type": "tool-echo",
            "toolCallId": "call0",
            "state": "output-available",
            "input": {"text": answer},
            "output": {"words": 4},
        },
        {"type": "text", "text": answer, "state": "done"},
    ]


async def test_echo_parts_chunks_counts_the_deltas_of_each_part_and_repeats_get_new_ids() -> None:
    chunks = await echo_chunks("x", {"parts": "text,reasoning,text,tool,tool", "chunks": "5"})
    deltas: dict[str, int] = {}
    for chunk in chunks:
        if str(chunk["type"]).endswith("-delta"):
            key = str(chunk.get("id", chunk.get("toolCallId")))
            deltas[key] = deltas.get(key, 0) + 1
    assert deltas == {"t0": 5, "r0": 5, "t1": 5, "call0": 5, "call1": 5}
    starts = [c.get("id", c.get("toolCallId")) for c in chunks if str(c["type"]).endswith("start")]
    assert starts == [None, "t0", "r0", "t1", "call0", "call1"]  # `start` first
    outputs = [c["output"] for c in chunks if c["type"] == "tool-output-available"]
    assert outputs == [{"words": 5}, {"words": 5}]


@pytest.mark.parametrize("parts", ["", "text,", "image", "text,Tool", "reasoning;text"])
async def test_echo_refuses_unknown_parts_naming_the_value(parts: str) -> None:
    with pytest.raises(InvalidArgument, match="parts must be a comma-separated list") as refused:
        EchoProducer(delay_ms=0).check_options({"parts": parts})
    assert repr(parts) in str(refused.value)


def test_the_echo_profile_lets_clients_choose_parts() -> None:
    registry = build_registry({}, echo_delay_ms=0)
    options = {"parts": "reasoning,tool,text", "chunks": "3", "delay_ms": "5"}
    assert isinstance(registry.admit("echo", options, ANONYMOUS), EchoProducer)
    with pytest.raises(InvalidArgument, match="got 'video'"):
        registry.admit("echo", {"parts": "video"}, ANONYMOUS)
    with pytest.raises(InvalidArgument, match="parts must be at most 64 characters"):
        registry.admit("echo", {"parts": ",".join(["text"] * 20)}, ANONYMOUS)
