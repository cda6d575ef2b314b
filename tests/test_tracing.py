"""OpenTelemetry tracing (relay.tracing): the span tree of a chat turn, a resume and a stop, from
the gateway's HTTP span through the relay to the producer (a grpc backend, the openai upstream),
recorded by an in-memory exporter; and nothing installed while the OTEL_* variables leave it off.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from gateway.app import GatewaySettings, create_app
from relay import tracing
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


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """Tracing on for what the test makes, into memory (OpenTelemetry's global provider is left
    alone)."""
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracing.install(provider)
    try:
        yield spans
    finally:
        tracing.uninstall()
        provider.shutdown()


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
        for i in range(int(options.get("chunks", "5"))):
            await asyncio.sleep(float(options.get("delay_ms", "0")) / 1000)
            text = chunk({"type": "text-delta", "id": "t", "delta": f"w{i} "})
            yield producer_pb2.GenerateResponse(chunks=[text])
        tail = [{"type": "text-end", "id": "t"}, {"type": "finish-step"}, {"type": "finish"}]
        yield producer_pb2.GenerateResponse(chunks=[chunk(c) for c in tail])


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


@pytest.mark.parametrize("reads", ["per-request", "shared"])
async def test_a_chat_turn_a_resume_and_a_stop_are_traced_from_the_gateway_to_the_producer(
    tmp_path: Path, exporter: InMemorySpanExporter, reads: str
) -> None:
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

    tree = Tree(exporter.get_finished_spans())

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
