"""Bad input gets a clear status code and message, and changes nothing."""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3

import grpc
import pytest

from relay.client import ReaderRefused
from relay.client.errors import (
    InvalidArgument,
    NotFound,
    OutOfRange,
    RelayError,
    ResourceExhausted,
)
from relay.domain.model import Limits
from relay.producers import ProducerFailed
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
    assert text in details(caught.value)
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


async def attach_error(env: Env, **request: object) -> RelayError:
    """The error the client raises for an Attach."""
    with pytest.raises(RelayError) as caught:
        await collect(env.client.attach(**request))  # type: ignore[arg-type]
    return caught.value


def details(error: grpc.aio.AioRpcError) -> str:
    return error.details() or ""


async def test_attach_refuses_negative_and_future_offsets(env: Env) -> None:
    started = await env.client.start("chat-1", [user("one")], producer="scripted")
    env.scripted.script(started.stream_id).put(*text_chunks(2))
    await read_chunks(env.client.attach(stream_id=started.stream_id), 5)

    negative = await attach_error(env, stream_id=started.stream_id, from_offset=-1)
    future = await attach_error(env, stream_id=started.stream_id, from_offset=6)

    assert isinstance(negative, InvalidArgument) and "0 or more" in negative.message
    assert isinstance(future, OutOfRange) and "(5 chunks so far)" in future.message
    assert not env.scripted.script(started.stream_id).cancelled.is_set()


async def test_attach_to_unknown_or_malformed_targets(env: Env) -> None:
    unknown = await attach_error(env, stream_id="f" * 32)
    malformed = await attach_error(env, stream_id="not-a-stream")
    no_active = await attach_error(env, chat_id="chat-without-stream")
    neither = await attach_error(env)

    assert isinstance(unknown, NotFound) and "not found" in unknown.message
    assert isinstance(malformed, InvalidArgument) and "32 hex" in malformed.message
    assert isinstance(no_active, NotFound) and "no active stream" in no_active.message
    assert isinstance(neither, InvalidArgument)


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
    assert isinstance(third, ResourceExhausted) and "readers" in third.message


@pytest.mark.parametrize("limits", [Limits(live_streams_max=1)])
async def test_live_streams_over_the_limit_are_resource_exhausted(env: Env) -> None:
    await env.client.start("chat-1", [user("one")], producer="scripted")
    with pytest.raises(ResourceExhausted):
        await env.client.start("chat-2", [user("one")], producer="scripted")
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


# -- hostile input (issue 9, defects 6 and 7) ------------------------------------------------------

DETAIL_MAX_CHARS = 1024
# What must never reach a client: Python class names, tracebacks, raw store errors.
LEAKS = ("<class", "Error:", "Traceback", "sqlite", "Exception", "RecursionError", "codec")

DEEP = 100_000
ONE_MB = 1_000_000


def assert_clean(detail: str) -> None:
    """The status detail is short and says nothing about the relay's internals."""
    assert len(detail) <= DETAIL_MAX_CHARS, f"{len(detail)} characters of detail"
    for leak in LEAKS:
        assert leak not in detail, detail


HOSTILE_START_CASES = {
    "lone surrogate in parts": (
        pb.StartRequest(chat_id="c", messages=[message(r'[{"type":"text","text":"a\ud800b"}]')]),
        Code.INVALID_ARGUMENT,
        "surrogate",
    ),
    "lone low surrogate in a part's key": (
        pb.StartRequest(chat_id="c", messages=[message(r'[{"type":"text","\udc00":1}]')]),
        Code.INVALID_ARGUMENT,
        "surrogate",
    ),
    "lone surrogate in metadata": (
        pb.StartRequest(chat_id="c", messages=[message(metadata_json=r'{"x":["\ud800"]}')]),
        Code.INVALID_ARGUMENT,
        "surrogate",
    ),
    "parts nested 100,000 deep": (
        pb.StartRequest(chat_id="c", messages=[message("[" * DEEP + "]" * DEEP)]),
        Code.INVALID_ARGUMENT,
        "nested",
    ),
    "metadata nested 100,000 deep": (
        pb.StartRequest(
            chat_id="c", messages=[message(metadata_json='{"a":' * DEEP + "1" + "}" * DEEP)]
        ),
        Code.INVALID_ARGUMENT,
        "nested",
    ),
    "parts nested past the limit but within orjson's": (
        pb.StartRequest(
            chat_id="c",
            messages=[message('[{"type":"data-x","data":' + "[" * 300 + "]" * 300 + "}]")],
        ),
        Code.INVALID_ARGUMENT,
        "nested",
    ),
    "a 1 MB message id": (
        pb.StartRequest(chat_id="c", messages=[message(id="m" * ONE_MB)]),
        Code.INVALID_ARGUMENT,
        "longer than 256",
    ),
    "a 1 MB message id, also not JSON": (
        pb.StartRequest(chat_id="c", messages=[message("[{", id="m" * ONE_MB)]),
        Code.INVALID_ARGUMENT,
        "longer than 256",
    ),
    "a 1 MB producer name": (
        pb.StartRequest(chat_id="c", producer="p" * ONE_MB),
        Code.INVALID_ARGUMENT,
        "producer",
    ),
    "a 1 MB option key": (
        pb.StartRequest(chat_id="c", options={"k" * ONE_MB: "1"}),
        Code.INVALID_ARGUMENT,
        "option",
    ),
    "32 unknown options with long keys": (
        pb.StartRequest(chat_id="c", options={f"{i:03}" + "k" * 125: "1" for i in range(32)}),
        Code.INVALID_ARGUMENT,
        "unknown options",
    ),
    "a 1 KB option value that is not a number": (
        pb.StartRequest(chat_id="c", options={"delay_ms": "x" * 1_024}),
        Code.INVALID_ARGUMENT,
        "must be a number",
    ),
    "a 1 MB chat id": (
        pb.StartRequest(chat_id="c" * ONE_MB),
        Code.INVALID_ARGUMENT,
        "the limit is 128",
    ),
}


