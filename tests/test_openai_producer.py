"""The `openai` producer against a fake OpenAI-compatible server (raw ASGI under uvicorn on an
ephemeral port), through a real relay and grpc.aio server.

The fake server sends each SSE line only when the test hands it over, and records every request,
whether it finished its response and whether it saw the client close the connection: so "Stop
closes the upstream request" is observed by the upstream itself, not inferred.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections import deque
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from relay.client import RelayClient
from relay.client import errors as client_errors
from relay.domain.core import Relay
from relay.domain.errors import InvalidArgument
from relay.domain.model import ChunkBatch, JsonObject, StreamEnd, StreamState, UIMessage
from relay.producers import EchoProducer, Producer, ProduceRequest
from relay.producers.openai import OpenAIProducer
from relay.producers.profiles import Profile, ProfileError, build_producer
from relay.server import RunningServer
from tests.conftest import collect, eventually, read_chunks, running_relay, user

SECRET = "sk-test-5ecret-do-not-leak"
KEY_ENV = "STREAM_RELAY_TEST_OPENAI_KEY"
MODEL = "fake-model"
REPORTED_MODEL = "fake-model-2024-06"


# -- the fake upstream -----------------------------------------------------------------------


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    peer: tuple[str, int] | None = None  # the client's address: its connection


class Gone(Exception):
    """The client closed the connection while the fake server waited."""


@dataclass
class Reply:
    """One scripted response: the server sends each queued item as it is put; None ends it."""

    status: int = 200
    content_type: str = "text/event-stream"
    hold_headers: asyncio.Event | None = None  # set: wait for it before sending the headers
    feed: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)
    request: Recorded | None = None
    requested: asyncio.Event = field(default_factory=asyncio.Event)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)  # the client went away
    completed: asyncio.Event = field(default_factory=asyncio.Event)  # the whole body was sent
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # the handler returned
    finishing: bool = False

    def put(self, *items: bytes | None) -> None:
        for item in items:
            self.feed.put_nowait(item)


class FakeUpstream:
    """A raw ASGI app: POST /v1/chat/completions answers with the next expected Reply."""

    def __init__(self) -> None:
        self.url = ""
        self.pending: deque[Reply] = deque()
        self.replies: list[Reply] = []
        self.requests: list[Recorded] = []  # every request, expected or not

    def expect(self, **kwargs: Any) -> Reply:
        reply = Reply(**kwargs)
        self.pending.append(reply)
        self.replies.append(reply)
        return reply

    def release(self) -> None:
        for reply in self.replies:
            reply.put(None)
            if reply.hold_headers is not None:
                reply.hold_headers.set()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        reply = self.pending.popleft() if self.pending else Reply(status=599)
        reply.request = Recorded(
            scope["method"],
            scope["path"],
            {k.decode().lower(): v.decode() for k, v in scope["headers"]},
            json.loads(body) if body else None,
            tuple(scope["client"]) if scope.get("client") else None,
        )
        self.requests.append(reply.request)
        reply.requested.set()
        watcher = asyncio.create_task(self._watch(receive, reply))
        try:
            if reply.hold_headers is not None:
                await self._until(reply.hold_headers.wait(), reply)
            await send(
                {
                    "type": "http.response.start",
                    "status": reply.status,
                    "headers": [(b"content-type", reply.content_type.encode())],
                }
            )
            while (item := await self._until(reply.feed.get(), reply)) is not None:
                await send({"type": "http.response.body", "body": item, "more_body": True})
            reply.finishing = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            reply.completed.set()
        except Gone:
            pass
        finally:
            watcher.cancel()
            reply.closed.set()

    @staticmethod
    async def _watch(receive: Any, reply: Reply) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not reply.finishing:  # uvicorn also says "disconnect" once a response is complete
            reply.disconnected.set()

    @staticmethod
    async def _until(awaitable: Awaitable[Any], reply: Reply) -> Any:
        """Awaits `awaitable` unless the client goes away first (then raises Gone)."""
        task = asyncio.ensure_future(awaitable)
        gone = asyncio.ensure_future(reply.disconnected.wait())
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if task.done():
            return task.result()
        task.cancel()
        raise Gone


def data(value: Any) -> bytes:
    return f"data: {json.dumps(value)}\n\n".encode()


def delta(**fields: Any) -> bytes:
    return data(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "model": REPORTED_MODEL,
            "choices": [{"index": 0, "delta": fields, "finish_reason": None}],
        }
    )


def finish(reason: str) -> bytes:
    return data(
        {
            "id": "chatcmpl-1",
            "model": REPORTED_MODEL,
            "choices": [{"index": 0, "delta": {}, "finish_reason": reason}],
        }
    )


def usage(prompt: int, completion: int) -> bytes:
    return data(
        {
            "id": "chatcmpl-1",
            "model": REPORTED_MODEL,
            "choices": [],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }
    )


DONE = b"data: [DONE]\n\n"


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    fake.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    config = uvicorn.Config(fake, log_config=None, lifespan="off", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    await eventually(lambda: server.started)
    try:
        yield fake
    finally:
        fake.release()
        server.should_exit = True
        await task
        sock.close()


@dataclass
class Rig:
    relay: Relay
    client: RelayClient
    server: RunningServer
    upstream: FakeUpstream
    db: Path
    refused_url: str

    async def run(
        self, producer: str = "gpt", options: dict[str, str] | None = None
    ) -> tuple[str, list[JsonObject], StreamEnd]:
        """Starts a stream on chat-1 and reads it whole: (stream id, parsed chunks, end)."""
        started = await self.client.start(
            "chat-1", [user("hi")], producer=producer, options=options
        )
        chunks, end = await collect(self.client.attach(stream_id=started.stream_id))
        return started.stream_id, [json.loads(c) for c in chunks], end


def openai_profile(name: str, base_url: str, **fields: Any) -> Profile:
    return Profile(name, "openai", base_url=base_url, model=MODEL, api_key_env=KEY_ENV, **fields)


@pytest.fixture
async def rig(
    tmp_path: Path, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Rig]:
    monkeypatch.setenv(KEY_ENV, SECRET)
    refused = socket.socket()  # bound but never listening: connecting to it is refused
    refused.bind(("127.0.0.1", 0))
    refused_url = f"http://127.0.0.1:{refused.getsockname()[1]}/v1"
    producers: dict[str, Producer] = {
        "echo": EchoProducer(delay_ms=0),
        "gpt": build_producer(openai_profile("gpt", upstream.url, idle_timeout_s=10)),
        "gpt-stall": build_producer(openai_profile("gpt-stall", upstream.url, idle_timeout_s=0.2)),
        "down": build_producer(openai_profile("down", refused_url, connect_timeout_s=5)),
    }
    db = tmp_path / "relay.sqlite3"
    try:
        async with running_relay(db, producers) as running:
            yield Rig(running.relay, running.client, running.server, upstream, db, refused_url)
    finally:
        refused.close()


def texts(chunks: list[JsonObject]) -> str:
    return "".join(c["delta"] for c in chunks if c["type"] == "text-delta")


# -- full streams ----------------------------------------------------------------------------


async def test_a_text_answer_streams_and_is_persisted_with_usage(rig: Rig) -> None:
    reply = rig.upstream.expect()
    reply.put(
        delta(role="assistant", content=""),
        delta(content="Hello"),
        delta(content=" world"),
        finish("stop"),
        usage(12, 3),
        DONE,
        None,
    )

    stream_id, chunks, end = await rig.run()

    metadata = {
        "usage": {"inputTokens": 12, "outputTokens": 3, "totalTokens": 15},
        "model": REPORTED_MODEL,
    }
    assert chunks == [
        {"type": "start", "messageId": f"msg_{stream_id}"},
        {"type": "start-step"},
        {"type": "text-start", "id": "t0"},
        {"type": "text-delta", "id": "t0", "delta": "Hello"},
        {"type": "text-delta", "id": "t0", "delta": " world"},
        {"type": "text-end", "id": "t0"},
        {"type": "finish-step"},
        {"type": "finish", "finishReason": "stop", "messageMetadata": metadata},
    ]
    assert end.state is StreamState.COMPLETED
    saved = (await rig.client.list_messages("chat-1"))[-1]
    assert saved == UIMessage(
        f"msg_{stream_id}",
        "assistant",
        [{"type": "step-start"}, {"type": "text", "text": "Hello world", "state": "done"}],
        metadata,
    )
    assert reply.request is not None
    assert (reply.request.method, reply.request.path) == ("POST", "/v1/chat/completions")
    assert reply.request.body == {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def test_an_upstream_that_holds_its_body_open_after_done_still_completes(rig: Rig) -> None:
    """[DONE] ends the answer, even when the body does not end after it (a server holding the
    connection): the idle timeout no longer runs, the finish goes out, and the connection is
    dropped after a short wait instead of going back to the pool."""
    reply = rig.upstream.expect()
    reply.put(delta(content="Hi"), finish("stop"), DONE)  # and no end of the body

    _, chunks, end = await rig.run(producer="gpt-stall")  # idle timeout 0.2 s

    assert end.state is StreamState.COMPLETED
    assert (chunks[-1]["type"], chunks[-1]["finishReason"]) == ("finish", "stop")
    await asyncio.wait_for(reply.disconnected.wait(), 5)


async def test_the_streams_of_a_profile_share_one_pooled_connection(rig: Rig) -> None:
    """One HTTP client per profile, its connections kept alive: a second answer reuses the
    first one's connection instead of opening another (and another TLS handshake)."""
    for _ in range(2):
        rig.upstream.expect().put(delta(content="Hi"), finish("stop"), DONE, None)
        _, _, end = await rig.run()
        assert end.state is StreamState.COMPLETED
    first, second = rig.upstream.requests
    assert first.peer is not None and first.peer == second.peer


