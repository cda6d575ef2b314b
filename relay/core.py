"""The relay's domain: starts producers as tasks it owns, buffers their chunks, ends streams.

No gRPC here: `relay.service` translates RPCs to these calls and RelayError to status codes.

Ordering guarantees:
- A stream's end is persisted (message, state, compare-and-clear of the active stream) before any
  reader sees it, so a reader that gets the end and then lists messages finds the answer there.
  A failed write of the end is retried until it succeeds: readers wait, nothing is acknowledged
  that the store does not hold. Only a shutdown gives up, and then the stream ends interrupted.
- Start and Stop of one chat are serialized by a per-chat lock; a stream's end is claimed
  synchronously (`Stream.request_cancel`), so a Stop racing a completing producer has one winner,
  and a claimed producer is cancelled with no await in between.
- Start and Stop run to their end once begun, in tasks of their own: a caller that is cancelled
  (a client deadline) stops waiting, but never leaves a stream half-started or half-stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

from relay.assembler import MessageAssembler
from relay.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    Unavailable,
)
from relay.model import (
    ActiveStream,
    Attached,
    JsonObject,
    Limits,
    RelayStats,
    StartRequest,
    StartResult,
    StopOutcome,
    StopResult,
    StreamEnd,
    StreamState,
    UIMessage,
    check_chat_id,
    check_text,
    dump_json_bytes,
    is_stream_id,
    load_json,
    shown,
)
from relay.multiplex import Multiplexer
from relay.producers import Producer, ProduceRequest, ProducerFailed, ProducerRegistry
from relay.store import ChunkRun, Store
from relay.stream import CancelRequest, Phase, Stream, batch_size

log = logging.getLogger("relay")

INTERRUPTED_MESSAGE = "the relay stopped while the stream was live"

T = TypeVar("T")


def _lost_to_a_crash(stream: Stream) -> bool:
    """An interrupted stream may have delivered chunks its journal never got (the journal
    window): a reader resuming past its end gets the end, not an error it cannot act on."""
    return stream.end is not None and stream.end.state is StreamState.INTERRUPTED


class ChunkRejected(Exception):
    """A producer yielded a chunk the relay refuses; the stream fails with this message."""


class UnsavedEnds(Exception):
    """Raised by `Relay.close` when the store refused the ends of some streams until the end:
    the next start marks them interrupted, from what their journal holds."""


class Relay:
    def __init__(
        self,
        store: Store,
        producers: ProducerRegistry,
        limits: Limits | None = None,
        *,
        retention: float = 600.0,
        journal_interval: float = 0.25,
        sweep_interval: float | None = 30.0,
        health_interval: float = 1.0,
        retry_backoff: tuple[float, float] = (0.05, 2.0),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.producers = producers
        self.limits = limits or Limits()
        self.retention = retention
        self.journal_interval = journal_interval
        self.sweep_interval = sweep_interval
        self.health_interval = health_interval
        self.retry_backoff = retry_backoff  # first and longest pause between retried writes
        self.clock = clock
        self.streams: dict[str, Stream] = {}  # live streams and finished ones within retention
        self.live = 0
        self._closing = False
        self._chat_locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        self._dirty: dict[str, Stream] = {}  # streams with chunks not yet journaled
        self._journal_wakeup = asyncio.Event()
        self._give_up = asyncio.Event()  # set by close: stop retrying writes the store refuses
        self._unsaved_ends = 0
        self._healthy = True
        self._refused: set[str] = set()  # the writes the store refuses now: "probe", "journal"...
        self._health_changed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._starts: set[asyncio.Task[Any]] = set()  # Starts in flight: close waits for them
        self._background: list[asyncio.Task[None]] = []

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Opens the store and ends what a crashed relay left live; raises (with the store
        closed) if either fails, so a relay that cannot keep its promises never starts."""
        await self.store.open()
        try:
            await self._recover()
        except BaseException:
            await self.store.close()
            raise
        self._background.append(asyncio.create_task(self._journal_loop(), name="journal"))
        self._background.append(asyncio.create_task(self._health_loop(), name="health"))
        if self.sweep_interval is not None:
            self._background.append(asyncio.create_task(self._sweep_loop(), name="sweeper"))

    @property
    def healthy(self) -> bool:
        """False while the store refuses a write the relay needs (the health probe, the journal, a
        stream's end: disk full, read-only, gone) or when closing."""
        return self._healthy

    async def health_changed(self) -> bool:
        """Waits until `healthy` changes and returns the new value."""
        await self._health_changed.wait()
        self._health_changed.clear()
        return self._healthy

    async def close(self, grace: float = 10.0) -> None:
        """Refuses new Starts, lets producers finish within `grace` seconds, then interrupts the
        rest (persisting their partial messages) and closes the producers and the store.
        Idempotent."""
        if self._closing:
            return
        self._closing = True
        if self._starts:  # a Start past its check registers its stream before close looks
            await asyncio.wait(self._starts, timeout=max(grace, self.retry_backoff[1]))
        running = [s for s in self.streams.values() if s.phase is not Phase.ENDED]
        if running and grace > 0:
            await asyncio.wait([self._spawn(s.wait_ended()) for s in running], timeout=grace)
        for stream in running:
            if stream.request_cancel(CancelRequest(StreamState.INTERRUPTED)):
                stream.cancel_producer()
        if running:  # ends the store still refuses after a last round of retries are given up
            ending = [self._spawn(s.wait_ended()) for s in running]
            _, pending = await asyncio.wait(ending, timeout=max(grace, self.retry_backoff[1]))
            if pending:
                self._give_up.set()
                await asyncio.wait(pending)
        self._give_up.set()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._update_health()
        await self._flush_journal()
        await self.producers.close()
        await self.store.close()
        if self._unsaved_ends:
            raise UnsavedEnds(
                f"the store refused the end of {self._unsaved_ends} stream(s); the next start "
                "marks them interrupted"
            )

    async def _recover(self) -> None:
        """Ends the streams a crashed relay left live: interrupted, partial message persisted."""
        for stored in await self.store.live_streams():
            assembler = MessageAssembler(fallback_id=f"msg_{stored.stream_id}")
            for chunk in stored.chunks:
                assembler.add(load_json(chunk))
            end = StreamEnd(
                StreamState.INTERRUPTED,
                len(stored.chunks),
                INTERRUPTED_MESSAGE,
                assembler.message(),
            )
            tail = ChunkRun(stored.stream_id, len(stored.chunks), [])
            await self.store.end_stream(stored.stream_id, stored.chat_id, end, tail, self.clock())
            log.warning(
                "stream interrupted by a restart",
                extra={
                    "stream_id": stored.stream_id,
                    "chat_id": stored.chat_id,
                    "chunks": len(stored.chunks),
                },
            )

    # -- the RPCs ----------------------------------------------------------------------------

    async def start(self, request: StartRequest) -> StartResult:
        chat_id = check_chat_id(request.chat_id, self.limits)
        self._check_start(request)
        if self._closing:
            raise Unavailable("the relay is shutting down")
        producer = self.producers.get(request.producer)
        producer.check_options(request.options)
        return await self._to_the_end(self._start(chat_id, producer, request), self._starts)

    async def _start(self, chat_id: str, producer: Producer, request: StartRequest) -> StartResult:
        async with self._chat_lock(chat_id):
            if request.request_id:
                earlier = await self.store.find_request(chat_id, request.request_id)
                if earlier is not None:
                    return StartResult(earlier, deduplicated=True)
            superseded = ""
            active = await self.store.get_active(chat_id)
            running = self.streams.get(active) if active else None
            if running is not None and running.phase is not Phase.ENDED:
                if not request.supersede:
                    raise FailedPrecondition(
                        f"chat {chat_id!r} already has a live stream ({running.id}); stop it or "
                        "set supersede"
                    )
                await self._stop_stream(running, CancelRequest(StreamState.STOPPED))
                superseded = running.id
            if self._closing:
                raise Unavailable("the relay is shutting down")
            if self.live >= self.limits.live_streams_max:
                raise ResourceExhausted(
                    f"the relay runs {self.live} streams, its limit; retry later"
                )
            await self.store.save_messages(chat_id, request.messages, request.replace_history)
            history = await self.store.list_messages(chat_id)
            stream = Stream(secrets.token_hex(16), chat_id, self.clock())
            producer_name = request.producer or self.producers.default
            await self.store.begin_stream(
                stream.id, chat_id, producer_name, request.request_id, stream.created_at
            )
            self.streams[stream.id] = stream
            self.live += 1
            produce = ProduceRequest(chat_id, stream.id, history, dict(request.options))
            stream.task = self._spawn(self._pump(stream, producer, produce))
            self._spawn(self._run(stream, producer_name))
        log.info(
            "stream started",
            extra={"stream_id": stream.id, "chat_id": chat_id, "producer": producer_name},
        )
        return StartResult(stream.id, superseded_stream_id=superseded)

    def _check_start(self, request: StartRequest) -> None:
        limits = self.limits
        if len(request.messages) > limits.messages_per_request_max:
            raise InvalidArgument(
                f"{len(request.messages)} messages; the limit is {limits.messages_per_request_max}"
            )
        if len(request.request_id) > 128:
            raise InvalidArgument("request_id is longer than 128 characters")
        check_text(request.request_id, "request_id")
        if len(request.producer) > limits.producer_name_max_chars:
            raise InvalidArgument(
                f"the producer name is longer than {limits.producer_name_max_chars} characters"
            )
        check_text(request.producer, "the producer name")
        if len(request.options) > limits.options_max:
            raise InvalidArgument(f"more than {limits.options_max} options")
        for key, value in request.options.items():
            if not key or len(key) > limits.option_key_max_chars:
                raise InvalidArgument(
                    f"option names must be 1 to {limits.option_key_max_chars} characters"
                )
            check_text(key, f"option name {shown(key)}")
            if len(value) > limits.option_value_max_chars:
                raise InvalidArgument(
                    f"option {shown(key)} is longer than {limits.option_value_max_chars} characters"
                )
            check_text(value, f"option {shown(key)}")

    async def attach(
        self, *, stream_id: str = "", chat_id: str = "", from_offset: int = 0, max_batch: int = 0
    ) -> Attached:
        """Checks the request and returns the reader: replay from `from_offset`, live, then end."""
        stream = await self._stream_to_read(stream_id, chat_id, from_offset)
        batch = batch_size(max_batch, self.limits.attach_batch_max)
        return Attached(stream.id, stream.follow(from_offset, batch))

    def multiplexer(self) -> Multiplexer:
        """Readers of many streams served together; each subscription is checked like attach."""
        limits = self.limits
        return Multiplexer(
            self._stream_to_read, limits.attach_batch_max, limits.readers_per_call_max
        )

    async def _stream_to_read(self, stream_id: str, chat_id: str, from_offset: int) -> Stream:
        if from_offset < 0:
            raise InvalidArgument(f"from_offset must be 0 or more, got {from_offset}")
        if bool(stream_id) == bool(chat_id):
            raise InvalidArgument("give exactly one of stream_id and chat_id")
        if chat_id:
            check_chat_id(chat_id, self.limits)
            active = await self.store.get_active(chat_id)
            if active is None:
                raise NotFound(f"chat {chat_id!r} has no active stream")
            stream_id = active
        stream = await self._find_stream(stream_id)
        if from_offset > len(stream.chunks) and not _lost_to_a_crash(stream):
            raise OutOfRange(
                f"from_offset {from_offset} is past the end of stream {stream.id} "
                f"({len(stream.chunks)} chunks so far)"
            )
        if stream.readers >= self.limits.readers_per_stream_max:
            raise ResourceExhausted(f"stream {stream.id} has {stream.readers} readers, its limit")
        return stream

    async def stop(
        self, chat_id: str, stream_id: str = "", partial: UIMessage | None = None
    ) -> StopResult:
        check_chat_id(chat_id, self.limits)
        if stream_id and not is_stream_id(stream_id):
            raise InvalidArgument(
                f"stream_id {shown(stream_id)} is not a stream id (32 hex digits)"
            )
        if partial is not None and partial.role != "assistant":
            raise InvalidArgument("partial_message must be an assistant message")
        return await self._to_the_end(self._stop(chat_id, stream_id, partial))

    async def _stop(self, chat_id: str, stream_id: str, partial: UIMessage | None) -> StopResult:
        async with self._chat_lock(chat_id):
            active = await self.store.get_active(chat_id)
            if stream_id and stream_id != active:
                ended = await self._ended_stream(stream_id, chat_id)
                if ended is not None:
                    return StopResult(StopOutcome.ALREADY_ENDED, stream_id, ended)
                outcome = StopOutcome.NOT_ACTIVE if active else StopOutcome.NO_ACTIVE_STREAM
                return StopResult(outcome, stream_id)
            stream = self.streams.get(active) if active else None
            if active is None or stream is None:
                if active is not None:  # a reference no producer stands behind: drop it
                    await self.store.clear_active(chat_id, active)
                return StopResult(StopOutcome.NO_ACTIVE_STREAM)
            if not stream.request_cancel(CancelRequest(StreamState.STOPPED, partial)):
                return StopResult(StopOutcome.ALREADY_ENDED, stream.id, await stream.wait_ended())
            end = await self._stop_stream(stream, None)
            log.info(
                "stream stopped",
                extra={
                    "stream_id": stream.id,
                    "chat_id": chat_id,
                    "final_offset": end.final_offset,
                },
            )
            return StopResult(StopOutcome.STOPPED, stream.id, end)

    async def get_active(self, chat_id: str) -> ActiveStream | None:
        check_chat_id(chat_id, self.limits)
        active = await self.store.get_active(chat_id)
        stream = self.streams.get(active) if active else None
        if stream is None:
            return None
        state = stream.end.state if stream.end is not None else StreamState.LIVE
        return ActiveStream(stream.id, state, len(stream.chunks))

    async def list_messages(self, chat_id: str) -> list[UIMessage]:
        check_chat_id(chat_id, self.limits)
        return await self.store.list_messages(chat_id)

    def stats(self) -> RelayStats:
        streams = self.streams.values()
        return RelayStats(
            live_streams=self.live,
            retained_streams=len(self.streams),
            readers=sum(s.readers for s in streams),
            buffered_chunks=sum(len(s.chunks) for s in streams),
        )

    async def sweep(self) -> list[str]:
        """Frees finished streams whose retention has passed, in memory and in the store."""
        cutoff = self.clock() - self.retention
        for stream in list(self.streams.values()):
            if stream.ended_at is not None and stream.ended_at < cutoff:
                del self.streams[stream.id]
        return await self.store.delete_ended_before(cutoff)

    # -- producers ---------------------------------------------------------------------------

    async def _pump(self, stream: Stream, producer: Producer, request: ProduceRequest) -> None:
        async with contextlib.aclosing(producer.generate(request)) as chunks:
            async for chunk in chunks:
                self._accept(stream, chunk)

    def _accept(self, stream: Stream, chunk: JsonObject) -> None:
        limits = self.limits
        if not isinstance(chunk, dict) or not isinstance(chunk.get("type"), str):
            raise ChunkRejected("the producer yielded a chunk that is not an object with a 'type'")
        try:
            data = dump_json_bytes(chunk)
        except ValueError as exc:  # a lone surrogate, nesting too deep: the message says which
            raise ChunkRejected(f"the producer yielded a chunk that is not JSON: {exc}") from None
        size = len(data)
        if size > limits.chunk_max_bytes:
            raise ChunkRejected(
                f"a chunk of {size} bytes is over the {limits.chunk_max_bytes} limit"
            )
        if len(stream.chunks) >= limits.stream_max_chunks:
            raise ChunkRejected(
                f"the stream reached its limit of {limits.stream_max_chunks} chunks"
            )
        if stream.bytes + size > limits.stream_max_bytes:
            raise ChunkRejected(f"the stream reached its limit of {limits.stream_max_bytes} bytes")
        stream.assembler.add(chunk)
        stream.append(data.decode(), size)
        if stream.id not in self._dirty:
            self._dirty[stream.id] = stream
            self._journal_wakeup.set()

    async def _run(self, stream: Stream, producer_name: str) -> None:
        """Waits for the producer task however it ends, then ends the stream exactly once."""
        assert stream.task is not None
        state, error = StreamState.COMPLETED, ""
        try:
            await stream.task
        except asyncio.CancelledError:
            state = StreamState.INTERRUPTED
        except (ChunkRejected, ProducerFailed) as exc:
            state, error = StreamState.FAILED, str(exc)
        except Exception as exc:
            log.exception("producer failed", extra={"stream_id": stream.id})
            state, error = StreamState.FAILED, f"producer {producer_name!r} failed: {exc}"
        stream.phase = Phase.ENDING
        request = stream.cancel_request
        message = stream.assembler.message()
        if request is not None:
            state = request.state
            error = INTERRUPTED_MESSAGE if state is StreamState.INTERRUPTED else ""
            message = request.message or message
        end = StreamEnd(state, len(stream.chunks), error, message)
        tail = ChunkRun(stream.id, stream.journaled, stream.chunks[stream.journaled :])
        self._dirty.pop(stream.id, None)
        now = self.clock()
        if await self._retried(
            "persist the end of a stream",
            lambda: self.store.end_stream(stream.id, stream.chat_id, end, tail, now),
            stream.id,
        ):
            stream.journaled = len(stream.chunks)
        else:
            # Shutting down with the store still refusing: readers learn the stream was cut,
            # and the next start marks it interrupted from its journal, as after a crash.
            self._unsaved_ends += 1
            end = StreamEnd(StreamState.INTERRUPTED, len(stream.chunks), INTERRUPTED_MESSAGE)
        self.live -= 1
        stream.finish(end, now)
        log.info(
            "stream ended",
            extra={"stream_id": stream.id, "state": state.value, "final_offset": end.final_offset},
        )

    async def _stop_stream(self, stream: Stream, request: CancelRequest | None) -> StreamEnd:
        """Cancels a live producer and waits until its stream has ended and been persisted.

        `request` None means the caller has already claimed the stream with `request_cancel`.
        """
        if request is not None and not stream.request_cancel(request):
            return await stream.wait_ended()
        # No await between the claim and the cancel: nothing can leave a claimed producer
        # running. The client's partial message is persisted with the end, in one transaction.
        stream.cancel_producer()
        return await stream.wait_ended()

    # -- helpers -----------------------------------------------------------------------------

    async def _find_stream(self, stream_id: str) -> Stream:
        if not is_stream_id(stream_id):
            raise InvalidArgument(
                f"stream_id {shown(stream_id)} is not a stream id (32 hex digits)"
            )
        stream = self.streams.get(stream_id)
        if stream is not None:
            return stream
        stored = await self.store.load_stream(stream_id)
        if stored is None or stored.end is None or stored.ended_at is None:
            raise NotFound(f"stream {stream_id} not found (unknown, or its retention has passed)")
        stream = self.streams.get(stream_id)  # another reader may have loaded it meanwhile
        if stream is None:
            stream = Stream.finished(
                stored.stream_id, stored.chat_id, stored.chunks, stored.end, stored.ended_at
            )
            self.streams[stream_id] = stream
        return stream

    async def _ended_stream(self, stream_id: str, chat_id: str) -> StreamEnd | None:
        try:
            stream = await self._find_stream(stream_id)
        except NotFound:
            return None
        if stream.chat_id != chat_id or stream.end is None:
            return None
        return stream.end

    @contextlib.asynccontextmanager
    async def _chat_lock(self, chat_id: str) -> AsyncIterator[None]:
        lock, users = self._chat_locks.setdefault(chat_id, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._chat_locks[chat_id]

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._settled)
        return task

    def _settled(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a caller that stopped waiting never will

    async def _to_the_end(
        self, coro: Coroutine[Any, Any, T], in_flight: set[asyncio.Task[Any]] | None = None
    ) -> T:
        """Runs a state-changing call in a task of its own: if the caller is cancelled, the call
        still completes (its result unseen), so nothing is left half-done. The task stays in
        `in_flight`, if given, until it is done."""
        task: asyncio.Task[T] = self._spawn(coro)
        if in_flight is not None:
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        return await asyncio.shield(task)

    async def _retried(
        self, what: str, write: Callable[[], Coroutine[Any, Any, Any]], stream_id: str
    ) -> bool:
        """Retries a write the store refuses, with growing pauses, until it succeeds (True) or
        the relay gives up at shutdown (False)."""
        pause, longest = self.retry_backoff
        while True:
            try:
                await write()
                self._refusing(f"{what} {stream_id}", False)
                return True
            except Exception as exc:  # the store has logged the details
                log.warning(
                    f"could not {what}; retrying",
                    extra={"stream_id": stream_id, "error": str(exc), "retry_in_s": pause},
                )
                self._refusing(f"{what} {stream_id}", True)
            if self._give_up.is_set():
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._give_up.wait(), pause)
            pause = min(pause * 2, longest)

    def _refusing(self, write: str, refused: bool) -> None:
        if refused:
            self._refused.add(write)
        else:
            self._refused.discard(write)
        self._update_health()

    def _update_health(self) -> None:
        healthy = not self._refused and not self._closing
        if healthy == self._healthy:
            return
        self._healthy = healthy
        self._health_changed.set()
        if healthy:
            log.info("relay healthy again: the store works")
        elif not self._closing:
            log.error("relay unhealthy: the store fails", extra={"error": self.store.error or ""})

    async def _health_loop(self) -> None:
        """Probes the store with a small write every `health_interval`, so that an idle relay
        learns its store broke, or works again. Healthy only when no write is being refused:
        a probe may fit where a bigger write does not (SQLite reuses its log's space)."""
        while True:
            await asyncio.sleep(self.health_interval)
            try:
                async with asyncio.timeout(max(5 * self.health_interval, 2.0)):
                    await self.store.probe()
            except (Unavailable, TimeoutError):
                self._refusing("probe", True)
            except Exception:  # never let the loop die: health would freeze
                log.exception("the store's health probe failed")
                self._refusing("probe", True)
            else:
                self._refusing("probe", False)

    async def _journal_loop(self) -> None:
        while True:
            await self._journal_wakeup.wait()
            await asyncio.sleep(self.journal_interval)  # gathers a batch: one write, many chunks
            self._journal_wakeup.clear()
            await self._flush_journal()

    async def _flush_journal(self) -> None:
        # `journaled` moves only once the store has the run: a stream that ends while a write is
        # in flight journals its tail from the last acknowledged chunk (the store reads
        # overlapping runs once), so a write that then fails never leaves a hole under an end.
        flushing = [
            (stream, ChunkRun(stream.id, stream.journaled, stream.chunks[stream.journaled :]))
            for stream in self._dirty.values()
            if stream.journaled < len(stream.chunks)
        ]
        self._dirty.clear()
        if not flushing:  # nothing waits for the journal (ended streams saved their tails)
            self._refusing("journal", False)
            return
        try:
            await self.store.journal([run for _, run in flushing])
        except Exception as exc:  # the store has logged the details
            log.warning(
                "could not journal chunks; the next flush retries them", extra={"error": str(exc)}
            )
            self._refusing("journal", True)
            for stream, _ in flushing:
                if stream.phase is Phase.LIVE:
                    self._dirty[stream.id] = stream
            self._journal_wakeup.set()
            return
        self._refusing("journal", False)
        for stream, run in flushing:
            stream.journaled = max(stream.journaled, run.first_offset + len(run.chunks))

    async def _sweep_loop(self) -> None:
        assert self.sweep_interval is not None
        while True:
            await asyncio.sleep(self.sweep_interval)
            try:
                freed = await self.sweep()
            except Exception:
                log.exception("sweep failed")
            else:
                if freed:
                    log.info("streams freed", extra={"count": len(freed)})
