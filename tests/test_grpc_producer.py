"""The `grpc` producer: the relay dials a ProducerService, owns the call, and cancels it on Stop.

Backends run in-process on grpc.aio (the Python example, or a servicer the test drives response by
response) and as a subprocess (the Node example). Everything is awaited on events; the only waits
on time are the idle and connect timeouts, which are the features under test.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from relay.client import RelayClient
from relay.domain.core import Relay
from relay.domain.model import StopOutcome, StreamState
from relay.producers import EchoProducer, Producer
from relay.producers.grpc_producer import GrpcProducer
from relay.producers.profiles import Profile, ProfileError, build_producer
from relay.v1 import producer_pb2, relay_pb2
from tests.conftest import (
    ROOT,
    collect,
    eventually,
    node_with_packages,
    read_chunks,
    running_relay,
    user,
)
from tests.tls import Certificates, make_certificates

NODE_DIR = ROOT / "examples" / "producer-node"
NODE_MIN_MAJOR = 18


def _load_example() -> Any:
    spec = importlib.util.spec_from_file_location(
        "producer_python", ROOT / "examples" / "producer_python.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


example = _load_example()


def chunk(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"))


HEAD = [
    chunk({"type": "start", "messageId": "msg-b"}),
    chunk({"type": "start-step"}),
    chunk({"type": "text-start", "id": "t"}),
]


def delta(text: str) -> str:
    return chunk({"type": "text-delta", "id": "t", "delta": text})


# -- a backend the test drives ---------------------------------------------------------------------


@dataclass
class Abort:
    code: grpc.StatusCode
    details: str


@dataclass
class BackendCall:
    """One Generate call: the test feeds responses (a list of chunk strings), an Abort, or None
    to end the call OK; the servicer records how the call went."""

    feed: asyncio.Queue[list[str] | Abort | None] = field(default_factory=asyncio.Queue)
    request: producer_pb2.GenerateRequest | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    def put(self, *items: list[str] | Abort | None) -> None:
        for item in items:
            self.feed.put_nowait(item)


class ScriptedBackend:
    """Generate only: GenerateMany answers UNIMPLEMENTED, as gRPC does for a producer built
    before it existed."""

    def __init__(self) -> None:
        self.calls: dict[str, BackendCall] = {}

    def call(self, stream_id: str) -> BackendCall:
        return self.calls.setdefault(stream_id, BackendCall())

    async def Generate(self, request: producer_pb2.GenerateRequest, context: Any) -> None:
        call = self.call(request.stream_id)
        call.request = request
        call.started.set()
        try:
            while (item := await call.feed.get()) is not None:
                if isinstance(item, Abort):
                    await context.abort(item.code, item.details)  # raises
                    return
                await context.write(producer_pb2.GenerateResponse(chunks=item))
        except asyncio.CancelledError:
            call.cancelled.set()
            raise
        finally:
            call.finished.set()

    async def GenerateMany(self, request_iterator: Any, context: Any) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")


# -- a relay with the grpc producer ----------------------------------------------------------------


@dataclass
class GrpcEnv:
    relay: Relay
    client: RelayClient
    producer: GrpcProducer


@asynccontextmanager
async def relay_env(tmp_path: Path, producer: GrpcProducer) -> AsyncIterator[GrpcEnv]:
    """A relay (echo by default, the grpc producer as `backend`) behind a real grpc.aio server."""
    producers: dict[str, Producer] = {"echo": EchoProducer(delay_ms=0), "backend": producer}
    try:
        async with running_relay(tmp_path / "relay.sqlite3", producers) as running:
            yield GrpcEnv(running.relay, running.client, producer)
    finally:
        await producer.close()


@asynccontextmanager
async def backend_server(servicer: Any) -> AsyncIterator[str]:
    server, port = await example.start_server(servicer, "127.0.0.1:0")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=0)


@pytest.fixture
def scripted() -> ScriptedBackend:
    return ScriptedBackend()


@pytest.fixture
async def env(tmp_path: Path, scripted: ScriptedBackend) -> AsyncIterator[GrpcEnv]:
    """The relay with its `backend` producer pointed at a ScriptedBackend."""
    async with (
        backend_server(scripted) as target,
        relay_env(tmp_path, GrpcProducer(target, name="backend")) as running,
    ):
        yield running


def closed_port() -> int:
    """A port nothing listens on: connecting to it is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- the Python example ----------------------------------------------------------------------------