@pytest.mark.parametrize("field_name", ["reasoning_content", "reasoning"])
async def test_reasoning_streams_as_a_reasoning_part_before_the_text(
    rig: Rig, field_name: str
) -> None:
    reply = rig.upstream.expect()
    reply.put(
        delta(**{field_name: "Six times"}),
        delta(**{field_name: " seven."}),
        delta(content="42"),
        finish("stop"),
        DONE,
        None,
    )

    _, chunks, end = await rig.run()

    assert [c["type"] for c in chunks[2:-2]] == [
        "reasoning-start",
        "reasoning-delta",
        "reasoning-delta",
        "reasoning-end",
        "text-start",
        "text-delta",
        "text-end",
    ]
    assert {c["id"] for c in chunks[2:6]} == {"r0"} and {c["id"] for c in chunks[6:9]} == {"t1"}
    assert end.state is StreamState.COMPLETED
    saved = (await rig.client.list_messages("chat-1"))[-1]
    assert saved.parts == [
        {"type": "step-start"},
        {"type": "reasoning", "text": "Six times seven.", "state": "done"},
        {"type": "text", "text": "42", "state": "done"},
    ]


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


async def test_tool_calls_stream_as_tool_input_chunks_and_persist_parsed(rig: Rig) -> None:
    reply = rig.upstream.expect()

    def call(index: int, arguments: str, call_id: str = "", name: str = "") -> bytes:
        first = {"id": call_id, "type": "function"} if call_id else {}  # only on the first delta
        function = {"name": name, "arguments": arguments} if name else {"arguments": arguments}
        return delta(tool_calls=[{"index": index, **first, "function": function}])

    reply.put(
        delta(content="Checking."),
        call(0, "", "call_a", "get_weather"),
        call(0, '{"city":'),
        call(0, ' "Paris"}'),
        call(1, "{}", "call_b", "get_time"),
        finish("tool_calls"),
        DONE,
        None,
    )

    _, chunks, end = await rig.run(options={"tools": json.dumps([WEATHER_TOOL])})

    assert chunks[2:] == [
        {"type": "text-start", "id": "t0"},
        {"type": "text-delta", "id": "t0", "delta": "Checking."},
        {"type": "text-end", "id": "t0"},
        {"type": "tool-input-start", "toolCallId": "call_a", "toolName": "get_weather"},
        {"type": "tool-input-delta", "toolCallId": "call_a", "inputTextDelta": '{"city":'},
        {"type": "tool-input-delta", "toolCallId": "call_a", "inputTextDelta": ' "Paris"}'},
        {"type": "tool-input-start", "toolCallId": "call_b", "toolName": "get_time"},
        {"type": "tool-input-delta", "toolCallId": "call_b", "inputTextDelta": "{}"},
        {
            "type": "tool-input-available",
            "toolCallId": "call_a",
            "toolName": "get_weather",
            "input": {"city": "Paris"},
        },
        {
            "type": "tool-input-available",
            "toolCallId": "call_b",
            "toolName": "get_time",
            "input": {},
        },
        {"type": "finish-step"},
        {
            "type": "finish",
            "finishReason": "tool-calls",
            "messageMetadata": {"model": REPORTED_MODEL},
        },
    ]
    assert end.state is StreamState.COMPLETED
    saved = (await rig.client.list_messages("chat-1"))[-1]
    assert saved.parts[2:] == [
        {
            "type": "tool-get_weather",
            "toolCallId": "call_a",
            "state": "input-available",
            "input": {"city": "Paris"},
        },
        {"type": "tool-get_time", "toolCallId": "call_b", "state": "input-available", "input": {}},
    ]
    assert reply.request is not None and reply.request.body["tools"] == [WEATHER_TOOL]


