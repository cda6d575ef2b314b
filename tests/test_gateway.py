"""The gateway's routes over real HTTP (uvicorn on an ephemeral port) against a real relay."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn

from gateway.app import GatewaySettings, create_app
from tests import openapi_check
from tests.conftest import Env, eventually, free_port, text_chunks

# Every response of the route tests is checked against the OpenAPI document.
CHECKED = {"response": [openapi_check.hook]}

# Every POST must say it is JSON (a CSRF defence), the stop route's too when it has no body.
JSON_TYPE = {"content-type": "application/json"}

SSE_HEADERS = {
    "content-type": "text/event-stream",
    "cache-control": "no-cache",
    "connection": "keep-alive",
    "x-vercel-ai-ui-message-stream": "v1",
    "x-accel-buffering": "no",
}


@dataclass
class SseEvent:
    data: str
    id: int | None = None

    @property
    def chunk(self) -> dict[str, Any]:
        value = json.loads(self.data)
        assert isinstance(value, dict)
        return value


@dataclass
class SseReader:
    """Reads an SSE response event by event; comments are counted, not returned."""

    response: httpx.Response
    comments: list[str] = field(default_factory=list)
    _lines: AsyncIterator[str] | None = None

    async def next(self) -> SseEvent:
        if self._lines is None:
            self._lines = self.response.aiter_lines()
        event_id: int | None = None
        data: list[str] = []
        async for line in self._lines:
            if line == "":
                if data:
                    return SseEvent("\n".join(data), event_id)
                continue
            if line.startswith(":"):
                self.comments.append(line)
            elif line.startswith("id: "):
                event_id = int(line[4:])
            elif line.startswith("data: "):
                data.append(line[6:])
        raise EOFError("the response ended")

    async def rest(self) -> list[SseEvent]:
        """Every remaining event through [DONE], then checks the body closes."""
        events = []
        while (event := await self.next()).data != "[DONE]":
            events.append(event)
        with pytest.raises(EOFError):
            await self.next()
        return events


@dataclass
class Gateway:
    url: str
    http: httpx.AsyncClient
    env: Env

    def chat_body(self, chat_id: str = "chat-1", text: str = "hi", **extra: Any) -> dict[str, Any]:
        message = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": text}]}
        return {"id": chat_id, "messages": [message], "trigger": "submit-message", **extra}

    @asynccontextmanager
    async def open(self, method: str, path: str, **kwargs: Any) -> AsyncIterator[SseReader]:
        async with self.http.stream(method, self.url + path, **kwargs) as response:
            yield SseReader(response)


async def serve(app: Any) -> tuple[uvicorn.Server, asyncio.Task[None], str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_config=None, lifespan="on", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    await eventually(lambda: server.started)
    return server, task, f"http://127.0.0.1:{port}"


@pytest.fixture(params=["shared", "per-request"])
def settings(env: Env, request: pytest.FixtureRequest) -> GatewaySettings:
    """Every route test runs with both ways of reading the relay: one AttachMany call for every
    SSE response, or one Attach call each."""
    return GatewaySettings(
        relay_target=env.target,
        keepalive_s=15.0,
        max_body_bytes=64 * 1024,
        relay_reads=request.param,
    )


@pytest.fixture
async def gw(env: Env, settings: GatewaySettings) -> AsyncIterator[Gateway]:
    server, task, url = await serve(create_app(settings))
    async with httpx.AsyncClient(timeout=10, event_hooks=CHECKED) as http:
        yield Gateway(url, http, env)
    server.should_exit = True
    await task


async def test_chat_streams_the_whole_answer_with_offsets_then_done(gw: Gateway) -> None:
    async with gw.open("POST", "/api/chat", json=gw.chat_body(text="hello gateway")) as sse:
        assert sse.response.status_code == 200
        assert {k: sse.response.headers[k] for k in SSE_HEADERS} == SSE_HEADERS
        events = await sse.rest()
    assert [e.id for e in events] == list(range(len(events)))
    chunks = [e.chunk for e in events]
    assert chunks[0]["type"] == "start" and chunks[-1]["type"] == "finish"
    text = "".join(c["delta"] for c in chunks if c["type"] == "text-delta")
    assert text == "You said: hello gateway"
    saved = (await gw.http.get(gw.url + "/api/chat/chat-1/messages")).json()
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"]
    assert saved["messages"][1]["id"] == chunks[0]["messageId"]
    assert saved["messages"][1]["parts"][-1]["text"] == text


async def test_a_single_message_body_appends_to_the_history(gw: Gateway) -> None:
    async with gw.open("POST", "/api/chat", json=gw.chat_body()) as sse:
        await sse.rest()
    second = {"id": "u2", "role": "user", "parts": [{"type": "text", "text": "again"}]}
    body = {"id": "chat-1", "message": second, "trigger": "submit-message"}
    async with gw.open("POST", "/api/chat", json=body) as sse:
        await sse.rest()
    saved = (await gw.http.get(gw.url + "/api/chat/chat-1/messages")).json()["messages"]
    assert [m["role"] for m in saved] == ["user", "assistant", "user", "assistant"]


async def test_a_client_going_away_ends_only_its_reader(gw: Gateway) -> None:
    body = gw.chat_body(producer="scripted")
    async with gw.open("POST", "/api/chat", json=body) as sse:
        stream_id = next(iter(gw.env.relay.streams))
        script = gw.env.scripted.script(stream_id)
        script.put(*text_chunks(2))
        assert [(await sse.next()).id for _ in range(5)] == [0, 1, 2, 3, 4]
    # The response is closed: the gateway cancels its Attach, the producer goes on.
    await eventually(lambda: gw.env.relay.stats().readers == 0)
    assert not script.cancelled.is_set()
    script.put({"type": "text-end", "id": "t"})

    async with gw.open("GET", "/api/chat/chat-1/stream?replay=plain") as sse:
        # The whole reply from its first chunk, then live.
        assert [(await sse.next()).id for _ in range(6)] == list(range(6))
        script.put({"type": "finish"}, None)
        events = await sse.rest()
    assert [e.id for e in events] == [6]
    saved = (await gw.http.get(gw.url + "/api/chat/chat-1/messages")).json()["messages"]
    assert saved[-1]["parts"][-1] == {"type": "text", "text": "w0 w1 ", "state": "done"}
    assert (await gw.http.get(gw.url + "/api/chat/chat-1/stream")).status_code == 204


async def test_resume_replays_from_the_start_or_after_last_event_id(gw: Gateway) -> None:
    assert (await gw.http.get(gw.url + "/api/chat/chat-1/stream")).status_code == 204
    body = gw.chat_body(producer="scripted")
    async with gw.open("POST", "/api/chat", json=body) as first:
        stream_id = next(iter(gw.env.relay.streams))
        gw.env.scripted.script(stream_id).put(*text_chunks(4))
        for _ in range(7):
            await first.next()
        async with gw.open("GET", "/api/chat/chat-1/stream?replay=plain") as whole:
            assert [(await whole.next()).id for _ in range(7)] == list(range(7))
        headers = {"last-event-id": "4"}
        path = "/api/chat/chat-1/stream?replay=exact"
        async with gw.open("GET", path, headers=headers) as after:
            assert [(await after.next()).id for _ in range(2)] == [5, 6]
        bad = await gw.http.get(gw.url + "/api/chat/chat-1/stream", headers={"last-event-id": "x"})
        assert bad.status_code == 400 and "Last-Event-ID" in bad.json()["error"]["message"]
        future = await gw.http.get(
            gw.url + "/api/chat/chat-1/stream", headers={"last-event-id": "99"}
        )
        assert future.status_code == 400 and future.json()["error"]["code"] == "out_of_range"


async def test_stop_route_cancels_persists_the_partial_and_ends_readers(gw: Gateway) -> None:
    async with gw.open("POST", "/api/chat", json=gw.chat_body(producer="scripted")) as sse:
        stream_id = next(iter(gw.env.relay.streams))
        script = gw.env.scripted.script(stream_id)
        script.put(*text_chunks(2))
        for _ in range(5):
            await sse.next()
        partial = {"id": "msg-1", "role": "assistant", "parts": [{"type": "text", "text": "w0"}]}

        wrong = await gw.http.post(
            gw.url + "/api/chat/chat-1/stop", json={"activeStreamId": "0" * 32}
        )
        assert wrong.json()["outcome"] == "not_active" and not script.cancelled.is_set()
        stopped = await gw.http.post(
            gw.url + "/api/chat/chat-1/stop",
            json={"assistantMessage": partial, "activeStreamId": stream_id},
        )

        assert stopped.status_code == 200
        stream_end = {"state": "stopped", "reason": "stop"}
        assert stopped.json() == {
            "stopped": True,
            "outcome": "stopped",
            "streamId": stream_id,
            "finalOffset": 5,
            "state": "stopped",
            "reason": "stop",
            "message": {**partial, "metadata": {"streamEnd": stream_end}},  # as persisted
            "usage": None,  # the producer reported none
        }
        assert script.cancelled.is_set()
        assert [e.chunk for e in await sse.rest()] == [{"type": "abort"}]
    saved = (await gw.http.get(gw.url + "/api/chat/chat-1/messages")).json()["messages"]
    assert saved[-1] == {
        **partial,
        "metadata": {"streamEnd": {"state": "stopped", "reason": "stop"}},
    }
    assert (await gw.http.get(gw.url + "/api/chat/chat-1/stream")).status_code == 204
    again = await gw.http.post(gw.url + "/api/chat/chat-1/stop", headers=JSON_TYPE)
    assert again.json() == {
        "stopped": False,
        "outcome": "no_active_stream",
        "streamId": None,
        "finalOffset": None,
        "state": None,
        "reason": None,
        "message": None,
        "usage": None,
    }
    # Naming the stream that ended: its receipt again.
    ended = await gw.http.post(gw.url + "/api/chat/chat-1/stop", json={"activeStreamId": stream_id})
    assert ended.json() == {**stopped.json(), "stopped": False, "outcome": "already_ended"}


async def test_the_stop_receipt_carries_the_assembled_message_and_the_usage_so_far(
    gw: Gateway,
) -> None:
    async with gw.open("POST", "/api/chat", json=gw.chat_body(producer="scripted")) as sse:
        stream_id = next(iter(gw.env.relay.streams))
        script = gw.env.scripted.script(stream_id)
        usage = {"inputTokens": 5, "outputTokens": 2}
        script.put(
            *text_chunks(2), {"type": "message-metadata", "messageMetadata": {"usage": usage}}
        )
        for _ in range(6):
            await sse.next()
        stopped = await gw.http.post(gw.url + "/api/chat/chat-1/stop", headers=JSON_TYPE)
        assert [e.chunk for e in await sse.rest()] == [{"type": "abort"}]
    receipt = stopped.json()
    assert (receipt["outcome"], receipt["finalOffset"], receipt["reason"]) == ("stopped", 6, "stop")
    assert receipt["usage"] == usage
    message = {
        "id": "msg-1",
        "role": "assistant",
        "parts": [{"type": "step-start"}, {"type": "text", "text": "w0 w1 ", "state": "done"}],
        "metadata": {"usage": usage, "streamEnd": {"state": "stopped", "reason": "stop"}},
    }
    assert receipt["message"] == message
    saved = (await gw.http.get(gw.url + "/api/chat/chat-1/messages")).json()["messages"]
    assert saved[-1] == message


@pytest.mark.parametrize("key", ["requestId", "messageId"])
async def test_a_stop_before_its_post_ends_that_answer_as_it_starts(gw: Gateway, key: str) -> None:
    """The user pressed Stop while the chat POST was still in flight: the stop names it (by
    its Idempotency-Key, or the id of the message it sends) and arrives first."""
    name = "k1" if key == "requestId" else "u1"
    stopped = await gw.http.post(gw.url + "/api/chat/chat-1/stop", json={key: name})
    assert stopped.status_code == 200
    assert stopped.json() == {
        "stopped": True,
        "outcome": "stopped_before_start",
        "streamId": None,
        "finalOffset": None,
        "state": None,
        "reason": None,
        "message": None,
        "usage": None,
    }

    headers = {"idempotency-key": "k1"}
    body = gw.chat_body(producer="scripted")
    async with gw.open("POST", "/api/chat", json=body, headers=headers) as sse:
        assert sse.response.status_code == 200
        stream_id = sse.response.headers["x-stream-id"]
        # The end and nothing else: no producer ran.
        assert [e.chunk for e in await sse.rest()] == [{"type": "abort"}]
    assert stream_id not in gw.env.scripted.scripts
    saved = (await gw.http.get(gw.url + "/api/chat/chat-1/messages")).json()["messages"]
    assert [m["id"] for m in saved] == ["u1"]
    assert (await gw.http.get(gw.url + "/api/chat/chat-1/stream")).status_code == 204
    # A retried POST (same key) gets the same stream, ended.
    async with gw.open("POST", "/api/chat", json=body, headers=headers) as retried:
        assert retried.response.headers["x-stream-id"] == stream_id
        assert [e.chunk for e in await retried.rest()] == [{"type": "abort"}]
    # Now the POST has arrived: the same stop gets the receipt of its answer.
    again = await gw.http.post(gw.url + "/api/chat/chat-1/stop", json={key: name})
    assert again.json()["outcome"] == "already_ended" and again.json()["streamId"] == stream_id
    assert (again.json()["state"], again.json()["reason"]) == ("stopped", "stopped_before_start")
    assert again.json()["finalOffset"] == 0 and again.json()["message"] is None


@pytest.mark.parametrize("key", ["requestId", "messageId"])
async def test_a_stop_after_its_post_stops_the_live_answer(gw: Gateway, key: str) -> None:
    headers = {"idempotency-key": "k1"}
    body = gw.chat_body(producer="scripted")
    async with gw.open("POST", "/api/chat", json=body, headers=headers) as sse:
        stream_id = sse.response.headers["x-stream-id"]
        script = gw.env.scripted.script(stream_id)
        script.put(*text_chunks(1))
        for _ in range(4):
            await sse.next()
        name = "k1" if key == "requestId" else "u1"
        stopped = await gw.http.post(gw.url + "/api/chat/chat-1/stop", json={key: name})
        assert [e.chunk for e in await sse.rest()] == [{"type": "abort"}]
    receipt = stopped.json()
    assert (receipt["stopped"], receipt["outcome"], receipt["streamId"]) == (
        True,
        "stopped",
        stream_id,
    )
    assert (receipt["finalOffset"], receipt["reason"]) == (4, "stop")
    assert script.cancelled.is_set()


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ({"requestId": "k" * 129}, "`requestId` is longer than 128 characters"),
        ({"requestId": 7}, "`requestId` must be a string"),
        ({"messageId": "m" * 257}, "`messageId` is longer than 256 characters"),
        ({"messageId": ["u1"]}, "`messageId` must be a string"),
    ],
)
async def test_bad_stop_names_are_refused(gw: Gateway, body: dict[str, Any], why: str) -> None:
    refused = await gw.http.post(gw.url + "/api/chat/chat-1/stop", json=body)
    assert refused.status_code == 400
    assert refused.json()["error"] == {"code": "invalid_request", "message": why}
    assert await gw.env.relay.store.delete_stop_tombstones(1e12) == 0


async def test_a_post_on_a_live_chat_supersedes_the_old_answer(gw: Gateway) -> None:
    async with gw.open("POST", "/api/chat", json=gw.chat_body(producer="scripted")) as old:
        old_id = next(iter(gw.env.relay.streams))
        gw.env.scripted.script(old_id).put(*text_chunks(1))
        await old.next()
        body = gw.chat_body(text="next", producer="scripted")
        body["messages"].append(
            {"id": "u2", "role": "user", "parts": [{"type": "text", "text": "next"}]}
        )
        async with gw.open("POST", "/api/chat", json=body) as new:
            assert new.response.status_code == 200
            assert gw.env.scripted.script(old_id).cancelled.is_set()
            assert (await old.rest())[-1].chunk == {"type": "abort"}


async def test_refuse_mode_answers_409_while_an_answer_is_live(env: Env) -> None:
    app = create_app(GatewaySettings(relay_target=env.target, on_live_stream="refuse"))
    server, task, url = await serve(app)
    try:
        async with httpx.AsyncClient() as http:
            body = {"id": "c", "messages": [], "trigger": "submit-message", "producer": "scripted"}
            async with http.stream("POST", url + "/api/chat", json=body) as first:
                stream_id = next(iter(env.relay.streams))
                env.scripted.script(stream_id).put(*text_chunks(0))
                await anext(first.aiter_lines())
                refused = await http.post(url + "/api/chat", json=body)
                assert refused.status_code == 409
                assert refused.json()["error"]["code"] == "stream_already_live"
                assert not env.scripted.script(stream_id).cancelled.is_set()
    finally:
        server.should_exit = True
        await task


async def test_a_failed_stream_ends_with_an_error_chunk(gw: Gateway) -> None:
    async with gw.open("POST", "/api/chat", json=gw.chat_body(producer="scripted")) as sse:
        stream_id = next(iter(gw.env.relay.streams))
        gw.env.scripted.script(stream_id).put(*text_chunks(1), RuntimeError("model on fire"))
        events = await sse.rest()
    assert events[-1].id is None and events[-1].chunk["type"] == "error"
    assert "model on fire" in events[-1].chunk["errorText"]


async def test_idle_streams_get_keep_alive_comments(env: Env) -> None:
    server, task, url = await serve(create_app(GatewaySettings(env.target, keepalive_s=0.02)))
    try:
        async with (
            httpx.AsyncClient() as http,
            http.stream(
                "POST",
                url + "/api/chat",
                json={
                    "id": "c",
                    "messages": [],
                    "trigger": "submit-message",
                    "producer": "scripted",
                },
            ) as response,
        ):
            stream_id = next(iter(env.relay.streams))
            script = env.scripted.script(stream_id)
            script.put({"type": "start"})
            lines = response.aiter_lines()
            assert await anext(lines) == "id: 0"
            while (line := await anext(lines)) != ": keep-alive":
                assert line in ("", 'data: {"type":"start"}')
            script.put({"type": "finish"}, None)
            # More keep-alives may come while the relay persists the end: skip them.
            rest = [line async for line in lines if line and not line.startswith(":")]
            assert rest[-3:] == ["id: 1", 'data: {"type":"finish"}', "data: [DONE]"]
    finally:
        server.should_exit = True
        await task


BAD_CHATS: dict[str, tuple[Any, int, str]] = {
    "malformed JSON": (b"{nope", 400, "invalid_json"),
    "empty body": (b"", 400, "invalid_json"),
    "not an object": (b"[1]", 400, "invalid_json"),
    "no id": ({"messages": []}, 400, "invalid_request"),
    "id not a string": ({"id": 7, "messages": []}, 400, "invalid_request"),
    "messages not an array": ({"id": "c", "messages": {}}, 400, "invalid_request"),
    "no messages at all": ({"id": "c"}, 400, "invalid_request"),
    "message not an object": ({"id": "c", "messages": ["hi"]}, 400, "invalid_request"),
    "bad role": (
        {"id": "c", "messages": [{"id": "u", "role": "robot", "parts": []}]},
        400,
        "invalid_request",
    ),
    "parts not an array": (
        {"id": "c", "messages": [{"id": "u", "role": "user", "parts": "hi"}]},
        400,
        "invalid_request",
    ),
    "part without a type (relay)": (
        {"id": "c", "messages": [{"id": "u", "role": "user", "parts": [{"text": "x"}]}]},
        400,
        "invalid_argument",
    ),
    "unknown trigger": ({"id": "c", "messages": [], "trigger": "dance"}, 400, "invalid_request"),
    "bad chat id (relay)": ({"id": "a b", "messages": []}, 400, "invalid_argument"),
    "unknown producer (relay)": (
        {"id": "c", "messages": [], "producer": "nope"},
        400,
        "invalid_argument",
    ),
    "options not strings": (
        {"id": "c", "messages": [], "options": {"a": []}},
        400,
        "invalid_request",
    ),
    "huge body": (b'{"id":"c","pad":"' + b"x" * 70_000 + b'"}', 413, "too_large"),
}


@pytest.mark.parametrize("case", BAD_CHATS)
async def test_bad_chat_requests_get_a_json_error_and_change_nothing(
    gw: Gateway, case: str
) -> None:
    body, status, code = BAD_CHATS[case]
    if isinstance(body, bytes):
        response = await gw.http.post(
            gw.url + "/api/chat", content=body, headers={"content-type": "application/json"}
        )
    else:
        response = await gw.http.post(gw.url + "/api/chat", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    assert gw.env.relay.streams == {}
    assert (await gw.http.get(gw.url + "/api/chat/c/messages")).json()["messages"] == []


async def test_a_huge_chunked_body_is_refused_without_a_length(gw: Gateway) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b'{"id":"c","pad":"'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}'

    response = await gw.http.post(gw.url + "/api/chat", content=body(), headers=JSON_TYPE)
    assert response.status_code == 413


async def test_other_routes_answer_json_errors(gw: Gateway) -> None:
    bad_chat = await gw.http.get(gw.url + "/api/chat/" + "x" * 200 + "/messages")
    assert bad_chat.status_code == 400 and bad_chat.json()["error"]["code"] == "invalid_argument"
    bad_stop = await gw.http.post(gw.url + "/api/chat/c/stop", content=b"{", headers=JSON_TYPE)
    assert bad_stop.status_code == 400
    bad_partial = await gw.http.post(
        gw.url + "/api/chat/c/stop",
        json={"assistantMessage": {"id": "m", "role": "user", "parts": []}},
    )
    assert bad_partial.status_code == 400
    unknown = await gw.http.get(gw.url + "/nowhere")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    wrong_method = await gw.http.get(gw.url + "/api/chat")
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"


async def test_health_and_metrics(gw: Gateway) -> None:
    health = await gw.http.get(gw.url + "/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok", "relay": "serving"}
    async with gw.open("POST", "/api/chat", json=gw.chat_body()) as sse:
        events = await sse.rest()
    async with gw.open("POST", "/api/chat", json=gw.chat_body("chat-2", producer="scripted")):
        live_id = next(s for s in gw.env.relay.streams if gw.env.relay.streams[s].end is None)
        gw.env.scripted.script(live_id).put({"type": "start"})
        await eventually(lambda: gw.env.relay.streams[live_id].readers == 1)
        await gw.http.post(gw.url + "/api/chat/chat-2/stop", headers=JSON_TYPE)
        text = (await gw.http.get(gw.url + "/metrics")).text
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert values["stream_relay_gateway_chunks_relayed_total"] >= len(events) + 1
    assert values["stream_relay_gateway_streams_started_total"] == 2
    assert values["stream_relay_gateway_time_to_first_chunk_seconds_count"] == 2
    assert values["stream_relay_gateway_stop_latency_seconds_count"] == 1
    assert values["stream_relay_streams_live"] == 0
    assert values["stream_relay_streams_retained"] == 2
    assert "stream_relay_gateway_sse_readers" in values
    # The relay's ends by reason: every reason is there, from 0.
    ended = {
        name.removeprefix('stream_relay_streams_ended_total{reason="').removesuffix('"}'): value
        for name, value in values.items()
        if name.startswith("stream_relay_streams_ended_total{")
    }
    assert ended["finished"] == 1 and ended["stop"] == 1
    assert ended["no_reader"] == ended["max_duration"] == ended["max_chunks"] == 0
    assert "# TYPE stream_relay_streams_ended_total counter" in text.splitlines()


async def test_an_unreachable_relay_is_503(env: Env) -> None:
    app = create_app(GatewaySettings(relay_target=f"127.0.0.1:{free_port()}", relay_timeout_s=2))
    server, task, url = await serve(app)
    try:
        async with httpx.AsyncClient() as http:
            chat = await http.post(url + "/api/chat", json={"id": "c", "messages": []})
            health = await http.get(url + "/healthz")
            resume = await http.get(url + "/api/chat/c/stream")
    finally:
        server.should_exit = True
        await task
    assert chat.status_code == 503 and chat.json()["error"]["code"] == "relay_unavailable"
    assert health.status_code == 503 and health.json()["status"] == "unavailable"
    assert resume.status_code == 503


async def test_the_demo_page_is_served(gw: Gateway) -> None:
    page = await gw.http.get(gw.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