async def test_python_example_streams_a_full_answer_that_is_persisted(tmp_path: Path) -> None:
    servicer = example.PythonProducer(default_delay_ms=0)
    async with backend_server(servicer) as target:
        # The profile's options are defaults under Start's: delay_ms from the profile, chunks
        # from Start.
        profile = Profile(
            "backend", "grpc", target=target, options={"delay_ms": "0", "chunks": "2"}
        )
        producer = build_producer(profile)
        assert isinstance(producer, GrpcProducer)
        async with relay_env(tmp_path, producer) as env:
            started = await env.client.start(
                "chat-1", [user("hello there")], producer="backend", options={"chunks": "5"}
            )
            chunks, end = await collect(env.client.attach(stream_id=started.stream_id))

            parsed = [json.loads(c) for c in chunks]
            assert [c["type"] for c in parsed] == [
                "start",
                "start-step",
                "text-start",
                *["text-delta"] * 5,
                "text-end",
                "finish-step",
                "finish",
            ]
            answer = "Python producer says: hello there"
            assert "".join(c["delta"] for c in parsed if c["type"] == "text-delta") == answer
            assert end.state is StreamState.COMPLETED and end.final_offset == 11
            messages = await env.client.list_messages("chat-1")
            assert [m.role for m in messages] == ["user", "assistant"]
            assert messages[1].id == f"msg_{started.stream_id}"
            assert messages[1].parts[-1] == {"type": "text", "text": answer, "state": "done"}
            assert await env.client.get_active("chat-1") is None

            record = servicer.calls[started.stream_id]
            request = record.request
            assert request.chat_id == "chat-1" and request.stream_id == started.stream_id
            assert dict(request.options) == {"delay_ms": "0", "chunks": "5"}
            assert [(m.id, m.role) for m in request.messages] == [("u1", relay_pb2.ROLE_USER)]
            assert json.loads(request.messages[0].parts_json) == [
                {"type": "text", "text": "hello there"}
            ]
            assert record.finished.is_set() and not record.cancelled.is_set()


async def test_stop_mid_stream_cancels_the_python_backend_call(tmp_path: Path) -> None:
    servicer = example.PythonProducer(default_delay_ms=0)
    async with (
        backend_server(servicer) as target,
        relay_env(tmp_path, GrpcProducer(target, name="backend")) as env,
    ):
        started = await env.client.start(
            "chat-1", [user("stop me")], producer="backend", options={"chunks": "1000000"}
        )
        await read_chunks(env.client.attach(stream_id=started.stream_id), 6)

        result = await env.client.stop("chat-1", started.stream_id)

        assert result.outcome is StopOutcome.STOPPED
        assert result.end is not None and result.end.state is StreamState.STOPPED
        record = servicer.calls[started.stream_id]
        async with asyncio.timeout(5):
            await record.cancelled.wait()  # the backend's handler saw the cancellation
        assert record.responses_sent < 1_000_000
        saved = (await env.client.list_messages("chat-1"))[-1]
        assert saved.role == "assistant" and saved.id == f"msg_{started.stream_id}"
        assert saved.parts[-1]["text"].startswith("Python producer says:")


async def test_a_fast_python_example_batches_and_a_paced_one_sends_each_pause(
    tmp_path: Path,
) -> None:
    servicer = example.PythonProducer(default_delay_ms=0)
    async with (
        backend_server(servicer) as target,
        relay_env(tmp_path, GrpcProducer(target, name="backend")) as env,
    ):
        fast = await env.client.start(
            "chat-1", [user("quick")], producer="backend", options={"chunks": "2000"}
        )
        chunks, end = await collect(env.client.attach(stream_id=fast.stream_id))
        assert end.state is StreamState.COMPLETED and len(chunks) == 2006
        deltas = [c["delta"] for c in map(json.loads, chunks) if c["type"] == "text-delta"]
        assert deltas[:3] == ["Python ", "producer ", "says: "] and len(deltas) == 2000
        record = servicer.calls[fast.stream_id]
        assert record.chunks_sent == 2006
        assert record.responses_sent <= 2006 // example.BATCH_MAX_CHUNKS + 1  # 5, not 2006

        paced = await env.client.start(
            "chat-2", [user("slow")], producer="backend", options={"chunks": "3", "delay_ms": "1"}
        )
        chunks, end = await collect(env.client.attach(stream_id=paced.stream_id))
        assert end.state is StreamState.COMPLETED and len(chunks) == 9
        record = servicer.calls[paced.stream_id]
        assert record.responses_sent == 5  # the framing, each delta, the closing chunks