async def test_tool_arguments_that_are_not_json_become_a_tool_input_error(rig: Rig) -> None:
    reply = rig.upstream.expect()
    reply.put(
        delta(tool_calls=[{"index": 0, "id": "c1", "function": {"name": "f", "arguments": "{"}}]),
        finish("tool_calls"),
        DONE,
        None,
    )

    _, chunks, end = await rig.run()

    assert chunks[-3]["type"] == "tool-input-error" and chunks[-3]["input"] == "{"
    assert "not valid JSON" in chunks[-3]["errorText"]
    assert end.state is StreamState.COMPLETED
    saved = (await rig.client.list_messages("chat-1"))[-1]
    assert saved.parts[-1]["state"] == "output-error"


async def test_the_history_is_converted_to_chat_completions_messages(rig: Rig) -> None:
    history = [
        UIMessage("s1", "system", [{"type": "text", "text": "You are terse."}]),
        user("Weather in Paris?", "u1"),
        UIMessage(
            "a1",
            "assistant",
            [
                {"type": "step-start"},
                {"type": "reasoning", "text": "the user wants weather", "state": "done"},
                {"type": "text", "text": "Checking.", "state": "done"},
                {
                    "type": "tool-get_weather",
                    "toolCallId": "call_a",
                    "state": "output-available",
                    "input": {"city": "Paris"},
                    "output": {"temp": 21},
                },
                {
                    "type": "dynamic-tool",
                    "toolName": "lookup",
                    "toolCallId": "call_b",
                    "state": "output-error",
                    "input": {"q": "x"},
                    "errorText": "no network",
                },
                {"type": "tool-pending", "toolCallId": "call_c", "state": "input-available"},
                {"type": "step-start"},
                {"type": "text", "text": "It is 21 °C.", "state": "done"},
                {"type": "data-weather", "data": {"temp": 21}},
            ],
        ),
        UIMessage(
            "u2",
            "user",
            [
                {"type": "text", "text": "And tomorrow?"},
                {"type": "file", "mediaType": "image/png", "url": "data:image/png;base64,AAAA"},
            ],
        ),
    ]
    reply = rig.upstream.expect()
    reply.put(finish("stop"), DONE, None)
    options = {
        "model": "other-model",
        "system": "Answer briefly.",
        "temperature": "0.2",
        "top_p": "0.9",
        "max_tokens": "50",
    }

    started = await rig.client.start("chat-1", history, producer="gpt", options=options)
    _, end = await collect(rig.client.attach(stream_id=started.stream_id))

    assert end.state is StreamState.COMPLETED
    assert reply.request is not None
    assert reply.request.body == {
        "model": "other-model",
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    {
                        "id": "call_a",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    },
                    {
                        "id": "call_b",
                        "type": "function",
                        "function": {"name": "lookup", "arguments": '{"q":"x"}'},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_a", "content": '{"temp":21}'},
            {"role": "tool", "tool_call_id": "call_b", "content": "no network"},
            {"role": "assistant", "content": "It is 21 °C."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "And tomorrow?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ],
            },
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.2,
        "top_p": 0.9,
        "max_tokens": 50,
    }


async def test_text_with_unicode_line_separators_is_not_split(rig: Rig) -> None:
    # str.splitlines (and httpx's aiter_lines) would break this data line at U+2028 / U+0085.
    text = "a\u2028b\x85c"
    reply = rig.upstream.expect()
    reply.put(
        b"data: "
        + json.dumps({"choices": [{"delta": {"content": text}}]}, ensure_ascii=False).encode()
        + b"\r\n\r\n",
        finish("stop"),
        DONE,
        None,
    )
    _, chunks, end = await rig.run()
    assert end.state is StreamState.COMPLETED and texts(chunks) == text


# -- failures --------------------------------------------------------------------------------


async def test_an_error_mid_stream_fails_the_stream_and_keeps_the_partial(rig: Rig) -> None:
    reply = rig.upstream.expect()
    overloaded = {"error": {"message": "the model is overloaded", "type": "server_error"}}
    reply.put(delta(content="Hello"), delta(content=" wor"), data(overloaded))

    _, chunks, end = await rig.run()

    message = "upstream error: the model is overloaded"
    assert chunks[-1] == {"type": "error", "errorText": message}
    assert texts(chunks) == "Hello wor"
    assert end.state is StreamState.FAILED and end.error_message == message
    saved = (await rig.client.list_messages("chat-1"))[-1]
    assert saved.role == "assistant"
    assert saved.parts[-1] == {"type": "text", "text": "Hello wor", "state": "done"}
    assert saved.metadata is not None
    assert saved.metadata["streamEnd"] == {
        "state": "failed",
        "reason": "producer_failed",
        "error": message,
    }
    await asyncio.wait_for(reply.disconnected.wait(), 5)  # the producer hung up on it


@pytest.mark.parametrize(
    ("status", "body", "content_type", "expected"),
    [
        (
            401,
            {"error": {"message": "Incorrect API key provided.", "code": "invalid_api_key"}},
            "application/json",
            "upstream HTTP 401: Incorrect API key provided.",
        ),
        (  # vLLM's shape
            500,
            {"object": "error", "message": "CUDA out of memory", "code": 500},
            "application/json",
            "upstream HTTP 500: CUDA out of memory",
        ),
        (  # Ollama's shape
            404,
            {"error": "model 'llama9' not found"},
            "application/json",
            "upstream HTTP 404: model 'llama9' not found",
        ),
        (
            502,
            "Bad Gateway from the proxy",
            "text/plain",
            "upstream HTTP 502: Bad Gateway from the proxy",
        ),
    ],
)
async def test_an_http_error_fails_the_stream_with_the_upstream_message(
    rig: Rig, status: int, body: Any, content_type: str, expected: str
) -> None:
    reply = rig.upstream.expect(status=status, content_type=content_type)
    reply.put(json.dumps(body).encode() if isinstance(body, dict) else body.encode(), None)

    stream_id, chunks, end = await rig.run()

    assert chunks == [
        {"type": "start", "messageId": f"msg_{stream_id}"},
        {"type": "error", "errorText": expected},
    ]
    assert end.state is StreamState.FAILED and end.error_message == expected
    assert [m.role for m in await rig.client.list_messages("chat-1")] == ["user"]
    assert await rig.client.get_active("chat-1") is None


async def test_a_refused_connection_fails_the_stream(rig: Rig) -> None:
    _, chunks, end = await rig.run(producer="down")

    assert end.state is StreamState.FAILED
    assert end.error_message.startswith(
        f"could not connect to the upstream at {rig.refused_url}/chat/completions: "
    )
    assert chunks[-1] == {"type": "error", "errorText": end.error_message}
    assert await rig.client.get_active("chat-1") is None


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        (b"data: {not json\n\n", "malformed upstream data (not JSON): {not json"),
        (b"data: [1, 2]\n\n", "malformed upstream data (not a JSON object): [1, 2]"),
        (
            b'event: error\ndata: {"message": "quota exceeded"}\n\n',
            "upstream error: quota exceeded",
        ),
        (None, "the upstream closed the stream before the answer finished"),
    ],
)
async def test_malformed_or_cut_off_upstream_data_fails_the_stream(
    rig: Rig, bad: bytes | None, expected: str
) -> None:
    reply = rig.upstream.expect()
    reply.put(delta(content="Hi"), bad)

    _, chunks, end = await rig.run()

    assert end.state is StreamState.FAILED and end.error_message == expected
    assert chunks[-1] == {"type": "error", "errorText": expected}
    assert (await rig.client.list_messages("chat-1"))[-1].parts[-1]["text"] == "Hi"


