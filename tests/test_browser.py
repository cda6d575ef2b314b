"""The demo page at `/` in headless Chromium, against the real stack (gateway + embedded relay).

tests/e2e/browser/demo.mjs drives the page with playwright-core and Debian's /usr/bin/chromium
(never a downloaded browser): send, reload mid-answer (the answer resumes and appears once), send
again and Stop mid-answer (the answer stops and its partial copy is persisted), reload (nothing to
resume). This test sets the tools up, runs it and asserts on what it saw and on the chat store,
with the gateway anonymous and in JWT mode (the page opened as /#token=<JWT>). The page's CSP
holds throughout: a violation would be a console error.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import ROOT, GatewayProcess, gateway_process, node_with_packages

BROWSER_DIR = ROOT / "tests" / "e2e" / "browser"
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = ARTIFACTS / "demo-page.png"
OBSERVED = ARTIFACTS / "demo-page.json"  # all the scenario saw, for a failure's post-mortem
SCENARIO_TIMEOUT_S = 90.0


def _run(command: list[str], cwd: Path | None = None, timeout: float = 900) -> str | None:
    """Runs a setup command; None if it worked, else its exit status and the tail of its output."""
    try:
        done = subprocess.run(
            command, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`{' '.join(command)}` could not run: {exc}"
    if done.returncode == 0:
        return None
    tail = (done.stdout + done.stderr)[-2000:]
    return f"`{' '.join(command)}` exited {done.returncode}:\n{tail}"


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's Chromium, installed with apt-get if it is missing (the test runs as root)."""
    if not CHROMIUM.exists():
        install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
        failure = _run(install)
        if failure is not None:  # perhaps stale package lists: update them, then try again
            failure = _run(["apt-get", "update"]) or _run(install)
        if failure is not None or not CHROMIUM.exists():
            pytest.fail(f"cannot install Chromium for the browser test: {failure}", pytrace=False)
    return CHROMIUM


@pytest.fixture(scope="session")
def node_scripts() -> Path:
    """tests/e2e/browser with its npm dependencies (playwright-core only) installed."""
    node_with_packages(BROWSER_DIR, "the browser test drives Chromium from Node.js")
    return BROWSER_DIR


ISSUER = "https://issuer.browser.test"
AUDIENCE = "stream-relay-demo"


@pytest.fixture(params=["anonymous", "jwt"])
async def demo(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[GatewayProcess, str | None]]:
    """The stack, anonymous or verifying ES256 JWTs (with a token for the page)."""
    if request.param == "anonymous":
        async with gateway_process(tmp_path) as stack:
            yield stack, None
        return
    key = ec.generate_private_key(ec.SECP256R1())
    public = tmp_path / "jwt-public.pem"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "demo-user", "iat": now, "exp": now + 900}
    flags = ["--auth", "jwt", "--jwt-key-file", str(public), "--jwt-algorithms", "ES256"]
    flags += ["--jwt-issuer", ISSUER, "--jwt-audience", AUDIENCE]
    async with gateway_process(tmp_path, *flags) as stack:
        yield stack, jwt.encode(claims, key, algorithm="ES256")


