"""relay.client raises the relay's own errors (relay.client.errors), mapped once from the gRPC
status, for unary calls and for streams that fail mid-way; the gateway imports no gRPC."""

from __future__ import annotations

import ast
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from relay.client import ReaderRefused, RelayClient
from relay.client.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    RelayError,
    ResourceExhausted,
    TooLarge,
    Unauthenticated,
    Unavailable,
    UnreadableReply,
)
from relay.client.shared_attach import SharedAttach
from relay.domain.model import ChunkBatch, UIMessage
from relay.rpc.convert import STREAM_ID_METADATA
from relay.v1 import relay_pb2 as pb
from relay.v1 import relay_pb2_grpc
from tests.conftest import ROOT, Env, collect, user

Code = grpc.StatusCode
STREAM_ID = "a" * 32

MAPPED: list[tuple[grpc.StatusCode, type[RelayError]]] = [
    (Code.INVALID_ARGUMENT, InvalidArgument),
    (Code.OUT_OF_RANGE, OutOfRange),
    (Code.NOT_FOUND, NotFound),
    (Code.FAILED_PRECONDITION, FailedPrecondition),
    (Code.RESOURCE_EXHAUSTED, ResourceExhausted),
    (Code.UNAUTHENTICATED, Unauthenticated),
    (Code.PERMISSION_DENIED, PermissionDenied),
    (Code.UNAVAILABLE, Unavailable),
    (Code.DEADLINE_EXCEEDED, DeadlineExceeded),
    (Code.CANCELLED, Cancelled),
    # Statuses the gateway does not tell apart: the base class, with the status' name.
    (Code.INTERNAL, RelayError),
    (Code.UNKNOWN, RelayError),
    (Code.DATA_LOSS, RelayError),
    (Code.ALREADY_EXISTS, RelayError),
    (Code.ABORTED, RelayError),
]


