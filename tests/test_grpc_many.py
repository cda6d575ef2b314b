"""The `grpc` producer multiplexed (`multiplex = true`): every answer on one GenerateMany call.

A backend the test drives response by response (each response may carry several answers' chunks),
and the Python example. Everything is awaited on events; the only wait on time is the idle
timeout, the feature under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from relay.client import RelayClient
from relay.domain.core import Relay
from relay.domain.model import JsonObject, StopOutcome, StreamState
from relay.producers import EchoProducer, Producer, ProduceRequest, ProducerFailed, grpc_many
from relay.producers.grpc_many import GrpcManyProducer
from relay.producers.grpc_producer import GrpcProducer
from relay.producers.profiles import Profile, ProfileError, build_producer, load_profiles
from relay.v1 import producer_pb2
from tests.conftest import collect, node_with_packages, read_chunks, running_relay, user
from tests.test_grpc_producer import (
    BACKEND_TOKEN,
    HEAD,
    NODE_DIR,
    Abort,
    ScriptedBackend,
    backend_server,
    chunk,
    delta,
    example,
    node_producer,
    secured_python_backend,
)
from tests.tls import make_certificates

TAIL = [
    chunk({"type": "text-end", "id": "t"}),
    chunk({"type": "finish-step"}),
    chunk({"type": "finish", "finishReason": "stop"}),
]
OK = producer_pb2.AnswerEnd()


def part(
    stream_id: str, chunks: list[str], end: producer_pb2.AnswerEnd | None = None
) -> producer_pb2.StreamChunks:
    return producer_pb2.StreamChunks(stream_id=stream_id, chunks=chunks, end=end)


def failed(code: grpc.StatusCode, message: str) -> producer_pb2.AnswerEnd:
    return producer_pb2.AnswerEnd(code=code.value[0], message=message)


# -- a GenerateMany backend the test drives --------------------------------------------------------


@dataclass
class ManyCall:
    """One GenerateMany call: the test feeds responses, an Abort, or None to end the call OK; the
    servicer records the relay's requests."""

    feed: asyncio.Queue[producer_pb2.GenerateManyResponse | Abort | None] = field(
        default_factory=asyncio.Queue
    )
    requests: list[producer_pb2.GenerateManyRequest] = field(default_factory=list)
    starts: dict[str, producer_pb2.GenerateRequest] = field(default_factory=dict)
    cancels: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # a request came
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    def send(self, *parts: producer_pb2.StreamChunks) -> None:
        self.feed.put_nowait(producer_pb2.GenerateManyResponse(streams=parts))

    async def until(self, condition: Any) -> None:
        async with asyncio.timeout(10):
            while not condition():
                self.changed.clear()
                await self.changed.wait()

    async def started(self, *stream_ids: str) -> None:
        await self.until(lambda: all(s in self.starts for s in stream_ids))

    async def cancel_of(self, stream_id: str) -> None:
        await self.until(lambda: stream_id in self.cancels)


class ScriptedManyBackend:
    def __init__(self) -> None:
        self.calls: list[ManyCall] = []
        self.opened = asyncio.Event()

    async def Generate(self, request: Any, context: Any) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "only GenerateMany here")

    async def call(self, number: int = 0) -> ManyCall:
        """The `number`th GenerateMany call, once the relay has opened it."""
        async with asyncio.timeout(10):
            while len(self.calls) <= number:
                self.opened.clear()
                await self.opened.wait()
        return self.calls[number]

    async def GenerateMany(self, request_iterator: Any, context: Any) -> None:
        call = ManyCall()
        self.calls.append(call)
        self.opened.set()

        async def read() -> None:
            async for request in request_iterator:
                call.requests.append(request)
                if request.HasField("start"):
                    call.starts[request.start.stream_id] = request.start
                else:
                    call.cancels.append(request.cancel)
                call.changed.set()

        reader = asyncio.create_task(read())
        try:
            while (item := await call.feed.get()) is not None:
                if isinstance(item, Abort):
                    await context.abort(item.code, item.details)  # raises
                await context.write(item)
        except asyncio.CancelledError:
            call.cancelled.set()
            raise
        finally:
            reader.cancel()
            call.finished.set()


# -- a relay with the multiplexed producer ---------------------------------------------------------


