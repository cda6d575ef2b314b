"""The gateway: AI SDK chat routes mapped onto relay RPCs. It keeps no state of its own.

POST /api/chat                  Start, then Attach from 0: the answer as a UI message stream
GET  /api/chat/{id}/stream      204 without an active stream; else replay and follow
POST /api/chat/{id}/stop        the explicit stop
GET  /api/chat/{id}/messages    the persisted messages
GET  /healthz, /metrics, /      health (relay included), Prometheus text, the demo page
GET  /openapi.json              this interface as an OpenAPI 3.1 document (gateway/openapi.py)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from gateway import sse
from gateway.bodies import (
    idempotency_key,
    parse_chat_request,
    parse_last_event_id,
    parse_stop_body,
    read_json,
)
from gateway.errors import (
    HttpError,
    from_grpc,
    handle_grpc_error,
    handle_http_error,
    handle_starlette_error,
)
from gateway.metrics import GatewayMetrics
from gateway.openapi import DOCUMENT
from gateway.timeouts import BodyTimeout
from relay.client import RelayClient
from relay.client.shared_attach import SharedAttach
from relay.domain.model import ChunkBatch, StopOutcome, StreamEnd

STATIC = Path(__file__).resolve().parent / "static"


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    relay_target: str = "127.0.0.1:50051"
    max_body_bytes: int = 8 * 1024 * 1024
    keepalive_s: float = 15.0
    # A POST for a chat whose answer is still live: "supersede" stops the old answer (the stock
    # client's stop() never tells the server, so refusing would break the user's next message);
    # "refuse" answers 409.
    on_live_stream: str = "supersede"
    relay_timeout_s: float = 30.0
    # "shared": every SSE reader is a subscription of one AttachMany call (one message carries the
    # news of many streams); "per-request": one Attach call per SSE response.
    relay_reads: str = "shared"
    cors_origins: tuple[
        str, ...
    ] = ()  # browser origins allowed to call the API (e.g. a Next.js app)
    # A request's body must have arrived this long after its head, else 408 (slow clients).
    body_timeout_s: float = 60.0
    # A reader whose relay goes away mid-answer is re-attached from its offset for this long (a
    # restarting relay): it gets the rest, or the stream's interrupted end, without a resume.
    relay_reconnect_s: float = 30.0


class Gateway:
    def __init__(self, settings: GatewaySettings, relay: RelayClient) -> None:
        self.settings = settings
        self.relay = relay
        self.reads: RelayClient | SharedAttach = (
            SharedAttach(relay) if settings.relay_reads == "shared" else relay
        )
        self.metrics = GatewayMetrics()
        self.draining = asyncio.Event()

    def drain(self) -> None:
        """Shutting down: every SSE response ends now, telling its client to resume (it would
        otherwise hold the server's graceful shutdown until it is cut without an end)."""
        self.draining.set()

    async def chat(self, request: Request) -> Response:
        received = time.perf_counter()
        chat = parse_chat_request(await read_json(request, self.settings.max_body_bytes))
        started = await self.relay.start(
            chat.chat_id,
            chat.messages,
            replace_history=chat.replace_history,
            producer=chat.producer,
            options=chat.options,
            supersede=self.settings.on_live_stream == "supersede",
            request_id=idempotency_key(request.headers.get("idempotency-key")),
            timeout=self.settings.relay_timeout_s,
        )
        self.metrics.streams_started.inc()
        return await self._stream(started.stream_id, 0, received)

    async def resume(self, request: Request) -> Response:
        received = time.perf_counter()
        chat_id = request.path_params["chat_id"]
        offset = parse_last_event_id(request.headers.get("last-event-id"))
        active = await self.relay.get_active(chat_id, timeout=self.settings.relay_timeout_s)
        if active is None:
            return Response(status_code=204)
        return await self._stream(active.stream_id, offset, received)

    async def _stream(self, stream_id: str, offset: int, received: float) -> Response:
        # Returns as soon as the relay accepts the Attach (its errors become HTTP statuses
        # here); chunks, and keep-alives while none comes, follow in the body.
        attached = await self.reads.open_attach(stream_id=stream_id, from_offset=offset)
        # x-stream-id lets a client name the stream it means in a later stop.
        headers = {**sse.HEADERS, "x-stream-id": attached.stream_id}
        events = self._reattached(attached.stream_id, offset, attached.events)
        return sse.SseResponse(self._relay_events(events, received), headers=headers)

    async def _reattached(self, stream_id: str, offset: int, events: sse.Events) -> sse.Events:
        """`events`, and when the relay goes away mid-answer, the same stream re-attached from
        the next offset until `relay_reconnect_s` has passed: a relay that restarts (even after
        a crash) gives the reader the rest of the answer or its interrupted end."""
        give_up_at: float | None = None
        pause = 0.05
        while True:
            try:
                async with contextlib.aclosing(events):
                    async for event in events:
                        yield event
                        if isinstance(event, StreamEnd):
                            return
                        offset += len(event.chunks)
                        give_up_at, pause = None, 0.05  # a later outage starts afresh
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.UNAVAILABLE or self.draining.is_set():
                    raise
                now = time.monotonic()
                give_up_at = give_up_at or now + self.settings.relay_reconnect_s
                if now >= give_up_at:
                    raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)
            try:
                attached = await self.reads.open_attach(stream_id=stream_id, from_offset=offset)
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.UNAVAILABLE:
                    raise
                events = _failing(exc)
            else:
                events = attached.events
                self.metrics.reattached.inc()

    async def _relay_events(self, events: sse.Events, received: float) -> AsyncIterator[bytes]:
        first = True

        def on_event(event: ChunkBatch | StreamEnd) -> None:
            nonlocal first
            if first:
                self.metrics.first_chunk.observe(time.perf_counter() - received)
                first = False
            if isinstance(event, ChunkBatch):
                self.metrics.chunks.inc(len(event.chunks))

        self.metrics.readers.inc()
        try:
            async for data in sse.stream_events(
                events,
                keepalive_s=self.settings.keepalive_s,
                on_event=on_event,
                on_error=_describe,
                draining=self.draining,
            ):
                yield data
        finally:
            self.metrics.readers.dec()

    async def stop(self, request: Request) -> Response:
        chat_id = request.path_params["chat_id"]
        body = parse_stop_body(
            await read_json(request, self.settings.max_body_bytes, optional=True)
        )
        began = time.perf_counter()
        result = await self.relay.stop(
            chat_id, body.stream_id, body.partial, timeout=self.settings.relay_timeout_s
        )
        self.metrics.stop_latency.observe(time.perf_counter() - began)
        end = result.end
        return JSONResponse(
            {
                "stopped": result.outcome is StopOutcome.STOPPED,
                "outcome": result.outcome.value,
                "streamId": result.stream_id or None,
                "finalOffset": None if end is None else end.final_offset,
                "state": None if end is None else end.state.value,
            }
        )

    async def messages(self, request: Request) -> Response:
        chat_id = request.path_params["chat_id"]
        messages = await self.relay.list_messages(chat_id, timeout=self.settings.relay_timeout_s)
        return JSONResponse({"chatId": chat_id, "messages": [m.to_json() for m in messages]})

    async def healthz(self, request: Request) -> Response:
        health = health_pb2_grpc.HealthStub(self.relay.channel)
        try:
            reply = await health.Check(
                health_pb2.HealthCheckRequest(service="relay.v1.RelayService"), timeout=2.0
            )
        except grpc.aio.AioRpcError as exc:
            error = from_grpc(exc)
            return JSONResponse({"status": "unavailable", "relay": error.message}, status_code=503)
        serving = reply.status == health_pb2.HealthCheckResponse.SERVING
        return JSONResponse(
            {
                "status": "ok" if serving else "unavailable",
                "relay": health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status).lower(),
            },
            status_code=200 if serving else 503,
        )

    async def metrics_text(self, request: Request) -> Response:
        try:
            stats = await self.relay.get_stats(timeout=2.0)
        except grpc.aio.AioRpcError:
            stats = None  # the gateway's own metrics are still worth serving
        return Response(
            self.metrics.render(stats), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(DOCUMENT)

    async def index(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})


