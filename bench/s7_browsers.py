# ruff: noqa: RUF001
"""Scenario B: browsers at real token rates. How many concurrent SSE browsers, each answer at
`b_rate` chunks/s (50, a fast model), one system serves within p99 50 ms and 1 core, and what a
chunk costs where it is paid.

Processes, each its own:
- the simulated model (bench/peer/model.mjs, Node): a ProducerService making every answer's
  chunks, stamped; neither system pays for it;
- stream-relay: `python -m relay.server` (a `grpc` producer profile naming the model, with
  `multiplex = true`: every answer on one GenerateMany call, chunks of many answers in one
  message; the cost step runs once more with one Generate call per answer, at 200 answers) and
  `python -m gateway.server --relay ...`, as deployed;
- the peer as its users run it (bench/peer/server.mjs): a Node HTTP server whose chat route calls
  the same model and answers through resumable-stream on Redis;
- the browsers (bench/peer/browsers.mjs, Node, the same code for both systems): each reader an
  HTTP connection reading SSE, every delta checked for order and completeness.

A step opens N browsers: N answers with one reader each (the POSTing page), or N/10 answers with
ten (the POSTing page and nine that resume, `?replay=exact` on the gateway), spread over a ramp;
after a settle second, a window of `b_window_s` measures the latency of every delta received
(model stamp to browser), the CPU of the system (relay + gateway; the peer's server +
redis-server) and the deltas delivered. A step passes when p99 <= 50 ms, the system used <= 1
core and >= 97 % of the due deltas arrived. N doubles from the first step until a step fails,
then bisects twice; the figure is the largest N that passed.

The step at 1,000 answers (one reader each) gives the cost per chunk: relay CPU per chunk made,
gateway CPU per chunk delivered to a browser. With py-spy at hand (a full run), that step is
repeated under py-spy on the relay and the gateway, and the summaries go to the results file.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench import profile_summary
from bench.common import cpu_seconds
from bench.harness import (
    KEY_PREFIX,
    PEER_DIR,
    Bench,
    BenchFailure,
    Event,
    Proc,
    Results,
    Row,
    free_port,
    wait_http,
)

P99_LIMIT_MS = 50.0
CORE_LIMIT = 1.0
DELIVERED_MIN = 0.97
GENERATOR_MAX_CORES = 0.9  # a load generator past this may be what fell behind, not the system
COST_ANSWERS = 1_000  # the step whose figures are the cost per chunk
# One Generate call per answer costs the relay ~40 µs a chunk: 1,000 answers would take it past
# one core (its Starts then queue behind the chunks and the step measures nothing), so that
# mode's cost is measured where it keeps up.
GENERATE_COST_ANSWERS = 200
READER_PROCESSES = 2

ROWS = [
    Row("B", "browsers, an answer each at 50 chunks/s: most served within p99 50 ms and 1 core",
        "b1.n", "", "≥ 3× peer, ≥ 2,000", ((">=", "peer", 3), (">=", 2000))),
    Row("B", "the same, ten browsers per answer: most served", "b10.n", "", "≥ 3× peer",
        ((">=", "peer", 3),)),
    Row("B", "1,000 answers at 50 chunks/s, a browser each: p99 latency", "b1k.p99_ms", "ms",
        "≤ peer", (("<=", "peer", 1),)),
    Row("B", "the same: CPU of the system (cores)", "b1k.cores", ""),
    Row("B", "the same: relay CPU per chunk, the model in its own process, on one GenerateMany "
        "call (µs)", "b1k.relay_us", "µs", "≤ 10 µs", (("<=", 10),)),
    Row("B", "the same: gateway CPU per chunk per browser (µs)", "b1k.gateway_us", "µs"),
    Row("B", "200 answers, one Generate call per answer: relay CPU per chunk (µs)",
        "b1k.generate.relay_us", "µs"),
    Row("B", "200 answers, one Generate call per answer: gateway CPU per chunk per browser (µs)",
        "b1k.generate.gateway_us", "µs"),
    Row("B", "200 answers, one Generate call per answer: p99 latency", "b1k.generate.p99_ms",
        "ms"),
]  # fmt: skip


@dataclasses.dataclass
class Step:
    system: str
    readers: int  # per answer
    browsers: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    delivered: float  # share of the due deltas that arrived in the window
    cores: float  # the system's
    parts: dict[str, float]  # cores by process
    relay_us: float = math.nan  # relay CPU per chunk made
    gateway_us: float = math.nan  # gateway CPU per chunk delivered
    # What else was saturated, when something was: a load generator (the model, a browsers
    # process) past GENERATOR_MAX_CORES, or the machine (all measured processes past its cores).
    # A step that failed so says little about the system: N is then a lower bound.
    saturated: str = ""
    opened_s: float = math.nan  # from the first POST to every response begun

    @property
    def passed(self) -> bool:
        return (
            self.p99_ms <= P99_LIMIT_MS and self.cores <= CORE_LIMIT
            and self.delivered >= DELIVERED_MIN
        )  # fmt: skip

    def brief(self) -> str:
        parts = " ".join(f"{k} {v:.2f}" for k, v in self.parts.items())
        cost = ""
        if not math.isnan(self.relay_us):
            cost = f", relay {self.relay_us:.1f} µs/chunk, gateway {self.gateway_us:.1f} µs/chunk"
        return (
            f"{self.browsers} browsers: p50 {self.p50_ms:.1f} p99 {self.p99_ms:.1f} "
            f"max {self.max_ms:.0f} ms, delivered {self.delivered:.1%}, {self.cores:.2f} cores "
            f"({parts}){cost}, opened in {self.opened_s:.1f} s: "
            f"{'pass' if self.passed else 'FAIL'}"
            + (f" ({self.saturated} saturated)" if self.saturated else "")
        )


class System:
    """One system under test: its address, its processes, how to start and stop it."""

    name = ""
    resume_query = ""

    def __init__(self, bench: Bench, model: Proc, model_address: str) -> None:
        self.bench = bench
        self.model = model  # the simulated model's process, shared by both systems
        self.model_address = model_address
        self.address = ""

    def pids(self) -> dict[str, int]:
        raise NotImplementedError

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError


class StreamRelay(System):
    """The relay and the gateway; the relay reads the model on one GenerateMany call (a profile
    with `multiplex = true`, as a deployment with many answers at once would), or, with
    `multiplex=False`, one Generate call per answer."""

    name = "relay"

    def __init__(self, bench: Bench, model: Proc, model_address: str, multiplex: bool) -> None:
        super().__init__(bench, model, model_address)
        self.multiplex = multiplex

    async def start(self) -> None:
        bench = self.bench
        profiles = bench.workdir / "b-producers.toml"
        profiles.write_text(
            f'[producers.model]\nkind = "grpc"\ntarget = "{self.model_address}"\n'
            f"multiplex = {str(self.multiplex).lower()}\n"
            "[producers.model.client_options]\n"
            "count = { min = 1, max = 1000000, integer = true }\n"
            "rate = { min = 0, max = 100000 }\n"
        )
        argv = [sys.executable, "-m", "relay.server", "--address", "127.0.0.1:0"]
        argv += ["--db", str(bench.workdir / f"{bench.unique('b')}.sqlite3")]
        argv += ["--producers", str(profiles), *bench.args.relay_args.split()]
        # One subject (the gateway's anonymous browsers) starts every answer here.
        argv += ["--limit-live-streams-per-subject-max", "100000"]
        argv += ["--limit-starts-per-subject-per-minute", "10000000"]
        argv += ["--limit-live-streams-max", "100000"]
        # Finished answers leave at once (the peer frees each at its end): a step's heap and
        # admission checks do not carry the earlier steps' answers.
        argv += ["--retention-s", "2"]
        self.relay = await Proc.start("relay-b", argv, bench.env, bench.logs)
        listening = await self.relay.wait_stderr(lambda e: e.get("message") == "relay listening")
        self.address = f"127.0.0.1:{free_port()}"
        argv = [sys.executable, "-m", "gateway.server", "--address", self.address]
        argv += ["--relay", listening["address"], "--max-sse-total", "100000"]
        self.gateway = await Proc.start("gateway-b", argv, bench.env, bench.logs)
        await wait_http(self.gateway, self.address)

    def pids(self) -> dict[str, int]:
        return {"relay": self.relay.pid, "gateway": self.gateway.pid}

    async def stop(self) -> None:
        await self.gateway.stop()
        await self.relay.stop()


class Peer(System):
    name = "peer"

    async def start(self) -> None:
        bench = self.bench
        assert bench.redis is not None
        env = {**bench.env, "REDIS_URL": bench.redis.url, "BENCH_KEY_PREFIX": KEY_PREFIX}
        argv = [node(), str(PEER_DIR / "server.mjs"), self.model_address]
        self.server = await Proc.start("peer-server", argv, env, bench.logs)
        self.address = (await self.server.event("listening", timeout=60))["address"]

    def pids(self) -> dict[str, int]:
        assert self.bench.redis is not None
        pids = {"server": self.server.pid}
        if self.bench.redis.pid:
            pids["redis"] = self.bench.redis.pid
        return pids

    async def stop(self) -> None:
        await self.server.stop()


def node() -> str:
    found = shutil.which("node")
    if found is None:
        raise BenchFailure("node is not on PATH: the browsers scenario needs Node >= 18")
    return found


async def step(
    bench: Bench, system: System, readers: int, browsers: int, profile: str = ""
) -> Step:
    """N browsers on `system` for one window; see the module's docstring."""
    sizes = bench.sizes
    answers = max(1, browsers // readers)
    rate = sizes.b_rate
    quick = 0.25 if sizes.b_smoke else 1.0  # a smoke run's step takes seconds, not tens
    ramp = max(quick, answers / 400)
    settle, window = quick, sizes.b_window_s
    # Every answer runs through the window even if opening them all took twice the ramp.
    count = math.ceil(rate * (2 * ramp + settle + window + 2 * quick))
    label = bench.unique(f"b{readers}-{browsers}")
    ids = [f"{label}-{i}" for i in range(answers)]
    argv = [node(), str(PEER_DIR / "browsers.mjs")]
    workers = [
        await Proc.start(f"browsers-{i}", argv, bench.env, bench.logs)
        for i in range(min(READER_PROCESSES, answers))
    ]
    try:
        for worker in workers:
            await worker.event("listening", timeout=60)
        for i, worker in enumerate(workers):
            worker.send(
                cmd="open", base=system.address, system=system.name, answers=ids[i :: len(workers)],
                readers=readers, count=count, rate=rate, ramp_s=ramp,
            )  # fmt: skip
        opening = time.monotonic()
        for worker in workers:
            await worker.event("opened", timeout=60 + 4 * ramp)
        opened_s = time.monotonic() - opening
        await asyncio.sleep(settle)
        pids = {**system.pids(), "model": system.model.pid}
        pids |= {f"browsers{i}": w.pid for i, w in enumerate(workers)}
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        for worker in workers:
            worker.send(cmd="mark")
        began = time.monotonic()
        async with profiled(bench, system, profile):
            await asyncio.sleep(window)
        spent = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
        wall = time.monotonic() - began
        for worker in workers:
            worker.send(cmd="measure")
        windows = [await worker.event("window", timeout=60) for worker in workers]
        latency = merged(windows)
        # Deltas due: each process's readers over the window it measured itself.
        due = sum(
            len(ids[i :: len(workers)]) * readers * rate * w["seconds"]
            for i, w in enumerate(windows)
        )
        mine = system.pids()
        result = Step(
            system=system.name,
            readers=readers,
            browsers=answers * readers,
            p50_ms=latency["p50_ms"],
            p99_ms=latency["p99_ms"],
            max_ms=latency["max_ms"],
            delivered=latency["samples"] / due,
            cores=sum(spent[name] for name in mine) / wall,
            parts={name: cpu / wall for name, cpu in spent.items()},
            saturated=saturated(spent, mine, wall),
            opened_s=opened_s,
        )
        if result.passed:  # every reader gets every delta; a failed step is over already
            for worker in workers:
                await finished(worker, 30 + count / rate)
    finally:
        for worker in workers:
            await worker.stop()
    if not result.passed:
        await quiet(system, count / rate + 10)
    if isinstance(system, StreamRelay) and latency["samples"]:  # else the answers were over
        result.relay_us = spent["relay"] / (answers * rate * wall) * 1e6
        result.gateway_us = spent["gateway"] / latency["samples"] * 1e6
    return result


def saturated(spent: dict[str, float], system: dict[str, int], wall: float) -> str:
    """The load generator, or the machine, that was saturated in a window; "" if none."""
    for name, cpu in spent.items():
        if name not in system and cpu / wall > GENERATOR_MAX_CORES:
            return name
    if sum(spent.values()) / wall > 0.95 * (os.cpu_count() or 1):
        return "the machine"
    return ""


def open_files_limit() -> int:
    """The soft limit on open files, raised to the hard one (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def quiet(system: System, longest: float) -> None:
    """Waits until the system is idle again (its answers, unread, run to their ends), so a
    failed step does not load the next one."""
    deadline = time.monotonic() + longest
    pids = system.pids().values()
    while time.monotonic() < deadline:
        before = sum(cpu_seconds(pid) for pid in pids)
        await asyncio.sleep(0.5)
        if sum(cpu_seconds(pid) for pid in pids) - before < 0.05:
            return


async def finished(worker: Proc, timeout: float) -> None:
    """Waits for the worker's readers to end; if they do not, says where they stand."""
    try:
        await worker.event("done", timeout=timeout)
    except BenchFailure:
        worker.send(cmd="pending")
        pending = await worker.event("pending", timeout=10)
        raise BenchFailure(f"{worker.name}: readers still reading: {pending['readers']}") from None


def merged(windows: list[Event]) -> dict[str, float]:
    """p50/p99/max (ms) of the browsers' histograms together."""
    counts: dict[int, int] = {}
    for window in windows:
        for bucket, n in window["buckets"]:
            counts[bucket] = counts.get(bucket, 0) + n
    total = sum(counts.values())
    bucket_ms = windows[0]["bucket_us"] / 1000 if windows else 0.1

    def quantile(q: float) -> float:
        seen, rank = 0, q * total
        for bucket in sorted(counts):
            seen += counts[bucket]
            if seen >= rank:
                return (bucket + 1) * bucket_ms  # the bucket's upper edge
        return math.nan

    return {
        "samples": total,
        "p50_ms": quantile(0.50) if total else math.nan,
        "p99_ms": quantile(0.99) if total else math.nan,
        "max_ms": max((w["max_us"] for w in windows), default=math.nan) / 1000,
    }


async def scan(bench: Bench, system: System, readers: int) -> tuple[int, list[Step]]:
    """The largest N that passes: doubling from the first size, then bisecting twice."""
    steps: list[Step] = []

    async def one(browsers: int) -> bool:
        result = await step(bench, system, readers, browsers)
        steps.append(result)
        bench.say(f"  {system.name}, {readers}/answer: {result.brief()}")
        return result.passed

    best, failed = 0, 0
    browsers = math.ceil(bench.sizes.b_first / readers) * readers
    most = min(bench.sizes.b_most, open_files_limit() - 2_000)  # a socket per browser
    while browsers <= most:
        if not await one(browsers):
            failed = browsers
            break
        best = browsers
        browsers *= 2
    for _ in range(bench.sizes.b_bisect if failed and best else 0):
        middle = (best + failed) // 2 // readers * readers
        if middle in (best, failed):
            break
        if await one(middle):
            best = middle
        else:
            failed = middle
    return best, steps


@contextlib.asynccontextmanager
async def profiled(bench: Bench, system: System, label: str) -> Any:
    directory = profile_dir(bench)
    if not label or directory is None or not isinstance(system, StreamRelay):
        yield
        return
    async with (
        bench.profiled(system.relay, f"{label}-relay", directory),
        bench.profiled(system.gateway, f"{label}-gateway", directory),
    ):
        yield


def profile_dir(bench: Bench) -> Path | None:
    """--profile DIR, or in a full run the work directory's profiles/ (py-spy is a dev tool)."""
    if bench.args.profile:
        return Path(bench.args.profile)
    return bench.workdir / "profiles" if bench.sizes.b_profile else None


async def run(bench: Bench) -> None:
    sizes = bench.sizes
    results = bench.results
    bench.say(
        f"scenario B: browsers at {sizes.b_rate:g} chunks/s, N doubling from "
        f"{sizes.b_first} browsers, windows of {sizes.b_window_s:g} s"
    )
    async with bench.part("B"):
        if bench.redis is None and not bench.args.skip_peer:
            raise BenchFailure("the peer did not start")
        env = bench.env
        model = await Proc.start("model", [node(), str(PEER_DIR / "model.mjs")], env, bench.logs)
        try:
            model_address = (await model.event("listening", timeout=60))["address"]
            relay = StreamRelay(bench, model, model_address, multiplex=True)
            parts: list[tuple[System, int, str]] = [
                (relay, 1, "b1"), (relay, 10, "b10"), (relay, 1, "b1k"),
                (StreamRelay(bench, model, model_address, multiplex=False), 1, "b1k.generate"),
            ]  # fmt: skip
            if bench.redis is not None:
                peer = Peer(bench, model, model_address)
                parts += [(peer, 1, "b1"), (peer, 10, "b10"), (peer, 1, "b1k")]
            if sizes.b_smoke:  # bench-quick: the code paths, one step each
                parts = [part for part in parts if part[2] == "b1"]
            for system, readers, metric in parts:
                await system.start()  # each part on a fresh system
                try:
                    if metric.startswith("b1k"):
                        await cost_step(bench, system, metric)
                    else:
                        best, steps = await scan(bench, system, readers)
                        record(bench, system, metric, best, steps)
                finally:
                    await system.stop()
        finally:
            await model.stop()
    directory = profile_dir(bench)
    if directory is not None:
        results.notes.extend(profile_notes(directory))


def record(bench: Bench, system: System, metric: str, best: int, steps: list[Step]) -> None:
    bench.results.add(f"{metric}.n", system.name, [best])
    bench.results.runs[f"{metric}.{system.name}"].extend(dataclasses.asdict(s) for s in steps)
    bound = [s for s in steps if not s.passed and s.saturated]
    if bound:
        bench.results.notes.append(
            f"Scenario B, {system.name}, {steps[0].readers} per answer: {best:,} browsers is a "
            f"lower bound: the step at {bound[0].browsers:,} failed with {bound[0].saturated} "
            "saturated."
        )


async def cost_step(bench: Bench, system: System, metric: str) -> None:
    """1,000 answers with a browser each: latency, cores and, for stream-relay, the cost per chunk
    (then again under py-spy, when profiling, for the multiplexed relay)."""
    answers = GENERATE_COST_ANSWERS if metric.endswith("generate") else COST_ANSWERS
    browsers = min(answers, bench.sizes.b_most)
    result = await step(bench, system, 1, browsers)
    bench.say(f"  {system.name}, cost step ({metric}): {result.brief()}")
    results = bench.results
    results.runs[f"{metric}.{system.name}"].append(dataclasses.asdict(result))
    results.add(f"{metric}.p99_ms", system.name, [result.p99_ms])
    results.add(f"{metric}.cores", system.name, [result.cores])
    if isinstance(system, StreamRelay):
        results.add(f"{metric}.relay_us", system.name, [result.relay_us])
        results.add(f"{metric}.gateway_us", system.name, [result.gateway_us])
        if metric == "b1k" and profile_dir(bench) is not None:
            profiled_step = await step(bench, system, 1, browsers, profile="b1k")
            bench.say(f"  {system.name}, under py-spy: {profiled_step.brief()}")


def profile_notes(directory: Path) -> list[str]:
    out = []
    for part in ("relay", "gateway"):
        path = directory / f"b1k-{part}.txt"
        if path.exists():
            out.append(
                f"Scenario B, py-spy on the {part} at 1,000 answers x 50 chunks/s:\n\n```\n"
                + profile_summary.summarise(path, 15)
                + "\n```"
            )
    return out


def notes(results: Results) -> list[str]:
    out = []
    for system in ("relay", "peer"):
        steps = results.runs.get(f"b1k.{system}", [])
        if steps:
            parts = ", ".join(f"{k} {v:.2f}" for k, v in steps[0]["parts"].items())
            out.append(f"Scenario B at 1,000 answers, {system}: cores by process: {parts}.")
    return out
