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
call's metadata; not a multiplexed producer's GenerateMany, one call for every answer), the
gateway's HTTP routes but /healthz and /metrics (ASGI; a request's own trace context headers are
dropped unless the gateway is told to trust its clients'), and the openai producer's upstream
requests (httpx, trace context in the HTTP headers). The maintained instrumentation packages make
these spans; the relay's service and the gateway's routes add the chat's and the stream's ids,
the first chunk and the end (relay.rpc.service, gateway.app). Nothing is made per chunk. A
streaming call's client span ends when the call does, with its gRPC status (`_ending_on_done`:
the one patch of an instrumentation's private method, checked by `install`).

When off nothing is installed: no interceptor, no middleware, no instrumented client, and the
few calls that look at the current span (once per RPC) find the API's no-op span.

A process has one provider here (`install`), separate from OpenTelemetry's global one, which can
be set only once: tests install an SDK provider of their own and remove it after.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import re
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

if TYPE_CHECKING:
    import httpx
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from starlette.middleware import Middleware
    from starlette.types import ASGIApp, Receive, Scope, Send

    from relay.domain.model import StreamEnd

log = logging.getLogger("relay.tracing")

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

# Calls that are no chat turn's: probes, tooling, AttachMany, the gateway's one shared call that
# carries every reader's chunks for as long as the gateway runs, and GenerateMany, a multiplexed
# grpc producer's one call for every answer (opened by whichever Start first needs it, it would
# otherwise be a span of that turn lasting as long as the call).
UNTRACED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")
UNTRACED_METHODS = (
    "/relay.v1.RelayService/GetStats",
    "/relay.v1.RelayService/AttachMany",
    "/relay.v1.ProducerService/GenerateMany",
)
UNTRACED_URLS = "/healthz,/metrics"

RPC_GRPC_STATUS_CODE = "rpc.grpc.status_code"  # the gRPC instrumentation's

_provider: trace.TracerProvider | None = None
# The exporters of the providers `build_provider` made.
_EXPORTERS: weakref.WeakKeyDictionary[object, list[SpanExporter]] = weakref.WeakKeyDictionary()


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
    exporters = [_exporter(name, env) for name in _exporter_names(env)]
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    _EXPORTERS[provider] = exporters  # what `shutdown` stops if they will not flush
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
    """Traces what is made from now on (servers, channels, apps, clients) with `provider`.
    Raises TracingError when the gRPC instrumentation is not the one this module patches
    (`check_grpc_instrumentation`)."""
    global _provider
    check_grpc_instrumentation()
    _provider = provider


def uninstall() -> None:
    """What is made from now on is not traced (what was made stays as it is)."""
    global _provider
    _provider = None


def provider() -> trace.TracerProvider | None:
    """The installed provider; None while tracing is off."""
    return _provider


# How long a process's exit waits for its spans: the flush of what is buffered, then the
# provider's shutdown, each at most this long.
SHUTDOWN_TIMEOUT_S = 2.0


