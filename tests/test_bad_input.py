"""Bad input gets a clear status code and message, and changes nothing."""

from __future__ import annotations

import grpc
import pytest

from relay.model import Limits
from relay.v1 import relay_pb2 as pb
from relay.v1 import relay_pb2_grpc
from tests.conftest import Env, collect, read_chunks, text_chunks, user

Code = grpc.StatusCode


def message(parts_json: str = '[{"type":"text","text":"hi"}]', **fields: object) -> pb.UIMessage:
    values: dict[str, object] = {"id": "u1", "role": pb.ROLE_USER, "parts_json": parts_json}
    values.update(fields)
    return pb.UIMessage(**values)  # type: ignore[arg-type]


START_CASES = {
    "empty chat id": (pb.StartRequest(chat_id=""), Code.INVALID_ARGUMENT, "chat_id is required"),
    "oversized chat id": (
        pb.StartRequest(chat_id="c" * 129),
        Code.INVALID_ARGUMENT,
        "limit is 128",
    ),
    "chat id with a space": (pb.StartRequest(chat_id="a b"), Code.INVALID_ARGUMENT, "letters"),
    "parts not JSON": (
        pb.StartRequest(chat_id="c", messages=[message("[{")]),
        Code.INVALID_ARGUMENT,
        "not valid JSON",
    ),
    "parts not an array": (
        pb.StartRequest(chat_id="c", messages=[message('{"type":"text"}')]),
        Code.INVALID_ARGUMENT,
        "JSON array",
    ),
    "part without type": (
        pb.StartRequest(chat_id="c", messages=[message('[{"text":"hi"}]')]),
        Code.INVALID_ARGUMENT,
        "'type'",
    ),
    "role unspecified": (
        pb.StartRequest(chat_id="c", messages=[message(role=pb.ROLE_UNSPECIFIED)]),
        Code.INVALID_ARGUMENT,
        "role",
    ),
    "message without id": (
        pb.StartRequest(chat_id="c", messages=[message(id="")]),
        Code.INVALID_ARGUMENT,
        "needs an id",
    ),
    "metadata not an object": (
        pb.StartRequest(chat_id="c", messages=[message(metadata_json="[1]")]),
        Code.INVALID_ARGUMENT,
        "metadata_json",
    ),
    "unknown producer": (
        pb.StartRequest(chat_id="c", producer="gpt-17"),
        Code.INVALID_ARGUMENT,
        "unknown producer 'gpt-17'",
    ),
    "unknown echo option": (
        pb.StartRequest(chat_id="c", options={"colour": "red"}),
        Code.INVALID_ARGUMENT,
        "unknown options",
    ),
    "echo option not a number": (
        pb.StartRequest(chat_id="c", options={"delay_ms": "soon"}),
        Code.INVALID_ARGUMENT,
        "must be a number",
    ),
    "oversized message": (
        pb.StartRequest(
            chat_id="c", messages=[message('[{"type":"text","text":"' + "x" * 1_000_001 + '"}]')]
        ),
        Code.INVALID_ARGUMENT,
        "the limit is 1000000",
    ),
    "too many messages": (
        pb.StartRequest(chat_id="c", messages=[message(id=f"u{i}") for i in range(1_001)]),
        Code.INVALID_ARGUMENT,
        "the limit is 1000",
    ),
}


