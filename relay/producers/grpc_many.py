"""The `grpc` producer multiplexed: many answers on one GenerateMany call (producer.proto).

    [producers.backend]
    kind = "grpc"
    target = "127.0.0.1:50061"
    multiplex = true          # one GenerateMany call for every answer, not a Generate call each

With Generate, every answer is a call, and a paced answer sends one message per chunk: at token
rate nothing accumulates within one answer, so the relay receives (and pays for) a gRPC message
per chunk. On one GenerateMany call the producer sends, every tick, one response holding the ready
chunks of all its answers, and the relay reads one message for hundreds of chunks.

The profile keeps ONE call (per event loop), opened by the first Start that needs it, with the
profile's connect timeout, token, TLS and message size; a Start after the call ended opens a new
one. A dispatcher task reads the call and routes each StreamChunks to its answer: the chunks of
one StreamChunks reach the answer's generator as one batch (relay.producers.Producer), and its end
ends the generator (a failure as Generate's non-OK status does). A writer task sends the requests
(`start`, `cancel`) in order. Cancelling an answer's generator (Stop, supersede, shutdown) sends
`cancel` for it; so does a failure the relay decides for one answer (a malformed chunk, its idle
timeout, a queue over its bound): the other answers go on. The call ending, with any status,
fails every answer still open on it, with the status and what it means.

Errors and their texts are GrpcProducer's (relay.producers.grpc_producer), shared with it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncGenerator, Sequence

import grpc

from relay.domain.model import JsonObject
from relay.producers import ProduceRequest, ProducerFailed
from relay.producers.grpc_producer import GrpcProducer, _error_chunk, _IdleWatch
from relay.v1 import producer_pb2

GENERATE_MANY_METHOD = "/relay.v1.ProducerService/GenerateMany"


class GrpcManyProducer(GrpcProducer):
    """A GrpcProducer whose answers share one GenerateMany call (a profile's `multiplex`)."""

    _many: _ManyCall | None = None
    _opening: asyncio.Task[_ManyCall | str] | None = None

    async def generate(
        self, request: ProduceRequest
    ) -> AsyncGenerator[JsonObject | list[JsonObject], None]:
        """Each StreamChunks' chunks as one batch; a failure as an `error` chunk."""
        message = self._generate_request(request)
        # A start over the call's message limit would end the call, and every answer on it:
        # refused here, it fails this answer alone.
        size = producer_pb2.GenerateManyRequest(start=message).ByteSize()
        if size > self.message_max_bytes:
            failure = (
                f"{self._who}: the answer's request is {size} bytes, over the "
                f"{self.message_max_bytes}-byte message limit (the chat's history is too long)"
            )
            yield _error_chunk(failure)
            raise ProducerFailed(failure)
        many = await self._open()
        if isinstance(many, str):
            yield _error_chunk(many)
            raise ProducerFailed(many)
        answer = many.start(message)
        failure = ""
        try:
            while True:
                if answer.batches:
                    batch, failure = self._parse_batch(answer.take())
                    if batch:
                        yield batch
                    if failure:  # malformed: the answer fails, the chunks before it kept
                        break
                elif answer.end is not None:
                    failure = answer.end
                    break
                else:
                    await answer.wait()
        finally:
            # Stop, supersede or shutdown (CancelledError, then the relay closes this generator),
            # or a failure decided here: the producer must not go on for nobody.
            many.finish(answer)
        if failure:
            yield _error_chunk(failure)
            raise ProducerFailed(failure)

    async def close(self) -> None:
        """Ends the call (its open answers fail), then closes the channel."""
        many, self._many = self._many, None
        opening, self._opening = self._opening, None
        if opening is not None:
            opening.cancel()
        if many is not None:
            await many.close(f"{self._who}: the relay closed the producer")
        await super().close()

    async def _open(self) -> _ManyCall | str:
        """The call to start an answer on: the running one, else a new one (every Start waiting
        meanwhile shares its opening), or why none could be opened."""
        loop = asyncio.get_running_loop()
        many = self._many
        if many is not None and not many.ended and many.loop is loop:
            return many
        opening = self._opening
        if opening is None or opening.get_loop() is not loop:
            opening = self._opening = loop.create_task(self._dial())
            opening.add_done_callback(self._opened)
        # Shielded: a Start cancelled while it waits leaves the opening to the others.
        return await asyncio.shield(opening)

    def _opened(self, task: asyncio.Task[_ManyCall | str]) -> None:
        if self._opening is task:
            self._opening = None

    async def _dial(self) -> _ManyCall | str:
        channel = self._channel_in_this_loop()
        failure = await self._connect(channel)
        if failure:
            return failure
        self._many = _ManyCall(self, channel)
        return self._many

    def _end_failure(self, end: producer_pb2.AnswerEnd) -> str:
        """An answer's AnswerEnd as Generate's status would fail it ("" for OK)."""
        if end.code == grpc.StatusCode.OK.value[0]:
            return ""
        return self._status_failure(_STATUS_CODES.get(end.code, _UNKNOWN), end.message)

    def _call_failure(self, code: grpc.StatusCode, details: str | None, open_answers: int) -> str:
        """Why the answers open on a call that ended with this status fail."""
        which = f"the GenerateMany call ended with {open_answers} answer(s) open on it"
        if code is grpc.StatusCode.OK:
            return f"{self._who} ended its GenerateMany call before this answer's end ({which})"
        failure = f"{self._status_failure(code, details)} ({which})"
        if code is grpc.StatusCode.UNIMPLEMENTED:
            failure += "; a profile with multiplex = true needs a producer implementing it"
        return failure


_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}
_UNKNOWN = grpc.StatusCode.UNKNOWN