# -- cancellation is the relay's: Stop, supersede, shutdown; never a reader ------------------------


async def test_a_reader_disconnect_does_not_cancel_the_backend(
    env: GrpcEnv, scripted: ScriptedBackend
) -> None:
    started = await env.client.start("chat-1", [user("hi")], producer="backend")
    backend = scripted.call(started.stream_id)
    backend.put(HEAD, [delta("one ")])
    reader = env.client.attach(stream_id=started.stream_id)
    assert len(await read_chunks(reader, 4)) == 4
    await reader.aclose()  # the tab closes: its Attach is cancelled
    stream = env.relay.streams[started.stream_id]
    await eventually(lambda: stream.readers == 0)

    backend.put([delta("two"), chunk({"type": "text-end", "id": "t"})], None)
    chunks, end = await collect(env.client.attach(stream_id=started.stream_id))

    assert end.state is StreamState.COMPLETED and len(chunks) == 6
    assert backend.finished.is_set() and not backend.cancelled.is_set()
    saved = (await env.client.list_messages("chat-1"))[-1]
    assert saved.id == "msg-b" and saved.parts[-1]["text"] == "one two"


async def test_stop_cancels_the_backend_call_and_persists_the_partial(
    env: GrpcEnv, scripted: ScriptedBackend
) -> None:
    started = await env.client.start("chat-1", [user("hi")], producer="backend")
    backend = scripted.call(started.stream_id)
    backend.put(HEAD, [delta("partial ")])
    await read_chunks(env.client.attach(stream_id=started.stream_id), 4)

    result = await env.client.stop("chat-1")

    assert result.outcome is StopOutcome.STOPPED and result.end is not None
    assert result.end.state is StreamState.STOPPED and result.end.final_offset == 4
    async with asyncio.timeout(5):
        await backend.cancelled.wait()
    saved = (await env.client.list_messages("chat-1"))[-1]
    assert saved.id == "msg-b" and saved.parts[-1]["text"] == "partial "


async def test_a_stop_between_two_responses_keeps_the_first_and_never_reads_the_second(
    env: GrpcEnv, scripted: ScriptedBackend
) -> None:
    started = await env.client.start("chat-1", [user("hi")], producer="backend")
    backend = scripted.call(started.stream_id)
    backend.put([*HEAD, delta("one "), delta("two ")])  # one response, one batch
    await read_chunks(env.client.attach(stream_id=started.stream_id), 5)

    result = await env.client.stop("chat-1")
    backend.put([delta("three "), chunk({"type": "text-end", "id": "t"})])

    assert result.end is not None
    assert (result.end.state, result.end.final_offset) == (StreamState.STOPPED, 5)
    async with asyncio.timeout(5):
        await backend.cancelled.wait()
    chunks, _ = await collect(env.client.attach(stream_id=started.stream_id))
    assert chunks == [*HEAD, delta("one "), delta("two ")]
    saved = (await env.client.list_messages("chat-1"))[-1]
    assert saved.parts[-1]["text"] == "one two "


async def test_supersede_and_shutdown_cancel_the_backend_call(
    env: GrpcEnv, scripted: ScriptedBackend
) -> None:
    first = await env.client.start("chat-1", [user("one")], producer="backend")
    first_call = scripted.call(first.stream_id)
    await first_call.started.wait()

    second = await env.client.start(
        "chat-1", [user("two", "u2")], producer="backend", supersede=True
    )
    assert second.superseded_stream_id == first.stream_id
    async with asyncio.timeout(5):
        await first_call.cancelled.wait()
    second_call = scripted.call(second.stream_id)
    await second_call.started.wait()

    await env.relay.close(grace=0)  # shutdown: the live producer is interrupted

    async with asyncio.timeout(5):
        await second_call.cancelled.wait()
    end = env.relay.streams[second.stream_id].end
    assert end is not None and end.state is StreamState.INTERRUPTED
    assert env.producer._channel is None  # the relay closed the producer's channel


# -- failures: an error chunk, a FAILED end with the reason, the partial persisted -----------------


