"""An async Python client for the relay, for backends and the gateway.

Calls return the domain's values (`relay.domain.model`); failures, also a stream's mid-way, raise
the relay's errors (`relay.client.errors`: NotFound, ResourceExhausted, Unavailable, ...), each
with the status' name and message, never a gRPC exception.

    async with RelayClient("127.0.0.1:50051") as relay:
        started = await relay.start("chat-1", [UIMessage("u1", "user", [{"type": "text", ...}])])
        async for event in relay.attach(stream_id=started.stream_id):
            ...  # ChunkBatch, then one StreamEnd

A relay with service tokens and TLS (mutual TLS when it requires client certificates):

    tls = ClientTLS(ca="ca.pem", cert="client.pem", key="client-key.pem")
    async with RelayClient("relay.internal:50051", token=os.environ["RELAY_TOKEN"], tls=tls) as r:
        ...
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from types import TracebackType
from typing import Any
from urllib.parse import quote

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2

from relay import tracing
from relay.client.errors import RelayError, error_of
from relay.domain.model import (
    ActiveStream,
    Attached,
    ChunkBatch,
    Limits,
    RelayStats,
    ReplayMode,
    StartResult,
    StopResult,
    StreamEnd,
    StreamPolicy,
    UIMessage,
)
from relay.domain.multiplex import Subscribed
from relay.rpc.auth import AUTHORIZATION_METADATA, check_token, read_pem
from relay.rpc.convert import (
    OUTCOME_FROM_PB,
    REPLAY_TO_PB,
    STATE_FROM_PB,
    STREAM_ID_METADATA,
    SUBJECT_METADATA,
    batch_from_pb,
    end_from_pb,
    message_from_pb,
    message_to_pb,
    policy_to_pb,
)
from relay.v1 import relay_pb2 as pb
from relay.v1 import relay_pb2_grpc

# The client trusts what the relay sends; it checks shape, not size.
_NO_LIMITS = Limits(message_max_bytes=2**62)

# Channel options. Reconnects: gRPC's defaults back off from 1 s up to 120 s (x1.6 per failed
# attempt), so a client that saw the relay go away kept failing for seconds after it was back;
# attempts every 100-500 ms (a refused connect on a LAN costs nothing) see it within half a
# second. Metadata: a status message is metadata, and one over gRPC's 8 KiB soft limit (e.g. a
# relay error quoting a long input) would turn into RESOURCE_EXHAUSTED here.
RECONNECT_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
    ("grpc.dns_min_time_between_resolutions_ms", 1000),
)
METADATA_MAX_BYTES = 64 * 1024


def keepalive_options(every_s: float) -> list[tuple[str, int]]:
    """Pings the relay every `every_s` while calls are open, also when no data flows (an idle
    answer): a relay that hangs (stopped, partitioned) rather than dies fails the calls within
    about twice that, as UNAVAILABLE, instead of leaving readers waiting forever. The relay
    accepts pings down to one a second (`relay.server.PING_OPTIONS`)."""
    every_ms = max(int(every_s * 1000), 1000)
    return [
        ("grpc.keepalive_time_ms", every_ms),
        ("grpc.keepalive_timeout_ms", every_ms),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_time_between_pings_ms", every_ms),
        ("grpc.http2.ping_timeout_ms", every_ms),  # recent gRPC waits this long, not the above
    ]


Path = str | PathLike[str]


@dataclass(frozen=True, slots=True)
class ClientTLS:
    """TLS to the relay (or any gRPC server), configured by PEM file paths.

    `ca`: the CAs trusted to sign the server's certificate (None: the system's roots).
    `cert` and `key`: this client's certificate chain and private key, for a server that requires
    client certificates (mutual TLS); both or neither. `server_name`: the name the server's
    certificate must carry, when it is not the target's host (e.g. dialling an IP address)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        """Reads the files now. Raises ValueError naming a file that cannot be read or is not
        PEM, or a certificate without its key."""
        if (self.cert is None) != (self.key is None):
            raise ValueError("client TLS needs both a certificate and its key, or neither")
        return grpc.ssl_channel_credentials(
            root_certificates=read_pem(self.ca, "CA certificates") if self.ca else None,
            private_key=read_pem(self.key, "client key") if self.key else None,
            certificate_chain=read_pem(self.cert, "client certificate") if self.cert else None,
        )

    def channel_options(self) -> list[tuple[str, str]]:
        if not self.server_name:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]


def open_channel(
    target: str, options: Sequence[tuple[str, Any]], tls: ClientTLS | None
) -> grpc.aio.Channel:
    """A plaintext channel, or a TLS one when `tls` is given; traced when tracing is on
    (relay.tracing)."""
    interceptors = tracing.client_interceptors() or None
    if tls is None:
        return grpc.aio.insecure_channel(target, options=list(options), interceptors=interceptors)
    return grpc.aio.secure_channel(
        target,
        tls.credentials(),
        options=[*options, *tls.channel_options()],
        interceptors=interceptors,
    )


class RelayClient:
    """`token`: a service token of the relay, sent as `authorization: Bearer <token>` on every
    call. `tls`: TLS (or mutual TLS) to the relay; None is plaintext."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        token: str | None = None,
        tls: ClientTLS | None = None,
        max_message_bytes: int = 64 << 20,
        keepalive_s: float = 10.0,
    ):
        self._auth: tuple[tuple[str, str], ...] = ()
        if token is not None:
            check_token(token)
            self._auth = ((AUTHORIZATION_METADATA, f"Bearer {token}"),)
        self.channel = open_channel(
            target,
            [
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_metadata_size", METADATA_MAX_BYTES),
                ("grpc.absolute_max_metadata_size", METADATA_MAX_BYTES),
                *RECONNECT_OPTIONS,
                *keepalive_options(keepalive_s),
            ],
            tls,
        )
        self._stub = relay_pb2_grpc.RelayServiceStub(self.channel)

    async def __aenter__(self) -> RelayClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    def call_metadata(self, subject: str | None = None) -> tuple[tuple[str, str], ...]:
        """A call's metadata: the client's token, if any, and the subject it acts for, if it
        names one. For calls of other stubs on `channel` (e.g. grpc.health.v1.Health, which a
        relay may close to callers without a token)."""
        return self._metadata(subject)

    def _metadata(self, subject: str | None) -> tuple[tuple[str, str], ...]:
        if subject is None:
            return self._auth
        return (*self._auth, (SUBJECT_METADATA, quote(subject, safe="")))

    async def start(
        self,
        chat_id: str,
        messages: Sequence[UIMessage] = (),
        *,
        producer: str = "",
        options: Mapping[str, str] | None = None,
        supersede: bool = False,
        request_id: str = "",
        replace_history: bool = False,
        policy: StreamPolicy | None = None,
        subject: str | None = None,
        timeout: float | None = None,
    ) -> StartResult:
        request = pb.StartRequest(
            chat_id=chat_id,
            messages=[message_to_pb(m) for m in messages],
            replace_history=replace_history,
            producer=producer,
            options=dict(options or {}),
            supersede=supersede,
            request_id=request_id,
            policy=None if policy is None else policy_to_pb(policy),
        )
        with _relay_errors():
            response = await self._stub.Start(
                request, metadata=self._metadata(subject), timeout=timeout
            )
        return StartResult(
            response.stream_id,
            response.deduplicated,
            response.superseded_stream_id,
            response.stopped_before_start,
        )

    async def open_attach(
        self,
        *,
        stream_id: str = "",
        chat_id: str = "",
        from_offset: int = 0,
        max_batch: int = 0,
        replay: ReplayMode = ReplayMode.EXACT,
        subject: str | None = None,
        timeout: float | None = None,
    ) -> Attached:
        """Opens an Attach and returns once the relay has accepted it (raising its error if not),
        before the first chunk exists. Closing `events` ends only this reader."""
        request = _attach_request(stream_id, chat_id, from_offset, max_batch, replay)
        with _relay_errors():
            call = self._stub.Attach(request, metadata=self._metadata(subject), timeout=timeout)
        try:
            with _relay_errors():
                metadata = dict(await call.initial_metadata() or ())
                if STREAM_ID_METADATA not in metadata:
                    await call.read()  # refused: raises the relay's status
                    raise error_of(
                        "INTERNAL", "the relay accepted an Attach without naming its stream"
                    )
        except BaseException:
            call.cancel()
            raise
        return Attached(str(metadata[STREAM_ID_METADATA]), _CallEvents(call))

    async def attach(
        self,
        *,
        stream_id: str = "",
        chat_id: str = "",
        from_offset: int = 0,
        max_batch: int = 0,
        replay: ReplayMode = ReplayMode.EXACT,
        subject: str | None = None,
        timeout: float | None = None,
    ) -> AsyncGenerator[ChunkBatch | StreamEnd, None]:
        """Yields chunk batches, then the stream's end. Leaving the loop ends only this reader."""
        attached = await self.open_attach(
            stream_id=stream_id,
            chat_id=chat_id,
            from_offset=from_offset,
            max_batch=max_batch,
            replay=replay,
            subject=subject,
            timeout=timeout,
        )
        async with contextlib.aclosing(attached.events) as events:
            async for event in events:
                yield event

    def attach_many(
        self, *, subject: str | None = None, timeout: float | None = None
    ) -> ManyReaders:
        """Opens an AttachMany call: readers of many streams on one call (see ManyReaders).
        `subject` is the call's; each subscription may name its own."""
        return ManyReaders(self._stub, self._metadata(subject), timeout)

    async def stop(
        self,
        chat_id: str,
        stream_id: str = "",
        partial_message: UIMessage | None = None,
        *,
        request_id: str = "",
        message_id: str = "",
        subject: str | None = None,
        timeout: float | None = None,
    ) -> StopResult:
        """`request_id` / `message_id`: the Start this Stop means, which may not have reached
        the relay yet (relay.proto, StopRequest)."""
        request = pb.StopRequest(
            chat_id=chat_id, stream_id=stream_id, request_id=request_id, message_id=message_id
        )
        if partial_message is not None:
            request.partial_message.CopyFrom(message_to_pb(partial_message))
        with _relay_errors():
            response = await self._stub.Stop(
                request, metadata=self._metadata(subject), timeout=timeout
            )
        end = end_from_pb(response.end, _NO_LIMITS) if response.HasField("end") else None
        return StopResult(OUTCOME_FROM_PB[response.outcome], response.stream_id, end)

    async def get_active(
        self, chat_id: str, *, subject: str | None = None, timeout: float | None = None
    ) -> ActiveStream | None:
        with _relay_errors():
            response = await self._stub.GetActive(
                pb.GetActiveRequest(chat_id=chat_id),
                metadata=self._metadata(subject),
                timeout=timeout,
            )
        if not response.stream_id:
            return None
        return ActiveStream(response.stream_id, STATE_FROM_PB[response.state], response.offset)

    async def list_messages(
        self, chat_id: str, *, subject: str | None = None, timeout: float | None = None
    ) -> list[UIMessage]:
        with _relay_errors():
            response = await self._stub.ListMessages(
                pb.ListMessagesRequest(chat_id=chat_id),
                metadata=self._metadata(subject),
                timeout=timeout,
            )
        return [message_from_pb(m, _NO_LIMITS) for m in response.messages]

    async def get_stats(self, *, timeout: float | None = None) -> RelayStats:
        with _relay_errors():
            response = await self._stub.GetStats(
                pb.GetStatsRequest(), metadata=self._metadata(None), timeout=timeout
            )
        return RelayStats(
            response.live_streams,
            response.retained_streams,
            response.readers,
            response.buffered_chunks,
            dict(response.ended_by_reason),
        )

    async def health(
        self, service: str = "relay.v1.RelayService", *, timeout: float | None = None
    ) -> str:
        """The relay's health (grpc.health.v1) for `service` ("" : the server's), as the status'
        name in lower case: "serving", "not_serving", "service_unknown" or "unknown"."""
        check = self.channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        with _relay_errors():
            reply = await check(
                health_pb2.HealthCheckRequest(service=service),
                metadata=self._metadata(None),
                timeout=timeout,
            )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)).lower()


