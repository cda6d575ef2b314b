"""Process wiring: configuration, the gRPC server with health and reflection, signals.

    python -m relay.server --address 127.0.0.1:50051 --db ./data/relay.sqlite3
    python -m relay.server --store postgresql://localhost/relay --log redis://localhost:6379/0
    RELAY_TOKENS=<secret> python -m relay.server --address 0.0.0.0:50051 \
        --tls-cert relay.pem --tls-key relay-key.pem [--tls-client-ca clients-ca.pem]

Every flag has an environment variable (`RELAY_<FLAG>`, e.g. RELAY_ADDRESS); flags win.
SIGHUP re-reads the tokens file (`--tokens-file`, see relay.rpc.auth): rotation without restart.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import math
import os
import signal
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from relay import logs, loops, tracing
from relay.domain.core import Relay, UnsavedEnds
from relay.domain.errors import Unavailable
from relay.domain.model import Limits
from relay.domain.ports import ChatStore, StreamLog
from relay.flags import env_option
from relay.producers import Producer
from relay.producers.profiles import ProfileError, build_registry, load_profiles
from relay.rpc.auth import (
    DEFAULT_OPEN_SERVICES,
    Authenticator,
    Security,
    SecurityError,
    ServerTLS,
    ServiceToken,
    load_tokens_file,
    open_services,
    simple_tokens,
)
from relay.rpc.service import RelayServicer, add_relay_service
from relay.stores.postgres import PostgresChatStore
from relay.stores.redis_log import RedisStreamLog
from relay.stores.sqlite import SqliteStore
from relay.v1 import relay_pb2

log = logging.getLogger("relay.server")

SERVICE_NAME = relay_pb2.DESCRIPTOR.services_by_name["RelayService"].full_name


TRACING_HELP = (
    "Tracing: OpenTelemetry, off unless the standard OTEL_* variables turn it on "
    "(OTEL_TRACES_EXPORTER=otlp or console, or OTEL_EXPORTER_OTLP_ENDPOINT; see README, Tracing)."
)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    address: str = "127.0.0.1:50051"
    db: str = "./data/relay.sqlite3"
    store: str = ""  # "" or sqlite:///<path>: the SQLite file `db`; postgresql://...: the cluster's
    log: str = "memory"  # memory: in the relay, journaled to SQLite; redis://...: the cluster's
    instance_id: str = ""  # "" picks host-pid-random
    lease_s: float = 10.0
    default_producer: str = "echo"
    producers: str = (
        ""  # a TOML file of producer profiles (relay.producers.profiles); empty: echo only
    )
    echo_delay_ms: float = 30.0
    retention_s: float = 600.0
    retention_max_s: float = 86_400.0  # the longest retention a Start's policy may ask for
    # The stream policy's defaults (0: off), which a Start's policy may tighten, never loosen.
    orphan_no_reader_grace_s: float = 0.0
    orphan_max_duration_s: float = 0.0
    orphan_max_chunks: int = 0
    stop_tombstone_s: float = 60.0
    journal_interval_ms: float | None = None  # None: 250 for the SQLite journal, 2 for Redis
    shutdown_grace_s: float = 10.0
    log_level: str = "info"
    log_format: str = "json"
    event_loop: str = loops.DEFAULT
    limits: Limits = field(default_factory=Limits)
    # Security (relay.rpc.auth). No tokens: authentication is off (fine on loopback only).
    tokens: str = field(default="", repr=False)  # comma-separated secrets, each full-trust
    tokens_file: str = ""  # TOML of named tokens; SIGHUP re-reads it
    auth_open_services: str = DEFAULT_OPEN_SERVICES  # reachable without a token; "none"
    tls_cert: str = ""  # PEM certificate chain: TLS on the port when set (with tls_key)
    tls_key: str = ""
    tls_client_ca: str = ""  # PEM CA(s): client certificates required and checked (mTLS)


def parse_config(
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    prog: str = "stream-relay",
) -> ServerConfig:
    """The relay's configuration from flags and RELAY_* variables; a bad one exits 2 with one
    line naming `prog` (the gateway's embedded relay says it is the gateway's)."""
    env = os.environ if env is None else env
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="The stream-relay gRPC service. Each flag also reads RELAY_<FLAG> from the "
        "environment (e.g. RELAY_ADDRESS); a flag on the command line wins.",
        epilog=TRACING_HELP,
    )

    def option(name: str, kind: type, default: object, help_text: str) -> None:
        env_option(parser, parser, env, "RELAY_", name, default, help_text, kind)

    option("address", str, defaults.address, "host:port to listen on (port 0 picks a free one)")
    option("db", str, defaults.db, "SQLite file for chats, messages and the chunk journal")
    option(
        "store",
        str,
        defaults.store,
        "chat store URL: sqlite:///<path> (default: the --db file) or postgresql://... (several "
        "relays share it)",
    )
    option(
        "log",
        str,
        defaults.log,
        "stream log: memory (journaled to the SQLite store) or redis://host:port/db (several "
        "relays share it; needs a postgresql:// store)",
    )
    option("instance-id", str, defaults.instance_id, "this relay's name in leases and logs")
    option(
        "lease-s",
        float,
        defaults.lease_s,
        "a relay's lease: how soon others take over the streams of one that died",
    )
    option(
        "default-producer", str, defaults.default_producer, "producer used when Start names none"
    )
    option("producers", str, defaults.producers, "TOML file of producer profiles (see README)")
    option("echo-delay-ms", float, defaults.echo_delay_ms, "echo producer: pause before each chunk")
    option("retention-s", float, defaults.retention_s, "how long finished streams stay attachable")
    option(
        "retention-max-s",
        float,
        defaults.retention_max_s,
        "the longest retention a Start's policy may ask for (its retention_s)",
    )
    option(
        "orphan-no-reader-grace-s",
        float,
        defaults.orphan_no_reader_grace_s,
        "stop a producer whose stream has had no reader on this relay for this long (0: off)",
    )
    option(
        "orphan-max-duration-s",
        float,
        defaults.orphan_max_duration_s,
        "stop a producer once it has run this long (0: off)",
    )
    option(
        "orphan-max-chunks",
        int,
        defaults.orphan_max_chunks,
        "stop a producer once its stream holds this many chunks (0: off)",
    )
    option(
        "stop-tombstone-s",
        float,
        defaults.stop_tombstone_s,
        "how long a Stop naming a Start that has not arrived yet waits for it (that Start then "
        "ends stopped as it starts)",
    )
    option(
        "journal-interval-ms",
        float,
        defaults.journal_interval_ms,
        "how long chunks gather before one write to the log (default 250 for SQLite, 2 for Redis)",
    )
    option(
        "shutdown-grace-s",
        float,
        defaults.shutdown_grace_s,
        "on SIGTERM/SIGINT, how long producers may run before they are interrupted",
    )
    option(
        "tokens",
        str,
        defaults.tokens,
        "service tokens: comma-separated secrets (>= 16 characters), each may act for any "
        "subject; prefer the environment variable to the flag (ps shows flags)",
    )
    option(
        "tokens-file",
        str,
        defaults.tokens_file,
        "TOML file of named service tokens (see README, Security); SIGHUP re-reads it",
    )
    option(
        "auth-open-services",
        str,
        defaults.auth_open_services,
        "services callable without a token when tokens are set: health, reflection, full gRPC "
        "service names, or none",
    )
    option("tls-cert", str, defaults.tls_cert, "PEM certificate chain: serve TLS (with --tls-key)")
    option("tls-key", str, defaults.tls_key, "PEM private key of --tls-cert")
    option(
        "tls-client-ca",
        str,
        defaults.tls_client_ca,
        "PEM CA certificate(s): require client certificates signed by them (mutual TLS)",
    )
    env_option(
        parser,
        parser,
        env,
        "RELAY_",
        "log-level",
        defaults.log_level,
        "the least severe log lines written (any case)",
        str.lower,
        choices=logs.LEVELS,
    )
    env_option(
        parser,
        parser,
        env,
        "RELAY_",
        "log-format",
        defaults.log_format,
        "json: one JSON object per line (for collectors); text: a line per record with its "
        "fields as key=value (for a terminal)",
        choices=logs.FORMATS,
    )
    env_option(
        parser, parser, env, "RELAY_", "event-loop", defaults.event_loop, loops.HELP,
        choices=loops.LOOPS,
    )  # fmt: skip
    for name in Limits.__dataclass_fields__:
        option(
            "limit-" + name.replace("_", "-"),
            int,
            getattr(defaults.limits, name),
            f"limit: {name.replace('_', ' ')}",
        )
    args = vars(parser.parse_args(argv))
    for name in (
        "retention_s",
        "retention_max_s",
        "orphan_no_reader_grace_s",
        "orphan_max_duration_s",
        "orphan_max_chunks",
    ):
        if not (math.isfinite(args[name]) and args[name] >= 0):
            flag = "--" + name.replace("_", "-")
            parser.error(f"{flag} must be a finite number, 0 or more; got {args[name]}")
    if not (math.isfinite(args["stop_tombstone_s"]) and args["stop_tombstone_s"] > 0):
        parser.error(
            f"--stop-tombstone-s must be a finite number over 0, got {args['stop_tombstone_s']}"
        )
    limits = Limits(**{name: args.pop("limit_" + name) for name in Limits.__dataclass_fields__})
    return ServerConfig(limits=limits, **args)


def build_relay(
    config: ServerConfig, extra_producers: Mapping[str, Producer] | None = None
) -> Relay:
    profiles = load_profiles(config.producers) if config.producers else {}
    # The profiles' policies say what a client may choose (relay.producers.policy).
    registry = build_registry(
        profiles, config.default_producer, config.echo_delay_ms, extra_producers
    )
    store, log = open_stores(config)
    interval = config.journal_interval_ms
    if interval is None:
        interval = 250.0 if log is None else 2.0
    return Relay(
        store,
        registry,
        config.limits,
        log=log,
        instance_id=config.instance_id,
        lease_s=config.lease_s,
        retention=config.retention_s,
        journal_interval=interval / 1000,
        no_reader_grace_s=config.orphan_no_reader_grace_s or None,
        max_duration_s=config.orphan_max_duration_s or None,
        max_chunks=config.orphan_max_chunks or None,
        retention_max=config.retention_max_s,
        stop_tombstone_s=config.stop_tombstone_s,
    )


def open_stores(config: ServerConfig) -> tuple[ChatStore, StreamLog | None]:
    """The chat store and the stream log the configuration names (None: the store is the log).
    Raises StartupError for a combination that cannot work."""
    scheme = urlsplit(config.store).scheme
    if config.log == "memory":
        if scheme not in ("", "sqlite"):
            raise StartupError(
                f"--store {shown_url(config.store)} needs a shared log: --log redis://..."
            )
        return SqliteStore(sqlite_path(config)), None
    if urlsplit(config.log).scheme not in ("redis", "rediss", "unix"):
        raise StartupError(f"--log must be memory or a redis:// URL, not {shown_url(config.log)}")
    if scheme not in ("postgresql", "postgres"):
        raise StartupError(
            "--log redis://... is for several relays: it needs --store postgresql://... "
            "(an SQLite file serves one relay)"
        )
    return PostgresChatStore(config.store), redis_log(config.log)


def redis_log(url: str) -> RedisStreamLog:
    """The Redis stream log of a URL; `?prefix=` names its keys (default `relay:`), so several
    clusters can share one Redis."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    prefix = query.pop("prefix", ["relay:"])[0]
    return RedisStreamLog(urlunsplit(parts._replace(query=urlencode(query, doseq=True))), prefix)


