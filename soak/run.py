"""The soak: a real relay process under concurrent clients, SIGKILLed and restarted, then checked.

One relay subprocess on a loopback port with its own temporary database. Workers, each seeded
from `--seed`:

- one driver per chat: Start (some superseding, some with a request id, some retried as a client
  whose answer was lost would), Stop (some naming the stream, some with a partial message),
  GetActive, ListMessages, Attach by chat; each started stream gets one to three readers;
- readers: Attach or an AttachMany subscription, from 0 or from an offset some reader has seen,
  batches of 1 to 512, leaving mid-stream and resuming from where they stood (or from an earlier
  offset), and resuming after a kill from the offset they had reached;
- late readers: attach to any stream seen so far, live or ended, from a random seen offset;
- the killer: SIGKILL now and then, a short outage, a restart on the same port and database.

Then it settles (readers finish, every chat is stopped, every stream replayed from 0, GetActive
and ListMessages of every chat read), stops the relay with SIGTERM, reads each stream's journal
from the database and hands everything to `soak.checker`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from relay.client import ManyReadersEvent, ReaderRefused, RelayClient
from relay.client.errors import RelayError
from relay.domain.model import ChunkBatch, StreamEnd, UIMessage
from relay.domain.multiplex import Subscribed
from relay.stores.sqlite import SqliteStore
from soak.checker import (
    CUT,
    DISCONNECTED,
    ENDED,
    ERROR,
    OPEN,
    REFUSED,
    STALLED,
    End,
    History,
    JournalEntry,
    ReaderLog,
    Report,
    StartRecord,
    StopRecord,
    StreamRecord,
    check,
)
from soak.process import ROOT, Life, ProcStats, RelayProcess, proc_stats

T = TypeVar("T")

CALL_TIMEOUT_S = 15.0  # a unary call
READ_DEADLINE_S = 60.0  # a whole Attach: the longest stream lasts a few seconds
DELAYS_MS = (3, 5, 10, 20)  # the echo producer's pause per chunk
# Statuses the relay answers on purpose; anything else is a transport failure, expected only
# when a kill explains it.
APPLICATION_CODES = frozenset(
    {
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "FAILED_PRECONDITION",
        "OUT_OF_RANGE",
        "RESOURCE_EXHAUSTED",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
    }
)


@dataclass(frozen=True, slots=True)
class Config:
    seconds: float = 60.0  # of load; settling and checking follow (about 10-20 s)
    streams: int = 16  # chats, each driven by a worker: the concurrent streams
    seed: int = 1
    late_readers: int = 3
    kills: int = 100  # at most this many SIGKILLs
    kill_first_s: tuple[float, float] = (4.0, 8.0)
    kill_every_s: tuple[float, float] = (6.0, 12.0)
    kill_margin_s: float = 5.0  # no kill in the last seconds of the load
    outage_s: tuple[float, float] = (0.1, 1.0)
    journal_interval_ms: float = 250.0
    loss_slack_s: float = 0.5
    max_ops: int = 100_000
    settle_timeout_s: float = 45.0
    python: str = sys.executable
    results_dir: Path | None = None
    progress: bool = True


@dataclass(slots=True)
class Outcome:
    report: Report
    history: History
    ops: Counter[str]
    lives: list[Life]
    soak_start: ProcStats | None
    soak_end: ProcStats | None
    elapsed_s: float
    config: Config
    summary: str = ""
    results_path: Path | None = None


@dataclass(frozen=True, slots=True)
class _Failed:
    code: str  # the status' name
    detail: str
    cut: bool  # a kill explains it


def _end(end: StreamEnd) -> End:
    message = None if end.message is None else end.message.to_json()
    return End(end.state.value, end.final_offset, end.error_message, message)


class Soak:
    def __init__(self, config: Config, relay: RelayProcess) -> None:
        self.config = config
        self.relay = relay
        self.history = History()
        self.ops: Counter[str] = Counter()
        self.up = asyncio.Event()
        self.life = 0  # the relay life now serving; kill i ends life i
        self.clients: list[RelayClient] = []
        self.seen: dict[str, int] = {}  # stream -> the furthest offset any reader reached
        self.stream_order: list[str] = []
        self.chat_streams: dict[str, list[str]] = {}
        self.chats = [f"soak-{config.seed}-{i}" for i in range(config.streams)]
        self.readers: set[asyncio.Task[None]] = set()
        self._reader_ids = itertools.count(1)
        self._message_ids = itertools.count(1)
        self._request_ids = itertools.count(1)
        self.began = time.monotonic()
        self.deadline = self.began + config.seconds

    @property
    def client(self) -> RelayClient:
        return self.clients[-1]

    def done(self) -> bool:
        return time.monotonic() >= self.deadline or self.ops.total() >= self.config.max_ops

    # -- the run -----------------------------------------------------------------------------

    async def run(self) -> None:
        await self.relay.start()
        self.clients.append(RelayClient(self.relay.target))
        self.up.set()
        workers = [asyncio.create_task(self.drive_chat(i, c)) for i, c in enumerate(self.chats)]
        workers += [
            asyncio.create_task(self.late_reader(i)) for i in range(self.config.late_readers)
        ]
        workers.append(asyncio.create_task(self.killer()))
        progress = asyncio.create_task(self.progress()) if self.config.progress else None
        try:
            await asyncio.gather(*workers)
            await self.settle()
        finally:
            for task in [*workers, *self.readers, *([progress] if progress else [])]:
                task.cancel()
            await asyncio.gather(*workers, *self.readers, return_exceptions=True)
            if progress is not None:
                await asyncio.gather(progress, return_exceptions=True)
            for client in self.clients:
                await client.close()

    async def progress(self) -> None:
        while True:
            await asyncio.sleep(10)
            print(
                f"  {time.monotonic() - self.began:5.0f} s: {self.ops.total()} operations, "
                f"{len(self.stream_order)} streams, {len(self.history.readers)} reader sessions, "
                f"{len(self.history.kills)} kills",
                file=sys.stderr,
                flush=True,
            )

    async def settle(self) -> None:
        """Lets readers finish, stops every chat, replays every stream, reads every chat."""
        if self.readers:
            _, pending = await asyncio.wait(self.readers, timeout=self.config.settle_timeout_s)
            for task in pending:  # their logs stay open: the checker reports them
                task.cancel()
        for chat in self.chats:
            await self.stop(random.Random(0), chat, final=True)
        finals = asyncio.Semaphore(16)

        async def replay(stream_id: str) -> None:
            async with finals:
                reader = f"f{next(self._reader_ids)}"
                await self.read(reader, stream_id, 0, "final", 0, None)

        await asyncio.gather(*(replay(s) for s in self.stream_order))
        for chat in self.chats:
            await self.read_chat(chat)

    async def read_chat(self, chat: str) -> None:
        """The settled chat: its active stream (there should be none) and its messages."""
        active, failed = await self.call(
            "GetActive", lambda c: c.get_active(chat, timeout=CALL_TIMEOUT_S)
        )
        if failed is None:
            self.history.final_active[chat] = None if active is None else active.stream_id
        messages, _ = await self.call(
            "ListMessages", lambda c: c.list_messages(chat, timeout=CALL_TIMEOUT_S)
        )
        if messages is not None:
            self.history.persisted[chat] = [m.to_json() for m in messages]

    # -- calls -------------------------------------------------------------------------------

    async def call(
        self,
        what: str,
        make: Callable[[RelayClient], Awaitable[T]],
        expected: frozenset[str] = frozenset(),
    ) -> tuple[T | None, _Failed | None]:
        """A unary call on the live relay: its result, or why it failed. A failure no kill
        explains and `expected` does not list is recorded for the checker."""
        await self.up.wait()
        life = self.life
        self.ops[what] += 1
        try:
            return await make(self.client), None
        except RelayError as exc:
            code, detail = exc.code, exc.message
            if code in expected:
                return None, _Failed(code, detail, False)
            if code not in APPLICATION_CODES and self._killed_since(life):
                self.ops["cut"] += 1
                return None, _Failed(code, detail, True)
            self.history.unexpected.append(f"{what} (relay life {life}): {code}: {detail}")
            return None, _Failed(code, detail, False)

    def _killed_since(self, life: int) -> bool:
        return self.life != life or not self.up.is_set()

    # -- chats -------------------------------------------------------------------------------

    async def drive_chat(self, index: int, chat: str) -> None:
        rng = random.Random(f"{self.config.seed}:chat:{index}")
        ops: list[Callable[[random.Random, str], Coroutine[Any, Any, None]]] = [
            self.start,
            self.stop,
            self.get_active,
            self.list_messages,
            self.attach_chat,
            self.idle,
        ]
        weights = [40, 10, 12, 6, 6, 26]
        await asyncio.sleep(rng.uniform(0, 0.5))
        while not self.done():
            await rng.choices(ops, weights)[0](rng, chat)
            await asyncio.sleep(rng.uniform(0.05, 0.4))

    async def idle(self, rng: random.Random, chat: str) -> None:
        await asyncio.sleep(rng.uniform(0.2, 1.0))

    async def start(self, rng: random.Random, chat: str) -> None:
        supersede = rng.random() < 0.3
        request_id = f"req-{next(self._request_ids)}" if rng.random() < 0.4 else ""
        delay = rng.choice(DELAYS_MS)
        chunks = rng.randint(5, 200)
        n = next(self._message_ids)
        text = f"soak question {n} on {chat} " + " ".join(rng.choice(_WORDS) for _ in range(6))
        message = UIMessage(f"u{n}", "user", [{"type": "text", "text": text}])
        options = {"chunks": str(chunks), "delay_ms": str(delay)}
        expected = frozenset() if supersede else frozenset({"FAILED_PRECONDITION"})
        kind = "Start(supersede)" if supersede else "Start"
        if request_id:
            kind += "(request_id)"
        life = self.life

        async def attempt(what: str) -> tuple[Any, _Failed | None]:
            return await self.call(
                what,
                lambda c: c.start(
                    chat,
                    [message],
                    options=options,
                    supersede=supersede,
                    request_id=request_id,
                    timeout=CALL_TIMEOUT_S,
                ),
                expected,
            )

        result, failed = await attempt(kind)
        retries = 0
        while failed is not None and failed.cut and request_id and retries < 5:
            retries += 1  # the answer was lost in a kill: retry, the request id makes it safe
            result, failed = await attempt("Start(retry after kill)")
        if result is None:
            if failed is not None and failed.code == "FAILED_PRECONDITION":
                self.ops["Start refused: a live stream"] += 1
            return
        stream_id = str(result.stream_id)
        self._register(StreamRecord(stream_id, chat, life, delay, chunks, request_id))
        self.history.starts.append(
            StartRecord(
                chat, request_id, stream_id, result.deduplicated, result.superseded_stream_id
            )
        )
        if request_id and rng.random() < 0.3:  # a client retrying a Start it thinks was lost
            again, _ = await attempt("Start(retry, deduplicated)")
            if again is not None:
                self.history.starts.append(
                    StartRecord(chat, request_id, str(again.stream_id), again.deduplicated)
                )
        for _ in range(rng.choice((1, 1, 2, 3))):
            self._spawn_reader(rng.random(), stream_id)

    async def stop(self, rng: random.Random, chat: str, *, final: bool = False) -> None:
        streams = self.chat_streams.get(chat, [])
        named = streams[-1] if streams and not final and rng.random() < 0.6 else ""
        partial = None
        if named and rng.random() < 0.3:
            partial = UIMessage(
                f"msg_{named}", "assistant", [{"type": "text", "text": f"the soak stopped {named}"}]
            )
        what = "Stop(final)" if final else "Stop"
        for _ in range(5):
            result, failed = await self.call(
                what, lambda c: c.stop(chat, named, partial, timeout=CALL_TIMEOUT_S)
            )
            if result is not None:
                end = None if result.end is None else _end(result.end)
                self.history.stops.append(
                    StopRecord(chat, named, result.outcome.value, result.stream_id, end)
                )
                if result.stream_id:
                    self._discover(result.stream_id, chat)
                return
            if failed is None or not failed.cut:
                return
            what = "Stop(retry after kill)"  # Stop is idempotent

    async def get_active(self, rng: random.Random, chat: str) -> None:
        await self.call("GetActive", lambda c: c.get_active(chat, timeout=CALL_TIMEOUT_S))

    async def list_messages(self, rng: random.Random, chat: str) -> None:
        await self.call("ListMessages", lambda c: c.list_messages(chat, timeout=CALL_TIMEOUT_S))

    async def attach_chat(self, rng: random.Random, chat: str) -> None:
        self._spawn_reader(rng.random(), "", chat_id=chat)

    def _register(self, record: StreamRecord) -> None:
        if record.stream_id in self.history.streams:
            return
        self.history.streams[record.stream_id] = record
        self.stream_order.append(record.stream_id)
        self.chat_streams.setdefault(record.chat_id, []).append(record.stream_id)

    def _discover(self, stream_id: str, chat: str) -> None:
        """A stream learnt of by an Attach by chat or a Stop (its Start's answer was lost)."""
        if stream_id not in self.history.streams:
            self._register(StreamRecord(stream_id, chat, self.life, min(DELAYS_MS), None, "", True))

    # -- readers -----------------------------------------------------------------------------

    def _spawn_reader(self, seed: float, stream_id: str, *, chat_id: str = "") -> None:
        if self.done():
            return
        task = asyncio.create_task(self.reader_chain(seed, stream_id, chat_id=chat_id))
        self.readers.add(task)
        task.add_done_callback(self.readers.discard)

    async def late_reader(self, index: int) -> None:
        rng = random.Random(f"{self.config.seed}:late:{index}")
        while not self.done():
            await asyncio.sleep(rng.uniform(0.2, 1.0))
            if self.stream_order:
                stream_id = rng.choice(self.stream_order)
                offset = rng.randint(0, self.seen.get(stream_id, 0))
                await self.reader_chain(rng.random(), stream_id, from_offset=offset)

    async def reader_chain(
        self, seed: float, stream_id: str, *, from_offset: int = 0, chat_id: str = ""
    ) -> None:
        """One client following one stream: sessions that leave and resume, until an end."""
        rng = random.Random(seed)
        chain = next(self._reader_ids)
        offset = from_offset
        for session in range(1, 13):
            via = rng.choices(("attach", "attach-many"), (3, 1))[0]
            max_batch = rng.choice((0, 0, 1, 4, 16))
            stop_after = None if session > 5 or rng.random() < 0.5 else rng.randint(1, 40)
            log = await self.read(
                f"r{chain}.{session}", stream_id, offset, via, max_batch, stop_after, chat_id
            )
            if log.stream_id == "":
                return  # by chat, and the chat had no active stream
            stream_id, chat_id = log.stream_id, ""
            if log.outcome == DISCONNECTED:
                self.ops["disconnect"] += 1
                await asyncio.sleep(rng.uniform(0, 0.3))
                if rng.random() < 0.8:
                    offset = log.next_offset()
                    self.ops["resume from the last offset"] += 1
                else:
                    offset = rng.randint(0, self.seen.get(stream_id, 0))
                    self.ops["resume from a seen offset"] += 1
            elif log.outcome == CUT:
                await self.up.wait()
                offset = log.next_offset()
                self.ops["resume after a kill"] += 1
            else:
                return

    async def read(
        self,
        reader: str,
        stream_id: str,
        from_offset: int,
        via: str,
        max_batch: int,
        stop_after: int | None,
        chat_id: str = "",
    ) -> ReaderLog:
        await self.up.wait()
        life = self.life
        log = ReaderLog(reader, stream_id, from_offset, life, "attach-chat" if chat_id else via)
        self.ops[log.via] += 1
        client = self.client
        try:
            if via == "attach-many" and not chat_id:
                self.history.readers.append(log)
                await self._read_many(client, log, max_batch, stop_after)
            else:
                await self._read_one(client, log, max_batch, stop_after, chat_id)
        except RelayError as exc:
            code = exc.code
            if chat_id and not log.stream_id:  # refused before it named a stream
                if code == "NOT_FOUND":
                    self.ops["attach-chat: no active stream"] += 1
                elif code in APPLICATION_CODES or not self._killed_since(life):
                    self.history.unexpected.append(
                        f"Attach by chat {chat_id} (relay life {life}): {code}: {exc.message}"
                    )
                return log
            log.code, log.detail = code, exc.message
            if code in APPLICATION_CODES:
                log.outcome = REFUSED if not log.events else ERROR
            elif self._killed_since(life):
                log.outcome = CUT
            elif code == "DEADLINE_EXCEEDED":
                log.outcome = STALLED
            else:
                log.outcome = ERROR
        return log

    async def _read_one(
        self,
        client: RelayClient,
        log: ReaderLog,
        max_batch: int,
        stop_after: int | None,
        chat_id: str,
    ) -> None:
        if not chat_id:
            self.history.readers.append(log)
        attached = await client.open_attach(
            stream_id=log.stream_id,
            chat_id=chat_id,
            from_offset=log.from_offset,
            max_batch=max_batch,
            timeout=READ_DEADLINE_S,
        )
        if chat_id:
            log.stream_id = attached.stream_id
            self._discover(attached.stream_id, chat_id)
            self.history.readers.append(log)
        async with contextlib.aclosing(attached.events) as events:
            async for event in events:
                if self._record(log, event, stop_after):
                    return
        log.outcome = ENDED

    async def _read_many(
        self, client: RelayClient, log: ReaderLog, max_batch: int, stop_after: int | None
    ) -> None:
        async with client.attach_many(timeout=READ_DEADLINE_S) as readers:
            readers.subscribe(
                1, stream_id=log.stream_id, from_offset=log.from_offset, max_batch=max_batch
            )
            readers.done_subscribing()
            events = cast(AsyncGenerator[tuple[int, ManyReadersEvent], None], aiter(readers))
            async with contextlib.aclosing(events):
                async for _, event in events:
                    if isinstance(event, Subscribed):
                        continue
                    if isinstance(event, ReaderRefused):
                        log.outcome, log.code, log.detail = REFUSED, event.code, event.message
                        continue
                    if self._record(log, event, stop_after):
                        return
        if log.outcome == OPEN:
            log.outcome = ENDED

    def _record(
        self, log: ReaderLog, event: ChunkBatch | StreamEnd, stop_after: int | None
    ) -> bool:
        """Records an event; True when the reader leaves now (a planned disconnect)."""
        now = time.monotonic()
        if isinstance(event, StreamEnd):
            log.add_end(_end(event), now)
            return False
        log.add_batch(event.first_offset, event.chunks, now)
        reached = event.first_offset + len(event.chunks)
        if reached > self.seen.get(log.stream_id, 0):
            self.seen[log.stream_id] = reached
        if stop_after is not None and not log.ends and log.chunk_count >= stop_after:
            log.outcome = DISCONNECTED
            return True
        return False

    # -- kills -------------------------------------------------------------------------------

    async def killer(self) -> None:
        config = self.config
        rng = random.Random(f"{config.seed}:killer")
        wait = rng.uniform(*config.kill_first_s)
        while len(self.history.kills) < config.kills:
            await asyncio.sleep(wait)
            if time.monotonic() > self.deadline - config.kill_margin_s or self.done():
                return
            self.up.clear()
            self.history.kills.append(time.monotonic())
            await self.relay.kill()
            self.life += 1
            self.ops["SIGKILL"] += 1
            await asyncio.sleep(rng.uniform(*config.outage_s))
            await self.relay.start()
            self.clients.append(RelayClient(self.relay.target))
            self.ops["restart"] += 1
            self.up.set()
            wait = rng.uniform(*config.kill_every_s)


_WORDS = ("relay", "stream", "chunk", "offset", "journal", "resume", "answer", "window")


async def load_journal(db: Path, stream_ids: list[str]) -> dict[str, JournalEntry]:
    """Each stream as the store holds it, read through the store's own interface."""
    store = SqliteStore(db)
    await store.open()
    journal: dict[str, JournalEntry] = {}
    try:
        for stream_id in stream_ids:
            stored = await store.load(stream_id)
            if stored is not None:
                end = None if stored.end is None else _end(stored.end)
                journal[stream_id] = JournalEntry(stored.chat_id, stored.chunks, end)
    finally:
        await store.close()
    return journal


async def run_soak(config: Config) -> Outcome:
    soak_start = proc_stats()
    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="stream-relay-soak-"))
    relay = RelayProcess(config.python, workdir, journal_interval_ms=config.journal_interval_ms)
    soak = Soak(config, relay)
    try:
        await soak.run()
        await relay.terminate()
        ids = sorted(set(soak.history.streams) | {r.stream_id for r in soak.history.readers})
        soak.history.journal = await load_journal(relay.db, ids)
    finally:
        await relay.close()
        shutil.rmtree(workdir, ignore_errors=True)
    report = check(soak.history, config.journal_interval_ms / 1000, config.loss_slack_s)
    outcome = Outcome(
        report,
        soak.history,
        soak.ops,
        relay.lives,
        soak_start,
        proc_stats(),
        time.monotonic() - began,
        config,
    )
    outcome.summary = summarize(outcome)
    if config.results_dir is not None:
        outcome.results_path = write_results(outcome, config.results_dir)
    return outcome


