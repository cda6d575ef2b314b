# ruff: noqa: RUF001
"""Scenario 2: fan-out, `s2_streams` streams x `s2_count` chunks, one reader each, released
together: aggregate chunks/s, p50/p99 latency.

Its load, `fan`, is scenario 3's too (there paced): the streams come from bench/relay_host.py's
bench producer, gated until every reader is attached (SIGUSR1 releases them); stream-relay runs
twice, each reader its own Attach call (all on one channel, bench.worker `fanout`), then each
reader a subscription of one AttachMany call (`{scenario}.many`); then the peer, one resumed
reader per stream.
"""

from __future__ import annotations

import signal

from bench.harness import Bench, Row

ROWS = [
    Row("2", "fan-out: aggregate chunks/s", "s2.rate", "/s", "≥ 2× peer", ((">=", "peer", 2),)),
    Row("2", "fan-out: p50 latency", "s2.p50_ms", "ms"),
    Row("2", "fan-out: p99 latency", "s2.p99_ms", "ms", "≤ peer", (("<=", "peer", 1),)),
    Row("2", "fan-out, readers on one AttachMany: aggregate chunks/s", "s2.many.rate", "/s",
        "≥ 2× peer", ((">=", "peer", 2),)),
    Row("2", "fan-out, readers on one AttachMany: p99 latency", "s2.many.p99_ms", "ms", "≤ peer",
        (("<=", "peer", 1),)),
    Row("2", "fan-out at equal load (80 % of the peer's rate above, paced): p50 latency",
        "s2.eq.p50_ms", "ms"),
    Row("2", "fan-out at equal load: p99 latency", "s2.eq.p99_ms", "ms", "≤ peer",
        (("<=", "peer", 1),)),
    Row("2", "fan-out at equal load, readers on one AttachMany: p99 latency", "s2.eq.many.p99_ms",
        "ms", "≤ peer", (("<=", "peer", 1),)),
]  # fmt: skip

EQUAL_LOAD = 0.8  # of the peer's saturation rate, offered to both


async def run(bench: Bench) -> None:
    sizes = bench.sizes
    bench.say(f"scenario 2: fan-out, {sizes.s2_streams} streams x {sizes.s2_count} chunks")
    await fan(bench, "s2", sizes.s2_streams, sizes.s2_count, 0, (20, 500))
    # The same streams paced, at one offered load for both: latency that measures the systems,
    # not the backlog of producers outrunning their readers.
    peer = bench.results.get("s2.rate", "peer")
    if peer is None:
        bench.results.notes.append("Scenario 2 at equal load needs the peer's rate: not run.")
        return
    rate = EQUAL_LOAD * peer.median / sizes.s2_streams
    bench.say(
        f"scenario 2 at equal load: {sizes.s2_streams} streams at {rate:,.0f} chunks/s each "
        f"({EQUAL_LOAD:.0%} of the peer's {peer.median:,.0f} chunks/s)"
    )
    bench.results.notes.append(
        f"Scenario 2 at equal load: {sizes.s2_streams} streams x {sizes.s2_count} chunks paced "
        f"at {rate:,.0f} chunks/s each, {EQUAL_LOAD * peer.median:,.0f} chunks/s in all "
        f"({EQUAL_LOAD:.0%} of the peer's median fan-out rate in this run), for both systems."
    )
    await fan(bench, "s2.eq", sizes.s2_streams, sizes.s2_count, rate, (20, 100))


async def fan(
    bench: Bench, scenario: str, streams: int, count: int, rate: float, warmup: tuple[int, int]
) -> None:
    """Scenarios 2 and 3: `streams` streams of `count` chunks at `rate` (0: unpaced), one
    reader each, every reader attached before the first chunk: each reader its own Attach
    call, then (`{scenario}.many`) each a subscription of one AttachMany call."""
    await fan_relay(bench, scenario, streams, count, rate, warmup, many=False)
    await fan_relay(bench, f"{scenario}.many", streams, count, rate, warmup, many=True)
    await fan_peer(bench, scenario, streams, count, rate, warmup)


async def fan_relay(
    bench: Bench,
    scenario: str,
    streams: int,
    count: int,
    rate: float,
    warmup: tuple[int, int],
    *,
    many: bool,
) -> None:
    results = bench.results
    async with bench.part(f"{scenario} stream-relay"):
        relay, address, _ = await bench.relay_host(scenario)
        try:
            job = {"kind": "fanout", "address": address, "streams": streams, "count": count}
            job |= {"rate": rate, "warmup_streams": warmup[0], "warmup_count": warmup[1]}
            job |= {"many": many}
            worker = await bench.worker(job)
            on_ready, on_done = bench.cpu_hooks(relay, worker, lambda: relay.signal(signal.SIGUSR1))
            async with bench.profiled(relay, f"{scenario}-relay"):
                runs = await bench.drive(worker, f"{scenario}.relay", on_ready, on_done)
        finally:
            await relay.stop()
        for run in runs if rate else []:
            # CPU per second of the offered load: what keeping up takes, even when the relay
            # saturates its one event loop and falls behind (then its measured cores stay ~1).
            run["relay_cores_at_load"] = run["relay_cpu_s_per_m"] * streams * rate / 1e6
        for key in ("rate", "p50_ms", "p99_ms", "relay_cpu_s_per_m", "relay_cores"):
            results.add(f"{scenario}.{key}", "relay", [r[key] for r in runs])
        results.add(f"{scenario}.chunk_bytes", "relay", [r["chunk_bytes"] for r in runs])
        if rate:
            results.add(
                f"{scenario}.relay_cores_at_load",
                "relay",
                [r["relay_cores_at_load"] for r in runs],
            )


async def fan_peer(
    bench: Bench, scenario: str, streams: int, count: int, rate: float, warmup: tuple[int, int]
) -> None:
    results = bench.results
    if bench.peer_producer is not None:
        async with bench.part(f"{scenario} peer"):
            runs = await bench.peer_runs(f"{scenario}.peer", streams, count, rate, warmup)
            for run in runs:
                if "peer_cpu_s_per_m" in run:
                    run["peer_cores_at_load"] = run["peer_cpu_s_per_m"] * streams * rate / 1e6
            keys = ("rate", "p50_ms", "p99_ms", "peer_cpu_s_per_m", "peer_cores")
            for key in (*keys, "peer_cores_at_load") if rate else keys:
                if runs and all(key in r for r in runs):
                    name = key.replace("peer_", "relay_")
                    # the same reference for both ways of reading stream-relay
                    for metric in (f"{scenario}.{name}", f"{scenario}.many.{name}"):
                        results.add(metric, "peer", [r[key] for r in runs])