def sqlite_path(config: ServerConfig) -> str:
    if config.store.startswith("sqlite:///"):
        return config.store.removeprefix("sqlite:///")
    if config.store:
        raise StartupError(
            f"--store must be sqlite:///<path> or postgresql://..., not {shown_url(config.store)}"
        )
    return config.db


def shown_url(url: str) -> str:
    """A URL for messages: its password replaced."""
    parts = urlsplit(url)
    if parts.password:
        url = url.replace(f":{parts.password}@", ":***@", 1)
    return repr(url)


def store_name(config: ServerConfig) -> str:
    if config.log == "memory":
        return f"the store {config.db if not config.store else shown_url(config.store)}"
    return f"the stores (chats {shown_url(config.store)}, log {shown_url(config.log)})"


def load_tokens(config: ServerConfig) -> list[ServiceToken]:
    """The service tokens of --tokens and --tokens-file. Raises SecurityError."""
    tokens = simple_tokens(config.tokens)
    if config.tokens_file:
        tokens += load_tokens_file(config.tokens_file)
    return tokens


def load_security(config: ServerConfig) -> Security:
    """The port's security as configured, its files read and checked now, so a bad one stops the
    relay before it opens its store. Raises SecurityError with the reason."""
    tls = None
    if config.tls_cert or config.tls_key or config.tls_client_ca:
        if not (config.tls_cert and config.tls_key):
            raise SecurityError("TLS needs both --tls-cert and --tls-key")
        tls = ServerTLS(config.tls_cert, config.tls_key, config.tls_client_ca)
        tls.credentials()
    return Security(
        authenticator=Authenticator(load_tokens(config)),
        open_services=open_services(config.auth_open_services),
        tls=tls,
    )


