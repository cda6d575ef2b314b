"""Fixtures: a real relay behind a real grpc.aio server on an ephemeral port, and a producer the
test drives chunk by chunk, so every race is provoked on purpose rather than by timing."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from relay.client import RelayClient
from relay.domain.core import Relay
from relay.domain.model import ChunkBatch, JsonObject, Limits, StreamEnd, UIMessage
from relay.domain.ports import ChatStore, StreamLog
from relay.producers import EchoProducer, Producer, ProduceRequest, ProducerRegistry
from relay.server import RunningServer, start_server
from relay.stores.postgres import PostgresChatStore
from relay.stores.redis_log import RedisStreamLog
from relay.stores.sqlite import SqliteStore
from tests.postgres_server import postgres_dsn  # noqa: F401 (a fixture, for cluster mode)
from tests.redis_server import redis_prefix, redis_url  # noqa: F401 (fixtures, for cluster mode)

ROOT = Path(__file__).resolve().parent.parent
END_OF_SCRIPT = None


@dataclass
class Script:
    """One scripted stream: the test puts chunks in `feed`; None ends it, an Exception is raised."""

    feed: asyncio.Queue[JsonObject | Exception | None] = field(default_factory=asyncio.Queue)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    request: ProduceRequest | None = None

    def put(self, *chunks: JsonObject | Exception | None) -> None:
        for chunk in chunks:
            self.feed.put_nowait(chunk)


class ScriptedProducer:
    def __init__(self) -> None:
        self.scripts: dict[str, Script] = {}

    def script(self, stream_id: str) -> Script:
        return self.scripts.setdefault(stream_id, Script())

    def check_options(self, options: Mapping[str, str]) -> None:
        pass

    async def generate(self, request: ProduceRequest) -> AsyncGenerator[JsonObject, None]:
        script = self.script(request.stream_id)
        script.request = request
        script.started.set()
        try:
            while (chunk := await script.feed.get()) is not END_OF_SCRIPT:
                if isinstance(chunk, Exception):
                    raise chunk
                yield chunk
        except asyncio.CancelledError:
            script.cancelled.set()
            raise
        finally:
            script.closed.set()


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Env:
    relay: Relay
    client: RelayClient
    scripted: ScriptedProducer
    clock: FakeClock
    server: RunningServer
    db: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"


def text_chunks(n: int, message_id: str = "msg-1") -> list[JsonObject]:
    """A well-formed answer of `n` text deltas: start, start-step, text-start, deltas..."""
    head: list[JsonObject] = [
        {"type": "start", "messageId": message_id},
        {"type": "start-step"},
        {"type": "text-start", "id": "t"},
    ]
    return head + [{"type": "text-delta", "id": "t", "delta": f"w{i} "} for i in range(n)]


def user(text: str, message_id: str = "u1") -> UIMessage:
    return UIMessage(message_id, "user", [{"type": "text", "text": text}])


def ended_as(
    message: UIMessage, state: str = "stopped", reason: str = "stop", error: str = ""
) -> UIMessage:
    """`message` as the relay persists it with an end that is not COMPLETED: the same parts,
    `metadata.streamEnd` added (relay.domain.assembler.stream_end)."""
    stream_end: JsonObject = {"state": state, "reason": reason}
    if error:
        stream_end["error"] = error
    metadata = {**(message.metadata or {}), "streamEnd": stream_end}
    return UIMessage(message.id, message.role, message.parts, metadata)


async def collect(events: AsyncIterator[ChunkBatch | StreamEnd]) -> tuple[list[str], StreamEnd]:
    """Reads a whole Attach, checking that offsets run without gap or duplicate."""
    chunks: list[str] = []
    first: int | None = None
    async for event in events:
        if isinstance(event, StreamEnd):
            return chunks, event
        if first is None:
            first = event.first_offset
        assert event.first_offset == first + len(chunks), "gap or duplicate in offsets"
        chunks.extend(event.chunks)
    raise AssertionError("the Attach ended without a StreamEnd")


async def read_chunks(events: AsyncIterator[ChunkBatch | StreamEnd], n: int) -> list[str]:
    """Reads exactly until `n` chunks have arrived (a batch may bring more)."""
    chunks: list[str] = []
    while len(chunks) < n:
        event = await anext(events)
        assert isinstance(event, ChunkBatch), f"expected chunks, got {event}"
        chunks.extend(event.chunks)
    return chunks


async def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Waits for a condition the test cannot be told about directly (e.g. a server-side count)."""
    async with asyncio.timeout(timeout):
        # A poll, on purpose: the condition is server-side state with no event to wait on.
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def limits() -> Limits:
    return Limits()


@pytest.fixture
def relay_mode() -> str:
    """Which stores `env` runs on: "embedded" (SQLite), or "cluster" (PostgreSQL and Redis) in
    the modules that override this fixture with both params."""
    return "embedded"


def cluster_stores(request: pytest.FixtureRequest) -> tuple[ChatStore, StreamLog]:
    """A chat store in a fresh PostgreSQL database and a stream log under a fresh Redis key
    prefix, both removed after the test."""
    dsn = request.getfixturevalue("postgres_dsn")
    url = request.getfixturevalue("redis_url")
    prefix = request.getfixturevalue("redis_prefix")
    return PostgresChatStore(dsn), RedisStreamLog(url, prefix)


