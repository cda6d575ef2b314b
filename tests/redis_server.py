"""A Redis server for tests, and a key prefix of its own per test.

The server is the one on 127.0.0.1:6379 if it answers PING; otherwise a private `redis-server`
started in a temporary directory on a free port, stopped when the test process exits. Without
either, tests that need it are skipped with the reason. RELAY_TEST_PRIVATE_REDIS=1 skips the
shared server.

Use it with `from tests.redis_server import redis_url, redis_prefix  # noqa: F401`: `redis_url`
is the server's URL; `redis_prefix` a fresh key prefix whose keys are deleted after the test.
`start_private_redis` starts a server of the test's own (one it may kill and restart), and the
`private_redis` fixture does the same and stops whatever it started after the test.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from secrets import token_hex
from urllib.parse import urlsplit

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

HOST = "127.0.0.1"
SHARED_PORT = 6379
START_TIMEOUT_S = 10.0

_url: str | None = None
_unavailable: str | None = None
_lock = threading.Lock()


def redis_server_url() -> str:
    """The test server's URL (found or started once per process); skips the test if none."""
    global _url, _unavailable
    with _lock:
        if _url is None and _unavailable is None:
            try:
                _url = _find_or_start()
            except _NoServer as exc:
                _unavailable = str(exc)
    if _url is None:
        pytest.skip(f"no Redis server for the tests: {_unavailable}")
    return _url


@pytest.fixture(scope="session")
def redis_url() -> str:
    return redis_server_url()


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix no other test uses; its keys are deleted after the test."""
    prefix = f"relay-test-{token_hex(6)}:"
    yield prefix
    with redis.Redis.from_url(redis_url, socket_timeout=5) as client:
        keys = list(client.scan_iter(match=prefix + "*", count=1_000))
        if keys:
            client.delete(*keys)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Callable[..., tuple[str, subprocess.Popen[bytes]]]]:
    """`start(appendonly=True, port=None)`: a private server in the test's temporary directory
    (pass the port of one stopped before to restart it); all are stopped after the test."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH")
    started: list[subprocess.Popen[bytes]] = []

    def start(
        appendonly: bool = True, port: int | None = None
    ) -> tuple[str, subprocess.Popen[bytes]]:
        url, process = start_private_redis(tmp_path, appendonly=appendonly, port=port)
        started.append(process)
        return url, process

    yield start
    for process in started:
        stop_redis(process)


def start_private_redis(
    directory: Path, appendonly: bool = True, port: int | None = None
) -> tuple[str, subprocess.Popen[bytes]]:
    """Starts `redis-server` on a free port (or `port`), its files in `directory`, and waits
    until it answers. The caller stops it (`stop_redis`); it is killed at exit if not."""
    program = shutil.which("redis-server")
    if program is None:
        raise _NoServer("redis-server is not on PATH")
    port = _free_port() if port is None else port
    directory.mkdir(parents=True, exist_ok=True)
    # The log goes to a file: a pipe nobody reads could fill and stall the server.
    log = open(directory / f"redis-{port}.log", "ab")  # noqa: SIM115 (the child keeps it)
    try:
        process = subprocess.Popen(
            [
                program,
                "--port", str(port),
                "--bind", HOST,
                "--dir", str(directory),
                "--save", "",
                "--appendonly", "yes" if appendonly else "no",
                "--appendfsync", "always" if appendonly else "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    finally:
        log.close()
    atexit.register(stop_redis, process)
    url = f"redis://{HOST}:{port}/0"
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _answers(url):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_redis(process)
            tail = (directory / f"redis-{port}.log").read_text(errors="replace")[-500:]
            raise _NoServer(f"redis-server did not start on port {port}: {tail.strip()}")
        time.sleep(0.02)
    return url, process


def stop_redis(process: subprocess.Popen[bytes]) -> None:
    """Kills the server at once (as a crash would) and reaps it."""
    if process.poll() is None:
        process.kill()
    process.wait(timeout=10)


def url_port(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


class _NoServer(Exception):
    pass


def _find_or_start() -> str:
    shared = f"redis://{HOST}:{SHARED_PORT}/0"
    if os.environ.get("RELAY_TEST_PRIVATE_REDIS") != "1" and _answers(shared):
        return shared
    home = Path(tempfile.mkdtemp(prefix="relay-redis-"))
    try:
        url, process = start_private_redis(home, appendonly=False)
    except BaseException:
        shutil.rmtree(home, ignore_errors=True)
        raise

    def stop() -> None:
        stop_redis(process)
        shutil.rmtree(home, ignore_errors=True)

    atexit.register(stop)
    return url


def _answers(url: str) -> bool:
    try:
        with redis.Redis.from_url(
            url, socket_timeout=2, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0)
        ) as client:
            return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port
