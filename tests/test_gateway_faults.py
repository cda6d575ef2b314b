"""The gateway under hostile input and failing neighbours (issue 9): malformed bodies and headers
get a 400 JSON error, never a 500; what the relay says about itself never reaches a client."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from gateway.app import GatewaySettings, create_app
from gateway.bodies import JSON_MAX_DEPTH, parse_json
from gateway.errors import DETAIL_MAX_CHARS, HttpError, from_relay
from gateway.sse import RESTARTING
from relay.client.errors import RelayError, error_of
from relay.domain.model import dump_json
from tests import openapi_check
from tests.conftest import Env, free_port, gateway_process, python_service, text_chunks
from tests.test_gateway import Gateway, serve

# Every response of the route tests is checked against the OpenAPI document.
CHECKED = {"response": [openapi_check.hook]}


@pytest.fixture(params=["shared", "per-request"])
async def gw(env: Env, request: pytest.FixtureRequest) -> AsyncIterator[Gateway]:
    """The gateway with its default body bound (8 MiB), reading the relay either way."""
    settings = GatewaySettings(relay_target=env.target, relay_reads=request.param)
    server, task, url = await serve(create_app(settings))
    async with httpx.AsyncClient(timeout=10, event_hooks=CHECKED) as http:
        yield Gateway(url, http, env)
    server.should_exit = True
    await task


def chat(parts: str = '[{"type":"text","text":"hi"}]', **fields: str) -> bytes:
    extra = "".join(f',"{k}":{v}' for k, v in fields.items())
    message = '{"id":"u1","role":"user","parts":' + parts + "}"
    return ('{"id":"c","messages":[' + message + "]" + extra + "}").encode()


DEEP = 100_000
MALFORMED: dict[str, tuple[bytes, int, str]] = {
    "lone surrogate escape in a part": (
        chat('[{"type":"text","text":"\\ud800"}]'),
        400,
        "invalid_json",
    ),
    "lone low surrogate in a key": (chat('[{"type":"text","\\udc00":"x"}]'), 400, "invalid_json"),
    "surrogate as raw UTF-8 bytes": (
        b'{"id":"c","messages":[{"id":"u1","role":"user","parts":[{"type":"text","text":"'
        b'\xed\xa0\x80"}]}]}',
        400,
        "invalid_json",
    ),
    "not UTF-8": (b'{"id":"c","messages":[{"id":"\xff"}]}', 400, "invalid_json"),
    "nested 100,000 deep": (
        b'{"id":"c","x":' + b"[" * DEEP + b"]" * DEEP + b"}",
        400,
        "invalid_json",
    ),
    "nested just past the bound": (
        chat("[" * (JSON_MAX_DEPTH) + "]" * (JSON_MAX_DEPTH)),
        400,
        "invalid_json",
    ),
    "an integer of 5,000 digits": (
        chat(options='{"chunks":' + "9" * 5000 + "}"),
        400,
        "invalid_json",
    ),
    "a 1 MB option name": (chat(options='{"' + "k" * 1_000_000 + '":"1"}'), 400, "invalid_request"),
    "a 1 MB producer name": (chat(producer='"' + "p" * 1_000_000 + '"'), 400, "invalid_request"),
    "a 1 MB message id": (
        b'{"id":"c","messages":[{"id":"' + b"m" * 1_000_000 + b'","role":"user","parts":[]}]}',
        400,
        "invalid_request",
    ),
    "a 1 MB chat id": (b'{"id":"' + b"c" * 1_000_000 + b'","messages":[]}', 400, "invalid_request"),
    "a non-ASCII option value the relay quotes": (
        chat(options='{"delay_ms":"' + "\U0001f600" * 1000 + '"}'),
        400,
        "invalid_argument",
    ),
}


@pytest.mark.parametrize("case", MALFORMED)
async def test_malformed_chat_bodies_get_a_400_and_change_nothing(gw: Gateway, case: str) -> None:
    body, status, code = MALFORMED[case]
    response = await gw.http.post(
        gw.url + "/api/chat", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == status, response.text[:300]
    error = response.json()["error"]
    assert error["message"] and len(error["message"]) <= DETAIL_MAX_CHARS
    if code:
        assert error["code"] == code
    assert gw.env.relay.streams == {}


async def test_nested_json_within_the_bounds_is_accepted(gw: Gateway) -> None:
    # Parts may hold nested data (tool inputs): a part 60 levels deep is passed on.
    inner = "[" * 58 + "]" * 58
    body = chat('[{"type":"data-x","data":' + inner + "}]", options='{"chunks":"1"}')
    async with gw.http.stream(
        "POST", gw.url + "/api/chat", content=body, headers={"content-type": "application/json"}
    ) as response:
        assert response.status_code == 200
        assert (await response.aread()).endswith(b"data: [DONE]\n\n")


def test_parse_json_refuses_deep_nesting_without_recursion() -> None:
    for deep in (b"[" * DEEP + b"]" * DEEP, b'{"a":' * DEEP + b"1" + b"}" * DEEP):
        with pytest.raises(HttpError) as caught:
            parse_json(deep)
        assert caught.value.status == 400 and "deeper" in caught.value.message
    assert parse_json(b'{"a":[1,"\\u00e9\\ud83d\\ude00"]}') == {"a": [1, "é\U0001f600"]}


async def test_a_lone_surrogate_in_a_stopped_partial_is_a_400(gw: Gateway) -> None:
    body = (
        b'{"assistantMessage":{"id":"m","role":"assistant",'
        b'"parts":[{"type":"text","text":"\\ud800"}]}}'
    )
    response = await gw.http.post(
        gw.url + "/api/chat/c/stop", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    huge_id = await gw.http.post(
        gw.url + "/api/chat/c/stop", json={"activeStreamId": "0" * 100_000}
    )
    assert huge_id.status_code == 400 and huge_id.json()["error"]["code"] == "invalid_request"


LAST_EVENT_IDS: dict[str, tuple[int, str]] = {
    "99999999999999999999999": (400, "out_of_range"),
    "9223372036854775807": (400, "out_of_range"),  # + 1 would overflow int64
    "9223372036854775806": (400, "out_of_range"),  # the relay's own answer: past the end
    "²": (400, "invalid_request"),  # str.isdigit() says yes; it is no offset
    "١٢": (400, "invalid_request"),  # Arabic-Indic digits
    "-1": (400, "invalid_request"),
    "1.5": (400, "invalid_request"),
    "1e3": (400, "invalid_request"),
    "0x10": (400, "invalid_request"),
    "": (400, "invalid_request"),
}


async def test_last_event_id_is_a_plain_offset_or_a_400(gw: Gateway) -> None:
    async with gw.open("POST", "/api/chat", json=gw.chat_body(chat_id="c", producer="scripted")):
        stream_id = next(iter(gw.env.relay.streams))
        gw.env.scripted.script(stream_id).put(*text_chunks(1))
        for value, (status, code) in LAST_EVENT_IDS.items():
            response = await gw.http.get(
                gw.url + "/api/chat/c/stream", headers={b"last-event-id": value.encode()}
            )
            assert response.status_code == status, value
            assert response.json()["error"]["code"] == code, value
        # Leading zeros are still an offset.
        path, headers = "/api/chat/c/stream?replay=exact", {"last-event-id": "0002"}
        async with gw.open("GET", path, headers=headers) as sse:
            assert sse.response.status_code == 200
            assert (await sse.next()).id == 3


def status(code: grpc.StatusCode, details: str) -> RelayError:
    """The error the relay client raises for this status."""
    return error_of(code.name, details)


INTERNALS = [
    (grpc.StatusCode.UNKNOWN, "Unexpected <class 'sqlite3.OperationalError'>: disk I/O error", 502),
    (grpc.StatusCode.INTERNAL, "RecursionError: maximum recursion depth exceeded", 502),
    (grpc.StatusCode.DATA_LOSS, "sqlite3.DatabaseError: database disk image is malformed", 502),
    (
        grpc.StatusCode.UNAVAILABLE,
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: "
        "Failed to connect to remote host: connect: Connection refused (111)",
        503,
    ),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", 504),
    (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "Stream removed (received metadata size exceeds hard limit (value length 1000035 vs. "
        "16384))",
        502,
    ),
]


@pytest.mark.parametrize(("code", "details", "http_status"), INTERNALS)
def test_what_the_relay_says_about_itself_stays_inside(
    code: grpc.StatusCode, details: str, http_status: int
) -> None:
    error = from_relay(status(code, details))
    assert error.status == http_status
    assert code.name in error.message
    for internal in ("sqlite", "Error", "class", "ipv4", "connect:", "metadata", "Deadline"):
        assert internal not in error.message


def test_what_the_relay_says_about_the_request_is_passed_on_bounded() -> None:
    long = status(grpc.StatusCode.INVALID_ARGUMENT, "unknown options ['" + "k" * 100_000 + "']")
    error = from_relay(long)
    assert (error.status, error.code) == (400, "invalid_argument")
    assert error.message.startswith("unknown options") and len(error.message) <= DETAIL_MAX_CHARS


async def test_errors_from_a_failing_relay_carry_no_internals(env: Env) -> None:
    """A relay that raises an unexpected exception: 502, the status name, nothing else."""

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("sqlite3.OperationalError: disk I/O error at /var/lib/secret.db")

    env.relay.list_messages = broken  # type: ignore[method-assign]
    server, task, url = await serve(create_app(GatewaySettings(relay_target=env.target)))
    try:
        async with httpx.AsyncClient() as http:
            response = await http.get(url + "/api/chat/c/messages")
    finally:
        server.should_exit = True
        await task
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "relay_error"
    assert re.search(r"\((UNKNOWN|INTERNAL)\)$", error["message"]), error["message"]
    assert "sqlite" not in response.text and "RuntimeError" not in response.text


ATTEMPTS_BEFORE_RESTART = 5
RECONNECT_BOUND_S = 1.5


async def test_the_gateway_sees_a_restarted_relay_within_a_second(tmp_path: Path) -> None:
    """gRPC's default reconnect backoff grows to seconds during an outage (1 s, x1.6 per failed
    attempt), and the gateway kept answering 503 that long after the relay was back.

    While the relay is down, a stand-in listener on its port counts the gateway's connection
    attempts and refuses each; the relay comes back right after the fifth. With the defaults the
    sixth attempt is 5-8 s later; with the gateway's options, at most 0.6 s."""
    port = free_port()
    relay = ("-m", "relay.server", "--address", f"127.0.0.1:{port}", "--db", str(tmp_path / "db"))

    def listening(entry: dict[str, Any]) -> bool:
        return bool(entry["message"] == "relay listening")

    attempts: list[float] = []
    enough = asyncio.Event()

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        attempts.append(loop.time())
        if len(attempts) >= ATTEMPTS_BEFORE_RESTART:
            enough.set()
        writer.close()

    async def browsers() -> None:
        while True:  # clients keep asking during the outage; every call fails at once
            assert (await http.get(url + "/api/chat/c/stream")).status_code == 503
            await asyncio.sleep(0.05)

    settings = GatewaySettings(
        relay_target=f"127.0.0.1:{port}", relay_timeout_s=2, relay_reconnect_s=0
    )
    server, task, url = await serve(create_app(settings))
    loop = asyncio.get_running_loop()
    body = {
        "id": "c",
        "options": {"chunks": "3", "delay_ms": "0"},
        "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}],
    }
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            async with python_service(*relay, ready=listening) as (process, _):
                assert (await http.post(url + "/api/chat", json=body)).status_code == 200
                long = {**body, "id": "long", "options": {"chunks": "100000", "delay_ms": "5"}}
                async with http.stream("POST", url + "/api/chat", json=long) as live:
                    lines = live.aiter_lines()
                    assert await anext(lines) == "id: 0"
                    process.kill()
                    await process.wait()
                    rest = [line async for line in lines if line.startswith("data: ")]
            # The live reader is told at once, and told to resume.
            assert rest[-1] == "data: [DONE]" and "resume to continue" in rest[-2]
            stand_in = await asyncio.start_server(refuse, "127.0.0.1", port)
            asking = asyncio.create_task(browsers())
            try:
                async with asyncio.timeout(60):
                    await enough.wait()
            finally:
                stand_in.close()
                await stand_in.wait_closed()
                asking.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asking
            async with python_service(*relay, ready=listening):
                back = loop.time()
                # A poll, on purpose: what is measured is how soon a client's call succeeds.
                while (await http.get(url + "/api/chat/c/stream")).status_code != 204:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
                waited = loop.time() - back
                # The shared AttachMany call was lost with the relay: a new one serves readers.
                async with http.stream("POST", url + "/api/chat", json=body) as answer:
                    assert answer.status_code == 200
                    assert (await answer.aread()).endswith(b"data: [DONE]\n\n")
    finally:
        server.should_exit = True
        await task
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(attempts)]
    print(f"attempt gaps {gaps}; the gateway answered {waited:.3f} s after the relay was back")
    assert waited < RECONNECT_BOUND_S


