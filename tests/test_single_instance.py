"""One embedded relay per database and per port: a second one refuses to start and leaves the
first untouched (before, it "recovered" the first one's live answer as interrupted, cleared its
active stream and took half of the new connections through SO_REUSEPORT)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from relay.client import RelayClient
from relay.domain.model import StreamState
from tests.conftest import ROOT, collect, free_port, python_service, read_chunks, user


async def run_to_exit(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """`python <args>` to its exit: its exit code and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        _, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stderr.decode()


def relay_args(port: int, db: Path) -> tuple[str, ...]:
    return ("-m", "relay.server", "--address", f"127.0.0.1:{port}", "--db", str(db))


def listening(entry: dict[str, object]) -> bool:
    return entry["message"] == "relay listening"


async def test_a_second_relay_on_the_same_database_exits_and_the_first_keeps_its_answer(
    tmp_path: Path,
) -> None:
    db, port = tmp_path / "relay.sqlite3", free_port()
    async with (
        python_service(*relay_args(port, db), ready=listening) as (first_relay, _),
        RelayClient(f"127.0.0.1:{port}") as client,
    ):
        started = await client.start(
            "chat", [user("hi")], options={"chunks": "60", "delay_ms": "20"}
        )
        reader = client.attach(stream_id=started.stream_id)
        first = await read_chunks(reader, 5)  # the answer is live

        code, stderr = await run_to_exit(*relay_args(free_port(), db), "--log-format", "text")

        assert code == 1
        assert f"another relay (pid {first_relay.pid}) is using it" in stderr
        assert "Traceback" not in stderr
        active = await client.get_active("chat")
        assert active is not None and active.stream_id == started.stream_id
        assert active.state is StreamState.LIVE  # not "recovered" as interrupted
        rest, end = await collect(reader)
        assert end.state is StreamState.COMPLETED
        assert len(first) + len(rest) == end.final_offset >= 60
        replayed, again = await collect(client.attach(stream_id=started.stream_id))
        assert replayed == first + rest and again == end  # still resumable after the attempt


async def test_a_second_relay_on_a_busy_port_exits_and_the_first_serves_on(
    tmp_path: Path,
) -> None:
    port = free_port()
    async with (
        python_service(*relay_args(port, tmp_path / "first.sqlite3"), ready=listening),
        RelayClient(f"127.0.0.1:{port}") as client,
    ):
        code, stderr = await run_to_exit(
            *relay_args(port, tmp_path / "second.sqlite3"), "--log-format", "text"
        )

        assert code == 1
        assert f"cannot listen on 127.0.0.1:{port}" in stderr
        assert "Traceback" not in stderr
        for n in range(20):  # every new connection reaches the first relay, none a dead one
            async with RelayClient(f"127.0.0.1:{port}") as fresh:
                started = await fresh.start(f"chat-{n}", [user("hi")])
                _, end = await collect(fresh.attach(stream_id=started.stream_id))
                assert end.state is StreamState.COMPLETED
        stats = await client.get_stats()
        assert stats.retained_streams == 20


async def test_the_embedded_relay_listens_on_relay_address(tmp_path: Path) -> None:
    """`make run` with RELAY_ADDRESS moves the embedded relay (it was ignored: always 50051)."""
    relay_port, http_port = free_port(), free_port()
    async with python_service(
        "-m",
        "gateway.server",
        "--embedded-relay",
        "--address",
        f"127.0.0.1:{http_port}",
        ready=lambda entry: entry["message"] == "embedded relay listening",
        env={"RELAY_ADDRESS": f"127.0.0.1:{relay_port}", "RELAY_DB": str(tmp_path / "db")},
    ) as (_, entry):
        assert entry["address"] == f"127.0.0.1:{relay_port}", json.dumps(entry)
        async with RelayClient(f"127.0.0.1:{relay_port}") as client:
            assert (await client.get_stats()).live_streams == 0
