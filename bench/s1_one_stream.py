# ruff: noqa: RUF001
"""Scenario 1: one stream, one reader following it live, chunks/s.

- gRPC: `python -m relay.server` (the relay's own entry point) with its built-in echo producer,
  which runs inside the relay process; a bench.worker reader (`relay_echo`) in its own process.
- gRPC, producer in its own process: examples/producer_python.py behind a producers.toml profile
  of kind "grpc" (each gRPC response carries every chunk it has ready, up to 500).
- gateway SSE: `python -m gateway.server --embedded-relay` (gateway and relay in one process), the
  echo producer, a reader of the chat POST's SSE (`sse_echo`).
- the ceiling: bench/ceiling.py, 1 and 100 pre-built chunks per message.
- the peer: one resumable-stream stream, one resumed reader (Bench.peer_runs).
"""

from __future__ import annotations

import sys

from bench.common import ROOT
from bench.harness import Bench, Proc, Results, Row, free_port, wait_http

ROWS = [
    Row("1", "one stream, gRPC: chunks/s", "s1.grpc", "/s",
        "≥ 250,000; ≥ 19× peer; ≥ 1/3 ceiling",
        ((">=", 250_000), (">=", "peer", 19), (">=", "ceiling", 1 / 3)),
        "s1.ceiling.100"),
    Row("1", "(ceiling at 1 chunk per message)", "s1.ceiling.1", "/s", ceiling="s1.ceiling.1"),
    Row("1", "one stream, gRPC, producer in its own process: chunks/s", "s1.grpc_producer", "/s"),
    Row("1", "one stream, gateway SSE: chunks/s", "s1.sse", "/s", "≥ 100,000", ((">=", 100_000),)),
]  # fmt: skip


async def run(bench: Bench) -> None:
    sizes, results = bench.sizes, bench.results
    bench.say("scenario 1: one stream, one reader following live")
    async with bench.part("s1 gRPC"):
        # The relay's own entry point; the echo producer lives inside it.
        argv = [sys.executable, "-m", "relay.server", "--address", "127.0.0.1:0"]
        argv += ["--db", str(bench.workdir / "s1.sqlite3"), "--log-format", "json"]
        argv += bench.args.relay_args.split()
        relay = await Proc.start("relay-s1", argv, bench.env, bench.logs)
        try:
            listening = await relay.wait_stderr(lambda e: e.get("message") == "relay listening")
            job = {"kind": "relay_echo", "address": listening["address"]}
            job |= {"chunks": sizes.s1_chunks, "warmup_chunks": sizes.s1_warmup}
            worker = await bench.worker(job)
            on_ready, on_done = bench.cpu_hooks(relay, worker)
            async with bench.profiled(relay, "s1-grpc-relay"):
                runs = await bench.drive(worker, "s1.grpc.relay", on_ready, on_done)
        finally:
            await relay.stop()
        results.add("s1.grpc", "relay", [r["rate"] for r in runs])
        results.add("s1.grpc.cpu", "relay", [r["relay_cpu_s_per_m"] for r in runs])
        results.add("s1.grpc.bytes", "relay", [r["chunk_bytes"] for r in runs])

    if (ROOT / "examples" / "producer_python.py").exists():
        async with bench.part("s1 gRPC, producer in its own process"):
            await producer_process(bench)

    async with bench.part("s1 gateway"):
        # `python -m gateway.server --embedded-relay`: gateway and relay in one process.
        http = f"127.0.0.1:{free_port()}"
        argv = [sys.executable, "-m", "gateway.server", "--embedded-relay"]
        argv += ["--relay", "127.0.0.1:0", "--address", http]
        env = {**bench.env, "RELAY_DB": str(bench.workdir / "s1-gateway.sqlite3")}
        gateway = await Proc.start("gateway-s1", argv, env, bench.logs)
        try:
            await wait_http(gateway, http)
            job = {"kind": "sse_echo", "http": http}
            job |= {"chunks": sizes.s1_chunks, "warmup_chunks": sizes.s1_warmup}
            worker = await bench.worker(job)
            on_ready, on_done = bench.cpu_hooks(gateway, worker)
            async with bench.profiled(gateway, "s1-sse-gateway"):
                runs = await bench.drive(worker, "s1.sse.relay", on_ready, on_done)
        finally:
            await gateway.stop()
        results.add("s1.sse", "relay", [r["rate"] for r in runs])
        results.add("s1.sse.cpu", "relay", [r["relay_cpu_s_per_m"] for r in runs])

    async with bench.part("s1 ceiling"):
        argv = [sys.executable, "-m", "bench.ceiling", "--prebuild", str(sizes.s1_chunks)]
        ceiling = await Proc.start("ceiling", argv, bench.env, bench.logs)
        try:
            address = (await ceiling.event("listening", timeout=60))["address"]
            for batch in (1, 100):
                job = {"kind": "ceiling", "address": address, "batch": batch}
                job |= {"chunks": sizes.s1_chunks, "warmup_chunks": sizes.s1_warmup}
                runs = await bench.drive(await bench.worker(job), f"s1.ceiling.{batch}")
                results.add(f"s1.ceiling.{batch}", "ceiling", [r["rate"] for r in runs])
        finally:
            await ceiling.stop()

    if bench.peer_producer is not None:
        async with bench.part("s1 peer"):
            warmup = (1, min(sizes.s1_warmup, sizes.s1_peer_chunks))
            runs = await bench.peer_runs("s1.peer", 1, sizes.s1_peer_chunks, 0, warmup)
            results.add("s1.grpc", "peer", [r["rate"] for r in runs])


