"""OpenTelemetry tracing: off unless the standard OTEL_* variables ask for it.

The rule (`enabled`): OTEL_SDK_DISABLED=true turns it off whatever else is set. Otherwise it is on
when OTEL_TRACES_EXPORTER names an exporter other than `none`, or, with OTEL_TRACES_EXPORTER
unset, when OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set (the
exporter is then `otlp`). Exporters: `otlp` (over gRPC, or HTTP when OTEL_EXPORTER_OTLP_PROTOCOL
or OTEL_EXPORTER_OTLP_TRACES_PROTOCOL is `http/protobuf`), `console`, or any other registered
under the SDK's `opentelemetry_traces_exporter` entry points; several are comma-separated. The
SDK reads the rest from its own variables: the exporter's endpoint, headers and certificates
(OTEL_EXPORTER_OTLP_*), the sampler (OTEL_TRACES_SAMPLER), the batching (OTEL_BSP_*), the
resource (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES; the service name defaults to the program's,
`stream-relay` or `stream-relay-gateway`) and the propagators (OTEL_PROPAGATORS).

What is traced, when on: the relay's gRPC server (every RPC but health, reflection, GetStats and
AttachMany), the gRPC channels of the relay client and the grpc producer (trace context in the
call's metadata), the gateway's HTTP routes but /healthz and /metrics (ASGI), and the openai
producer's upstream requests (httpx, trace context in the HTTP headers). The maintained
instrumentation packages make these spans; the relay's service adds the stream's ids, the first
chunk and the end to its RPC spans (relay.rpc.service). Nothing is made per chunk.

When off nothing is installed: no interceptor, no middleware, no instrumented client, and the
few calls that look at the current span (once per RPC) find the API's no-op span.

A process has one provider here (`install`), separate from OpenTelemetry's global one, which can
be set only once: tests install an SDK provider of their own and remove it after.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Callable, Mapping
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from opentelemetry import trace

if TYPE_CHECKING:
    import httpx
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from starlette.middleware import Middleware

    from relay.domain.model import StreamEnd

RELAY_SERVICE = "stream-relay"
GATEWAY_SERVICE = "stream-relay-gateway"

# Attributes and events the relay adds to its RPC spans.
CHAT_ID = "stream_relay.chat_id"
STREAM_ID = "stream_relay.stream_id"
OFFSET = "stream_relay.offset"
FROM_OFFSET = "stream_relay.from_offset"
STATE = "stream_relay.state"
REASON = "stream_relay.reason"
OUTCOME = "stream_relay.outcome"
DEDUPLICATED = "stream_relay.deduplicated"
SUPERSEDED_STREAM_ID = "stream_relay.superseded_stream_id"
FIRST_CHUNK = "first chunk"
END = "end"

# Calls that are no chat turn's: probes, tooling, and AttachMany, the gateway's one shared call
# that carries every reader's chunks for as long as the gateway runs (in no request's trace).
UNTRACED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")
UNTRACED_METHODS = ("/relay.v1.RelayService/GetStats", "/relay.v1.RelayService/AttachMany")
UNTRACED_URLS = "/healthz,/metrics"

_provider: trace.TracerProvider | None = None


class TracingError(Exception):
    """The OTEL_* variables ask for something that cannot work (an unknown exporter)."""


def enabled(env: Mapping[str, str] | None = None) -> bool:
    """Whether the OTEL_* variables turn tracing on (the rule in the module's doc)."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = _exporter_names(env)
    return bool(exporters) and exporters != ["none"]


def _exporter_names(env: Mapping[str, str]) -> list[str]:
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",")]
    names = [n for n in names if n]
    if names:
        return [n for n in names if n != "none"] or ["none"]
    if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return ["otlp"]
    return []


def configure(default_service: str, env: Mapping[str, str] | None = None) -> bool:
    """Sets tracing up as the OTEL_* variables say (nothing when they leave it off): a provider
    exporting in batches, made OpenTelemetry's global one and installed here. Call once, before
    servers and clients are made; `shutdown` at exit. Returns whether tracing is on. Raises
    TracingError for an exporter that cannot be made."""
    env = os.environ if env is None else env
    if not enabled(env):
        return False
    provider = build_provider(default_service, env)
    trace.set_tracer_provider(provider)
    install(provider)
    return True


def build_provider(default_service: str, env: Mapping[str, str]) -> SdkTracerProvider:
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: default_service}))
    provider = TracerProvider(resource=resource)  # the sampler: OTEL_TRACES_SAMPLER
    for name in _exporter_names(env):
        provider.add_span_processor(BatchSpanProcessor(_exporter(name, env)))
    return provider


def _exporter(name: str, env: Mapping[str, str]) -> SpanExporter:
    """The exporter `name`, made without arguments: it reads its own OTEL_EXPORTER_* variables."""
    if name == "otlp":
        protocol = (
            env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "grpc"
        ).strip()
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            return OTLPSpanExporter()
        if protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter as OTLPHttpSpanExporter,
            )

            return OTLPHttpSpanExporter()
        raise TracingError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL {protocol!r}: only grpc and http/protobuf are supported"
        )
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    found = entry_points(group="opentelemetry_traces_exporter", name=name)
    if not found:
        raise TracingError(f"OTEL_TRACES_EXPORTER {name!r}: no such span exporter is installed")
    exporter: Callable[[], SpanExporter] = next(iter(found)).load()
    return exporter()