def relay_on(port: int, db: Path, *flags: str) -> Any:
    """`python -m relay.server` on a fixed port (to come back on it after a restart)."""
    return python_service(
        "-m",
        "relay.server",
        "--address",
        f"127.0.0.1:{port}",
        "--db",
        str(db),
        *flags,
        ready=lambda entry: entry["message"] == "relay listening",
    )


def long_chat(chat_id: str, chunks: int) -> dict[str, Any]:
    return {
        "id": chat_id,
        "options": {"chunks": str(chunks), "delay_ms": "5"},
        "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}],
    }


async def read_ids_and_data(lines: AsyncIterator[str]) -> tuple[list[int], list[str]]:
    ids: list[int] = []
    data: list[str] = []
    async for line in lines:
        if line.startswith("id: "):
            ids.append(int(line[4:]))
        elif line.startswith("data: "):
            data.append(line[6:])
    return ids, data


@pytest.mark.parametrize("reads", ["shared", "per-request"])
async def test_a_reader_whose_relay_is_killed_gets_the_interrupted_end_when_it_is_back(
    tmp_path: Path, reads: str
) -> None:
    """No "resume to continue" that leads to a 204: the gateway re-attaches the reader itself,
    from its offset, and the restarted relay answers with the rest of the journal and the end."""
    port, db = free_port(), tmp_path / "relay.sqlite3"
    settings = GatewaySettings(relay_target=f"127.0.0.1:{port}", relay_reads=reads)
    app = create_app(settings)
    server, task, url = await serve(app)
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            async with relay_on(port, db, "--journal-interval-ms", "5") as (process, _):
                answer = http.stream("POST", url + "/api/chat", json=long_chat("c", 100_000))
                response = await answer.__aenter__()
                lines = response.aiter_lines()
                seen: list[str] = []
                while len(seen) < 20:
                    line = await anext(lines)
                    if line.startswith("id: "):
                        seen.append(line)
                process.kill()
                await process.wait()
            async with relay_on(port, db):
                try:
                    ids, data = await read_ids_and_data(lines)
                finally:
                    await answer.__aexit__(None, None, None)
                messages = (await http.get(url + "/api/chat/c/messages")).json()["messages"]
    finally:
        server.should_exit = True
        await task
    every_id = [int(line[4:]) for line in seen] + ids
    assert every_id == list(range(len(every_id))), "a gap or a duplicate across the restart"
    assert data[-1] == "[DONE]"
    assert "the relay stopped while the stream was live" in data[-2]
    assert app.state.gateway.metrics.reattached._value.get() >= 1
    assert messages[-1]["role"] == "assistant"