async def keep_alive(reply: Reply) -> None:
    """Sends an SSE comment every 50 ms, as a server that pings while its model stalls."""
    while not reply.disconnected.is_set():
        reply.put(b": ping\n\n")
        await asyncio.sleep(0.05)


@pytest.mark.parametrize(
    "where", ["before-headers", "before-first-chunk", "between-chunks", "pings-only"]
)
async def test_a_stalled_upstream_fails_after_the_idle_timeout(rig: Rig, where: str) -> None:
    """Also one that sends nothing but keep-alive comments: they are not data (the idle timeout
    counts data events only), so they do not keep a stalled answer alive."""
    reply = rig.upstream.expect(hold_headers=asyncio.Event() if where == "before-headers" else None)
    if where in ("between-chunks", "pings-only"):
        reply.put(delta(content="Hi"))
    pinging = asyncio.create_task(keep_alive(reply)) if where == "pings-only" else None

    _, chunks, end = await rig.run(producer="gpt-stall")
    if pinging is not None:
        pinging.cancel()

    expected = f"the upstream at {rig.upstream.url}/chat/completions sent nothing for 0.2 s"
    assert end.state is StreamState.FAILED
    assert end.error_message == expected + " (idle timeout)"
    assert chunks[-1] == {"type": "error", "errorText": end.error_message}
    await asyncio.wait_for(reply.disconnected.wait(), 5)
    if where in ("between-chunks", "pings-only"):
        assert (await rig.client.list_messages("chat-1"))[-1].parts[-1]["text"] == "Hi"


