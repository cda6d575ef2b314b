"""OpenTelemetry tracing (relay.tracing): the span tree of a chat turn, a resume and a stop, from
the gateway's HTTP span through the relay to the producer (a grpc backend, the openai upstream),
recorded by an in-memory exporter, every span ended when its call or request ends (with the
call's status when it failed); a browser's trace context ignored unless trusted; an exit that does
not wait for an unreachable collector; and nothing installed while the OTEL_* variables leave it
off.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from gateway.app import GatewaySettings, create_app
from relay import tracing
from relay.client import RelayClient
from relay.client.errors import NotFound, Unavailable
from relay.producers import EchoProducer, Producer
from relay.producers.grpc_producer import GrpcProducer
from relay.producers.openai import OpenAIProducer
from relay.producers.profiles import build_producer
from relay.v1 import producer_pb2, producer_pb2_grpc
from tests.conftest import collect, eventually, running_relay, user
from tests.test_gateway import JSON_TYPE, SseReader, serve
from tests.test_openai_producer import (
    DONE,
    KEY_ENV,
    SECRET,
    FakeUpstream,
    delta,
    finish,
    openai_profile,
)
from tests.test_openai_producer import upstream as upstream

START = "/relay.v1.RelayService/Start"
ATTACH = "/relay.v1.RelayService/Attach"
STOP = "/relay.v1.RelayService/Stop"
GET_ACTIVE = "/relay.v1.RelayService/GetActive"
GENERATE = "/relay.v1.ProducerService/Generate"


class OpenSpans(SpanProcessor):
    """The spans started and not yet ended."""

    def __init__(self) -> None:
        self.spans: dict[int, Any] = {}
        self.started = 0

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self.started += 1
        self.spans[span.context.span_id] = span

    def on_end(self, span: ReadableSpan) -> None:
        assert span.context is not None
        self.spans.pop(span.context.span_id, None)

    def names(self) -> list[tuple[str, SpanKind]]:
        return sorted(((s.name, s.kind) for s in self.spans.values()), key=str)


@pytest.fixture
def provider() -> Iterator[TracerProvider]:
    """Tracing on for what the test makes (OpenTelemetry's global provider is left alone)."""
    provider = TracerProvider()
    tracing.install(provider)
    try:
        yield provider
    finally:
        tracing.uninstall()
        provider.shutdown()


@pytest.fixture
def exporter(provider: TracerProvider) -> InMemorySpanExporter:
    """The ended spans, in memory."""
    spans = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    return spans


@pytest.fixture
def open_spans(provider: TracerProvider) -> OpenSpans:
    open_spans = OpenSpans()
    provider.add_span_processor(open_spans)
    return open_spans


@pytest.fixture
def no_gc() -> Iterator[None]:
    """No cycle collection: a span is ended by what the tracing does, not by the collector
    closing a forgotten reader (the instrumentation's own way, which a test would not see
    failing otherwise)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def sdk_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the SDK logs of a span used after its end ("Setting attribute on ended span",
    "Calling end() on an ended span"). Not opentelemetry.context's "Failed to detach context":
    the instrumentation's aio server interceptor logs it at times for a server-streaming call
    its client cancels, when grpc closes the handler's generator in another task
    (open-telemetry/opentelemetry-python-contrib#2357, grpc/grpc#42295); its span ends all
    the same."""
    return [r.getMessage() for r in caplog.records if r.name.startswith("opentelemetry.sdk")]


class Tree:
    """The finished spans, looked up by name and kind."""

    def __init__(self, spans: Sequence[ReadableSpan]) -> None:
        self.spans = list(spans)

    def named(self, name: str, kind: SpanKind | None = None) -> list[Any]:
        return [s for s in self.spans if s.name == name and (kind is None or s.kind is kind)]

    def one(self, name: str, kind: SpanKind | None = None, trace_id: int | None = None) -> Any:
        found = [
            s
            for s in self.named(name, kind)
            if trace_id is None or (s.context is not None and s.context.trace_id == trace_id)
        ]
        assert len(found) == 1, (name, kind, sorted({s.name for s in self.spans}))
        return found[0]

    def in_trace(self, trace_id: int) -> list[ReadableSpan]:
        return [s for s in self.spans if s.context is not None and s.context.trace_id == trace_id]


def child_of(child: Any, parent: Any) -> bool:
    return bool(
        child.parent is not None
        and child.parent.span_id == parent.context.span_id
        and child.context.trace_id == parent.context.trace_id
    )


def ids(span: Any) -> tuple[Any, Any]:
    """The chat and stream ids a span names."""
    return span.attributes.get(tracing.CHAT_ID), span.attributes.get(tracing.STREAM_ID)


def event(span: Any, name: str) -> dict[str, Any]:
    found = [e for e in span.events if e.name == name]
    assert len(found) == 1, (name, [e.name for e in span.events])
    return dict(found[0].attributes or {})


def chunk(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"))


class Backend(producer_pb2_grpc.ProducerServiceServicer):
    """A producer backend: `chunks` text deltas, `delay_ms` apart. Its Generate is an async
    generator: the grpc instrumentation's aio server interceptor handles no other kind of
    server-streaming handler (one that calls `context.write` fails under it)."""

    async def Generate(
        self, request: producer_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[producer_pb2.GenerateResponse]:
        options = dict(request.options)
        head = [{"type": "start"}, {"type": "start-step"}, {"type": "text-start", "id": "t"}]
        yield producer_pb2.GenerateResponse(chunks=[chunk(c) for c in head])
        if "fail" in options:
            await context.abort(grpc.StatusCode.INTERNAL, options["fail"])
        for i in range(int(options.get("chunks", "5"))):
            await asyncio.sleep(float(options.get("delay_ms", "0")) / 1000)
            text = chunk({"type": "text-delta", "id": "t", "delta": f"w{i} "})
            yield producer_pb2.GenerateResponse(chunks=[text])
        tail = [{"type": "text-end", "id": "t"}, {"type": "finish-step"}, {"type": "finish"}]
        yield producer_pb2.GenerateResponse(chunks=[chunk(c) for c in tail])

    async def GenerateMany(
        self, request_iterator: Any, context: Any
    ) -> AsyncIterator[producer_pb2.GenerateManyResponse]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        yield producer_pb2.GenerateManyResponse()  # never: an async generator, as Generate


@asynccontextmanager
async def traced_backend() -> AsyncIterator[str]:
    """A producer backend whose server is traced, as a producer in any language may be."""
    server = grpc.aio.server(interceptors=tracing.server_interceptors())
    producer_pb2_grpc.add_ProducerServiceServicer_to_server(Backend(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=0)


@pytest.mark.usefixtures("no_gc")
@pytest.mark.parametrize("reads", ["per-request", "shared"])
async def test_a_chat_turn_a_resume_and_a_stop_are_traced_from_the_gateway_to_the_producer(
    tmp_path: Path,
    exporter: InMemorySpanExporter,
    open_spans: OpenSpans,
    caplog: pytest.LogCaptureFixture,
    reads: str,
) -> None:
    caplog.set_level(logging.WARNING, "opentelemetry")
    async with traced_backend() as target:
        backend = GrpcProducer(target, name="backend")
        producers: dict[str, Producer] = {"echo": EchoProducer(delay_ms=0), "backend": backend}
        try:
            async with running_relay(tmp_path / "relay.sqlite3", producers) as running:
                settings = GatewaySettings(
                    relay_target=f"127.0.0.1:{running.server.port}", relay_reads=reads
                )
                server, task, url = await serve(create_app(settings))
                try:
                    async with httpx.AsyncClient(timeout=10) as http:
                        await _turn_resume_and_stop(http, url)
                finally:
                    server.should_exit = True
                    await task
        finally:
            await backend.close()

    # Every span ended, when its call or request did: none is left for the garbage collector
    # (off: `no_gc`), none was ended twice or changed after its end.
    assert open_spans.names() == []
    assert len(exporter.get_finished_spans()) == open_spans.started
    assert sdk_warnings(caplog) == []
    tree = Tree(exporter.get_finished_spans())
    # Nothing failed: the calls the relay client cancels once it has its stream's end, and the
    # producer's call a stop cancels, are no errors.
    assert [s.name for s in tree.spans if s.status.status_code is StatusCode.ERROR] == []

    # The turn: one trace from the HTTP request down to the producer's own server span.
    [start] = [
        s for s in tree.named(START, SpanKind.SERVER) if s.attributes[tracing.CHAT_ID] == "chat-1"
    ]
    turn = start.context.trace_id
    post = tree.one("POST /api/chat", SpanKind.SERVER, turn)
    assert post.parent is None
    start_client = tree.one(START, SpanKind.CLIENT, turn)
    generate_client = tree.one(GENERATE, SpanKind.CLIENT, turn)
    generate = tree.one(GENERATE, SpanKind.SERVER, turn)
    assert child_of(start_client, post)
    assert child_of(start, start_client)
    assert child_of(generate_client, start)  # the producer's task runs in the Start's context
    assert child_of(generate, generate_client)  # its metadata carried the trace context
    assert start.attributes[tracing.CHAT_ID] == "chat-1"
    stream_id = start.attributes[tracing.STREAM_ID]
    assert len(stream_id) == 32
    assert event(post, tracing.FIRST_CHUNK) == {tracing.OFFSET: 0}
    assert event(post, tracing.END)[tracing.STATE] == "COMPLETED"
    # The request's span names the chat and the stream, however the gateway reads the relay.
    assert ids(post) == ("chat-1", stream_id)
    if reads == "per-request":
        attach_client = tree.one(ATTACH, SpanKind.CLIENT, turn)
        attach = tree.one(ATTACH, SpanKind.SERVER, turn)
        assert child_of(attach_client, post) and child_of(attach, attach_client)
        assert attach.attributes[tracing.STREAM_ID] == stream_id
        assert attach.attributes[tracing.FROM_OFFSET] == 0
        assert event(attach, tracing.FIRST_CHUNK) == {tracing.OFFSET: 0}
        end = event(attach, tracing.END)
        assert end[tracing.STATE] == "COMPLETED" and end[tracing.OFFSET] == 11
        assert end[tracing.REASON] == "finished"
    # AttachMany, the gateway's one call for every reader, is in no trace.
    assert not tree.named("/relay.v1.RelayService/AttachMany")
    # Health and metrics are not traced.
    assert not [s for s in tree.spans if "healthz" in s.name or "metrics" in s.name]

    # The resume: its own trace, GetActive then (per request) an Attach of the live stream.
    resume = tree.one("GET /api/chat/{chat_id}/stream", SpanKind.SERVER)
    assert resume.parent is None
    resumed = resume.context.trace_id
    get_active = tree.one(GET_ACTIVE, SpanKind.SERVER, resumed)
    assert child_of(get_active, tree.one(GET_ACTIVE, SpanKind.CLIENT, resumed))
    assert child_of(tree.one(GET_ACTIVE, SpanKind.CLIENT, resumed), resume)
    starts = tree.named(START, SpanKind.SERVER)
    [live_start] = [s for s in starts if s.attributes[tracing.CHAT_ID] == "chat-2"]
    live_stream = live_start.attributes[tracing.STREAM_ID]
    assert event(resume, tracing.FIRST_CHUNK)[tracing.OFFSET] == 0
    assert event(resume, tracing.END)[tracing.STATE] == "STOPPED"
    # The chat and the stream it found, on the request's span and the relay's GetActive: the
    # resume's trace leads to the turn's in either mode (shared: it has no Attach of its own).
    assert ids(resume) == ("chat-2", live_stream)
    assert ids(get_active) == ("chat-2", live_stream)
    if reads == "per-request":
        attach = tree.one(ATTACH, SpanKind.SERVER, resumed)
        assert attach.attributes[tracing.STREAM_ID] == live_stream
        assert event(attach, tracing.END)[tracing.STATE] == "STOPPED"

    # The stop: its own trace, the outcome on the relay's Stop span.
    stop_http = tree.one("POST /api/chat/{chat_id}/stop", SpanKind.SERVER)
    stopped = stop_http.context.trace_id
    stop = tree.one(STOP, SpanKind.SERVER, stopped)
    assert child_of(stop, tree.one(STOP, SpanKind.CLIENT, stopped))
    assert child_of(tree.one(STOP, SpanKind.CLIENT, stopped), stop_http)
    assert stop.attributes[tracing.CHAT_ID] == "chat-2"
    assert stop.attributes[tracing.STREAM_ID] == live_stream
    assert stop.attributes[tracing.OUTCOME] == "stopped"
    assert ids(stop_http) == ("chat-2", live_stream)
    assert event(stop, tracing.END)[tracing.STATE] == "STOPPED"

    # Nothing per chunk: every span is an RPC's or a request's, a handful per turn.
    assert len(tree.in_trace(turn)) <= 8


async def _turn_resume_and_stop(http: httpx.AsyncClient, url: str) -> None:
    def body(chat_id: str, text: str, **options: str) -> dict[str, Any]:
        message = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": text}]}
        return {"id": chat_id, "messages": [message], "producer": "backend", "options": options}

    # A whole turn: 5 deltas, 11 chunks.
    async with http.stream(
        "POST", url + "/api/chat", json=body("chat-1", "hello", chunks="5"), headers=JSON_TYPE
    ) as response:
        assert response.status_code == 200
        events = await SseReader(response).rest()
        assert events[-1].chunk["type"] == "finish"
    assert (await http.get(url + "/healthz")).status_code == 200
    assert (await http.get(url + "/metrics")).status_code == 200

    # A slow answer, left by its client, resumed, then stopped.
    slow = body("chat-2", "take your time", chunks="100", delay_ms="50")
    async with http.stream("POST", url + "/api/chat", json=slow, headers=JSON_TYPE) as response:
        await SseReader(response).next()
    async with http.stream("GET", url + "/api/chat/chat-2/stream") as response:
        reader = SseReader(response)
        await reader.next()
        stop = await http.post(url + "/api/chat/chat-2/stop", headers=JSON_TYPE)
        assert stop.status_code == 200
        events = await reader.rest()
        assert events[-1].chunk["type"] == "abort"


async def test_the_openai_producers_upstream_request_is_in_the_starts_trace(
    tmp_path: Path,
    exporter: InMemorySpanExporter,
    upstream: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    producer = build_producer(openai_profile("gpt", upstream.url, idle_timeout_s=10))
    assert isinstance(producer, OpenAIProducer)
    reply = upstream.expect()
    reply.put(delta(role="assistant", content="Hi"), finish("stop"), DONE, None)
    producers: dict[str, Producer] = {"echo": EchoProducer(delay_ms=0), "gpt": producer}
    async with running_relay(tmp_path / "relay.sqlite3", producers) as running:
        started = await running.client.start("chat-1", [user("hi")], producer="gpt")
        await collect(running.client.attach(stream_id=started.stream_id))
        await eventually(lambda: any(s.name == "POST" for s in exporter.get_finished_spans()))

    tree = Tree(exporter.get_finished_spans())
    start = tree.one(START, SpanKind.SERVER)
    assert start.attributes[tracing.STREAM_ID] == started.stream_id
    upstream_span = tree.one("POST", SpanKind.CLIENT)
    assert child_of(upstream_span, start)
    assert upstream_span.attributes["http.url"] == upstream.url + "/chat/completions"
    # The trace context went with the request: the upstream could continue the trace.
    assert reply.request is not None
    traceparent = reply.request.headers["traceparent"]
    assert traceparent.split("-")[1] == f"{start.context.trace_id:032x}"
    assert traceparent.split("-")[2] == f"{upstream_span.context.span_id:016x}"


# -- a streaming call's span ends with the call, with its status -------------------------------


def client_span(tree: Tree, name: str) -> Any:
    return tree.one(name, SpanKind.CLIENT)


def failed_with(span: Any, code: grpc.StatusCode) -> bool:
    return bool(
        span.status.status_code is StatusCode.ERROR
        and span.attributes[tracing.RPC_GRPC_STATUS_CODE] == code.value[0]
        and code.name in (span.status.description or "")
    )


async def test_a_refused_attach_is_an_error_span(
    tmp_path: Path,
    exporter: InMemorySpanExporter,
    open_spans: OpenSpans,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "opentelemetry")
    async with running_relay(tmp_path / "relay.sqlite3", {"echo": EchoProducer()}) as running:
        with pytest.raises(NotFound):
            await running.client.open_attach(stream_id="0" * 32)
        await eventually(lambda: bool(exporter.get_finished_spans()))
    attach = client_span(Tree(exporter.get_finished_spans()), ATTACH)
    assert failed_with(attach, grpc.StatusCode.NOT_FOUND), (attach.status, attach.attributes)
    assert open_spans.names() == []
    assert sdk_warnings(caplog) == []


async def test_an_attach_cut_by_the_relays_stop_is_an_error_span(
    tmp_path: Path,
    exporter: InMemorySpanExporter,
    open_spans: OpenSpans,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "opentelemetry")
    async with running_relay(
        tmp_path / "relay.sqlite3", {"echo": EchoProducer(delay_ms=200)}
    ) as running:
        client = RelayClient(f"127.0.0.1:{running.server.port}")
        try:
            started = await client.start("chat-1", [user("a b c d e f g h i j k l m n o p")])
            attached = await client.open_attach(stream_id=started.stream_id)
            async with contextlib.aclosing(attached.events) as events:
                await anext(events)
                await running.server.stop(grace=0)  # a relay restarting, mid-answer
                with pytest.raises(Unavailable):
                    async for _ in events:
                        pass
        finally:
            await client.close()
    attach = client_span(Tree(exporter.get_finished_spans()), ATTACH)
    assert failed_with(attach, grpc.StatusCode.UNAVAILABLE), (attach.status, attach.attributes)
    assert [n for n in open_spans.names() if n[1] is SpanKind.CLIENT] == []
    assert sdk_warnings(caplog) == []


async def test_a_failing_producer_backend_is_an_error_span(
    tmp_path: Path,
    exporter: InMemorySpanExporter,
    open_spans: OpenSpans,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "opentelemetry")
    async with traced_backend() as target:
        backend = GrpcProducer(target, name="backend")
        try:
            producers: dict[str, Producer] = {"echo": EchoProducer(), "backend": backend}
            async with running_relay(tmp_path / "relay.sqlite3", producers) as running:
                started = await running.client.start(
                    "chat-1", [user("hi")], producer="backend", options={"fail": "it broke"}
                )
                _, end = await collect(running.client.attach(stream_id=started.stream_id))
                assert end.state.name == "FAILED"
        finally:
            await backend.close()
    tree = Tree(exporter.get_finished_spans())
    generate = client_span(tree, GENERATE)
    assert failed_with(generate, grpc.StatusCode.INTERNAL), (generate.status, generate.attributes)
    assert tree.one(GENERATE, SpanKind.SERVER).status.status_code is StatusCode.ERROR
    assert open_spans.names() == []
    assert sdk_warnings(caplog) == []


@pytest.mark.usefixtures("no_gc")
async def test_a_call_whose_responses_are_never_read_ends_its_span(
    tmp_path: Path, exporter: InMemorySpanExporter, open_spans: OpenSpans
) -> None:
    async with running_relay(tmp_path / "relay.sqlite3", {"echo": EchoProducer()}) as running:
        client = RelayClient(f"127.0.0.1:{running.server.port}")
        started = await client.start("chat-1", [user("hello there")])
        attached = await client.open_attach(stream_id=started.stream_id)
        await attached.events.aclose()  # not a single read
        await client.close()  # the call ends with its channel
        await eventually(lambda: not open_spans.names())
    attach = client_span(Tree(exporter.get_finished_spans()), ATTACH)
    assert attach.status.status_code is not StatusCode.ERROR


def test_the_calls_of_no_turn_are_not_traced() -> None:
    """Health, reflection, GetStats, and the calls every reader or answer shares (AttachMany,
    GenerateMany): each would otherwise be a span of the first turn that opened it."""
    traced = tracing._untraced_filter()

    class Details:
        def __init__(self, method: str) -> None:
            self.method = method

    assert traced(Details(START)) and traced(Details(ATTACH)) and traced(Details(GENERATE))
    for name in (
        "/relay.v1.RelayService/AttachMany",
        "/relay.v1.ProducerService/GenerateMany",
        "/relay.v1.RelayService/GetStats",
        "/grpc.health.v1.Health/Check",
    ):
        assert not traced(Details(name)), name


# -- the patched instrumentation ---------------------------------------------------------------


def test_installing_checks_the_grpc_instrumentation_it_patches(
    provider: TracerProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opentelemetry.instrumentation.grpc import _aio_client

    base = _aio_client._BaseAioClientInterceptor
    tracing.check_grpc_instrumentation()  # the pinned version: fine
    tracing.install(provider)

    async def changed(self: Any, span: Any, call: Any, hook: Any) -> AsyncIterator[Any]:
        yield None

    monkeypatch.setattr(base, "_wrap_stream_response", changed)
    with pytest.raises(
        tracing.TracingError, match=r"_wrap_stream_response\(self, span, call, hook\) changed"
    ):
        tracing.install(provider)
    monkeypatch.delattr(base, "_wrap_stream_response")
    with pytest.raises(tracing.TracingError, match="_wrap_stream_response is gone"):
        tracing.install(provider)


# -- trace context from clients ----------------------------------------------------------------

PARENT_TRACE = 0x0AF7651916CD43DD8448EB211C80319C
TRACEPARENT = f"00-{PARENT_TRACE:032x}-b7ad6b7169203331-01"


@pytest.mark.parametrize("trusted", [False, True])
async def test_a_requests_trace_context_is_continued_only_from_trusted_clients(
    exporter: InMemorySpanExporter, trusted: bool
) -> None:
    app = create_app(GatewaySettings(trace_context_from_clients=trusted))
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            headers = {"traceparent": TRACEPARENT, "tracestate": "k=v", "baggage": "user=eve"}
            response = await http.get("/openapi.json", headers=headers)
            assert response.status_code == 200
    finally:
        await app.state.gateway.relay.channel.close()
    span = Tree(exporter.get_finished_spans()).one("GET /openapi.json", SpanKind.SERVER)
    if trusted:
        assert span.context.trace_id == PARENT_TRACE
        assert span.parent is not None and span.parent.is_remote
    else:
        assert span.context.trace_id != PARENT_TRACE
        assert span.parent is None


def test_the_gateway_flag_trusts_clients_trace_context(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.server import parse_args, settings_of

    monkeypatch.delenv("GATEWAY_TRACE_CONTEXT_FROM_CLIENTS", raising=False)
    assert settings_of(parse_args([])).trace_context_from_clients is False
    assert settings_of(parse_args(["--trace-context-from-clients"])).trace_context_from_clients
    monkeypatch.setenv("GATEWAY_TRACE_CONTEXT_FROM_CLIENTS", "1")
    assert settings_of(parse_args([])).trace_context_from_clients is True


# -- exit ---------------------------------------------------------------------------------------


def test_shutdown_with_an_unreachable_collector_is_bounded(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The OTLP exporter retries an unreachable collector until its timeout (here a minute, as
    OTEL_EXPORTER_OTLP_TIMEOUT may say); the batch processor waits for its last export up to
    30 s. A process's exit waits for neither: the spans are given `timeout_s`, then dropped."""
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "60")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "60000")  # nothing exported before exit
        provider = tracing.build_provider("x", {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
        tracing.install(provider)
        provider.get_tracer("test").start_span("buffered").end()
        began = time.monotonic()
        tracing.shutdown(timeout_s=0.5)
        took = time.monotonic() - began
    assert tracing.provider() is None
    # Twice the timeout and some: nothing close to the export's retries (1, 2, 4, 8, 16 s).
    assert took < 10, took
    assert "not exported within 0.5 s" in caplog.text


# -- off --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "x", "OTEL_EXPORTER_OTLP_HEADERS": "a=b"}, False),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_SDK_DISABLED": "TRUE"}, False),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "false"}, True),
    ],
)
def test_the_otel_variables_decide_whether_tracing_is_on(env: dict[str, str], on: bool) -> None:
    assert tracing.enabled(env) is on


def test_an_unknown_exporter_is_a_tracing_error() -> None:
    with pytest.raises(tracing.TracingError, match="no-such-exporter"):
        tracing.build_provider("x", {"OTEL_TRACES_EXPORTER": "no-such-exporter"})


def test_the_console_exporter_and_the_default_service_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    provider = tracing.build_provider("stream-relay", {"OTEL_TRACES_EXPORTER": "console"})
    try:
        assert provider.resource.attributes["service.name"] == "stream-relay"
    finally:
        provider.shutdown()
    monkeypatch.setenv("OTEL_SERVICE_NAME", "relay-eu-1")
    provider = tracing.build_provider("stream-relay", {"OTEL_TRACES_EXPORTER": "console"})
    try:
        assert provider.resource.attributes["service.name"] == "relay-eu-1"
    finally:
        provider.shutdown()


def traced_app(app: Any) -> bool:
    return any(getattr(m, "cls", None) is OpenTelemetryMiddleware for m in app.user_middleware)


async def test_without_otel_variables_nothing_is_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    assert tracing.configure(tracing.RELAY_SERVICE) is False
    assert tracing.provider() is None
    assert tracing.server_interceptors() == []
    assert tracing.client_interceptors() == []
    assert tracing.asgi_middleware() == []

    app = create_app(GatewaySettings())
    assert not traced_app(app)
    channel = app.state.gateway.relay.channel
    for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        assert not getattr(channel, f"_{kind}_interceptors")
    await channel.close()

    monkeypatch.setenv(KEY_ENV, SECRET)
    producer = build_producer(openai_profile("gpt", "http://127.0.0.1:9/v1"))
    assert isinstance(producer, OpenAIProducer)
    client = producer._client_in_this_loop()
    assert not getattr(client, "_is_instrumented_by_opentelemetry", False)
    await producer.close()


async def test_with_tracing_on_the_pieces_are_installed(
    exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The counterpart of the test above, so that it cannot pass by looking at the wrong thing."""
    app = create_app(GatewaySettings())
    assert traced_app(app)
    channel = app.state.gateway.relay.channel
    for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        assert getattr(channel, f"_{kind}_interceptors")
    await channel.close()
    assert len(tracing.server_interceptors()) == 1

    monkeypatch.setenv(KEY_ENV, SECRET)
    producer = build_producer(openai_profile("gpt", "http://127.0.0.1:9/v1"))
    assert isinstance(producer, OpenAIProducer)
    client = producer._client_in_this_loop()
    assert getattr(client, "_is_instrumented_by_opentelemetry", False)
    await producer.close()
