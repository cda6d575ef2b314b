"""Scenario 6: memory, RSS deltas of the relay process (bench/relay_host.py, a fresh relay each):

- per retained finished 1,000-chunk stream (`s6_retained` streams, bench.worker `retain`);
- per idle attached reader (`s6_readers` readers on `s6_reader_streams` streams, `idle_readers`);
- a frozen reader: one reader attached to a gated stream is SIGSTOPped while the producer writes
  `s6_frozen` chunks; the relay's peak RSS against the same run with a live reader.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

from bench.common import rss_bytes
from bench.harness import Bench, BenchFailure, Event, Results, Row

ROWS = [
    Row("6", "RSS per retained 1,000-chunk stream", "s6.retained_kb", "KB", "≤ 150 KB",
        (("<=", 150),)),
    Row("6", "RSS per idle attached reader", "s6.reader_kb", "KB", "≤ 30 KB", (("<=", 30),)),
    Row("6", "RSS, frozen reader vs live reader", "s6.frozen_pct", "%", "within ±10 %",
        (("abs<=", 10),)),
]  # fmt: skip


async def run(bench: Bench) -> None:
    sizes, results = bench.sizes, bench.results
    bench.say("scenario 6: memory")
    async with bench.part("s6 retained streams"):
        job = {"kind": "retain", "streams": sizes.s6_retained, "count": 1000}
        rss = await rss_phases(bench, "s6.retain", job | {"warmup_streams": 20})
        per_stream = (rss["after"] - rss["before"]) / sizes.s6_retained
        results.add("s6.retained_kb", "relay", [per_stream / 1000])
        bench.say(f"  retained: {rss} -> {per_stream / 1000:.1f} KB per stream")

    async with bench.part("s6 idle readers"):
        job = {"kind": "idle_readers", "streams": sizes.s6_reader_streams}
        job |= {"readers": sizes.s6_readers, "warmup_readers": 20}
        rss = await rss_phases(bench, "s6.idle", job)
        per_reader = (rss["after"] - rss["before"]) / sizes.s6_readers
        results.add("s6.reader_kb", "relay", [per_reader / 1000])
        bench.say(f"  idle readers: {rss} -> {per_reader / 1000:.1f} KB per reader")

    async with bench.part("s6 frozen reader"):
        live = await frozen_run(bench, False)
        stopped = await frozen_run(bench, True)
        change = (stopped["peak"] - live["peak"]) / live["peak"] * 100
        results.add("s6.frozen_pct", "relay", [change])
        growth = (stopped["peak"] - stopped["before"]) / 1e6
        results.add("s6.frozen_growth_mb", "relay", [growth])
        results.add("s6.live_growth_mb", "relay", [(live["peak"] - live["before"]) / 1e6])


async def rss_phases(bench: Bench, label: str, job: dict[str, Any]) -> dict[str, int]:
    """Runs a worker job on a fresh relay; notes the relay's RSS at each "ready" phase."""
    relay, address, _ = await bench.relay_host(label)
    rss: dict[str, int] = {}

    async def note(event: Event) -> None:
        await asyncio.sleep(0.2)
        rss[event["phase"]] = rss_bytes(relay.pid)

    try:
        await bench.drive(await bench.worker(job | {"address": address}), label, note)
    finally:
        await relay.stop()
    return rss


async def frozen_run(bench: Bench, frozen: bool) -> dict[str, int]:
    """One reader attached to a gated stream, SIGSTOPped (or not: the control) while the
    producer writes; the relay's RSS before, at its peak while writing, and after."""
    from relay.client import RelayClient

    label = "frozen" if frozen else "live"
    relay, address, _ = await bench.relay_host(f"s6c-{label}")
    marks: dict[str, int] = {}
    try:
        worker = await bench.worker(
            {"kind": "frozen", "address": address, "count": bench.sizes.s6_frozen}
        )

        async def produce(event: Event) -> None:
            await asyncio.sleep(0.2)
            marks["before"] = rss_bytes(relay.pid)
            if frozen:
                worker.signal(signal.SIGSTOP)
            relay.signal(signal.SIGUSR1)
            peak = 0
            try:
                async with RelayClient(address) as client:
                    deadline = time.monotonic() + 300
                    while await client.get_active(event["chat"]) is not None:
                        peak = max(peak, rss_bytes(relay.pid))
                        if time.monotonic() > deadline:
                            raise BenchFailure("the frozen-reader stream did not end in 300 s")
                        await asyncio.sleep(0.02)
                await asyncio.sleep(0.2)
                marks["after"] = rss_bytes(relay.pid)
                marks["peak"] = max(peak, marks["after"])
            finally:
                if frozen:
                    worker.signal(signal.SIGCONT)

        await bench.drive(worker, f"s6.frozen.{label}", produce)
    finally:
        await relay.stop()
    bench.say(f"  {label} reader: {marks}")
    return marks


def notes(results: Results) -> list[str]:
    out = [
        "Scenario 6: RSS deltas of the relay process; the frozen-reader row compares the relay's "
        "peak RSS while its producer writes with one reader SIGSTOPped against the same run with "
        "a live reader (each on a fresh relay).",
    ]
    live = results.get("s6.live_growth_mb", "relay")
    frozen = results.get("s6.frozen_growth_mb", "relay")
    if live and frozen:
        out.append(
            f"Scenario 6 growth while writing: live reader +{live.median:.1f} MB, frozen reader "
            f"+{frozen.median:.1f} MB (the replay buffer itself is part of both)."
        )
    return out
