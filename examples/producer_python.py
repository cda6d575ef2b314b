"""A ProducerService in Python (grpc.aio): the relay's `grpc` producer kind, implemented.

It streams "Python producer says: <the last user message>" one word per text delta, framed by
start / start-step / text-start ... text-end / finish-step / finish, as AI SDK UI message chunks.
Options: `delay_ms` (pause before each text delta, as a model would, default 30) and `chunks`
(number of text deltas; the words repeat to fill it). Other options are INVALID_ARGUMENT.

Batching: a GenerateResponse carries every chunk made since the last one was sent (up to
BATCH_MAX_CHUNKS chunks or BATCH_MAX_CHARS characters), so a fast answer (`delay_ms` 0) goes in a
few large responses, and a paced one in one response per pause.

When the relay cancels the call (the user pressed Stop, a new answer superseded this one, the relay
shut down), the handler gets a CancelledError at its next await: it stops at once and logs
`cancelled <stream_id>`. A real backend would close its model request there.

GenerateMany (a profile with `multiplex = true`): many answers on one call. Each `start` runs the
same answer as a task that puts its chunks in a shared outbox; one writer sends, every tick
(`--tick-ms`, default 10: a chunk waits at most that long), one response holding every answer's
ready chunks, and an answer's end (OK, or INVALID_ARGUMENT for options it refuses) after its last
chunks. A `cancel` stops that answer's task (`cancelled <stream_id>`) and drops what it had ready.

    .venv/bin/python examples/producer_python.py --port 50061

and in the relay's producers file (`--producers producers.toml`):

    [producers.python]
    kind = "grpc"
    target = "127.0.0.1:50061"
    multiplex = true                 # optional: every answer on one GenerateMany call

Beyond loopback it needs a token, and should have TLS (mutual TLS with --tls-client-ca):

    PRODUCER_TOKEN=<secret> .venv/bin/python examples/producer_python.py --host 0.0.0.0 \
        --tls-cert producer.pem --tls-key producer-key.pem [--tls-client-ca relay-ca.pem]

    [producers.python]
    kind = "grpc"
    target = "producer.internal:50061"
    token_env = "PRODUCER_TOKEN"     # the relay sends it as `authorization: Bearer <token>`
    tls_ca = "producer-ca.pem"       # and checks the producer's certificate against this CA
    tls_cert = "relay.pem"           # mutual TLS: the relay's client certificate
    tls_key = "relay-key.pem"

Flags: --token (or PRODUCER_TOKEN; required unless --host is loopback: every call must carry it),
--tls-cert and --tls-key (or PRODUCER_TLS_CERT, PRODUCER_TLS_KEY), --tls-client-ca (or
PRODUCER_TLS_CLIENT_CA: client certificates required and checked).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from relay.v1 import producer_pb2, producer_pb2_grpc, relay_pb2

log = logging.getLogger("producer_python")

DEFAULT_DELAY_MS = 30.0
BATCH_MAX_CHUNKS = 500  # chunks per GenerateResponse at most
BATCH_MAX_CHARS = 64 * 1024  # and about this much JSON: far below the relay's 64 MiB message limit
DEFAULT_TICK_MS = 10.0  # GenerateMany: how long ready chunks wait to share a response, at most
MANY_MAX_CHARS = 1 << 20  # GenerateMany: about this much JSON per response at most
MANY_BACKLOG_CHUNKS = 20_000  # GenerateMany: answers wait while the outbox holds this many
OPTIONS = {"delay_ms": (0.0, 60_000.0), "chunks": (1, 1_000_000)}


@dataclass
class CallRecord:
    """What happened to one Generate call, for whoever watches the servicer (tests, logs)."""

    request: producer_pb2.GenerateRequest
    started: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    responses_sent: int = 0
    chunks_sent: int = 0


@dataclass
class ManyCallRecord:
    """What happened to one GenerateMany call (its answers are in PythonProducer.calls)."""

    started: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    responses_sent: int = 0
    chunks_sent: int = 0


@dataclass
class Outgoing:
    """An answer's chunks ready to send on a GenerateMany call, and its end once it has one."""

    chunks: list[str] = field(default_factory=list)
    end: producer_pb2.AnswerEnd | None = None


