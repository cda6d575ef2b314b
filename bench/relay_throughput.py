"""One stream, one reader: how many chunks per second the relay moves through gRPC.

Starts a relay process (echo producer, no delay), starts one long answer and reads it from this
process, checking every offset. Prints the median of the runs with min and max.

    .venv/bin/python bench/relay_throughput.py --chunks 200000 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from relay.client import RelayClient
from relay.model import ChunkBatch, StreamState, UIMessage

ROOT = Path(__file__).resolve().parent.parent


async def one_run(address: str, chat: str, chunks: int) -> float:
    async with RelayClient(address) as client:
        hello = UIMessage("u1", "user", [{"type": "text", "text": "bench"}])
        began = time.perf_counter()
        started = await client.start(
            chat, [hello], options={"chunks": str(chunks), "delay_ms": "0"}
        )
        received = 0
        async for event in client.attach(stream_id=started.stream_id):
            if isinstance(event, ChunkBatch):
                assert event.first_offset == received, "gap or duplicate"
                received += len(event.chunks)
            else:
                assert event.state is StreamState.COMPLETED and event.final_offset == received
        elapsed = time.perf_counter() - began
    return received / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chunks", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "relay.server",
            "--address",
            "127.0.0.1:0",
            "--db",
            f"{tmp}/bench.sqlite3",
            "--log-format",
            "json",
            cwd=ROOT,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert process.stderr is not None
        while True:
            entry = json.loads(await process.stderr.readline())
            if entry["message"] == "relay listening":
                break
        try:
            await one_run(entry["address"], "warm-up", 10_000)
            rates = [
                await one_run(entry["address"], f"run-{i}", args.chunks) for i in range(args.runs)
            ]
        finally:
            process.terminate()
            await process.wait()
    print(
        f"one stream, one reader, {args.chunks} chunks: median {statistics.median(rates):,.0f}"
        f" chunks/s (min {min(rates):,.0f}, max {max(rates):,.0f}, {args.runs} runs)"
    )


if __name__ == "__main__":
    asyncio.run(main())
