"""Runs the gateway with uvicorn; with --embedded-relay, the relay too, in the same process.

    python -m gateway.server --address 127.0.0.1:8080 --relay 127.0.0.1:50051
    python -m gateway.server --embedded-relay          # what `make run` does

Every flag has an environment variable (`GATEWAY_<FLAG>`); flags win. With --embedded-relay the
relay reads its own RELAY_* variables (see `python -m relay.server --help`). Secrets (the relay's
service token) belong in the environment or a file, never on a command line.

A configuration that cannot work (a key file that is not a key, TLS without its CA, ...) exits 1
with one line saying why, before anything starts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import signal
import textwrap
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import uvicorn

from gateway.app import GatewaySettings, create_app
from gateway.auth import (
    DEFAULT_ALGORITHMS,
    MODES,
    AuthConfig,
    ConfigError,
    Verifier,
    build_verifier,
    describe,
    split_list,
)
from gateway.security import default_allowed_hosts, normalized_origin
from gateway.timeouts import header_timeout_protocol
from relay import logs, loops, tracing
from relay.client import ClientTLS
from relay.domain.model import StreamPolicy
from relay.flags import env_option
from relay.rpc.auth import check_token
from relay.server import (
    FATAL,
    TRACING_HELP,
    RunningServer,
    load_security,
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
    parser = argparse.ArgumentParser(
        prog="stream-relay-gateway",
        description=__doc__,
        epilog=textwrap.fill(TRACING_HELP, 79),  # the raw formatter keeps lines as they are
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    def option(
        group: argparse._ActionsContainer,
        name: str,
        default: object,
        help_text: str,
        kind: Callable[[str], Any] = str,
        **extra: Any,
    ) -> None:
        env_option(parser, group, env, "GATEWAY_", name, default, help_text, kind, **extra)

    option(parser, "address", "127.0.0.1:8080", "host:port to serve HTTP on")
    option(
        parser,
        "relay",
        None,
        "the relay's gRPC address (default 127.0.0.1:50051; with --embedded-relay, the "
        "embedded relay's own address, RELAY_ADDRESS)",
    )
    parser.add_argument(
        "--embedded-relay",
        action="store_true",
        default=env.get("GATEWAY_EMBEDDED_RELAY", "") not in ("", "0", "false"),
        help="also run the relay in this process [GATEWAY_EMBEDDED_RELAY]",
    )
    parser.add_argument(
        "--trace-context-from-clients",
        action="store_true",
        default=env.get("GATEWAY_TRACE_CONTEXT_FROM_CLIENTS", "") not in ("", "0", "false"),
        help="tracing: continue the trace context of requests' traceparent, tracestate and "
        "baggage headers (clients that set them are trusted, e.g. a proxy in front); without it "
        "they are dropped [GATEWAY_TRACE_CONTEXT_FROM_CLIENTS]",
    )
    option(
        parser,
        "on-live-stream",
        "supersede",
        "a POST while the chat's answer is live: stop it, or answer 409",
        choices=("supersede", "refuse"),
    )
    option(
        parser,
        "relay-reads",
        "shared",
        "SSE readers as subscriptions of one AttachMany call, or one Attach call each",
        choices=("shared", "per-request"),
    )
    option(
        parser,
        "resume-replay",
        "compact",
        "how a resume sends what the answer holds already: each part's deltas merged, or one "
        "by one (a request's ?replay= overrides it)",
        choices=("compact", "plain"),
    )
    option(parser, "max-body-bytes", 8 * 1024 * 1024, "larger request bodies get 413", int)
    option(parser, "keepalive-s", 15.0, "keep-alive comment interval on idle SSE", float)
    parser.add_argument(
        "--cors-origin",
        action="append",
        default=[o for o in env.get("GATEWAY_CORS_ORIGINS", "").split(",") if o],
        help="a browser origin allowed to call the API; repeatable "
        "[GATEWAY_CORS_ORIGINS, comma-separated]",
    )
    option(
        parser,
        "header-timeout-s",
        10.0,
        "a request's headers must arrive within this time, else 408 and the connection closes",
        float,
    )
    option(
        parser,
        "body-timeout-s",
        60.0,
        "a request's body must arrive within this time after its headers, else 408",
        float,
    )
    option(
        parser,
        "relay-reconnect-s",
        30.0,
        "a reader whose relay goes away mid-answer is re-attached for this long",
        float,
    )
    option(
        parser,
        "max-sse-per-subject",
        32,
        "concurrent SSE responses per signed-in subject; past it 429",
        int,
    )
    option(parser, "max-sse-total", 20_000, "concurrent SSE responses in all; past it 429", int)
    policy = parser.add_argument_group(
        "the stream policy of every Start (unset: the relay's defaults, which it may only tighten)"
    )
    option(
        policy,
        "stream-no-reader-grace-s",
        None,
        "stop an answer that has had no reader for this long",
        float,
    )
    option(policy, "stream-max-duration-s", None, "stop an answer once it has run this long", float)
    option(policy, "stream-max-chunks", None, "stop an answer once it holds this many chunks", int)
    option(
        policy,
        "stream-retention-s",
        None,
        "keep an ended answer this long (at most the relay's --retention-max-s)",
        float,
    )
    parser.add_argument(
        "--allowed-hosts",
        action="append",
        default=None,
        help="names the Host header may carry (any port; *.example.com for subdomains; * for "
        "any); repeatable, comma-separated. Default: localhost, 127.0.0.1, [::1] and the host "
        "of --address [GATEWAY_ALLOWED_HOSTS]",
    )
    auth = parser.add_argument_group("end-user authentication")
    option(
        auth,
        "auth",
        "anonymous",
        "anonymous: everyone is one subject (the demo); jwt: a Bearer JWT; trusted-header: "
        "a header set by an authenticating proxy in front",
        choices=MODES,
    )
    option(auth, "jwt-key-file", None, "PEM public key or certificate (RSA, EC) verifying the JWTs")
    option(
        auth, "jwt-secret-file", None, "a file holding the HMAC secret (HS256; at least 32 bytes)"
    )
    option(auth, "jwt-jwks-file", None, "a JWK Set file with the verification keys")
    option(auth, "jwt-jwks-url", None, "the issuer's JWKS URL (https), fetched and cached")
    option(
        auth,
        "jwt-jwks-cache-s",
        300.0,
        "how long fetched keys are used before fetching again; an unknown kid fetches sooner, "
        "at most every 30 s",
        float,
    )
    option(
        auth,
        "jwt-algorithms",
        ",".join(DEFAULT_ALGORITHMS),
        "the algorithms accepted, comma-separated; each key verifies only those of its kind",
    )
    option(auth, "jwt-issuer", None, "the required `iss`")
    option(auth, "jwt-audience", None, "the accepted `aud` values, comma-separated")
    option(auth, "jwt-leeway-s", 30.0, "clock skew allowed on exp and nbf", float)
    option(auth, "jwt-subject-claim", "sub", "the claim naming the subject")
    option(
        auth,
        "auth-header",
        "X-Forwarded-User",
        "trusted-header: the header naming the subject; only safe when the proxy in front "
        "removes it from client requests",
    )
    relay = parser.add_argument_group("the connection to the relay")
    option(
        relay,
        "relay-token",
        None,
        "the relay's service token; give it in the environment, not here",
    )
    option(relay, "relay-token-file", None, "a file holding the relay's service token")
    option(
        relay,
        "relay-tls-ca",
        None,
        "TLS to the relay: PEM CA certificates trusted to sign its certificate",
    )
    option(relay, "relay-tls-cert", None, "mutual TLS: this gateway's PEM certificate chain")
    option(relay, "relay-tls-key", None, "mutual TLS: its PEM private key")
    option(
        relay,
        "relay-tls-server-name",
        None,
        "the name the relay's certificate must carry, when not the --relay host",
    )
    option(
        parser,
        "log-level",
        "info",
        "the least severe log lines written (any case)",
        str.lower,
        choices=logs.LEVELS,
    )
    option(
        parser,
        "log-format",
        "json",
        "json: one JSON object per line (for collectors); text: a line per record with its "
        "fields as key=value (for a terminal)",
        choices=logs.FORMATS,
    )
    option(parser, "event-loop", loops.DEFAULT, loops.HELP, choices=loops.LOOPS)
    args = parser.parse_args(argv)
    if args.allowed_hosts is None:
        args.allowed_hosts = [env.get("GATEWAY_ALLOWED_HOSTS", "")]
    return args


def settings_of(args: argparse.Namespace) -> GatewaySettings:
    """The settings the flags describe (the relay's address is settled in `serve`). Raises
    ConfigError for a configuration that cannot work."""
    if args.max_sse_per_subject < 1 or args.max_sse_total < 1:
        raise ConfigError("--max-sse-per-subject and --max-sse-total must be at least 1")
    tls = None
    if args.relay_tls_ca or args.relay_tls_cert or args.relay_tls_key or args.relay_tls_server_name:
        tls = ClientTLS(
            args.relay_tls_ca, args.relay_tls_cert, args.relay_tls_key, args.relay_tls_server_name
        )
        try:
            tls.credentials()  # reads the files now: a wrong path fails here, not per call
        except ValueError as exc:
            raise ConfigError(f"--relay-tls: {exc}") from None
    token = args.relay_token
    if args.relay_token_file:
        if token is not None:
            raise ConfigError("give the relay's token once: --relay-token or --relay-token-file")
        try:
            token = Path(args.relay_token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"cannot read --relay-token-file {args.relay_token_file!r}: {exc.strerror}"
            ) from None
    if token is not None:
        try:
            check_token(token)
        except ValueError as exc:
            raise ConfigError(f"the relay token: {exc}") from None
    policy = stream_policy_of(args)
    hosts = split_list(args.allowed_hosts) or default_allowed_hosts(args.address)
    try:
        origins = tuple(normalized_origin(o) for o in args.cors_origin)
    except ValueError as exc:
        raise ConfigError(f"--cors-origin: {exc}") from None
    return GatewaySettings(
        max_body_bytes=args.max_body_bytes,
        keepalive_s=args.keepalive_s,
        on_live_stream=args.on_live_stream,
        relay_reads=args.relay_reads,
        resume_replay=args.resume_replay,
        cors_origins=origins,
        body_timeout_s=args.body_timeout_s,
        relay_reconnect_s=args.relay_reconnect_s,
        relay_token=token,
        relay_tls=tls,
        auth=AuthConfig(
            mode=args.auth,
            jwt_key_file=args.jwt_key_file,
            jwt_secret_file=args.jwt_secret_file,
            jwt_jwks_file=args.jwt_jwks_file,
            jwt_jwks_url=args.jwt_jwks_url,
            jwt_jwks_cache_s=args.jwt_jwks_cache_s,
            jwt_algorithms=split_list(args.jwt_algorithms),
            jwt_issuer=args.jwt_issuer,
            jwt_audience=split_list(args.jwt_audience),
            jwt_leeway_s=args.jwt_leeway_s,
            jwt_subject_claim=args.jwt_subject_claim,
            header=args.auth_header,
        ),
        allowed_hosts=hosts,
        max_sse_per_subject=args.max_sse_per_subject,
        max_sse_total=args.max_sse_total,
        stream_policy=policy,
        trace_context_from_clients=args.trace_context_from_clients,
    )


def stream_policy_of(args: argparse.Namespace) -> StreamPolicy | None:
    """The policy the --stream-* flags set on every Start; None when none is given."""
    values = {
        "no_reader_grace_s": args.stream_no_reader_grace_s,
        "max_duration_s": args.stream_max_duration_s,
        "max_chunks": args.stream_max_chunks,
        "retention_s": args.stream_retention_s,
    }
    for name, value in values.items():
        if value is not None and not (math.isfinite(value) and value > 0):
            flag = "--stream-" + name.replace("_", "-")
            raise ConfigError(f"{flag} must be a positive, finite number; got {value}")
    if all(value is None for value in values.values()):
        return None
    return StreamPolicy(**values)


async def serve(args: argparse.Namespace, settings: GatewaySettings, verifier: Verifier) -> None:
    relay_target = args.relay or "127.0.0.1:50051"
    embedded: RunningServer | None = None
    relay = None
    if args.embedded_relay:
        # The embedded relay reads its RELAY_* variables; --relay (GATEWAY_RELAY), when given,
        # wins. A bad one stops the gateway naming this program.
        config = parse_config(
            [] if args.relay is None else ["--address", args.relay], prog="stream-relay-gateway"
        )
        # Its RELAY_TOKENS / RELAY_TLS_* hold as for a relay of its own (checked before the
        # store opens); the gateway reaches it with --relay-token and --relay-tls-*.
        security = load_security(config)
        relay = await open_relay(config)
        embedded = await start_server(relay, config.address, security=security)
        relay_target = f"{config.address.rsplit(':', 1)[0]}:{embedded.port}"
        relay_grace = config.shutdown_grace_s
        log.info("embedded relay listening", extra={"address": relay_target, "db": config.db})
    settings = dataclasses.replace(settings, relay_target=relay_target)
    host, port = args.address.rsplit(":", 1)
    app = create_app(settings, verifier=verifier)
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
        extra={
            "address": args.address,
            "relay": relay_target,
            "relay_tls": settings.relay_tls is not None,
            "relay_token": settings.relay_token is not None,
            "allowed_hosts": ",".join(settings.allowed_hosts),
            "cors_origins": ",".join(settings.cors_origins),
            "demo": f"http://{args.address}/",
            **describe(settings.auth),
        },
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
            await relay.close(grace=relay_grace)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    try:
        settings = settings_of(args)
        verifier = build_verifier(settings.auth)
    except ConfigError as exc:
        log.critical(str(exc))
        raise SystemExit(f"stream-relay-gateway: {exc}") from None
    try:
        # Off unless OTEL_* variables say (README, "Tracing"); the embedded relay shares it.
        tracing.configure(tracing.GATEWAY_SERVICE)
        loops.run(serve(args, settings, verifier), args.event_loop)
    except FATAL as exc:  # e.g. the embedded relay's store or producers file is bad
        log.critical(str(exc))
        raise SystemExit(f"stream-relay-gateway: {exc}") from None
    finally:
        tracing.shutdown()  # exports the spans still buffered


if __name__ == "__main__":
    main()