class Recording:
    """The producer, recording what each answer's generator yields (to see its batches)."""

    def __init__(self, producer: GrpcProducer) -> None:
        self.producer = producer
        self.yielded: dict[str, list[int]] = {}  # by stream id: each batch's size

    def check_options(self, options: Mapping[str, str]) -> None:
        self.producer.check_options(options)

    async def generate(
        self, request: ProduceRequest
    ) -> AsyncGenerator[JsonObject | list[JsonObject], None]:
        sizes = self.yielded.setdefault(request.stream_id, [])
        async with contextlib.aclosing(self.producer.generate(request)) as items:
            async for item in items:
                sizes.append(len(item) if isinstance(item, list) else 1)
                yield item


@dataclass
class ManyEnv:
    relay: Relay
    client: RelayClient
    producer: GrpcManyProducer
    recording: Recording

    async def start(self, chat_id: str, **kwargs: Any) -> str:
        started = await self.client.start(chat_id, [user("hi")], producer="backend", **kwargs)
        return started.stream_id

    async def answer(self, stream_id: str) -> tuple[list[str], Any]:
        async with asyncio.timeout(10):
            return await collect(self.client.attach(stream_id=stream_id))


@asynccontextmanager
async def many_env(tmp_path: Path, producer: GrpcManyProducer) -> AsyncIterator[ManyEnv]:
    recording = Recording(producer)
    producers: dict[str, Producer] = {"echo": EchoProducer(delay_ms=0), "backend": recording}
    try:
        async with running_relay(tmp_path / "relay.sqlite3", producers) as running:
            yield ManyEnv(running.relay, running.client, producer, recording)
    finally:
        await producer.close()


@pytest.fixture
def scripted() -> ScriptedManyBackend:
    return ScriptedManyBackend()


@pytest.fixture
async def env(tmp_path: Path, scripted: ScriptedManyBackend) -> AsyncIterator[ManyEnv]:
    async with (
        backend_server(scripted) as target,
        many_env(tmp_path, GrpcManyProducer(target, name="backend")) as running,
    ):
        yield running


# -- order, offsets, batches -----------------------------------------------------------------------


async def test_interleaved_answers_on_one_call_keep_their_order_and_offsets(
    env: ManyEnv, scripted: ScriptedManyBackend
) -> None:
    a, b, c = [await env.start(f"chat-{n}") for n in range(3)]
    call = await scripted.call()
    await call.started(a, b, c)
    assert [r.start.chat_id for r in call.requests] == ["chat-0", "chat-1", "chat-2"]

    call.send(part(a, HEAD), part(b, HEAD[:1]))
    call.send(part(b, HEAD[1:]), part(a, [delta("a1 ")]), part(c, HEAD), part(a, [delta("a2")]))
    call.send(part(c, [delta("c1")], OK), part(b, [delta("b1")]))
    call.send(part(a, TAIL, OK), part(b, TAIL, OK))

    answers = {s: await env.answer(s) for s in (a, b, c)}
    assert answers[a][0] == [*HEAD, delta("a1 "), delta("a2"), *TAIL]
    assert answers[b][0] == [*HEAD, delta("b1"), *TAIL]
    assert answers[c][0] == [*HEAD, delta("c1")]
    for stream_id, final in ((a, 8), (b, 7), (c, 4)):
        end = answers[stream_id][1]
        assert (end.state, end.final_offset) == (StreamState.COMPLETED, final)
    # Each StreamChunks reached its answer as one batch.
    assert env.recording.yielded == {a: [3, 1, 1, 3], b: [1, 2, 1, 3], c: [3, 1]}
    assert len(scripted.calls) == 1 and call.cancels == []  # ended answers need no cancel
    saved = (await env.client.list_messages("chat-0"))[-1]
    assert saved.id == "msg-b" and saved.parts[-1]["text"] == "a1 a2"


async def test_one_response_with_chunks_of_several_answers_gives_each_its_batch(
    env: ManyEnv, scripted: ScriptedManyBackend
) -> None:
    ids = [await env.start(f"chat-{n}") for n in range(5)]
    call = await scripted.call()
    await call.started(*ids)

    call.send(*(part(s, [*HEAD, delta(s[:4]), *TAIL], OK) for s in ids))

    for stream_id in ids:
        chunks, end = await env.answer(stream_id)
        assert chunks == [*HEAD, delta(stream_id[:4]), *TAIL]
        assert end.state is StreamState.COMPLETED
        assert env.recording.yielded[stream_id] == [7]