def shutdown(timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
    """Exports what is still buffered and stops the provider `configure` made (a process's exit);
    nothing when tracing is off. Bounded, whatever the collector does: the flush may take
    `timeout_s`, and if it has not ended by then (a collector that does not answer: the OTLP
    exporters retry for up to OTEL_EXPORTER_OTLP_TIMEOUT, 10 s, per batch) the exporters are shut
    down, which abandons their retries and the call in flight, and the rest is dropped; the
    provider's shutdown then gets `timeout_s` again."""
    current = _provider
    uninstall()
    flush = getattr(current, "force_flush", None)
    stop = getattr(current, "shutdown", None)
    if flush is None or stop is None:
        return
    timeout_ms = int(timeout_s * 1000)
    # The SDK's batch processor does not honour force_flush's timeout (it exports everything,
    # with the exporter's retries, in the caller's thread), nor any in its own shutdown (it waits
    # up to 30 s for its worker's last export): both run in a thread waited for `timeout_s`.
    if not _within(timeout_s, lambda: flush(timeout_millis=timeout_ms)):
        log.warning(
            "tracing: the spans still buffered were not exported within %.1f s; dropped", timeout_s
        )
        for exporter in _EXPORTERS.get(current, ()):
            exporter.shutdown()  # ends the batch processor's export in flight, and any later
    _within(timeout_s, stop)


def _within(timeout_s: float, work: Callable[[], object]) -> bool:
    """Runs `work` in a daemon thread; whether it ended within `timeout_s`."""
    thread = threading.Thread(target=work, name="tracing-shutdown", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return not thread.is_alive()


def end_attributes(end: StreamEnd) -> dict[str, str | int]:
    """The attributes of an `end` event: the stream's end state, final offset and reason."""
    return {STATE: end.state.name, OFFSET: end.final_offset, REASON: end.reason.label}


def set_ids(chat_id: str | None = None, stream_id: str | None = None) -> None:
    """Names the chat and the stream on the current span (a request's, an RPC's) when it is
    recorded: what finds a turn's resume, stop and reads, whatever else is traced."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    if chat_id:
        span.set_attribute(CHAT_ID, chat_id)
    if stream_id:
        span.set_attribute(STREAM_ID, stream_id)


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


# The one private piece of opentelemetry-instrumentation-grpc this module relies on (pinned in
# pyproject.toml, checked by `install`): its streaming client interceptors hand each call to
# `_wrap_stream_response(span, call)` and return what it returns as the call's responses.
_PATCHED = "opentelemetry.instrumentation.grpc._aio_client._BaseAioClientInterceptor"
_PATCHED_PARAMETERS = ["self", "span", "call"]


def check_grpc_instrumentation() -> None:
    """Raises TracingError unless the installed gRPC instrumentation has the method
    `_ending_on_done` replaces, as it was written against (opentelemetry-instrumentation-grpc
    0.66b2): else streaming calls' spans would be left as the instrumentation ends them, without
    their status, or not at all."""
    try:
        from opentelemetry.instrumentation.grpc import _aio_client
    except ImportError as exc:
        raise TracingError(f"opentelemetry-instrumentation-grpc: {exc}") from None
    base = getattr(_aio_client, "_BaseAioClientInterceptor", None)
    wrap = getattr(base, "_wrap_stream_response", None)
    parameters = [] if wrap is None else list(inspect.signature(wrap).parameters)
    problem = ""
    if wrap is None:
        problem = f"{_PATCHED}._wrap_stream_response is gone"
    elif parameters != _PATCHED_PARAMETERS:
        problem = f"{_PATCHED}._wrap_stream_response({', '.join(parameters)}) changed"
    else:
        for name, method in (
            ("UnaryStreamAioClientInterceptor", "intercept_unary_stream"),
            ("StreamStreamAioClientInterceptor", "intercept_stream_stream"),
        ):
            intercept = getattr(getattr(_aio_client, name, None), method, None)
            try:
                source = inspect.getsource(intercept) if intercept is not None else ""
            except (OSError, TypeError):
                continue  # no source to read (a frozen install): the signature has to do
            if "self._wrap_stream_response(span, " not in source:
                problem = f"{name}.{method} no longer calls _wrap_stream_response(span, call)"
                break
    if problem:
        raise TracingError(
            f"opentelemetry-instrumentation-grpc is not the version relay.tracing patches "
            f"(>=0.66b2,<0.67, as pyproject.toml pins it): {problem}"
        )


def _ending_on_done(interceptor: Any) -> Any:
    """The instrumentation ends a server-streaming call's span when its responses are read to
    the end, without the call's status unless the reader saw an error; the relay client stops
    reading at the stream's end message and cancels the call (and a grpc producer's call is
    cancelled by a Stop), and a reader may never start. This ends the span when the call is
    done, however it ends, with the call's status (`_TracedResponses`)."""

    def wrap_stream_response(span: trace.Span, call: Any) -> _TracedResponses:
        return _TracedResponses(interceptor, span, call)

    interceptor._wrap_stream_response = wrap_stream_response
    return interceptor


# The tasks reading a finished call's status (the loop keeps only weak references to tasks).
_FINISHING: set[asyncio.Task[None]] = set()


class _TracedResponses:
    """A streaming call's responses, ending the call's span once: the first of the reader's end
    (the last response: OK; an error: its details), the call's local cancellation (no error:
    the relay client cancels a call it has read enough of), or the call's end as its status says
    (a call ended by the server, the network or a deadline, read or not). The done callback is
    registered at once, so that a call whose responses are never read ends its span too."""

    def __init__(self, interceptor: Any, span: trace.Span, call: Any) -> None:
        self._interceptor = interceptor
        self._span = span
        self._call = call
        self._responses: AsyncIterator[Any] | None = None
        # (A call another interceptor wrapped may have no callbacks: then the reader ends it.)
        with contextlib.suppress(NotImplementedError):
            call.add_done_callback(self._done)

    def __aiter__(self) -> _TracedResponses:
        return self

    async def __anext__(self) -> Any:
        if self._responses is None:
            self._responses = self._call.__aiter__()
        try:
            response = await self._responses.__anext__()
        except StopAsyncIteration:
            self._end(grpc.StatusCode.OK)  # read to the end: grpc raises for any other status
            raise
        except Exception as exc:
            if self._span.is_recording():
                self._interceptor.add_error_details_to_span(self._span, exc)
                self._span.end()
            raise
        if self._interceptor._response_hook:
            self._interceptor._call_response_hook(self._span, response)
        return response

    def _done(self, call: Any) -> None:
        if not self._span.is_recording():
            return
        if call.cancelled():  # cancelled here: by the reader, or its task's cancellation
            self._span.end()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._span.end()
            return
        # Its status is known, but only a coroutine gives it.
        task = loop.create_task(self._finish(call))
        _FINISHING.add(task)
        task.add_done_callback(_FINISHING.discard)

    async def _finish(self, call: Any) -> None:
        code: grpc.StatusCode | None = None
        details: str | None = None
        try:
            with contextlib.suppress(Exception):  # no status to be had: the span ends without
                code, details = await call.code(), await call.details()
        finally:  # also when the loop closes under this task
            self._end(code, details)

    def _end(self, code: grpc.StatusCode | None, details: str | None = None) -> None:
        span = self._span
        if not span.is_recording():  # ended already (the reader or the call, whichever first)
            return
        if code is not None:
            span.set_attribute(RPC_GRPC_STATUS_CODE, code.value[0])
            if code is not grpc.StatusCode.OK:
                span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details or ''}"))
        span.end()


