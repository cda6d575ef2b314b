# ruff: noqa: RUF001
"""Cluster mode: two relays, A and B, on one PostgreSQL database and one Redis key prefix.

Its rows sit in the same table as the embedded ones (scenario "C"); `python -m bench` runs them
after scenarios 1-6 (`--no-cluster` leaves them out, `--only cluster` runs just them). They are
skipped, with the reason printed and noted, when PostgreSQL (127.0.0.1:5432, user postgres, or
BENCH_POSTGRES_URL) or Redis (the bench's Redis: 127.0.0.1:6379, else the one it started for the
peer) does not answer.

Setup: a fresh database `bench_<hex>` (created with asyncpg on the `postgres` database, dropped
with FORCE afterwards) and a fresh Redis key prefix `bench-cluster-<hex>:` (its keys deleted
afterwards). Relays are bench.relay_host processes (the relay as `python -m relay.server` builds
it, plus the stamping bench producer) with `--store postgresql://... --log redis://...?prefix=...
--instance-id A|B --lease-s 2`. Readers are their own processes: this module is also the worker
that runs them (`python -m bench.cluster '<job JSON>'`, the protocol of bench.worker).

Rows:
  C1  one stream through gRPC: the echo producer inside A (scenario 1's sizes), read by a reader
      on A, then by a reader on B (B follows A's Redis stream); chunks/s, ratio to the peer's
      one-stream rate (scenario 1's, or measured here when the run lacks it and has the peer).
  C2  cross-instance resume: N live streams on A (bench producer, 20 chunks/s each); for each,
      an Attach on B from the middle of what A has produced, timed to its first chunk (B has
      no mirror of that stream yet: the cold case, as after a reconnect that lands on B); then
      a second Attach on B of the same stream (B's mirror is warm), noted. p50/p99 over N.
  C3  cross-instance Stop: N live streams on A, each with a reader on B; Stop via B, timed until
      the call returns (the reader's STOPPED end is noted). p50/p99 over N.
  C4  owner death: a reader on B follows a live stream on a fresh A; A is SIGKILLed; the time
      from the kill to the reader's INTERRUPTED end, beside the lease.

Every chunk of every reader is checked: offsets contiguous from where it attached, each chunk the
one the producer made at that offset, the end's final offset what the reader got.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench.common import BENCH_START, EchoChecker, GapError, cpu_seconds, emit, parse_bench_chunk
from bench.common import percentile as pct
from bench.harness import Bench, Event, Proc, Row, redis_command
from bench.worker import (
    HELLO,
    QUESTION,
    BenchReader,
    Job,
    bench_options,
    chat_id,
    checkpoint,
    emit_throughput,
    runs_of,
)
from relay.client import RelayClient
from relay.domain.model import ChunkBatch, StopOutcome, StreamState

POSTGRES_ADMIN = os.environ.get(
    "BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
LEASE_S = 2.0
LIVE_RATE = 20.0  # chunks/s of the live streams of C2-C4
LIVE_CHUNKS = 1_000_000  # they end by Stop or death, never by running out


@dataclasses.dataclass(frozen=True)
class ClusterSizes:
    resumes: int  # C2: streams (one cold and one warm resume each) per run
    resume_min_offset: int  # C2: chunks each has produced before the resumes
    stops: int  # C3: streams stopped per run
    deaths: int  # C4: SIGKILLs (each of a fresh A)


FULL = ClusterSizes(resumes=200, resume_min_offset=40, stops=200, deaths=3)
QUICK = ClusterSizes(resumes=20, resume_min_offset=10, stops=20, deaths=1)

LEASE_MS = LEASE_S * 1000
ROWS = [
    Row("C", "cluster, one stream, gRPC, read on A (the owner): chunks/s", "c1.grpc.a", "/s",
        "≥ 100,000; ≥ 5× peer", ((">=", 100_000), (">=", "peer", 5))),
    Row("C", "cluster, one stream, gRPC, read through B: chunks/s", "c1.grpc.b", "/s",
        "≥ 100,000; ≥ 5× peer", ((">=", 100_000), (">=", "peer", 5))),
    Row("C", "cluster, resume on B of A's live stream: first chunk p50", "c2.p50", "ms",
        "≤ 10 ms", (("<=", 10),)),
    Row("C", "cluster, resume on B of A's live stream: first chunk p99", "c2.p99", "ms",
        "≤ 10 ms", (("<=", 10),)),
    Row("C", "cluster, Stop via B of A's live stream: p50", "c3.p50", "ms"),
    Row("C", "cluster, Stop via B of A's live stream: p99", "c3.p99", "ms", "≤ 50 ms",
        (("<=", 50),)),
    Row("C", f"cluster, SIGKILL of A → reader on B INTERRUPTED (lease {LEASE_S:g} s)",
        "c4.interrupted", "ms", f"within the lease (≤ {LEASE_MS:,.0f} ms)", (("<=", LEASE_MS),)),
]  # fmt: skip


# --- the orchestrator's side ------------------------------------------------------------------


class Cluster:
    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.sizes = QUICK if bench.args.quick else FULL
        self.runs = bench.sizes.runs
        self.database = f"bench_{secrets.token_hex(6)}"
        self.prefix = f"bench-cluster-{secrets.token_hex(6)}:"
        self.redis_port = bench.redis.port if bench.redis is not None else 6379
        self.redis_pid = 0
        self.relays: list[Proc] = []
        self._deaths = 0

    @property
    def store(self) -> str:
        return POSTGRES_ADMIN.rsplit("/", 1)[0] + "/" + self.database

    @property
    def log(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0?prefix={self.prefix}"

    # -- setup -----------------------------------------------------------------------------

    async def unreachable(self) -> str:
        """Why the cluster cannot run here, or "" if PostgreSQL and Redis answer."""
        import asyncpg

        try:
            connection = await asyncpg.connect(POSTGRES_ADMIN, timeout=3)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            return f"PostgreSQL at {POSTGRES_ADMIN} is unreachable ({type(exc).__name__}: {exc})"
        try:
            version = await connection.fetchval("SHOW server_version")
        finally:
            await connection.close()
        try:
            if await redis_command(self.redis_port, "PING", timeout=2) != "PONG":
                return f"Redis on 127.0.0.1:{self.redis_port} does not answer PING"
            info = await redis_command(self.redis_port, "INFO", "server")
        except (OSError, RuntimeError, TimeoutError) as exc:
            return f"Redis on 127.0.0.1:{self.redis_port} is unreachable ({exc!r})"
        fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        self.redis_pid = int(fields.get("process_id", "0").strip() or 0)
        self.bench.results.notes.append(
            f"Cluster: PostgreSQL {version} and redis-server "
            f"{fields.get('redis_version', '?').strip()} on 127.0.0.1 (database {self.database}, "
            f"key prefix {self.prefix!r}, both removed after the run)."
        )
        return ""

    async def admin(self, sql: str) -> None:
        import asyncpg

        connection = await asyncpg.connect(POSTGRES_ADMIN, timeout=10)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    async def cleanup(self) -> None:
        for relay in self.relays:
            await relay.stop()
        with contextlib.suppress(Exception):
            await self.admin(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        with contextlib.suppress(Exception):
            cursor = "0"
            while True:
                cursor, keys = await redis_command(
                    self.redis_port, "SCAN", cursor, "MATCH", f"{self.prefix}*", "COUNT", "1000"
                )
                if keys:
                    await redis_command(self.redis_port, "DEL", *keys)
                if cursor == "0":
                    break

    async def relay(self, instance: str) -> tuple[Proc, str]:
        argv = [sys.executable, "-m", "bench.relay_host", "--address", "127.0.0.1:0"]
        argv += ["--store", self.store, "--log", self.log, "--instance-id", instance]
        argv += ["--lease-s", f"{LEASE_S:g}", "--shutdown-grace-s", "0", "--log-format", "json"]
        argv += self.bench.args.relay_args.split()
        process = await Proc.start(
            f"relay-cluster-{instance}", argv, self.bench.env, self.bench.logs
        )
        self.relays.append(process)
        listening = await process.event("listening", timeout=60)
        return process, str(listening["address"])

    async def worker(self, job: dict[str, Any]) -> Proc:
        job = {"runs": self.runs, "epoch": self.bench.epoch, **job}
        argv = [sys.executable, "-m", "bench.cluster", json.dumps(job)]
        return await Proc.start(
            f"worker-cluster-{job['kind']}", argv, self.bench.env, self.bench.logs
        )

    # -- the rows --------------------------------------------------------------------------

    async def run(self) -> None:
        bench, results = self.bench, self.bench.results
        reason = await self.unreachable()
        if reason:
            bench.say(f"cluster: skipped: {reason}")
            results.notes.append(f"Cluster rows skipped: {reason}.")
            return
        bench.say(f"cluster: relays A and B on PostgreSQL database {self.database} + Redis")
        await self.admin(f'CREATE DATABASE "{self.database}"')
        try:
            (a, address_a), (b, address_b) = await asyncio.gather(self.relay("A"), self.relay("B"))
            await self.one_stream(a, address_a, b, address_b)
            async with bench.part("cluster C2 resume on B"):
                await self.resume(address_a, address_b)
            async with bench.part("cluster C3 Stop via B"):
                await self.stop(address_a, address_b)
            async with bench.part("cluster C4 owner death"):
                await self.owner_death(address_b)
        finally:
            await self.cleanup()
        self.add_notes()

    async def one_stream(self, a: Proc, address_a: str, b: Proc, address_b: str) -> None:
        bench, results, sizes = self.bench, self.bench.results, self.bench.sizes
        bench.say("cluster C1: one stream, echo producer inside A, one reader on A, then on B")
        for side, read in (("a", address_a), ("b", address_b)):
            async with bench.part(f"cluster C1 one stream, read on {side.upper()}"):
                job: dict[str, Any] = {"kind": "echo", "start": address_a, "read": read}
                job |= {"chunks": sizes.s1_chunks, "warmup_chunks": sizes.s1_warmup}
                worker = await self.worker(job)
                pids = {"a": a.pid, "b": b.pid, "redis": self.redis_pid}
                on_ready, on_done = self.cpu_hooks(pids)
                runs = await bench.drive(worker, f"c1.grpc.{side}", on_ready, on_done)
                results.add(f"c1.grpc.{side}", "relay", [r["rate"] for r in runs])
                for process in pids:
                    key = f"{process}_cpu_s_per_m"
                    if runs and all(key in r for r in runs):
                        results.add(f"c1.grpc.{side}.{key}", "relay", [r[key] for r in runs])
        peer = results.get("s1.grpc", "peer")
        if peer is None and bench.peer_producer is not None:
            async with bench.part("cluster C1 peer"):
                warmup = (1, min(sizes.s1_warmup, sizes.s1_peer_chunks))
                peer_runs = await bench.peer_runs("s1.peer", 1, sizes.s1_peer_chunks, 0, warmup)
                results.add("s1.grpc", "peer", [r["rate"] for r in peer_runs])
                peer = results.get("s1.grpc", "peer")
        if peer is not None:
            for side in ("a", "b"):
                results.figures[(f"c1.grpc.{side}", "peer")] = peer

    def cpu_hooks(
        self, pids: dict[str, int]
    ) -> tuple[Callable[[Event], Awaitable[None]], Callable[[Event], Awaitable[None]]]:
        """CPU seconds per 1M chunks of relay A, relay B and redis-server over each run."""
        mark: dict[str, float] = {}

        def readings() -> dict[str, float]:
            out = {}
            for name, pid in pids.items():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    if pid:
                        out[name] = cpu_seconds(pid)
            return out

        async def on_ready(event: Event) -> None:
            mark.clear()
            mark.update(readings())

        async def on_done(event: Event) -> None:
            for name, value in readings().items():
                if name in mark and event.get("chunks"):
                    event[f"{name}_cpu_s_per_m"] = (value - mark[name]) / event["chunks"] * 1e6

        return on_ready, on_done

    async def resume(self, address_a: str, address_b: str) -> None:
        bench, results, sizes = self.bench, self.bench.results, self.sizes
        bench.say(
            f"cluster C2: {sizes.resumes} live streams on A, each resumed mid-stream on B "
            "(cold, then warm)"
        )
        job: dict[str, Any] = {
            "kind": "resume",
            "a": address_a,
            "b": address_b,
            "streams": sizes.resumes,
        }
        job |= {"rate": LIVE_RATE, "min_offset": sizes.resume_min_offset}
        runs = await bench.drive(await self.worker(job), "c2.resume")
        for key in ("p50", "p99", "warm_p50", "warm_p99", "all_p50", "all_p99"):
            results.add(f"c2.{key}", "relay", [r[f"{key}_ms"] for r in runs])

    async def stop(self, address_a: str, address_b: str) -> None:
        bench, results, sizes = self.bench, self.bench.results, self.sizes
        bench.say(f"cluster C3: {sizes.stops} live streams on A, a reader on B each, Stop via B")
        job: dict[str, Any] = {
            "kind": "stop",
            "a": address_a,
            "b": address_b,
            "streams": sizes.stops,
        }
        job |= {"rate": LIVE_RATE}
        runs = await bench.drive(await self.worker(job), "c3.stop")
        for key in ("p50", "p99", "end_p50", "end_p99"):
            results.add(f"c3.{key}", "relay", [r[f"{key}_ms"] for r in runs])

    async def owner_death(self, address_b: str) -> None:
        bench, results = self.bench, self.bench.results
        bench.say(
            f"cluster C4: SIGKILL of the owner (lease {LEASE_S:g} s), {self.sizes.deaths} "
            "time(s), each of a fresh A, a reader on B"
        )
        took: list[float] = []
        for run in range(self.sizes.deaths):
            self._deaths += 1
            owner, address = await self.relay(f"A-doomed-{self._deaths}")
            killed: dict[str, int] = {}

            async def kill(
                event: Event, owner: Proc = owner, killed: dict[str, int] = killed
            ) -> None:
                owner.signal(signal.SIGKILL)
                killed["ns"] = time.monotonic_ns()

            async def done(event: Event, run: int = run, killed: dict[str, int] = killed) -> None:
                event["run"] = run
                event["kill_to_end_ms"] = (event["end_ns"] - killed["ns"]) / 1e6

            job: dict[str, Any] = {"kind": "death", "a": address, "b": address_b, "rate": LIVE_RATE}
            job |= {"runs": 1, "warmup": False, "timeout_s": LEASE_S * 5 + 10}
            try:
                runs = await bench.drive(await self.worker(job), "c4.death", kill, done)
            finally:
                await owner.stop()
            took += [r["kill_to_end_ms"] for r in runs]
        results.add("c4.interrupted", "relay", took)

    def add_notes(self) -> None:
        results = self.bench.results
        sizes, chunks = self.sizes, self.bench.sizes.s1_chunks
        notes = [
            f"Cluster rows (C): relays A and B are bench.relay_host processes on one PostgreSQL "
            f"database and one Redis key prefix (--store postgresql://... --log redis://..., "
            f"--lease-s {LEASE_S:g}); readers in their own processes (bench/cluster.py). "
            f"C1: {chunks:,} echo chunks from the producer inside A, the reader on A or on B "
            f"(B follows A's Redis stream); the peer's figure is scenario 1's. C2: per run "
            f"{sizes.resumes} streams live on A at {LIVE_RATE:g} chunks/s, each resumed on B "
            f"from half of what it held (≥ {sizes.resume_min_offset} chunks), timed from the "
            f"Attach call to its first chunk; B had no mirror of the stream yet. C3: per run "
            f"{sizes.stops} streams live on A with a reader on B each, one Stop via B after "
            f"another, timed until the call returned. C4: a reader on B follows a live stream "
            f"of a fresh A, A is SIGKILLed, {sizes.deaths} time(s); the time from the kill to "
            f"the reader's INTERRUPTED end.",
        ]
        cpu = []
        for side in ("a", "b"):
            parts = []
            for process, label in (("a", "A"), ("b", "B"), ("redis", "redis-server")):
                figure = results.get(f"c1.grpc.{side}.{process}_cpu_s_per_m", "relay")
                if figure is not None:
                    parts.append(f"{label} {figure.median:.2f}")
            if parts:
                where = "on A" if side == "a" else "through B"
                cpu.append(f"read {where}: " + ", ".join(parts))
        if cpu:
            notes.append("Cluster C1 CPU-s per 1M chunks: " + "; ".join(cpu) + ".")
        warm50, warm99 = results.get("c2.warm_p50", "relay"), results.get("c2.warm_p99", "relay")
        all99 = results.get("c2.all_p99", "relay")
        if warm50 and warm99 and all99:
            notes.append(
                f"Cluster C2: a second resume on B of the same stream (B's mirror warm): first "
                f"chunk p50 {warm50.median:.2f} ms, p99 {warm99.median:.2f} ms; the cold resume "
                f"had every chunk up to A's offset at the call after p99 {all99.median:.2f} ms."
            )
        end50, end99 = results.get("c3.end_p50", "relay"), results.get("c3.end_p99", "relay")
        if end50 and end99:
            notes.append(
                f"Cluster C3: the reader on B got its STOPPED end p50 {end50.median:.2f} ms, "
                f"p99 {end99.median:.2f} ms after the Stop call began."
            )
        death = results.get("c4.interrupted", "relay")
        if death:
            values = ", ".join(f"{v:,.0f}" for v in death.values)
            notes.append(
                f"Cluster C4: kill → INTERRUPTED {values} ms with a {LEASE_S:g} s lease (A renews "
                f"every lease/3 and B looks for lapsed leases as often, so the bound by design is "
                f"about 4/3 of the lease)."
            )
        results.notes.extend(notes)


async def run(bench: Bench) -> None:
    """The cluster rows of `bench`'s run (its results, notes and failures)."""
    async with bench.part("cluster setup"):
        await Cluster(bench).run()