@dataclass(frozen=True, slots=True)
class ReaderRefused:
    """An AttachMany subscription the relay refused, with the status Attach would have had:
    `code` its name (e.g. "NOT_FOUND"), `error()` the error Attach would have raised."""

    code: str
    message: str

    def error(self) -> RelayError:
        return error_of(self.code, self.message)


ManyReadersEvent = Subscribed | ReaderRefused | ChunkBatch | StreamEnd
_STATUS_OF_CODE = {status.value[0]: status for status in grpc.StatusCode}


class ManyReaders:
    """One AttachMany call. Subscribe readers by tag, then iterate `(tag, event)` pairs: per tag,
    Subscribed or ReaderRefused, then ChunkBatch events in order, then one StreamEnd.

        async with relay.attach_many() as readers:
            readers.subscribe(1, stream_id=a)
            readers.subscribe(2, chat_id="chat-7")
            async for tag, event in readers:
                ...

    Subscribing and unsubscribing never wait: requests are queued and sent in order. Leaving the
    block cancels the call, which ends its readers and nothing else.
    """

    def __init__(
        self,
        stub: relay_pb2_grpc.RelayServiceAsyncStub,
        metadata: tuple[tuple[str, str], ...],
        timeout: float | None,
    ) -> None:
        self._requests: asyncio.Queue[pb.AttachManyRequest | None] = asyncio.Queue()
        with _relay_errors():
            self._call = stub.AttachMany(self._outgoing(), metadata=metadata, timeout=timeout)

    async def _outgoing(self) -> AsyncIterator[pb.AttachManyRequest]:
        while (request := await self._requests.get()) is not None:
            yield request

    async def __aenter__(self) -> ManyReaders:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.cancel()

    def subscribe(
        self,
        tag: int,
        *,
        stream_id: str = "",
        chat_id: str = "",
        from_offset: int = 0,
        max_batch: int = 0,
        replay: ReplayMode = ReplayMode.EXACT,
        subject: str = "",
    ) -> None:
        """`subject`: the reader's own, when it is not the call's ("" : the call's)."""
        attach = _attach_request(stream_id, chat_id, from_offset, max_batch, replay)
        self._requests.put_nowait(
            pb.AttachManyRequest(subscribe=pb.Subscribe(tag=tag, attach=attach, subject=subject))
        )

    def unsubscribe(self, tag: int) -> None:
        self._requests.put_nowait(pb.AttachManyRequest(unsubscribe=pb.Unsubscribe(tag=tag)))

    def done_subscribing(self) -> None:
        """No more subscriptions: the call ends once every reader has got its end."""
        self._requests.put_nowait(None)

    def cancel(self) -> None:
        self._call.cancel()

    async def __aiter__(self) -> AsyncIterator[tuple[int, ManyReadersEvent]]:
        with _relay_errors():
            async for response in self._call:
                for event in response.events:
                    yield event.tag, _reader_event(event)


