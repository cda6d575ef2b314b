"""Faults lose nothing: store failures, cancelled calls, crashes (issue 9, defects 1-5 and 8).

Faults are injected through the store seam (`tests.faults.FaultyStore`) and, where it is cheap,
by real means: a corrupt file, a tiny tmpfs that fills up, a read-only mount, SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from gateway.app import GatewaySettings, create_app
from relay.client import RelayClient
from relay.client.errors import DeadlineExceeded, OutOfRange, Unavailable
from relay.domain.core import Relay
from relay.domain.model import StartRequest, StopOutcome, StreamState, UIMessage
from relay.domain.ports import ChunkRun, StreamRecord
from relay.domain.stream import Phase
from relay.producers import EchoProducer, Producer, ProducerRegistry
from relay.stores.sqlite import SqliteStore
from tests.conftest import (
    ROOT,
    RunningRelay,
    Script,
    ScriptedProducer,
    collect,
    ended_as,
    eventually,
    read_chunks,
    running_relay,
    text_chunks,
    user,
)
from tests.faults import DISK_FULL, FaultyStore
from tests.test_gateway import serve
from tests.test_retention_and_restart import relay_process

PARTIAL = UIMessage("msg-1", "assistant", [{"type": "text", "text": "what the user saw"}])


@contextlib.asynccontextmanager
async def faulty_relay(
    tmp_path: Path, store: SqliteStore | None = None
) -> AsyncIterator[tuple[RunningRelay, ScriptedProducer, SqliteStore]]:
    scripted = ScriptedProducer()
    store = store or FaultyStore(tmp_path / "relay.sqlite3")
    producers: dict[str, Producer] = {"echo": EchoProducer(delay_ms=0), "scripted": scripted}
    async with running_relay(
        tmp_path / "relay.sqlite3", producers, store=store, health_interval=0.01
    ) as running:
        yield running, scripted, store


async def a_live_answer(client: RelayClient, scripted: ScriptedProducer) -> tuple[str, Script]:
    """A scripted answer on chat-1 whose first 5 chunks a reader has received."""
    started = await client.start("chat-1", [user("hi")], producer="scripted")
    script = scripted.script(started.stream_id)
    script.put(*text_chunks(2))
    await read_chunks(client.attach(stream_id=started.stream_id), 5)
    return started.stream_id, script


async def health_status(client: RelayClient) -> str:
    return await client.health("relay.v1.RelayService")


SERVING = "serving"
NOT_SERVING = "not_serving"


# -- 1. a cancelled call never wedges the store ----------------------------------------------


async def test_a_store_call_cancelled_at_any_point_leaves_the_store_usable(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db")
    await store.open()
    try:
        # Cancel a call after 0, 1, 2, ... turns of the loop: one of them lands on each await
        # of the transaction (BEGIN, the statement, COMMIT), the rest before or after it.
        for turns in range(60):
            call = asyncio.create_task(store.get_active("chat-1"))
            for _ in range(turns):
                await asyncio.sleep(0)
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await call
            async with asyncio.timeout(5):
                assert await store.get_active("chat-1") is None
            await store.save_messages("chat-1", [user(f"m{turns}", f"u{turns}")])
        assert len(await store.list_messages("chat-1")) == 60
    finally:
        await store.close()


async def test_rpcs_cut_by_short_deadlines_leave_the_relay_working(tmp_path: Path) -> None:
    async with faulty_relay(tmp_path) as (running, _, _):
        client = running.client
        stub_calls = 0
        for _ in range(20):  # the repro: rounds of 20 GetActive with a 2 ms deadline
            calls = [client.get_active("chat-1", timeout=0.002) for _ in range(20)]
            await asyncio.gather(*calls, return_exceptions=True)
            stub_calls += len(calls)
        assert stub_calls == 400
        assert await client.get_active("chat-1") is None
        started = await client.start("chat-1", [user("still works")], options={"delay_ms": "0"})
        _, end = await collect(client.attach(stream_id=started.stream_id))
        assert end.state is StreamState.COMPLETED


# -- 2. an end is acknowledged only once it is persisted ---------------------------------------


async def test_a_failed_end_write_is_retried_and_readers_wait_for_it(tmp_path: Path) -> None:
    async with faulty_relay(tmp_path) as (running, scripted, store):
        assert isinstance(store, FaultyStore)
        client = running.client
        started = await client.start("chat-1", [user("hi")], producer="scripted")
        reader = client.attach(stream_id=started.stream_id)
        script = scripted.script(started.stream_id)
        store.fail("end_stream")
        store.fail("probe")
        script.put(*text_chunks(3), None)
        assert len(await read_chunks(reader, 6)) == 6
        end_read = asyncio.ensure_future(anext(reader))
        await eventually(lambda: store.calls.get("end_stream", 0) >= 3)  # retried, still failing
        assert not end_read.done()  # nobody hears of an end the store does not hold
        await eventually(lambda: not running.relay.healthy)
        assert await health_status(client) == NOT_SERVING
        # Reads the store can still serve go on; the stream is still the chat's active one.
        active = await client.get_active("chat-1")
        assert active is not None and active.stream_id == started.stream_id

        store.heal("end_stream")
        store.heal("probe")
        end = await end_read
        assert getattr(end, "state", None) is StreamState.COMPLETED
        assert await client.get_active("chat-1") is None
        messages = await client.list_messages("chat-1")
        assert [m.role for m in messages] == ["user", "assistant"]
        assert messages[-1].parts[-1]["text"] == "w0 w1 w2 "
        await eventually(lambda: running.relay.healthy)
        assert await health_status(client) == SERVING
        await reader.aclose()


async def test_a_stop_whose_end_cannot_be_written_yet_still_stops_and_keeps_the_partial(
    tmp_path: Path,
) -> None:
    async with faulty_relay(tmp_path) as (running, scripted, store):
        assert isinstance(store, FaultyStore)
        client = running.client
        _, script = await a_live_answer(client, scripted)
        blocked = store.block("end_stream")
        stopping = asyncio.ensure_future(client.stop("chat-1", partial_message=PARTIAL))
        await script.cancelled.wait()  # the producer is cancelled before the end is written
        await blocked.entered.wait()
        assert not stopping.done()
        store.heal("end_stream")
        stopped = await stopping
        assert stopped.outcome is StopOutcome.STOPPED and stopped.end is not None
        assert stopped.end.state is StreamState.STOPPED and stopped.end.message == ended_as(PARTIAL)
        assert (await client.list_messages("chat-1"))[-1] == ended_as(PARTIAL)


async def test_at_shutdown_an_end_the_store_refuses_becomes_interrupted_after_a_restart(
    tmp_path: Path,
) -> None:
    db = tmp_path / "relay.sqlite3"
    store = FaultyStore(db)
    async with faulty_relay(tmp_path, store) as (running, scripted, _):
        stream_id, _ = await a_live_answer(running.client, scripted)
        store.fail("end_stream")
        store.fail("journal")
        with pytest.raises(Exception, match=r"refused the end of 1 stream"):
            await running.relay.close(grace=0)

    async with faulty_relay(tmp_path, SqliteStore(db)) as (running, _, _):
        chunks, end = await collect(running.client.attach(stream_id=stream_id))
        assert end.state is StreamState.INTERRUPTED and end.final_offset == len(chunks)
        assert await running.client.get_active("chat-1") is None


async def test_a_stream_that_ends_while_its_chunks_are_being_journaled_keeps_them_all(
    tmp_path: Path,
) -> None:
    """The end's tail starts at the last chunk the store acknowledged, so it overlaps a journal
    write still in flight; both runs start at the same offset and the longer one must stay (the
    soak found an end at 138 over a journal of 137 when the store kept the first)."""
    db = tmp_path / "relay.sqlite3"
    store = FaultyStore(db)
    async with faulty_relay(tmp_path, store) as (running, scripted, _):
        started = await running.client.start("chat-1", [user("hi")], producer="scripted")
        script = scripted.script(started.stream_id)
        in_flight = store.block("journal")
        script.put(*text_chunks(2))  # 5 chunks, in the journal's write
        await in_flight.entered.wait()
        script.put({"type": "text-delta", "id": "t", "delta": "late"}, None)
        stream = running.relay.streams[started.stream_id]
        await eventually(lambda: stream.phase is not Phase.LIVE)
        store.heal("journal")
        end = await stream.wait_ended()
        assert end.state is StreamState.COMPLETED and end.final_offset == 6
    async with faulty_relay(tmp_path, SqliteStore(db)) as (running, _, _):
        chunks, replayed = await collect(running.client.attach(stream_id=started.stream_id))
        assert len(chunks) == 6 and replayed.final_offset == 6


# -- 3. a Stop that fails half-way never leaves a running producer ------------------------------


async def test_a_stop_survives_a_failing_message_save(tmp_path: Path) -> None:
    async with faulty_relay(tmp_path) as (running, scripted, store):
        assert isinstance(store, FaultyStore)
        client = running.client
        _, script = await a_live_answer(client, scripted)
        store.fail("save_messages")
        stopped = await client.stop("chat-1", partial_message=PARTIAL)
        assert stopped.outcome is StopOutcome.STOPPED
        assert script.cancelled.is_set()
        assert (await client.list_messages("chat-1"))[-1] == ended_as(PARTIAL)


async def test_a_stop_cut_by_its_deadline_still_stops_the_producer(tmp_path: Path) -> None:
    async with faulty_relay(tmp_path) as (running, scripted, store):
        assert isinstance(store, FaultyStore)
        client = running.client
        stream_id, script = await a_live_answer(client, scripted)
        store.block("end_stream")
        with pytest.raises(DeadlineExceeded):
            await client.stop("chat-1", partial_message=PARTIAL, timeout=0.05)
        await script.cancelled.wait()
        store.heal("end_stream")
        stream = running.relay.streams[stream_id]
        end = await stream.wait_ended()
        assert end.state is StreamState.STOPPED and end.message == ended_as(PARTIAL)
        assert (await client.list_messages("chat-1"))[-1] == ended_as(PARTIAL)
        again = await client.stop("chat-1", stream_id=stream_id)
        assert again.outcome is StopOutcome.ALREADY_ENDED


async def test_a_start_cut_by_its_deadline_starts_whole_or_not_at_all(tmp_path: Path) -> None:
    async with faulty_relay(tmp_path) as (running, _, store):
        assert isinstance(store, FaultyStore)
        client = running.client
        blocked = store.block("begin_stream")
        with pytest.raises(DeadlineExceeded):
            await client.start("chat-1", [user("hi")], producer="scripted", timeout=0.05)
        await blocked.entered.wait()
        store.heal("begin_stream")
        # The Start went on without its caller: the stream is recorded, active and has a producer.
        await eventually(lambda: running.relay.live == 1)
        active = await client.get_active("chat-1")
        assert active is not None and active.state is StreamState.LIVE
        stream = running.relay.streams[active.stream_id]
        assert stream.phase is Phase.LIVE and stream.task is not None
        assert (await client.stop("chat-1")).outcome is StopOutcome.STOPPED


# -- 4. a relay that cannot open its store exits at once, with the reason -----------------------


def run_relay(db: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay.server", "--address", "127.0.0.1:0", "--db", str(db)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_a_corrupt_database_stops_the_relay_with_the_reason(tmp_path: Path) -> None:
    db = tmp_path / "corrupt.sqlite3"
    db.write_bytes(os.urandom(8192))
    result = run_relay(db)
    assert result.returncode == 1
    assert "cannot open the store" in result.stderr and "not a database" in result.stderr
    assert "Traceback" not in result.stderr


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *options: str) -> Iterator[Path]:
    """A real small file system: only where this process may mount one (root)."""
    path.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_read_only_store_stops_the_relay_with_the_reason(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "1m", "ro") as mounted:
        result = run_relay(mounted / "relay.sqlite3")
    assert result.returncode == 1
    assert "cannot open the store" in result.stderr
    assert "Traceback" not in result.stderr


def fill(directory: Path, leave: int) -> None:
    """Fills the file system of `directory` until about `leave` bytes are free."""
    stats = os.statvfs(directory)
    free = stats.f_bavail * stats.f_frsize
    with (directory / "filler").open("wb") as filler, contextlib.suppress(OSError):
        filler.write(b"\0" * max(free - leave, 0))


async def test_a_full_disk_during_recovery_stops_the_relay_with_the_reason(
    tmp_path: Path,
) -> None:
    with tmpfs(tmp_path / "small", "2m") as mounted:
        db = mounted / "relay.sqlite3"
        store = SqliteStore(db)
        await store.open()
        stream_id = "a" * 32
        await store.begin_stream(StreamRecord(stream_id, "chat-1", "gone", "echo", 1.0), "", None)
        big = '{"type":"text-delta","id":"t","delta":"' + "x" * 1000 + '"}'
        starts = ['{"type":"start","messageId":"m"}', '{"type":"text-start","id":"t"}']
        await store.append([ChunkRun(stream_id, 0, [*starts, *[big] * 300])])
        await store.close()
        fill(mounted, 64 * 1024)  # room to open the file, none for the recovered message
        result = run_relay(db)
    assert result.returncode == 1, result.stderr
    assert "cannot open the store" in result.stderr and "full" in result.stderr
    assert "Traceback" not in result.stderr


# -- 5. after a crash, a reader resuming from what it saw gets the interrupted end --------------


async def test_resuming_past_the_journal_after_a_crash_gets_the_interrupted_end(
    tmp_path: Path,
) -> None:
    db = tmp_path / "relay.sqlite3"
    # A journal window longer than the test: the crash loses every delivered chunk.
    async with (
        relay_process(db, "--echo-delay-ms", "1", "--journal-interval-ms", "600000") as (
            process,
            address,
        ),
        RelayClient(address) as client,
    ):
        started = await client.start("chat-1", [user("keep going")], options={"chunks": "100000"})
        seen = len(await read_chunks(client.attach(stream_id=started.stream_id), 20))
        process.send_signal(signal.SIGKILL)
        assert await process.wait() == -signal.SIGKILL

    async with relay_process(db) as (_, address), RelayClient(address) as client:
        chunks, end = await collect(client.attach(stream_id=started.stream_id, from_offset=seen))
        assert chunks == []
        assert end.state is StreamState.INTERRUPTED and end.final_offset < seen
        # A finished stream that was not interrupted keeps OUT_OF_RANGE for offsets past its end.
        done = await client.start("chat-2", [user("short")], options={"delay_ms": "0"})
        everything, _ = await collect(client.attach(stream_id=done.stream_id))
        with pytest.raises(OutOfRange):
            await collect(client.attach(stream_id=done.stream_id, from_offset=len(everything) + 1))


# -- 8. store faults show in health and as UNAVAILABLE, never as raw SQLite text ----------------


async def test_a_full_disk_shows_in_health_and_the_stream_completes_once_there_is_room(
    tmp_path: Path,
) -> None:
    with tmpfs(tmp_path / "small", "4m") as mounted:
        store = SqliteStore(mounted / "relay.sqlite3")
        async with faulty_relay(mounted, store) as (running, scripted, _):
            client = running.client
            started = await client.start("chat-1", [user("hi")], producer="scripted")
            script = scripted.script(started.stream_id)
            fill(mounted, 0)
            delta = "y" * 50_000
            script.put(
                *text_chunks(0),
                *[{"type": "text-delta", "id": "t", "delta": delta} for _ in range(20)],
                None,
            )
            await eventually(lambda: not running.relay.healthy)
            await eventually(lambda: store.error is not None and "full" in store.error)
            assert await health_status(client) == NOT_SERVING
            with pytest.raises(Unavailable) as caught:
                await client.start("chat-2", [user("x" * 200_000)])
            details = caught.value.message
            assert "disk" not in details and "sqlite" not in details.lower()

            (mounted / "filler").unlink()
            chunks, end = await collect(client.attach(stream_id=started.stream_id))
            assert end.state is StreamState.COMPLETED and len(chunks) == 23
            messages = await client.list_messages("chat-1")
            assert messages[-1].parts[-1]["text"] == delta * 20
            await eventually(lambda: running.relay.healthy)
            assert await health_status(client) == SERVING


async def test_a_store_failure_reaches_clients_as_unavailable_with_a_plain_message(
    tmp_path: Path,
) -> None:
    async with faulty_relay(tmp_path) as (running, _, store):
        assert isinstance(store, FaultyStore)
        store.fail("list_messages")
        with pytest.raises(Unavailable) as caught:
            await running.client.list_messages("chat-1")
        assert caught.value.message == "the relay's store failed; retry later"
        assert DISK_FULL in (store.error or "")
        store.heal("list_messages")
        assert await running.client.list_messages("chat-1") == []


async def test_store_trouble_shows_in_the_gateways_healthz(tmp_path: Path) -> None:
    async with faulty_relay(tmp_path) as (running, _, store):
        assert isinstance(store, FaultyStore)
        settings = GatewaySettings(relay_target=f"127.0.0.1:{running.server.port}")
        server, task, url = await serve(create_app(settings))
        try:
            async with httpx.AsyncClient(timeout=10) as http:
                assert (await http.get(url + "/healthz")).status_code == 200
                store.fail("probe")
                await eventually(lambda: not running.relay.healthy)
                await eventually(lambda: store.calls.get("probe", 0) > 0)
                reply = await http.get(url + "/healthz")
                assert reply.status_code == 503 and reply.json()["relay"] == "not_serving"
                store.heal("probe")
                await eventually(lambda: running.relay.healthy)
                assert (await http.get(url + "/healthz")).status_code == 200
        finally:
            server.should_exit = True
            await task


async def test_a_hung_relay_fails_an_idle_reader_instead_of_holding_it_forever(
    tmp_path: Path,
) -> None:
    async with (
        relay_process(tmp_path / "relay.sqlite3", "--shutdown-grace-s", "0") as (process, address),
        RelayClient(address, keepalive_s=1) as client,
    ):
        started = await client.start("chat-1", [user("hi")], options={"delay_ms": "60000"})
        reader = client.attach(stream_id=started.stream_id)
        first = asyncio.ensure_future(anext(reader))  # the answer is idle: no data flows
        await asyncio.sleep(3.5)  # three pings go back and forth: the relay tolerates them
        assert not first.done()
        process.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(Unavailable):
                async with asyncio.timeout(15):
                    await first
        finally:
            process.send_signal(signal.SIGCONT)


async def test_a_start_in_flight_when_shutdown_begins_is_interrupted_by_it(tmp_path: Path) -> None:
    """close() waits for Starts past their check, so their streams are interrupted with the
    rest instead of producing on after the store is closed (found by review: a Start blocked
    in its store write escaped close's list of running streams)."""
    db = tmp_path / "relay.sqlite3"
    store = FaultyStore(db)
    relay = Relay(store, ProducerRegistry({"echo": EchoProducer(delay_ms=5)}, "echo"))
    await relay.open()
    blocked = store.block("begin_stream")
    starting = asyncio.create_task(relay.start(StartRequest("chat-1", [user("hi")])))
    await blocked.entered.wait()
    closing = asyncio.create_task(relay.close(grace=5))
    await eventually(lambda: relay._closing)
    store.heal("begin_stream")
    started = await starting
    await closing  # no UnsavedEnds: the stream's end is saved
    stream = relay.streams[started.stream_id]
    assert stream.end is not None and stream.end.state in (
        StreamState.INTERRUPTED,
        StreamState.COMPLETED,
    )
    with sqlite3.connect(db) as connection:
        (state,) = connection.execute(
            "SELECT state FROM streams WHERE id = ?", (started.stream_id,)
        ).fetchone()
    connection.close()
    assert state == stream.end.state.value


async def test_health_comes_back_when_the_streams_a_failed_journal_held_have_ended(
    tmp_path: Path,
) -> None:
    """A refused journal write makes the relay unhealthy; once its streams ended (their tails
    saved with the ends), nothing waits for the journal, and health must not stay stuck."""
    async with faulty_relay(tmp_path) as (running, scripted, store):
        assert isinstance(store, FaultyStore)
        store.fail("journal")
        started = await running.client.start("chat-1", [user("hi")], producer="scripted")
        script = scripted.script(started.stream_id)
        script.put(*text_chunks(2))
        await eventually(lambda: not running.relay.healthy)
        script.put(None)  # the end's tail is refused too (the same disk): retried
        await eventually(lambda: store.calls.get("journal", 0) >= 3)
        store.heal("journal")  # the end saves the chunks the journal refused, with its tail
        chunks, end = await collect(running.client.attach(stream_id=started.stream_id))
        assert end.state is StreamState.COMPLETED and len(chunks) == 5
        await eventually(lambda: running.relay.healthy)