# --- the readers' side (python -m bench.cluster '<job>') --------------------------------------


def check_bench(offset: int, chunk: str) -> None:
    """The bench producer's chunk at `offset`: the text-start, then deltas stamped with it."""
    if offset == 0:
        if chunk != BENCH_START:
            raise GapError(f"offset 0 holds {chunk[:60]!r}, not the text-start")
        return
    seq, _ = parse_bench_chunk(chunk)
    if seq != offset:
        raise GapError(f"offset {offset} holds chunk {seq}")


async def echo_job(job: Job) -> None:
    """C1: Start on A (the echo producer runs there), read on `read` (A or B), timed from the
    Start to the end, like scenario 1."""
    async with contextlib.AsyncExitStack() as stack:
        owner = await stack.enter_async_context(RelayClient(job["start"]))
        reader = owner
        if job["read"] != job["start"]:
            reader = await stack.enter_async_context(RelayClient(job["read"]))
        await owner.get_stats()
        await reader.get_stats()
        for run in runs_of(job):
            count = job["warmup_chunks"] if run < 0 else job["chunks"]
            checker = EchoChecker(count)
            await checkpoint("run", run=run)
            began = time.perf_counter()
            started = await owner.start(
                chat_id("c1"), [QUESTION], options={"chunks": str(count), "delay_ms": "0"}
            )
            received = 0
            async for event in reader.attach(stream_id=started.stream_id):
                if isinstance(event, ChunkBatch):
                    if event.first_offset != received:
                        raise GapError(f"batch at {event.first_offset}, expected {received}")
                    for chunk in event.chunks:
                        checker.check(received, chunk)
                        received += 1
                elif event.state is not StreamState.COMPLETED or event.final_offset != received:
                    where = "A" if reader is owner else "B"
                    raise GapError(
                        f"the reader on {where} got {received} chunks, then the end "
                        f"{event.state.value} at offset {event.final_offset} (stream "
                        f"{started.stream_id} of {checker.total} chunks)"
                    )
            seconds = time.perf_counter() - began
            if received != checker.total:
                raise GapError(f"got {received} chunks of {checker.total}")
            emit_throughput(run, received, seconds, checker.bytes)