async def test_a_backend_error_status_fails_the_stream_with_its_message(
    env: GrpcEnv, scripted: ScriptedBackend
) -> None:
    started = await env.client.start("chat-1", [user("hi")], producer="backend")
    scripted.call(started.stream_id).put(
        HEAD, [delta("half ")], Abort(grpc.StatusCode.INTERNAL, "the model fell over")
    )

    chunks, end = await collect(env.client.attach(stream_id=started.stream_id))

    assert end.state is StreamState.FAILED
    assert "INTERNAL: the model fell over" in end.error_message
    assert "'backend'" in end.error_message
    assert json.loads(chunks[-1]) == {"type": "error", "errorText": end.error_message}
    saved = (await env.client.list_messages("chat-1"))[-1]
    assert saved.id == "msg-b" and saved.parts[-1]["text"] == "half "
    assert end.message == saved
    assert await env.client.get_active("chat-1") is None


@pytest.mark.parametrize(
    "bad",
    ["not json", "[1, 2]", '{"no": "type"}', '{"type": 7}', "42"],
    ids=["not-json", "array", "no-type", "type-not-string", "number"],
)
async def test_a_malformed_chunk_fails_the_stream_and_cancels_the_call(
    env: GrpcEnv, scripted: ScriptedBackend, bad: str
) -> None:
    started = await env.client.start("chat-1", [user("hi")], producer="backend")
    backend = scripted.call(started.stream_id)
    backend.put(HEAD, [delta("ok "), bad, delta("never seen")])

    chunks, end = await collect(env.client.attach(stream_id=started.stream_id))

    assert end.state is StreamState.FAILED
    assert "not a JSON object with a string 'type'" in end.error_message
    assert repr(bad) in end.error_message
    assert [json.loads(c)["type"] for c in chunks][-2:] == ["text-delta", "error"]
    assert len(chunks) == 5  # the chunk after the bad one in the same response is dropped
    async with asyncio.timeout(5):
        await backend.cancelled.wait()  # the relay hung up on the backend
    saved = (await env.client.list_messages("chat-1"))[-1]
    assert saved.parts[-1]["text"] == "ok "


async def test_a_response_over_the_channels_message_limit_fails_the_stream_clearly(
    tmp_path: Path, scripted: ScriptedBackend
) -> None:
    """gRPC refuses a response past the channel's max receive size (64 MiB; 1,000 bytes here):
    the stream fails saying so, with what came before it."""
    async with (
        backend_server(scripted) as target,
        relay_env(tmp_path, GrpcProducer(target, name="backend", message_max_bytes=1_000)) as env,
    ):
        started = await env.client.start("chat-1", [user("hi")], producer="backend")
        backend = scripted.call(started.stream_id)
        backend.put(HEAD, [delta("x" * 500), delta("y" * 500)], [delta("never seen")])

        chunks, end = await collect(env.client.attach(stream_id=started.stream_id))

        assert end.state is StreamState.FAILED
        assert re.fullmatch(
            r"grpc producer 'backend' \(127\.0\.0\.1:\d+\) sent a response of 1\d{3} bytes, "
            r"over the relay's limit of 1000 bytes per response \(RESOURCE_EXHAUSTED: .*\)",
            end.error_message,
        ), end.error_message
        assert chunks == [*HEAD, chunk({"type": "error", "errorText": end.error_message})]


@pytest.mark.parametrize("before_first", [True, False], ids=["before-first", "mid-stream"])
async def test_a_stalled_backend_fails_after_the_idle_timeout(
    tmp_path: Path, scripted: ScriptedBackend, before_first: bool
) -> None:
    async with (
        backend_server(scripted) as target,
        relay_env(tmp_path, GrpcProducer(target, name="backend", idle_timeout_s=0.3)) as env,
    ):
        started = await env.client.start("chat-1", [user("hi")], producer="backend")
        backend = scripted.call(started.stream_id)
        if not before_first:
            backend.put(HEAD, [delta("so far ")])  # then nothing: the backend hangs

        began = time.monotonic()
        async with asyncio.timeout(10):  # never a hang
            chunks, end = await collect(env.client.attach(stream_id=started.stream_id))

        assert end.state is StreamState.FAILED
        assert "sent nothing for 0.3 s (idle timeout)" in end.error_message
        assert time.monotonic() - began < 5
        assert json.loads(chunks[-1]) == {"type": "error", "errorText": end.error_message}
        assert len(chunks) == (1 if before_first else 5)
        async with asyncio.timeout(5):
            await backend.cancelled.wait()
        if not before_first:
            saved = (await env.client.list_messages("chat-1"))[-1]
            assert saved.id == "msg-b" and saved.parts[-1]["text"] == "so far "


