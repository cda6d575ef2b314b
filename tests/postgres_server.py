"""A PostgreSQL server for tests, and a fresh database per test.

The server is the one on 127.0.0.1:5432 if it lets user `postgres` in without a password (trust
auth, as on a developer's machine or CI service); otherwise a private one started in a temporary
directory with `initdb` and `pg_ctl` on a free port (as the `postgres` OS user when the tests run
as root, which PostgreSQL refuses), stopped when the test process exits. Without either, tests
that need it are skipped with the reason. RELAY_TEST_PRIVATE_POSTGRES=1 skips the shared server.

Use it with `from tests.postgres_server import postgres_dsn  # noqa: F401`: the fixture yields
the DSN of a new, empty database, dropped after the test.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

T = TypeVar("T")

HOST = "127.0.0.1"
SHARED_PORT = 5432
USER = "postgres"


@dataclass(frozen=True)
class Server:
    port: int

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@{HOST}:{self.port}/{database}"


_server: Server | None = None
_unavailable: str | None = None
_lock = threading.Lock()


def postgres_server() -> Server:
    """The test server (found or started once per process); skips the test if there is none."""
    global _server, _unavailable
    with _lock:
        if _server is None and _unavailable is None:
            try:
                _server = _find_or_start()
            except _NoServer as exc:
                _unavailable = str(exc)
    if _server is None:
        pytest.skip(f"no PostgreSQL server for the tests: {_unavailable}")
    return _server


@pytest.fixture
def postgres_dsn() -> Iterator[str]:
    """The DSN of a fresh, empty database on the test server, dropped after the test."""
    server = postgres_server()
    database = f"relay_test_{uuid.uuid4().hex}"
    admin(server, f'CREATE DATABASE "{database}"')
    try:
        yield server.dsn(database)
    finally:
        admin(server, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def admin(server: Server, sql: str) -> None:
    """Runs `sql` on the server's `postgres` database (outside any transaction)."""

    async def run() -> None:
        connection = await asyncpg.connect(server.dsn(), timeout=10)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    _in_a_thread(run)


class _NoServer(Exception):
    pass


def _find_or_start() -> Server:
    shared = Server(SHARED_PORT)
    if os.environ.get("RELAY_TEST_PRIVATE_POSTGRES") != "1" and _accepts(shared):
        return shared
    return _start_private()


def _accepts(server: Server) -> bool:
    async def connect() -> None:
        connection = await asyncpg.connect(server.dsn(), timeout=5)
        await connection.close()

    try:
        _in_a_thread(connect)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False
    return True


def _start_private() -> Server:
    for program in ("initdb", "pg_ctl"):
        if shutil.which(program) is None:
            raise _NoServer(f"nothing answers on {HOST}:{SHARED_PORT} and {program} is not on PATH")
    as_user: list[str] = []
    owner: pwd.struct_passwd | None = None
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            raise _NoServer(
                "running as root and there is no `postgres` OS user to run a private server as"
            ) from None
        if shutil.which("runuser") is None:
            raise _NoServer("running as root and runuser is not on PATH")
        as_user = ["runuser", "-u", owner.pw_name, "--"]
    home = Path(tempfile.mkdtemp(prefix="relay-postgres-"))
    data = home / "data"
    if owner is not None:
        os.chown(home, owner.pw_uid, owner.pw_gid)
    port = _free_port()

    def run(*command: str) -> None:
        result = subprocess.run(
            [*as_user, *command], capture_output=True, text=True, timeout=120, check=False
        )
        if result.returncode != 0:
            raise _NoServer(f"{' '.join(command)} failed: {result.stderr.strip()[-500:]}")

    try:
        run("initdb", "-D", str(data), "-U", USER, "-A", "trust", "--no-sync", "-E", "UTF8")
        options = f"-p {port} -k {home} -c listen_addresses={HOST} -c fsync=off"
        run("pg_ctl", "-D", str(data), "-o", options, "-l", str(home / "log"), "-w", "start")
    except BaseException:
        shutil.rmtree(home, ignore_errors=True)
        raise

    def stop() -> None:
        subprocess.run(
            [*as_user, "pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        shutil.rmtree(home, ignore_errors=True)

    atexit.register(stop)
    return Server(port)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def _in_a_thread(work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Runs a coroutine on an event loop of its own, in a thread: callable from sync fixtures
    whether or not the test's loop is running, and never touches that loop."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def main() -> None:
        try:
            outcome.append(asyncio.run(work()))
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=main, name="postgres-admin")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]
