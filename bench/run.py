# ruff: noqa: RUF001
"""stream-relay's benchmark suite: stream-relay, the gRPC ceiling and the peer, in one run.

    python -m bench            # the full run (minutes): >= 3 runs per figure after a warm-up
    python -m bench --quick    # a short run CI may take (< 1 minute): small sizes, 1 run

Prints one table: stream-relay, the ceiling (a bare grpc.aio server-streaming service) and the peer
(Vercel's resumable-stream on Redis, from Node) side by side, with ratios and the targets of the
benchmark issue. Every chunk is checked for gaps and duplicates; any loss fails the run (exit 1).
Figures are medians over the runs with min-max. A full run writes bench/results/<date>-<host>.md.

Processes: every relay is its own subprocess (`python -m relay.server`, `python -m gateway.server
--embedded-relay`, or bench.relay_host, which adds the stamping bench producer); readers are
bench.worker subprocesses; the ceiling server and the peer's producers and readers are
subprocesses too. The echo producer runs inside the relay (it is the relay's built-in producer);
the bench producer too, in bench.relay_host. The cluster rows (two relays on PostgreSQL + Redis)
are bench/cluster.py's.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from bench.common import EPOCH_ENV, ROOT, cpu_seconds, rss_bytes

PEER_DIR = ROOT / "bench" / "peer"
RESULTS_DIR = ROOT / "bench" / "results"
KEY_PREFIX = "stream-relay-bench"
EVENT_TIMEOUT = 600.0

Event = dict[str, Any]


class BenchFailure(Exception):
    def __init__(self, message: str, gap: bool = False) -> None:
        super().__init__(message)
        self.gap = gap


# --- sizes ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sizes:
    runs: int
    s1_chunks: int
    s1_warmup: int
    s1_peer_chunks: int
    s1_producer_chunks: int
    s2_streams: int
    s2_count: int
    s3_streams: int
    s3_rate: float
    s3_seconds: float
    s4_count: int
    s5_readers: int
    s6_retained: int
    s6_readers: int
    s6_reader_streams: int
    s6_frozen: int


FULL = Sizes(
    runs=3,
    s1_chunks=200_000,
    s1_warmup=20_000,
    s1_peer_chunks=200_000,
    s1_producer_chunks=50_000,
    s2_streams=200,
    s2_count=2_000,
    s3_streams=1_000,
    s3_rate=20,
    s3_seconds=30,
    s4_count=10_000,
    s5_readers=100,
    s6_retained=1_000,
    s6_readers=1_000,
    s6_reader_streams=10,
    s6_frozen=100_000,
)
QUICK = Sizes(
    runs=1,
    s1_chunks=20_000,
    s1_warmup=2_000,
    s1_peer_chunks=5_000,
    s1_producer_chunks=5_000,
    s2_streams=20,
    s2_count=500,
    s3_streams=50,
    s3_rate=20,
    s3_seconds=3,
    s4_count=2_000,
    s5_readers=20,
    s6_retained=100,
    s6_readers=100,
    s6_reader_streams=2,
    s6_frozen=10_000,
)


# --- results ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Figure:
    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)


class Results:
    def __init__(self) -> None:
        self.figures: dict[tuple[str, str], Figure] = {}
        self.runs: dict[str, list[Event]] = collections.defaultdict(list)
        self.failures: list[str] = []
        self.notes: list[str] = []

    def add(self, metric: str, system: str, values: Sequence[float]) -> None:
        if values:
            self.figures[(metric, system)] = Figure([float(v) for v in values])

    def get(self, metric: str, system: str) -> Figure | None:
        return self.figures.get((metric, system))


# --- subprocesses -----------------------------------------------------------------------------


class Proc:
    """A subprocess speaking JSON lines on stdout (events) and stdin (commands); its stderr is
    kept (the last lines, for failures) and written to the log directory."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, log: Path) -> None:
        self.name = name
        self.process = process
        self.log_path = log
        self.events: asyncio.Queue[Event | None] = asyncio.Queue()
        self.stderr: collections.deque[str] = collections.deque(maxlen=400)
        self._tasks = [
            asyncio.create_task(self._read_stdout()),
            asyncio.create_task(self._read_stderr()),
        ]

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    async def start(cls, name: str, argv: Sequence[str], env: dict[str, str], logs: Path) -> Proc:
        process = await asyncio.create_subprocess_exec(
            *argv,
            cwd=ROOT,
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=1 << 20,
        )
        return cls(name, process, logs / f"{name}-{process.pid}.log")

    async def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            line = raw.decode(errors="replace").strip()
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "text", "line": line}
            if not isinstance(event, dict):
                event = {"event": "text", "line": line}
            await self.events.put(event)
        await self.events.put(None)

    async def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        with self.log_path.open("w") as log:
            async for raw in self.process.stderr:
                line = raw.decode(errors="replace").rstrip("\n")
                self.stderr.append(line)
                log.write(line + "\n")

    def tail(self, lines: int = 25) -> str:
        return "\n".join(list(self.stderr)[-lines:])

    async def event(self, *names: str, timeout: float = EVENT_TIMEOUT) -> Event:
        """The next event named one of `names` (others are skipped); raises on an error event or
        if the process ends first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = await asyncio.wait_for(self.events.get(), deadline - time.monotonic())
            except TimeoutError:
                raise BenchFailure(
                    f"{self.name}: no {'/'.join(names)} within {timeout:.0f} s"
                ) from None
            if event is None:
                self.events.put_nowait(None)  # stays: every later wait fails at once too
                await self.process.wait()
                raise BenchFailure(
                    f"{self.name} exited ({self.process.returncode}) before {'/'.join(names)}:\n"
                    + self.tail()
                )
            if event.get("event") == "error":
                gap = bool(event.get("gap"))
                kind = "GAP/DUPLICATE CHECK FAILED" if gap else "error"
                detail = event.get("trace") or ""
                raise BenchFailure(f"{self.name}: {kind}: {event.get('message')}\n{detail}", gap)
            if event.get("event") in names:
                return event

    async def wait_stderr(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30
    ) -> dict[str, Any]:
        """The first JSON log line on stderr that `predicate` accepts."""
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            lines = list(self.stderr)
            for line in lines[seen:]:
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if isinstance(entry, dict) and predicate(entry):
                        return entry
            seen = len(lines)
            if self.process.returncode is not None:
                break
            await asyncio.sleep(0.02)
        raise BenchFailure(f"{self.name} did not start:\n{self.tail()}")

    def send(self, **command: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(command) + "\n").encode())

    def signal(self, signum: int) -> None:
        if self.process.returncode is None:
            os.kill(self.process.pid, signum)

    async def stop(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGCONT)
                self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 15)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        for task in self._tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 5)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- Redis ------------------------------------------------------------------------------------


async def redis_command(port: int, *args: str, timeout: float = 5) -> Any:
    """One command over RESP, on a fresh connection (the bench needs a handful)."""

    async def read(reader: asyncio.StreamReader) -> Any:
        line = (await reader.readuntil(b"\r\n"))[:-2]
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else (await reader.readexactly(size + 2))[:-2].decode()
        if kind == b"*":
            return [await read(reader) for _ in range(int(rest))]
        raise RuntimeError(f"unexpected RESP {line[:40]!r}")

    async def run() -> Any:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            request = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
            writer.write(request.encode())
            return await read(reader)
        finally:
            writer.close()

    return await asyncio.wait_for(run(), timeout)


class Redis:
    def __init__(self, port: int, process: Proc | None) -> None:
        self.port = port
        self.process = process
        self.info: dict[str, str] = {}

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @classmethod
    async def ensure(cls, env: dict[str, str], logs: Path) -> Redis:
        """The Redis on 6379 if one answers; else one of our own on a free port."""
        try:
            if await redis_command(6379, "PING", timeout=2) == "PONG":
                redis = cls(6379, None)
                await redis.load_info()
                return redis
        except (OSError, RuntimeError, TimeoutError):
            pass
        server = shutil.which("redis-server")
        if server is None:
            raise BenchFailure(
                "nothing answers on 127.0.0.1:6379 and redis-server is not installed"
            )
        port = free_port()
        argv = [
            server,
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
        ]
        process = await Proc.start("redis-server", argv, env, logs)
        for _ in range(200):
            with contextlib.suppress(OSError, RuntimeError, TimeoutError):
                if await redis_command(port, "PING", timeout=1) == "PONG":
                    redis = cls(port, process)
                    await redis.load_info()
                    return redis
            await asyncio.sleep(0.05)
        await process.stop()
        raise BenchFailure(f"redis-server did not answer on port {port}:\n{process.tail()}")

    async def load_info(self) -> None:
        text = await redis_command(self.port, "INFO", "server")
        self.info = dict(
            line.split(":", 1)
            for line in text.splitlines()
            if ":" in line and not line.startswith("#")
        )

    @property
    def pid(self) -> int:
        return int(self.info.get("process_id", "0"))

    async def cleanup(self) -> None:
        """Deletes the keys the peer left (resumable-stream keeps them for 24 h)."""
        cursor = "0"
        while True:
            cursor, keys = await redis_command(
                self.port, "SCAN", cursor, "MATCH", f"{KEY_PREFIX}*", "COUNT", "1000"
            )
            if keys:
                await redis_command(self.port, "DEL", *keys)
            if cursor == "0":
                return

    async def stop(self) -> None:
        if self.process is not None:
            await self.process.stop()


# --- the bench --------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, sizes: Sizes, workdir: Path) -> None:
        self.args = args
        self.sizes = sizes
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir()
        self.epoch = time.monotonic_ns()
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), EPOCH_ENV: str(self.epoch)}
        self.results = Results()
        self.redis: Redis | None = None
        self.peer_producer: Proc | None = None
        self.peer_reader: Proc | None = None
        self._counter = 0

    def say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def unique(self, label: str) -> str:
        self._counter += 1
        return f"{KEY_PREFIX}-{label}-{os.getpid()}-{self._counter}"

    # -- processes -------------------------------------------------------------------------

    async def worker(self, job: dict[str, Any]) -> Proc:
        job = {"runs": self.sizes.runs, "epoch": self.epoch, **job}
        argv = [sys.executable, "-m", "bench.worker", json.dumps(job)]
        return await Proc.start(f"worker-{job['kind']}", argv, self.env, self.logs)

    async def relay_host(self, label: str, gateway: bool = False) -> tuple[Proc, str, str]:
        argv = [sys.executable, "-m", "bench.relay_host", "--address", "127.0.0.1:0"]
        argv += ["--db", str(self.workdir / f"{label}.sqlite3"), *self.args.relay_args.split()]
        http = f"127.0.0.1:{free_port()}" if gateway else ""
        if gateway:
            argv += ["--gateway", http]
        process = await Proc.start(f"relay-{label}", argv, self.env, self.logs)
        listening = await process.event("listening", timeout=60)
        return process, listening["address"], http

    @contextlib.asynccontextmanager
    async def profiled(self, process: Proc, label: str) -> Any:
        """py-spy on `process` while the block runs, with --profile DIR."""
        if not self.args.profile:
            yield
            return
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        out = Path(self.args.profile) / f"{label}.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        extra = self.args.profile_args.split()
        argv = [spy, "record", "-p", str(process.pid), "-f", "raw", "-o", str(out), *extra]
        if "--native" not in extra:  # py-spy cannot unwind native stacks without pausing
            argv.append("--nonblocking")
        log = self.logs / f"py-spy-{label}.log"
        with log.open("w") as errors:
            recorder = await asyncio.create_subprocess_exec(
                *argv, stdout=errors, stderr=asyncio.subprocess.STDOUT
            )
        try:
            yield
        finally:
            if recorder.returncode is None:
                recorder.send_signal(signal.SIGINT)
            await recorder.wait()
            if out.exists():
                self.say(f"  profile of {process.name}: {out}")
            else:
                self.say(f"  py-spy failed on {process.name}: {log.read_text().strip()[-500:]}")

    async def drive(
        self,
        worker: Proc,
        label: str,
        on_ready: Callable[[Event], Awaitable[None]] | None = None,
        on_done: Callable[[Event], Awaitable[None]] | None = None,
    ) -> list[Event]:
        """Runs a worker's job to its end: at each "ready", `on_ready`, then go; each "done"
        (after `on_done`) is a run. Returns the measured runs (not the warm-up)."""
        measured = []
        try:
            while True:
                event = await worker.event("ready", "done", "finished")
                if event["event"] == "finished":
                    break
                if event["event"] == "ready":
                    if on_ready is not None:
                        await on_ready(event)
                    worker.send(cmd="go")
                    continue
                if on_done is not None:
                    await on_done(event)
                self.results.runs[label].append(event)
                if event.get("run", 0) >= 0:
                    measured.append(event)
                self.say(f"  {label} run {event.get('run')}: {brief(event)}")
        finally:
            await worker.stop()
        return measured

    def cpu_hooks(
        self, process: Proc, worker: Proc, before: Callable[[], None] | None = None
    ) -> tuple[Callable[[Event], Awaitable[None]], Callable[[Event], Awaitable[None]]]:
        """Hooks noting the CPU seconds of the relay (and of the reader process: a saturated
        reader would make the relay look slow) and the wall time over each run."""
        mark: dict[str, float] = {}

        async def on_ready(event: Event) -> None:
            mark["cpu"] = cpu_seconds(process.pid)
            mark["reader"] = cpu_seconds(worker.pid)
            mark["wall"] = time.monotonic()
            if before is not None:
                before()

        async def on_done(event: Event) -> None:
            cpu = cpu_seconds(process.pid) - mark["cpu"]
            wall = time.monotonic() - mark["wall"]
            event["relay_cpu_s"] = cpu
            event["relay_cores"] = cpu / wall if wall else math.nan
            event["reader_cores"] = (cpu_seconds(worker.pid) - mark["reader"]) / wall
            event["relay_cpu_s_per_m"] = (
                cpu / event["chunks"] * 1e6 if event.get("chunks") else math.nan
            )

        return on_ready, on_done

    # -- the peer --------------------------------------------------------------------------

    async def start_peer(self) -> None:
        node = shutil.which("node")
        if node is None:
            raise BenchFailure("node is not on PATH: the peer (resumable-stream) needs Node >= 18")
        installed = PEER_DIR / "node_modules" / ".bench-installed"
        manifest = PEER_DIR / "package.json"
        if not installed.exists() or installed.stat().st_mtime < manifest.stat().st_mtime:
            npm = shutil.which("npm")
            if npm is None:
                raise BenchFailure("npm is not on PATH: cannot install the peer's packages")
            self.say("installing the peer (resumable-stream, redis) into bench/peer/node_modules")
            done = await asyncio.create_subprocess_exec(
                npm,
                "install",
                "--no-audit",
                "--no-fund",
                "--no-package-lock",
                cwd=PEER_DIR,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            output, _ = await asyncio.wait_for(done.communicate(), 300)
            if done.returncode != 0:
                raise BenchFailure(f"npm install in {PEER_DIR} failed:\n{output.decode()}")
            installed.touch()
        self.redis = await Redis.ensure(self.env, self.logs)
        env = {**self.env, "REDIS_URL": self.redis.url, "BENCH_KEY_PREFIX": KEY_PREFIX}
        script = str(PEER_DIR / "peer.mjs")
        self.peer_producer = await Proc.start(
            "peer-producer", [node, script, "producer"], env, self.logs
        )
        self.peer_reader = await Proc.start("peer-reader", [node, script, "reader"], env, self.logs)
        await self.peer_producer.event("listening", timeout=60)
        await self.peer_reader.event("listening", timeout=60)

    async def stop_peer(self) -> None:
        for process in (self.peer_producer, self.peer_reader):
            if process is not None:
                await process.stop()
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await self.redis.cleanup()
            await self.redis.stop()

    async def peer_follow(self, label: str, streams: int, count: int, rate: float = 0) -> Event:
        """One peer run: `streams` streams of `count` chunks, one resumed reader each, released
        together once every reader is attached."""
        producer, reader = self.peer_producer, self.peer_reader
        assert producer is not None and reader is not None and self.redis is not None
        ids = [self.unique(label) + f"-{i}" for i in range(streams)]
        producer.send(cmd="create", ids=ids, count=count, rate=rate)
        await producer.event("created")
        reader.send(cmd="resume", ids=ids, count=count)
        await reader.event("ready")
        cpu = cpu_seconds(self.redis.pid) + cpu_seconds(producer.pid) if self.redis.pid else 0.0
        began = time.monotonic()
        producer.send(cmd="go")
        done = await reader.event("done")
        await producer.event("finished_streams")
        if self.redis.pid:
            spent = cpu_seconds(self.redis.pid) + cpu_seconds(producer.pid) - cpu
            done["peer_cpu_s_per_m"] = spent / done["chunks"] * 1e6
            done["peer_cores"] = spent / (time.monotonic() - began)
        return done

    async def peer_runs(
        self, label: str, streams: int, count: int, rate: float, warmup: tuple[int, int]
    ) -> list[Event]:
        measured = []
        for run in [-1, *range(self.sizes.runs)]:
            if run < 0:
                event = await self.peer_follow(label, warmup[0], warmup[1], rate)
            else:
                event = await self.peer_follow(label, streams, count, rate)
            event["run"] = run
            self.results.runs[label].append(event)
            self.say(f"  {label} run {run}: {brief(event)}")
            if run >= 0:
                measured.append(event)
        return measured

    # -- scenarios -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def part(self, name: str) -> AsyncIterator[None]:
        """One measured part: a failure is recorded (and fails the run), the next part runs."""
        try:
            yield
        except BenchFailure as exc:
            self.results.failures.append(f"{name}: {exc}")
            self.say(f"  FAILED {name}: {exc}")

    async def s1(self) -> None:
        sizes, results = self.sizes, self.results
        self.say("scenario 1: one stream, one reader following live")
        async with self.part("s1 gRPC"):
            # The relay's own entry point; the echo producer lives inside it.
            argv = [sys.executable, "-m", "relay.server", "--address", "127.0.0.1:0"]
            argv += ["--db", str(self.workdir / "s1.sqlite3"), "--log-format", "json"]
            argv += self.args.relay_args.split()
            relay = await Proc.start("relay-s1", argv, self.env, self.logs)
            try:
                listening = await relay.wait_stderr(lambda e: e.get("message") == "relay listening")
                job = {"kind": "relay_echo", "address": listening["address"]}
                job |= {"chunks": sizes.s1_chunks, "warmup_chunks": sizes.s1_warmup}
                worker = await self.worker(job)
                on_ready, on_done = self.cpu_hooks(relay, worker)
                async with self.profiled(relay, "s1-grpc-relay"):
                    runs = await self.drive(worker, "s1.grpc.relay", on_ready, on_done)
            finally:
                await relay.stop()
            results.add("s1.grpc", "relay", [r["rate"] for r in runs])
            results.add("s1.grpc.cpu", "relay", [r["relay_cpu_s_per_m"] for r in runs])
            results.add("s1.grpc.bytes", "relay", [r["chunk_bytes"] for r in runs])

        if (ROOT / "examples" / "producer_python.py").exists():
            async with self.part("s1 gRPC, producer in its own process"):
                await self.s1_producer_process()

        async with self.part("s1 gateway"):
            # `python -m gateway.server --embedded-relay`: gateway and relay in one process.
            http = f"127.0.0.1:{free_port()}"
            argv = [sys.executable, "-m", "gateway.server", "--embedded-relay"]
            argv += ["--relay", "127.0.0.1:0", "--address", http]
            env = {**self.env, "RELAY_DB": str(self.workdir / "s1-gateway.sqlite3")}
            gateway = await Proc.start("gateway-s1", argv, env, self.logs)
            try:
                await wait_http(gateway, http)
                job = {"kind": "sse_echo", "http": http}
                job |= {"chunks": sizes.s1_chunks, "warmup_chunks": sizes.s1_warmup}
                worker = await self.worker(job)
                on_ready, on_done = self.cpu_hooks(gateway, worker)
                async with self.profiled(gateway, "s1-sse-gateway"):
                    runs = await self.drive(worker, "s1.sse.relay", on_ready, on_done)
            finally:
                await gateway.stop()
            results.add("s1.sse", "relay", [r["rate"] for r in runs])
            results.add("s1.sse.cpu", "relay", [r["relay_cpu_s_per_m"] for r in runs])

        async with self.part("s1 ceiling"):
            argv = [sys.executable, "-m", "bench.ceiling", "--prebuild", str(sizes.s1_chunks)]
            ceiling = await Proc.start("ceiling", argv, self.env, self.logs)
            try:
                address = (await ceiling.event("listening", timeout=60))["address"]
                for batch in (1, 100):
                    job = {"kind": "ceiling", "address": address, "batch": batch}
                    job |= {"chunks": sizes.s1_chunks, "warmup_chunks": sizes.s1_warmup}
                    runs = await self.drive(await self.worker(job), f"s1.ceiling.{batch}")
                    results.add(f"s1.ceiling.{batch}", "ceiling", [r["rate"] for r in runs])
            finally:
                await ceiling.stop()

        if self.peer_producer is not None:
            async with self.part("s1 peer"):
                warmup = (1, min(sizes.s1_warmup, sizes.s1_peer_chunks))
                runs = await self.peer_runs("s1.peer", 1, sizes.s1_peer_chunks, 0, warmup)
                results.add("s1.grpc", "peer", [r["rate"] for r in runs])

    async def s1_producer_process(self) -> None:
        """Scenario 1 with the producer in its own process: examples/producer_python.py behind a
        producers.toml profile of kind "grpc" (one text delta per gRPC response)."""
        script = str(ROOT / "examples" / "producer_python.py")
        argv = [sys.executable, script, "--port", "0", "--delay-ms", "0"]
        producer = await Proc.start("producer-python", argv, self.env, self.logs)
        relay: Proc | None = None
        try:
            while not (line := (await producer.event("text", timeout=60))["line"]).startswith(
                "listening on"
            ):
                pass
            profiles = self.workdir / "producers.toml"
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
                str(self.workdir / "s1-producer.sqlite3"),
                "--producers",
                str(profiles),
            ]
            relay = await Proc.start("relay-s1-producer", argv, self.env, self.logs)
            listening = await relay.wait_stderr(lambda e: e.get("message") == "relay listening")
            job = {"kind": "relay_echo", "address": listening["address"], "producer": "python"}
            job |= {"chunks": self.sizes.s1_producer_chunks, "warmup_chunks": self.sizes.s1_warmup}
            job |= {"words": ["Python", "producer", "says:"]}
            worker = await self.worker(job)
            on_ready, on_done = self.cpu_hooks(relay, worker)
            runs = await self.drive(worker, "s1.producer.relay", on_ready, on_done)
        finally:
            if relay is not None:
                await relay.stop()
            await producer.stop()
        self.results.add("s1.grpc_producer", "relay", [r["rate"] for r in runs])

    async def fan(
        self, scenario: str, streams: int, count: int, rate: float, warmup: tuple[int, int]
    ) -> None:
        """Scenarios 2 and 3: `streams` streams of `count` chunks at `rate` (0: unpaced), one
        reader each, every reader attached before the first chunk: each reader its own Attach
        call, then (`{scenario}.many`) each a subscription of one AttachMany call."""
        await self.fan_relay(scenario, streams, count, rate, warmup, many=False)
        await self.fan_relay(f"{scenario}.many", streams, count, rate, warmup, many=True)
        await self.fan_peer(scenario, streams, count, rate, warmup)

    async def fan_relay(
        self,
        scenario: str,
        streams: int,
        count: int,
        rate: float,
        warmup: tuple[int, int],
        *,
        many: bool,
    ) -> None:
        results = self.results
        async with self.part(f"{scenario} stream-relay"):
            relay, address, _ = await self.relay_host(scenario)
            try:
                job = {"kind": "fanout", "address": address, "streams": streams, "count": count}
                job |= {"rate": rate, "warmup_streams": warmup[0], "warmup_count": warmup[1]}
                job |= {"many": many}
                worker = await self.worker(job)
                on_ready, on_done = self.cpu_hooks(
                    relay, worker, lambda: relay.signal(signal.SIGUSR1)
                )
                async with self.profiled(relay, f"{scenario}-relay"):
                    runs = await self.drive(worker, f"{scenario}.relay", on_ready, on_done)
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
        self, scenario: str, streams: int, count: int, rate: float, warmup: tuple[int, int]
    ) -> None:
        results = self.results
        if self.peer_producer is not None:
            async with self.part(f"{scenario} peer"):
                runs = await self.peer_runs(f"{scenario}.peer", streams, count, rate, warmup)
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

    async def s2(self) -> None:
        sizes = self.sizes
        self.say(f"scenario 2: fan-out, {sizes.s2_streams} streams x {sizes.s2_count} chunks")
        await self.fan("s2", sizes.s2_streams, sizes.s2_count, 0, (20, 500))

    async def s3(self) -> None:
        sizes = self.sizes
        count = int(sizes.s3_rate * sizes.s3_seconds)
        self.say(
            f"scenario 3: paced, {sizes.s3_streams} streams at {sizes.s3_rate:g} chunks/s "
            f"for {sizes.s3_seconds:g} s"
        )
        warmup = (min(100, sizes.s3_streams), 40)
        await self.fan("s3", sizes.s3_streams, count, sizes.s3_rate, warmup)

    async def s4(self) -> None:
        sizes, results = self.sizes, self.results
        self.say(f"scenario 4: resume an open {sizes.s4_count}-chunk stream")
        async with self.part("s4 stream-relay"):
            relay, address, http = await self.relay_host("s4", gateway=True)
            try:
                for kind, label in (("resume", "s4.grpc"), ("resume_sse", "s4.sse")):
                    async with self.part(label):
                        job = {"kind": kind, "address": address, "http": http}
                        job |= {"count": sizes.s4_count, "settle_s": self.args.resume_settle_s}
                        worker = await self.worker(job)
                        async with self.profiled(relay, f"{label}-relay"):
                            runs = await self.drive(worker, f"{label}.relay")
                        results.add(f"{label}.first", "relay", [r["first_ms"] for r in runs])
                        results.add(f"{label}.all", "relay", [r["all_ms"] for r in runs])
            finally:
                await relay.stop()
        if self.peer_producer is not None:
            async with self.part("s4 peer"):
                runs = await self.peer_resume(sizes.s4_count)
                results.add("s4.grpc.first", "peer", [r["first_ms"] for r in runs])
                results.add("s4.grpc.all", "peer", [r["all_ms"] for r in runs])

    async def peer_resume(self, count: int) -> list[Event]:
        producer, reader = self.peer_producer, self.peer_reader
        assert producer is not None and reader is not None
        runs = []
        for run in [-1, *range(self.sizes.runs)]:
            stream = self.unique("s4")
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
            self.results.runs["s4.peer"].append(event)
            self.say(f"  s4.peer run {run}: {brief(event)}")
            if run >= 0:
                runs.append(event)
        return runs

    async def s5(self) -> None:
        sizes, results = self.sizes, self.results
        self.say(f"scenario 5: Stop with {sizes.s5_readers} readers on a live stream")
        async with self.part("s5 stream-relay"):
            relay, address, _ = await self.relay_host("s5")
            try:
                job = {"kind": "stop", "address": address, "readers": sizes.s5_readers}
                worker = await self.worker(job | {"rate": 50})
                async with self.profiled(relay, "s5-relay"):
                    runs = await self.drive(worker, "s5.relay")
            finally:
                await relay.stop()
            results.add("s5.p50", "relay", [r["p50_ms"] for r in runs])
            results.add("s5.p99", "relay", [r["p99_ms"] for r in runs])
            results.add("s5.call", "relay", [r["stop_call_ms"] for r in runs])

    async def rss_phases(self, label: str, job: dict[str, Any]) -> dict[str, int]:
        """Runs a worker job on a fresh relay; notes the relay's RSS at each "ready" phase."""
        relay, address, _ = await self.relay_host(label)
        rss: dict[str, int] = {}

        async def note(event: Event) -> None:
            await asyncio.sleep(0.2)
            rss[event["phase"]] = rss_bytes(relay.pid)

        try:
            await self.drive(await self.worker(job | {"address": address}), label, note)
        finally:
            await relay.stop()
        return rss

    async def s6(self) -> None:
        sizes, results = self.sizes, self.results
        self.say("scenario 6: memory")
        async with self.part("s6 retained streams"):
            job = {"kind": "retain", "streams": sizes.s6_retained, "count": 1000}
            rss = await self.rss_phases("s6.retain", job | {"warmup_streams": 20})
            per_stream = (rss["after"] - rss["before"]) / sizes.s6_retained
            results.add("s6.retained_kb", "relay", [per_stream / 1000])
            self.say(f"  retained: {rss} -> {per_stream / 1000:.1f} KB per stream")

        async with self.part("s6 idle readers"):
            job = {"kind": "idle_readers", "streams": sizes.s6_reader_streams}
            job |= {"readers": sizes.s6_readers, "warmup_readers": 20}
            rss = await self.rss_phases("s6.idle", job)
            per_reader = (rss["after"] - rss["before"]) / sizes.s6_readers
            results.add("s6.reader_kb", "relay", [per_reader / 1000])
            self.say(f"  idle readers: {rss} -> {per_reader / 1000:.1f} KB per reader")

        async with self.part("s6 frozen reader"):
            live = await self.frozen_run(False)
            stopped = await self.frozen_run(True)
            change = (stopped["peak"] - live["peak"]) / live["peak"] * 100
            results.add("s6.frozen_pct", "relay", [change])
            growth = (stopped["peak"] - stopped["before"]) / 1e6
            results.add("s6.frozen_growth_mb", "relay", [growth])
            results.add("s6.live_growth_mb", "relay", [(live["peak"] - live["before"]) / 1e6])

    async def frozen_run(self, frozen: bool) -> dict[str, int]:
        """One reader attached to a gated stream, SIGSTOPped (or not: the control) while the
        producer writes; the relay's RSS before, at its peak while writing, and after."""
        from relay.client import RelayClient

        label = "frozen" if frozen else "live"
        relay, address, _ = await self.relay_host(f"s6c-{label}")
        marks: dict[str, int] = {}
        try:
            worker = await self.worker(
                {"kind": "frozen", "address": address, "count": self.sizes.s6_frozen}
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

            await self.drive(worker, f"s6.frozen.{label}", produce)
        finally:
            await relay.stop()
        self.say(f"  {label} reader: {marks}")
        return marks

    # -- the whole run -----------------------------------------------------------------------

    async def run(self) -> None:
        from bench import cluster

        scenarios: dict[str, Callable[[], Awaitable[None]]] = {
            "s1": self.s1,
            "s2": self.s2,
            "s3": self.s3,
            "s4": self.s4,
            "s5": self.s5,
            "s6": self.s6,
            "cluster": lambda: cluster.run(self),  # relays A and B on PostgreSQL + Redis
        }
        default = [s for s in scenarios if not (s == "cluster" and self.args.no_cluster)]
        only = self.args.only.split(",") if self.args.only else default
        unknown = set(only) - set(scenarios)
        if unknown:
            raise SystemExit(f"unknown scenarios {sorted(unknown)}; known: {', '.join(scenarios)}")
        if not self.args.skip_peer:
            async with self.part("peer setup"):
                await self.start_peer()
        else:
            self.results.notes.append("The peer was skipped (--skip-peer).")
        try:
            for name in only:
                await scenarios[name]()
        finally:
            await self.stop_peer()


def brief(event: Event) -> str:
    keys = ("rate", "p50_ms", "p99_ms", "first_ms", "all_ms", "stop_call_ms", "relay_cores")
    keys += ("reader_cores", "peer_cores", "chunks_per_message")
    parts = []
    for key in keys:
        if key in event:
            value = event[key]
            parts.append(f"{key}={value:,.0f}" if key == "rate" else f"{key}={value:.2f}")
    return " ".join(parts) or json.dumps({k: v for k, v in event.items() if k != "event"})


async def wait_http(process: Proc, address: str, timeout: float = 60) -> None:
    from bench import sse

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.process.returncode is not None:
            break
        with contextlib.suppress(OSError, ValueError, asyncio.IncompleteReadError):
            connection = await sse.Connection.open(address)
            try:
                status, _ = await connection.request("GET", "/healthz")
                if status == 200:
                    return
            finally:
                await connection.close()
        await asyncio.sleep(0.05)
    raise BenchFailure(f"{process.name} did not serve http://{address}/healthz:\n{process.tail()}")


# --- the table --------------------------------------------------------------------------------


def fmt(figure: Figure | None, unit: str) -> str:
    if figure is None:
        return "–"

    def one(value: float) -> str:
        if unit == "/s":
            return f"{value:,.0f}"
        if unit == "ms":
            return f"{value:.2f}" if value < 100 else f"{value:,.0f}"
        if unit in ("KB", "MB", "%"):
            return f"{value:+.1f}" if unit == "%" else f"{value:.1f}"
        return f"{value:.2f}"

    if len(figure.values) == 1:
        return one(figure.median)
    return f"{one(figure.median)} ({one(figure.low)}–{one(figure.high)})"


def ratio(a: Figure | None, b: Figure | None) -> str:
    if a is None or b is None or not b.median:
        return "–"
    value = a.median / b.median
    return f"{value:.2f}×" if value < 10 else f"{value:.1f}×"


# A target: (comparison, limit) with the limit a number, or (comparison, system, factor) with the
# limit that system's median times factor ("peer" for the same metric, "ceiling" for the row's
# ceiling metric). "abs<=" bounds the absolute value.
Target = tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class Row:
    scenario: str
    measure: str
    metric: str
    unit: str
    target: str = ""
    checks: tuple[Target, ...] = ()
    ceiling: str = ""  # the ceiling's metric shown on this row

    def verdict(self, results: Results) -> bool | None:
        relay = results.get(self.metric, "relay")
        if relay is None or not self.checks:
            return None
        verdicts = []
        for check in self.checks:
            if len(check) == 2:
                limit: float | None = check[1]
            else:
                metric = self.ceiling if check[1] == "ceiling" else self.metric
                reference = results.get(metric, check[1])
                limit = None if reference is None else reference.median * check[2]
            if limit is None:
                return None
            value = relay.median
            verdicts.append(
                value >= limit
                if check[0] == ">="
                else abs(value) <= limit
                if check[0] == "abs<="
                else value <= limit
            )
        return all(verdicts)


ROWS = [
    Row("1", "one stream, gRPC: chunks/s", "s1.grpc", "/s",
        "≥ 250,000; ≥ 19× peer; ≥ 1/3 ceiling",
        ((">=", 250_000), (">=", "peer", 19), (">=", "ceiling", 1 / 3)),
        "s1.ceiling.100"),
    Row("1", "(ceiling at 1 chunk per message)", "s1.ceiling.1", "/s", ceiling="s1.ceiling.1"),
    Row("1", "one stream, gRPC, producer in its own process: chunks/s", "s1.grpc_producer", "/s"),
    Row("1", "one stream, gateway SSE: chunks/s", "s1.sse", "/s", "≥ 100,000", ((">=", 100_000),)),
    Row("2", "fan-out: aggregate chunks/s", "s2.rate", "/s", "≥ 2× peer", ((">=", "peer", 2),)),
    Row("2", "fan-out: p50 latency", "s2.p50_ms", "ms"),
    Row("2", "fan-out: p99 latency", "s2.p99_ms", "ms", "≤ peer", (("<=", "peer", 1),)),
    Row("2", "fan-out, readers on one AttachMany: aggregate chunks/s", "s2.many.rate", "/s",
        "≥ 2× peer", ((">=", "peer", 2),)),
    Row("2", "fan-out, readers on one AttachMany: p99 latency", "s2.many.p99_ms", "ms", "≤ peer",
        (("<=", "peer", 1),)),
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
    Row("4", "resume, gRPC: first chunk", "s4.grpc.first", "ms", "≤ 5 ms", (("<=", 5),)),
    Row("4", "resume, gRPC: all chunks", "s4.grpc.all", "ms", "≤ 15 ms", (("<=", 15),)),
    Row("4", "resume, gateway: first chunk", "s4.sse.first", "ms", "≤ 10 ms", (("<=", 10),)),
    Row("4", "resume, gateway: all chunks", "s4.sse.all", "ms", "≤ 50 ms", (("<=", 50),)),
    Row("5", "Stop → every reader's end: p50", "s5.p50", "ms"),
    Row("5", "Stop → every reader's end: p99", "s5.p99", "ms", "≤ 20 ms", (("<=", 20),)),
    Row("6", "RSS per retained 1,000-chunk stream", "s6.retained_kb", "KB", "≤ 150 KB",
        (("<=", 150),)),
    Row("6", "RSS per idle attached reader", "s6.reader_kb", "KB", "≤ 30 KB", (("<=", 30),)),
    Row("6", "RSS, frozen reader vs live reader", "s6.frozen_pct", "%", "within ±10 %",
        (("abs<=", 10),)),
]  # fmt: skip


def table(results: Results) -> tuple[str, int]:
    from bench import cluster

    header = ["#", "measure", "stream-relay", "ceiling", "peer", "SR ÷ ceiling", "SR ÷ peer"]
    header += ["target", ""]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    missed = 0
    for row in [*ROWS, *cluster.ROWS]:
        relay = results.get(row.metric, "relay")
        ceiling = results.get(row.ceiling, "ceiling") if row.ceiling else None
        peer = results.get(row.metric, "peer")
        verdict = row.verdict(results)
        missed += verdict is False
        unit = f" ({row.unit})" if row.unit in ("ms", "KB", "s") else ""
        cells = [
            row.scenario,
            row.measure + unit,
            fmt(relay, row.unit),
            fmt(ceiling, row.unit),
            fmt(peer, row.unit),
            ratio(relay, ceiling),
            ratio(relay, peer),
            row.target,
            "" if verdict is None else ("met" if verdict else "**MISSED**"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), missed


def notes(results: Results, sizes: Sizes, quick: bool) -> list[str]:
    out = []
    if quick:
        out.append(
            "QUICK run: sizes reduced and 1 run; the targets are for the full run "
            "(`python -m bench`)."
        )
    else:
        out.append(
            f"Medians of {sizes.runs} runs after a warm-up, min–max in brackets; latencies are "
            "from the producer's timestamp in the chunk to the reader's receipt."
        )
    bytes_figure = results.get("s1.grpc.bytes", "relay")
    fan_bytes = results.get("s2.chunk_bytes", "relay")
    out += [
        f"Sizes: 1) {sizes.s1_chunks:,} chunks (peer {sizes.s1_peer_chunks:,}); 2) "
        f"{sizes.s2_streams} streams × {sizes.s2_count:,}; 3) {sizes.s3_streams} streams × "
        f"{sizes.s3_rate:g} chunks/s × {sizes.s3_seconds:g} s; 4) {sizes.s4_count:,} chunks; 5) "
        f"{sizes.s5_readers} readers; 6) {sizes.s6_retained} retained streams, "
        f"{sizes.s6_readers} idle readers, {sizes.s6_frozen:,} chunks under the frozen reader.",
        "stream-relay: every relay is its own process, apart from the readers' processes. "
        "Scenario 1 runs the relay's own entry points with the built-in echo producer, which "
        "lives INSIDE the relay process (`python -m relay.server`; SSE: `python -m gateway.server "
        "--embedded-relay`, gateway and relay in one process); its chunks are text-delta JSON of "
        + (f"{bytes_figure.median:.0f} bytes on average" if bytes_figure else "~46 bytes")
        + ". Scenarios 2–6 use bench/relay_host.py: the same relay (build_relay + start_server, "
        "default flags) plus a bench-only producer, also inside the relay process, that streams "
        "an answer's text like a model: a text-start, then text deltas each carrying its offset "
        "and the time it was made ("
        + (f"{fan_bytes.median:.0f} bytes" if fan_bytes else "~55 bytes")
        + ' of JSON on average). The row "producer in its own process" runs '
        'examples/producer_python.py as a relay producer profile of kind "grpc" (one text '
        "delta per gRPC response: two gRPC hops per chunk).",
        "Ceiling: a bare grpc.aio server-streaming method sending the relay's own AttachResponse "
        "messages of pre-built 40-byte chunks (bench/ceiling.py), reader in another process.",
        "Peer: resumable-stream on Redis (createNewResumableStream in a Node producer process, "
        "resumeExistingStream in a Node reader process), 40-byte chunks; its CPU row counts "
        "redis-server + the producer process.",
        "Ratios are stream-relay ÷ reference: above 1 is better for chunks/s, below 1 is better "
        "for latencies and CPU.",
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
    for metric, label in (("s1.grpc.cpu", "gRPC"), ("s1.sse.cpu", "gateway")):
        figure = results.get(metric, "relay")
        if figure:
            out.append(
                f"Scenario 1 {label}: relay process CPU {figure.median:.2f} s per 1M chunks."
            )
    load = results.get("s3.relay_cores_at_load", "relay")
    if load:
        readers = [r.get("reader_cores", 0.0) for r in results.runs.get("s3.relay", [])]
        out.append(
            "Scenario 3 CPU for the offered load = CPU-s per chunk × streams × chunks/s per "
            "stream; a measured figure near 1.0 core means the relay's one event loop saturated "
            "and fell behind (the reader process used at most "
            f"{max(readers, default=0):.2f} cores)."
        )
    call = results.get("s5.call", "relay")
    if call:
        out.append(
            f"Scenario 5: the Stop call itself returned after {fmt(call, 'ms')} ms (median)."
        )
    return out + results.notes


# --- the machine ------------------------------------------------------------------------------


def machine(redis: Redis | None) -> dict[str, str]:
    import google.protobuf
    import grpc

    def run(*argv: str) -> str:
        try:
            return subprocess.run(
                argv, capture_output=True, text=True, timeout=10, cwd=ROOT
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"

    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = "?"
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"

    def package_version(name: str) -> str:
        try:
            return str(
                json.loads((PEER_DIR / "node_modules" / name / "package.json").read_text())[
                    "version"
                ]
            )
        except (OSError, ValueError, KeyError):
            return "not installed"

    commit = run("git", "rev-parse", "--short", "HEAD")
    dirty = run("git", "status", "--porcelain", "--", "relay", "gateway")
    return {
        "host": platform.node(),
        "cpus": f"{os.cpu_count()} × {model}",
        "memory": memory,
        "os": f"{platform.system()} {platform.release()}",
        "load average (1, 5, 15 min) at the end": "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg()),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "node": run("node", "--version") if shutil.which("node") else "not found",
        "resumable-stream": package_version("resumable-stream"),
        "redis (npm)": package_version("redis"),
        "redis-server": (
            redis.info.get("redis_version", "?")
            + (" (the bench's own)" if redis.process else " (127.0.0.1:6379)")
        )
        if redis
        else "not used",
        "stream-relay": commit + (" + uncommitted changes in relay/ or gateway/" if dirty else ""),
    }


def write_results(
    path: Path,
    text_table: str,
    note_lines: list[str],
    info: dict[str, str],
    results: Results,
    argv: list[str],
    started: datetime.datetime,
    seconds: float,
    note: str,
) -> None:
    shown = list(argv)
    if "--note" in shown:  # the note is shown on its own line
        del shown[shown.index("--note") : shown.index("--note") + 2]
    shown = [a for a in shown if not a.startswith("--note=")]
    command = " ".join(["python -m bench", *shown])
    lines = [
        f"# stream-relay benchmark, {started:%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `{command}` ({seconds / 60:.1f} minutes)",
        "",
    ]
    if note:
        lines += [f"**Note:** {note}", ""]
    lines += ["| machine and versions | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in info.items()]
    lines += ["", text_table, ""]
    lines += [f"- {n}" for n in note_lines]
    if results.failures:
        lines += ["", "## Failures", ""] + [f"```\n{f}\n```" for f in results.failures]
    lines += ["", "## Every run", "", "Run -1 is the warm-up.", "", "```"]
    for label, events in results.runs.items():
        for event in events:
            fields = {
                k: (round(v, 4) if isinstance(v, float) else v)
                for k, v in event.items()
                if k != "event"
            }
            lines.append(f"{label}: {json.dumps(fields)}")
    lines += ["```", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 run (< 1 minute)")
    parser.add_argument("--runs", type=int, help="measured runs per figure (default 3; quick 1)")
    parser.add_argument(
        "--only", default="", help="comma-separated scenarios: s1,s2,s3,s4,s5,s6,cluster"
    )
    parser.add_argument(
        "--no-cluster",
        action="store_true",
        help="leave out the cluster rows (bench/cluster.py: two relays on PostgreSQL + Redis)",
    )
    parser.add_argument(
        "--skip-peer", action="store_true", help="run without the peer (no Node/Redis)"
    )
    parser.add_argument(
        "--results",
        default=None,
        help="write the results file here (default: bench/results/<date>-<host>.md for a full "
        "run of every scenario, none for --quick or --only); 'none' writes none",
    )
    parser.add_argument(
        "--relay-args",
        default="",
        help="extra relay.server flags for the relays of scenarios 1 (gRPC) to 6, e.g. "
        "--relay-args='--journal-interval-ms 200'",
    )
    parser.add_argument(
        "--resume-settle-s",
        type=float,
        default=0.0,
        help="scenario 4: wait this long between the 10,000th chunk and the resume (default 0: "
        "the resume races the relay's journal write of those chunks)",
    )
    parser.add_argument(
        "--note", default="", help="a line for the results file (e.g. 'shared machine')"
    )
    parser.add_argument(
        "--profile", default="", help="record py-spy profiles of the relay (s1-s5) into DIR"
    )
    parser.add_argument(
        "--profile-args",
        default="",
        help="more py-spy record flags, e.g. --profile-args='--native --gil'",
    )
    return parser.parse_args(argv)


async def amain(args: argparse.Namespace) -> int:
    sizes = QUICK if args.quick else FULL
    if args.runs:
        sizes = dataclasses.replace(sizes, runs=args.runs)
    started = datetime.datetime.now(datetime.UTC)
    began = time.monotonic()
    load_at_start = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="stream-relay-bench-") as tmp:
        bench = Bench(args, sizes, Path(tmp))
        try:
            await bench.run()
        finally:
            info = {"load average (1, 5, 15 min) at the start": load_at_start}
            info |= machine(bench.redis)
        text, missed = table(bench.results)
        note_lines = notes(bench.results, sizes, args.quick)
        print()
        print(text)
        print()
        for line in note_lines:
            print(f"- {line}")
        if bench.results.failures:
            print("\nFAILED:")
            for failure in bench.results.failures:
                print(f"- {failure}")
            print(f"(logs of every process: kept in {tmp}-logs)")
            shutil.copytree(bench.logs, f"{tmp}-logs", dirs_exist_ok=True)
        seconds = time.monotonic() - began
        target = args.results
        if target is None and not args.quick and not args.only:
            target = str(RESULTS_DIR / f"{started:%Y-%m-%d}-{info['host']}.md")
        if target and target != "none":
            write_results(
                Path(target),
                text,
                note_lines,
                info,
                bench.results,
                sys.argv[1:],
                started,
                seconds,
                args.note,
            )
            print(f"\nresults written to {target}")
        verdict = "FAILED" if bench.results.failures else "ok"
        print(
            f"\n{verdict}: {len(bench.results.failures)} failures, {missed} targets missed, "
            f"{seconds:.0f} s"
        )
    return 1 if bench.results.failures else 0


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(asyncio.run(amain(parse_args(argv))))


if __name__ == "__main__":
    main()