@pytest.mark.parametrize("case", HOSTILE_START_CASES)
async def test_hostile_start_is_refused_briefly_and_changes_nothing(env: Env, case: str) -> None:
    request, code, text = HOSTILE_START_CASES[case]
    stub = relay_pb2_grpc.RelayServiceStub(env.client.channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Start(request)
    assert caught.value.code() is code, details(caught.value)[:200]
    assert text in details(caught.value)
    assert_clean(details(caught.value))
    if request.chat_id == "c":
        assert await env.client.list_messages("c") == []
        assert await env.client.get_active("c") is None
    assert env.relay.streams == {}


async def test_hostile_stop_is_refused_briefly_and_changes_nothing(env: Env) -> None:
    started = await env.client.start("chat-1", [user("one")], producer="scripted")
    before = await env.client.list_messages("chat-1")
    stub = relay_pb2_grpc.RelayServiceStub(env.client.channel)

    def partial(parts_json: str, **fields: object) -> pb.UIMessage:
        return message(parts_json, **{"id": "a1", "role": pb.ROLE_ASSISTANT, **fields})

    requests = {
        "surrogate in the partial": partial(r'[{"type":"text","text":"\ud800"}]'),
        "surrogate in its metadata": partial(message().parts_json, metadata_json=r'{"a":"\udfff"}'),
        "partial nested 100,000 deep": partial("[" * DEEP + "]" * DEEP),
        "1 MB partial id": partial(message().parts_json, id="a" * ONE_MB),
    }
    for case, bad in requests.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Stop(pb.StopRequest(chat_id="chat-1", partial_message=bad))
        assert caught.value.code() is Code.INVALID_ARGUMENT, case
        assert_clean(details(caught.value))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Stop(pb.StopRequest(chat_id="chat-1", stream_id="f" * ONE_MB))
    assert caught.value.code() is Code.INVALID_ARGUMENT
    assert "not a stream id" in details(caught.value)
    assert_clean(details(caught.value))

    active = await env.client.get_active("chat-1")
    assert active is not None and active.stream_id == started.stream_id
    assert await env.client.list_messages("chat-1") == before
    assert not env.scripted.script(started.stream_id).cancelled.is_set()


async def test_a_1_mb_stream_id_is_refused_briefly(env: Env) -> None:
    async with asyncio.timeout(10):
        attached = await attach_error(env, stream_id="f" * ONE_MB)
    assert isinstance(attached, InvalidArgument) and "not a stream id" in attached.message
    assert_clean(attached.message)

    async with asyncio.timeout(10), env.client.attach_many() as readers:
        readers.subscribe(1, stream_id="f" * ONE_MB)
        readers.done_subscribing()
        events = [event async for _, event in readers]
    assert len(events) == 1
    refused = events[0]
    assert isinstance(refused, ReaderRefused) and refused.code == "INVALID_ARGUMENT"
    assert isinstance(refused.error(), InvalidArgument)
    assert len(refused.message) <= DETAIL_MAX_CHARS


UNDECODABLE = {
    "bad UTF-8 in a string field": b"\x0a\x03\xed\xa0\x80",
    "corrupt wire format": b"\xff\xff\xff\xff",
}
UNARY_METHODS = ("Start", "Stop", "GetActive", "ListMessages")


def raw(data: bytes) -> bytes:
    """Bytes as they are, on the wire and back (what a channel does without a serializer)."""
    return data


@pytest.mark.parametrize("payload", UNDECODABLE)
async def test_undecodable_requests_are_invalid_argument(env: Env, payload: str) -> None:
    channel = env.client.channel
    data = UNDECODABLE[payload]
    errors = []
    # GetStatsRequest has no fields, so field 1's bad UTF-8 is an unknown field it skips.
    methods = UNARY_METHODS + (("GetStats",) if payload == "corrupt wire format" else ())
    for method in methods:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary(f"/relay.v1.RelayService/{method}", raw, raw)(data)
        errors.append(caught.value)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in channel.unary_stream("/relay.v1.RelayService/Attach", raw, raw)(data):
            pass
    errors.append(caught.value)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        attach_many = channel.stream_stream("/relay.v1.RelayService/AttachMany", raw, raw)
        async for _ in attach_many(iter([data])):
            pass
    errors.append(caught.value)
    for error in errors:
        assert error.code() is Code.INVALID_ARGUMENT, details(error)
        assert "not a valid relay.v1." in details(error)
        assert_clean(details(error))
    assert await env.client.get_active("c") is None


async def test_an_unexpected_error_is_internal_with_an_id_in_the_log(
    env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*args: object, **kwargs: object) -> object:
        raise sqlite3.OperationalError("disk I/O error in table chats near 'secret'")

    monkeypatch.setattr(env.relay, "list_messages", broken)
    monkeypatch.setattr(env.relay, "attach", broken)
    monkeypatch.setattr(env.relay, "_stream_to_read", broken)
    stub = relay_pb2_grpc.RelayServiceStub(env.client.channel)
    with caplog.at_level(logging.ERROR, logger="relay"):
        with pytest.raises(grpc.aio.AioRpcError) as listed:
            await stub.ListMessages(pb.ListMessagesRequest(chat_id="c"))
        attached = await attach_error(env, stream_id="f" * 32)
        with pytest.raises(grpc.aio.AioRpcError) as multiplexed:
            subscribe = pb.Subscribe(tag=1, attach=pb.AttachRequest(stream_id="f" * 32))
            async for _ in stub.AttachMany(iter([pb.AttachManyRequest(subscribe=subscribe)])):
                pass
    statuses = [(e.code().name, details(e)) for e in (listed.value, multiplexed.value)]
    for code, detail in [*statuses, (attached.code, attached.message)]:
        assert code == "INTERNAL", detail
        assert "internal error" in detail and "relay log" in detail
        assert "secret" not in detail
        assert_clean(detail)
        error_id = re.search(r"\(id ([0-9a-f]+)\)", detail)
        assert error_id is not None
        logged = [r for r in caplog.records if getattr(r, "error_id", None) == error_id.group(1)]
        assert len(logged) == 1 and logged[0].exc_info is not None


async def test_chunks_with_lone_surrogates_fail_their_stream_cleanly(env: Env) -> None:
    started = await env.client.start("chat-1", [user("one")], producer="scripted")
    script = env.scripted.script(started.stream_id)
    script.put(*text_chunks(2), {"type": "text-delta", "id": "t", "delta": "bad \ud800"})
    chunks, end = await collect(env.client.attach(stream_id=started.stream_id))
    assert len(chunks) == 5 and end.state.value == "failed"
    assert "lone surrogate" in end.error_message and "codec" not in end.error_message
    assert script.closed.is_set()
    assert await env.client.get_active("chat-1") is None
    messages = await env.client.list_messages("chat-1")
    assert [m.role for m in messages] == ["user", "assistant"]
    assert messages[1].parts[-1]["text"] == "w0 w1 "
    # The relay goes on serving.
    again = await env.client.start("chat-1", [user("two", "u2")], producer="echo")
    assert (await collect(env.client.attach(stream_id=again.stream_id)))[
        1
    ].state.value == "completed"


async def test_a_chunk_nested_too_deep_fails_its_stream_cleanly(env: Env) -> None:
    deep: dict[str, object] = {"type": "data-deep"}
    node = deep
    for _ in range(DEEP):
        inner: dict[str, object] = {}
        node["data"] = inner
        node = inner
    started = await env.client.start("chat-1", [user("one")], producer="scripted")
    script = env.scripted.script(started.stream_id)
    script.put(*text_chunks(1), deep)
    chunks, end = await collect(env.client.attach(stream_id=started.stream_id))
    assert len(chunks) == 4 and end.state.value == "failed"
    assert "nested" in end.error_message and "Recursion" not in end.error_message
    assert await env.client.get_active("chat-1") is None


async def test_a_producer_failure_with_a_lone_surrogate_still_ends_its_stream(env: Env) -> None:
    started = await env.client.start("chat-1", [user("one")], producer="scripted")
    script = env.scripted.script(started.stream_id)
    script.put(*text_chunks(1), ProducerFailed("upstream said \ud800 and " + "x" * ONE_MB))
    async with asyncio.timeout(10):
        chunks, end = await collect(env.client.attach(stream_id=started.stream_id))
    assert len(chunks) == 4 and end.state.value == "failed"
    assert end.error_message.startswith("upstream said \ufffd and xxx")
    assert len(end.error_message) <= 4_096
    assert await env.client.get_active("chat-1") is None
    messages = await env.client.list_messages("chat-1")
    assert [m.role for m in messages] == ["user", "assistant"]