class _Answer:
    """One answer on the call: the batches come for it and not taken yet, and its end."""

    __slots__ = (
        "batches",
        "end",
        "idle",
        "idle_failure",
        "loop",
        "queued",
        "stream_id",
        "waiter",
        "who",
    )

    def __init__(self, stream_id: str, producer: GrpcManyProducer) -> None:
        self.stream_id = stream_id
        self.who = producer._who
        self.loop = asyncio.get_running_loop()
        # Why the call ended / failed it ("" for complete); None while open.
        self.end: str | None = None
        self.batches: deque[Sequence[str]] = deque()
        self.queued = 0  # characters in `batches` behind the first (see deliver)
        self.waiter: asyncio.Future[None] | None = None
        self.idle_failure = producer._idle_failure
        self.idle = _IdleWatch(self, producer.idle_timeout_s)

    def deliver(self, chunks: Sequence[str], now: float) -> None:
        """A StreamChunks' chunks (a keep-alive when empty): one batch for the generator."""
        if self.end is not None:  # failed here (idle, over its bound): its generator is ending
            return
        self.idle.last = now
        if not chunks:
            return
        # Backpressure. The dispatcher must never wait for one answer: that would stall every
        # answer on the call (and a bounded queue that blocks when full would do just that). So
        # the queue is bounded in size, not by blocking: the relay's pump takes a batch as soon
        # as the answer's task runs (it appends it without awaiting anything), so what waits here
        # is what came since that task last ran, normally nothing or one batch, and the relay's
        # own limits (chunk, stream and buffered bytes) apply as it takes them. Behind the batch
        # it has yet to take (at most one response's worth), an answer may have
        # _QUEUE_MAX_CHARS waiting; past that (its task is not taking: a stuck event loop, a
        # bug), it fails alone, `cancel` sent. Only a lagging answer's chunks are measured.
        if self.batches:
            self.queued += sum(map(len, chunks))
            if self.queued > _QUEUE_MAX_CHARS:
                self.batches.clear()
                self.end = (
                    f"{self.who}: the relay fell behind this answer by over {_QUEUE_MAX_CHARS} "
                    "characters of chunks"
                )
                self._wake()
                return
        self.batches.append(chunks)
        self._wake()

    def take(self) -> Sequence[str]:
        chunks = self.batches.popleft()
        if not self.batches:
            self.queued = 0
        return chunks

    def ended(self, failure: str) -> None:
        """Its producer ended it, or the call did: the batches queued are still taken first."""
        if self.end is None:
            self.end = failure
        self._wake()

    def cancel(self) -> None:
        """The idle timeout fired (_IdleWatch)."""
        self.ended(self.idle_failure)

    async def wait(self) -> None:
        self.waiter = self.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


