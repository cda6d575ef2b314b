# ruff: noqa: RUF001
"""Scenario R: resuming a long answer through the gateway with the real AI SDK client, compacted
against plain (issue 12: >= 10x fewer events, >= 5x faster to the full message).

    python -m bench --only r [--quick] [--runs N]             # its rows in the bench's table
    python -m bench.compact_resume [--quick] [--runs N] [--count N]   # alone, its own table

The relay and the gateway run in one process (`bench.relay_host --gateway`, the gateway with its
defaults) with the bench producer: one text part of `count` deltas ("<seq>:<us>", 7-17
characters each), kept live after its last chunk (`hold_s`), so the answer is whole and still
resumable. Once the gateway has streamed every chunk to the chat POST, a Node process
(bench/aisdk/resume.mjs, the AI SDK 5 `AbstractChat` + `DefaultChatTransport`) resumes it as a
reloaded page does, `?replay=plain` (every delta, one SSE event each) and `?replay=compact` (the
gateway's default: the text part's deltas merged, in 64 KiB pieces) in turn, after one warm-up
resume of each. Per resume it reports the SSE events and body bytes the client received and the
milliseconds from `resumeStream()` until the client's message holds the whole text. Figures are
medians over the runs, with the ratio plain / compact measured in the same run. `python -m bench`
runs it last (it needs Node: `--skip-peer` leaves it out).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import sse
from bench.common import ROOT
from bench.harness import Bench, BenchFailure, Proc, Row, free_port, npm_installed, wait_http

AISDK_DIR = ROOT / "bench" / "aisdk"
TARGET_EVENTS = 10.0  # plain events / compacted events, at least
TARGET_SPEED = 5.0  # plain time / compacted time, at least
COUNT, QUICK_COUNT = 20_000, 5_000  # text deltas in the answer

ROWS = [
    Row("R", "resume a whole answer, AI SDK client, plain: SSE events", "r.plain.events", "n"),
    Row("R", "resume a whole answer, AI SDK client, compacted: SSE events", "r.compact.events",
        "n"),
    Row("R", "resume a whole answer, AI SDK client, plain: bytes", "r.plain.bytes", "n"),
    Row("R", "resume a whole answer, AI SDK client, compacted: bytes", "r.compact.bytes", "n"),
    Row("R", "resume a whole answer, AI SDK client, plain: to the whole message", "r.plain.ms",
        "ms"),
    Row("R", "resume a whole answer, AI SDK client, compacted: to the whole message",
        "r.compact.ms", "ms"),
    Row("R", "compacted: fewer SSE events than plain", "r.fewer_events", "×",
        f"≥ {TARGET_EVENTS:g}×", ((">=", TARGET_EVENTS),)),
    Row("R", "compacted: fewer bytes than plain", "r.fewer_bytes", "×"),
    Row("R", "compacted: faster to the whole message than plain", "r.faster", "×",
        f"≥ {TARGET_SPEED:g}×", ((">=", TARGET_SPEED),)),
]  # fmt: skip


def say(text: str) -> None:
    print(text, flush=True)


async def install_client(say: Callable[[str], None] = say) -> str:
    """node, with bench/aisdk's packages installed (once)."""
    node = shutil.which("node")
    if node is None:
        raise BenchFailure("node is not on PATH: the AI SDK client runs on Node.js")
    await npm_installed(AISDK_DIR, "the AI SDK client (ai 5)", say)
    return node


async def produce(http: str, chat_id: str, count: int) -> int:
    """Starts the answer through the chat POST and reads it until its last chunk; returns the
    length of its text."""
    connection = await sse.Connection.open(http)
    try:
        body = {
            "id": chat_id,
            "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "go"}]}],
            "producer": "bench",
            "options": {"count": str(count), "hold_s": "600"},
        }
        status, headers = await connection.request("POST", "/api/chat", body)
        if status != 200:
            raise BenchFailure(f"the chat POST answered {status}")
        text = 0
        async for batch in sse.events(connection.body(headers)):
            for offset, data in batch:
                chunk = json.loads(data)
                if chunk.get("type") == "text-delta":
                    text += len(chunk["delta"])
                if offset == count:  # offset 0 is the text-start: count deltas follow
                    return text
        raise BenchFailure("the chat POST ended before the answer's last chunk")
    finally:
        await connection.close()


async def stop(http: str, chat_id: str) -> None:
    connection = await sse.Connection.open(http)
    try:
        status, _ = await connection.request("POST", f"/api/chat/{chat_id}/stop", {})
        if status != 200:
            raise BenchFailure(f"the stop answered {status}")
    finally:
        await connection.close()


def median(runs: list[dict[str, Any]], mode: str, key: str) -> float:
    return statistics.median(float(r[key]) for r in runs if r["mode"] == mode)