@pytest.fixture
async def env(
    tmp_path: Path,
    clock: FakeClock,
    limits: Limits,
    relay_mode: str,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Env]:
    scripted = ScriptedProducer()
    db = tmp_path / "relay.sqlite3"
    producers: dict[str, Producer] = {"echo": EchoProducer(delay_ms=0), "scripted": scripted}
    store, log = cluster_stores(request) if relay_mode == "cluster" else (None, None)
    async with running_relay(db, producers, limits, clock, store=store, log=log) as running:
        yield Env(running.relay, running.client, scripted, clock, running.server, db)


@dataclass
class GatewayProcess:
    """`python -m gateway.server --embedded-relay` in a subprocess: the stack as users run it."""

    url: str
    db: Path
    process: asyncio.subprocess.Process

    @property
    def address(self) -> str:
        return self.url.removeprefix("http://")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@asynccontextmanager
async def python_service(
    *args: str, ready: Callable[[dict[str, Any]], bool], env: Mapping[str, str] | None = None
) -> AsyncIterator[tuple[asyncio.subprocess.Process, dict[str, Any]]]:
    """`python <args>` logging JSON lines on stderr; yields once a line satisfies `ready` (with that
    line). On exit it is asked to stop (SIGTERM), then killed if it does not within 15 s."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        "--log-format",
        "json",
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    try:
        async with asyncio.timeout(30):
            while True:
                line = await process.stderr.readline()
                assert line, f"`{' '.join(args)}` exited before it was ready"
                entry = json.loads(line)
                if ready(entry):
                    break
        yield process, entry
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                async with asyncio.timeout(15):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


@asynccontextmanager
async def gateway_process(
    tmp_path: Path,
    *flags: str,
    echo_delay_ms: int = 20,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[GatewayProcess]:
    """`python -m gateway.server --embedded-relay` with `flags` (and RELAY_* settings in `env`)
    on a free port, its relay's database in `tmp_path`."""
    port = free_port()
    db = tmp_path / "gateway-relay.sqlite3"
    async with python_service(
        "-m",
        "gateway.server",
        "--embedded-relay",
        "--relay",
        "127.0.0.1:0",
        "--address",
        f"127.0.0.1:{port}",
        *flags,
        ready=lambda entry: entry["message"].startswith("Uvicorn running on"),
        env={"RELAY_DB": str(db), "RELAY_ECHO_DELAY_MS": str(echo_delay_ms), **(env or {})},
    ) as (process, _):
        yield GatewayProcess(f"http://127.0.0.1:{port}", db, process)


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[GatewayProcess]:
    """The gateway and an embedded relay (echo producer, 20 ms per chunk) on a free port."""
    async with gateway_process(tmp_path) as running:
        yield running


NODE_MIN_MAJOR = 18


def node_with_packages(directory: Path, why: str) -> str:
    """Node on PATH, with `directory`'s npm packages installed (again when package.json changes).

    Skips only when Node itself is absent or too old; a failing install fails the test. No lock
    file: package.json pins what matters, and the e2e tests want each major's newest release.
    """
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip(f"node and npm must be on PATH: {why} (Node.js >= {NODE_MIN_MAJOR})")
    version = subprocess.run(
        [node, "--version"], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()
    major = re.match(r"v(\d+)", version)
    if major is None or int(major.group(1)) < NODE_MIN_MAJOR:
        pytest.skip(f"{why}: needs Node.js >= {NODE_MIN_MAJOR}; found {version}")
    stamp = directory / "node_modules" / ".stream-relay-installed"
    if not stamp.exists() or stamp.stat().st_mtime < (directory / "package.json").stat().st_mtime:
        installed = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--no-package-lock"],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if installed.returncode != 0:
            pytest.fail(f"npm install in {directory} failed:\n{installed.stderr[-3000:]}")
        stamp.touch()
    return node


@dataclass
class RunningRelay:
    relay: Relay
    server: RunningServer
    client: RelayClient


@asynccontextmanager
async def running_relay(
    db: Path,
    producers: Mapping[str, Producer],
    limits: Limits | None = None,
    clock: Callable[[], float] | None = None,
    store: ChatStore | None = None,
    health_interval: float = 1.0,
    log: StreamLog | None = None,
) -> AsyncIterator[RunningRelay]:
    """A relay (default producer `echo`) behind a real grpc.aio server on an ephemeral port."""
    relay = Relay(
        store or SqliteStore(db),
        ProducerRegistry(producers, "echo"),
        limits,
        log=log,
        retention=600,
        journal_interval=0.001,
        sweep_interval=None,
        health_interval=health_interval,
        retry_backoff=(0.001, 0.05),
        clock=clock or time.time,
    )
    await relay.open()
    server = await start_server(relay, "127.0.0.1:0")
    client = RelayClient(f"127.0.0.1:{server.port}")
    try:
        yield RunningRelay(relay, server, client)
    finally:
        await client.close()
        await server.stop(grace=0)
        await relay.close(grace=0)