async def test_an_unreachable_backend_fails_at_once_and_the_relay_goes_on(
    tmp_path: Path,
) -> None:
    producer = GrpcProducer(f"127.0.0.1:{closed_port()}", name="backend", connect_timeout_s=30)
    async with relay_env(tmp_path, producer) as env:
        began = time.monotonic()
        for attempt in range(2):  # the second finds the channel in backoff: still fast
            started = await env.client.start(
                "chat-1", [user("hi")], producer="backend", supersede=True
            )
            async with asyncio.timeout(10):  # never a hang
                chunks, end = await collect(env.client.attach(stream_id=started.stream_id))
            assert end.state is StreamState.FAILED, attempt
            assert "UNAVAILABLE" in end.error_message and "'backend'" in end.error_message
            assert [json.loads(c) for c in chunks] == [
                {"type": "error", "errorText": end.error_message}
            ]
        assert time.monotonic() - began < 10  # far from the 30 s connect timeout

        echoed = await env.client.start("chat-1", [user("still there?", "u2")])
        _, end = await collect(env.client.attach(stream_id=echoed.stream_id))
        assert end.state is StreamState.COMPLETED


async def test_a_backend_that_never_answers_the_handshake_fails_after_the_connect_timeout(
    tmp_path: Path,
) -> None:
    with socket.socket() as silent:  # accepts TCP (the kernel does), never speaks HTTP/2
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        producer = GrpcProducer(target, name="backend", connect_timeout_s=0.3)
        async with relay_env(tmp_path, producer) as env:
            started = await env.client.start("chat-1", [user("hi")], producer="backend")
            async with asyncio.timeout(10):  # gRPC's own handshake timeout is 20 s
                chunks, end = await collect(env.client.attach(stream_id=started.stream_id))

            assert end.state is StreamState.FAILED
            assert end.error_message.endswith("no connection within 0.3 s")
            assert len(chunks) == 1


def test_options_are_passed_through_within_bounds() -> None:
    producer = GrpcProducer("127.0.0.1:1", options={"model": "small"})
    producer.check_options({"anything": "goes", "model": "big"})
    with pytest.raises(Exception, match="more than 64 options"):
        producer.check_options({f"k{i}": "v" for i in range(64)})
    with pytest.raises(Exception, match="longer than 4096"):
        producer.check_options({"k": "v" * 4097})
    with pytest.raises(Exception, match="option names"):
        producer.check_options({"": "v"})


# -- the Node example, as a subprocess -------------------------------------------------------------


@pytest.fixture(scope="session")
def node() -> str:
    """Node on PATH, with the example's npm dependencies installed (once, and again when stale)."""
    return node_with_packages(NODE_DIR, "the Node producer example runs on Node.js")


@dataclass
class NodeProducer:
    process: asyncio.subprocess.Process
    target: str

    async def line_matching(self, pattern: str, timeout: float = 10.0) -> str:
        """The next line of the server's output that matches `pattern`."""
        assert self.process.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                line = (await self.process.stdout.readline()).decode()
                assert line, f"the Node producer exited while we waited for {pattern!r}"
                if re.search(pattern, line):
                    return line.strip()


