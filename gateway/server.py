"""Runs the gateway with uvicorn; with --embedded-relay, the relay too, in the same process.

    python -m gateway.server --address 127.0.0.1:8080 --relay 127.0.0.1:50051
    python -m gateway.server --embedded-relay          # what `make run` does

Every flag has an environment variable (`GATEWAY_<FLAG>`); flags win. With --embedded-relay the
relay reads its own RELAY_* variables (see `python -m relay.server --help`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Iterator, Sequence

import uvicorn

from gateway.app import GatewaySettings, create_app
from gateway.timeouts import header_timeout_protocol
from relay import logs
from relay.server import (
    FATAL,
    RunningServer,
    open_relay,
    parse_config,
    settle_heap,
    start_server,
)

log = logging.getLogger("gateway")


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: ours stops the gateway, then the embedded relay
    (letting its producers finish within the grace period), and exits cleanly."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(prog="stream-relay-gateway", description=__doc__)
    parser.add_argument(
        "--address",
        default=env.get("GATEWAY_ADDRESS", "127.0.0.1:8080"),
        help="host:port to serve HTTP on [GATEWAY_ADDRESS]",
    )
    parser.add_argument(
        "--relay",
        default=env.get("GATEWAY_RELAY"),
        help="the relay's gRPC address (default 127.0.0.1:50051; with --embedded-relay, the "
        "embedded relay's own address, RELAY_ADDRESS) [GATEWAY_RELAY]",
    )
    parser.add_argument(
        "--embedded-relay",
        action="store_true",
        default=env.get("GATEWAY_EMBEDDED_RELAY", "") not in ("", "0", "false"),
        help="also run the relay in this process [GATEWAY_EMBEDDED_RELAY]",
    )
    parser.add_argument(
        "--on-live-stream",
        choices=("supersede", "refuse"),
        default=env.get("GATEWAY_ON_LIVE_STREAM", "supersede"),
        help="a POST while the chat's answer is live: stop it, or answer 409 "
        "[GATEWAY_ON_LIVE_STREAM]",
    )
    parser.add_argument(
        "--relay-reads",
        choices=("shared", "per-request"),
        default=env.get("GATEWAY_RELAY_READS", "shared"),
        help="SSE readers as subscriptions of one AttachMany call, or one Attach call each "
        "[GATEWAY_RELAY_READS]",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=int(env.get("GATEWAY_MAX_BODY_BYTES", 8 * 1024 * 1024)),
        help="larger request bodies get 413 [GATEWAY_MAX_BODY_BYTES]",
    )
    parser.add_argument(
        "--keepalive-s",
        type=float,
        default=float(env.get("GATEWAY_KEEPALIVE_S", 15)),
        help="keep-alive comment interval on idle SSE [GATEWAY_KEEPALIVE_S]",
    )
    parser.add_argument(
        "--cors-origin",
        action="append",
        default=[o for o in env.get("GATEWAY_CORS_ORIGINS", "").split(",") if o],
        help="a browser origin allowed to call the API; repeatable "
        "[GATEWAY_CORS_ORIGINS, comma-separated]",
    )
    parser.add_argument(
        "--header-timeout-s",
        type=float,
        default=float(env.get("GATEWAY_HEADER_TIMEOUT_S", 10)),
        help="a request's headers must arrive within this time, else 408 and the connection "
        "closes [GATEWAY_HEADER_TIMEOUT_S]",
    )
    parser.add_argument(
        "--body-timeout-s",
        type=float,
        default=float(env.get("GATEWAY_BODY_TIMEOUT_S", 60)),
        help="a request's body must arrive within this time after its headers, else 408 "
        "[GATEWAY_BODY_TIMEOUT_S]",
    )
    parser.add_argument(
        "--relay-reconnect-s",
        type=float,
        default=float(env.get("GATEWAY_RELAY_RECONNECT_S", 30)),
        help="a reader whose relay goes away mid-answer is re-attached for this long "
        "[GATEWAY_RELAY_RECONNECT_S]",
    )
    parser.add_argument("--log-level", default=env.get("GATEWAY_LOG_LEVEL", "info"))
    parser.add_argument("--log-format", default=env.get("GATEWAY_LOG_FORMAT", "json"))
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    relay_target = args.relay or "127.0.0.1:50051"
    embedded: RunningServer | None = None
    relay = None
    # The embedded relay reads its RELAY_* variables; --relay (GATEWAY_RELAY), when given, wins.
    config = parse_config([] if args.relay is None else ["--address", args.relay])
    if args.embedded_relay:
        relay = await open_relay(config)
        embedded = await start_server(relay, config.address)
        relay_target = f"{config.address.rsplit(':', 1)[0]}:{embedded.port}"
        log.info("embedded relay listening", extra={"address": relay_target, "db": config.db})
    settings = GatewaySettings(
        relay_target=relay_target,
        max_body_bytes=args.max_body_bytes,
        keepalive_s=args.keepalive_s,
        on_live_stream=args.on_live_stream,
        relay_reads=args.relay_reads,
        cors_origins=tuple(args.cors_origin),
        body_timeout_s=args.body_timeout_s,
        relay_reconnect_s=args.relay_reconnect_s,
    )
    host, port = args.address.rsplit(":", 1)
    app = create_app(settings)
    server = _Server(
        uvicorn.Config(
            app,
            host=host,
            port=int(port),
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=2,
            http=header_timeout_protocol(args.header_timeout_s),
        )
    )
    log.info(
        "gateway listening",
        extra={"address": args.address, "relay": relay_target, "demo": f"http://{args.address}/"},
    )
    loop = asyncio.get_running_loop()

    def shut_down() -> None:
        # Readers first (each gets a terminal chunk saying to resume), then uvicorn stops.
        app.state.gateway.drain()
        server.should_exit = True

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, shut_down)
    settle_heap()
    try:
        await server.serve()  # returns on SIGINT/SIGTERM
    finally:
        if embedded is not None and relay is not None:
            await embedded.stop(grace=1.0)
            await relay.close(grace=config.shutdown_grace_s)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    try:
        asyncio.run(serve(args))
    except FATAL as exc:  # e.g. the embedded relay's store or producers file is bad
        log.critical(str(exc))
        raise SystemExit(f"stream-relay-gateway: {exc}") from None


if __name__ == "__main__":
    main()