async def _failing(exc: BaseException) -> sse.Events:
    raise exc
    yield  # an async generator that fails at its first read


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"lost the relay mid-stream ({from_grpc(exc).message}); resume to continue"
    return "the stream broke in the gateway; resume to continue"


def create_app(
    settings: GatewaySettings | None = None, relay: RelayClient | None = None
) -> Starlette:
    settings = settings or GatewaySettings()
    if settings.on_live_stream not in ("supersede", "refuse"):
        raise ValueError("on_live_stream must be 'supersede' or 'refuse'")
    if settings.relay_reads not in ("shared", "per-request"):
        raise ValueError("relay_reads must be 'shared' or 'per-request'")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if isinstance(gateway.reads, SharedAttach):
                await gateway.reads.close()
            if owns_client:
                await client.close()

    owns_client = relay is None
    client = relay or RelayClient(settings.relay_target)
    gateway = Gateway(settings, client)
    app = Starlette(
        routes=[
            Route("/api/chat", gateway.chat, methods=["POST"]),
            Route("/api/chat/{chat_id}/stream", gateway.resume, methods=["GET"]),
            Route("/api/chat/{chat_id}/stop", gateway.stop, methods=["POST"]),
            Route("/api/chat/{chat_id}/messages", gateway.messages, methods=["GET"]),
            Route("/healthz", gateway.healthz, methods=["GET"]),
            Route("/metrics", gateway.metrics_text, methods=["GET"]),
            Route("/", gateway.index, methods=["GET"]),
            Route("/openapi.json", gateway.openapi, methods=["GET"]),
        ],
        exception_handlers={
            HttpError: handle_http_error,
            grpc.aio.AioRpcError: handle_grpc_error,
            StarletteHTTPException: handle_starlette_error,
        },
        middleware=[
            *(
                [
                    Middleware(
                        CORSMiddleware,
                        allow_origins=list(settings.cors_origins),
                        allow_methods=["GET", "POST"],
                        allow_headers=["*"],
                        expose_headers=["x-vercel-ai-ui-message-stream", "x-stream-id"],
                    )
                ]
                if settings.cors_origins
                else []
            ),
            Middleware(BodyTimeout, seconds=settings.body_timeout_s),
        ],
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    return app
