# ruff: noqa: RUF001
"""What every scenario of `python -m bench` shares: the subprocesses (Proc), Redis, the sizes,
the results (Results, Figure) and the table's rows (Row), and the Bench context a scenario runs
in: its readers (`worker`), relays (`relay_host`), the peer, py-spy profiles and the measured
parts (`part`, `drive`, `cpu_hooks`).

A scenario is a module (bench/s1_one_stream.py ... bench/s6_memory.py, bench/cluster.py) with
`run(bench)`, its `ROWS` and, for most, `notes(results)`; bench/run.py orders them and assembles
the table, the notes and the results file.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from bench.common import EPOCH_ENV, ROOT, cpu_seconds

PEER_DIR = ROOT / "bench" / "peer"
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
    b_rate: float  # scenario B: each answer's chunks/s
    b_window_s: float  # a step's measuring window
    b_first: int  # browsers of the first step
    b_most: int  # browsers at most
    b_bisect: int  # bisections after the first failing step
    b_profile: bool  # the cost step again under py-spy
    b_smoke: bool  # only one step per system, an answer per browser, quickly (bench-quick)


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
    b_rate=50,
    b_window_s=5,
    b_first=250,
    b_most=16_000,
    b_bisect=2,
    b_profile=True,
    b_smoke=False,
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
    b_rate=50,
    b_window_s=1.0,
    b_first=20,
    b_most=20,
    b_bisect=0,
    b_profile=False,
    b_smoke=True,
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


async def npm_installed(directory: Path, what: str, say: Callable[[str], None]) -> None:
    """`directory`'s Node packages, installed into its node_modules unless they are already,
    and again when its package.json changed since."""
    installed = directory / "node_modules" / ".bench-installed"
    manifest = directory / "package.json"
    if installed.exists() and installed.stat().st_mtime >= manifest.stat().st_mtime:
        return
    npm = shutil.which("npm")
    if npm is None:
        raise BenchFailure(f"npm is not on PATH: cannot install {what}")
    say(f"installing {what} into {directory.relative_to(ROOT)}/node_modules")
    done = await asyncio.create_subprocess_exec(
        npm,
        "install",
        "--no-audit",
        "--no-fund",
        "--no-package-lock",
        cwd=directory,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(done.communicate(), 300)
    if done.returncode != 0:
        raise BenchFailure(f"npm install in {directory} failed:\n{output.decode()}")
    installed.touch()


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
    async def profiled(self, process: Proc, label: str, directory: Path | None = None) -> Any:
        """py-spy on `process` while the block runs, into `directory` or --profile DIR."""
        if directory is None and not self.args.profile:
            yield
            return
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        out = (directory or Path(self.args.profile)) / f"{label}.txt"
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
        await npm_installed(PEER_DIR, "the peer (resumable-stream, redis)", self.say)
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

    # -- the parts of a scenario -------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def part(self, name: str) -> AsyncIterator[None]:
        """One measured part: a failure is recorded (and fails the run), the next part runs."""
        try:
            yield
        except BenchFailure as exc:
            self.results.failures.append(f"{name}: {exc}")
            self.say(f"  FAILED {name}: {exc}")


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


# --- the table's rows -------------------------------------------------------------------------


def fmt(figure: Figure | None, unit: str) -> str:
    if figure is None:
        return "–"

    def one(value: float) -> str:
        if unit in ("/s", "n"):  # "n": a count
            return f"{value:,.0f}"
        if unit == "×":  # a factor
            return f"{value:.1f}×" if value < 100 else f"{value:,.0f}×"
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
