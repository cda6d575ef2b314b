"""Relay CPU per chunk from a producer in its own process: Generate vs GenerateMany (issue 13).

    .venv/bin/python -m bench.producer_mux [--answers 200] [--rate 50] [--seconds 10]

Runs examples/producer_python.py and a relay (`python -m relay.server`) as processes, with two
profiles on the same producer: `one` (a Generate call per answer, one message per chunk at this
pace) and `many` (`multiplex = true`: one GenerateMany call, one response per tick holding every
answer's ready chunks). For each, it starts `--answers` paced answers (no readers), lets them run
a warm-up, then reads the relay's CPU (utime + stime from /proc) and its buffered chunks
(GetStats) over a window, and prints the relay's CPU per chunk. CPU time, not latency: the machine
may be shared and noisy. Not a test; nothing here asserts a figure.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import tempfile
import time
from pathlib import Path

from bench.common import cpu_seconds
from relay.client import RelayClient
from relay.domain.model import UIMessage

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def wait_ready(client: RelayClient) -> None:
    async with asyncio.timeout(30):
        while True:
            try:
                await client.get_stats(timeout=1)
                return
            except Exception:  # not listening yet
                await asyncio.sleep(0.2)


async def measure(
    client: RelayClient,
    relay_pid: int,
    producer_pid: int,
    profile: str,
    answers: int,
    warmup_s: float,
    window_s: float,
) -> dict[str, float]:
    chats = [f"{profile}-{n}" for n in range(answers)]
    hello = [UIMessage("u1", "user", [{"type": "text", "text": "hello"}])]
    for chat in chats:
        await client.start(chat, hello, producer=profile)
    await asyncio.sleep(warmup_s)
    stats = await client.get_stats()
    cpu, other, began = cpu_seconds(relay_pid), cpu_seconds(producer_pid), time.monotonic()
    chunks = stats.buffered_chunks
    await asyncio.sleep(window_s)
    stats = await client.get_stats()
    cpu = cpu_seconds(relay_pid) - cpu
    other = cpu_seconds(producer_pid) - other
    elapsed = time.monotonic() - began
    chunks = stats.buffered_chunks - chunks
    live = stats.live_streams
    for chat in chats:
        await client.stop(chat)
    async with asyncio.timeout(60):
        # A poll, on purpose: the relay has no event for its live streams reaching zero.
        while (await client.get_stats()).live_streams:  # noqa: ASYNC110
            await asyncio.sleep(0.2)
    return {
        "live": live,
        "chunks_per_s": chunks / elapsed,
        "relay_cores": cpu / elapsed,
        "relay_us_per_chunk": cpu / chunks * 1e6 if chunks else float("nan"),
        "producer_cores": other / elapsed,
    }


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", type=int, default=200)
    parser.add_argument("--rate", type=float, default=50.0, help="chunks/s per answer")
    parser.add_argument("--seconds", type=float, default=10.0, help="the measured window")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--tick-ms", type=float, default=10.0, help="the producer's tick")
    parser.add_argument("--modes", default="one,many", help="profiles to run, in order")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        producer_port, relay_port = free_port(), free_port()
        delay_ms = 1000 / args.rate
        chunks = int(args.rate * (args.warmup + args.seconds + 30))
        profiles = Path(tmp) / "producers.toml"
        profiles.write_text(
            "".join(
                f'[producers.{name}]\nkind = "grpc"\ntarget = "127.0.0.1:{producer_port}"\n'
                f"multiplex = {'true' if name == 'many' else 'false'}\n"
                f'options = {{ delay_ms = "{delay_ms:g}", chunks = "{chunks}" }}\n'
                for name in ("one", "many")
            )
        )
        producer = await asyncio.create_subprocess_exec(
            sys.executable,
            str(ROOT / "examples" / "producer_python.py"),
            "--port",
            str(producer_port),
            "--tick-ms",
            str(args.tick_ms),
            stdout=asyncio.subprocess.DEVNULL,
        )
        relay = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "relay.server",
            "--address",
            f"127.0.0.1:{relay_port}",
            "--db",
            str(Path(tmp) / "relay.sqlite3"),
            "--producers",
            str(profiles),
            "--log-level",
            "warning",
            cwd=ROOT,
        )
        client = RelayClient(f"127.0.0.1:{relay_port}")
        try:
            await wait_ready(client)
            print(
                f"{args.answers} answers x {args.rate:g} chunks/s, producer tick "
                f"{args.tick_ms:g} ms, window {args.seconds:g} s (relay pid {relay.pid})"
            )
            for mode in args.modes.split(","):
                result = await measure(
                    client,
                    relay.pid,
                    producer.pid,
                    mode,
                    args.answers,
                    args.warmup,
                    args.seconds,
                )
                call = "GenerateMany" if mode == "many" else "Generate    "
                print(
                    f"{call}: {result['relay_us_per_chunk']:6.1f} us relay CPU per chunk, "
                    f"{result['chunks_per_s']:8.0f} chunks/s, relay {result['relay_cores']:.2f} "
                    f"cores, producer {result['producer_cores']:.2f} cores, "
                    f"{result['live']:.0f} live",
                    flush=True,
                )
        finally:
            await client.close()
            for process in (relay, producer):
                process.terminate()
            for process in (relay, producer):
                await process.wait()


if __name__ == "__main__":
    asyncio.run(main())