@pytest.mark.parametrize("case", START_CASES)
async def test_bad_start_is_refused_and_changes_nothing(env: Env, case: str) -> None:
    request, code, text = START_CASES[case]
    stub = relay_pb2_grpc.RelayServiceStub(env.client.channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Start(request)
    assert caught.value.code() is code
    assert text in caught.value.details()
    if request.chat_id and len(request.chat_id) <= 128 and " " not in request.chat_id:
        assert await env.client.list_messages(request.chat_id) == []
        assert await env.client.get_active(request.chat_id) is None
    assert env.relay.streams == {}


async def test_a_request_over_the_size_limit_is_resource_exhausted(env: Env) -> None:
    big = message('[{"type":"text","text":"' + "x" * (17 << 20) + '"}]')
    stub = relay_pb2_grpc.RelayServiceStub(env.client.channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Start(pb.StartRequest(chat_id="c", messages=[big]))
    assert caught.value.code() is Code.RESOURCE_EXHAUSTED


async def attach_error(env: Env, **request: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(env.client.attach(**request))  # type: ignore[arg-type]
    return caught.value


async def test_attach_refuses_negative_and_future_offsets(env: Env) -> None:
    started = await env.client.start("chat-1", [user("one")], producer="scripted")
    env.scripted.script(started.stream_id).put(*text_chunks(2))
    await read_chunks(env.client.attach(stream_id=started.stream_id), 5)

    negative = await attach_error(env, stream_id=started.stream_id, from_offset=-1)
    future = await attach_error(env, stream_id=started.stream_id, from_offset=6)

    assert negative.code() is Code.INVALID_ARGUMENT and "0 or more" in negative.details()
    assert future.code() is Code.OUT_OF_RANGE and "(5 chunks so far)" in future.details()
    assert not env.scripted.script(started.stream_id).cancelled.is_set()


async def test_attach_to_unknown_or_malformed_targets(env: Env) -> None:
    unknown = await attach_error(env, stream_id="f" * 32)
    malformed = await attach_error(env, stream_id="not-a-stream")
    no_active = await attach_error(env, chat_id="chat-without-stream")
    neither = await attach_error(env)

    assert unknown.code() is Code.NOT_FOUND and "not found" in unknown.details()
    assert malformed.code() is Code.INVALID_ARGUMENT and "32 hex" in malformed.details()
    assert no_active.code() is Code.NOT_FOUND and "no active stream" in no_active.details()
    assert neither.code() is Code.INVALID_ARGUMENT


async def test_stop_refuses_bad_input_and_changes_nothing(env: Env) -> None:
    started = await env.client.start("chat-1", [user("one")], producer="scripted")
    stub = relay_pb2_grpc.RelayServiceStub(env.client.channel)
    requests = [
        pb.StopRequest(chat_id=""),
        pb.StopRequest(chat_id="chat-1", stream_id="xyz"),
        pb.StopRequest(chat_id="chat-1", partial_message=message("nope")),
        pb.StopRequest(chat_id="chat-1", partial_message=message()),  # a user message
    ]
    for request in requests:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Stop(request)
        assert caught.value.code() is Code.INVALID_ARGUMENT, request
    active = await env.client.get_active("chat-1")
    assert active is not None and active.stream_id == started.stream_id
    assert not env.scripted.script(started.stream_id).cancelled.is_set()


async def test_other_rpcs_refuse_a_bad_chat_id(env: Env) -> None:
    stub = relay_pb2_grpc.RelayServiceStub(env.client.channel)
    for call in (
        stub.GetActive(pb.GetActiveRequest(chat_id="")),
        stub.ListMessages(pb.ListMessagesRequest(chat_id="x" * 200)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() is Code.INVALID_ARGUMENT


@pytest.mark.parametrize("limits", [Limits(readers_per_stream_max=2)])
async def test_readers_over_the_limit_are_resource_exhausted(env: Env) -> None:
    started = await env.client.start("chat-1", [user("one")], producer="scripted")
    env.scripted.script(started.stream_id).put(*text_chunks(1))
    readers = [env.client.attach(stream_id=started.stream_id) for _ in range(2)]
    for reader in readers:
        await read_chunks(reader, 4)
    third = await attach_error(env, stream_id=started.stream_id)
    assert third.code() is Code.RESOURCE_EXHAUSTED and "readers" in third.details()


@pytest.mark.parametrize("limits", [Limits(live_streams_max=1)])
async def test_live_streams_over_the_limit_are_resource_exhausted(env: Env) -> None:
    await env.client.start("chat-1", [user("one")], producer="scripted")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await env.client.start("chat-2", [user("one")], producer="scripted")
    assert caught.value.code() is Code.RESOURCE_EXHAUSTED
    assert await env.client.list_messages("chat-2") == []


@pytest.mark.parametrize("limits", [Limits(stream_max_chunks=4)])
async def test_a_producer_over_the_chunk_limit_fails_its_stream(env: Env) -> None:
    started = await env.client.start("chat-1", [user("one")], producer="scripted")
    script = env.scripted.script(started.stream_id)
    script.put(*text_chunks(5))
    chunks, end = await collect(env.client.attach(stream_id=started.stream_id))
    assert len(chunks) == 4 and end.state.value == "failed"
    assert "limit of 4 chunks" in end.error_message
    assert script.closed.is_set()  # the producer was closed, not left running
