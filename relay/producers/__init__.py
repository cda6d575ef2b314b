"""Producers generate a stream's UI message chunks. The relay owns their task; they just yield.

A producer is cancelled (CancelledError at an await) only by Stop, supersede or shutdown; it must
let the error propagate, closing its upstream on the way out.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from relay.domain.errors import InvalidArgument
from relay.domain.model import Caller, JsonObject, UIMessage, shown
from relay.producers.policy import OPEN, ProducerPolicy, shown_names

__all__ = [
    "EchoProducer",
    "ProduceRequest",
    "Producer",
    "ProducerFailed",
    "ProducerRegistry",
    "echo_parts",
    "echo_words",
    "number_option",
    "shown_names",
]


class ProducerFailed(Exception):
    """Raised by a producer to end its stream FAILED with this message (after yielding an
    `error` chunk, so UI clients show it too). Any other exception fails the stream as well."""


@dataclass(frozen=True, slots=True)
class ProduceRequest:
    chat_id: str
    stream_id: str
    messages: list[UIMessage]  # the chat's whole persisted history, oldest first
    options: Mapping[str, str] = field(default_factory=dict)


class Producer(Protocol):
    def check_options(self, options: Mapping[str, str]) -> None:
        """Raises InvalidArgument for options this producer does not understand."""

    def generate(
        self, request: ProduceRequest
    ) -> AsyncGenerator[JsonObject | list[JsonObject], None]:
        """Yields UI message chunks (`{"type": ...}` objects) in order: each alone (a dict), or
        several at once as a batch (a list of them, e.g. what a remote producer sent in one
        message). A batch is taken as if its chunks were yielded one by one, with the same
        checks and limits, but appended at once, its readers woken once: a fast producer yields
        what it has ready as one batch. At a chunk the relay refuses (not an object with a
        string `type`, over a size limit) the stream fails; the chunks before it, in its batch
        too, are kept. A batch crossing the stream's chunk budget keeps the chunks up to it;
        once the stream is claimed (a Stop, a policy end) the rest of a batch is dropped."""
        ...


class ProducerRegistry:
    """The producers a relay runs, by name, and the policy of each: who may start it and which
    options a client may set (relay.producers.policy). A producer registered without a policy
    (in code: tests, benchmarks, an embedding application) is open to every caller and option,
    left to its own `check_options`."""

    def __init__(
        self,
        producers: Mapping[str, Producer],
        default: str,
        policies: Mapping[str, ProducerPolicy] | None = None,
    ) -> None:
        if default not in producers:
            raise ValueError(f"default producer {default!r} is not registered")
        strays = set(policies or {}) - set(producers)
        if strays:
            raise ValueError(f"policies for producers that are not registered: {sorted(strays)}")
        self._producers = dict(producers)
        self._policies = dict(policies or {})
        self.default = default

    def get(self, name: str) -> Producer:
        """The producer called `name` ("" is the default), for the relay itself: no policy."""
        producer = self._producers.get(name or self.default)
        if producer is None:
            raise self._unknown(name, self._producers)
        return producer

    def policy(self, name: str) -> ProducerPolicy:
        return self._policies.get(name, OPEN)

    def admit(
        self,
        name: str,
        options: Mapping[str, str],
        caller: Caller,
        messages: Sequence[UIMessage] = (),
    ) -> Producer:
        """The producer a client's Start names ("" is the default), if `caller` may start it
        with these options and messages. A producer the caller may not start is refused exactly
        like one that does not exist (the list of known producers holds only those it may
        start), so its existence does not leak. Then the client's options must be ones the
        profile lets a client set, within its bounds, and the producer must understand them;
        and a system message counts as setting `system` (else a client would override the
        operator's prompt through the history). Each is InvalidArgument otherwise."""
        resolved = name or self.default
        producer = self._producers.get(resolved)
        policy = self.policy(resolved)
        if producer is None or not policy.admits(resolved, caller):
            usable = [n for n in self._producers if self.policy(n).admits(n, caller)]
            raise self._unknown(name, usable)
        policy.client_options.check(resolved, options)
        if any(m.role == "system" for m in messages) and not policy.client_options.allows("system"):
            raise InvalidArgument(
                f"producer {shown(resolved)}: a client may not send system messages (its "
                "profile does not let clients set `system`)"
            )
        producer.check_options(options)
        return producer

    @staticmethod
    def _unknown(name: str, known: Iterable[str]) -> InvalidArgument:
        listed = ", ".join(sorted(known)) or "none"
        return InvalidArgument(f"unknown producer {shown(name)}; known producers: {listed}")

    async def close(self) -> None:
        """Closes the producers that hold connections (those with an async `close`)."""
        for producer in self._producers.values():
            close = getattr(producer, "close", None)
            if close is not None:
                await close()


_BURST = 64  # chunks a zero-delay echo yields between returns to the event loop

ECHO_PARTS = ("reasoning", "tool", "text")  # what the echo's `parts` option may list


class EchoProducer:
    """Streams a deterministic answer built from the last user message, one word per delta.

    Options: `delay_ms` (pause before each chunk), `chunks` (number of deltas per streamed part;
    default: the words of the answer once; the answer repeats its words to reach it) and `parts`
    (a comma-separated sequence of `reasoning`, `tool` and `text`, default `text`: the parts of
    the one step, in order, each streaming the answer one word per delta; see `_part_chunks`).
    """

    OPTIONS = ("delay_ms", "chunks", "parts")

    def __init__(self, delay_ms: float = 30.0) -> None:
        self.delay_ms = delay_ms

    def check_options(self, options: Mapping[str, str]) -> None:
        self._parse(options)

    def _parse(self, options: Mapping[str, str]) -> tuple[float, int | None, list[str]]:
        unknown = set(options) - set(self.OPTIONS)
        if unknown:
            raise InvalidArgument(f"echo producer: unknown options {shown_names(unknown)}")
        delay = self.delay_ms
        if "delay_ms" in options:
            delay = number_option("echo", "delay_ms", options["delay_ms"], float, 0, 60_000)
        chunks = None
        if "chunks" in options:
            chunks = int(number_option("echo", "chunks", options["chunks"], int, 1, 10**7))
        parts = echo_parts(options.get("parts", "text"))
        return delay, chunks, parts

    async def generate(self, request: ProduceRequest) -> AsyncGenerator[JsonObject, None]:
        delay_ms, count, parts = self._parse(request.options)
        words = echo_words(request.messages)
        count = len(words) if count is None else count
        # The answer's words, repeated to reach `count`, each with the space that follows it.
        pieces = [words[i % len(words)] + (" " if i < count - 1 else "") for i in range(count)]
        seen: dict[str, int] = {}
        body: list[Iterable[JsonObject]] = []
        for kind in parts:
            number = seen[kind] = seen.get(kind, -1) + 1
            body.append(_part_chunks(kind, number, pieces))
        script = itertools.chain(
            [{"type": "start", "messageId": f"msg_{request.stream_id}"}, {"type": "start-step"}],
            *body,
            [{"type": "finish-step"}, {"type": "finish", "finishReason": "stop"}],
        )
        delay = delay_ms / 1000
        for i, chunk in enumerate(script):
            # Without a delay, still yield to the event loop now and then, so one fast producer
            # never starves the readers and the other streams.
            if delay or i % _BURST == 0:
                await asyncio.sleep(delay)
            yield chunk


def echo_parts(raw: str) -> list[str]:
    """The echo's `parts` option: a comma-separated sequence of ECHO_PARTS names (spaces around
    a name are ignored); InvalidArgument naming the value otherwise."""
    parts = [name.strip() for name in raw.split(",")]
    if not all(name in ECHO_PARTS for name in parts):
        raise InvalidArgument(
            f"echo producer: parts must be a comma-separated list of {', '.join(ECHO_PARTS)}; "
            f"got {shown(raw)}"
        )
    return parts


def _part_chunks(kind: str, number: int, pieces: list[str]) -> Iterable[JsonObject]:
    """One part of the echo answer, `pieces` (its words, each with its trailing space) one per
    delta. The `number`th part of its kind gets the ids `t<number>` (text), `r<number>`
    (reasoning) or `call<number>` (tool: a call of the tool `echo` whose input is
    `{"text": <the answer>}`, its JSON text streamed in one piece per word, and whose output is
    `{"words": <the number of words>}`)."""
    if kind in ("text", "reasoning"):
        part_id = f"{kind[0]}{number}"
        yield {"type": f"{kind}-start", "id": part_id}
        for piece in pieces:
            yield {"type": f"{kind}-delta", "id": part_id, "delta": piece}
        yield {"type": f"{kind}-end", "id": part_id}
        return
    call = {"toolCallId": f"call{number}", "toolName": "echo"}
    yield {"type": "tool-input-start", **call}
    # JSON escapes character by character, so the escaped pieces join into the escaped answer.
    escaped = [json.dumps(piece, ensure_ascii=False)[1:-1] for piece in pieces]
    escaped[0] = '{"text":"' + escaped[0]
    escaped[-1] += '"}'
    for text in escaped:
        yield {"type": "tool-input-delta", "toolCallId": call["toolCallId"], "inputTextDelta": text}
    yield {"type": "tool-input-available", **call, "input": {"text": "".join(pieces)}}
    yield {
        "type": "tool-output-available",
        "toolCallId": call["toolCallId"],
        "output": {"words": len(pieces)},
    }


def echo_words(messages: list[UIMessage]) -> list[str]:
    """The words of the echo answer: 'You said: <the last user message's text>'."""
    text = ""
    for message in reversed(messages):
        if message.role == "user":
            text = " ".join(
                str(p.get("text", "")) for p in message.parts if p.get("type") == "text"
            ).strip()
            break
    answer = f"You said: {text}" if text else "You said nothing."
    return answer.split()


async def _pause(seconds: float) -> None:
    # A zero delay still yields to the event loop, so a fast producer never starves readers.
    await asyncio.sleep(seconds)


def number_option(
    producer: str, key: str, raw: str, kind: type[int] | type[float], low: float, high: float
) -> int | float:
    """An option's text as a number within [low, high]; InvalidArgument naming the producer."""
    try:
        value = kind(raw)
    except ValueError:
        raise InvalidArgument(
            f"{producer} producer: {key} must be a number, got {shown(raw)}"
        ) from None
    if not low <= value <= high:
        raise InvalidArgument(f"{producer} producer: {key} must be between {low:g} and {high:g}")
    return value
