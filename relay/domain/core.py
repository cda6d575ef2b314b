"""The relay's domain: starts producers as tasks it owns, buffers their chunks, ends streams.

No gRPC here: `relay.rpc.service` translates RPCs to these calls and RelayError to status codes.
Storage is two ports (`relay.domain.ports`): the chat store and the stream log. Several relays
may share them (the cluster stores): each relay is an instance with a lease, producers run on the
instance that started them, and a stream owned elsewhere is served from a mirror that follows its
log.

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
- The stream policy (`StreamPolicy`: no reader for a grace period, a wall-clock and a chunk
  budget) ends a stream of ours as a Stop does: claimed synchronously, then cancelled, so a Stop
  racing a policy end has one winner and the partial answer is persisted. Relay defaults are
  upper bounds: a Start may tighten them, never loosen them.
- Across instances the chat store arbitrates: a new stream becomes active by compare-and-set, and
  the first end recorded holds (`ChatStore.end_stream`), then seals the log. A Stop for a stream
  owned elsewhere signals its owner and waits for the seal; once the owner's lease has lapsed,
  the stopping instance ends the stream itself. A relay whose lease lapsed is fenced: the log
  refuses its appends into a sealed stream, and its end loses to the one recorded.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from relay.domain.assembler import MessageAssembler, stream_end
from relay.domain.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    Unavailable,
    chat_not_found,
    stream_not_found,
)
from relay.domain.model import (
    ANONYMOUS,
    MESSAGE_ID_MAX_CHARS,
    ActiveStream,
    Attached,
    Caller,
    EndReason,
    JsonObject,
    Limits,
    RelayStats,
    ReplayMode,
    StartRequest,
    StartResult,
    StopOutcome,
    StopResult,
    StreamEnd,
    StreamPolicy,
    StreamState,
    UIMessage,
    check_chat_id,
    check_key,
    check_text,
    dump_json_bytes,
    is_stream_id,
    load_json,
    shown,
)
from relay.domain.multiplex import Multiplexer
from relay.domain.ports import (
    Begun,
    CancelRequest,
    ChatStore,
    ChunkRun,
    LogBehind,
    StreamLog,
    StreamRecord,
)
from relay.domain.stream import Phase, Stream, batch_size
from relay.producers import Producer, ProduceRequest, ProducerFailed, ProducerRegistry

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


# A Start's idempotency key (and a Stop's name for it).
REQUEST_ID_MAX_CHARS = 128
# Chat-to-subject bindings kept in memory, to spare the store a read per call.
SUBJECTS_KEPT_MAX = 100_000
# The window of the per-subject Start rate limit.
RATE_WINDOW_S = 60.0


def _seconds(name: str, value: float | None) -> float | None:
    """A relay default of the stream policy, in seconds: None or 0 is off."""
    if value is None or value == 0:
        return None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number of seconds (0: off), got {value}")
    return float(value)


def _count(name: str, value: int | None) -> int | None:
    """A relay default of the stream policy, a count: None or 0 is off."""
    if value is None or value == 0:
        return None
    if value < 0:
        raise ValueError(f"{name} must be 0 (off) or more, got {value}")
    return value


def _stricter(default: T | None, asked: T | None) -> T | None:
    """The tighter of two bounds, where None is no bound."""
    if default is None:
        return asked
    if asked is None:
        return default
    return asked if asked < default else default  # type: ignore[operator]


def _checked(name: str, value: float | None) -> float | None:
    """A Start's policy field in seconds: None or 0 is unset (the relay's default); else it must
    be a positive finite number (InvalidArgument naming the field)."""
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"policy.{name} must be a number of seconds")
    if not (math.isfinite(value) and value > 0):
        raise InvalidArgument(
            f"policy.{name} must be a positive, finite number of seconds; got {shown(value)}"
        )
    return float(value)


def _policy_end(stream: Stream, now: float) -> EndReason | None:
    """The time rule of its policy that ends the stream at `now` (the one due first), if any."""
    policy = stream.policy
    due: list[tuple[float, EndReason]] = []
    if policy.max_duration_s is not None:
        due.append((stream.created_at + policy.max_duration_s, EndReason.MAX_DURATION))
    if policy.no_reader_grace_s is not None and stream.unread_since is not None:
        due.append((stream.unread_since + policy.no_reader_grace_s, EndReason.NO_READER))
    passed = [(at, reason) for at, reason in due if at <= now]
    return min(passed, key=lambda entry: entry[0])[1] if passed else None


def new_instance_id() -> str:
    """Readable in logs and stream records: which host and process, and a random part."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Relay:
    def __init__(
        self,
        store: ChatStore,
        producers: ProducerRegistry,
        limits: Limits | None = None,
        *,
        log: StreamLog | None = None,  # None: `store` is the log too (the embedded SQLite store)
        instance_id: str = "",
        lease_s: float = 10.0,
        retention: float = 600.0,
        journal_interval: float = 0.25,
        sweep_interval: float | None = 30.0,
        health_interval: float = 1.0,
        retry_backoff: tuple[float, float] = (0.05, 2.0),
        clock: Callable[[], float] = time.time,
        no_reader_grace_s: float | None = None,
        max_duration_s: float | None = None,
        max_chunks: int | None = None,
        retention_max: float = 86_400.0,
        policy_interval: float | None = 1.0,
        policy_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        stop_tombstone_s: float = 60.0,
    ) -> None:
        """`no_reader_grace_s`, `max_duration_s`, `max_chunks`: the stream policy's defaults
        (None or 0: off), which a Start's policy may tighten (`_stream_policy`); `retention_max`:
        the longest retention a Start may ask for. The policy loop checks the time rules every
        `policy_interval` seconds (None: no loop; `police` checks on demand), pausing with
        `policy_sleep`."""
        if not (math.isfinite(stop_tombstone_s) and stop_tombstone_s > 0):
            raise ValueError(f"stop_tombstone_s must be more than 0, got {stop_tombstone_s}")
        self.store = store
        self.log: StreamLog = log if log is not None else store  # type: ignore[assignment]
        self._separate_log = log is not None
        self.instance_id = instance_id or new_instance_id()
        self.lease_s = lease_s
        self._lease_until = 0.0  # our lease holds until then, as far as we know
        self.producers = producers
        self.limits = limits or Limits()
        self.retention = retention
        # How long a Stop that names a Start not arrived yet waits for it (its tombstone).
        self.stop_tombstone_s = stop_tombstone_s
        self.journal_interval = journal_interval
        self.sweep_interval = sweep_interval
        self.health_interval = health_interval
        self.retry_backoff = retry_backoff  # first and longest pause between retried writes
        self.clock = clock
        self.policy = StreamPolicy(
            no_reader_grace_s=_seconds("no_reader_grace_s", no_reader_grace_s),
            max_duration_s=_seconds("max_duration_s", max_duration_s),
            max_chunks=_count("max_chunks", max_chunks),
        )
        if not (math.isfinite(retention_max) and retention_max >= 0):
            raise ValueError(
                f"retention_max must be a finite number of seconds, got {retention_max}"
            )
        self.retention_max = retention_max
        self.policy_interval = policy_interval
        self.policy_sleep = policy_sleep
        self._policed: dict[str, Stream] = {}  # our live streams with a time rule
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
        self._stopping: dict[str, CancelRequest] = {}  # Stops here of streams owned elsewhere
        self._mirrors: set[asyncio.Task[None]] = set()  # followers of streams owned elsewhere
        self._subjects: dict[str, str] = {}  # chat id -> the subject it is bound to (never changes)
        # Per-subject limits: live streams (reserved at Start), and the times of recent Starts.
        self._live_by_subject: dict[str, int] = {}
        self._held_bytes = 0  # chunk bytes retained (exact at each Start, counted on between)
        self._live_subjects: dict[str, str] = {}  # our live stream id -> its subject
        self._recent_starts: dict[str, collections.deque[float]] = {}
        self._background: list[asyncio.Task[None]] = []
        self._ended_by_reason: collections.Counter[str] = collections.Counter()  # ours, for metrics

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Opens the stores, takes a lease and ends what a dead relay left live; raises (with
        the stores closed) if any of it fails, so a relay that cannot keep its promises never
        starts."""
        await self.store.open()
        try:
            if self._separate_log:
                await self.log.open()
            # A relay restarted under the same name (a fixed --instance-id) finds its earlier
            # run's streams live, under a lease that may not have lapsed: they are orphans too.
            await self.store.drop_lease(self.instance_id)
            await self._take_over_orphans(including_ours=True)
            await self._renew_lease()
        except BaseException:
            await self._close_stores()
            raise
        self._background.append(asyncio.create_task(self._journal_loop(), name="journal"))
        self._background.append(asyncio.create_task(self._health_loop(), name="health"))
        self._background.append(asyncio.create_task(self._lease_loop(), name="lease"))
        self._background.append(asyncio.create_task(self._cancel_loop(), name="cancels"))
        if self.sweep_interval is not None:
            self._background.append(asyncio.create_task(self._sweep_loop(), name="sweeper"))
        if self.policy_interval is not None:
            self._background.append(asyncio.create_task(self._policy_loop(), name="policy"))

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
        # Our producers' streams; mirrors of other relays' streams are not ours to end.
        running = [
            s for s in self.streams.values() if s.phase is not Phase.ENDED and s.task is not None
        ]
        if running and grace > 0:
            await asyncio.wait([self._spawn(s.wait_ended()) for s in running], timeout=grace)
        for stream in running:
            if stream.request_cancel(
                CancelRequest(StreamState.INTERRUPTED, reason=EndReason.SHUTDOWN)
            ):
                stream.cancel_producer()
        if running:  # ends the store still refuses after a last round of retries are given up
            ending = [self._spawn(s.wait_ended()) for s in running]
            _, pending = await asyncio.wait(ending, timeout=max(grace, self.retry_backoff[1]))
            if pending:
                self._give_up.set()
                await asyncio.wait(pending)
        self._give_up.set()
        for task in [*self._background, *self._mirrors]:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._update_health()
        await self._flush_journal()
        await self.producers.close()
        if not self._unsaved_ends:  # every stream of ours is ended: nobody need wait for us
            with contextlib.suppress(Exception):
                await self.store.drop_lease(self.instance_id)
        await self._close_stores()
        if self._unsaved_ends:
            raise UnsavedEnds(
                f"the store refused the end of {self._unsaved_ends} stream(s); the next start "
                "marks them interrupted"
            )

    async def _close_stores(self) -> None:
        try:
            if self._separate_log:
                await self.log.close()
        finally:
            await self.store.close()

    async def _renew_lease(self) -> None:
        expires_at = self.clock() + self.lease_s
        await self.store.renew_lease(self.instance_id, expires_at)
        self._lease_until = expires_at

    async def _take_over_orphans(self, including_ours: bool = False) -> None:
        """Ends the streams whose owner's lease has lapsed (a relay that crashed, or was cut
        off): interrupted, their partial message persisted from the log."""
        for record in await self.store.orphaned_streams(self.clock()):
            if record.owner == self.instance_id and not including_ours:
                continue  # ours: only our own clock could say the lease lapsed
            # A Stop under way here for this stream ends it as the client asked.
            request = self._stopping.get(record.stream_id)
            if request is None or request.message is None:
                request = CancelRequest(StreamState.INTERRUPTED, reason=EndReason.RELAY_LOST)
            end, _ = await self._end_elsewhere(record, request)
            log.warning(
                "stream interrupted: its relay is gone",
                extra={
                    "stream_id": record.stream_id,
                    "chat_id": record.chat_id,
                    "owner": record.owner,
                    "final_offset": end.final_offset,
                },
            )

    async def _end_elsewhere(
        self, record: StreamRecord, request: CancelRequest
    ) -> tuple[StreamEnd, bool]:
        """Ends a stream whose producer runs on no live relay, from what its log holds. Returns
        the end that holds, and whether it is ours (another relay may have ended it first)."""
        logged = await self.log.load(record.stream_id)
        if logged is not None and logged.end is not None:
            return logged.end, False
        chunks = logged.chunks if logged is not None else []
        assembler = MessageAssembler(fallback_id=f"msg_{record.stream_id}")
        for chunk in chunks:
            assembler.add(load_json(chunk))
        error = INTERRUPTED_MESSAGE if request.state is StreamState.INTERRUPTED else ""
        end = stream_end(
            request.state, len(chunks), error, request.reason, assembler.message(), request.message
        )
        held = await self.store.end_stream(record.stream_id, record.chat_id, end, self.clock())
        if held == end:  # ours: counted with this relay's ends
            self._ended_by_reason[end.reason.label] += 1
        retention = self._retention_of(record.retention_s)
        return await self.log.seal(record.stream_id, held, retention), held == end

    async def _lease_loop(self) -> None:
        """Renews the lease three times per term and takes over the streams of relays whose
        lease lapsed. A relay that cannot renew in time interrupts its own producers: others
        may take their streams over from then on."""
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await self._renew_lease()
                await self._take_over_orphans()
            except Exception as exc:
                log.warning("could not renew the lease", extra={"error": str(exc)})
                if self.clock() > self._lease_until:
                    self._interrupt_all("the relay lost its lease")

    def _interrupt_all(self, why: str) -> None:
        for stream in self.streams.values():
            if stream.task is not None and stream.request_cancel(
                CancelRequest(StreamState.INTERRUPTED, reason=EndReason.RELAY_LOST)
            ):
                log.error(why + "; stream interrupted", extra={"stream_id": stream.id})
                stream.cancel_producer()

    async def _cancel_loop(self) -> None:
        """Cancels our producers when a relay that received a Stop for them says so."""
        while True:
            try:
                async for stream_id, request in self.log.cancels(self.instance_id):
                    stream = self.streams.get(stream_id)
                    if stream is None or stream.task is None:
                        continue  # not ours, or ended and freed
                    if stream.request_cancel(request):
                        stream.cancel_producer()
            except Exception as exc:  # the log says why; signals are repeated by the sender
                log.warning("cancel signals lost; listening again", extra={"error": str(exc)})
                await asyncio.sleep(self.retry_backoff[0])

    # -- the RPCs ----------------------------------------------------------------------------

    async def start(self, request: StartRequest, caller: Caller = ANONYMOUS) -> StartResult:
        """Starts an answer. A new chat is bound to `caller`'s subject; a chat bound to another
        subject is NotFound."""
        chat_id = check_chat_id(request.chat_id, self.limits)
        self._check_start(request)
        if self._closing:
            raise Unavailable("the relay is shutting down")
        producer = self.producers.admit(request.producer, request.options, caller, request.messages)
        self._admit_start(caller.subject, request)  # reserves a live stream of the subject's
        return await self._to_the_end(self._start(chat_id, producer, request, caller), self._starts)

    async def _start(
        self, chat_id: str, producer: Producer, request: StartRequest, caller: Caller
    ) -> StartResult:
        """Owns the live stream `start` reserved for the caller's subject: the new stream
        takes it over, or it is given back."""
        try:
            result = await self._start_stream(chat_id, producer, request, caller)
        except BaseException:
            self._release_live(caller.subject)
            raise
        if result.deduplicated or result.stopped_before_start:  # no producer runs for it
            self._release_live(caller.subject)
        return result

    async def _start_stream(
        self, chat_id: str, producer: Producer, request: StartRequest, caller: Caller
    ) -> StartResult:
        async with self._chat_lock(chat_id):
            if not await self._visible(chat_id, caller):  # before anything, even a supersede
                raise chat_not_found(chat_id)
            superseded = ""
            for _ in range(3):  # another relay may start a stream for this chat meanwhile
                if request.request_id:  # this Start, retried (maybe on another relay)
                    earlier = await self.store.find_request(chat_id, request.request_id)
                    if earlier is not None:
                        if not await self._visible(chat_id, caller):  # the chat exists now
                            raise chat_not_found(chat_id)
                        stopped = await self._stopped_before_it_started(earlier)
                        return StartResult(earlier, deduplicated=True, stopped_before_start=stopped)
                # Read for the caller's subject: a chat another subject created since the check
                # above shows no stream (so none is superseded) and its binding refuses the Start.
                active = await self.store.get_active(chat_id, caller.subject)
                running = await self._live_stream(active)
                if running is not None:
                    # A Stop that came before this Start ends it here, at once: a late Start
                    # must neither supersede a newer answer nor be refused because of it.
                    if request.request_id or request.messages:
                        stream = await self._begin(
                            chat_id, producer, request, active, caller.subject, stopped_only=True
                        )
                        if stream is not None:
                            break
                    if not request.supersede:
                        raise FailedPrecondition(
                            f"chat {chat_id!r} already has a live stream ({running.id}); stop "
                            "it or set supersede"
                        )
                    await self._stop_stream(
                        running, CancelRequest(StreamState.STOPPED, reason=EndReason.SUPERSEDED)
                    )
                    superseded = running.id
                    continue
                stream = await self._begin(chat_id, producer, request, active, caller.subject)
                if stream is not None:
                    break
            else:
                raise FailedPrecondition(
                    f"chat {chat_id!r} keeps getting new streams from other Starts; retry"
                )
        producer_name = request.producer or self.producers.default
        if stream.end is not None:  # a Stop naming this Start came first
            log.info(
                "stream stopped before it started",
                extra={"stream_id": stream.id, "chat_id": chat_id, "producer": producer_name},
            )
            return StartResult(
                stream.id, superseded_stream_id=superseded, stopped_before_start=True
            )
        log.info(
            "stream started",
            extra={"stream_id": stream.id, "chat_id": chat_id, "producer": producer_name},
        )
        return StartResult(stream.id, superseded_stream_id=superseded)

    async def _begin(
        self,
        chat_id: str,
        producer: Producer,
        request: StartRequest,
        replaces: str | None,
        subject: str,
        stopped_only: bool = False,
    ) -> Stream | None:
        """Starts the producer of a new stream, if the chat's active stream is still `replaces`
        (compare-and-set); None if another Start changed it meanwhile. A new chat is bound to
        `subject` in the same transaction (NotFound if another subject's Start bound it first).
        If a Stop naming this Start came first, the stream is returned already ended and no
        producer runs; with `stopped_only`, only then (else None, nothing written)."""
        if self._closing:
            raise Unavailable("the relay is shutting down")
        if self.live >= self.limits.live_streams_max:
            raise ResourceExhausted(
                f"the relay runs {self.live} streams, its limit; retry later", retry_after_s=1.0
            )
        policy = self._stream_policy(request.policy)
        stream = Stream(
            secrets.token_hex(16),
            chat_id,
            self.clock(),
            owner=self.instance_id,
            policy=policy,
            retention=policy.retention_s,
            clock=self.clock,
        )
        producer_name = request.producer or self.producers.default
        await self.log.create(stream.id, chat_id, self.instance_id)
        record = StreamRecord(
            stream.id,
            chat_id,
            self.instance_id,
            producer_name,
            stream.created_at,
            retention_s=stream.retention,
            # What a Stop may name this Start by, besides its request id.
            message_id=request.messages[-1].id if request.messages else "",
        )
        # Registered first: a reader that finds the stream active finds it here, not in a log
        # that has nothing yet.
        self.streams[stream.id] = stream
        try:
            begun = await self.store.begin_stream(
                record,
                request.request_id,
                replaces,
                request.messages,
                request.replace_history,
                subject,
                stopped_only,
            )
        except NotFound:  # another subject's Start created the chat first
            await self._discard(stream)
            raise
        except BaseException:
            del self.streams[stream.id]
            raise
        if not begun:
            await self._discard(stream)
            return None
        if begun is Begun.STOPPED_BEFORE_START:
            await self._end_before_start(stream)
            return stream
        self.live += 1
        self._live_subjects[stream.id] = subject
        if policy.no_reader_grace_s is not None or policy.max_duration_s is not None:
            self._policed[stream.id] = stream
        stream.run(self._spawn(self._pump(stream, producer, producer_name, dict(request.options))))
        self._spawn(self._run(stream, producer_name))
        return stream

    async def _end_before_start(self, stream: Stream) -> None:
        """The store recorded the stream ended (a Stop naming its Start came first): it ends
        here too, STOPPED at offset 0 with no message, and no producer runs. Its log is sealed
        with the same end; if that fails, any relay that reads the stream seals the log from
        the record (`_find_stream`), so no reader waits for an end that never comes."""
        end = stream_end(StreamState.STOPPED, 0, "", EndReason.STOPPED_BEFORE_START, None)
        try:
            end = await self.log.seal(stream.id, end, self._retention_of(stream.retention))
        except Exception as exc:  # the log has logged the details
            log.warning(
                "could not seal the log of a stream stopped before it started",
                extra={"stream_id": stream.id, "error": str(exc)},
            )
        self._ended_by_reason[end.reason.label] += 1
        stream.finish(end, stream.created_at)  # as recorded: ended when created

    async def _stopped_before_it_started(self, stream_id: str) -> bool:
        record = await self.store.get_stream(stream_id)
        end = record.end if record is not None else None
        return end is not None and end.reason is EndReason.STOPPED_BEFORE_START

    async def _discard(self, stream: Stream) -> None:
        """Forgets a stream whose Start did not take: nothing was recorded of it."""
        del self.streams[stream.id]
        with contextlib.suppress(Exception):  # else its empty log waits for no end
            await self.log.delete([stream.id])

    async def _live_stream(self, stream_id: str | None) -> Stream | None:
        """The stream, here or followed from its owner, if it is live."""
        if stream_id is None:
            return None
        try:
            stream = await self._find_stream(stream_id)
        except NotFound:
            return None
        return stream if stream.end is None else None

    def _check_start(self, request: StartRequest) -> None:
        limits = self.limits
        if len(request.messages) > limits.messages_per_request_max:
            raise InvalidArgument(
                f"{len(request.messages)} messages; the limit is {limits.messages_per_request_max}"
            )
        if len(request.request_id) > REQUEST_ID_MAX_CHARS:
            raise InvalidArgument(f"request_id is longer than {REQUEST_ID_MAX_CHARS} characters")
        check_key(request.request_id, "request_id")
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
        self._stream_policy(request.policy)

    def _stream_policy(self, asked: StreamPolicy) -> StreamPolicy:
        """The policy a Start's stream runs under. Each rule is the stricter of the relay's
        default and the Start's (a Start may tighten a relay default, never loosen it; None:
        off); the retention is the Start's own (None: the relay's), at most `retention_max`.
        InvalidArgument names a field that is negative, not finite, or past its bound."""
        grace = _checked("no_reader_grace_s", asked.no_reader_grace_s)
        duration = _checked("max_duration_s", asked.max_duration_s)
        retention = _checked("retention_s", asked.retention_s)
        chunks = asked.max_chunks
        if chunks is not None and (
            isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 0
        ):
            raise InvalidArgument(
                f"policy.max_chunks must be a count, 0 or more; got {shown(chunks)}"
            )
        if retention is not None and retention > self.retention_max:
            raise InvalidArgument(
                f"policy.retention_s is {retention:g} s; this relay keeps an ended stream at most "
                f"{self.retention_max:g} s"
            )
        return StreamPolicy(
            no_reader_grace_s=_stricter(self.policy.no_reader_grace_s, grace),
            max_duration_s=_stricter(self.policy.max_duration_s, duration),
            max_chunks=_stricter(self.policy.max_chunks, chunks or None),
            retention_s=retention,
        )

    async def attach(
        self,
        *,
        stream_id: str = "",
        chat_id: str = "",
        from_offset: int = 0,
        max_batch: int = 0,
        replay: ReplayMode = ReplayMode.EXACT,
        caller: Caller = ANONYMOUS,
    ) -> Attached:
        """Checks the request and returns the reader: replay from `from_offset`, live, then end."""
        stream = await self._stream_to_read(stream_id, chat_id, from_offset, caller)
        batch = batch_size(max_batch, self.limits.attach_batch_max)
        return Attached(stream.id, stream.follow(from_offset, batch, replay))

    def multiplexer(self) -> Multiplexer:
        """Readers of many streams served together; each subscription is checked like attach."""
        limits = self.limits
        return Multiplexer(
            self._stream_to_read, limits.attach_batch_max, limits.readers_per_call_max
        )

    async def _stream_to_read(
        self, stream_id: str, chat_id: str, from_offset: int, caller: Caller
    ) -> Stream:
        if from_offset < 0:
            raise InvalidArgument(f"from_offset must be 0 or more, got {from_offset}")
        if bool(stream_id) == bool(chat_id):
            raise InvalidArgument("give exactly one of stream_id and chat_id")
        if chat_id:
            check_chat_id(chat_id, self.limits)
            active = await self.store.get_active(chat_id, caller.subject)
            if active is None:
                raise NotFound(f"chat {chat_id!r} has no active stream")
            stream_id = active
        stream = await self._find_stream(stream_id)
        if not await self._visible(stream.chat_id, caller):
            raise stream_not_found(stream.id)
        # A stream owned by another relay may have delivered chunks there that its log does not
        # hold yet (the journal window): a reader resuming from one of them here waits for it.
        in_flight_elsewhere = stream.end is None and stream.task is None
        if from_offset > len(stream.chunks) and not (
            _lost_to_a_crash(stream) or in_flight_elsewhere
        ):
            raise OutOfRange(
                f"from_offset {from_offset} is past the end of stream {stream.id} "
                f"({len(stream.chunks)} chunks so far)"
            )
        if stream.readers >= self.limits.readers_per_stream_max:
            raise ResourceExhausted(f"stream {stream.id} has {stream.readers} readers, its limit")
        return stream

    async def stop(
        self,
        chat_id: str,
        stream_id: str = "",
        partial: UIMessage | None = None,
        caller: Caller = ANONYMOUS,
        *,
        request_id: str = "",
        message_id: str = "",
    ) -> StopResult:
        check_chat_id(chat_id, self.limits)
        if stream_id and not is_stream_id(stream_id):
            raise InvalidArgument(
                f"stream_id {shown(stream_id)} is not a stream id (32 hex digits)"
            )
        if partial is not None and partial.role != "assistant":
            raise InvalidArgument("partial_message must be an assistant message")
        if len(request_id) > REQUEST_ID_MAX_CHARS:
            raise InvalidArgument(f"request_id is longer than {REQUEST_ID_MAX_CHARS} characters")
        check_key(request_id, "request_id")
        if len(message_id) > MESSAGE_ID_MAX_CHARS:
            raise InvalidArgument(f"message_id is longer than {MESSAGE_ID_MAX_CHARS} characters")
        check_key(message_id, "message_id")
        return await self._to_the_end(
            self._stop(chat_id, stream_id, partial, caller, request_id, message_id)
        )

    async def _stop(
        self,
        chat_id: str,
        stream_id: str,
        partial: UIMessage | None,
        caller: Caller,
        request_id: str = "",
        message_id: str = "",
    ) -> StopResult:
        async with self._chat_lock(chat_id):
            if not stream_id and (request_id or message_id):
                # The Stop names a Start, which may not have reached any relay yet (the user
                # pressed Stop while it was in flight). The store decides in one transaction,
                # ordered with that Start's: it has arrived (then it is stopped as any other
                # Stop would), or its tombstone now waits for it.
                seen = await self.store.stop_before_start(
                    chat_id,
                    caller.subject,
                    request_id,
                    "" if request_id else message_id,
                    self.clock() + self.stop_tombstone_s,
                )
                if not seen.arrived:
                    log.info(
                        "stop before its start: the answer ends as it starts",
                        extra={"chat_id": chat_id, "expires_in_s": self.stop_tombstone_s},
                    )
                    return StopResult(StopOutcome.STOPPED_BEFORE_START)
                if seen.stream_id is None:  # its stream is not known (any more)
                    active = await self.store.get_active(chat_id, caller.subject)
                    outcome = StopOutcome.NOT_ACTIVE if active else StopOutcome.NO_ACTIVE_STREAM
                    return StopResult(outcome)
                stream_id = seen.stream_id  # from here on, as a Stop naming that stream
            # Another subject's chat reads as one without an active stream, in the same read
            # that finds the stream (a check before it could pass while the chat did not exist).
            active = await self.store.get_active(chat_id, caller.subject)
            if stream_id and stream_id != active:
                ended = await self._ended_stream(stream_id, chat_id)
                if ended is not None and await self._visible(chat_id, caller):
                    return StopResult(StopOutcome.ALREADY_ENDED, stream_id, ended)
                outcome = StopOutcome.NOT_ACTIVE if active else StopOutcome.NO_ACTIVE_STREAM
                return StopResult(outcome, stream_id)
            if active is None:
                return StopResult(StopOutcome.NO_ACTIVE_STREAM)
            try:
                stream = await self._find_stream(active)
            except NotFound:  # a reference no stream stands behind: drop it
                await self.store.clear_active(chat_id, active)
                return StopResult(StopOutcome.NO_ACTIVE_STREAM)
            request = CancelRequest(StreamState.STOPPED, partial, EndReason.STOP)
            if stream.task is None and stream.end is None:  # its producer runs on another relay
                end, ended_here = await self._stop_elsewhere(stream, request)
                stopped = ended_here or end.reason is EndReason.STOP
                outcome = StopOutcome.STOPPED if stopped else StopOutcome.ALREADY_ENDED
                return StopResult(outcome, stream.id, end)
            if not stream.request_cancel(request):
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

    async def get_active(self, chat_id: str, caller: Caller = ANONYMOUS) -> ActiveStream | None:
        check_chat_id(chat_id, self.limits)
        active = await self.store.get_active(chat_id, caller.subject)
        if active is None:
            return None
        try:
            stream = await self._find_stream(active)
        except NotFound:
            return None
        state = stream.end.state if stream.end is not None else StreamState.LIVE
        return ActiveStream(stream.id, state, len(stream.chunks))

    async def list_messages(self, chat_id: str, caller: Caller = ANONYMOUS) -> list[UIMessage]:
        check_chat_id(chat_id, self.limits)
        return await self.store.list_messages(chat_id, caller.subject)

    def _admit_start(self, subject: str, request: StartRequest) -> None:
        """Refuses a Start past the relay's buffered bytes or the subject's limits (live streams,
        Starts per minute) with ResourceExhausted and when to retry; else counts it, and
        reserves a live stream for the subject (`_release_live` gives it back)."""
        limits, now = self.limits, self.clock()
        # Exact here, counted on by `_accept`; a replay's compaction counts too.
        self._held_bytes = sum(s.bytes + s.replay_bytes for s in self.streams.values())
        # New answers stop at nine tenths: the last tenth is for the answers already running.
        if self._held_bytes >= limits.buffered_bytes_max * 0.9:
            raise ResourceExhausted(
                f"the relay holds {self._held_bytes} bytes of answers, near its limit; retry later",
                retry_after_s=self._until_retention_frees(now),
            )
        live = self._live_by_subject.get(subject, 0)
        if subject:  # the anonymous subject is everyone's: only the relay-wide limits hold
            if live >= limits.live_streams_per_subject_max:
                # A regenerate's old answer stops before the new one runs: it does not count.
                replaced = request.supersede and self._runs_answer_of(subject, request.chat_id)
                if live - replaced >= limits.live_streams_per_subject_max:
                    raise ResourceExhausted(
                        f"{live} answers of this subject are live, its limit; stop one or retry",
                        retry_after_s=1.0,
                    )
            recent = self._recent_starts.setdefault(subject, collections.deque())
            while recent and recent[0] <= now - RATE_WINDOW_S:
                recent.popleft()
            if len(recent) >= limits.starts_per_subject_per_minute:
                raise ResourceExhausted(
                    f"{len(recent)} Starts of this subject in the last minute, its limit",
                    retry_after_s=recent[0] + RATE_WINDOW_S - now,
                )
            recent.append(now)
        self._live_by_subject[subject] = live + 1

    def _until_retention_frees(self, now: float) -> float:
        """Seconds until the next sweep after the oldest finished stream's retention passes."""
        freed_at = [
            s.ended_at + self._retention_of(s.retention)
            for s in self.streams.values()
            if s.ended_at is not None
        ]
        if not freed_at:  # all live: one of them has to end first
            return 1.0
        return max(min(freed_at) - now, 0.0) + (self.sweep_interval or 0.0) or 1.0

    def _runs_answer_of(self, subject: str, chat_id: str) -> bool:
        """Whether this relay runs a live answer of `subject` in the chat."""
        return any(
            owner == subject and self.streams[stream_id].chat_id == chat_id
            for stream_id, owner in self._live_subjects.items()
        )

    def _release_live(self, subject: str) -> None:
        # Never raises: it runs where a stream ends, which must complete whatever the count.
        left = self._live_by_subject.pop(subject, 0) - 1
        if left > 0:
            self._live_by_subject[subject] = left

    def _forget_old_starts(self) -> None:
        cutoff = self.clock() - RATE_WINDOW_S
        for subject, recent in list(self._recent_starts.items()):
            if not recent or recent[-1] <= cutoff:
                del self._recent_starts[subject]

    async def _visible(self, chat_id: str, caller: Caller) -> bool:
        """Whether `caller` may see the chat: it does not exist yet, or it is bound to the
        caller's subject. Another subject's chat is answered as if it did not exist. A binding
        never changes once made, so the known ones are kept (and dropped wholesale when many)."""
        subject = self._subjects.get(chat_id)
        if subject is None:
            subject = await self.store.chat_subject(chat_id)
            if subject is None:
                return True
            if len(self._subjects) >= SUBJECTS_KEPT_MAX:
                self._subjects.clear()
            self._subjects[chat_id] = subject
        return subject == caller.subject

    def stats(self) -> RelayStats:
        streams = self.streams.values()
        return RelayStats(
            live_streams=self.live,
            retained_streams=len(self.streams),
            readers=sum(s.readers for s in streams),
            buffered_chunks=sum(len(s.chunks) for s in streams),
            ended_by_reason=dict(self._ended_by_reason),
        )

    async def sweep(self) -> list[str]:
        """Frees finished streams whose retention (their own, else the relay's) has passed, in
        memory and in the store."""
        self._forget_old_starts()
        now = self.clock()
        for stream in list(self.streams.values()):
            # In memory no longer than the relay's retention, whatever the stream's own: one
            # kept longer is read back from its log when asked for (`_find_stream`), so a long
            # retention never pins memory nor blocks new Starts (`_admit_start`).
            retention = min(self._retention_of(stream.retention), self.retention)
            if stream.ended_at is not None and stream.ended_at < now - retention:
                del self.streams[stream.id]
        freed = await self.store.delete_expired(now, self.retention)
        if freed and self._separate_log:
            await self.log.delete(freed)
        await self.store.delete_stop_tombstones(self.clock())  # Stops whose Start never came
        return freed

    def _retention_of(self, own: float | None) -> float:
        """A stream's retention: its own, as its Start asked, else the relay's."""
        return self.retention if own is None else own

    def police(self) -> list[str]:
        """Ends our live streams whose policy's time rules say so now (no reader for the grace
        period; past the max duration): STOPPED with the rule as the reason, claimed and
        cancelled as a Stop does, so a Stop that claimed first wins and the partial answer is
        persisted. Returns the ids of the streams it claimed. The policy loop calls it every
        `policy_interval`; a test may call it after moving its clock."""
        now = self.clock()
        claimed: list[str] = []
        for stream in list(self._policed.values()):
            reason = _policy_end(stream, now)
            if reason is None:
                continue
            if stream.request_cancel(CancelRequest(StreamState.STOPPED, reason=reason)):
                stream.cancel_producer()
                claimed.append(stream.id)
                log.info(
                    "stream ended by its policy",
                    extra={"stream_id": stream.id, "reason": reason.value},
                )
        return claimed

    async def _policy_loop(self) -> None:
        assert self.policy_interval is not None
        while True:
            await self.policy_sleep(self.policy_interval)
            try:
                self.police()
            except Exception:  # never let the loop die: the policy would stop holding
                log.exception("policing the streams failed")

    # -- producers ---------------------------------------------------------------------------

    async def _pump(
        self, stream: Stream, producer: Producer, producer_name: str, options: dict[str, str]
    ) -> None:
        # The history as the stream's Start left it (its messages saved with the stream).
        history = await self.store.list_messages(stream.chat_id)
        if not self.producers.policy(producer_name).client_options.allows("system"):
            # Start refuses new system messages for this profile, but an earlier Start on one
            # that allows them may have saved some: the operator's prompt holds here too.
            history = [m for m in history if m.role != "system"]
        request = ProduceRequest(stream.chat_id, stream.id, history, options)
        async with contextlib.aclosing(producer.generate(request)) as chunks:
            async for item in chunks:
                if isinstance(item, list):  # a batch (relay.producers.Producer)
                    self._accept_batch(stream, item)
                else:
                    self._accept(stream, item)

    def _accept(self, stream: Stream, chunk: JsonObject) -> None:
        if stream.cancel_request is not None:
            # Claimed (a Stop, a policy end): its end is decided and its producer cancelled. A
            # producer that yields again before the cancel reaches it (it has not awaited since)
            # adds nothing.
            return
        budget = stream.policy.max_chunks
        if budget is not None and len(stream.chunks) >= budget:
            # A chunk past the budget ends the stream, as a Stop does (the claim, then the
            # cancel, no await between), and is dropped: an answer whose last chunk reaches the
            # budget exactly completes as it would have.
            self._end_at_budget(stream)
            return
        data = self._encoded(chunk, len(stream.chunks), stream.bytes, self._held_bytes)
        size = len(data)
        self._held_bytes += size
        stream.assembler.add(chunk)
        stream.append(data.decode(), size)
        self._to_journal(stream)

    def _accept_batch(self, stream: Stream, chunks: list[JsonObject]) -> None:
        """A batch of chunks, taken as if the producer had yielded each alone, in order (the
        same checks, limits and budget), but appended at once: the readers are woken once and
        the journal told once. Each chunk is checked and encoded before any is appended. At a
        refused chunk (not an object with a 'type', not JSON, over a size limit) the chunks
        before it are appended and the stream fails, the message naming the refused chunk's
        index in the batch; nothing after it is appended. A batch crossing the chunk budget
        keeps the chunks up to the budget, then ends the stream as a chunk past the budget
        does. A claimed stream (a Stop, a policy end) takes none of it."""
        if stream.cancel_request is not None or not chunks:
            return
        budget = stream.policy.max_chunks
        count, total, held = len(stream.chunks), stream.bytes, self._held_bytes
        taken = chunks
        if budget is not None and count + len(chunks) > budget:
            if count >= budget:
                self._end_at_budget(stream)
                return
            taken = chunks[: budget - count]
        texts: list[str] = []
        refused: ChunkRejected | None = None
        for index, chunk in enumerate(taken):
            try:
                data = self._encoded(chunk, count + index, total, held)
            except ChunkRejected as exc:
                if len(chunks) > 1:
                    exc = ChunkRejected(
                        f"{exc} (the chunk at index {index} of a batch of {len(chunks)}; the "
                        f"{index} before it were kept)"
                    )
                refused = exc
                taken = taken[:index]
                break
            total += len(data)
            held += len(data)
            texts.append(data.decode())
        if texts:
            self._held_bytes = held
            add = stream.assembler.add
            for chunk in taken:
                add(chunk)
            stream.extend(texts, total - stream.bytes)
            self._to_journal(stream)
        if refused is not None:
            raise refused
        if len(taken) < len(chunks):
            self._end_at_budget(stream)

    def _to_journal(self, stream: Stream) -> None:
        """The stream has chunks the journal has not: the next flush writes them."""
        if stream.id not in self._dirty:
            self._dirty[stream.id] = stream
            self._journal_wakeup.set()

    @staticmethod
    def _end_at_budget(stream: Stream) -> None:
        """A chunk past the stream's chunk budget: the stream ends as a Stop ends it."""
        if stream.request_cancel(CancelRequest(StreamState.STOPPED, reason=EndReason.MAX_CHUNKS)):
            stream.cancel_producer()

    def _encoded(self, chunk: JsonObject, count: int, total: int, held: int) -> bytes:
        """`chunk` as compact JSON, if a stream holding `count` chunks of `total` bytes (and the
        relay `held` bytes of answers) may take it; ChunkRejected saying why not."""
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
        if count >= limits.stream_max_chunks:
            raise ChunkRejected(
                f"the stream reached its limit of {limits.stream_max_chunks} chunks"
            )
        if total + size > limits.stream_max_bytes:
            raise ChunkRejected(f"the stream reached its limit of {limits.stream_max_bytes} bytes")
        if held + size > limits.buffered_bytes_max:
            raise ChunkRejected(
                f"the relay holds its limit of {limits.buffered_bytes_max} bytes of answers"
            )
        return data

    async def _run(self, stream: Stream, producer_name: str) -> None:
        """Waits for the producer task however it ends, then ends the stream exactly once."""
        assert stream.task is not None
        state, error, reason = StreamState.COMPLETED, "", EndReason.FINISHED
        try:
            await stream.task
        except asyncio.CancelledError:
            state, reason = StreamState.INTERRUPTED, EndReason.SHUTDOWN
        except ChunkRejected as exc:
            state, error, reason = StreamState.FAILED, str(exc), EndReason.LIMIT
        except ProducerFailed as exc:
            state, error, reason = StreamState.FAILED, str(exc), EndReason.PRODUCER_FAILED
        except Exception as exc:
            log.exception("producer failed", extra={"stream_id": stream.id})
            state, error = StreamState.FAILED, f"producer {producer_name!r} failed: {exc}"
            reason = EndReason.PRODUCER_FAILED
        request = stream.producer_done()
        partial = None
        if request is not None:
            state, reason = request.state, request.reason
            error = INTERRUPTED_MESSAGE if state is StreamState.INTERRUPTED else ""
            partial = request.message
        assembled = stream.assembler.message()
        end = stream_end(state, len(stream.chunks), error, reason, assembled, partial)
        self._dirty.pop(stream.id, None)
        now = self.clock()

        # Whether the end recorded is ours (a store may echo it back without its reason).
        recorded_ours = False

        async def write_end() -> StreamEnd:
            # The tail, then the end (the first recorded holds: another relay may have ended
            # the stream when our lease lapsed), then the log's seal.
            nonlocal recorded_ours
            while True:  # the tail from what the log holds (also when empty: it may be fenced)
                tail = ChunkRun(stream.id, stream.journaled, stream.chunks[stream.journaled :])
                try:
                    await self.log.append([tail])
                    break
                except LogBehind as behind:
                    stream.log_lost(behind.holds[stream.id])
            held = await self.store.end_stream(stream.id, stream.chat_id, end, now)
            recorded_ours = recorded_ours or held is end or held == end
            return await self.log.seal(stream.id, held, self._retention_of(stream.retention))

        held = await self._retried("persist the end of a stream", write_end, stream.id)
        reason = end.reason  # what the metrics count: why this relay ended it
        if held is not None:
            stream.logged(len(stream.chunks))
            if not recorded_ours:
                log.warning(
                    "another relay ended the stream first",
                    extra={"stream_id": stream.id, "state": held.state.value},
                )
                reason = held.reason
            end = held
        else:
            # Shutting down with the store still refusing: readers learn the stream was cut,
            # and the next start marks it interrupted from its journal, as after a crash.
            self._unsaved_ends += 1
            end = StreamEnd(
                StreamState.INTERRUPTED,
                len(stream.chunks),
                INTERRUPTED_MESSAGE,
                reason=EndReason.SHUTDOWN,
            )
            reason = end.reason
        self.live -= 1
        self._policed.pop(stream.id, None)
        self._release_live(self._live_subjects.pop(stream.id))
        self._ended_by_reason[reason.label] += 1
        stream.finish(end, now)
        log.info(
            "stream ended",
            extra={"stream_id": stream.id, "state": state.value, "final_offset": end.final_offset},
        )

    async def _stop_stream(self, stream: Stream, request: CancelRequest | None) -> StreamEnd:
        """Cancels a live producer and waits until its stream has ended and been persisted.

        `request` None means the caller has already claimed the stream with `request_cancel`.
        """
        if stream.task is None and stream.end is None:  # its producer runs on another relay
            end, _ = await self._stop_elsewhere(
                stream, request or CancelRequest(StreamState.STOPPED, reason=EndReason.STOP)
            )
            return end
        if request is not None and not stream.request_cancel(request):
            return await stream.wait_ended()
        # No await between the claim and the cancel: nothing can leave a claimed producer
        # running. The client's partial message is persisted with the end, in one transaction.
        stream.cancel_producer()
        return await stream.wait_ended()

    async def _stop_elsewhere(
        self, stream: Stream, request: CancelRequest
    ) -> tuple[StreamEnd, bool]:
        """Stops a stream whose producer runs on another relay: signals its owner until the
        stream is sealed; once the owner's lease has lapsed, ends it here (stopped with the
        client's partial message if there is one, interrupted otherwise). Returns the end, and
        whether this relay ended the stream (the owner's end may have come first)."""
        self._stopping[stream.id] = request
        try:
            return await self._signal_until_ended(stream, request)
        finally:
            del self._stopping[stream.id]

    async def _signal_until_ended(
        self, stream: Stream, request: CancelRequest
    ) -> tuple[StreamEnd, bool]:
        pause = min(0.5, self.lease_s / 4)
        while stream.end is None:
            if self.streams.get(stream.id) is not stream:  # its follower lost the log
                stream = await self._find_stream(stream.id)
                continue
            await self.log.signal_cancel(stream.owner, stream.id, request)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    return await stream.wait_ended(), False
            record = await self.store.get_stream(stream.id)
            if record is None:
                raise NotFound(f"stream {stream.id} not found")
            if record.end is not None:  # ended; its owner may have died before sealing the log
                retention = self._retention_of(record.retention_s)
                return await self.log.seal(stream.id, record.end, retention), False
            expires_at = await self.store.lease_expires_at(stream.owner)
            if expires_at is None or expires_at < self.clock():
                if request.message is None:
                    request = CancelRequest(StreamState.INTERRUPTED, reason=EndReason.RELAY_LOST)
                end, ours = await self._end_elsewhere(record, request)
                log.warning(
                    "stream ended here: its relay is gone",
                    extra={"stream_id": stream.id, "owner": stream.owner, "state": end.state.value},
                )
                return end, ours  # the follower brings the end to this relay's readers
        return stream.end, False

    # -- helpers -----------------------------------------------------------------------------

    async def _find_stream(self, stream_id: str) -> Stream:
        """The stream, from memory, else from its log: ended, or live on another relay (then a
        mirror that follows the log serves this relay's readers)."""
        if not is_stream_id(stream_id):
            raise InvalidArgument(
                f"stream_id {shown(stream_id)} is not a stream id (32 hex digits)"
            )
        stream = self.streams.get(stream_id)
        if stream is not None:
            return stream
        logged = await self.log.load(stream_id)
        record = await self.store.get_stream(stream_id) if logged is not None else None
        if logged is None or record is None:
            raise stream_not_found(stream_id)
        if (
            record.end is None
            and record.owner == self.instance_id
            and stream_id not in self.streams
        ):
            # Recorded as ours, with no producer here: a Start whose write landed after its
            # caller saw it fail. Nobody else will end it (our lease holds): we do.
            await self._end_elsewhere(
                record, CancelRequest(StreamState.INTERRUPTED, reason=EndReason.RELAY_LOST)
            )
            record = await self.store.get_stream(stream_id)
            assert record is not None
        if logged.end is None and record.end is not None:
            # The stream ended after its log was read (its owner records the end, then seals),
            # or its owner died between the two: seal it (a seal already there holds), and read
            # the log again, which may have grown since.
            await self.log.seal(stream_id, record.end, self._retention_of(record.retention_s))
            logged = await self.log.load(stream_id)
            if logged is None:
                raise NotFound(f"stream {stream_id} not found (its retention has passed)")
        end = logged.end
        stream = self.streams.get(stream_id)  # another reader may have loaded it meanwhile
        if stream is not None:
            return stream
        chunks = logged.chunks if end is None else logged.chunks[: end.final_offset]
        if end is not None:
            ended_at = record.ended_at if record.ended_at is not None else self.clock()
            stream = Stream.finished(
                stream_id, record.chat_id, chunks, end, ended_at, record.retention_s
            )
        else:
            stream = Stream.mirror(
                stream_id,
                record.chat_id,
                record.created_at,
                record.owner,
                chunks,
                record.retention_s,
            )
            follower = self._spawn(self._mirror(stream))
            self._mirrors.add(follower)
            follower.add_done_callback(self._mirrors.discard)
        self.streams[stream_id] = stream
        return stream

    async def _mirror(self, stream: Stream) -> None:
        """Fills a stream owned by another relay from its log, up to the seal."""
        repair = asyncio.create_task(self._seal_if_ended(stream), name="seal-if-ended")
        try:
            async for item in self.log.follow(stream.id, len(stream.chunks)):
                if isinstance(item, StreamEnd):
                    stream.finish(item, self.clock())
                    return
                for chunk in item:
                    stream.append(chunk, len(chunk))
                stream.logged(len(stream.chunks))
        except Exception as exc:
            log.warning(
                "lost the log of a stream owned elsewhere",
                extra={"stream_id": stream.id, "error": str(exc)},
            )
            if self.streams.get(stream.id) is stream:
                del self.streams[stream.id]  # the next reader follows the log afresh
            stream.fail_readers(Unavailable(f"lost the log of stream {stream.id}; attach again"))
        except asyncio.CancelledError:  # the relay is closing
            stream.fail_readers(Unavailable("the relay is shutting down"))
            raise
        finally:
            repair.cancel()
            await asyncio.wait([repair])  # no store call of it outlives the follower

    async def _seal_if_ended(self, stream: Stream) -> None:
        """An owner that died between recording a stream's end and sealing its log leaves the
        log open for good (no lease loop looks at an ended record): every `lease_s`, a follower
        checks the record and seals the log from it, which brings the end to its readers."""
        while stream.end is None:
            await asyncio.sleep(self.lease_s)
            with contextlib.suppress(Exception):  # the follower reports a failing store
                record = await self.store.get_stream(stream.id)
                if record is not None and record.end is not None and stream.end is None:
                    retention = self._retention_of(record.retention_s)
                    await self.log.seal(stream.id, record.end, retention)

    async def _ended_stream(self, stream_id: str, chat_id: str) -> StreamEnd | None:
        try:
            stream = await self._find_stream(stream_id)
        except NotFound:
            return None
        if stream.chat_id != chat_id:
            return None
        if stream.end is None and stream.phase is Phase.ENDING:
            # Its end is recorded (the chat's active stream is cleared with it) and being
            # sealed: the caller gets that end, not "not active".
            return await stream.wait_ended()
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
        self, what: str, write: Callable[[], Coroutine[Any, Any, T]], stream_id: str
    ) -> T | None:
        """Retries a write the store refuses, with growing pauses, until it succeeds (its
        result) or the relay gives up at shutdown (None)."""
        pause, longest = self.retry_backoff
        while True:
            try:
                result = await write()
                self._refusing(f"{what} {stream_id}", False)
                return result
            except Exception as exc:  # the store has logged the details
                log.warning(
                    f"could not {what}; retrying",
                    extra={"stream_id": stream_id, "error": str(exc), "retry_in_s": pause},
                )
                self._refusing(f"{what} {stream_id}", True)
            if self._give_up.is_set():
                return None
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
            error = self.store.error or (self.log.error if self._separate_log else None)
            log.error("relay unhealthy: the store fails", extra={"error": error or ""})

    async def _health_loop(self) -> None:
        """Probes the store with a small write every `health_interval`, so that an idle relay
        learns its store broke, or works again. Healthy only when no write is being refused:
        a probe may fit where a bigger write does not (SQLite reuses its log's space)."""
        while True:
            await asyncio.sleep(self.health_interval)
            try:
                async with asyncio.timeout(max(5 * self.health_interval, 2.0)):
                    await self.store.probe()
                    if self._separate_log:
                        await self.log.probe()
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
            fenced = await self.log.append([run for _, run in flushing])
        except LogBehind as behind:  # the other runs are written; these go again from the end
            for stream, run in flushing:
                if stream.id in behind.holds:
                    stream.log_lost(behind.holds[stream.id])
                    self._dirty[stream.id] = stream
                else:
                    stream.logged(run.first_offset + len(run.chunks))
            self._journal_wakeup.set()
            return
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
            if stream.id in fenced:  # another relay ended it: our lease had lapsed
                if stream.request_cancel(
                    CancelRequest(StreamState.INTERRUPTED, reason=EndReason.RELAY_LOST)
                ):
                    stream.cancel_producer()
                continue
            stream.logged(run.first_offset + len(run.chunks))

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
