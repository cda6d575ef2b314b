"""Scenario 4: a new reader on an open `s4_count`-chunk stream: its first chunk, all chunks.

One bench/relay_host.py relay with its gateway; a bench.worker reader resumes the stream through
gRPC (`resume`), then through the gateway (`resume_sse`, `?replay=plain`: every chunk an event,
each checked). `--resume-settle-s` lets the relay journal the chunks before the resume (by default
the resume races that write, the worst case). The peer: resumeExistingStream of a held stream.
"""

from __future__ import annotations

import asyncio

from bench.harness import Bench, Event, Row, brief

ROWS = [
    Row("4", "resume, gRPC: first chunk", "s4.grpc.first", "ms", "≤ 5 ms", (("<=", 5),)),
    Row("4", "resume, gRPC: all chunks", "s4.grpc.all", "ms", "≤ 15 ms", (("<=", 15),)),
    Row("4", "resume, gateway: first chunk", "s4.sse.first", "ms", "≤ 10 ms", (("<=", 10),)),
    Row("4", "resume, gateway: all chunks", "s4.sse.all", "ms", "≤ 50 ms", (("<=", 50),)),
]  # fmt: skip


async def run(bench: Bench) -> None:
    sizes, results = bench.sizes, bench.results
    bench.say(f"scenario 4: resume an open {sizes.s4_count}-chunk stream")
    async with bench.part("s4 stream-relay"):
        relay, address, http = await bench.relay_host("s4", gateway=True)
        try:
            for kind, label in (("resume", "s4.grpc"), ("resume_sse", "s4.sse")):
                async with bench.part(label):
                    job = {"kind": kind, "address": address, "http": http}
                    job |= {"count": sizes.s4_count, "settle_s": bench.args.resume_settle_s}
                    worker = await bench.worker(job)
                    async with bench.profiled(relay, f"{label}-relay"):
                        runs = await bench.drive(worker, f"{label}.relay")
                    results.add(f"{label}.first", "relay", [r["first_ms"] for r in runs])
                    results.add(f"{label}.all", "relay", [r["all_ms"] for r in runs])
        finally:
            await relay.stop()
    if bench.peer_producer is not None:
        async with bench.part("s4 peer"):
            runs = await peer_resume(bench, sizes.s4_count)
            results.add("s4.grpc.first", "peer", [r["first_ms"] for r in runs])
            results.add("s4.grpc.all", "peer", [r["all_ms"] for r in runs])


async def peer_resume(bench: Bench, count: int) -> list[Event]:
    producer, reader = bench.peer_producer, bench.peer_reader
    assert producer is not None and reader is not None
    runs = []
    for run in [-1, *range(bench.sizes.runs)]:
        stream = bench.unique("s4")
        producer.send(cmd="create", ids=[stream], count=count, hold=True)
        await producer.event("created")
        producer.send(cmd="go")
        await producer.event("produced")
        await asyncio.sleep(0.1)  # the library's own loop appends the last chunk
        reader.send(cmd="resume_timed", id=stream, count=count)
        event = await reader.event("done")
        producer.send(cmd="close", ids=[stream])
        await producer.event("finished_streams")
        event["run"] = run
        bench.results.runs["s4.peer"].append(event)
        bench.say(f"  s4.peer run {run}: {brief(event)}")
        if run >= 0:
            runs.append(event)
    return runs