async def test_a_reader_whose_relay_restarts_gracefully_gets_the_whole_answer(
    tmp_path: Path,
) -> None:
    """The relay stops (SIGTERM) while an answer streams: its readers are cut after a second,
    its producer finishes within the grace period. The gateway re-attaches the reader to the
    relay that comes back, which replays the rest from the journal: the browser sees one whole
    answer, no error."""
    port, db = free_port(), tmp_path / "relay.sqlite3"
    app = create_app(GatewaySettings(relay_target=f"127.0.0.1:{port}"))
    server, task, url = await serve(app)
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            async with relay_on(port, db) as (process, _):
                answer = http.stream("POST", url + "/api/chat", json=long_chat("c", 600))
                response = await answer.__aenter__()
                lines = response.aiter_lines()
                assert await anext(lines) == "id: 0"
                process.send_signal(signal.SIGTERM)
                assert await process.wait() == 0
            async with relay_on(port, db):
                try:
                    ids, data = await read_ids_and_data(lines)
                finally:
                    await answer.__aexit__(None, None, None)
    finally:
        server.should_exit = True
        await task
    assert [0, *ids] == list(range(len(ids) + 1))
    assert data[-1] == "[DONE]" and not any('"type":"error"' in d for d in data)
    assert json.loads(data[-2])["type"] == "finish"
    assert app.state.gateway.metrics.reattached._value.get() >= 1


