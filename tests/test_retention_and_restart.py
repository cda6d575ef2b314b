"""Retention, in-process restarts and the recovery of a relay process killed with SIGKILL."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from relay.client import RelayClient
from relay.client.errors import NotFound
from relay.domain.core import Relay
from relay.domain.model import StartRequest, StopOutcome, StreamState
from relay.producers import EchoProducer, ProducerRegistry
from relay.stores.sqlite import SqliteStore
from tests.conftest import Env, collect, python_service, read_chunks, user

ROOT = Path(__file__).resolve().parent.parent


async def test_finished_streams_stay_attachable_for_the_retention_period(env: Env) -> None:
    started = await env.client.start("chat-1", [user("hello")])
    everything, end = await collect(env.client.attach(stream_id=started.stream_id))
    live = await env.client.start("chat-2", [user("hello")], producer="scripted")

    env.clock.now += 599
    assert await env.relay.sweep() == []
    assert await collect(env.client.attach(stream_id=started.stream_id)) == (everything, end)

    env.clock.now += 2
    assert await env.relay.sweep() == [started.stream_id]
    with pytest.raises(NotFound):
        await collect(env.client.attach(stream_id=started.stream_id))
    assert started.stream_id not in env.relay.streams
    # A live stream is never freed, however old; the persisted messages stay.
    assert live.stream_id in env.relay.streams
    assert len(await env.client.list_messages("chat-1")) == 2


def echo_relay(db: Path) -> Relay:
    return Relay(
        SqliteStore(db),
        ProducerRegistry({"echo": EchoProducer(delay_ms=0)}, "echo"),
        sweep_interval=None,
    )


async def test_a_finished_stream_replays_from_the_journal_after_a_restart(tmp_path: Path) -> None:
    relay = echo_relay(tmp_path / "db")
    await relay.open()
    result = await relay.start(StartRequest("chat-1", [user("journal me")]))
    before = await collect((await relay.attach(stream_id=result.stream_id)).events)
    await relay.close()

    reopened = echo_relay(tmp_path / "db")
    await reopened.open()
    try:
        after = await collect(
            (await reopened.attach(stream_id=result.stream_id, from_offset=2)).events
        )
    finally:
        await reopened.close()
    assert after == (before[0][2:], before[1])


@asynccontextmanager
async def relay_process(
    db: Path, *flags: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    async with python_service(
        "-m",
        "relay.server",
        "--address",
        "127.0.0.1:0",
        "--db",
        str(db),
        *flags,
        ready=lambda entry: entry["message"] == "relay listening",
    ) as (process, entry):
        yield process, entry["address"]


def journaled(db: Path, stream_id: str) -> int:
    with sqlite3.connect(db) as connection:
        row = connection.execute(
            "SELECT COALESCE(SUM(count), 0) FROM chunk_runs WHERE stream_id = ?", (stream_id,)
        ).fetchone()
    return int(row[0])


async def test_a_killed_relay_marks_live_streams_interrupted_on_restart(tmp_path: Path) -> None:
    db = tmp_path / "relay.sqlite3"
    async with (
        relay_process(db, "--echo-delay-ms", "1", "--journal-interval-ms", "5") as (
            process,
            address,
        ),
        RelayClient(address) as client,
    ):
        started = await client.start("chat-1", [user("keep going")], options={"chunks": "1000000"})
        await read_chunks(client.attach(stream_id=started.stream_id), 50)
        async with asyncio.timeout(20):
            while journaled(db, started.stream_id) < 50:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        assert await process.wait() == -signal.SIGKILL
    kept = journaled(db, started.stream_id)

    async with relay_process(db) as (_, address), RelayClient(address) as client:
        chunks, end = await collect(client.attach(stream_id=started.stream_id))
        assert len(chunks) == kept >= 50
        assert end.state is StreamState.INTERRUPTED and end.final_offset == kept
        assert await client.get_active("chat-1") is None
        messages = await client.list_messages("chat-1")
        assert messages[-1].id == f"msg_{started.stream_id}"
        assert messages[-1].parts[-1]["text"].startswith("You said: keep going")
        assert (await client.stop("chat-1")).outcome is StopOutcome.NO_ACTIVE_STREAM
        # The chat takes a new answer at once.
        again = await client.start("chat-1", [user("again", "u2")], options={"delay_ms": "0"})
        _, again_end = await collect(client.attach(stream_id=again.stream_id))
        assert again_end.state is StreamState.COMPLETED


async def test_sigterm_interrupts_live_streams_after_the_grace_period(tmp_path: Path) -> None:
    db = tmp_path / "relay.sqlite3"
    async with relay_process(db, "--echo-delay-ms", "5", "--shutdown-grace-s", "0") as (
        process,
        address,
    ):
        async with RelayClient(address) as client:
            started = await client.start("chat-1", [user("one")], options={"chunks": "100000"})
            await read_chunks(client.attach(stream_id=started.stream_id), 5)
        process.send_signal(signal.SIGTERM)
        assert await process.wait() == 0

    async with relay_process(db) as (_, address), RelayClient(address) as client:
        chunks, end = await collect(client.attach(stream_id=started.stream_id))
        assert end.state is StreamState.INTERRUPTED and len(chunks) == end.final_offset >= 5
        assert await client.get_active("chat-1") is None


async def test_health_and_reflection_are_served(env: Env) -> None:
    from grpc_reflection.v1alpha import reflection_pb2

    from tests.reflection import reflection_info

    for service in ("", "relay.v1.RelayService"):
        assert await env.client.health(service) == "serving"

    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async for reply in reflection_info(env.client.channel)(iter([request])):
        names = {s.name for s in reply.list_services_response.service}
        assert {"relay.v1.RelayService", "grpc.health.v1.Health"} <= names
        break