def reload_tokens(config: ServerConfig, authenticator: Authenticator) -> bool:
    """Re-reads the tokens (SIGHUP). A file that is now bad changes nothing: the old tokens stay
    and the reason is logged. Returns whether the tokens were replaced."""
    if not config.tokens_file:
        log.warning("SIGHUP: there is no --tokens-file to re-read")
        return False
    try:
        tokens = load_tokens(config)
        authenticator.replace(tokens)
    except SecurityError as exc:
        log.error("service tokens not reloaded; the old ones stay", extra={"reason": str(exc)})
        return False
    log.info("service tokens reloaded", extra={"tokens": len(tokens)})
    return True


@dataclass(frozen=True, slots=True)
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    health_mirror: asyncio.Task[None]

    async def stop(self, grace: float) -> None:
        self.health_mirror.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def _mirror_health(relay: Relay, servicer: health.aio.HealthServicer) -> None:
    """gRPC health says NOT_SERVING while the relay's store fails, so a balancer or supervisor
    sees it."""
    healthy = relay.healthy
    while True:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if healthy
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", SERVICE_NAME):
            await servicer.set(service, status)
        healthy = await relay.health_changed()


async def start_server(
    relay: Relay, address: str, *, security: Security | None = None
) -> RunningServer:
    """Serves `relay` (already open) with health checking and reflection, behind `security`'s
    service tokens and TLS (default: none, plaintext: the loopback default)."""
    security = security or Security()
    limit = relay.limits.request_max_bytes
    server = grpc.aio.server(
        # Tracing first, so that a call the tokens refuse has its span too.
        interceptors=[*tracing.server_interceptors(), *security.interceptors()],
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", 64 << 20),
            # gRPC sets SO_REUSEPORT by default: a second relay on a busy port would start and
            # take half of the new connections. Off, it fails to bind and exits with a reason.
            ("grpc.so_reuseport", 0),
            *PING_OPTIONS,
        ],
    )
    # The handlers ask the authenticator whom each call acts for (the interceptor has checked
    # the token already). Undecodable requests: INVALID_ARGUMENT.
    add_relay_service(RelayServicer(relay, security.authenticator), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    try:
        if security.tls is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, security.tls.credentials())
    except RuntimeError:  # grpc's message points at GRPC_VERBOSITY; the usual cause is this
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {address}: the address is in use or not available")
    await server.start()
    mirror = asyncio.create_task(_mirror_health(relay, health_servicer), name="health-mirror")
    return RunningServer(server, port, health_servicer, mirror)


