"""The readers (and the calls around them), each job in its own process, apart from the relay.

    python -m bench.worker '{"kind": "fanout", "address": "127.0.0.1:50051", ...}'

The orchestrator (bench.run) drives a job over stdin/stdout JSON lines: before each timed part
the worker prints {"event": "ready", ...} and waits for {"cmd": "go"} (the orchestrator reads
the relay's CPU or RSS, or releases the gated producers, meanwhile); after it, {"event": "done",
...} with the figures. Every chunk is checked: its offset follows the last one and its content is
the one the producer made at that offset. A gap, a duplicate or a wrong end prints
{"event": "error", "gap": true, ...} and exits 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sys
import time
import traceback
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

from bench import sse
from bench.common import (
    BENCH_START,
    ECHO_QUESTION,
    EchoChecker,
    GapError,
    emit,
    latency_summary,
    now_us,
    parse_bench_chunk,
    percentile,
    record_seq,
)
from relay.client import RelayClient
from relay.domain.model import ChunkBatch, StreamEnd, StreamState, UIMessage
from relay.domain.multiplex import Subscribed
from relay.v1 import relay_pb2 as pb

Job = dict[str, Any]
Events = AsyncGenerator[ChunkBatch | StreamEnd, None]

RESUME_TIMEOUT_S = 30.0  # a resume that has not got every chunk by then has lost some

QUESTION = UIMessage("u1", "user", [{"type": "text", "text": ECHO_QUESTION}])
HELLO = UIMessage("u1", "user", [{"type": "text", "text": "bench"}])


def emit_throughput(run: int, chunks: int, seconds: float, total_bytes: int, **more: Any) -> None:
    """A run's result: chunks, seconds, chunks/s and mean chunk size, plus any `more` figures."""
    emit(
        "done",
        run=run,
        chunks=chunks,
        seconds=seconds,
        rate=chunks / seconds,
        chunk_bytes=total_bytes / chunks,
        **more,
    )


async def checkpoint(phase: str, **fields: Any) -> None:
    emit("ready", phase=phase, **fields)
    line = await asyncio.to_thread(sys.stdin.readline)
    if not line:
        raise SystemExit("the orchestrator went away")
    command = json.loads(line)
    if command.get("cmd") != "go":
        raise SystemExit(f"unexpected command {command}")


def runs_of(job: Job) -> list[int]:
    """Run numbers: -1 is the warm-up (reported, never counted)."""
    return ([-1] if job.get("warmup", True) else []) + list(range(job["runs"]))


def chat_id(label: str) -> str:
    return f"bench-{label}-{secrets.token_hex(4)}"


def bench_options(chunks: int, epoch: int, **extra: Any) -> dict[str, str]:
    """Start options of a bench stream of `chunks` chunks: the text-start, then the deltas."""
    options = {"count": str(chunks - 1), "epoch_ns": str(epoch)}
    return options | {k: str(v) for k, v in extra.items()}


# --- reading and checking ---------------------------------------------------------------------


class BenchReader:
    """Follows one bench stream, checking every chunk; notes each chunk's latency."""

    def __init__(self, epoch: int, latencies: list[int], expect_end: StreamState | None) -> None:
        self.epoch = epoch
        self.latencies = latencies
        self.expect_end = expect_end
        self.received = 0
        self.messages = 0
        self.bytes = 0
        self.first_stamp = -1
        self.last_receipt = -1
        self.end: StreamEnd | None = None
        self.end_ns = 0

    def batch(self, event: ChunkBatch) -> None:
        now = now_us(self.epoch)
        self.messages += 1
        if event.first_offset != self.received:
            raise GapError(f"batch at offset {event.first_offset}, expected {self.received}")
        latencies = self.latencies
        for chunk in event.chunks:
            self.bytes += len(chunk)
            if self.received == 0:
                if chunk != BENCH_START:
                    raise GapError(f"offset 0 holds {chunk[:60]!r}, not the text-start")
                self.received = 1
                continue
            seq, stamp = parse_bench_chunk(chunk)
            if seq != self.received:
                raise GapError(f"offset {self.received} holds chunk {seq}")
            if self.first_stamp < 0:
                self.first_stamp = stamp
            latencies.append(now - stamp)
            self.received += 1
        self.last_receipt = now

    def finish(self, end: StreamEnd) -> None:
        self.end_ns = time.monotonic_ns()
        self.end = end
        if end.final_offset != self.received:
            raise GapError(
                f"the end says {end.final_offset} chunks, the reader got {self.received}"
            )
        if self.expect_end is not None and end.state is not self.expect_end:
            raise GapError(f"ended {end.state.value}, expected {self.expect_end.value}")

    async def follow(self, events: Events, until: int | None = None) -> None:
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, ChunkBatch):
                    self.batch(event)
                    if until is not None and self.received >= until:
                        return
                else:
                    self.finish(event)
                    return
        raise GapError("the stream ended without an end event")


