"""`make run-cluster`: two relays on one PostgreSQL database and one Redis, and a gateway on each,
with the demo page: http://127.0.0.1:8080/ (relay A) and http://127.0.0.1:8081/ (relay B).

Start an answer on one page and resume or stop it on the other. Ctrl-C stops everything.

    CLUSTER_STORE   PostgreSQL URL (default postgresql://postgres@127.0.0.1:5432/stream_relay;
                    the database is created if it does not exist)
    CLUSTER_LOG     Redis URL (default redis://127.0.0.1:6379/0)
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from urllib.parse import urlsplit, urlunsplit

import asyncpg

STORE = os.environ.get("CLUSTER_STORE", "postgresql://postgres@127.0.0.1:5432/stream_relay")
LOG = os.environ.get("CLUSTER_LOG", "redis://127.0.0.1:6379/0")
NODES = (("A", 50051, 8080), ("B", 50052, 8081))


async def create_database(url: str) -> None:
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    admin = urlunsplit(parts._replace(path="/postgres"))
    connection = await asyncpg.connect(admin, timeout=10)
    try:
        if not await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await connection.execute(f'CREATE DATABASE "{name}"')
            print(f"created the database {name}", file=sys.stderr)
    finally:
        await connection.close()


async def main() -> int:
    try:
        await create_database(STORE)
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"run-cluster: cannot reach PostgreSQL at {STORE}: {exc}", file=sys.stderr)
        return 1
    python, children = sys.executable, []
    for name, grpc_port, http_port in NODES:
        relay = ("-m", "relay.server", "--address", f"127.0.0.1:{grpc_port}")
        cluster = ("--store", STORE, "--log", LOG, "--instance-id", name, "--log-format", "text")
        children.append(await asyncio.create_subprocess_exec(python, *relay, *cluster))
        gateway = ("-m", "gateway.server", "--address", f"127.0.0.1:{http_port}")
        target = ("--relay", f"127.0.0.1:{grpc_port}", "--log-format", "text")
        children.append(await asyncio.create_subprocess_exec(python, *gateway, *target))
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    waits = [asyncio.ensure_future(child.wait()) for child in children]
    stop = asyncio.ensure_future(stopping.wait())
    await asyncio.wait([stop, *waits], return_when=asyncio.FIRST_COMPLETED)
    for child in children:
        if child.returncode is None:
            child.terminate()
    codes = [await child.wait() for child in children]
    return 0 if stopping.is_set() else max(codes, key=abs) or 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