def _attach_request(
    stream_id: str, chat_id: str, from_offset: int, max_batch: int, replay: ReplayMode
) -> pb.AttachRequest:
    request = pb.AttachRequest(
        from_offset=from_offset, max_batch=max_batch, replay=REPLAY_TO_PB[replay]
    )
    if stream_id:
        request.stream_id = stream_id
    else:
        request.chat_id = chat_id
    return request


def _reader_event(event: pb.ReaderEvent) -> ManyReadersEvent:
    kind = event.WhichOneof("event")
    if kind == "chunks":
        return batch_from_pb(event.chunks)
    if kind == "end":
        return end_from_pb(event.end, _NO_LIMITS)
    if kind == "subscribed":
        return Subscribed(event.subscribed.stream_id)
    code = _STATUS_OF_CODE.get(event.refused.code, grpc.StatusCode.UNKNOWN)
    return ReaderRefused(code.name, event.refused.message)


class ClosableEvents(AsyncGenerator[ChunkBatch | StreamEnd, None]):
    """A reader's events, then its end. A class, not a generator function, so that closing it
    ends the reader even before its first event (a generator never started skips its cleanup,
    and the reader would last until the garbage collector). Subclasses read the next event
    (`_next`) and end the reader (`_release`: cancel its call, unsubscribe it)."""

    _closed = False

    async def asend(self, value: None) -> ChunkBatch | StreamEnd:
        if self._closed:
            raise StopAsyncIteration
        try:
            event = await self._next()
        except BaseException:  # its end, a failure (the relay went away), or a cancellation
            self._close()
            raise
        if isinstance(event, StreamEnd):
            self._close()
        return event

    async def athrow(self, *args: Any) -> ChunkBatch | StreamEnd:
        self._close()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self._close()

    async def _next(self) -> ChunkBatch | StreamEnd:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._release()