# -- cancellation: Stop sends cancel for that answer alone; late chunks are dropped ----------------


async def test_stop_of_one_answer_sends_cancel_and_the_others_go_on(
    env: ManyEnv, scripted: ScriptedManyBackend
) -> None:
    a, b = await env.start("chat-a"), await env.start("chat-b")
    call = await scripted.call()
    await call.started(a, b)
    call.send(part(a, [*HEAD, delta("partial ")]), part(b, HEAD))
    await read_chunks(env.client.attach(stream_id=a), 4)
    await read_chunks(env.client.attach(stream_id=b), 3)

    result = await env.client.stop("chat-a")

    assert result.outcome is StopOutcome.STOPPED and result.end is not None
    assert (result.end.state, result.end.final_offset) == (StreamState.STOPPED, 4)
    await call.cancel_of(a)
    assert call.cancels == [a]
    # Late chunks of the cancelled answer (sent before the producer saw the cancel) are dropped,
    # in the same response as another answer's.
    call.send(part(a, [delta("late")], OK), part(b, [delta("b "), *TAIL], OK))
    chunks, end = await env.answer(b)
    assert chunks == [*HEAD, delta("b "), *TAIL] and end.state is StreamState.COMPLETED
    chunks, end = await env.answer(a)
    assert chunks == [*HEAD, delta("partial ")] and end.final_offset == 4
    saved = (await env.client.list_messages("chat-a"))[-1]
    assert saved.parts[-1]["text"] == "partial "
    assert len(scripted.calls) == 1 and not call.finished.is_set()  # the call goes on


async def test_supersede_sends_cancel_for_the_old_answer(
    env: ManyEnv, scripted: ScriptedManyBackend
) -> None:
    first = await env.start("chat-1")
    call = await scripted.call()
    await call.started(first)

    second = await env.start("chat-1", supersede=True)

    await call.cancel_of(first)
    await call.started(second)
    call.send(part(second, [*HEAD, *TAIL], OK))
    _, end = await env.answer(second)
    assert end.state is StreamState.COMPLETED


# -- failures of one answer ------------------------------------------------------------------------


async def test_an_answer_ending_with_an_error_fails_alone_with_its_message(
    env: ManyEnv, scripted: ScriptedManyBackend
) -> None:
    a, b = await env.start("chat-a"), await env.start("chat-b")
    call = await scripted.call()
    await call.started(a, b)

    bad = failed(grpc.StatusCode.INVALID_ARGUMENT, "temperature must be a number")
    call.send(part(a, [*HEAD, delta("half ")], bad), part(b, HEAD))

    chunks, end = await env.answer(a)
    assert end.state is StreamState.FAILED
    assert end.error_message.startswith("grpc producer 'backend' (127.0.0.1:")
    assert end.error_message.endswith("failed: INVALID_ARGUMENT: temperature must be a number")
    assert chunks[:4] == [*HEAD, delta("half ")]
    assert json.loads(chunks[-1]) == {"type": "error", "errorText": end.error_message}
    saved = (await env.client.list_messages("chat-a"))[-1]
    assert saved.parts[-1]["text"] == "half "
    # The other answer goes on; the failed one needs no cancel (its producer ended it).
    call.send(part(b, TAIL, OK))
    _, end = await env.answer(b)
    assert end.state is StreamState.COMPLETED
    assert call.cancels == []


async def test_an_answer_ending_with_an_unknown_code_fails_as_unknown(
    env: ManyEnv, scripted: ScriptedManyBackend
) -> None:
    a = await env.start("chat-a")
    call = await scripted.call()
    await call.started(a)
    call.send(part(a, [], producer_pb2.AnswerEnd(code=99)))
    chunks, end = await env.answer(a)
    assert end.state is StreamState.FAILED
    assert end.error_message.endswith("failed: UNKNOWN: no details")
    assert len(chunks) == 1


@pytest.mark.parametrize("bad", ["not json", '{"no": "type"}'], ids=["not-json", "no-type"])
async def test_a_malformed_chunk_fails_that_answer_and_cancels_it(
    env: ManyEnv, scripted: ScriptedManyBackend, bad: str
) -> None:
    a, b = await env.start("chat-a"), await env.start("chat-b")
    call = await scripted.call()
    await call.started(a, b)

    call.send(part(a, [*HEAD, delta("ok "), bad, delta("never seen")]), part(b, HEAD))

    chunks, end = await env.answer(a)
    assert end.state is StreamState.FAILED
    assert "not a JSON object with a string 'type'" in end.error_message
    assert repr(bad) in end.error_message
    assert chunks[:-1] == [*HEAD, delta("ok ")] and json.loads(chunks[-1])["type"] == "error"
    await call.cancel_of(a)  # the relay gave it up: the producer is told
    call.send(part(b, TAIL, OK))
    _, end = await env.answer(b)
    assert end.state is StreamState.COMPLETED


