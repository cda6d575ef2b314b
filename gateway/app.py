"""The gateway: AI SDK chat routes mapped onto relay RPCs. It keeps no state of its own.

POST /api/chat                  Start, then Attach from 0: the answer as a UI message stream
GET  /api/chat/{id}/stream      204 without an active stream; else replay (compacted, or from
                                Last-Event-ID part-safe; `?replay=`) and follow
POST /api/chat/{id}/stop        the explicit stop
GET  /api/chat/{id}/messages    the persisted messages
GET  /healthz, /metrics, /      health (relay included), Prometheus text, the demo page
GET  /openapi.json              this interface as an OpenAPI 3.1 document (gateway/openapi.py)

The four /api routes act for the subject the verifier (gateway/auth.py) finds in the request, and
pass it to the relay on every call: the relay refuses another subject's chat as if it did not
exist, which reaches the client as an unknown chat does (404, 204, an empty list, nothing to
stop). Health, metrics, the OpenAPI document and the demo page need no credential.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from opentelemetry import trace
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from gateway import sse
from gateway.auth import ANONYMOUS, AuthConfig, Verifier, build_verifier
from gateway.bodies import (
    idempotency_key,
    parse_chat_request,
    parse_last_event_id,
    parse_replay,
    parse_stop_body,
    read_json,
)
from gateway.errors import (
    HttpError,
    from_relay,
    handle_http_error,
    handle_relay_error,
    handle_starlette_error,
    handle_unexpected,
)
from gateway.metrics import GatewayMetrics
from gateway.openapi import DOCUMENT
from gateway.security import LOOPBACK_HOSTS, PAGE_HEADERS, Cors, Csrf, HostCheck, SecurityHeaders
from gateway.timeouts import BodyTimeout
from relay import tracing
from relay.client import ClientTLS, RelayClient
from relay.client.errors import RelayError, Unavailable
from relay.client.shared_attach import SharedAttach
from relay.domain.model import ChunkBatch, ReplayMode, StopOutcome, StreamEnd, StreamPolicy

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
    # How a resume sends what the answer holds already (`?replay=` overrides it): "compact"
    # merges each part's deltas (one event per part, not one per token); "plain" sends them one
    # by one. Both parse from an empty message, as the AI SDK client resumes (README, "Resume").
    resume_replay: str = "compact"
    cors_origins: tuple[
        str, ...
    ] = ()  # browser origins allowed to call the API (e.g. a Next.js app)
    # A request's body must have arrived this long after its head, else 408 (slow clients).
    body_timeout_s: float = 60.0
    # A reader whose relay goes away mid-answer is re-attached from its offset for this long (a
    # restarting relay): it gets the rest, or the stream's interrupted end, without a resume.
    relay_reconnect_s: float = 30.0
    # The relay's service token (sent as `authorization: Bearer` on every call) and TLS to it.
    relay_token: str | None = field(default=None, repr=False)
    relay_tls: ClientTLS | None = None
    # Who the end user is (gateway/auth.py); anonymous: everyone is the subject "".
    auth: AuthConfig = field(default_factory=AuthConfig)
    # The names the Host header may carry (any port); "*.example.com" matches subdomains.
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    # Concurrent SSE responses (chat and resume), per authenticated subject and in all; past
    # either a request is answered 429 with Retry-After before anything starts.
    max_sse_per_subject: int = 32
    max_sse_total: int = 20_000
    # The stream policy of every Start the gateway makes (None: the relay's defaults). Only the
    # operator sets it: a browser's request cannot (an anonymous one could keep answers forever).
    stream_policy: StreamPolicy | None = None
    # Tracing (relay.tracing): continue the trace context a request's headers carry (traceparent,
    # tracestate, baggage) only when its clients are trusted to set it, e.g. a proxy in front that
    # does; else the headers are dropped and every request starts a trace of its own.
    trace_context_from_clients: bool = False


# What a client refused for too many SSE connections is told to wait (they are long-lived).
SSE_RETRY_AFTER_S = 5


class SseSlots:
    """Counts open SSE responses, per subject and in all. The anonymous subject is everyone in
    anonymous mode: only the total bounds it."""

    def __init__(self, per_subject: int, total: int) -> None:
        self.per_subject = per_subject
        self.total = total
        self.open = 0
        self.by_subject: dict[str, int] = {}

    def acquire(self, subject: str) -> Slot:
        if self.open >= self.total:
            raise _too_many("the gateway is serving as many streams as it may; retry later")
        held = self.by_subject.get(subject, 0)
        if subject != ANONYMOUS and held >= self.per_subject:
            raise _too_many(f"you have {held} streams open, the most allowed; close one first")
        self.open += 1
        self.by_subject[subject] = held + 1
        return Slot(self, subject)

    def release(self, subject: str) -> None:
        self.open -= 1
        left = self.by_subject[subject] - 1
        if left:
            self.by_subject[subject] = left
        else:
            del self.by_subject[subject]


class Slot:
    """One SSE response's place; `release` is idempotent."""

    def __init__(self, slots: SseSlots, subject: str) -> None:
        self._slots: SseSlots | None = slots
        self._subject = subject

    def release(self) -> None:
        if self._slots is not None:
            self._slots.release(self._subject)
            self._slots = None