class _CallEvents(ClosableEvents):
    """An Attach call's events: closing them cancels the call."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._responses: AsyncIterator[Any] | None = None

    async def _next(self) -> ChunkBatch | StreamEnd:
        if self._responses is None:
            self._responses = self._call.__aiter__()
        with _relay_errors():
            response = await anext(self._responses)
        if response.HasField("chunks"):
            return batch_from_pb(response.chunks)
        return end_from_pb(response.end, _NO_LIMITS)

    def _release(self) -> None:
        self._call.cancel()


@contextlib.contextmanager
def _relay_errors() -> Iterator[None]:
    """The one place where gRPC's errors become the relay's (relay.client.errors): around every
    call, and around every read of a stream."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        retry_after_s = _retry_after_s(exc) if code is grpc.StatusCode.RESOURCE_EXHAUSTED else None
        raise error_of(code.name, exc.details() or "", retry_after_s=retry_after_s) from exc
    except grpc.aio.UsageError as exc:  # a call on a closed client
        raise error_of("UNAVAILABLE", f"the relay client is closed ({exc})") from exc


_STATUS_DETAILS_METADATA = "grpc-status-details-bin"


def _retry_after_s(exc: grpc.aio.AioRpcError) -> float | None:
    """The delay of the RetryInfo in the status' rich details (google.rpc.Status), if any."""
    for key, value in exc.trailing_metadata() or ():
        if key != _STATUS_DETAILS_METADATA or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except DecodeError:
            return None
        if status.code != exc.code().value[0] or status.message != exc.details():
            return None  # a rich status that contradicts the call's: ignored
        for detail in status.details:
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                return float(info.retry_delay.ToNanoseconds() / 1e9)
    return None