class Failing(relay_pb2_grpc.RelayServiceServicer):
    """A relay whose every call fails with `code` and `message`: at once, or, for Attach and
    AttachMany, after one batch of chunks (mid-stream)."""

    def __init__(self) -> None:
        self.code = Code.INTERNAL
        self.message = "it failed"
        self.trailing: tuple[tuple[str, str | bytes], ...] = ()
        self.mid_stream = False

    async def _fail(self, context: grpc.aio.ServicerContext[object, object]) -> None:
        await context.abort(self.code, self.message, self.trailing)

    async def Start(
        self, request: pb.StartRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.StartResponse:
        await self._fail(context)
        raise AssertionError("abort returned")

    async def Stop(
        self, request: pb.StopRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.StopResponse:
        await self._fail(context)
        raise AssertionError("abort returned")

    async def GetActive(
        self, request: pb.GetActiveRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.GetActiveResponse:
        await self._fail(context)
        raise AssertionError("abort returned")

    async def ListMessages(
        self, request: pb.ListMessagesRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ListMessagesResponse:
        await self._fail(context)
        raise AssertionError("abort returned")

    async def GetStats(
        self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.GetStatsResponse:
        await self._fail(context)
        raise AssertionError("abort returned")

    async def Attach(
        self, request: pb.AttachRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[pb.AttachResponse]:
        if self.mid_stream:
            await context.send_initial_metadata(((STREAM_ID_METADATA, STREAM_ID),))
            yield pb.AttachResponse(chunks=pb.ChunkBatch(first_offset=0, chunks=['{"a":1}']))
        await self._fail(context)

    async def AttachMany(
        self,
        request_iterator: AsyncIterator[pb.AttachManyRequest],
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[pb.AttachManyResponse]:
        if self.mid_stream:
            request = await anext(aiter(request_iterator))
            tag = request.subscribe.tag
            yield pb.AttachManyResponse(
                events=[
                    pb.ReaderEvent(tag=tag, subscribed=pb.Subscribed(stream_id=STREAM_ID)),
                    pb.ReaderEvent(tag=tag, chunks=pb.ChunkBatch(chunks=['{"a":1}'])),
                ]
            )
        await self._fail(context)


@contextlib.asynccontextmanager
async def failing_relay(
    max_message_bytes: int = 64 << 20,
) -> AsyncIterator[tuple[Failing, RelayClient]]:
    servicer = Failing()
    server = grpc.aio.server()
    relay_pb2_grpc.add_RelayServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        target = f"127.0.0.1:{port}"
        async with RelayClient(target, max_message_bytes=max_message_bytes) as client:
            yield servicer, client
    finally:
        await server.stop(grace=0)


def assert_mapped(error: RelayError, kind: type[RelayError], code: grpc.StatusCode) -> None:
    assert type(error) is kind
    assert error.code == code.name
    assert isinstance(error.__cause__, grpc.aio.AioRpcError)
    assert error.__cause__.code() is code


@pytest.mark.parametrize(("code", "kind"), MAPPED, ids=[c.name for c, _ in MAPPED])
async def test_every_unary_call_raises_the_relays_error(
    code: grpc.StatusCode, kind: type[RelayError]
) -> None:
    async with failing_relay() as (relay, client):
        relay.code, relay.message = code, f"{code.name.lower()} said the relay"
        calls = {
            "start": client.start("c", [user("hi")]),
            "stop": client.stop("c"),
            "get_active": client.get_active("c"),
            "list_messages": client.list_messages("c"),
            "get_stats": client.get_stats(),
            "open_attach": client.open_attach(chat_id="c"),
        }
        for name, call in calls.items():
            with pytest.raises(RelayError) as caught:
                await call
            assert_mapped(caught.value, kind, code)
            assert caught.value.message == relay.message, name
            assert str(caught.value) == f"{code.name}: {relay.message}"


@pytest.mark.parametrize(("code", "kind"), MAPPED, ids=[c.name for c, _ in MAPPED])
async def test_a_stream_failing_mid_way_raises_the_relays_error(
    code: grpc.StatusCode, kind: type[RelayError]
) -> None:
    async with failing_relay() as (relay, client):
        relay.code, relay.message, relay.mid_stream = code, "lost it", True
        # Attach: accepted, one batch, then the status.
        attached = await client.open_attach(stream_id=STREAM_ID)
        assert attached.stream_id == STREAM_ID
        events = aiter(attached.events)
        assert isinstance(await anext(events), ChunkBatch)
        with pytest.raises(RelayError) as caught:
            await anext(events)
        assert_mapped(caught.value, kind, code)
        assert caught.value.message == "lost it"
        # AttachMany: the call's iteration.
        async with client.attach_many() as readers:
            readers.subscribe(1, stream_id=STREAM_ID)
            seen = []
            with pytest.raises(RelayError) as caught:
                async for tag, event in readers:
                    seen.append((tag, type(event).__name__))
        assert seen == [(1, "Subscribed"), (1, "ChunkBatch")]
        assert_mapped(caught.value, kind, code)
        # A shared Attach's reader: the error of the call it shares.
        shared = SharedAttach(client)
        try:
            attached = await shared.open_attach(stream_id=STREAM_ID)
            events = aiter(attached.events)
            assert isinstance(await anext(events), ChunkBatch)
            with pytest.raises(RelayError) as caught:
                await anext(events)
            assert_mapped(caught.value, kind, code)
        finally:
            await shared.close()


def retry_info(delay_s: float) -> tuple[tuple[str, bytes], ...]:
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message="over a limit")
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(delay_s * 1e9))
    status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return (("grpc-status-details-bin", status.SerializeToString()),)


async def test_resource_exhausted_carries_the_relays_retry_delay() -> None:
    async with failing_relay() as (relay, client):
        relay.code, relay.message = Code.RESOURCE_EXHAUSTED, "over a limit"
        relay.trailing = retry_info(2.5)
        with pytest.raises(ResourceExhausted) as caught:
            await client.start("c", [user("hi")])
        assert caught.value.retry_after_s == 2.5
        relay.trailing = ()  # no RetryInfo: the relay did not say
        with pytest.raises(ResourceExhausted) as caught:
            await client.list_messages("c")
        assert caught.value.retry_after_s is None
        relay.message = "another message"  # a rich status that contradicts the call's: ignored
        relay.trailing = retry_info(7)
        with pytest.raises(ResourceExhausted) as caught:
            await client.get_active("c")
        assert caught.value.retry_after_s is None


async def test_a_reply_over_the_metadata_limit_is_unreadable_not_exhausted() -> None:
    async with failing_relay() as (relay, client):
        relay.code, relay.message = Code.NOT_FOUND, "x" * 100_000  # over the client's 64 KiB
        with pytest.raises(UnreadableReply) as caught:
            await client.get_active("c")
        assert caught.value.code == "RESOURCE_EXHAUSTED"
        assert not isinstance(caught.value, ResourceExhausted)  # no retry fixes it


async def test_a_message_over_the_size_limit_is_too_large() -> None:
    async with failing_relay(max_message_bytes=1_000) as (_, client):
        message = UIMessage("u1", "user", [{"type": "text", "text": "y" * 2_000}])
        with pytest.raises(TooLarge) as caught:
            await client.start("c", [message])
    assert caught.value.code == "RESOURCE_EXHAUSTED"
    assert "larger than max" in caught.value.message
    assert not isinstance(caught.value, ResourceExhausted)  # no retry fixes it


async def test_errors_of_the_connection_are_the_relays_too() -> None:
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")  # bound, then gone: nobody listens there
    await server.start()
    await server.stop(grace=0)
    async with RelayClient(f"127.0.0.1:{port}") as client:
        with pytest.raises(Unavailable):
            await client.get_active("c", timeout=5)
        with pytest.raises(Unavailable):
            await collect(client.attach(chat_id="c", timeout=5))
        with pytest.raises(Unavailable):
            await client.health(timeout=5)


async def test_a_call_on_a_closed_client_is_unavailable_not_a_grpc_error(env: Env) -> None:
    client = RelayClient(env.target)
    await client.close()
    with pytest.raises(Unavailable, match="closed"):
        await client.get_active("c")
    with pytest.raises(Unavailable, match="closed"):
        await client.open_attach(chat_id="c")
    with pytest.raises(Unavailable, match="closed"):
        async with client.attach_many() as readers:
            readers.done_subscribing()


async def test_a_real_relay_refusal_and_deadline(env: Env) -> None:
    with pytest.raises(NotFound) as caught:
        await env.client.open_attach(chat_id="no-such-chat")
    assert "no active stream" in caught.value.message
    started = await env.client.start("chat-1", [user("hi")], producer="scripted")
    with pytest.raises(DeadlineExceeded):
        await collect(env.client.attach(stream_id=started.stream_id, timeout=0.2))
    async with env.client.attach_many() as readers:
        readers.subscribe(1, stream_id="f" * 32)
        readers.done_subscribing()
        [(_, refused)] = [pair async for pair in readers]
    assert isinstance(refused, ReaderRefused) and refused.code == "NOT_FOUND"
    assert isinstance(refused.error(), NotFound)
    assert refused.error().message == refused.message


def test_the_gateway_imports_no_grpc() -> None:
    """The gateway speaks to the relay only through relay.client and its errors."""
    offenders = []
    for path in sorted((ROOT / "gateway").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                if name.startswith(("grpc", "google.rpc")):
                    offenders.append(f"{Path(path).name}:{node.lineno}: {name}")
    assert offenders == []
