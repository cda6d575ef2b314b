# ruff: noqa: RUF001
"""Scenario 3: paced, `s3_streams` streams at `s3_rate` chunks/s for `s3_seconds`, one reader
each: p50/p99 latency, CPU-s per 1M chunks, the cores the offered load takes.

The load is scenario 2's (bench/s2_fan_out.py `fan`) with a rate: the bench producer's streams
are woken by one pacer in 1 ms steps (as Node's timers wake the peer's producer, and as one epoll
wakes many ready model connections), not by one asyncio timer per chunk. The peer's CPU is
redis-server's + its producer process's.
"""

from __future__ import annotations

from bench.harness import Bench, Results, Row
from bench.s2_fan_out import fan

ROWS = [
    Row("3", "paced: p50 latency", "s3.p50_ms", "ms"),
    Row("3", "paced: p99 latency", "s3.p99_ms", "ms", "≤ 10 ms", (("<=", 10),)),
    Row("3", "paced: CPU-s per 1M chunks", "s3.relay_cpu_s_per_m", "s"),
    Row("3", "paced: CPU for the offered load (cores)", "s3.relay_cores_at_load", "", "≤ 1 core",
        (("<=", 1),)),
    Row("3", "paced: CPU measured (cores)", "s3.relay_cores", ""),
    Row("3", "paced, readers on one AttachMany: p50 latency", "s3.many.p50_ms", "ms"),
    Row("3", "paced, readers on one AttachMany: p99 latency", "s3.many.p99_ms", "ms", "≤ 10 ms",
        (("<=", 10),)),
    Row("3", "paced, readers on one AttachMany: CPU-s per 1M chunks", "s3.many.relay_cpu_s_per_m",
        "s"),
    Row("3", "paced, readers on one AttachMany: CPU for the offered load (cores)",
        "s3.many.relay_cores_at_load", "", "≤ 1 core", (("<=", 1),)),
]  # fmt: skip


async def run(bench: Bench) -> None:
    sizes = bench.sizes
    count = int(sizes.s3_rate * sizes.s3_seconds)
    bench.say(
        f"scenario 3: paced, {sizes.s3_streams} streams at {sizes.s3_rate:g} chunks/s "
        f"for {sizes.s3_seconds:g} s"
    )
    warmup = (min(100, sizes.s3_streams), 40)
    await fan(bench, "s3", sizes.s3_streams, count, sizes.s3_rate, warmup)


def notes(results: Results) -> list[str]:
    load = results.get("s3.relay_cores_at_load", "relay")
    if not load:
        return []
    readers = [r.get("reader_cores", 0.0) for r in results.runs.get("s3.relay", [])]
    return [
        "Scenario 3 CPU for the offered load = CPU-s per chunk × streams × chunks/s per "
        "stream; a measured figure near 1.0 core means the relay's one event loop saturated "
        "and fell behind (the reader process used at most "
        f"{max(readers, default=0):.2f} cores)."
    ]