async def run_scenario(
    url: str, chromium: Path, scripts: Path, token: str | None = None
) -> dict[str, Any]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)
    node = shutil.which("node")
    assert node is not None
    process = await asyncio.create_subprocess_exec(
        node,
        str(scripts / "demo.mjs"),
        url,
        str(SCREENSHOT),
        cwd=scripts,
        env={
            **os.environ,
            "CHROMIUM_PATH": str(chromium),
            **({"GATEWAY_TOKEN": token} if token else {}),
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(SCENARIO_TIMEOUT_S):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"the browser scenario ran over {SCENARIO_TIMEOUT_S} s") from None
    output = stdout.decode().strip()
    assert process.returncode == 0 and output, (
        f"the browser scenario failed (exit {process.returncode}):\n{stderr.decode()[-3000:]}"
    )
    line = output.splitlines()[-1]
    OBSERVED.write_text(line + "\n")
    result: dict[str, Any] = json.loads(line)
    return result


def words(text: str) -> list[str]:
    return text.split()


def prefixes_only(seen: list[dict[str, str]], message_id: str, expected: str) -> list[str]:
    """The texts the page ever showed for a message that are not a beginning of `expected`."""
    return [s["text"] for s in seen if s["id"] == message_id and not expected.startswith(s["text"])]


def text_of(message: dict[str, Any]) -> str:
    return "".join(p["text"] for p in message["parts"] if p.get("type") == "text")


# The first run may install Chromium and playwright-core: the timeout covers fixture setup too.
@pytest.mark.timeout(900)
async def test_demo_page_resumes_after_reload_and_stops(
    demo: tuple[GatewayProcess, str | None], chromium: Path, node_scripts: Path
) -> None:
    stack, token = demo
    r = await run_scenario(stack.url, chromium, node_scripts, token)
    steps = r["steps"]
    assert "failed" not in r, f"{r['failed']} (steps done: {steps}; all seen: {OBSERVED})"
    assert r["pageErrors"] == [], r["pageErrors"]
    if token is not None:  # every /api request carried the token; the URL no longer shows it
        assert all(q["authorized"] for q in r["requests"]), r["requests"]
        assert r["tokenLeftInUrl"] is False
    assert all(
        q["contentType"] == "application/json" for q in r["requests"] if q["method"] == "POST"
    )
    # Chromium logs the one refused request (step 2) itself; nothing else may log an error.
    refused_log = "Failed to load resource: the server responded with a status of 400 (Bad Request)"
    assert r["consoleErrors"] == [refused_log], r["consoleErrors"]

    # A fresh page makes up a chat id, puts it in the URL, and finds nothing to resume.
    chat_id = r["chatId"]
    assert chat_id and r["shownChatId"] == chat_id
    assert r["firstResume"] == 204
    assert r["initialStatus"] == "ready"

    # A refused request (chunks=0): the gateway's error message is shown, the message taken back.
    assert "chunks must be between" in r["refused"]["error"], r["refused"]
    assert r["refused"]["messages"] == 0 and r["refused"]["input"] == "hello relay world"

    # Reload mid-answer: same chat, the answer resumes (200), streams, then completes once.
    first = r["expectedFirst"]
    assert r["stopEnabledWhileStreaming"] is True
    assert first.startswith(r["beforeReload"]) and len(r["beforeReload"]) < len(first), (
        "the reload did not happen mid-answer",
        r["beforeReload"],
    )
    assert r["chatIdAfterReload"] == chat_id
    # The answer was live at the reload, so not persisted yet (the test then added a copy of it).
    assert r["persistedAtReload"] == ["user"]
    assert r["resumeAfterReload"] == 200, "the reloaded page found no answer to resume"
    assert r["statusAfterReload"] == "streaming"
    resumed = r["afterResume"]
    assert resumed["users"] == ["hello relay world"]
    assert resumed["assistants"] == [first], "the resumed answer is not the echo, exactly once"
    assert words(resumed["assistants"][0]) == words(first)
    assert resumed["seen"]["max"] == 1, "the answer was shown twice at some point"
    assert resumed["ids"] == [r["liveId"]], "the resumed answer has another message id"
    answer_id = r["liveId"]
    shown_wrong = prefixes_only(resumed["seen"]["seen"], answer_id, first)
    assert shown_wrong == [], f"the page showed text that is not the answer so far: {shown_wrong}"
    posts = [q for q in r["requests"] if q["method"] == "POST" and q["path"] == "/api/chat"]
    assert len(posts) == 4, "each user message must be sent exactly once (no re-send on reload)"
    late_post = posts.pop()  # step 6's
    assert json.loads(posts[0]["body"])["options"] == {"chunks": "0", "delay_ms": "60"}
    posts = posts[1:]
    options = {"chunks": "60", "delay_ms": "60"}
    assert all(json.loads(q["body"])["options"] == options for q in posts)
    assert [m["role"] for m in json.loads(posts[0]["body"])["messages"]] == ["user"]
    second_post = json.loads(posts[1]["body"])
    assert [m["role"] for m in second_post["messages"]] == ["user", "assistant", "user"]
    assert second_post["trigger"] == "submit-message" and second_post["id"] == chat_id

    # Stop mid-answer: the stop route first (with the partial answer), the answer stops growing.
    second = r["expectedSecond"]
    assert r["stopHttpStatus"] == 200
    assert r["stopResult"]["stopped"] is True and r["stopResult"]["outcome"] == "stopped", r[
        "stopResult"
    ]
    assert r["stopResult"]["state"] == "stopped" and r["stopResult"]["reason"] == "stop"
    # The page shows why the answer ended, from the stop's receipt, and again after a reload.
    assert r["afterStop"]["endLabels"] == ["", "stopped"], r["afterStop"]
    at_stop = r["textAtStop"]
    assert at_stop and second.startswith(at_stop) and len(at_stop) < len(second), at_stop
    assert r["textAfterWait"] == at_stop, "the answer kept growing after Stop"
    assert r["statusAfterWait"] == "stopped"
    assert r["stopEnabledAfterStop"] is False
    partial = r["stopRequest"].get("assistantMessage")
    assert partial is not None, "Stop did not send the partial answer"
    assert partial["role"] == "assistant" and text_of(partial) == at_stop
    # It names the POST it means too (for a Stop pressed before the POST reached the server).
    assert r["stopRequest"]["requestId"] == posts[1]["idempotencyKey"] is not None
    assert r["stopRequest"]["messageId"] == second_post["messages"][-1]["id"]
    sent_stream = r["stopRequest"].get("activeStreamId")
    if sent_stream is not None:
        assert sent_stream == r["stopResult"]["streamId"]
    stop_calls = [q for q in r["requests"] if q["path"].endswith("/stop")]
    assert len(stop_calls) == 2, "the stop route must be called by the Stop button only"

    # The store has the partial answer as the user saw it.
    headers = {"authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(base_url=stack.url, headers=headers) as http:
        reply = await http.get(f"/api/chat/{chat_id}/messages")
    assert reply.status_code == 200
    stored = reply.json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant", "user"]
    assert stored[1]["id"] == answer_id and text_of(stored[1]) == first
    assert stored[3]["id"] == partial["id"] and text_of(stored[3]) == at_stop
    assert stored[3]["metadata"]["streamEnd"] == {"state": "stopped", "reason": "stop"}
    assert "streamEnd" not in (stored[1].get("metadata") or {})  # completed: no label

    # Reload after Stop: nothing to resume, nothing streaming, the partial answer as persisted.
    assert r["resumeAfterStop"] == 204
    assert r["statusAfterStopReload"] == "ready"
    assert r["streamingElements"] == 0
    assert r["afterStopReload"]["assistants"] == [first, at_stop]
    assert r["afterStopReload"]["users"] == ["hello relay world", "please stop here"]
    assert r["afterStopReload"]["endLabels"] == ["", "stopped"]
    assert r["afterStopReload"]["error"] is False
    assert SCREENSHOT.exists() and SCREENSHOT.stat().st_size > 0

    # Stop pressed while the POST was still on its way: the stop named it, came first, and the
    # POST's answer ended as it started (its user message kept, no answer).
    late_body = json.loads(late_post["body"])
    assert r["earlyStop"]["outcome"] == "stopped_before_start", r["earlyStop"]
    assert r["earlyStop"]["stopped"] is True
    assert r["earlyStopRequest"] == {
        "requestId": late_post["idempotencyKey"],
        "messageId": late_body["messages"][-1]["id"],
    }
    late = r["lateAnswer"]
    assert late.get("status") == 200, late
    data = [line[6:] for line in late["body"].splitlines() if line.startswith("data: ")]
    assert data == ['{"type":"abort"}', "[DONE]"], late
    assert stored[4]["id"] == late_body["messages"][-1]["id"]
    assert text_of(stored[4]) == "stop me before you start"


async def test_answers_name_their_stream_for_stop(stack: GatewayProcess) -> None:
    """The page reads `x-stream-id` so that its Stop cancels only the answer it shows."""
    body = {
        "id": "named-stream",
        "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}],
        "trigger": "submit-message",
        "options": {"chunks": "500", "delay_ms": "20"},
    }
    async with (
        httpx.AsyncClient(base_url=stack.url) as http,
        http.stream("POST", "/api/chat", json=body) as answer,
    ):
        assert answer.status_code == 200
        async with http.stream("GET", "/api/chat/named-stream/stream") as resumed:
            assert resumed.status_code == 200
            resumed_id = resumed.headers.get("x-stream-id")
        stop = await http.post(
            "/api/chat/named-stream/stop",
            json={"activeStreamId": answer.headers.get("x-stream-id", "")},
        )
    assert stop.json()["streamId"] is not None
    assert answer.headers.get("x-stream-id") == stop.json()["streamId"] == resumed_id
    assert stop.json()["stopped"] is True