# -- cancellation ----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["stop", "supersede", "shutdown"])
async def test_cancelling_the_producer_closes_the_upstream_request(rig: Rig, how: str) -> None:
    reply = rig.upstream.expect()
    reply.put(delta(content="Hello"), delta(content=" wor"))
    started = await rig.client.start("chat-1", [user("hi")], producer="gpt")
    reader = rig.client.attach(stream_id=started.stream_id)
    assert len(await read_chunks(reader, 5)) == 5  # start, start-step, text-start, 2 deltas
    assert not reply.disconnected.is_set()

    end: ChunkBatch | StreamEnd | None
    if how == "stop":
        result = await rig.client.stop("chat-1", started.stream_id)
        end = result.end
    elif how == "supersede":
        await rig.client.start("chat-1", [user("again", "u2")], supersede=True)
        end = await anext(reader)
    else:
        await rig.relay.close(grace=0)
        end = await anext(reader)

    # The upstream itself saw the connection close, with its answer still unfinished.
    await asyncio.wait_for(reply.disconnected.wait(), 5)
    assert not reply.completed.is_set()
    assert isinstance(end, StreamEnd)
    expected = StreamState.INTERRUPTED if how == "shutdown" else StreamState.STOPPED
    assert end.state is expected
    assert end.message is not None and end.message.parts[-1]["text"] == "Hello wor"