async def wait_offset(client: RelayClient, chat: str, offset: int, timeout: float = 60) -> None:
    """Until the chat's live stream holds `offset` chunks. Polls: the relay has no "tell me when"
    call, and a poll every 5 ms costs it nothing."""
    deadline = time.monotonic() + timeout
    while (active := await client.get_active(chat)) is None or active.offset < offset:
        if time.monotonic() > deadline:
            held = "no live stream" if active is None else f"{active.offset} chunks"
            raise GapError(f"after {timeout:.0f} s the stream holds {held}, not {offset}")
        await asyncio.sleep(0.005)


# --- jobs -------------------------------------------------------------------------------------


async def relay_echo(job: Job) -> None:
    """Scenario 1 through gRPC: the echo producer (inside the relay), or the producer `producer`
    answering like it with other first `words`; one reader following."""
    async with RelayClient(job["address"]) as client:
        await client.get_stats()
        for run in runs_of(job):
            count = job["warmup_chunks"] if run < 0 else job["chunks"]
            checker = EchoChecker(count, job.get("words", ["You", "said:"]))
            await checkpoint("run", run=run)
            began = time.perf_counter()
            started = await client.start(
                chat_id("s1"),
                [QUESTION],
                producer=job.get("producer", ""),
                options={"chunks": str(count), "delay_ms": "0"},
            )
            received = 0
            async for event in client.attach(stream_id=started.stream_id):
                if isinstance(event, ChunkBatch):
                    if event.first_offset != received:
                        raise GapError(f"batch at {event.first_offset}, expected {received}")
                    for chunk in event.chunks:
                        checker.check(received, chunk)
                        received += 1
                elif event.state is not StreamState.COMPLETED or event.final_offset != received:
                    raise GapError(f"end {event.state.value} at {event.final_offset}")
            seconds = time.perf_counter() - began
            if received != checker.total:
                raise GapError(f"got {received} chunks of {checker.total}")
            emit_throughput(run, received, seconds, checker.bytes)


async def sse_echo(job: Job) -> None:
    """Scenario 1 through the gateway: POST /api/chat, the echo answer as SSE."""
    for run in runs_of(job):
        count = job["warmup_chunks"] if run < 0 else job["chunks"]
        checker = EchoChecker(count)
        body = {
            "id": chat_id("s1-sse"),
            "trigger": "submit-message",
            "messages": [{"id": "u1", "role": "user", "parts": QUESTION.parts}],
            "options": {"chunks": str(count), "delay_ms": "0"},
        }
        connection = await sse.Connection.open(job["http"])
        await checkpoint("run", run=run)
        began = time.perf_counter()
        status, headers = await connection.request("POST", "/api/chat", body)
        if status != 200:
            raise RuntimeError(f"POST /api/chat answered {status}")
        received, done = 0, False
        async for batch in sse.events(connection.body(headers)):
            for offset, data in batch:
                if offset < 0:
                    if data != b"[DONE]":
                        raise GapError(f"the stream ended with {data[:80]!r}")
                    done = True
                    continue
                if offset != received:
                    raise GapError(f"event id {offset}, expected {received}")
                checker.check(offset, data.decode())
                received += 1
        seconds = time.perf_counter() - began
        await connection.close()
        if not done or received != checker.total:
            raise GapError(f"got {received} events of {checker.total}, [DONE] {done}")
        emit_throughput(run, received, seconds, checker.bytes)


async def ceiling(job: Job) -> None:
    """Scenario 1 on the ceiling: n chunks, `batch` per message."""
    import grpc

    async with grpc.aio.insecure_channel(job["address"]) as channel:
        call_stream = channel.unary_stream(
            "/bench.Ceiling/Stream",
            request_serializer=lambda request: json.dumps(request).encode(),
            response_deserializer=pb.AttachResponse.FromString,
        )
        async for _ in call_stream({"chunks": 1, "batch": 1}):
            pass
        for run in runs_of(job):
            count = job["warmup_chunks"] if run < 0 else job["chunks"]
            await checkpoint("run", run=run)
            began = time.perf_counter()
            received = messages = 0
            async for response in call_stream({"chunks": count, "batch": job["batch"]}):
                batch = response.chunks
                if batch.first_offset != received:
                    raise GapError(f"batch at {batch.first_offset}, expected {received}")
                for chunk in batch.chunks:
                    if record_seq(chunk) != received:
                        raise GapError(f"offset {received} holds chunk {record_seq(chunk)}")
                    received += 1
                messages += 1
            seconds = time.perf_counter() - began
            if received != count:
                raise GapError(f"got {received} chunks of {count}")
            emit(
                "done",
                run=run,
                chunks=received,
                messages=messages,
                seconds=seconds,
                rate=received / seconds,
                message_rate=messages / seconds,
            )


