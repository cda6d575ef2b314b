"""stream-relay-ctl: look at and act on a running relay from a shell, when grpcurl is not at hand.

    stream-relay-ctl active chat-1                  # the chat's active stream, its state, length
    stream-relay-ctl tail --chat chat-1 --from 10   # its chunks from offset 10, live, then the end
    stream-relay-ctl tail --stream 9f3c... --replay compact
    stream-relay-ctl stop chat-1                    # the explicit stop; prints the receipt
    stream-relay-ctl messages chat-1                # the persisted messages
    stream-relay-ctl stats                          # the relay's counters

Every answer is one JSON object per line on stdout, for people and for `jq` alike. `tail` prints
one line per chunk, `{"offset": n, "chunk": {...}}` (for a compacted chunk, the offset of the last
chunk it stands for), then `{"streamId": ..., "end": {...}}`. A call the relay refuses prints its
status on stderr and exits 1; bad arguments exit 2.

The relay's address, its service token and TLS come from flags or the environment, as the
gateway's do: RELAY_CTL_TARGET, RELAY_CTL_TOKEN (a token that may act for others can name a
subject with --subject), RELAY_CTL_TLS_CA / _CERT / _KEY.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from relay.client import ClientTLS, RelayClient
from relay.client.errors import RelayError
from relay.domain.model import (
    ChunkBatch,
    JsonObject,
    ReplayMode,
    StreamEnd,
    UIMessage,
    load_json,
)
from relay.flags import env_option

PROG = "stream-relay-ctl"


def parse_args(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Any:
    env = os.environ if env is None else env
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )

    def option(name: str, default: object, help_text: str, kind: type = str) -> None:
        env_option(parser, parser, env, "RELAY_CTL_", name, default, help_text, kind)

    option("target", "127.0.0.1:50051", "the relay's gRPC address")
    option("token", None, "the relay's service token (better in the environment)")
    option("subject", None, "the subject to act for (a token that may act for others)")
    option("tls-ca", None, "CA certificates to check the relay's TLS certificate against")
    option("tls-cert", None, "a client certificate, for a relay that requires one")
    option("tls-key", None, "the client certificate's key")
    option("tls-server-name", None, "the name the relay's certificate must carry, if not the host")
    option("timeout-s", 10.0, "how long a call may take (tail: until its first event)", float)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    active = commands.add_parser("active", help="the chat's active stream")
    active.add_argument("chat_id")
    tail = commands.add_parser("tail", help="a stream's chunks from an offset, live, then its end")
    target = tail.add_mutually_exclusive_group(required=True)
    target.add_argument("--chat", dest="chat_id", default="", help="the chat's active stream")
    target.add_argument("--stream", dest="stream_id", default="", help="a stream by id")
    tail.add_argument("--from", dest="from_offset", type=int, default=0, help="first offset")
    tail.add_argument(
        "--replay",
        choices=[mode.value for mode in ReplayMode],
        default=ReplayMode.EXACT.value,
        help="how what the stream holds already is sent (default: exact)",
    )
    stop = commands.add_parser("stop", help="stop the chat's active stream; prints the receipt")
    stop.add_argument("chat_id")
    stop.add_argument("--stream", dest="stream_id", default="", help="only if it is this one")
    messages = commands.add_parser("messages", help="the chat's persisted messages")
    messages.add_argument("chat_id")
    commands.add_parser("stats", help="the relay's counters")
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    return args


def _message(message: UIMessage | None) -> JsonObject | None:
    return None if message is None else message.to_json()


def _end(end: StreamEnd) -> JsonObject:
    return {
        "state": end.state.value,
        "reason": end.reason.label,
        "finalOffset": end.final_offset,
        "error": end.error_message or None,
        "message": _message(end.message),
    }


def _print(value: JsonObject) -> None:
    # Escaped where the terminal cannot show what an answer holds (a non-UTF-8 locale).
    utf8 = (sys.stdout.encoding or "").lower().replace("-", "") == "utf8"
    print(json.dumps(value, ensure_ascii=not utf8), flush=True)


async def run(args: Any) -> None:
    subject, timeout = args.subject, args.timeout_s
    async with _client(args) as relay:
        if args.command == "active":
            active = await relay.get_active(args.chat_id, subject=subject, timeout=timeout)
            _print(
                {"chatId": args.chat_id, "streamId": None, "state": None, "offset": None}
                if active is None
                else {
                    "chatId": args.chat_id,
                    "streamId": active.stream_id,
                    "state": active.state.value,
                    "offset": active.offset,
                }
            )
        elif args.command == "tail":
            await _tail(relay, args)
        elif args.command == "stop":
            result = await relay.stop(
                args.chat_id, args.stream_id, subject=subject, timeout=timeout
            )
            _print(
                {
                    "outcome": result.outcome.value,
                    "streamId": result.stream_id or None,
                    "end": None if result.end is None else _end(result.end),
                    "usage": result.usage,
                }
            )
        elif args.command == "messages":
            listed = await relay.list_messages(args.chat_id, subject=subject, timeout=timeout)
            _print({"chatId": args.chat_id, "messages": [m.to_json() for m in listed]})
        else:
            stats = await relay.get_stats(timeout=timeout)
            _print(
                {
                    "liveStreams": stats.live_streams,
                    "retainedStreams": stats.retained_streams,
                    "readers": stats.readers,
                    "bufferedChunks": stats.buffered_chunks,
                    "endedByReason": stats.ended_by_reason,
                }
            )


def _client(args: Any) -> RelayClient:
    """The client the flags describe; ConfigError for a token or TLS file that cannot work."""
    tls = None
    if args.tls_ca or args.tls_cert or args.tls_server_name:
        tls = ClientTLS(
            ca=Path(args.tls_ca) if args.tls_ca else None,
            cert=Path(args.tls_cert) if args.tls_cert else None,
            key=Path(args.tls_key) if args.tls_key else None,
            server_name=args.tls_server_name,
        )
    try:
        return RelayClient(args.target, token=args.token or None, tls=tls)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


class ConfigError(Exception):
    """A token or a TLS file that cannot work: exit 2, as for bad arguments."""


async def _tail(relay: RelayClient, args: Any) -> None:
    async with asyncio.timeout(args.timeout_s):  # only until the relay accepts the Attach
        attached = await relay.open_attach(
            stream_id=args.stream_id,
            chat_id=args.chat_id,
            from_offset=args.from_offset,
            replay=ReplayMode(args.replay),
            subject=args.subject,
        )
    async with contextlib.aclosing(attached.events) as events:
        async for event in events:
            if isinstance(event, ChunkBatch):
                for index, chunk in enumerate(event.chunks):
                    _print({"offset": event.offset_of(index), "chunk": load_json(chunk)})
            else:
                _print({"streamId": attached.stream_id, "end": _end(event)})


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        asyncio.run(run(args))
    except RelayError as exc:
        print(f"{PROG}: {exc.code}: {exc.message}", file=sys.stderr)
        sys.exit(1)
    except TimeoutError:
        print(f"{PROG}: no answer within {args.timeout_s:g} s", file=sys.stderr)
        sys.exit(1)
    except ConfigError as exc:  # a token or TLS file that cannot work
        print(f"{PROG}: {exc}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # `tail | head`: the reader ends, quietly (no flush error at exit)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except KeyboardInterrupt:  # Ctrl-C ends this reader only; the producer goes on
        sys.exit(0)


if __name__ == "__main__":
    main()