async def test_a_stop_before_the_upstream_answers_closes_the_request(rig: Rig) -> None:
    reply = rig.upstream.expect(hold_headers=asyncio.Event())  # the model is still queued
    started = await rig.client.start("chat-1", [user("hi")], producer="gpt")
    await reply.requested.wait()

    result = await rig.client.stop("chat-1", started.stream_id)

    await asyncio.wait_for(reply.disconnected.wait(), 5)
    assert result.end is not None and result.end.state is StreamState.STOPPED
    assert result.end.final_offset == 1  # just the start chunk


async def test_a_reader_disconnect_leaves_the_upstream_request_open(rig: Rig) -> None:
    reply = rig.upstream.expect()
    reply.put(delta(content="Hello"))
    started = await rig.client.start("chat-1", [user("hi")], producer="gpt")
    reader = rig.client.attach(stream_id=started.stream_id)
    await read_chunks(reader, 4)
    await reader.aclose()  # the browser tab closes
    stream = rig.relay.streams[started.stream_id]
    await eventually(lambda: stream.readers == 0)

    # No [DONE]: the body's end is what finishes the stream, so the server completes its
    # response before the producer can close the connection.
    reply.put(delta(content=" world"), finish("stop"), None)
    chunks, end = await collect(rig.client.attach(stream_id=started.stream_id))

    assert end.state is StreamState.COMPLETED
    assert texts([json.loads(c) for c in chunks]) == "Hello world"
    await reply.closed.wait()
    assert reply.completed.is_set() and not reply.disconnected.is_set()


# -- keys, options, profiles -----------------------------------------------------------------