@asynccontextmanager
async def node_producer(node: str) -> AsyncIterator[NodeProducer]:
    process = await asyncio.create_subprocess_exec(
        node,
        "server.mjs",
        "--port",
        "0",
        cwd=NODE_DIR,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        running = NodeProducer(process, "")
        listening = await running.line_matching(r"^listening on ", timeout=30)
        running.target = listening.removeprefix("listening on ")
        yield running
    finally:
        if process.returncode is None:
            process.terminate()
        with _killed_if_stuck(process):
            async with asyncio.timeout(10):
                await process.wait()


@contextmanager
def _killed_if_stuck(process: asyncio.subprocess.Process) -> Iterator[None]:
    try:
        yield
    except TimeoutError:
        process.kill()
        raise


async def test_node_example_streams_a_full_answer_through_the_relay(
    tmp_path: Path, node: str
) -> None:
    async with node_producer(node) as backend:
        producer = GrpcProducer(backend.target, name="node", options={"delay_ms": "0"})
        async with relay_env(tmp_path, producer) as env:
            started = await env.client.start(
                "chat-1", [user("hello from python")], producer="backend"
            )
            chunks, end = await collect(env.client.attach(stream_id=started.stream_id))

            parsed = [json.loads(c) for c in chunks]
            assert parsed[0] == {"type": "start", "messageId": f"msg_{started.stream_id}"}
            assert [c["type"] for c in parsed[-3:]] == ["text-end", "finish-step", "finish"]
            answer = "Node producer says: hello from python"
            assert "".join(c["delta"] for c in parsed if c["type"] == "text-delta") == answer
            assert end.state is StreamState.COMPLETED
            saved = (await env.client.list_messages("chat-1"))[-1]
            assert saved.id == f"msg_{started.stream_id}"
            assert saved.parts[-1] == {"type": "text", "text": answer, "state": "done"}
            assert await backend.line_matching(rf"^done {started.stream_id}: ")

            # A fast answer goes in a few responses, not one per chunk.
            fast = await env.client.start(
                "chat-2", [user("quick")], producer="backend", options={"chunks": "2000"}
            )
            chunks, end = await collect(env.client.attach(stream_id=fast.stream_id))
            assert end.state is StreamState.COMPLETED and len(chunks) == 2006
            done = await backend.line_matching(rf"^done {fast.stream_id}: ")
            assert done.endswith(": 2006 chunks in 5 responses"), done


async def test_stop_mid_stream_cancels_the_node_backend_call(tmp_path: Path, node: str) -> None:
    async with node_producer(node) as backend:
        producer = GrpcProducer(backend.target, name="node")
        async with relay_env(tmp_path, producer) as env:
            started = await env.client.start(
                "chat-1",
                [user("stop me")],
                producer="backend",
                options={"delay_ms": "1", "chunks": "1000000"},
            )
            await read_chunks(env.client.attach(stream_id=started.stream_id), 6)

            result = await env.client.stop("chat-1", started.stream_id)

            assert result.outcome is StopOutcome.STOPPED
            assert result.end is not None and result.end.state is StreamState.STOPPED
            assert await backend.line_matching(rf"^cancelled {started.stream_id}$")
            saved = (await env.client.list_messages("chat-1"))[-1]
            assert saved.parts[-1]["text"].startswith("Node producer says:")


# -- over TLS with a token -------------------------------------------------------------------------

BACKEND_TOKEN = "backend-token-0123456789"


@asynccontextmanager
async def secured_python_backend(
    servicer: Any, certs: Certificates, *, mutual: bool = True
) -> AsyncIterator[str]:
    """The Python example behind a token and TLS (mutual unless told otherwise)."""
    credentials = example.server_credentials(
        str(certs.server.cert), str(certs.server.key), str(certs.ca.cert) if mutual else None
    )
    server, port = await example.start_server(
        servicer, "127.0.0.1:0", token=BACKEND_TOKEN, credentials=credentials
    )
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=0)