async def trickle(
    address: str, request: bytes, *, at_once: bytes = b"", limit_s: float
) -> tuple[bytes, float]:
    """Sends `at_once`, then `request` a byte every 50 ms on a raw connection (then nothing);
    returns what the server answered by the time it closed the connection, and when (fails past
    `limit_s`)."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    loop = asyncio.get_running_loop()
    began = loop.time()
    writer.write(at_once)

    async def send_slowly() -> None:
        with contextlib.suppress(ConnectionError):
            for byte in request:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.05)

    sending = asyncio.create_task(send_slowly())
    try:
        async with asyncio.timeout(limit_s):
            answer = await reader.read()  # until the server closes the connection
        return answer, loop.time() - began
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sending
        writer.close()


SLOW_HEAD = b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nx-slow: " + b"a" * 1000 + b"\r\n\r\n"
SLOW_BODY = (
    b"POST /api/chat HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
    b"content-length: 1000\r\n\r\n"
)


async def test_slow_clients_are_cut_off(tmp_path: Path) -> None:
    """Headers or a body trickling a byte at a time, or a connection that sends nothing, used
    to stay open indefinitely; each now ends within its bound."""
    flags = ("--header-timeout-s", "1", "--body-timeout-s", "1")
    async with gateway_process(tmp_path, *flags, echo_delay_ms=1) as running:
        gw = running.address
        # Headers: a 408 (part of a request came), then the connection closes.
        answer, took = await trickle(gw, SLOW_HEAD, limit_s=8)
        assert answer.startswith(b"HTTP/1.1 408 ") and b'"request_timeout"' in answer
        assert 0.9 < took < 5
        # Nothing at all: closed.
        answer, took = await trickle(gw, b"", limit_s=8)
        assert answer == b"" and 0.9 < took < 5
        # The body: its headers came at once (sent whole), then a byte every 50 ms.
        pad = b'{"id": "c", "pad": "' + b"x" * 900
        answer, took = await trickle(gw, pad, at_once=SLOW_BODY, limit_s=8)
        assert answer.startswith(b"HTTP/1.1 408 ") and b"connection: close" in answer.lower()
        assert b'"request_timeout"' in answer and 0.9 < took < 5
        # A client at normal speed is unaffected, on a kept-alive connection too.
        async with httpx.AsyncClient(base_url=f"http://{gw}") as http:
            for _ in range(2):
                assert (await http.get("/healthz")).status_code == 200


async def test_ctrl_c_ends_every_reader_with_a_resume_chunk_and_exits_0(tmp_path: Path) -> None:
    """SIGINT during a live answer used to hold the reader until uvicorn's graceful timeout,
    cut it without a terminal chunk, and print a CancelledError traceback."""
    loop = asyncio.get_running_loop()
    long = {
        "id": "c",
        "options": {"chunks": "100000", "delay_ms": "20"},
        "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}],
    }
    settings = {"RELAY_SHUTDOWN_GRACE_S": "1"}
    async with gateway_process(tmp_path, echo_delay_ms=1, env=settings) as running:
        process, gw = running.process, running.address
        async with (
            httpx.AsyncClient(base_url=f"http://{gw}", timeout=30) as http,
            http.stream("POST", "/api/chat", json=long) as sse,
        ):
            lines = sse.aiter_lines()
            assert await anext(lines) == "id: 0"
            process.send_signal(signal.SIGINT)
            interrupted = loop.time()
            rest = [line async for line in lines if line.startswith("data: ")]
            ended_after = loop.time() - interrupted
        async with asyncio.timeout(30):
            code = await process.wait()
        assert process.stderr is not None
        stderr = (await process.stderr.read()).decode()
    assert rest[-2:] == [
        f"data: {dump_json({'type': 'error', 'errorText': RESTARTING})}",
        "data: [DONE]",
    ]
    assert ended_after < 1.5, ended_after
    assert code == 0
    assert "Traceback" not in stderr and "CancelledError" not in stderr, stderr
    assert "graceful shutdown exceeded" not in stderr, stderr
