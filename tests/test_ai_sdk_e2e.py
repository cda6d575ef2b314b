"""End to end with the real AI SDK chat client: `AbstractChat` and `DefaultChatTransport` from the
npm package `ai` (each supported major), driven from Node against the gateway as users run it.

The scenarios are the conformance kit's (conformance/scenarios.mjs, also `make conformance`):
tests/e2e/ai-sdk/chat-driver.mjs plays one and prints what the client saw (status, messages,
onFinish calls, every HTTP exchange with its raw body) with the kit's verdict, its first failing
check. Every test here asserts that verdict, then what only the echo producer makes checkable: the
exact answers. The scenarios wait on the client's own state changes, never on sleeps.

With the gateway in JWT mode (`--auth jwt`), the same client passes its token in the transport's
`headers`: the scenarios play out the same, every request carries it, and one without is a 401
the client shows as its error.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import ROOT, GatewayProcess, gateway_process, node_with_packages

CONFORMANCE_DIR = ROOT / "conformance"  # the kit: its scenarios and the npm packages
DRIVER = Path(__file__).resolve().parent / "e2e" / "ai-sdk" / "chat-driver.mjs"
DRIVER_TIMEOUT_S = 60.0

Json = dict[str, Any]

# The supported majors of `ai`, as the kit names them (conformance/package.json installs each).
CLIENTS = ["ai5", "ai6", "ai7"]

# The kit's long question (conformance/scenarios.mjs LONG_PROMPT): 60 numbered words to repeat,
# so a duplicated word is visible; the echo answers it word for word.
LONG_QUESTION = "Repeat these words exactly, separated by spaces: " + " ".join(
    f"w{i}" for i in range(60)
)
LONG_ANSWER = f"You said: {LONG_QUESTION}"
SHORT_ANSWER = "You said: hello relay world"  # the kit's `send`


@pytest.fixture(scope="session")
def node() -> str:
    """Node on PATH, with the kit's npm dependencies installed (once, and again when stale)."""
    return node_with_packages(CONFORMANCE_DIR, "the real AI SDK client runs on Node.js")


