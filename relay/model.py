"""The relay's vocabulary: plain, immutable values shared by the domain, store and service."""

from __future__ import annotations

import enum
import json
import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import orjson

from relay.errors import InvalidArgument

JsonObject = dict[str, Any]

ROLES = ("system", "user", "assistant")


class StreamState(enum.Enum):
    LIVE = "live"
    COMPLETED = "completed"
    STOPPED = "stopped"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


class StopOutcome(enum.Enum):
    STOPPED = "stopped"
    ALREADY_ENDED = "already_ended"
    NO_ACTIVE_STREAM = "no_active_stream"
    NOT_ACTIVE = "not_active"


@dataclass(frozen=True, slots=True)
class UIMessage:
    """An AI SDK UIMessage: `parts` are UI message part objects, each with a string `type`."""

    id: str
    role: str
    parts: list[JsonObject]
    metadata: JsonObject | None = None

    def to_json(self) -> JsonObject:
        out: JsonObject = {"id": self.id, "role": self.role, "parts": self.parts}
        if self.metadata is not None:
            out["metadata"] = self.metadata
        return out


@dataclass(frozen=True, slots=True)
class ChunkBatch:
    """Consecutive chunks of a stream; chunk i has offset `first_offset + i`."""

    first_offset: int
    chunks: list[str]


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """How a stream ended; every reader of the stream receives this same value."""

    state: StreamState
    final_offset: int
    error_message: str = ""
    message: UIMessage | None = None


@dataclass(frozen=True, slots=True)
class Attached:
    """An accepted Attach: the stream it reads (useful when attached by chat) and its events."""

    stream_id: str
    events: AsyncGenerator[ChunkBatch | StreamEnd, None]


@dataclass(frozen=True, slots=True)
class StartResult:
    stream_id: str
    deduplicated: bool = False
    superseded_stream_id: str = ""


@dataclass(frozen=True, slots=True)
class StopResult:
    outcome: StopOutcome
    stream_id: str = ""
    end: StreamEnd | None = None


@dataclass(frozen=True, slots=True)
class ActiveStream:
    stream_id: str
    state: StreamState
    offset: int


@dataclass(frozen=True, slots=True)
class RelayStats:
    live_streams: int
    retained_streams: int
    readers: int
    buffered_chunks: int


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on every input (DESIGN §7). Crossing one is a clear error, never a silent loss."""

    chat_id_max_chars: int = 128
    message_max_bytes: int = 1_000_000
    messages_per_request_max: int = 1_000
    options_max: int = 32
    option_value_max_chars: int = 1_024
    chunk_max_bytes: int = 1_000_000
    stream_max_chunks: int = 1_000_000
    stream_max_bytes: int = 64 * 1024 * 1024
    readers_per_stream_max: int = 1_000
    readers_per_call_max: int = 10_000  # AttachMany subscriptions at once on one call
    live_streams_max: int = 10_000
    attach_batch_max: int = 512
    request_max_bytes: int = 16 * 1024 * 1024


_CHAT_ID = re.compile(r"[A-Za-z0-9._:@-]+")
_STREAM_ID = re.compile(r"[0-9a-f]{32}")


def check_chat_id(chat_id: str, limits: Limits) -> str:
    if not chat_id:
        raise InvalidArgument("chat_id is required")
    if len(chat_id) > limits.chat_id_max_chars:
        raise InvalidArgument(
            f"chat_id is {len(chat_id)} characters; the limit is {limits.chat_id_max_chars}"
        )
    if not _CHAT_ID.fullmatch(chat_id):
        raise InvalidArgument("chat_id may hold only letters, digits and . _ : @ -")
    return chat_id


def is_stream_id(value: str) -> bool:
    return _STREAM_ID.fullmatch(value) is not None


def parse_message(
    message_id: str, role: str, parts_json: str, metadata_json: str, limits: Limits
) -> UIMessage:
    """Builds a UIMessage from its wire fields, refusing anything malformed or oversized."""
    where = f"message {message_id!r}" if message_id else "a message"
    if not message_id:
        raise InvalidArgument("every message needs an id")
    if len(message_id) > 256:
        raise InvalidArgument(f"{where}: id is longer than 256 characters")
    if role not in ROLES:
        raise InvalidArgument(f"{where}: role must be one of {', '.join(ROLES)}")
    size = len(parts_json.encode()) + len(metadata_json.encode())
    if size > limits.message_max_bytes:
        raise InvalidArgument(f"{where} is {size} bytes; the limit is {limits.message_max_bytes}")
    parts = _load_json(parts_json, where, "parts_json")
    if not isinstance(parts, list) or not all(
        isinstance(p, dict) and isinstance(p.get("type"), str) for p in parts
    ):
        raise InvalidArgument(f"{where}: parts_json must be a JSON array of objects with a 'type'")
    metadata = None
    if metadata_json:
        metadata = _load_json(metadata_json, where, "metadata_json")
        if not isinstance(metadata, dict):
            raise InvalidArgument(f"{where}: metadata_json must be a JSON object")
    return UIMessage(id=message_id, role=role, parts=parts, metadata=metadata)


def _load_json(text: str, where: str, name: str) -> Any:
    try:
        return load_json(text)
    except ValueError as exc:
        raise InvalidArgument(f"{where}: {name} is not valid JSON ({exc})") from None


# orjson does the work (chunks are encoded once each on the hot path, and it is several times
# faster than the json module); the json module takes over for the few values orjson refuses,
# integers beyond 64 bits, so that nothing valid is rejected.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def dump_json_bytes(value: Any) -> bytes:
    """Compact UTF-8 JSON, the form chunks and messages are stored and sent in."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return _ENCODER.encode(value).encode()


def dump_json(value: Any) -> str:
    return dump_json_bytes(value).decode()


def load_json(text: str | bytes | bytearray) -> Any:
    """Parses JSON; raises ValueError (the json module's message) if it is not valid."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text, parse_constant=_refuse_constant)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


@dataclass(slots=True)
class StartRequest:
    """A domain Start call; the service fills it from the RPC."""

    chat_id: str
    messages: list[UIMessage] = field(default_factory=list)
    replace_history: bool = False
    producer: str = ""
    options: dict[str, str] = field(default_factory=dict)
    supersede: bool = False
    request_id: str = ""