async def test_the_api_key_is_sent_as_bearer_and_never_logged_or_persisted(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ok = rig.upstream.expect()
    ok.put(delta(content="fine"), finish("stop"), DONE, None)
    _, _, end = await rig.run()
    assert end.state is StreamState.COMPLETED
    assert ok.request is not None and ok.request.headers["authorization"] == f"Bearer {SECRET}"

    # An upstream that echoes the key back in its error.
    leaky = rig.upstream.expect(status=401, content_type="application/json")
    leaky.put(json.dumps({"error": {"message": f"Incorrect API key provided: {SECRET}"}}).encode())
    leaky.put(None)
    started = await rig.client.start("chat-2", [user("hi")], producer="gpt")
    chunks, failed = await collect(rig.client.attach(stream_id=started.stream_id))

    assert failed.error_message == "upstream HTTP 401: Incorrect API key provided: [redacted]"
    assert any(r.name == "relay.openai" for r in caplog.records)  # the failure was logged
    assert caplog.records and SECRET not in caplog.text
    assert not any(SECRET in c for c in chunks)
    await rig.relay.close(grace=0)  # flush everything to the database
    stored = b"".join(p.read_bytes() for p in rig.db.parent.glob("relay.sqlite3*"))
    assert b"fine" in stored and SECRET.encode() not in stored


async def test_bad_options_are_refused_at_start_without_calling_the_upstream(rig: Rig) -> None:
    for options in ({"temperature": "3"}, {"max_tokens": "many"}, {"seed": "1"}, {"tools": "{}"}):
        with pytest.raises(client_errors.InvalidArgument) as refused:
            await rig.client.start("chat-1", [user("hi")], producer="gpt", options=options)
        assert "openai producer" in refused.value.message
    assert rig.upstream.requests == [] and await rig.client.list_messages("chat-1") == []


async def test_from_profile_reads_the_key_and_merges_option_defaults(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-from-profile")
    profile = openai_profile(
        "gpt", upstream.url + "/", options={"temperature": "0.5", "max_tokens": "10"}
    )
    producer = build_producer(profile)
    assert isinstance(producer, OpenAIProducer)
    reply = upstream.expect()
    reply.put(delta(content="ok"), finish("length"), DONE, None)

    request = ProduceRequest("chat-1", "a" * 32, [user("hi")], {"max_tokens": "20"})
    chunks = [chunk async for chunk in producer.generate(request)]

    assert reply.request is not None
    assert reply.request.headers["authorization"] == "Bearer sk-from-profile"
    assert (reply.request.body["temperature"], reply.request.body["max_tokens"]) == (0.5, 20)
    assert chunks[-1]["finishReason"] == "length"
    with pytest.raises(InvalidArgument):
        producer.check_options({"temperature": "-1"})
    await producer.close()  # its pooled connections (the registry closes them at shutdown)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"api_key_env": "STREAM_RELAY_TEST_UNSET_KEY"}, "STREAM_RELAY_TEST_UNSET_KEY"),
        ({"base_url": "127.0.0.1:11434"}, "base_url"),
        ({"model": ""}, "no model"),
        ({"options": {"temprature": "1"}}, "unknown options"),
        ({"idle_timeout_s": 0}, "idle_timeout_s"),
    ],
)
def test_a_bad_openai_profile_is_a_profile_error(fields: dict[str, Any], expected: str) -> None:
    values: dict[str, Any] = {
        "base_url": "http://127.0.0.1:11434/v1",
        "model": "llama3.2",
        **fields,
    }
    with pytest.raises(ProfileError, match=expected) as caught:
        build_producer(Profile("local", "openai", **values))
    assert "'local'" in str(caught.value)


async def test_a_profile_without_a_key_sends_no_authorization(upstream: FakeUpstream) -> None:
    producer = OpenAIProducer.from_profile(
        Profile("ollama", "openai", upstream.url, model="llama3")
    )
    reply = upstream.expect()
    reply.put(delta(content="ok"), finish("stop"), DONE, None)

    request = ProduceRequest("chat-1", "a" * 32, [user("hi")])
    chunks = [chunk async for chunk in producer.generate(request)]

    assert chunks[-1]["type"] == "finish"
    assert reply.request is not None and "authorization" not in reply.request.headers
    assert reply.request.body["model"] == "llama3"
    await producer.close()
