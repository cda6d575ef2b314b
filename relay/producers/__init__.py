"""Producers generate a stream's UI message chunks. The relay owns their task; they just yield.

A producer is cancelled (CancelledError at an await) only by Stop, supersede or shutdown; it must
let the error propagate, closing its upstream on the way out.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncGenerator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from relay.domain.errors import InvalidArgument
from relay.domain.model import JsonObject, UIMessage, shown


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

    def generate(self, request: ProduceRequest) -> AsyncGenerator[JsonObject, None]:
        """Yields UI message chunks (`{"type": ...}` objects) in order."""
        ...


class ProducerRegistry:
    def __init__(self, producers: Mapping[str, Producer], default: str) -> None:
        if default not in producers:
            raise ValueError(f"default producer {default!r} is not registered")
        self._producers = dict(producers)
        self.default = default

    def get(self, name: str) -> Producer:
        producer = self._producers.get(name or self.default)
        if producer is None:
            known = ", ".join(sorted(self._producers))
            raise InvalidArgument(f"unknown producer {shown(name)}; known producers: {known}")
        return producer

    async def close(self) -> None:
        """Closes the producers that hold connections (those with an async `close`)."""
        for producer in self._producers.values():
            close = getattr(producer, "close", None)
            if close is not None:
                await close()


_BURST = 64  # chunks a zero-delay echo yields between returns to the event loop


class EchoProducer:
    """Streams a deterministic answer built from the last user message, one word per delta.

    Options: `delay_ms` (pause before each chunk), `chunks` (number of text deltas; default: the
    words of the answer once). The answer repeats its words to reach `chunks`.
    """

    def __init__(self, delay_ms: float = 30.0) -> None:
        self.delay_ms = delay_ms

    def check_options(self, options: Mapping[str, str]) -> None:
        self._parse(options)

    def _parse(self, options: Mapping[str, str]) -> tuple[float, int | None]:
        unknown = set(options) - {"delay_ms", "chunks"}
        if unknown:
            raise InvalidArgument(f"echo producer: unknown options {shown_names(unknown)}")
        delay = self.delay_ms
        if "delay_ms" in options:
            delay = number_option("echo", "delay_ms", options["delay_ms"], float, 0, 60_000)
        chunks = None
        if "chunks" in options:
            chunks = int(number_option("echo", "chunks", options["chunks"], int, 1, 10**7))
        return delay, chunks

    async def generate(self, request: ProduceRequest) -> AsyncGenerator[JsonObject, None]:
        delay_ms, count = self._parse(request.options)
        words = echo_words(request.messages)
        count = len(words) if count is None else count
        deltas = (
            {
                "type": "text-delta",
                "id": "t0",
                "delta": words[i % len(words)] + (" " if i < count - 1 else ""),
            }
            for i in range(count)
        )
        script = itertools.chain(
            [
                {"type": "start", "messageId": f"msg_{request.stream_id}"},
                {"type": "start-step"},
                {"type": "text-start", "id": "t0"},
            ],
            deltas,
            [
                {"type": "text-end", "id": "t0"},
                {"type": "finish-step"},
                {"type": "finish", "finishReason": "stop"},
            ],
        )
        delay = delay_ms / 1000
        for i, chunk in enumerate(script):
            # Without a delay, still yield to the event loop now and then, so one fast producer
            # never starves the readers and the other streams.
            if delay or i % _BURST == 0:
                await asyncio.sleep(delay)
            yield chunk


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


def shown_names(names: Iterable[str], most: int = 5) -> str:
    """Client-chosen names (unknown options) as an error message lists them: sorted, each cut
    short, at most `most` of them."""
    ordered = sorted(names)
    listed = ", ".join(shown(name) for name in ordered[:most])
    more = len(ordered) - most
    return f"[{listed}{f', and {more} more' if more > 0 else ''}]"


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