async def start_live(
    client: RelayClient, streams: int, rate: float, epoch: int
) -> list[tuple[str, str]]:
    """`streams` live bench streams at `rate` chunks/s each: [(chat, stream_id)]."""
    options = bench_options(LIVE_CHUNKS, epoch, rate=rate)
    chats = [chat_id(f"live{i}") for i in range(streams)]
    limit = asyncio.Semaphore(32)

    async def one(chat: str) -> tuple[str, str]:
        async with limit:
            started = await client.start(chat, [HELLO], producer="bench", options=options)
            return chat, started.stream_id

    return list(await asyncio.gather(*(one(chat) for chat in chats)))


async def stop_all(client: RelayClient, streams: list[tuple[str, str]]) -> None:
    limit = asyncio.Semaphore(32)

    async def one(chat: str, stream_id: str) -> None:
        async with limit:
            await client.stop(chat, stream_id)

    await asyncio.gather(*(one(chat, stream_id) for chat, stream_id in streams))


async def timed_resume(client: RelayClient, stream_id: str, offset: int, tip: int) -> list[float]:
    """Attach from `offset`: (ms to the first chunk, ms to every chunk up to `tip`), each chunk
    checked."""
    began = time.perf_counter()
    attached = await client.open_attach(stream_id=stream_id, from_offset=offset)
    first = 0.0
    expected = offset
    try:
        async with asyncio.timeout(30):
            async for event in attached.events:
                if not isinstance(event, ChunkBatch):
                    raise GapError(f"the live stream ended: {event}")
                if not first:
                    first = time.perf_counter()
                if event.first_offset != expected:
                    raise GapError(f"batch at {event.first_offset}, expected {expected}")
                for chunk in event.chunks:
                    check_bench(expected, chunk)
                    expected += 1
                if expected >= tip:
                    break
    except TimeoutError:
        raise GapError(f"the resume from {offset} got to {expected}, not {tip}") from None
    finally:
        await attached.events.aclose()
    done = time.perf_counter()
    return [(first - began) * 1000, (done - began) * 1000]