@pytest.fixture(params=CLIENTS)
def client_package(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@dataclass(frozen=True)
class JwtStack:
    stack: GatewayProcess
    token: str  # a valid RS256 JWT for subject e2e-user


ISSUER = "https://issuer.e2e.test"
AUDIENCE = "stream-relay-e2e"


@pytest.fixture
async def jwt_stack(tmp_path: Path) -> AsyncIterator[JwtStack]:
    """The stack with `--auth jwt`: RS256 with a public key file, the way an identity provider's
    tokens are checked."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = tmp_path / "jwt-public.pem"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "e2e-user", "iat": now, "exp": now + 600}
    token = jwt.encode(claims, key, algorithm="RS256")
    flags = ["--auth", "jwt", "--jwt-key-file", str(public), "--jwt-algorithms", "RS256"]
    flags += ["--jwt-issuer", ISSUER, "--jwt-audience", AUDIENCE]
    async with gateway_process(tmp_path, *flags) as stack:
        yield JwtStack(stack, token)


async def drive(
    node: str,
    stack: GatewayProcess,
    scenario: str,
    client: str,
    token: str | None = None,
    body: Json | None = None,
    verdict: str | None = "pass",
) -> Json:
    """Plays the kit's `scenario` with `client` (sending `token` as a bearer on every request, if
    given, and merging `body` into every POST body); returns the driver's report, once the
    kit's verdict is `verdict` (None: whatever it is)."""
    process = await asyncio.create_subprocess_exec(
        node,
        str(DRIVER),
        stack.url,
        scenario,
        client,
        json.dumps(body or {}),
        cwd=CONFORMANCE_DIR,
        env={
            **os.environ,
            "NODE_NO_WARNINGS": "1",
            **({"GATEWAY_TOKEN": token} if token else {}),
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(DRIVER_TIMEOUT_S):
            out, err = await process.communicate()
    except TimeoutError:
        pytest.fail(f"the driver ran over {DRIVER_TIMEOUT_S} s in scenario {scenario}")
    finally:
        if process.returncode is None:  # timed out, or the test was cancelled
            process.kill()
            await process.wait()
    assert process.returncode == 0, f"the driver failed:\n{err.decode()}"
    lines = out.decode().strip().splitlines()
    assert lines, f"the driver printed nothing:\n{err.decode()}"
    report: Json = json.loads(lines[-1])
    check = report["check"]
    if verdict is not None:
        assert check["status"] == verdict, (
            f"the kit's verdict on {scenario}: {check['status']}: {check['failure']}\n"
            + transcript(report)
        )
    return report


async def persisted(stack: GatewayProcess, chat_id: str, token: str | None = None) -> list[Json]:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(base_url=stack.url, timeout=10, headers=headers) as http:
        response = await http.get(f"/api/chat/{chat_id}/messages")
    assert response.status_code == 200, response.text
    messages: list[Json] = response.json()["messages"]
    return messages


def text_of(message: Json) -> str:
    return "".join(str(p.get("text", "")) for p in message["parts"] if p.get("type") == "text")


def assistants(messages: list[Json]) -> list[Json]:
    return [m for m in messages if m["role"] == "assistant"]


def the_assistant(messages: list[Json], where: str) -> Json:
    """The one assistant message of `messages`."""
    found = assistants(messages)
    assert len(found) == 1, f"{len(found)} assistant messages {where}: {json.dumps(messages)}"
    return found[0]


def sse_chunks(body: str) -> list[Json]:
    """The UI message chunks of an SSE body (`data:` lines; `[DONE]` and other lines left out)."""
    return [
        json.loads(line.removeprefix("data: "))
        for line in body.split("\n")
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


def the_exchange(report: Json, method: str, path_end: str) -> Json:
    """The client's one request `method` to a path ending in `path_end`, with its response."""
    found = [
        e for e in report["exchanges"] if e["method"] == method and e["path"].endswith(path_end)
    ]
    assert len(found) == 1, f"{len(found)} {method} *{path_end} requests\n{transcript(report)}"
    exchange: Json = found[0]
    return exchange


def start_chunk(body: str) -> Json:
    """The `start` chunk of an SSE body: it names the assistant message."""
    starts = [c for c in sse_chunks(body) if c["type"] == "start"]
    assert len(starts) == 1, f"{len(starts)} start chunks in {body!r}"
    return starts[0]


def transcript(report: Json) -> str:
    """What the client saw, for assertion messages: each exchange with its raw body, and state."""
    lines = [f"ai {report.get('aiVersion')}, chat {report.get('chatId')}"]
    for e in report.get("exchanges", []):
        lines.append(
            f"{e['method']} {e['path']} -> {e.get('status', e.get('fetchError'))}"
            f" (body {e.get('bodyEnd', 'none')}): {e.get('body', '')!r}"
        )
    lines.append(f"statuses {report.get('statuses')}, error {report.get('error')!r}")
    lines.append(f"messages {json.dumps(report.get('messages'))}")
    return "\n".join(lines)


def assert_one_complete_answer(report: Json, expected: str) -> Json:
    """One user message, then one assistant message holding exactly `expected`."""
    seen = transcript(report)
    assert [m["role"] for m in report["messages"]] == ["user", "assistant"], seen
    answer: Json = report["messages"][1]
    text = text_of(answer)
    assert text == expected, seen
    return answer


async def test_send_receives_the_whole_answer(
    node: str, stack: GatewayProcess, client_package: str
) -> None:
    report = await drive(node, stack, "send", client_package)
    seen = transcript(report)

    assert report["status"] == "ready", seen
    assert report["error"] is None, seen
    assert report["statuses"][-3:] == ["submitted", "streaming", "ready"], seen
    answer = assert_one_complete_answer(report, SHORT_ANSWER)
    post = the_exchange(report, "POST", "/api/chat")
    assert post["status"] == 200, seen
    assert post["headers"]["content-type"].startswith("text/event-stream"), seen
    assert post["headers"]["x-vercel-ai-ui-message-stream"] == "v1", seen
    assert post["body"].endswith("data: [DONE]\n\n"), seen
    assert post["bodyEnd"] == "closed", "the client needs the body closed to finish:\n" + seen
    assert len(report["finishes"]) == 1, seen
    finish = report["finishes"][0]
    assert finish["finishReason"] == "stop", seen
    assert not (finish["isAbort"] or finish["isError"] or finish["isDisconnect"]), seen
    stored = the_assistant(await persisted(stack, report["chatId"]), "persisted")
    assert (stored["id"], text_of(stored)) == (answer["id"], text_of(answer))


async def test_send_with_options_receives_the_repeated_words(
    node: str, stack: GatewayProcess, client_package: str
) -> None:
    report = await drive(node, stack, "send", client_package, body={"options": {"chunks": "12"}})

    assert report["status"] == "ready", transcript(report)
    words = SHORT_ANSWER.split()  # the echo repeats its words to reach `chunks`
    assert_one_complete_answer(report, " ".join(words[i % len(words)] for i in range(12)))


async def test_abort_then_resume_gets_the_whole_answer_exactly_once(
    node: str, stack: GatewayProcess, client_package: str
) -> None:
    """stop() only aborts the fetch (a closed tab): the answer goes on, and a resume replays it
    from its first chunk into the same message, with no word twice."""
    report = await drive(node, stack, "abort-resume", client_package)
    seen = transcript(report)

    partial = report["afterAbort"]["text"]
    assert report["afterAbort"]["status"] == "ready", seen
    assert partial and LONG_ANSWER.startswith(partial) and len(partial) < len(LONG_ANSWER), seen
    post = the_exchange(report, "POST", "/api/chat")
    resume = the_exchange(report, "GET", "/stream")
    assert resume["status"] == 200, (
        "the resume found no active stream: the abort ended the answer, or it ran out first\n"
        + seen
    )
    replayed = sse_chunks(resume["body"])
    assert replayed[0]["type"] == "start", "a resume must replay from the first chunk\n" + seen
    assert replayed[-1] == {"type": "finish", "finishReason": "stop"}, seen

    assert report["status"] == "ready", seen
    assert report["error"] is None, seen
    answer = assert_one_complete_answer(report, LONG_ANSWER)
    twice = [w for w, n in Counter(text_of(answer).split()).items() if n > 1]
    assert not twice, f"words duplicated by the resume: {twice}\n{seen}"
    start = start_chunk(post["body"])
    assert answer["id"] == start["messageId"] == replayed[0]["messageId"], seen
    assert report["finishes"][-1]["finishReason"] == "stop", seen
    # The producer was never cancelled: the relay persisted the whole answer under the same id.
    stored = the_assistant(await persisted(stack, report["chatId"]), "persisted")
    assert (stored["id"], text_of(stored)) == (answer["id"], LONG_ANSWER)


async def test_a_reloaded_page_resumes_the_live_answer_into_one_message(
    node: str, stack: GatewayProcess, client_package: str
) -> None:
    """The tab closes mid-answer; a new page seeded from GET /messages resumes on mount
    (what `useChat({resume: true})` does) and shows the whole answer once."""
    report = await drive(node, stack, "reload-resume", client_package)
    check_reload_resume(report)


def check_reload_resume(report: Json) -> None:
    seen = transcript(report)
    assert len(report["afterAbort"]["text"]) < len(LONG_ANSWER), seen
    loaded = report["loadedOnReload"]
    assert isinstance(loaded, list), seen
    assert [m["role"] for m in loaded][:1] == ["user"], seen
    assert len(assistants(loaded)) <= 1, seen
    resume = the_exchange(report, "GET", "/stream")
    assert resume["status"] == 200, "the reloaded page found no live answer to resume\n" + seen
    assert report["status"] == "ready", seen
    assert report["error"] is None, seen
    answer = assert_one_complete_answer(report, LONG_ANSWER)
    post = the_exchange(report, "POST", "/api/chat")
    start = start_chunk(post["body"])
    assert answer["id"] == start["messageId"], seen


async def test_stop_route_persists_the_partial_and_ends_the_stream(
    node: str, stack: GatewayProcess, client_package: str
) -> None:
    """POST /stop with the client's partial, then stop(): the partial is what is kept, and a later
    resume finds nothing to resume (204) and leaves the client as it was."""
    report = await drive(node, stack, "stop-route", client_package)
    await check_stop_route(report, stack)


async def check_stop_route(report: Json, stack: GatewayProcess, token: str | None = None) -> None:
    seen = transcript(report)
    stop = report["stopResponse"]
    assert stop["status"] == 200, seen
    assert stop["json"]["stopped"] is True, stop
    assert stop["json"]["outcome"] == "stopped", stop
    assert stop["json"]["state"] == "stopped", stop

    sent = report["partialSent"]
    assert sent["text"] and LONG_ANSWER.startswith(sent["text"]), seen
    assert len(sent["text"]) < len(LONG_ANSWER), seen
    for messages in (
        report["persistedAfterStop"]["json"]["messages"],
        await persisted(stack, report["chatId"], token),
    ):
        stored = the_assistant(messages, "persisted after the stop")
        assert (stored["id"], text_of(stored)) == (sent["id"], sent["text"]), seen

    assert report["afterStop"]["status"] == "ready", seen
    resume = the_exchange(report, "GET", "/stream")
    assert resume["status"] == 204, "a stopped stream must not be resumable\n" + seen
    assert report["status"] == "ready", seen
    assert report["error"] is None, seen
    assert report["messages"] == report["afterStop"]["messages"], (
        "the resume changed the chat\n" + seen
    )
    shown = the_assistant(report["messages"], "in the client")
    assert shown["id"] == sent["id"], seen
    assert text_of(shown).startswith(sent["text"]), seen


async def test_resume_after_completion_is_204_and_the_message_keeps_its_id(
    node: str, stack: GatewayProcess, client_package: str
) -> None:
    report = await drive(node, stack, "resume-204", client_package)
    seen = transcript(report)

    assert report["afterSend"]["status"] == "ready", seen
    answer = assert_one_complete_answer(report, "You said: resume me later")
    resume = the_exchange(report, "GET", "/stream")
    assert resume["status"] == 204, "nothing is left to resume after the answer ended\n" + seen
    assert report["status"] == "ready", seen
    assert report["error"] is None, seen
    assert report["messages"] == report["afterSend"]["messages"], seen

    post = the_exchange(report, "POST", "/api/chat")
    start = start_chunk(post["body"])
    assert answer["id"] == start["messageId"], seen
    stored = the_assistant(await persisted(stack, report["chatId"]), "persisted")
    assert stored["id"] == start["messageId"], (
        "the persisted answer's id differs from the stream's: a reloaded page shows it twice"
    )
    assert text_of(stored) == text_of(answer)


def assert_every_request_authorized(report: Json) -> None:
    """The client's own requests (chat, resume) carried the token; its POST said it was JSON."""
    seen = transcript(report)
    assert report["exchanges"], seen
    for exchange in report["exchanges"]:
        assert exchange["authorized"] is True, f"{exchange['method']} {exchange['path']}\n{seen}"
        if exchange["method"] == "POST":
            assert exchange["contentType"] == "application/json", seen


async def test_with_jwt_auth_a_reloaded_page_resumes(
    node: str, jwt_stack: JwtStack, client_package: str
) -> None:
    report = await drive(
        node, jwt_stack.stack, "reload-resume", client_package, token=jwt_stack.token
    )
    check_reload_resume(report)
    assert_every_request_authorized(report)


async def test_with_jwt_auth_the_stop_route_stops(
    node: str, jwt_stack: JwtStack, client_package: str
) -> None:
    report = await drive(node, jwt_stack.stack, "stop-route", client_package, token=jwt_stack.token)
    await check_stop_route(report, jwt_stack.stack, jwt_stack.token)
    assert_every_request_authorized(report)


async def test_with_jwt_auth_a_client_without_a_token_gets_401(
    node: str, jwt_stack: JwtStack, client_package: str
) -> None:
    report = await drive(node, jwt_stack.stack, "send", client_package, verdict="fail")
    seen = transcript(report)
    post = the_exchange(report, "POST", "/api/chat")
    assert post["status"] == 401, seen
    assert post["contentType"] == "application/json", seen
    assert report["status"] == "error", seen
    assert "Authorization: Bearer token is required" in (report["error"] or ""), seen


async def test_a_reload_on_the_third_turn_shows_each_answer_exactly_once(
    node: str, stack: GatewayProcess, client_package: str
) -> None:
    """Three turns; the third answer is cut by a closed tab; a new page seeded from GET
    /messages resumes it on mount: user and assistant three times, each answer once, under the
    id of its `start` chunk."""
    report = await drive(node, stack, "third-turn-reload", client_package)
    seen = transcript(report)

    assert len(report["afterAbort"]["text"]) < len(LONG_ANSWER), seen
    resume = the_exchange(report, "GET", "/stream")
    assert resume["status"] == 200, seen
    assert [m["role"] for m in report["messages"]] == ["user", "assistant"] * 3, seen
    answers = assistants(report["messages"])
    assert [text_of(m) for m in answers] == [
        "You said: first turn",
        "You said: second turn",
        LONG_ANSWER,
    ], seen
    posts = [e for e in report["exchanges"] if e["method"] == "POST" and e["path"] == "/api/chat"]
    assert [m["id"] for m in answers] == [start_chunk(p["body"])["messageId"] for p in posts], seen
    stored = await persisted(stack, report["chatId"])
    assert [(m["id"], text_of(m)) for m in stored] == [
        (m["id"], text_of(m)) for m in report["messages"]
    ]


# The echo answer in three parts: reasoning, a call of the tool `echo`, text (README: echo).
PARTS_BODY: Json = {"options": {"parts": "reasoning,tool,text", "delay_ms": "10"}}


def echo_parts_message(answer: str) -> list[Json]:
    """What an uninterrupted read of the echo with PARTS_BODY shows: its parts' content."""
    return [
        {"type": "step-start"},
        {"type": "reasoning", "text": answer, "state": "done"},
        {
            "type": "tool-echo",
            "toolCallId": "call0",
            "state": "output-available",
            "input": {"text": answer},
            "output": {"words": len(answer.split())},
        },
        {"type": "text", "text": answer, "state": "done"},
    ]


def content(message: Json) -> list[Json]:
    keys = ("type", "text", "state", "toolCallId", "input", "output")
    return [{k: part[k] for k in keys if k in part} for part in message["parts"]]


AI5_TOOL_RESUME = (
    "ai 5 keeps the last assistant message when it holds a tool call in input-streaming and "
    "applies the resumed answer (a snapshot from its start chunk) on top of it: step-start and "
    "reasoning shown twice, the tool call twice (one left in input-streaming)"
)


@pytest.mark.parametrize(
    ("kind", "reload", "client"),
    [
        pytest.param(
            kind,
            reload,
            client,
            id=f"{kind}-{'reload' if reload else 'same-client'}-{client}",
            marks=(
                [pytest.mark.xfail(reason=AI5_TOOL_RESUME, strict=True)]
                if (kind, reload, client) == ("tool", False, "ai5")
                else []
            ),
        )
        for kind in ("text", "reasoning", "tool")
        for reload in (True, False)
        for client in CLIENTS
    ],
)
async def test_a_last_event_id_resume_inside_a_part_shows_the_uninterrupted_answer(
    node: str, stack: GatewayProcess, kind: str, reload: bool, client: str
) -> None:
    """The tab closes while a text, reasoning or tool-input part streams; the app resumes with
    the SSE id of the last event it saw as `Last-Event-ID` (DefaultChatTransport's
    prepareReconnectToStreamRequest), in the same client or from a reloaded page. The gateway
    sends the message so far as a snapshot from its `start` chunk, then the rest: the client
    shows exactly what an uninterrupted read shows, with no error."""
    scenario = f"last-event-id-{kind}{'-reload' if reload else ''}"
    report = await drive(node, stack, scenario, client, body=PARTS_BODY)
    seen = transcript(report)

    cut = report["cut"]
    inside = {"text": "text-", "reasoning": "reasoning-", "tool": "tool-input-"}[kind]
    assert cut["landedIn"]["type"].startswith(inside), seen
    resume = the_exchange(report, "GET", "/stream")
    assert resume["lastEventId"] == cut["lastEventId"], seen
    replayed = sse_chunks(resume["body"])
    assert replayed[0]["type"] == "start", seen
    assert report["error"] is None, seen
    assert [m["role"] for m in report["messages"]] == ["user", "assistant"], seen
    answer = report["messages"][1]
    assert content(answer) == echo_parts_message(LONG_ANSWER), seen
    stored = the_assistant(await persisted(stack, report["chatId"]), "persisted")
    assert (stored["id"], content(stored)) == (answer["id"], content(answer))


async def test_compacted_and_plain_resumes_show_the_same_message(
    node: str, stack: GatewayProcess, client_package: str
) -> None:
    """Two reloaded pages resume one live answer with reasoning, a tool call and text: one with
    `?replay=plain` (every delta), one with the gateway's default (compacted). The client builds
    the same message from both (the kit checks it, deep-equal), equal to the uninterrupted answer,
    from fewer events."""
    report = await drive(node, stack, "replay-modes", client_package, body=PARTS_BODY)
    seen = transcript(report)
    resumes = [e for e in report["exchanges"] if e["method"] == "GET" and "/stream" in e["path"]]
    assert len(resumes) == 2 and all(r["status"] == 200 for r in resumes), seen
    plain, compact = sorted(resumes, key=lambda r: r["query"] != "?replay=plain")
    assert (plain["query"], compact["query"]) == ("?replay=plain", ""), seen
    # What the answer held at the resume came merged (the rest live, one by one): fewer events.
    plain_chunks, compact_chunks = sse_chunks(plain["body"]), sse_chunks(compact["body"])
    assert len(compact_chunks) < len(plain_chunks), seen
    merged = [c.get("delta", "") for c in compact_chunks if c["type"].endswith("-delta")]
    assert any(len(d.split()) > 2 for d in merged), "nothing was compacted\n" + seen
    stored = the_assistant(await persisted(stack, report["chatId"]), "persisted")
    assert content(stored) == echo_parts_message(LONG_ANSWER), seen