async def fanout(job: Job) -> None:
    """Scenarios 2 and 3: `streams` bench streams, one reader each, released together."""
    epoch = job["epoch"]
    async with RelayClient(job["address"]) as client:
        await client.get_stats()
        for run in runs_of(job):
            streams = job["warmup_streams"] if run < 0 else job["streams"]
            count = job["warmup_count"] if run < 0 else job["count"]
            options = bench_options(count, epoch, rate=job["rate"], gate=1)
            started = await asyncio.gather(
                *(
                    client.start(chat_id(f"fan{i}"), [HELLO], producer="bench", options=options)
                    for i in range(streams)
                )
            )
            latencies: list[int] = []
            readers = [BenchReader(epoch, latencies, StreamState.COMPLETED) for _ in started]
            if job.get("many"):
                await follow_on_one_call(client, [s.stream_id for s in started], readers, run)
            else:
                attached = await asyncio.gather(
                    *(client.open_attach(stream_id=s.stream_id) for s in started)
                )
                tasks = [
                    asyncio.create_task(r.follow(a.events))
                    for r, a in zip(readers, attached, strict=True)
                ]
                await checkpoint("run", run=run)
                await asyncio.gather(*tasks)
            total = sum(r.received for r in readers)
            if total != streams * count:
                raise GapError(f"got {total} chunks of {streams * count}")
            first = min(r.first_stamp for r in readers)
            last = max(r.last_receipt for r in readers)
            emit_throughput(
                run,
                total,
                (last - first) / 1e6,
                sum(r.bytes for r in readers),
                chunks_per_message=total / sum(r.messages for r in readers),
                **latency_summary(latencies),
            )


async def follow_on_one_call(
    client: RelayClient, stream_ids: list[str], readers: list[BenchReader], run: int
) -> None:
    """Every reader a subscription of one AttachMany call (tag = the reader's index)."""
    async with client.attach_many() as call:
        for tag, stream_id in enumerate(stream_ids):
            call.subscribe(tag, stream_id=stream_id)
        events = aiter(call)
        for _ in stream_ids:
            tag, event = await anext(events)
            if not isinstance(event, Subscribed):
                raise GapError(f"reader {tag}: {event} before being subscribed")
        await checkpoint("run", run=run)
        ended = 0
        while ended < len(readers):
            tag, event = await anext(events)
            if isinstance(event, ChunkBatch):
                readers[tag].batch(event)
            elif isinstance(event, StreamEnd):
                readers[tag].finish(event)
                ended += 1
            else:
                raise GapError(f"reader {tag}: unexpected {event}")


async def resume(job: Job) -> None:
    """Scenario 4 through gRPC: a new reader on an open stream of `count` chunks."""
    epoch = job["epoch"]
    async with RelayClient(job["address"]) as client:
        await client.get_stats()
        for run in runs_of(job):
            count = job["count"]
            chat = chat_id("resume")
            started = await client.start(
                chat, [HELLO], producer="bench", options=bench_options(count, epoch, hold_s=600)
            )
            await wait_offset(client, chat, count)
            await asyncio.sleep(job.get("settle_s", 0))
            reader = BenchReader(epoch, [], None)
            await checkpoint("run", run=run)
            # Timed: until the reader holds every chunk; each is checked right after.
            began = time.perf_counter()
            attached = await client.open_attach(stream_id=started.stream_id)
            batches: list[ChunkBatch] = []
            held = 0
            try:
                async with asyncio.timeout(RESUME_TIMEOUT_S):
                    async for event in attached.events:
                        if not isinstance(event, ChunkBatch):
                            raise GapError(f"the open stream ended: {event}")
                        if not batches:
                            first = time.perf_counter()
                        batches.append(event)
                        held += len(event.chunks)
                        if held >= count:
                            break
            except TimeoutError:
                raise GapError(f"the resume got {held} of {count} chunks") from None
            done = time.perf_counter()
            await attached.events.aclose()
            for batch in batches:
                reader.batch(batch)
            await client.stop(chat, started.stream_id)
            emit(
                "done",
                run=run,
                chunks=reader.received,
                first_ms=(first - began) * 1000,
                all_ms=(done - began) * 1000,
            )


