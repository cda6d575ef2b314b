"""examples/client-node, the RelayService from Node.js (@grpc/grpc-js), against a real relay:
Start, a dropped Attach and an exact resume, Stop with its receipt, a refusal's status."""

from __future__ import annotations

import asyncio
import json

from tests.conftest import ROOT, Env, node_with_packages

CLIENT_DIR = ROOT / "examples" / "client-node"


async def test_the_node_client_starts_resumes_and_stops(env: Env) -> None:
    node = node_with_packages(CLIENT_DIR, "the Node client example runs on Node.js")
    process = await asyncio.create_subprocess_exec(
        node,
        "client.mjs",
        "--target",
        env.target,
        "--chat",
        "node-chat",
        cwd=CLIENT_DIR,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    steps = {entry["step"]: entry for entry in map(json.loads, out.decode().splitlines())}
    assert steps["dropped"]["after"] == 5
    ended = steps["ended"]
    assert (ended["state"], ended["finalOffset"]) == ("STREAM_STATE_COMPLETED", 46)
    # The chunks before the drop and after the resume make the answer: none lost, none twice.
    words = ["You", "said:", "hello", "from", "node"]
    assert ended["text"] == " ".join(words[i % len(words)] for i in range(40))
    stopped = steps["stopped"]
    assert stopped["outcome"] == "STOP_OUTCOME_STOPPED"
    assert (stopped["state"], stopped["reason"]) == ("STREAM_STATE_STOPPED", "END_REASON_STOP")
    assert stopped["finalOffset"] >= 4
    assert steps["refused"]["code"] == "INVALID_ARGUMENT"
    assert "chat_id may hold only" in steps["refused"]["details"]
    messages = await env.relay.list_messages("node-chat")
    assert [m.role for m in messages] == ["user", "assistant", "user", "assistant"]