# Clients may ping once a second, also on calls where no data flows (an idle answer's readers),
# so they notice a hung relay; gRPC's default would answer such pings with GOAWAY after two.
# The relay pings its clients every 30 s in turn, so the readers of a client that vanished
# without closing its connection (power loss, partition) are freed.
PING_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
)


def settle_heap() -> None:
    """Keeps the cyclic garbage collector from stalling the event loop, which every live reader
    would feel as latency. A full collection visits every reference in every container, and the
    replay buffers hold millions (measured: 75-97 ms pauses with 1,000 streams of 600 chunks).
    So: what start-up made (modules, gRPC, protobuf) is frozen out of the collector's reach, and
    a young collection waits for 50,000 new containers instead of 700, which makes full ones rare.
    Memory is freed by reference counting as before; only cycles wait longer."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 10, 10)


async def open_relay(config: ServerConfig) -> Relay:
    """The relay, open: its store opened and what a crash left live recovered. Raises
    StartupError with the reason when the store cannot be opened or recovered."""
    relay = build_relay(config)
    try:
        await relay.open()
    except (Unavailable, sqlite3.Error, OSError, RuntimeError) as exc:
        raise StartupError(f"cannot open {store_name(config)}: {_reason(exc)}") from exc
    return relay


async def serve(config: ServerConfig) -> None:
    security = load_security(config)
    relay = await open_relay(config)
    try:
        running = await start_server(relay, config.address, security=security)
    except BaseException:
        await relay.close(grace=0)
        raise
    settle_heap()
    host = config.address.rsplit(":", 1)[0]
    log.info(
        "relay listening",
        extra={
            "address": f"{host}:{running.port}",
            "store": config.db
            if config.log == "memory" and not config.store
            else shown_url(config.store),
            "log": config.log if config.log == "memory" else shown_url(config.log),
            "instance_id": relay.instance_id,
            "default_producer": config.default_producer,
            "tls": "off" if security.tls is None else security.tls.mode,
            "service_tokens": len(security.authenticator.tokens),
        },
    )
    warn_if_exposed(host, security)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, reload_tokens, config, security.authenticator)
    await stopping.wait()
    log.info("shutting down", extra={"grace_s": config.shutdown_grace_s})
    # Readers get a second to finish (they can re-attach later); producers get the grace period.
    await running.stop(grace=1.0)
    await relay.close(grace=config.shutdown_grace_s)
    log.info("stopped")


def warn_if_exposed(host: str, security: Security) -> None:
    """A relay listening beyond loopback without tokens or TLS serves anyone who can reach it."""
    if host.strip("[]") in ("127.0.0.1", "::1", "localhost"):
        return
    missing = [
        what
        for what, absent in (
            ("service tokens", not security.authenticator.enabled),
            ("TLS", security.tls is None),
        )
        if absent
    ]
    if missing:
        log.warning(
            "the relay listens beyond loopback without " + " and ".join(missing),
            extra={"address": host},
        )


class StartupError(Exception):
    """The relay cannot start; the message says why, for the operator."""


def _reason(exc: BaseException) -> str:
    """The root cause's text: `Unavailable` hides the store's details from clients, not here."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return str(exc) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> None:
    """Exits non-zero with a one-line reason when the relay cannot start or could not save
    everything on the way out, so a supervisor restarts it and an operator sees why."""
    config = parse_config(argv)
    logs.configure(config.log_level, config.log_format)
    try:
        tracing.configure(tracing.RELAY_SERVICE)  # off unless OTEL_* variables say (README)
        loops.run(serve(config), config.event_loop)
    except FATAL as exc:
        log.critical(str(exc))
        raise SystemExit(f"stream-relay: {exc}") from None
    finally:
        tracing.shutdown()  # exports the spans still buffered


# What stops a relay with a one-line reason instead of a traceback: a bad producers file, a store
# that cannot be opened, ends the store refused at shutdown, an address that is taken, a bad tokens
# file or TLS file, OTEL_* variables naming an exporter that does not exist.
FATAL = (ProfileError, SecurityError, StartupError, UnsavedEnds, OSError, tracing.TracingError)


if __name__ == "__main__":
    main()
