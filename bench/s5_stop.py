"""Scenario 5: Stop with `s5_readers` readers on a live stream (50 chunks/s): from the Stop call
to each reader's end, p50/p99, and the Stop call itself (a note). stream-relay only: the peer,
resumable-stream, has no stop.
"""

from __future__ import annotations

from bench.harness import Bench, Results, Row, fmt

ROWS = [
    Row("5", "Stop → every reader's end: p50", "s5.p50", "ms"),
    Row("5", "Stop → every reader's end: p99", "s5.p99", "ms", "≤ 20 ms", (("<=", 20),)),
]  # fmt: skip


async def run(bench: Bench) -> None:
    sizes, results = bench.sizes, bench.results
    bench.say(f"scenario 5: Stop with {sizes.s5_readers} readers on a live stream")
    async with bench.part("s5 stream-relay"):
        relay, address, _ = await bench.relay_host("s5")
        try:
            job = {"kind": "stop", "address": address, "readers": sizes.s5_readers}
            worker = await bench.worker(job | {"rate": 50})
            async with bench.profiled(relay, "s5-relay"):
                runs = await bench.drive(worker, "s5.relay")
        finally:
            await relay.stop()
        results.add("s5.p50", "relay", [r["p50_ms"] for r in runs])
        results.add("s5.p99", "relay", [r["p99_ms"] for r in runs])
        results.add("s5.call", "relay", [r["stop_call_ms"] for r in runs])


def notes(results: Results) -> list[str]:
    call = results.get("s5.call", "relay")
    if not call:
        return []
    return [f"Scenario 5: the Stop call itself returned after {fmt(call, 'ms')} ms (median)."]