async def test_an_idle_answer_fails_after_the_idle_timeout_and_is_cancelled(
    tmp_path: Path, scripted: ScriptedManyBackend
) -> None:
    async with (
        backend_server(scripted) as target,
        many_env(tmp_path, GrpcManyProducer(target, name="backend", idle_timeout_s=0.3)) as env,
    ):
        a, b = await env.start("chat-a"), await env.start("chat-b")
        call = await scripted.call()
        await call.started(a, b)
        call.send(part(a, [*HEAD, delta("so far ")]), part(b, [*HEAD, *TAIL], OK))

        began = time.monotonic()
        chunks, end = await env.answer(a)

        assert end.state is StreamState.FAILED
        assert end.error_message.endswith("sent nothing for 0.3 s (idle timeout)")
        assert time.monotonic() - began < 5
        assert chunks[:-1] == [*HEAD, delta("so far ")]
        await call.cancel_of(a)
        _, end = await env.answer(b)
        assert end.state is StreamState.COMPLETED
        assert len(scripted.calls) == 1 and not call.finished.is_set()


# -- the call ending fails every answer open on it; the next Start opens a new call ----------------


async def test_the_call_aborted_fails_every_open_answer_and_the_next_start_reopens(
    env: ManyEnv, scripted: ScriptedManyBackend
) -> None:
    a, b, done = [await env.start(f"chat-{n}") for n in "abc"]
    call = await scripted.call()
    await call.started(a, b, done)
    call.send(part(a, [*HEAD, delta("a ")]), part(b, HEAD), part(done, [*HEAD, *TAIL], OK))

    call.feed.put_nowait(Abort(grpc.StatusCode.INTERNAL, "the model server fell over"))

    for stream_id, kept in ((a, 4), (b, 3)):
        chunks, end = await env.answer(stream_id)
        assert end.state is StreamState.FAILED
        assert "failed: INTERNAL: the model server fell over" in end.error_message
        assert "the GenerateMany call ended with 2 answer(s) open on it" in end.error_message
        assert len(chunks) == kept + 1 and json.loads(chunks[-1])["type"] == "error"
    _, end = await env.answer(done)
    assert end.state is StreamState.COMPLETED

    again = await env.start("chat-d")
    second = await scripted.call(1)
    await second.started(again)
    assert list(call.starts) == [a, b, done]
    second.send(part(again, [*HEAD, *TAIL], OK))
    _, end = await env.answer(again)
    assert end.state is StreamState.COMPLETED


async def test_the_call_ending_ok_with_answers_open_fails_them(
    env: ManyEnv, scripted: ScriptedManyBackend
) -> None:
    a = await env.start("chat-a")
    call = await scripted.call()
    await call.started(a)
    call.send(part(a, HEAD))
    call.feed.put_nowait(None)  # the handler returns: status OK

    _, end = await env.answer(a)
    assert end.state is StreamState.FAILED
    assert "ended its GenerateMany call before this answer's end" in end.error_message


async def test_the_backend_going_away_fails_every_open_answer_and_a_new_one_is_reached(
    tmp_path: Path,
) -> None:
    scripted = ScriptedManyBackend()
    server, port = await example.start_server(scripted, "127.0.0.1:0")
    producer = GrpcManyProducer(f"127.0.0.1:{port}", name="backend", connect_timeout_s=10)
    async with many_env(tmp_path, producer) as env:
        a, b = await env.start("chat-a"), await env.start("chat-b")
        call = await scripted.call()
        await call.started(a, b)
        call.send(part(a, HEAD))
        await read_chunks(env.client.attach(stream_id=a), 3)

        await server.stop(grace=0)  # the backend's process is gone

        for stream_id in (a, b):
            chunks, end = await env.answer(stream_id)
            assert end.state is StreamState.FAILED
            assert "the GenerateMany call ended with 2 answer(s) open on it" in end.error_message
            assert json.loads(chunks[-1])["type"] == "error"

        # The backend comes back on the same port: the next Start opens a new call there.
        revived = ScriptedManyBackend()
        server, _ = await example.start_server(revived, f"127.0.0.1:{port}")
        try:
            again = await env.start("chat-c")
            call = await revived.call()
            await call.started(again)
            call.send(part(again, [*HEAD, *TAIL], OK))
            _, end = await env.answer(again)
            assert end.state is StreamState.COMPLETED
        finally:
            await server.stop(grace=0)