def report(runs: list[dict[str, Any]], count: int) -> tuple[list[str], bool]:
    rows = [
        f"Scenario R: resume a whole {count:,}-chunk answer through the gateway, AI SDK 5 client "
        f"(medians of {len([r for r in runs if r['mode'] == 'plain'])} runs)",
        "",
        "| replay | SSE events | bytes | ms to the whole message |",
        "|---|---|---|---|",
    ]
    for mode in ("plain", "compact"):
        rows.append(
            f"| {mode} | {median(runs, mode, 'events'):,.0f} | {median(runs, mode, 'bytes'):,.0f} "
            f"| {median(runs, mode, 'ms'):,.1f} |"
        )
    fewer = median(runs, "plain", "events") / median(runs, "compact", "events")
    smaller = median(runs, "plain", "bytes") / median(runs, "compact", "bytes")
    faster = median(runs, "plain", "ms") / median(runs, "compact", "ms")
    met = fewer >= TARGET_EVENTS and faster >= TARGET_SPEED
    rows += [
        "",
        f"compacted: {fewer:,.0f}x fewer events (target >= {TARGET_EVENTS:g}x), {smaller:.1f}x "
        f"fewer bytes, {faster:.1f}x faster to the whole message (target >= {TARGET_SPEED:g}x): "
        + ("met" if met else "MISSED"),
    ]
    return rows, met


async def measure(
    workdir: Path,
    env: dict[str, str],
    logs: Path,
    count: int,
    runs_wanted: int,
    say: Callable[[str], None] = say,
) -> list[dict[str, Any]]:
    """Produces the answer, then resumes it `runs_wanted` times per mode after a warm-up of each;
    returns every resume (the warm-ups with a negative run)."""
    node = await install_client(say)
    http = f"127.0.0.1:{free_port()}"
    argv = [sys.executable, "-m", "bench.relay_host", "--address", "127.0.0.1:0"]
    argv += ["--db", str(workdir / "r.sqlite3"), "--gateway", http, "--log-level", "warning"]
    host = await Proc.start("relay-host-r", argv, env, logs)
    try:
        await host.event("listening")
        await wait_http(host, http)
        chat_id = "bench-r"
        chars = await produce(http, chat_id, count)
        say(f"answer ready: {count:,} chunks, {chars:,} characters of text")
        client = await asyncio.create_subprocess_exec(
            node,
            str(AISDK_DIR / "resume.mjs"),
            f"http://{http}",
            chat_id,
            str(chars),
            str(runs_wanted),
            cwd=AISDK_DIR,
            stdout=asyncio.subprocess.PIPE,
        )
        assert client.stdout is not None
        runs: list[dict[str, Any]] = []
        async for line in client.stdout:
            run = json.loads(line)
            say(f"  {run['mode']:>7} run {run['run']}: {json.dumps(run)}")
            if run["chars"] < chars:
                raise BenchFailure(f"the client holds {run['chars']} of {chars} characters")
            runs.append(run)
        if await client.wait() != 0:
            raise BenchFailure("the AI SDK client failed (its stderr is above)")
        await stop(http, chat_id)
    finally:
        await host.stop()
    return runs


async def amain(args: argparse.Namespace) -> int:
    count = args.count or (QUICK_COUNT if args.quick else COUNT)
    runs_wanted = args.runs or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory(prefix="stream-relay-bench-r-") as tmp:
        workdir = Path(tmp)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        runs = await measure(workdir, env, workdir, count, runs_wanted)
    rows, _ = report([r for r in runs if r["run"] >= 0], count)
    print()
    print("\n".join(rows))
    return 0  # a missed target is a figure to report, not a failure of the run


# --- scenario R of python -m bench ----------------------------------------------------------


async def run(bench: Bench) -> None:
    results = bench.results
    count = QUICK_COUNT if bench.args.quick else COUNT
    if bench.args.skip_peer:
        results.notes.append("Scenario R was skipped (--skip-peer: its client runs on Node).")
        return
    bench.say(f"scenario R: resume a whole {count:,}-chunk answer, AI SDK client, plain/compacted")
    async with bench.part("r compacted resume"):
        runs = await measure(
            bench.workdir, bench.env, bench.logs, count, bench.sizes.runs, bench.say
        )
        for event in runs:
            results.runs[f"r.{event['mode']}"].append(event)
        measured = {
            mode: sorted((r for r in runs if r["mode"] == mode and r["run"] >= 0), key=_run)
            for mode in ("plain", "compact")
        }
        for mode, mode_runs in measured.items():
            for key in ("events", "bytes", "ms"):
                results.add(f"r.{mode}.{key}", "relay", [r[key] for r in mode_runs])
        pairs = list(zip(measured["plain"], measured["compact"], strict=True))
        for metric, key in (("fewer_events", "events"), ("fewer_bytes", "bytes"), ("faster", "ms")):
            results.add(f"r.{metric}", "relay", [p[key] / c[key] for p, c in pairs])
        results.notes.append(
            f"Scenario R (bench/compact_resume.py): a whole {count:,}-chunk answer (text deltas of "
            "7-17 characters), kept live after its last chunk, resumed through the gateway "
            "(bench.relay_host --gateway, one process, default flags) by the AI SDK 5 chat client "
            "(bench/aisdk/resume.mjs) as a reloaded page does, ?replay=plain and ?replay=compact "
            "in turn after a warm-up of each; the factors are plain ÷ compacted of the same run."
        )


def _run(event: dict[str, Any]) -> int:
    return int(event["run"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.compact_resume", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="5,000 chunks, 1 run")
    parser.add_argument("--runs", type=int, help="measured resumes per mode (default 3)")
    parser.add_argument("--count", type=int, help="text deltas in the answer (default 20,000)")
    return parser.parse_args(argv)


def main() -> None:
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(amain(parse_args())))


if __name__ == "__main__":
    main()