# -- the summary ------------------------------------------------------------------------------


def _mib(kb: int) -> str:
    return f"{kb / 1024:.1f} MiB"


def _stats(stats: ProcStats | None) -> str:
    if stats is None:
        return "n/a"
    return f"RSS {_mib(stats.rss_kb)}, {stats.fds} fds"


def summarize(outcome: Outcome) -> str:
    report, history, config = outcome.report, outcome.history, outcome.config
    ops = outcome.ops
    lines = [
        f"stream-relay soak: seed {config.seed}, {config.seconds:g} s of load on "
        f"{config.streams} chats, journal window {config.journal_interval_ms:g} ms; "
        f"{outcome.elapsed_s:.0f} s in all",
        "",
        f"operations: {ops.total():,}",
    ]
    lines += [f"  {name}: {count:,}" for name, count in sorted(ops.items())]
    states = ", ".join(f"{state} {n}" for state, n in sorted(report.end_states.items()))
    outcomes = ", ".join(f"{name} {n:,}" for name, n in sorted(report.outcomes.items()))
    lines += [
        "",
        f"streams: {report.streams:,} ({states})",
        f"reader sessions: {report.readers:,} ({outcomes})",
        f"chunks checked: {report.chunk_deliveries:,} deliveries to readers (order, no gap, no "
        f"duplicate, agreement); {report.chunks_vs_journal:,} distinct chunks compared with the "
        f"journal; {report.ends_checked:,} ends compared with the stored end",
        f"kills: {len(history.kills)}; interrupted streams: {report.interrupted}; chunks seen "
        f"but not journaled: {report.lost_chunks} in all, at most {report.max_lost} in one "
        f"stream, the first of them at most {report.max_loss_age_s:.3f} s before its kill "
        f"(window {config.journal_interval_ms / 1000:g} s + {config.loss_slack_s:g} s slack)",
        "",
        "relay process (per life: at start -> at end; peak = VmHWM):",
    ]
    for life in outcome.lives:
        peak = _mib(life.at_end.hwm_kb) if life.at_end else "n/a"
        cpu = f"{life.at_end.cpu_s:.1f} s CPU; " if life.at_end else ""
        lines.append(
            f"  life {life.index} (pid {life.pid}): up in {life.startup_s:.2f} s; "
            f"{_stats(life.at_start)} -> {_stats(life.at_end)}; peak {peak}; {cpu}"
            f"ended by {life.ended_by} (exit {life.exit_code}); "
            f"{len(life.error_lines)} error log lines"
        )
    peak_kb = max((life.at_end.hwm_kb for life in outcome.lives if life.at_end), default=0)
    first, last = outcome.lives[0] if outcome.lives else None, outcome.lives[-1:]
    before = _stats(first.at_start) if first else "n/a"
    after = _stats(last[0].at_end) if last else "n/a"
    lines.append(
        f"  before (first life, started): {before}; after (last life, settled, before "
        f"SIGTERM): {after}; peak RSS over all lives: {_mib(peak_kb)}"
    )
    soak_peak = _mib(outcome.soak_end.hwm_kb) if outcome.soak_end else "n/a"
    soak_cpu = f"; {outcome.soak_end.cpu_s:.1f} s CPU" if outcome.soak_end else ""
    lines.append(
        f"soak process (the clients and the checker): {_stats(outcome.soak_start)} -> "
        f"{_stats(outcome.soak_end)}; peak {soak_peak}{soak_cpu}"
    )
    errors = Counter(line for life in outcome.lives for line in life.error_lines)
    if errors:
        lines.append("relay error log lines (count, message):")
        lines += [f"  {n} x {line}" for line, n in errors.most_common(10)]
    kinds = Counter(v.kind for v in report.violations)
    lines += ["", f"violations: {len(report.violations)}"]
    if kinds:
        lines.append("  by kind: " + ", ".join(f"{k} {n}" for k, n in kinds.most_common()))
        shown = report.violations[:40]
        lines += [f"  {v}" for v in shown]
        if len(report.violations) > len(shown):
            lines.append(f"  ... and {len(report.violations) - len(shown)} more")
    return "\n".join(lines)


def write_results(outcome: Outcome, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    path = directory / f"{now:%Y-%m-%d}.md"
    config = outcome.config
    command = (
        f".venv/bin/python -m soak --seconds {config.seconds:g} --streams {config.streams} "
        f"--seed {config.seed}"
    )
    path.write_text(
        f"# Soak, {now:%Y-%m-%d %H:%M} UTC\n\n`{command}` on {_revision()}\n\n"
        f"```\n{outcome.summary}\n```\n"
    )
    return path


def _revision() -> str:
    """The commit the relay ran from, and whether relay/ had uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "relay"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "an unknown revision"
    if not commit:
        return "an unknown revision"
    return f"commit {commit}" + (" with uncommitted changes in relay/" if dirty else "")


DEFAULT_RESULTS = ROOT / "soak" / "results"