async def test_a_backend_without_generate_many_fails_the_answer_saying_so(tmp_path: Path) -> None:
    async with (
        backend_server(ScriptedBackend()) as target,
        many_env(tmp_path, GrpcManyProducer(target, name="backend")) as env,
    ):
        stream_id = await env.start("chat-1")
        chunks, end = await env.answer(stream_id)
        assert end.state is StreamState.FAILED
        assert "UNIMPLEMENTED" in end.error_message
        assert "multiplex = true needs a producer implementing it" in end.error_message
        assert len(chunks) == 1


async def test_shutdown_cancels_the_call(env: ManyEnv, scripted: ScriptedManyBackend) -> None:
    a = await env.start("chat-a")
    call = await scripted.call()
    await call.started(a)

    await env.relay.close(grace=0)
    await env.producer.close()

    async with asyncio.timeout(5):
        await call.cancelled.wait()
    end = env.relay.streams[a].end
    assert end is not None and end.state is StreamState.INTERRUPTED
    assert env.producer._many is None and env.producer._channel is None


# -- profiles --------------------------------------------------------------------------------------


def test_a_profile_selects_multiplexing(tmp_path: Path) -> None:
    path = tmp_path / "producers.toml"
    path.write_text(
        '[producers.many]\nkind = "grpc"\ntarget = "127.0.0.1:1"\nmultiplex = true\n'
        '[producers.one]\nkind = "grpc"\ntarget = "127.0.0.1:1"\n'
    )
    profiles = load_profiles(path)
    assert profiles["many"].multiplex and not profiles["one"].multiplex
    assert isinstance(build_producer(profiles["many"]), GrpcManyProducer)
    one = build_producer(profiles["one"])
    assert isinstance(one, GrpcProducer) and not isinstance(one, GrpcManyProducer)

    path.write_text('[producers.x]\nkind = "grpc"\ntarget = "h:1"\nmultiplex = "yes"\n')
    with pytest.raises(ProfileError, match="multiplex must be true or false"):
        load_profiles(path)
    path.write_text('[producers.x]\nkind = "echo"\nmultiplex = true\n')
    with pytest.raises(ProfileError, match='multiplex is for kind "grpc" only'):
        load_profiles(path)


# -- the Python example, multiplexed ---------------------------------------------------------------


async def test_python_example_multiplexes_concurrent_answers(tmp_path: Path) -> None:
    servicer = example.PythonProducer(default_delay_ms=1, tick_ms=5)
    async with backend_server(servicer) as target:
        profile = Profile("backend", "grpc", target=target, multiplex=True)
        producer = build_producer(profile)
        assert isinstance(producer, GrpcManyProducer)
        async with many_env(tmp_path, producer) as env:
            ids = [
                (await env.client.start(
                    f"chat-{n}", [user(f"hello {n}")], producer="backend",
                    options={"chunks": str(10 + n)},
                )).stream_id
                for n in range(8)
            ]  # fmt: skip
            for n, stream_id in enumerate(ids):
                chunks, end = await env.answer(stream_id)
                parsed = [json.loads(c) for c in chunks]
                assert end.state is StreamState.COMPLETED, end.error_message
                assert end.final_offset == 10 + n + 6
                assert parsed[0] == {"type": "start", "messageId": f"msg_{stream_id}"}
                assert [c["type"] for c in parsed[-3:]] == ["text-end", "finish-step", "finish"]
                text = "".join(c["delta"] for c in parsed if c["type"] == "text-delta")
                words = f"Python producer says: hello {n}".split()
                assert text == " ".join(words[i % len(words)] for i in range(10 + n))
                saved = (await env.client.list_messages(f"chat-{n}"))[-1]
                assert saved.id == f"msg_{stream_id}" and saved.parts[-1]["text"] == text
            # One call carried them all, in fewer responses than chunks.
            assert len(servicer.many_calls) == 1
            call = servicer.many_calls[0]
            assert call.chunks_sent == sum(10 + n + 6 for n in range(8))
            assert call.responses_sent < call.chunks_sent

            # An option the example refuses fails that answer with its message.
            refused = await env.start("chat-x", options={"delay_ms": "soon"})
            _, end = await env.answer(refused)
            assert end.state is StreamState.FAILED
            assert "INVALID_ARGUMENT: delay_ms must be a number, got 'soon'" in end.error_message

            # Stop reaches the example's answer task, and the call stays for the next answer.
            stopped = await env.start("chat-s", options={"chunks": "1000000"})
            await read_chunks(env.client.attach(stream_id=stopped), 6)
            result = await env.client.stop("chat-s")
            assert result.outcome is StopOutcome.STOPPED
            async with asyncio.timeout(5):
                await servicer.calls[stopped].cancelled.wait()
            last = await env.start("chat-l", options={"chunks": "3"})
            _, end = await env.answer(last)
            assert end.state is StreamState.COMPLETED
            assert len(servicer.many_calls) == 1