def install(provider: trace.TracerProvider) -> None:
    """Traces what is made from now on (servers, channels, apps, clients) with `provider`."""
    global _provider
    _provider = provider


def uninstall() -> None:
    """What is made from now on is not traced (what was made stays as it is)."""
    global _provider
    _provider = None


def provider() -> trace.TracerProvider | None:
    """The installed provider; None while tracing is off."""
    return _provider


def shutdown() -> None:
    """Exports what is still buffered and stops the provider `configure` made (a process's exit);
    nothing when tracing is off."""
    current = _provider
    uninstall()
    stop = getattr(current, "shutdown", None)
    if stop is not None:
        stop()


def end_attributes(end: StreamEnd) -> dict[str, str | int]:
    """The attributes of an `end` event: the stream's end state, final offset and reason."""
    return {STATE: end.state.name, OFFSET: end.final_offset, REASON: end.reason.label}


def _untraced_filter() -> Callable[[Any], bool]:
    """A grpc instrumentation filter: True for the calls that are traced."""
    from opentelemetry.instrumentation.grpc import filters

    untraced = filters.any_of(
        *(filters.service_name(s) for s in UNTRACED_SERVICES),
        *(filters.full_method_name(m) for m in UNTRACED_METHODS),
    )
    traced: Callable[[Any], bool] = filters.negate(untraced)
    return traced


def server_interceptors() -> list[Any]:
    """The gRPC server's tracing interceptor (a span per RPC, its parent from the caller's
    metadata); none while tracing is off."""
    if _provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(tracer_provider=_provider, filter_=_untraced_filter())]


def client_interceptors() -> list[Any]:
    """A gRPC channel's tracing interceptors (a span per call, the trace context sent in its
    metadata), for every kind of call; none while tracing is off."""
    if _provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors
    from opentelemetry.instrumentation.grpc._aio_client import (
        StreamStreamAioClientInterceptor,
        UnaryStreamAioClientInterceptor,
    )

    interceptors: list[Any] = aio_client_interceptors(
        tracer_provider=_provider, filter_=_untraced_filter()
    )
    streaming = (UnaryStreamAioClientInterceptor, StreamStreamAioClientInterceptor)
    return [_ending_on_done(i) if isinstance(i, streaming) else i for i in interceptors]


def _ending_on_done(interceptor: Any) -> Any:
    """The instrumentation ends a server-streaming call's span when its responses are read to
    the end; the relay client stops reading at the stream's end message and cancels the call
    (and a grpc producer's call is cancelled by a Stop), which left the span open until the
    garbage collector closed the reader. This ends it when the call is done, however it ends."""

    async def wrap_stream_response(span: Any, call: Any) -> AsyncIterator[Any]:
        def end(_: object = None) -> None:
            if span.is_recording():  # not yet ended
                span.end()

        call.add_done_callback(end)
        try:
            async for response in call:
                yield response
        except Exception as exc:
            interceptor.add_error_details_to_span(span, exc)
            raise
        finally:
            end()

    interceptor._wrap_stream_response = wrap_stream_response
    return interceptor


def asgi_middleware() -> list[Middleware]:
    """The gateway's outermost middleware: a span per HTTP request (its parent from the request's
    traceparent header), lasting until the response's body ends; none while tracing is off.
    Health and metrics are left out, and so are the instrumentation's spans per ASGI message
    (one per SSE write)."""
    if _provider is None:
        return []
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from starlette.middleware import Middleware

    return [
        Middleware(
            OpenTelemetryMiddleware,
            tracer_provider=_provider,
            excluded_urls=UNTRACED_URLS,
            exclude_spans=["receive", "send"],
            default_span_details=_http_span_details,
        )
    ]


_CHAT_ROUTE = re.compile(r"/api/chat/[^/]+/(stream|stop|messages)")
_FIXED_ROUTES = frozenset(("/api/chat", "/", "/openapi.json", "/demo.js", "/demo.css"))


def _http_span_details(scope: Mapping[str, Any]) -> tuple[str, dict[str, str]]:
    """An HTTP span's name: the method and the route (`POST /api/chat/{chat_id}/stop`), never
    the path, which holds a chat id; the method alone for a path of no route."""
    method = str(scope.get("method", "HTTP"))
    path = str(scope.get("path", ""))
    chat = _CHAT_ROUTE.fullmatch(path)
    if chat is not None:
        route = "/api/chat/{chat_id}/" + chat[1]
    elif path in _FIXED_ROUTES:
        route = path
    else:
        return method, {}
    return f"{method} {route}", {"http.route": route}


def instrument_httpx(client: httpx.AsyncClient) -> None:
    """A span per request of `client`, the trace context in its headers; nothing while tracing
    is off."""
    if _provider is None:
        return
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    HTTPXClientInstrumentor.instrument_client(client, tracer_provider=_provider)