def _too_many(message: str) -> HttpError:
    return HttpError(
        429, "too_many_streams", message, headers={"retry-after": str(SSE_RETRY_AFTER_S)}
    )


class Gateway:
    def __init__(self, settings: GatewaySettings, relay: RelayClient, verifier: Verifier) -> None:
        self.settings = settings
        self.relay = relay
        self.verifier = verifier
        self.slots = SseSlots(settings.max_sse_per_subject, settings.max_sse_total)
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
        subject = await self.verifier.subject(request)
        slot = self.slots.acquire(subject)  # before anything starts
        try:
            chat = parse_chat_request(await read_json(request, self.settings.max_body_bytes))
            tracing.set_ids(chat.chat_id)  # on the request's span (relay.tracing)
            started = await self.relay.start(
                chat.chat_id,
                chat.messages,
                replace_history=chat.replace_history,
                producer=chat.producer,
                options=chat.options,
                supersede=self.settings.on_live_stream == "supersede",
                request_id=idempotency_key(request.headers.get("idempotency-key")),
                policy=self.settings.stream_policy,
                subject=_named(subject),
                timeout=self.settings.relay_timeout_s,
            )
            self.metrics.streams_started.inc()
            tracing.set_ids(stream_id=started.stream_id)
            # Also for an answer a stop named before it started (`started.stopped_before_start`):
            # its stream has ended already, so the response is its end (abort, [DONE]).
            return await self._stream(started.stream_id, 0, received, subject, slot)
        except BaseException:
            slot.release()
            raise

    async def resume(self, request: Request) -> Response:
        received = time.perf_counter()
        subject = await self.verifier.subject(request)
        chat_id = request.path_params["chat_id"]
        offset = parse_last_event_id(request.headers.get("last-event-id"))
        replay = parse_replay(request.query_params.get("replay"), self.settings.resume_replay)
        slot = self.slots.acquire(subject)
        tracing.set_ids(chat_id)  # on the request's span (relay.tracing)
        try:
            active = await self.relay.get_active(
                chat_id, subject=_named(subject), timeout=self.settings.relay_timeout_s
            )
            tracing.set_ids(stream_id=None if active is None else active.stream_id)
            if active is None:  # also another subject's chat: it does not exist for this one
                slot.release()
                return Response(status_code=204)
            return await self._stream(active.stream_id, offset, received, subject, slot, replay)
        except BaseException:
            slot.release()
            raise

    async def _stream(
        self,
        stream_id: str,
        offset: int,
        received: float,
        subject: str,
        slot: Slot,
        replay: ReplayMode = ReplayMode.EXACT,
    ) -> Response:
        # Returns as soon as the relay accepts the Attach (its errors become HTTP statuses
        # here); chunks, and keep-alives while none comes, follow in the body.
        attached = await self.reads.open_attach(
            stream_id=stream_id, from_offset=offset, replay=replay, subject=_named(subject)
        )
        # x-stream-id lets a client name the stream it means in a later stop.
        headers = {**sse.HEADERS, "x-stream-id": attached.stream_id}
        events = self._reattached(attached.stream_id, offset, attached.events, subject, replay)
        return sse.SseResponse(
            self._relay_events(events, received),
            headers=headers,
            on_close=slot.release,
            source=attached.events,
        )

    async def _reattached(
        self,
        stream_id: str,
        offset: int,
        events: sse.Events,
        subject: str,
        replay: ReplayMode = ReplayMode.EXACT,
    ) -> sse.Events:
        """`events`, and when the relay goes away mid-answer, the same stream re-attached from
        the next offset until `relay_reconnect_s` has passed: a relay that restarts (even after
        a crash) gives the reader the rest of the answer or its interrupted end. Until the first
        chunk has gone out the reader is re-attached as it asked (`replay`: a snapshot first);
        after, exactly from where it is, since its client holds everything before."""
        give_up_at: float | None = None
        pause = 0.05
        while True:
            try:
                async with contextlib.aclosing(events):
                    async for event in events:
                        yield event
                        if isinstance(event, StreamEnd):
                            return
                        offset = event.next_offset
                        replay = ReplayMode.EXACT
                        give_up_at, pause = None, 0.05  # a later outage starts afresh
                return
            except Unavailable:
                if self.draining.is_set():
                    raise
                now = time.monotonic()
                give_up_at = give_up_at or now + self.settings.relay_reconnect_s
                if now >= give_up_at:
                    raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)
            try:
                attached = await self.reads.open_attach(
                    stream_id=stream_id, from_offset=offset, replay=replay, subject=_named(subject)
                )
            except Unavailable as exc:
                events = _failing(exc)
            else:
                events = attached.events
                self.metrics.reattached.inc()

    async def _relay_events(self, events: sse.Events, received: float) -> AsyncIterator[bytes]:
        first = True
        # The request's span when tracing is on (relay.tracing): its first chunk and its end, the
        # relay's reads being on one shared call that is in no request's trace.
        span = trace.get_current_span()
        traced = span.is_recording()

        def on_event(event: ChunkBatch | StreamEnd) -> None:
            nonlocal first
            if first:
                self.metrics.first_chunk.observe(time.perf_counter() - received)
                first = False
                if traced and isinstance(event, ChunkBatch):
                    span.add_event(tracing.FIRST_CHUNK, {tracing.OFFSET: event.first_offset})
            if isinstance(event, ChunkBatch):
                self.metrics.chunks.inc(len(event.chunks))
            elif traced:
                span.add_event(tracing.END, tracing.end_attributes(event))

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
        subject = await self.verifier.subject(request)
        chat_id = request.path_params["chat_id"]
        tracing.set_ids(chat_id)  # on the request's span (relay.tracing)
        body = parse_stop_body(
            await read_json(request, self.settings.max_body_bytes, optional=True)
        )
        began = time.perf_counter()
        result = await self.relay.stop(
            chat_id,
            body.stream_id,
            body.partial,
            request_id=body.request_id,
            message_id=body.message_id,
            subject=_named(subject),
            timeout=self.settings.relay_timeout_s,
        )
        self.metrics.stop_latency.observe(time.perf_counter() - began)
        tracing.set_ids(stream_id=result.stream_id)
        end = result.end
        message = None if end is None else end.message
        # The receipt: the stream's end (final offset, state, why), the message as persisted
        # and the usage the producer reported so far.
        return JSONResponse(
            {
                # This stop ended the answer, or will as soon as it starts.
                "stopped": result.outcome in _STOPPED,
                "outcome": result.outcome.value,
                "streamId": result.stream_id or None,
                "finalOffset": None if end is None else end.final_offset,
                "state": None if end is None else end.state.value,
                "reason": None if end is None else end.reason.label,
                "message": None if message is None else message.to_json(),
                "usage": result.usage,
            }
        )

    async def messages(self, request: Request) -> Response:
        subject = await self.verifier.subject(request)
        chat_id = request.path_params["chat_id"]
        messages = await self.relay.list_messages(
            chat_id, subject=_named(subject), timeout=self.settings.relay_timeout_s
        )
        return JSONResponse({"chatId": chat_id, "messages": [m.to_json() for m in messages]})

    async def healthz(self, request: Request) -> Response:
        try:
            # The relay may leave health open, or not: the token goes along either way.
            status = await self.relay.health("relay.v1.RelayService", timeout=2.0)
        except RelayError as exc:
            error = from_relay(exc)
            return JSONResponse({"status": "unavailable", "relay": error.message}, status_code=503)
        serving = status == "serving"
        return JSONResponse(
            {"status": "ok" if serving else "unavailable", "relay": status},
            status_code=200 if serving else 503,
        )

    async def metrics_text(self, request: Request) -> Response:
        try:
            stats = await self.relay.get_stats(timeout=2.0)
        except RelayError:
            stats = None  # the gateway's own metrics are still worth serving
        return Response(
            self.metrics.render(stats), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(DOCUMENT)

    async def index(self, request: Request) -> Response:
        return FileResponse(
            STATIC / "index.html", headers={"cache-control": "no-cache", **PAGE_HEADERS}
        )

    async def demo_script(self, request: Request) -> Response:
        return FileResponse(
            STATIC / "demo.js",
            media_type="text/javascript; charset=utf-8",
            headers={"cache-control": "no-cache"},
        )

    async def demo_style(self, request: Request) -> Response:
        return FileResponse(
            STATIC / "demo.css",
            media_type="text/css; charset=utf-8",
            headers={"cache-control": "no-cache"},
        )


_STOPPED = (StopOutcome.STOPPED, StopOutcome.STOPPED_BEFORE_START)


def _named(subject: str) -> str | None:
    """The subject as the relay client takes it: the anonymous subject names none."""
    return subject or None


async def _failing(exc: BaseException) -> sse.Events:
    raise exc
    yield  # an async generator that fails at its first read


def _describe(exc: BaseException) -> str:
    if isinstance(exc, RelayError):
        return f"lost the relay mid-stream ({from_relay(exc).message}); resume to continue"
    return "the stream broke in the gateway; resume to continue"


def create_app(
    settings: GatewaySettings | None = None,
    relay: RelayClient | None = None,
    *,
    verifier: Verifier | None = None,
) -> Starlette:
    """The gateway. `verifier`: one already built from `settings.auth` (else built here, reading
    its files; gateway.auth.ConfigError if they are wrong)."""
    settings = settings or GatewaySettings()
    if settings.on_live_stream not in ("supersede", "refuse"):
        raise ValueError("on_live_stream must be 'supersede' or 'refuse'")
    if settings.relay_reads not in ("shared", "per-request"):
        raise ValueError("relay_reads must be 'shared' or 'per-request'")
    if settings.resume_replay not in ("compact", "plain"):
        raise ValueError("resume_replay must be 'compact' or 'plain'")
    if settings.max_sse_per_subject < 1 or settings.max_sse_total < 1:
        raise ValueError("max_sse_per_subject and max_sse_total must be at least 1")
    if not settings.allowed_hosts:
        raise ValueError("allowed_hosts is empty: no request could be served")
    verifier = verifier or build_verifier(settings.auth)

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
    client = relay or RelayClient(
        settings.relay_target, token=settings.relay_token, tls=settings.relay_tls
    )
    gateway = Gateway(settings, client, verifier)
    app = Starlette(
        routes=[
            Route("/api/chat", gateway.chat, methods=["POST"]),
            Route("/api/chat/{chat_id}/stream", gateway.resume, methods=["GET"]),
            Route("/api/chat/{chat_id}/stop", gateway.stop, methods=["POST"]),
            Route("/api/chat/{chat_id}/messages", gateway.messages, methods=["GET"]),
            Route("/healthz", gateway.healthz, methods=["GET"]),
            Route("/metrics", gateway.metrics_text, methods=["GET"]),
            Route("/", gateway.index, methods=["GET"]),
            Route("/demo.js", gateway.demo_script, methods=["GET"]),
            Route("/demo.css", gateway.demo_style, methods=["GET"]),
            Route("/openapi.json", gateway.openapi, methods=["GET"]),
        ],
        exception_handlers={
            HttpError: handle_http_error,
            RelayError: handle_relay_error,
            StarletteHTTPException: handle_starlette_error,
            Exception: handle_unexpected,
        },
        middleware=[
            # None unless tracing is on (relay.tracing).
            *tracing.asgi_middleware(context_from_clients=settings.trace_context_from_clients),
            Middleware(SecurityHeaders),
            Middleware(HostCheck, allowed=settings.allowed_hosts),
            Middleware(Cors, origins=settings.cors_origins),
            Middleware(Csrf, origins=settings.cors_origins),
            Middleware(BodyTimeout, seconds=settings.body_timeout_s),
        ],
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    return app