async def producer_process(bench: Bench) -> None:
    """Scenario 1 with the producer in its own process: examples/producer_python.py behind a
    producers.toml profile of kind "grpc" (each response carries the chunks it has ready)."""
    script = str(ROOT / "examples" / "producer_python.py")
    argv = [sys.executable, script, "--port", "0", "--delay-ms", "0"]
    producer = await Proc.start("producer-python", argv, bench.env, bench.logs)
    relay: Proc | None = None
    try:
        while not (line := (await producer.event("text", timeout=60))["line"]).startswith(
            "listening on"
        ):
            pass
        profiles = bench.workdir / "producers.toml"
        target = line.split()[-1]
        profiles.write_text(
            f'[producers.python]\nkind = "grpc"\ntarget = "{target}"\n'
            # A grpc profile lets clients set nothing unless it says so.
            "[producers.python.client_options]\n"
            "chunks = { min = 1, max = 1000000, integer = true }\n"
            "delay_ms = { min = 0, max = 60000 }\n"
        )
        argv = [sys.executable, "-m", "relay.server", "--address", "127.0.0.1:0"]
        argv += [
            "--db",
            str(bench.workdir / "s1-producer.sqlite3"),
            "--producers",
            str(profiles),
        ]
        relay = await Proc.start("relay-s1-producer", argv, bench.env, bench.logs)
        listening = await relay.wait_stderr(lambda e: e.get("message") == "relay listening")
        job = {"kind": "relay_echo", "address": listening["address"], "producer": "python"}
        job |= {"chunks": bench.sizes.s1_producer_chunks, "warmup_chunks": bench.sizes.s1_warmup}
        job |= {"words": ["Python", "producer", "says:"]}
        worker = await bench.worker(job)
        on_ready, on_done = bench.cpu_hooks(relay, worker)
        runs = await bench.drive(worker, "s1.producer.relay", on_ready, on_done)
    finally:
        if relay is not None:
            await relay.stop()
        await producer.stop()
    bench.results.add("s1.grpc_producer", "relay", [r["rate"] for r in runs])


def notes(results: Results) -> list[str]:
    out = []
    for metric, label in (("s1.grpc.cpu", "gRPC"), ("s1.sse.cpu", "gateway")):
        figure = results.get(metric, "relay")
        if figure:
            out.append(
                f"Scenario 1 {label}: relay process CPU {figure.median:.2f} s per 1M chunks."
            )
    return out