def tls_producer(
    target: str,
    certs: Certificates,
    *,
    token_env: str = "BACKEND_TOKEN",
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> GrpcProducer:
    """The `backend` profile reaching `target` with a token and a client certificate (mTLS)."""
    profile = Profile(
        "backend",
        "grpc",
        target=target,
        options={"delay_ms": "0"},
        token_env=token_env,
        tls_ca=str(certs.ca.cert) if tls_ca is None else tls_ca,
        tls_cert=str(certs.client.cert) if tls_cert is None else tls_cert,
        tls_key=str(certs.client.key) if tls_key is None else tls_key,
    )
    producer = build_producer(profile)
    assert isinstance(producer, GrpcProducer)
    return producer


async def test_the_relay_reaches_a_backend_over_mutual_tls_with_a_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    certs = make_certificates(tmp_path / "certs")
    monkeypatch.setenv("BACKEND_TOKEN", BACKEND_TOKEN)
    servicer = example.PythonProducer(default_delay_ms=0)
    async with (
        secured_python_backend(servicer, certs) as target,
        relay_env(tmp_path, tls_producer(target, certs)) as env,
    ):
        started = await env.client.start(
            "chat-1", [user("over tls")], producer="backend", options={"chunks": "5"}
        )
        chunks, end = await collect(env.client.attach(stream_id=started.stream_id))
        assert end.state is StreamState.COMPLETED
        text = "".join(c["delta"] for c in map(json.loads, chunks) if c["type"] == "text-delta")
        assert text == "Python producer says: over tls"
        assert servicer.calls[started.stream_id].finished.is_set()


async def test_a_backend_refusing_the_relays_token_or_certificate_fails_the_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    certs = make_certificates(tmp_path / "certs")
    servicer = example.PythonProducer(default_delay_ms=0)
    monkeypatch.setenv("BACKEND_TOKEN", "not-the-backend-token")
    monkeypatch.setenv("RIGHT_TOKEN", BACKEND_TOKEN)
    async with secured_python_backend(servicer, certs) as target:
        wrong_token = tls_producer(target, certs)
        no_certificate = tls_producer(
            target, certs, token_env="RIGHT_TOKEN", tls_cert="", tls_key=""
        )
        for number, producer in enumerate((wrong_token, no_certificate)):
            async with relay_env(tmp_path / str(number), producer) as env:
                started = await env.client.start("chat-1", [user("hi")], producer="backend")
                chunks, end = await collect(env.client.attach(stream_id=started.stream_id))
                assert end.state is StreamState.FAILED
                error = json.loads(chunks[-1])
                assert error["type"] == "error"
                expected = "UNAUTHENTICATED" if producer is wrong_token else "UNAVAILABLE"
                assert expected in error["errorText"]
        assert servicer.calls == {}  # neither call reached the backend's handler


def test_a_grpc_profile_with_a_missing_token_or_tls_file_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    certs = make_certificates(tmp_path / "certs")
    monkeypatch.delenv("BACKEND_TOKEN", raising=False)
    with pytest.raises(ProfileError, match="token_env: the variable BACKEND_TOKEN is not set"):
        tls_producer("127.0.0.1:1", certs)
    monkeypatch.setenv("BACKEND_TOKEN", BACKEND_TOKEN)
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(ProfileError, match="cannot read the CA certificates file"):
        tls_producer("127.0.0.1:1", certs, tls_ca=missing)
    with pytest.raises(ProfileError, match="both a certificate and its key"):
        tls_producer("127.0.0.1:1", certs, tls_key="")


@asynccontextmanager
async def secured_node_producer(node: str, certs: Certificates) -> AsyncIterator[NodeProducer]:
    process = await asyncio.create_subprocess_exec(
        node,
        "server.mjs",
        "--port",
        "0",
        "--tls-cert",
        str(certs.server.cert),
        "--tls-key",
        str(certs.server.key),
        "--tls-client-ca",
        str(certs.ca.cert),
        cwd=NODE_DIR,
        env={**os.environ, "PRODUCER_TOKEN": BACKEND_TOKEN},
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        running = NodeProducer(process, "")
        listening = await running.line_matching(r"^listening on ", timeout=30)
        running.target = listening.removeprefix("listening on ")
        yield running
    finally:
        if process.returncode is None:
            process.terminate()
        with _killed_if_stuck(process):
            async with asyncio.timeout(10):
                await process.wait()


async def test_the_relay_reaches_the_node_example_over_mutual_tls_with_a_token(
    tmp_path: Path, node: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    certs = make_certificates(tmp_path / "certs")
    async with secured_node_producer(node, certs) as backend:
        monkeypatch.setenv("BACKEND_TOKEN", BACKEND_TOKEN)
        async with relay_env(tmp_path, tls_producer(backend.target, certs)) as env:
            started = await env.client.start("chat-1", [user("tls")], producer="backend")
            chunks, end = await collect(env.client.attach(stream_id=started.stream_id))
            assert end.state is StreamState.COMPLETED
            assert await backend.line_matching(rf"^done {started.stream_id}: ")
        monkeypatch.setenv("BACKEND_TOKEN", "not-the-backend-token")
        producer = tls_producer(backend.target, certs)
        async with relay_env(tmp_path / "wrong", producer) as env:
            started = await env.client.start("chat-1", [user("tls")], producer="backend")
            chunks, end = await collect(env.client.attach(stream_id=started.stream_id))
            assert end.state is StreamState.FAILED
            assert "UNAUTHENTICATED" in json.loads(chunks[-1])["errorText"]


def test_the_node_example_needs_a_token_beyond_loopback(node: str) -> None:
    result = subprocess.run(
        [node, "server.mjs", "--host", "0.0.0.0", "--port", "0"],
        cwd=NODE_DIR,
        env={**os.environ, "PRODUCER_TOKEN": ""},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "listening beyond loopback needs a token" in result.stderr