# The headers a client's request may carry the trace context in (the W3C ones, and whatever
# OTEL_PROPAGATORS adds: b3, jaeger, ...).
CONTEXT_HEADERS = ("traceparent", "tracestate", "baggage")


def asgi_middleware(*, context_from_clients: bool = False) -> list[Middleware]:
    """The gateway's outermost middleware: a span per HTTP request, lasting until the response's
    body ends; none while tracing is off. Its parent is the request's trace context only when
    `context_from_clients` says the clients are trusted to give one (a proxy in front that sets
    it): else the trace context headers are removed first, so that no browser can choose a
    trace's id or force it to be sampled (a parent-based sampler follows the parent's flag) for
    the gateway, the relay, the producer and the upstream. Health and metrics are left out, and
    so are the instrumentation's spans per ASGI message (one per SSE write)."""
    if _provider is None:
        return []
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from starlette.middleware import Middleware

    traced = Middleware(
        OpenTelemetryMiddleware,
        tracer_provider=_provider,
        excluded_urls=UNTRACED_URLS,
        exclude_spans=["receive", "send"],
        default_span_details=_http_span_details,
    )
    if context_from_clients:
        return [traced]
    return [Middleware(WithoutTraceContext), traced]


class WithoutTraceContext:
    """ASGI middleware: the request without the headers a trace context is read from."""

    def __init__(self, app: ASGIApp) -> None:
        from opentelemetry.propagate import get_global_textmap

        self.app = app
        fields: Iterable[str] = (*CONTEXT_HEADERS, *get_global_textmap().fields)
        self.names = frozenset(name.lower().encode("latin-1") for name in fields)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = scope["headers"]
            if any(name in self.names for name, _ in headers):
                kept = [(name, value) for name, value in headers if name not in self.names]
                scope = {**scope, "headers": kept}
        await self.app(scope, receive, send)


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