async def resume_job(job: Job) -> None:
    """C2: live streams on A; each resumed on B from the middle of what A holds (cold: B has not
    seen the stream), then once more (warm)."""
    epoch = job["epoch"]
    async with RelayClient(job["a"]) as a, RelayClient(job["b"]) as b:
        await a.get_stats()
        await b.get_stats()
        for run in runs_of(job):
            count = min(5, job["streams"]) if run < 0 else job["streams"]
            streams = await start_live(a, count, job["rate"], epoch)
            try:
                for chat, _ in streams:
                    deadline = time.monotonic() + 60
                    while (active := await a.get_active(chat)) is None or active.offset < job[
                        "min_offset"
                    ]:
                        if time.monotonic() > deadline:
                            raise GapError(f"{chat} did not reach {job['min_offset']} chunks")
                        await asyncio.sleep(0.01)
                await checkpoint("run", run=run)
                cold: list[float] = []
                warm: list[float] = []
                whole: list[float] = []
                for chat, stream_id in streams:
                    active = await a.get_active(chat)
                    if active is None or active.stream_id != stream_id:
                        raise GapError(f"{chat}: its stream is no longer live on A")
                    tip = active.offset
                    first, every = await timed_resume(b, stream_id, tip // 2, tip)
                    cold.append(first)
                    whole.append(every)
                    warm.append((await timed_resume(b, stream_id, tip // 2, tip))[0])
            finally:
                await stop_all(a, streams)
            cold.sort()
            warm.sort()
            whole.sort()
            emit(
                "done",
                run=run,
                resumes=len(cold),
                p50_ms=pct(cold, 50),
                p99_ms=pct(cold, 99),
                max_ms=cold[-1],
                warm_p50_ms=pct(warm, 50),
                warm_p99_ms=pct(warm, 99),
                all_p50_ms=pct(whole, 50),
                all_p99_ms=pct(whole, 99),
            )


async def stop_job(job: Job) -> None:
    """C3: live streams on A, a reader on B each; one Stop via B after another, each timed until
    the call returns; each reader must end STOPPED with every chunk."""
    epoch = job["epoch"]
    async with RelayClient(job["a"]) as a, RelayClient(job["b"]) as b:
        await a.get_stats()
        await b.get_stats()
        for run in runs_of(job):
            count = min(5, job["streams"]) if run < 0 else job["streams"]
            streams = await start_live(a, count, job["rate"], epoch)
            attached = [await b.open_attach(stream_id=stream_id) for _, stream_id in streams]
            readers = [BenchReader(epoch, [], StreamState.STOPPED) for _ in streams]
            tasks = [
                asyncio.create_task(r.follow(x.events))
                for r, x in zip(readers, attached, strict=True)
            ]
            deadline = time.monotonic() + 60
            while min(r.received for r in readers) < 2:
                for task in tasks:
                    if task.done():
                        task.result()
                if time.monotonic() > deadline:
                    raise GapError("the readers on B did not get 2 chunks each within 60 s")
                await asyncio.sleep(0.01)
            await checkpoint("run", run=run)
            calls: list[float] = []
            ends: list[float] = []
            for (chat, stream_id), reader, task in zip(streams, readers, tasks, strict=True):
                began = time.monotonic_ns()
                result = await b.stop(chat, stream_id)
                calls.append((time.monotonic_ns() - began) / 1e6)
                if result.outcome is not StopOutcome.STOPPED:
                    raise GapError(f"Stop via B of {chat}: {result.outcome.value}, not stopped")
                await asyncio.wait_for(task, 30)
                ends.append((reader.end_ns - began) / 1e6)
            calls.sort()
            ends.sort()
            emit(
                "done",
                run=run,
                stops=len(calls),
                chunks=sum(r.received for r in readers),
                p50_ms=pct(calls, 50),
                p99_ms=pct(calls, 99),
                max_ms=calls[-1],
                end_p50_ms=pct(ends, 50),
                end_p99_ms=pct(ends, 99),
            )


async def death_job(job: Job) -> None:
    """C4: a live stream on A (about to die), a reader on B; at "ready" the orchestrator
    SIGKILLs A; the reader must end INTERRUPTED with every chunk the log holds."""
    epoch = job["epoch"]
    async with RelayClient(job["a"]) as a, RelayClient(job["b"]) as b:
        for run in runs_of(job):
            [(chat, stream_id)] = await start_live(a, 1, job["rate"], epoch)
            attached = await b.open_attach(stream_id=stream_id)
            reader = BenchReader(epoch, [], StreamState.INTERRUPTED)
            task = asyncio.create_task(reader.follow(attached.events))
            deadline = time.monotonic() + 60
            while reader.received < 5:
                if task.done():
                    task.result()
                    raise GapError(f"the stream of {chat} ended before A was killed")
                if time.monotonic() > deadline:
                    raise GapError("the reader on B did not get 5 chunks within 60 s")
                await asyncio.sleep(0.005)
            await checkpoint("kill", run=run)
            try:
                await asyncio.wait_for(task, job["timeout_s"])
            except TimeoutError:
                raise GapError(
                    f"no end on B {job['timeout_s']:.0f} s after A was killed "
                    f"({reader.received} chunks)"
                ) from None
            emit("done", run=run, end_ns=reader.end_ns, chunks=reader.received)


JOBS: dict[str, Callable[[Job], Awaitable[None]]] = {
    "echo": echo_job,
    "resume": resume_job,
    "stop": stop_job,
    "death": death_job,
}


def main() -> None:
    from bench import worker

    worker.JOBS.update(JOBS)
    worker.main()


if __name__ == "__main__":
    main()