async def test_an_answer_whose_queue_outgrows_its_bound_fails_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The dispatcher never waits for an answer: one that is not taking its batches (its task
    does not run) fails once what waits behind its next batch passes the bound."""
    monkeypatch.setattr(grpc_many, "_QUEUE_MAX_CHARS", 100)
    producer = GrpcManyProducer("127.0.0.1:1", name="backend")
    answer = grpc_many._Answer("s1", producer)
    try:
        now = asyncio.get_running_loop().time()
        answer.deliver(["x" * 500], now)  # the next batch to take: not counted
        answer.deliver(["y" * 60], now)
        assert answer.end is None and len(answer.batches) == 2
        answer.deliver(["z" * 60], now)  # 120 waiting behind it
        assert answer.end is not None and "fell behind this answer by over 100" in answer.end
        assert not answer.batches
        answer.deliver(["after"], now)  # failed: nothing more is queued
        assert not answer.batches

        fresh = grpc_many._Answer("s2", producer)
        fresh.deliver(["x" * 90], now)
        for _ in range(10):  # taken as they come: never lagging
            assert fresh.take() == ["x" * 90]
            fresh.deliver(["x" * 90], now)
        assert fresh.end is None
        fresh.idle.close()
    finally:
        answer.idle.close()


async def test_a_multiplexed_profile_reaches_the_example_over_mutual_tls_with_a_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    certs = make_certificates(tmp_path / "certs")
    monkeypatch.setenv("RIGHT_TOKEN", BACKEND_TOKEN)
    monkeypatch.setenv("WRONG_TOKEN", "not-the-backend-token")
    servicer = example.PythonProducer(default_delay_ms=0, tick_ms=1)
    async with secured_python_backend(servicer, certs) as target:
        for token_env in ("RIGHT_TOKEN", "WRONG_TOKEN"):
            profile = Profile(
                "backend",
                "grpc",
                target=target,
                multiplex=True,
                token_env=token_env,
                tls_ca=str(certs.ca.cert),
                tls_cert=str(certs.client.cert),
                tls_key=str(certs.client.key),
            )
            producer = build_producer(profile)
            assert isinstance(producer, GrpcManyProducer)
            async with many_env(tmp_path / token_env, producer) as env:
                stream_id = await env.start("chat-1", options={"chunks": "3"})
                chunks, end = await env.answer(stream_id)
                if token_env == "RIGHT_TOKEN":
                    assert end.state is StreamState.COMPLETED, end.error_message
                    assert len(chunks) == 9
                else:
                    assert end.state is StreamState.FAILED
                    assert "UNAUTHENTICATED: a valid token is required" in end.error_message
        assert len(servicer.many_calls) == 1  # the refused call never reached the handler


# -- the Node example, multiplexed -----------------------------------------------------------------


@pytest.fixture(scope="session")
def node() -> str:
    return node_with_packages(NODE_DIR, "the Node producer example runs on Node.js")


async def test_node_example_multiplexes_concurrent_answers(tmp_path: Path, node: str) -> None:
    async with node_producer(node) as backend:
        producer = GrpcManyProducer(backend.target, name="node", options={"delay_ms": "1"})
        async with many_env(tmp_path, producer) as env:
            ids = [
                (await env.client.start(
                    f"chat-{n}", [user(f"hi {n}")], producer="backend",
                    options={"chunks": str(5 + n)},
                )).stream_id
                for n in range(5)
            ]  # fmt: skip
            for n, stream_id in enumerate(ids):
                chunks, end = await env.answer(stream_id)
                parsed = [json.loads(c) for c in chunks]
                assert end.state is StreamState.COMPLETED, end.error_message
                assert parsed[0] == {"type": "start", "messageId": f"msg_{stream_id}"}
                text = "".join(c["delta"] for c in parsed if c["type"] == "text-delta")
                words = f"Node producer says: hi {n}".split()
                assert text == " ".join(words[i % len(words)] for i in range(5 + n))
                assert [c["type"] for c in parsed[-3:]] == ["text-end", "finish-step", "finish"]

            refused = await env.start("chat-x", options={"delay_ms": "soon"})
            _, end = await env.answer(refused)
            assert end.state is StreamState.FAILED
            assert "INVALID_ARGUMENT: delay_ms must be a number" in end.error_message

            stopped = await env.start("chat-s", options={"chunks": "1000000"})
            await read_chunks(env.client.attach(stream_id=stopped), 6)
            result = await env.client.stop("chat-s")
            assert result.outcome is StopOutcome.STOPPED
            assert await backend.line_matching(rf"^cancelled {stopped}$")

            fast = await env.start("chat-f", options={"chunks": "2000", "delay_ms": "0"})
            chunks, end = await env.answer(fast)
            assert end.state is StreamState.COMPLETED and len(chunks) == 2006
            done = await backend.line_matching(rf"^done {fast}: ")
            assert done.endswith(": 2006 chunks in 5 responses"), done


# -- from the review: one answer cannot take the call down; a call ended while opening ---------


async def test_a_start_over_the_message_limit_fails_its_answer_alone() -> None:
    """A chat's history over the call's message limit would end the shared call (and every
    answer on it, of every chat): refused before it is sent, only its own answer fails."""
    scripted = ScriptedManyBackend()
    async with backend_server(scripted) as target:
        producer = GrpcManyProducer(target, name="backend", message_max_bytes=1 << 20)
        try:
            a, b = "a" * 32, "b" * 32
            answer_a = producer.generate(ProduceRequest("chat-a", a, [user("hi")]))
            first_a = asyncio.ensure_future(anext(answer_a))
            call = await scripted.call()
            await call.started(a)
            answer_b = producer.generate(ProduceRequest("chat-b", b, [user("x" * (2 << 20))]))
            error = await anext(answer_b)
            assert isinstance(error, dict) and error["type"] == "error"
            assert "over the 1048576-byte message limit" in str(error["errorText"])
            with pytest.raises(ProducerFailed):
                await anext(answer_b)
            call.send(part(a, [delta("still here")]))  # the call, and answer a, go on
            assert await asyncio.wait_for(first_a, 5) == [json.loads(delta("still here"))]
            await answer_a.aclose()
        finally:
            await producer.close()


class _UnavailableCall:
    """A GenerateMany call that fails at its first read (a backend refusing it at once)."""

    def __init__(self) -> None:
        self.cancelled = False

    async def read(self) -> Any:
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "backend down"
        )

    async def write(self, message: Any) -> None:
        pass

    def cancel(self) -> bool:
        self.cancelled = True
        return True


async def test_an_answer_started_on_a_call_that_ended_as_it_opened_fails_with_its_status() -> None:
    """The Start that opened the call resumes after the call has already ended (the dispatcher
    ran first): its answer fails at once with the call's status, not after the idle timeout."""
    producer = GrpcManyProducer("127.0.0.1:1", idle_timeout_s=3600)
    calls: list[_UnavailableCall] = []

    class Channel:
        def stream_stream(self, *args: Any, **kwargs: Any) -> Any:
            def make(**_: Any) -> _UnavailableCall:
                calls.append(_UnavailableCall())
                return calls[-1]

            return make

    async def connected(_: Any) -> str:
        return ""

    producer._channel_in_this_loop = Channel  # type: ignore[assignment,method-assign]
    producer._connect = connected  # type: ignore[assignment,method-assign]
    answer = producer.generate(ProduceRequest("chat", "c" * 32, []))
    try:
        error = await asyncio.wait_for(anext(answer), 5)
        assert calls and calls[0].cancelled
        assert isinstance(error, dict) and "UNAVAILABLE" in str(error["errorText"])
    finally:
        await answer.aclose()
        await producer.close()