async def resume_sse(job: Job) -> None:
    """Scenario 4 through the gateway: GET /api/chat/{id}/stream?replay=plain on an open stream
    (every chunk as an event, each checked; the compacted default is scenario R's,
    bench/compact_resume.py)."""
    epoch = job["epoch"]
    async with RelayClient(job["address"]) as client:
        for run in runs_of(job):
            count = job["count"]
            chat = chat_id("resume-sse")
            started = await client.start(
                chat, [HELLO], producer="bench", options=bench_options(count, epoch, hold_s=600)
            )
            await wait_offset(client, chat, count)
            await asyncio.sleep(job.get("settle_s", 0))
            connection = await sse.Connection.open(job["http"])
            await checkpoint("run", run=run)
            # Timed: until the reader holds every event; each is checked right after.
            began = time.perf_counter()
            path = f"/api/chat/{chat}/stream?replay=plain"
            status, headers = await connection.request("GET", path)
            if status != 200:
                raise RuntimeError(f"GET /api/chat/{chat}/stream answered {status}")
            first, held, pieces = 0.0, 0, []
            try:
                async with asyncio.timeout(RESUME_TIMEOUT_S):
                    async for data in connection.body(headers):
                        if not first:
                            first = time.perf_counter()
                        pieces.append(data)
                        held += data.count(b"id: ")  # the gateway writes whole events
                        if held >= count:
                            break
            except TimeoutError:
                raise GapError(f"the resume got {held} of {count} events") from None
            done = time.perf_counter()
            await connection.close()
            received = 0

            async for batch in sse.events(_replay(pieces)):
                for offset, data in batch:
                    if offset != received:
                        raise GapError(f"event id {offset}, expected {received}")
                    if offset == 0:
                        if data.decode() != BENCH_START:
                            raise GapError(f"event 0 holds {data[:60]!r}, not the text-start")
                    elif (seq := parse_bench_chunk(data.decode())[0]) != received:
                        raise GapError(f"event {offset} holds chunk {seq}")
                    received += 1
            await client.stop(chat, started.stream_id)
            if received != count:
                raise GapError(f"got {received} events of {count}")
            emit(
                "done",
                run=run,
                chunks=received,
                first_ms=(first - began) * 1000,
                all_ms=(done - began) * 1000,
            )


async def _replay(pieces: list[bytes]) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


async def stop(job: Job) -> None:
    """Scenario 5: `readers` readers on a live stream; Stop; when does each see the end?"""
    epoch = job["epoch"]
    async with RelayClient(job["address"]) as client:
        await client.get_stats()
        for run in runs_of(job):
            chat = chat_id("stop")
            started = await client.start(
                chat,
                [HELLO],
                producer="bench",
                options=bench_options(1_000_000, epoch, rate=job["rate"]),
            )
            attached = await asyncio.gather(
                *(client.open_attach(stream_id=started.stream_id) for _ in range(job["readers"]))
            )
            readers = [BenchReader(epoch, [], StreamState.STOPPED) for _ in attached]
            tasks = [
                asyncio.create_task(r.follow(a.events))
                for r, a in zip(readers, attached, strict=True)
            ]
            while min(r.received for r in readers) < 2:
                await asyncio.sleep(0.005)
                for task in tasks:
                    if task.done():
                        task.result()
            await checkpoint("run", run=run)
            began = time.monotonic_ns()
            result = await client.stop(chat, started.stream_id)
            returned = time.monotonic_ns()
            await asyncio.gather(*tasks)
            ends = sorted((r.end_ns - began) / 1e6 for r in readers)
            emit(
                "done",
                run=run,
                outcome=result.outcome.value,
                readers=len(readers),
                chunks=sum(r.received for r in readers),
                stop_call_ms=(returned - began) / 1e6,
                p50_ms=percentile(ends, 50),
                p99_ms=percentile(ends, 99),
                max_ms=ends[-1],
            )


