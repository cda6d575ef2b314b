"""The ceiling: a bare grpc.aio server-streaming service, no buffer, no store, no producer.

    python -m bench.ceiling --address 127.0.0.1:0

One method, /bench.Ceiling/Stream: the request is JSON {"chunks": n, "batch": b}; the reply is n
40-byte chunks, b per message, in the relay's own wire message (relay.v1.AttachResponse with a
ChunkBatch), so the ceiling differs from the relay only by what the relay does besides gRPC. The
chunks are built once, when the server starts, not per request. Prints {"event": "listening",
"address": ...} on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc

from bench.common import emit, record
from relay.v1 import relay_pb2 as pb

METHOD = "/bench.Ceiling/Stream"
_records: list[str] = []


def _ensure(count: int) -> None:
    _records.extend(record(seq) for seq in range(len(_records), count))


async def stream(request: dict[str, Any], context: Any) -> AsyncIterator[pb.AttachResponse]:
    count, batch = int(request["chunks"]), int(request["batch"])
    _ensure(count)
    for first in range(0, count, batch):
        chunks = _records[first : min(first + batch, count)]
        yield pb.AttachResponse(chunks=pb.ChunkBatch(first_offset=first, chunks=chunks))


async def serve(address: str, prebuild: int) -> None:
    _ensure(prebuild)
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "bench.Ceiling",
        {
            "Stream": grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=json.loads,
                response_serializer=pb.AttachResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(address)
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    emit("listening", address=f"{address.rsplit(':', 1)[0]}:{port}")
    await stopping.wait()
    await server.stop(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", default="127.0.0.1:0")
    parser.add_argument("--prebuild", type=int, default=200_000, help="chunks built at start")
    args = parser.parse_args()
    asyncio.run(serve(args.address, args.prebuild))


if __name__ == "__main__":
    main()