_QUEUE_MAX_CHARS = 64 << 20  # an answer's queue: the relay's message limit (see _Answer.deliver)


class _ManyCall:
    """One GenerateMany call: its answers by stream id, its dispatcher and its writer."""

    def __init__(self, producer: GrpcManyProducer, channel: grpc.aio.Channel) -> None:
        self.producer = producer
        self.loop = asyncio.get_running_loop()
        method = channel.stream_stream(
            GENERATE_MANY_METHOD,
            request_serializer=producer_pb2.GenerateManyRequest.SerializeToString,
            response_deserializer=producer_pb2.GenerateManyResponse.FromString,
        )
        self.call = method(metadata=producer._metadata, wait_for_ready=False)
        self.answers: dict[str, _Answer] = {}  # open: started, neither ended nor cancelled
        self.ended = ""  # why the call ended; "" while it runs
        self._outbox: asyncio.Queue[producer_pb2.GenerateManyRequest] = asyncio.Queue()
        self._writer = self.loop.create_task(self._write())
        self._reader = self.loop.create_task(self._read())

    def start(self, message: producer_pb2.GenerateRequest) -> _Answer:
        answer = _Answer(message.stream_id, self.producer)
        if self.ended:  # the call ended between its opening and this Start: the answer too
            answer.ended(self.ended)
            return answer
        self.answers[message.stream_id] = answer
        self._outbox.put_nowait(producer_pb2.GenerateManyRequest(start=message))
        return answer

    def finish(self, answer: _Answer) -> None:
        """The answer's generator is done: if the producer may still send for it (the relay
        cancelled it, or failed it here), `cancel` it; what still comes for it is dropped."""
        answer.idle.close()
        if self.answers.get(answer.stream_id) is answer:
            del self.answers[answer.stream_id]
            if not self.ended:
                self._outbox.put_nowait(producer_pb2.GenerateManyRequest(cancel=answer.stream_id))

    async def close(self, why: str) -> None:
        self._end(why)
        self.call.cancel()
        tasks = (self._reader, self._writer)
        for task in tasks:
            task.cancel()
        if self.loop is asyncio.get_running_loop():
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _write(self) -> None:
        outbox, call = self._outbox, self.call
        # A write on an ended call raises: the dispatcher learns why from the call's status.
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            while True:
                await call.write(await outbox.get())

    async def _read(self) -> None:
        """The dispatcher: each StreamChunks to its answer, until the call ends."""
        call, answers, producer, loop = self.call, self.answers, self.producer, self.loop
        try:
            while True:
                response = await call.read()
                # grpc.aio.EOF: the call ended (isinstance: the stubs type read() as object).
                if not isinstance(response, producer_pb2.GenerateManyResponse):
                    code, details = await call.code(), await call.details() or ""
                    break
                now = loop.time()
                for part in response.streams:
                    answer = answers.get(part.stream_id)
                    if answer is None:  # cancelled or ended (late), or never started: dropped
                        continue
                    answer.deliver(part.chunks, now)
                    if part.HasField("end"):
                        del answers[part.stream_id]
                        answer.ended(producer._end_failure(part.end))
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
        except asyncio.CancelledError:
            # close() (it has failed the answers), the loop ending, or the call cancelled under
            # us (the channel closed): as a CANCELLED status.
            failure = producer._call_failure(
                grpc.StatusCode.CANCELLED, "the call was cancelled", len(answers)
            )
            self._end(failure)
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            return
        self._end(producer._call_failure(code, details, len(answers)))

    def _end(self, failure: str) -> None:
        """The call is over: every answer open on it fails with `failure`; the producer's next
        Start opens a new call."""
        if self.ended:
            return
        self.ended = failure
        self.call.cancel()  # ended already, unless its dispatcher was cancelled
        self._writer.cancel()
        answers = list(self.answers.values())
        self.answers.clear()
        for answer in answers:
            answer.ended(failure)
        if self.producer._many is self:
            self.producer._many = None