async def echo_stream(client: RelayClient, count: int) -> None:
    """One whole echo stream of `count` deltas, read and checked to its end."""
    checker = EchoChecker(count)
    started = await client.start(
        chat_id("retain"), [QUESTION], options={"chunks": str(count), "delay_ms": "0"}
    )
    received = 0
    async for event in client.attach(stream_id=started.stream_id):
        if isinstance(event, ChunkBatch):
            if event.first_offset != received:
                raise GapError(f"batch at {event.first_offset}, expected {received}")
            for chunk in event.chunks:
                checker.check(received, chunk)
                received += 1
        elif event.state is not StreamState.COMPLETED or event.final_offset != checker.total:
            raise GapError(f"end {event.state.value} at {event.final_offset}")
    if received != checker.total:
        raise GapError(f"got {received} chunks of {checker.total}")


async def retain(job: Job) -> None:
    """Scenario 6a: finished 1,000-chunk echo streams, retained by the relay."""
    async with RelayClient(job["address"]) as client:
        limit = asyncio.Semaphore(16)

        async def one() -> None:
            async with limit:
                await echo_stream(client, job["count"])

        await asyncio.gather(*(one() for _ in range(job["warmup_streams"])))
        await checkpoint("before", retained=(await client.get_stats()).retained_streams)
        await asyncio.gather(*(one() for _ in range(job["streams"])))
        await asyncio.sleep(0.3)
        stats = await client.get_stats()
        await checkpoint("after", retained=stats.retained_streams, live=stats.live_streams)
        emit("done", run=0, streams=job["streams"])


async def idle_readers(job: Job) -> None:
    """Scenario 6b: readers attached to live streams that produce nothing more."""
    epoch = job["epoch"]
    async with RelayClient(job["address"]) as client:
        streams = []
        for _ in range(job["streams"]):
            chat = chat_id("idle")
            started = await client.start(
                chat, [HELLO], producer="bench", options=bench_options(1, epoch, hold_s=600)
            )
            await wait_offset(client, chat, 1)
            streams.append((chat, started.stream_id))
        pending: list[asyncio.Future[Any]] = []
        attached_events: list[Events] = []

        async def attach(count: int) -> None:
            for i in range(count):
                attached = await client.open_attach(stream_id=streams[i % len(streams)][1])
                first = await anext(attached.events)
                if not isinstance(first, ChunkBatch) or first.first_offset != 0:
                    raise GapError(f"an idle reader's first event is {first}")
                attached_events.append(attached.events)
                pending.append(asyncio.ensure_future(anext(attached.events)))

        async def detach() -> None:
            for future in pending:
                future.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for events in attached_events:
                await events.aclose()
            pending.clear()
            attached_events.clear()

        await attach(job["warmup_readers"])
        await detach()
        await asyncio.sleep(0.3)
        await checkpoint("before", readers=(await client.get_stats()).readers)
        await attach(job["readers"])
        await asyncio.sleep(0.5)
        await checkpoint("after", readers=(await client.get_stats()).readers)
        await detach()
        for chat, stream_id in streams:
            await client.stop(chat, stream_id)
        emit("done", run=0, readers=job["readers"])


async def frozen(job: Job) -> None:
    """Scenario 6c: one reader, attached; the orchestrator may SIGSTOP this process while the
    producer writes `count` chunks, then SIGCONT it: it must still get every chunk."""
    epoch = job["epoch"]
    async with RelayClient(job["address"]) as client:
        chat = chat_id("frozen")
        started = await client.start(
            chat, [HELLO], producer="bench", options=bench_options(job["count"], epoch, gate=1)
        )
        attached = await client.open_attach(stream_id=started.stream_id)
        reader = BenchReader(epoch, [], StreamState.COMPLETED)
        task = asyncio.create_task(reader.follow(attached.events))
        await checkpoint("attached", chat=chat, stream_id=started.stream_id)
        await task
        if reader.received != job["count"]:
            raise GapError(f"got {reader.received} chunks of {job['count']}")
        emit("done", run=0, chunks=reader.received)


JOBS: dict[str, Callable[[Job], Awaitable[None]]] = {
    "relay_echo": relay_echo,
    "sse_echo": sse_echo,
    "ceiling": ceiling,
    "fanout": fanout,
    "resume": resume,
    "resume_sse": resume_sse,
    "stop": stop,
    "retain": retain,
    "idle_readers": idle_readers,
    "frozen": frozen,
}


def main() -> None:
    job = json.loads(sys.argv[1])
    try:
        asyncio.run(JOBS[job["kind"]](job))
    except GapError as exc:
        emit("error", gap=True, message=str(exc))
        sys.exit(2)
    except Exception as exc:
        emit(
            "error", gap=False, message=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()
        )
        sys.exit(1)
    emit("finished")


if __name__ == "__main__":
    main()
