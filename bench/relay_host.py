"""The relay as its own process, as `python -m relay.server` runs it, plus the bench producer.

    python -m bench.relay_host --address 127.0.0.1:0 --db /tmp/x.sqlite3 [--gateway 127.0.0.1:P]
                               [any relay.server flag ...]

It builds the relay with relay.server.build_relay(config, extra_producers={"bench": ...}) and
serves it with relay.server.start_server, exactly as the relay's own entry point does; `echo` is
there as usual. With --gateway it also serves the HTTP gateway in this process, as
`python -m gateway.server --embedded-relay` does. SIGUSR1 releases the gated bench streams.
Prints {"event": "listening", "address": ..., "gateway": ...} on stdout when ready.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Iterator

import uvicorn

from bench.common import emit
from bench.producer import BenchProducer
from gateway.app import GatewaySettings, create_app
from relay import logs
from relay.server import build_relay, parse_config, settle_heap, start_server


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: this process handles SIGTERM itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(gateway_address: str, relay_argv: list[str]) -> None:
    config = parse_config(relay_argv)
    logs.configure(config.log_level, config.log_format)
    producer = BenchProducer()
    relay = build_relay(config, extra_producers={"bench": producer})
    await relay.open()
    running = await start_server(relay, config.address)
    address = f"{config.address.rsplit(':', 1)[0]}:{running.port}"
    server: _Server | None = None
    serving: asyncio.Task[None] | None = None
    if gateway_address:
        host, port = gateway_address.rsplit(":", 1)
        server = _Server(
            uvicorn.Config(
                create_app(GatewaySettings(relay_target=address)),
                host=host,
                port=int(port),
                log_config=None,
                access_log=False,
                timeout_graceful_shutdown=2,
            )
        )
        serving = asyncio.create_task(server.serve())
        while not server.started:
            if serving.done():
                await serving  # raises why it could not start
                raise RuntimeError("the gateway stopped at start")
            await asyncio.sleep(0.01)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    loop.add_signal_handler(signal.SIGUSR1, producer.release)
    settle_heap()
    emit("listening", address=address, gateway=gateway_address)
    await stopping.wait()
    if server is not None and serving is not None:
        server.should_exit = True
        await serving
    await running.stop(grace=0.5)
    await relay.close(grace=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gateway", default="", help="also serve the gateway on host:port")
    args, relay_argv = parser.parse_known_args()
    asyncio.run(serve(args.gateway, relay_argv))


if __name__ == "__main__":
    main()
