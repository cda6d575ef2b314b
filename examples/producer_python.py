"""A ProducerService in Python (grpc.aio): the relay's `grpc` producer kind, implemented.

It streams "Python producer says: <the last user message>" one word per text delta, framed by
start / start-step / text-start ... text-end / finish-step / finish, as AI SDK UI message chunks.
Options: `delay_ms` (pause before each response, default 30) and `chunks` (number of text
deltas; the words repeat to fill it). Other options are INVALID_ARGUMENT.

When the relay cancels the call (the user pressed Stop, a new answer superseded this one, the relay
shut down), the handler gets a CancelledError at its next await: it stops at once and logs
`cancelled <stream_id>`. A real backend would close its model request there.

    .venv/bin/python examples/producer_python.py --port 50061

and in the relay's producers file (`--producers producers.toml`):

    [producers.python]
    kind = "grpc"
    target = "127.0.0.1:50061"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from relay.v1 import producer_pb2, producer_pb2_grpc, relay_pb2

log = logging.getLogger("producer_python")

DEFAULT_DELAY_MS = 30.0
OPTIONS = {"delay_ms": (0.0, 60_000.0), "chunks": (1, 1_000_000)}


@dataclass
class CallRecord:
    """What happened to one Generate call, for whoever watches the servicer (tests, logs)."""

    request: producer_pb2.GenerateRequest
    started: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    responses_sent: int = 0


class PythonProducer(producer_pb2_grpc.ProducerServiceServicer):
    def __init__(self, default_delay_ms: float = DEFAULT_DELAY_MS) -> None:
        self.default_delay_ms = default_delay_ms
        self.calls: dict[str, CallRecord] = {}  # by stream id

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
            for chunks in script(request.stream_id, answer_words(request.messages), count):
                await asyncio.sleep(delay_ms / 1000)
                await context.write(producer_pb2.GenerateResponse(chunks=chunks))
                record.responses_sent += 1
        except asyncio.CancelledError:
            record.cancelled.set()
            log.info("cancelled %s", request.stream_id)
            raise
        finally:
            record.finished.set()
        log.info("done %s", request.stream_id)


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
    """The answer as responses: the framing chunks batched, then one text delta per response."""
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


async def start_server(servicer: Any, address: str = "127.0.0.1:0") -> tuple[grpc.aio.Server, int]:
    """Serves `servicer` (anything with an async Generate) as relay.v1.ProducerService."""
    server = grpc.aio.server()
    producer_pb2_grpc.add_ProducerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"cannot listen on {address}")
    await server.start()
    return server, port


async def serve(host: str, port: int, delay_ms: float) -> None:
    server, bound = await start_server(PythonProducer(delay_ms), f"{host}:{port}")
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    asyncio.run(serve(args.host, args.port, args.delay_ms))


if __name__ == "__main__":
    main()
