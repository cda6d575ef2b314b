"""The gRPC service: translates RPCs to domain calls and domain errors to status codes.

What a client may see of a failure: a RelayError's code and message (cut to DETAIL_MAX_BYTES), or,
for anything else escaping a handler, INTERNAL with "internal error (id …); see the relay log" and
the whole traceback logged under that id. No exception class, traceback or store message ever
reaches a status detail. Register the service with `add_relay_service`: its deserializers turn a
request that is not valid protobuf into INVALID_ARGUMENT (grpc.aio's own answer is UNKNOWN with
the decoder's exception class in the detail).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2, message_factory
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from opentelemetry import trace

from relay import tracing
from relay.domain import errors
from relay.domain.core import Relay
from relay.domain.model import (
    Caller,
    ChunkBatch,
    ReplayMode,
    StartRequest,
    StreamEnd,
    check_subject,
    dump_json,
)
from relay.domain.multiplex import Multiplexer, ReaderEvent, Subscribed
from relay.rpc.auth import Authenticator
from relay.rpc.convert import (
    OUTCOME_TO_PB,
    REPLAY_FROM_PB,
    STATE_TO_PB,
    STREAM_ID_METADATA,
    end_to_pb,
    fill_batch,
    message_from_pb,
    message_to_pb,
    policy_from_pb,
)
from relay.v1 import relay_pb2 as pb
from relay.v1 import relay_pb2_grpc

log = logging.getLogger("relay")

# A status detail travels in the grpc-message trailer, percent-encoded, under the client's
# metadata limit (8 KiB soft, 64 KiB hard by default); over it the client sees RESOURCE_EXHAUSTED
# instead of the real status. Domain messages quote client values through
# relay.domain.model.shown, so this cut is only a safety net.
DETAIL_MAX_BYTES = 1_024
INTERNAL_DETAIL = "internal error (id {error_id}); see the relay log"

Context = grpc.aio.ServicerContext  # of an RPC: [its request, its response]
AnyContext = grpc.aio.ServicerContext[Any, Any]  # of any RPC

STATUS_OF_ERROR: dict[type[errors.RelayError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}


def status_of(error: errors.RelayError) -> grpc.StatusCode:
    """The code of a domain error, by its nearest mapped class (subclasses map as their base)."""
    for kind in type(error).__mro__:
        code = STATUS_OF_ERROR.get(kind)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def bounded(detail: str) -> str:
    """`detail` cut to at most DETAIL_MAX_BYTES of UTF-8, ending in an ellipsis if cut."""
    data = detail.encode("utf-8", "replace")
    if len(data) <= DETAIL_MAX_BYTES:
        return detail
    return data[: DETAIL_MAX_BYTES - 3].decode("utf-8", "ignore") + "…"


@contextlib.asynccontextmanager
async def _status(context: AnyContext, rpc: str) -> AsyncIterator[None]:
    try:
        yield
    except errors.ResourceExhausted as exc:
        await _abort_exhausted(context, exc)
    except errors.RelayError as exc:
        await context.abort(status_of(exc), bounded(str(exc)))
    except grpc.aio.AbortError:
        raise
    except Exception:
        error_id = secrets.token_hex(4)
        log.exception(
            "unexpected error in an RPC; the client got INTERNAL",
            extra={"rpc": rpc, "error_id": error_id},
        )
        await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_DETAIL.format(error_id=error_id))


async def _abort_exhausted(context: AnyContext, exc: errors.ResourceExhausted) -> None:
    """RESOURCE_EXHAUSTED, with a google.rpc.RetryInfo saying when to retry if the domain knows
    (the standard rich status detail: grpc-status-details-bin)."""
    detail = bounded(str(exc))
    if exc.retry_after_s is None:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, detail)
        return
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(max(int(exc.retry_after_s * 1e9), 0))
    info = any_pb2.Any()
    info.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    rich = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=detail, details=[info])
    status = rpc_status.to_status(rich)
    await context.abort(status.code, status.details, status.trailing_metadata)


@dataclass(frozen=True, slots=True)
class Undecodable:
    """What `add_relay_service`'s deserializers hand a handler for bytes that are not a valid
    request; the handler answers INVALID_ARGUMENT."""

    type_name: str


def _decoded(request: object) -> None:
    if isinstance(request, Undecodable):
        raise errors.InvalidArgument(
            f"the request is not a valid {request.type_name} (undecodable protobuf)"
        )


def _deserializer(message_type: Any) -> Callable[[bytes], Any]:
    name = message_type.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except Exception:  # DecodeError: corrupt wire format, bad UTF-8 in a string field, ...
            return Undecodable(name)

    return deserialize


_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_relay_service(servicer: RelayServicer, server: grpc.aio.Server) -> None:
    """Registers RelayService as the generated `add_RelayServiceServicer_to_server` does, with
    deserializers that never raise (see Undecodable)."""
    service = pb.DESCRIPTOR.services_by_name["RelayService"]
    handlers = {}
    for method in service.methods:
        make = _HANDLER_KINDS[method.client_streaming, method.server_streaming]
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=_deserializer(message_factory.GetMessageClass(method.input_type)),
            response_serializer=message_factory.GetMessageClass(
                method.output_type
            ).SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)


class RelayServicer(relay_pb2_grpc.RelayServiceServicer):
    def __init__(self, relay: Relay, authenticator: Authenticator | None = None) -> None:
        self.relay = relay
        self.authenticator = authenticator or Authenticator()

    def _caller(self, context: AnyContext, subject: str = "") -> Caller:
        """Who the call acts for (`subject`: one a request names for itself). Raises
        Unauthenticated, PermissionDenied or InvalidArgument."""
        caller = self.authenticator.caller(context.invocation_metadata(), subject or None)
        check_subject(caller.subject)
        return caller

    async def Start(
        self, request: pb.StartRequest, context: Context[pb.StartRequest, pb.StartResponse]
    ) -> pb.StartResponse:
        async with _status(context, "Start"):
            _decoded(request)
            # The RPC's span (relay.tracing), current here and so in the producer's task, which
            # the relay starts from this call: the producer's own calls join this trace.
            span = trace.get_current_span()
            span.set_attribute(tracing.CHAT_ID, request.chat_id)
            caller = self._caller(context)
            result = await self.relay.start(
                StartRequest(
                    chat_id=request.chat_id,
                    messages=[message_from_pb(m, self.relay.limits) for m in request.messages],
                    replace_history=request.replace_history,
                    producer=request.producer,
                    options=dict(request.options),
                    supersede=request.supersede,
                    request_id=request.request_id,
                    policy=policy_from_pb(request.policy),
                ),
                caller,
            )
            if span.is_recording():
                span.set_attributes(
                    {
                        tracing.STREAM_ID: result.stream_id,
                        tracing.DEDUPLICATED: result.deduplicated,
                        tracing.SUPERSEDED_STREAM_ID: result.superseded_stream_id,
                    }
                )
            return pb.StartResponse(
                stream_id=result.stream_id,
                deduplicated=result.deduplicated,
                superseded_stream_id=result.superseded_stream_id,
                stopped_before_start=result.stopped_before_start,
            )

    async def Attach(
        self, request: pb.AttachRequest, context: Context[pb.AttachRequest, pb.AttachResponse]
    ) -> AsyncIterator[pb.AttachResponse]:
        async with _status(context, "Attach"):
            _decoded(request)
            attached = await self.relay.attach(
                stream_id=request.stream_id,
                chat_id=request.chat_id,
                from_offset=request.from_offset,
                max_batch=request.max_batch,
                replay=_replay_mode(request),
                caller=self._caller(context),
            )
            # Sent at once, so a client knows the Attach is accepted before the first chunk
            # exists.
            await context.send_initial_metadata(((STREAM_ID_METADATA, attached.stream_id),))
            span = trace.get_current_span()  # the RPC's (relay.tracing): two events, no more
            first = span.is_recording()
            if first:
                span.set_attributes(
                    {
                        tracing.STREAM_ID: attached.stream_id,
                        tracing.FROM_OFFSET: request.from_offset,
                    }
                )
                if request.chat_id:  # an Attach may name the stream alone
                    span.set_attribute(tracing.CHAT_ID, request.chat_id)
            # A cancelled call (client gone, deadline) raises CancelledError here: aclosing ends
            # this reader and nothing else.
            async with contextlib.aclosing(attached.events) as events:
                async for event in events:
                    if isinstance(event, ChunkBatch):
                        if first:
                            span.add_event(
                                tracing.FIRST_CHUNK, {tracing.OFFSET: event.first_offset}
                            )
                            first = False
                        response = pb.AttachResponse()
                        fill_batch(response.chunks, event)
                        yield response
                    else:
                        if span.is_recording():
                            span.add_event(tracing.END, tracing.end_attributes(event))
                        yield pb.AttachResponse(end=end_to_pb(event))

    async def AttachMany(
        self,
        requests: AsyncIterator[pb.AttachManyRequest],
        context: Context[pb.AttachManyRequest, pb.AttachManyResponse],
    ) -> AsyncIterator[pb.AttachManyResponse]:
        mux = self.relay.multiplexer()
        subscriber: asyncio.Task[None] | None = None
        try:
            async with _status(context, "AttachMany"):
                self._caller(context)  # the call's own credentials, before any subscription

                def caller_of(subject: str) -> Caller:
                    return self._caller(context, subject)

                subscriber = asyncio.create_task(_subscribe_all(requests, mux, caller_of))
                async for batch in mux.batches():
                    response = pb.AttachManyResponse()
                    add = response.events.add
                    for tag, event in batch:
                        _fill_reader_event(add(tag=tag), event)
                    yield response
        finally:  # the call ended, however: its readers go, the streams' producers stay
            if subscriber is not None:
                subscriber.cancel()
            mux.close()

    async def Stop(
        self, request: pb.StopRequest, context: Context[pb.StopRequest, pb.StopResponse]
    ) -> pb.StopResponse:
        async with _status(context, "Stop"):
            _decoded(request)
            span = trace.get_current_span()  # the RPC's (relay.tracing)
            span.set_attribute(tracing.CHAT_ID, request.chat_id)
            partial = None
            if request.HasField("partial_message"):
                partial = message_from_pb(request.partial_message, self.relay.limits)
            result = await self.relay.stop(
                request.chat_id,
                request.stream_id,
                partial,
                self._caller(context),
                request_id=request.request_id,
                message_id=request.message_id,
            )
            if span.is_recording():
                span.set_attributes(
                    {tracing.OUTCOME: result.outcome.value, tracing.STREAM_ID: result.stream_id}
                )
                if result.end is not None:
                    span.add_event(tracing.END, tracing.end_attributes(result.end))
            usage = result.usage
            return pb.StopResponse(
                outcome=OUTCOME_TO_PB[result.outcome],
                stream_id=result.stream_id,
                end=None if result.end is None else end_to_pb(result.end),
                usage_json="" if usage is None else dump_json(usage),
            )

    async def GetActive(
        self,
        request: pb.GetActiveRequest,
        context: Context[pb.GetActiveRequest, pb.GetActiveResponse],
    ) -> pb.GetActiveResponse:
        async with _status(context, "GetActive"):
            _decoded(request)
            tracing.set_ids(request.chat_id)  # on the RPC's span (relay.tracing)
            active = await self.relay.get_active(request.chat_id, self._caller(context))
            tracing.set_ids(stream_id=None if active is None else active.stream_id)
            if active is None:
                return pb.GetActiveResponse()
            return pb.GetActiveResponse(
                stream_id=active.stream_id, state=STATE_TO_PB[active.state], offset=active.offset
            )

    async def ListMessages(
        self,
        request: pb.ListMessagesRequest,
        context: Context[pb.ListMessagesRequest, pb.ListMessagesResponse],
    ) -> pb.ListMessagesResponse:
        async with _status(context, "ListMessages"):
            _decoded(request)
            messages = await self.relay.list_messages(request.chat_id, self._caller(context))
            return pb.ListMessagesResponse(messages=[message_to_pb(m) for m in messages])

    async def GetStats(
        self, request: pb.GetStatsRequest, context: Context[pb.GetStatsRequest, pb.GetStatsResponse]
    ) -> pb.GetStatsResponse:
        async with _status(context, "GetStats"):
            _decoded(request)
            self._caller(context)
            stats = self.relay.stats()
            return pb.GetStatsResponse(
                live_streams=stats.live_streams,
                retained_streams=stats.retained_streams,
                readers=stats.readers,
                buffered_chunks=stats.buffered_chunks,
                ended_by_reason=stats.ended_by_reason,
            )


CallerOf = Callable[[str], Caller]


async def _subscribe_all(
    requests: AsyncIterator[pb.AttachManyRequest], mux: Multiplexer, caller_of: CallerOf
) -> None:
    try:
        await _read_subscriptions(requests, mux, caller_of)
    except Exception as exc:  # the call's response side raises it: never lost in a task
        mux.fail(exc)


async def _read_subscriptions(
    requests: AsyncIterator[pb.AttachManyRequest], mux: Multiplexer, caller_of: CallerOf
) -> None:
    async for request in requests:
        if isinstance(request, Undecodable):
            _decoded(request)
        action = request.WhichOneof("action")
        if action == "subscribe":
            subscribe = request.subscribe
            try:
                caller = caller_of(subscribe.subject)
            except errors.RelayError as exc:  # ends only this subscription
                mux.refuse(subscribe.tag, exc)
                continue
            attach = subscribe.attach
            await mux.subscribe(
                subscribe.tag,
                stream_id=attach.stream_id,
                chat_id=attach.chat_id,
                from_offset=attach.from_offset,
                max_batch=attach.max_batch,
                replay=_replay_mode(attach),
                caller=caller,
            )
        elif action == "unsubscribe":
            mux.unsubscribe(request.unsubscribe.tag)
        else:
            mux.fail(errors.InvalidArgument("an AttachMany request needs subscribe or unsubscribe"))
            return
    mux.no_more_subscriptions()


def _replay_mode(request: pb.AttachRequest) -> ReplayMode:
    mode = REPLAY_FROM_PB.get(request.replay)
    if mode is None:
        raise errors.InvalidArgument(f"replay {request.replay} is not a ReplayMode")
    return mode


def _fill_reader_event(target: pb.ReaderEvent, event: ReaderEvent) -> None:
    if isinstance(event, ChunkBatch):
        fill_batch(target.chunks, event)
    elif isinstance(event, StreamEnd):
        target.end.CopyFrom(end_to_pb(event))
    elif isinstance(event, Subscribed):
        target.subscribed.stream_id = event.stream_id
    else:
        target.refused.code = status_of(event.error).value[0]
        target.refused.message = bounded(str(event.error))
