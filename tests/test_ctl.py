"""stream-relay-ctl against a real relay: each command's JSON lines, and its errors."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from relay.domain.model import StartRequest, dump_json
from tests.conftest import ROOT, Env, eventually, free_port, text_chunks, user


async def ctl(env: Env | None, *argv: str, target: str = "") -> tuple[int, list[Any], str]:
    """Runs `python -m relay.ctl` (in its own process: the relay runs in this test's loop)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay.ctl",
        "--target",
        target or (env.target if env else ""),
        *argv,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("RELAY_CTL_")},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    lines = [json.loads(line) for line in out.decode().splitlines()]
    return process.returncode, lines, err.decode()


async def test_active_tail_stop_messages_and_stats(env: Env) -> None:
    started = await env.relay.start(StartRequest("chat-1", [user("hi")], producer="scripted"))
    sent = text_chunks(3)
    env.scripted.script(started.stream_id).put(*sent)
    await eventually(lambda: len(env.relay.streams[started.stream_id].chunks) == len(sent))

    code, lines, _ = await ctl(env, "active", "chat-1")
    assert code == 0
    assert lines == [
        {"chatId": "chat-1", "streamId": started.stream_id, "state": "live", "offset": 6}
    ]

    # tail follows live: it ends when the stream does (a Stop, from a second ctl).
    tailing = asyncio.create_task(ctl(env, "tail", "--chat", "chat-1", "--from", "4"))
    await eventually(lambda: env.relay.stats().readers == 1)
    code, (receipt,), _ = await ctl(env, "stop", "chat-1")
    assert code == 0
    assert receipt["outcome"] == "stopped" and receipt["streamId"] == started.stream_id
    assert receipt["end"]["state"] == "stopped" and receipt["end"]["finalOffset"] == 6
    assert receipt["end"]["message"]["metadata"]["streamEnd"]["reason"] == "stop"
    code, lines, _ = await tailing
    assert code == 0
    assert [line["offset"] for line in lines[:-1]] == [4, 5]
    assert [dump_json(line["chunk"]) for line in lines[:-1]] == [dump_json(c) for c in sent[4:]]
    assert lines[-1]["streamId"] == started.stream_id
    assert lines[-1]["end"]["state"] == "stopped"

    # A compacted tail of the ended stream: one delta for the text, named by its last offset.
    code, lines, _ = await ctl(env, "tail", "--stream", started.stream_id, "--replay", "compact")
    assert code == 0
    assert [line["offset"] for line in lines[:-1]] == [0, 1, 2, 5]
    assert lines[3]["chunk"] == {"type": "text-delta", "id": "t", "delta": "w0 w1 w2 "}

    code, (listed,), _ = await ctl(env, "messages", "chat-1")
    assert [m["role"] for m in listed["messages"]] == ["user", "assistant"]
    code, (stats,), _ = await ctl(env, "stats")
    assert code == 0 and stats["liveStreams"] == 0 and stats["endedByReason"] == {"stop": 1}


async def test_a_refused_call_or_a_relay_that_is_not_there_exits_1_saying_why(env: Env) -> None:
    code, lines, err = await ctl(env, "tail", "--chat", "nobody")
    assert (code, lines) == (1, [])
    assert err.strip() == "stream-relay-ctl: NOT_FOUND: chat 'nobody' has no active stream"
    code, lines, err = await ctl(env, "active", "bad chat id")
    assert code == 1 and err.startswith("stream-relay-ctl: INVALID_ARGUMENT: chat_id may hold")
    code, _, err = await ctl(None, "--timeout-s", "0.5", "stats", target=f"127.0.0.1:{free_port()}")
    assert code == 1 and err.startswith("stream-relay-ctl: ")
    assert "UNAVAILABLE" in err or "DEADLINE_EXCEEDED" in err


async def test_bad_arguments_exit_2(env: Env) -> None:
    code, _, err = await ctl(env, "tail")
    assert code == 2 and "one of the arguments --chat --stream is required" in err
    code, _, err = await ctl(env, "--tls-cert", "c.pem", "stats")
    assert code == 2 and "--tls-cert and --tls-key go together" in err