class PythonProducer(producer_pb2_grpc.ProducerServiceServicer):
    def __init__(
        self, default_delay_ms: float = DEFAULT_DELAY_MS, tick_ms: float = DEFAULT_TICK_MS
    ) -> None:
        self.default_delay_ms = default_delay_ms
        self.tick_ms = tick_ms
        self.calls: dict[str, CallRecord] = {}  # by stream id, on Generate or GenerateMany
        self.many_calls: list[ManyCallRecord] = []

    async def Generate(
        self, request: producer_pb2.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        record = self.calls[request.stream_id] = CallRecord(request)
        record.started.set()
        log.info("generate %s", request.stream_id)
        try:
            try:
                delay_ms, count = parse_options(request.options, self.default_delay_ms)
            except ValueError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                return
            ready: list[str] = []  # chunks made, not sent yet
            ready_chars = 0
            for made in script(request.stream_id, answer_words(request.messages), count):
                if delay_ms:
                    # The model pauses before its next chunks: send what is ready first.
                    await send(context, record, ready)
                    ready, ready_chars = [], 0
                    await asyncio.sleep(delay_ms / 1000)
                ready += made
                ready_chars += sum(map(len, made))
                if len(ready) >= BATCH_MAX_CHUNKS or ready_chars >= BATCH_MAX_CHARS:
                    await send(context, record, ready)
                    ready, ready_chars = [], 0
            await send(context, record, ready)
        except asyncio.CancelledError:
            record.cancelled.set()
            log.info("cancelled %s", request.stream_id)
            raise
        finally:
            record.finished.set()
        log.info(
            "done %s: %d chunks in %d responses",
            request.stream_id,
            record.chunks_sent,
            record.responses_sent,
        )

    async def GenerateMany(
        self,
        request_iterator: AsyncIterator[producer_pb2.GenerateManyRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        """Answers as tasks putting their chunks in `outbox`; this handler is the one writer."""
        call = ManyCallRecord()
        self.many_calls.append(call)
        call.started.set()
        outbox: dict[str, Outgoing] = {}  # by stream id, in the order they became ready
        backlog = 0  # chunks in outbox
        ready = asyncio.Event()  # something is in outbox, or the relay is done writing
        room = asyncio.Event()  # the backlog is under MANY_BACKLOG_CHUNKS
        room.set()
        tasks: dict[str, asyncio.Task[None]] = {}  # the answers running

        def put(stream_id: str, chunks: list[str], end: producer_pb2.AnswerEnd | None) -> None:
            nonlocal backlog
            out = outbox.get(stream_id)
            if out is None:
                out = outbox[stream_id] = Outgoing()
            out.chunks += chunks
            out.end = end
            backlog += len(chunks)
            if backlog >= MANY_BACKLOG_CHUNKS:
                room.clear()
            ready.set()

        async def answer(request: producer_pb2.GenerateRequest, record: CallRecord) -> None:
            stream_id = request.stream_id
            try:
                try:
                    delay_ms, count = parse_options(request.options, self.default_delay_ms)
                except ValueError as exc:
                    code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
                    put(stream_id, [], producer_pb2.AnswerEnd(code=code, message=str(exc)))
                    return
                for made in script(stream_id, answer_words(request.messages), count):
                    if delay_ms:
                        await asyncio.sleep(delay_ms / 1000)  # the model thinks
                    elif not room.is_set():
                        await room.wait()  # a fast answer waits for the writer
                    put(stream_id, made, None)
                put(stream_id, [], producer_pb2.AnswerEnd())  # code 0: OK
            except asyncio.CancelledError:
                record.cancelled.set()
                log.info("cancelled %s", stream_id)
                raise
            finally:
                record.finished.set()
                tasks.pop(stream_id, None)

        async def read_requests() -> None:
            nonlocal backlog
            async for request in request_iterator:
                if request.HasField("start"):
                    start = request.start
                    record = self.calls[start.stream_id] = CallRecord(start)
                    record.started.set()
                    log.info("generate %s (GenerateMany)", start.stream_id)
                    tasks[start.stream_id] = asyncio.create_task(answer(start, record))
                elif request.HasField("cancel"):
                    task = tasks.pop(request.cancel, None)
                    if task is not None:
                        task.cancel()
                    dropped = outbox.pop(request.cancel, None)  # nothing more for it
                    if dropped is not None:
                        backlog -= len(dropped.chunks)
            ready.set()  # the relay is done writing: end once every answer has

        reader = asyncio.create_task(read_requests())
        try:
            while True:
                await ready.wait()
                if self.tick_ms:
                    await asyncio.sleep(self.tick_ms / 1000)  # let the other answers catch up
                ready.clear()
                while outbox:
                    backlog -= await self._send_many(context, call, outbox)
                    if backlog < MANY_BACKLOG_CHUNKS:
                        room.set()
                if reader.done() and not tasks:
                    reader.result()  # the relay's half-close, or why reading failed
                    break
        finally:
            reader.cancel()
            for task in list(tasks.values()):
                task.cancel()
            call.finished.set()

    async def _send_many(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        call: ManyCallRecord,
        outbox: dict[str, Outgoing],
    ) -> int:
        """One GenerateManyResponse with what `outbox` holds, up to about MANY_MAX_CHARS (and
        BATCH_MAX_CHUNKS per answer); returns how many chunks it took."""
        response = producer_pb2.GenerateManyResponse()
        chars = taken = 0
        for stream_id in list(outbox):
            out = outbox[stream_id]
            chunks = out.chunks[:BATCH_MAX_CHUNKS]
            del out.chunks[:BATCH_MAX_CHUNKS]
            part = response.streams.add(stream_id=stream_id, chunks=chunks)
            record = self.calls[stream_id]
            record.responses_sent += 1
            record.chunks_sent += len(chunks)
            if not out.chunks:
                del outbox[stream_id]
                if out.end is not None:
                    part.end.CopyFrom(out.end)
                    log.info(
                        "done %s: %d chunks in %d responses",
                        stream_id,
                        record.chunks_sent,
                        record.responses_sent,
                    )
            taken += len(chunks)
            chars += sum(map(len, chunks))
            if chars >= MANY_MAX_CHARS:
                break
        await context.write(response)
        call.responses_sent += 1
        call.chunks_sent += taken
        return taken


async def send(
    context: grpc.aio.ServicerContext[Any, Any], record: CallRecord, chunks: list[str]
) -> None:
    """One GenerateResponse with `chunks`, if there are any."""
    if chunks:
        await context.write(producer_pb2.GenerateResponse(chunks=chunks))
        record.responses_sent += 1
        record.chunks_sent += len(chunks)


def parse_options(options: Mapping[str, str], default_delay_ms: float) -> tuple[float, int | None]:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown options {unknown}; known: {sorted(OPTIONS)}")
    values: dict[str, float] = {}
    for key, (low, high) in OPTIONS.items():
        if key in options:
            try:
                values[key] = float(options[key])
            except ValueError:
                raise ValueError(f"{key} must be a number, got {options[key]!r}") from None
            if not low <= values[key] <= high:
                raise ValueError(f"{key} must be between {low:g} and {high:g}")
    chunks = values.get("chunks")
    return values.get("delay_ms", default_delay_ms), None if chunks is None else int(chunks)


def answer_words(messages: Iterable[relay_pb2.UIMessage]) -> list[str]:
    """'Python producer says: <the text of the last user message>', as words."""
    text = ""
    for message in reversed(list(messages)):
        if message.role == relay_pb2.ROLE_USER:
            parts = json.loads(message.parts_json or "[]")
            text = " ".join(str(p.get("text", "")) for p in parts if p.get("type") == "text")
            break
    return f"Python producer says: {text.strip() or 'nothing'}".split()


def script(stream_id: str, words: list[str], count: int | None) -> Iterator[list[str]]:
    """The answer as the model makes it: the framing chunks at once, then one text delta at a
    time, then the closing chunks at once."""
    count = len(words) if count is None else count
    yield [
        chunk({"type": "start", "messageId": f"msg_{stream_id}"}),
        chunk({"type": "start-step"}),
        chunk({"type": "text-start", "id": "t0"}),
    ]
    for i in range(count):
        delta = words[i % len(words)] + (" " if i < count - 1 else "")
        yield [chunk({"type": "text-delta", "id": "t0", "delta": delta})]
    yield [
        chunk({"type": "text-end", "id": "t0"}),
        chunk({"type": "finish-step"}),
        chunk({"type": "finish", "finishReason": "stop"}),
    ]


def chunk(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"))


class TokenCheck(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses a call without `authorization: Bearer <token>` (UNAUTHENTICATED). The digests
    are compared in constant time, so timing tells a caller nothing about the token."""

    def __init__(self, token: str) -> None:
        self._digest = hashlib.sha256(token.encode()).digest()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        presented = dict(details.invocation_metadata or ()).get("authorization", "")
        scheme, _, secret = str(presented).partition(" ")
        digest = hashlib.sha256(secret.encode()).digest()
        if scheme.lower() == "bearer" and hmac.compare_digest(digest, self._digest):
            return await continuation(details)

        async def refuse(request: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid token is required")

        if details.method.endswith("/GenerateMany"):
            return grpc.stream_stream_rpc_method_handler(refuse)
        return grpc.unary_stream_rpc_method_handler(refuse)


def server_credentials(cert: str, key: str, client_ca: str | None = None) -> grpc.ServerCredentials:
    """TLS from PEM files; with `client_ca`, client certificates are required (mutual TLS)."""
    with open(cert, "rb") as chain, open(key, "rb") as private:
        pair = (private.read(), chain.read())
    roots = None
    if client_ca:
        with open(client_ca, "rb") as ca:
            roots = ca.read()
    return grpc.ssl_server_credentials([pair], roots, require_client_auth=roots is not None)


async def start_server(
    servicer: Any,
    address: str = "127.0.0.1:0",
    *,
    token: str | None = None,
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Serves `servicer` (a ProducerServiceServicer) as relay.v1.ProducerService; with
    `token`, only to callers presenting it; with `credentials`, over TLS."""
    server = grpc.aio.server(interceptors=[TokenCheck(token)] if token else [])
    producer_pb2_grpc.add_ProducerServiceServicer_to_server(servicer, server)
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise RuntimeError(f"cannot listen on {address}")
    await server.start()
    return server, port


LOOPBACK = ("127.0.0.1", "::1", "localhost")


async def serve(
    host: str,
    port: int,
    delay_ms: float,
    token: str | None = None,
    credentials: grpc.ServerCredentials | None = None,
    tick_ms: float = DEFAULT_TICK_MS,
) -> None:
    server, bound = await start_server(
        PythonProducer(delay_ms, tick_ms), f"{host}:{port}", token=token, credentials=credentials
    )
    print(f"listening on {host}:{bound}", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await server.stop(grace=5)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50061, help="0 picks a free port (printed)")
    parser.add_argument("--delay-ms", type=float, default=DEFAULT_DELAY_MS)
    parser.add_argument(
        "--tick-ms",
        type=float,
        default=DEFAULT_TICK_MS,
        help="GenerateMany: ready chunks wait at most this long to share a response",
    )
    env = os.environ
    parser.add_argument(
        "--token",
        default=env.get("PRODUCER_TOKEN"),
        help="callers must send `authorization: Bearer <token>` [PRODUCER_TOKEN]; required "
        "unless --host is loopback",
    )
    parser.add_argument("--tls-cert", default=env.get("PRODUCER_TLS_CERT"), help="PEM chain")
    parser.add_argument("--tls-key", default=env.get("PRODUCER_TLS_KEY"), help="PEM key")
    parser.add_argument(
        "--tls-client-ca",
        default=env.get("PRODUCER_TLS_CLIENT_CA"),
        help="PEM CA: require client certificates it signed (mutual TLS)",
    )
    args = parser.parse_args(argv)
    if not args.token and args.host not in LOOPBACK:
        parser.error("listening beyond loopback needs a token (--token or PRODUCER_TOKEN)")
    if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_client_ca and not args.tls_cert):
        parser.error("TLS needs both --tls-cert and --tls-key (and them for --tls-client-ca)")
    credentials = None
    if args.tls_cert:
        try:
            credentials = server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca)
        except OSError as exc:
            parser.error(f"cannot read {exc.filename}: {exc.strerror}")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    asyncio.run(
        serve(args.host, args.port, args.delay_ms, args.token or None, credentials, args.tick_ms)
    )


if __name__ == "__main__":
    main()
