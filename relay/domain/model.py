"""The relay's vocabulary: plain, immutable values shared by the domain, store and service."""

from __future__ import annotations

import enum
import json
import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import orjson

from relay.domain.errors import InvalidArgument

JsonObject = dict[str, Any]

ROLES = ("system", "user", "assistant")


class StreamState(enum.Enum):
    LIVE = "live"
    COMPLETED = "completed"
    STOPPED = "stopped"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


class EndReason(enum.Enum):
    """Why a stream ended (relay.proto's EndReason); the value is what stores and metrics keep."""

    UNSPECIFIED = ""  # not recorded: ended by a relay that did not record reasons
    FINISHED = "finished"  # COMPLETED
    STOP = "stop"  # STOPPED by a Stop call
    SUPERSEDED = "superseded"  # STOPPED by a Start with supersede
    STOPPED_BEFORE_START = "stopped_before_start"  # STOPPED: its Stop came first
    NO_READER = "no_reader"  # STOPPED by the orphan policy
    MAX_DURATION = "max_duration"  # STOPPED by the orphan policy
    MAX_CHUNKS = "max_chunks"  # STOPPED by the orphan policy
    PRODUCER_FAILED = "producer_failed"  # FAILED
    LIMIT = "limit"  # FAILED: a relay limit
    SHUTDOWN = "shutdown"  # INTERRUPTED
    RELAY_LOST = "relay_lost"  # INTERRUPTED: its relay crashed or lost its lease

    @classmethod
    def stored(cls, value: str | None) -> EndReason:
        """The reason a store or log kept as `value`. None, "" (a row from before reasons were
        recorded) and a value this relay does not know (a newer relay's) read as UNSPECIFIED."""
        try:
            return cls(value or "")
        except ValueError:
            return cls.UNSPECIFIED

    @property
    def label(self) -> str:
        """Its name for clients and metrics: the proto name without its prefix, lower case
        ("stop", "stopped_before_start", "unspecified")."""
        return self.name.lower()


class StopOutcome(enum.Enum):
    STOPPED = "stopped"
    ALREADY_ENDED = "already_ended"
    NO_ACTIVE_STREAM = "no_active_stream"
    NOT_ACTIVE = "not_active"
    STOPPED_BEFORE_START = "stopped_before_start"


class ReplayMode(enum.Enum):
    """How an Attach sends what the stream already holds (relay.proto's ReplayMode)."""

    EXACT = "exact"  # every chunk from the offset, as stored
    PART_SAFE = "part-safe"  # a resume past 0 starts with a snapshot of the message so far
    COMPACT = "compact"  # part-safe, and what is there already is sent with its deltas merged


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
    """Consecutive chunks of a stream; chunk i has offset `first_offset + i`. A compacted or
    part-safe replay sends chunks that stand for several: then `offsets` holds, for each chunk,
    the offset of the last stream chunk it covers."""

    first_offset: int
    chunks: list[str]
    offsets: list[int] | None = None

    def offset_of(self, index: int) -> int:
        """The offset of the last stream chunk that chunk `index` stands for (its SSE id)."""
        return self.offsets[index] if self.offsets is not None else self.first_offset + index

    @property
    def next_offset(self) -> int:
        """Where a reader that got this batch resumes."""
        if self.offsets is not None:
            return self.offsets[-1] + 1 if self.offsets else self.first_offset
        return self.first_offset + len(self.chunks)


ERROR_MESSAGE_MAX_CHARS = 4_096  # a stream's failure reason, as stored and sent to readers


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """How a stream ended; every reader of the stream receives this same value.

    `error_message` is made storable and sendable on construction: lone surrogates (a producer's
    exception text may hold them) become U+FFFD and it is cut to ERROR_MESSAGE_MAX_CHARS.
    """

    state: StreamState
    final_offset: int
    error_message: str = ""
    message: UIMessage | None = None
    reason: EndReason = EndReason.UNSPECIFIED

    def __post_init__(self) -> None:
        text = self.error_message
        if not text.isascii() or len(text) > ERROR_MESSAGE_MAX_CHARS:
            text = valid_text(text)
            if len(text) > ERROR_MESSAGE_MAX_CHARS:
                text = text[: ERROR_MESSAGE_MAX_CHARS - 1] + "…"
            object.__setattr__(self, "error_message", text)


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
    stopped_before_start: bool = False  # a Stop naming this Start came first: already STOPPED


@dataclass(frozen=True, slots=True)
class StopResult:
    outcome: StopOutcome
    stream_id: str = ""
    end: StreamEnd | None = None

    @property
    def usage(self) -> JsonObject | None:
        """The producer's usage report so far: the `usage` object of the message's metadata."""
        message = self.end.message if self.end is not None else None
        usage = (message.metadata or {}).get("usage") if message is not None else None
        return usage if isinstance(usage, dict) else None


@dataclass(frozen=True, slots=True)
class StreamPolicy:
    """When the relay ends an answer on its own, and how long it keeps it after (relay.proto's
    StreamPolicy). None: the relay's default."""

    no_reader_grace_s: float | None = None
    max_duration_s: float | None = None
    max_chunks: int | None = None
    retention_s: float | None = None


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
    ended_by_reason: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a call acts for, as the service layer authenticated it.

    `subject` owns the chats its Starts create: every other call on such a chat by another
    subject is refused as if the chat did not exist. "" is the anonymous subject (no
    authentication configured, or a gateway in anonymous mode). `profiles` are the producer
    profiles the caller's credentials may start (None: any)."""

    subject: str = ""
    profiles: frozenset[str] | None = None


ANONYMOUS = Caller()


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on every input (DESIGN §7). Crossing one is a clear error, never a silent loss."""

    chat_id_max_chars: int = 128
    producer_name_max_chars: int = 128
    option_key_max_chars: int = 128
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
    # Per subject, on this relay (the anonymous subject "" has only the relay-wide limits):
    # live answers at once, and Starts in any 60 seconds.
    live_streams_per_subject_max: int = 32
    starts_per_subject_per_minute: int = 120
    # Chunk bytes held in memory over all retained streams: an answer that would pass it fails,
    # and past nine tenths of it Starts are refused until retention frees some.
    buffered_bytes_max: int = 4 << 30
    attach_batch_max: int = 512
    request_max_bytes: int = 16 * 1024 * 1024
    # Arrays and objects inside one another in a message's parts or metadata. Keep it well under
    # 255: deeper values are refused by orjson's encoder and the json module's recurses.
    json_depth_max: int = 64


SHOWN_MAX_CHARS = 64


def shown(value: object, limit: int = SHOWN_MAX_CHARS) -> str:
    """A client-supplied value as an error message may quote it: repr() (so lone surrogates and
    control characters are escaped), cut to about `limit` characters with an ellipsis. Every error
    that echoes a client's value goes through here, so no status detail can grow with the input."""
    if isinstance(value, str) and len(value) > limit:
        return repr(value[:limit]) + f"… ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit + 2 else text[:limit] + "…"


_SURROGATE = re.compile("[\ud800-\udfff]")


def has_surrogate(text: str) -> bool:
    """Whether `text` holds a lone surrogate: not Unicode, so no store, JSON encoder or protobuf
    message will take it."""
    return not text.isascii() and _SURROGATE.search(text) is not None


def valid_text(text: str) -> str:
    """`text` with each lone surrogate replaced by U+FFFD."""
    return _SURROGATE.sub("\ufffd", text) if has_surrogate(text) else text


def check_text(text: str, what: str) -> str:
    """Refuses a client string field holding a lone surrogate (only an in-process caller can send
    one: protobuf refuses them on the wire)."""
    if has_surrogate(text):
        raise InvalidArgument(f"{what} holds a lone surrogate, which is not valid Unicode")
    return text


# The longest subject a call may act for (a JWT `sub`, an email, a proxy's user name).
SUBJECT_MAX_CHARS = 256
_CONTROL = re.compile("[\x00-\x1f\x7f]")


def check_key(text: str, what: str) -> str:
    """Refuses a client's id or key that no store can key by: not Unicode, or holding control
    characters (PostgreSQL text cannot hold a NUL)."""
    check_text(text, what)
    if _CONTROL.search(text):
        raise InvalidArgument(f"{what} holds control characters")
    return text


def check_subject(subject: str) -> str:
    """Refuses a subject no store can key a chat by: too long, or not a key (`check_key`)."""
    if len(subject) > SUBJECT_MAX_CHARS:
        raise InvalidArgument(f"the subject is over {SUBJECT_MAX_CHARS} characters")
    return check_key(subject, "the subject")


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
    where = f"message {shown(message_id)}" if message_id else "a message"
    if not message_id:
        raise InvalidArgument("every message needs an id")
    if len(message_id) > MESSAGE_ID_MAX_CHARS:
        raise InvalidArgument(f"{where}: id is longer than {MESSAGE_ID_MAX_CHARS} characters")
    check_key(message_id, f"{where}: id")
    if role not in ROLES:
        raise InvalidArgument(f"{where}: role must be one of {', '.join(ROLES)}")
    check_text(parts_json, f"{where}: parts_json")
    check_text(metadata_json, f"{where}: metadata_json")
    size = len(parts_json.encode()) + len(metadata_json.encode())
    if size > limits.message_max_bytes:
        raise InvalidArgument(f"{where} is {size} bytes; the limit is {limits.message_max_bytes}")
    parts = _load_json(parts_json, where, "parts_json", limits.json_depth_max)
    if not isinstance(parts, list) or not all(
        isinstance(p, dict) and isinstance(p.get("type"), str) for p in parts
    ):
        raise InvalidArgument(f"{where}: parts_json must be a JSON array of objects with a 'type'")
    metadata = None
    if metadata_json:
        metadata = _load_json(metadata_json, where, "metadata_json", limits.json_depth_max)
        if not isinstance(metadata, dict):
            raise InvalidArgument(f"{where}: metadata_json must be a JSON object")
    return UIMessage(id=message_id, role=role, parts=parts, metadata=metadata)


def _load_json(text: str, where: str, name: str, max_depth: int) -> Any:
    try:
        return load_json(text, max_depth)
    except ValueError as exc:
        raise InvalidArgument(f"{where}: {name} is not valid JSON ({exc})") from None


# orjson does the work (chunks are encoded once each on the hot path, and it is several times
# faster than the json module); the json module takes over for the few values orjson refuses
# (1e400, integers orjson cannot encode), so that nothing valid is rejected. Neither ever raises
# anything but ValueError: lone surrogates and nesting deeper than either can take are refused
# with a clear message, never a UnicodeEncodeError or a RecursionError.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)

MESSAGE_ID_MAX_CHARS = 256
# orjson's own bound on parsing; the json module's recursion would fail a little deeper.
JSON_DEPTH_MAX = 1024


def dump_json_bytes(value: Any) -> bytes:
    """Compact UTF-8 JSON, the form chunks and messages are stored and sent in. ValueError for
    what no JSON text can hold (lone surrogates) or nesting too deep to encode."""
    try:
        return orjson.dumps(value)
    except TypeError:
        pass
    try:
        return _ENCODER.encode(value).encode()
    except UnicodeEncodeError:
        raise ValueError("a string holds a lone surrogate, which is not valid Unicode") from None
    except RecursionError:
        raise ValueError("the value is nested too deeply to encode as JSON") from None


def dump_json(value: Any) -> str:
    return dump_json_bytes(value).decode()


def load_json(text: str | bytes | bytearray, max_depth: int = JSON_DEPTH_MAX) -> Any:
    """Parses JSON; raises ValueError (with a message a client can act on) if it is not valid,
    holds a lone surrogate (`"\\ud800"`) or nests arrays and objects deeper than `max_depth`."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):
            raise ValueError(f"nested more than {min(max_depth, JSON_DEPTH_MAX)} deep") from None
        if "surrogate" in str(exc):
            raise ValueError(_SURROGATE_IN_JSON) from None
        try:
            value = json.loads(text, parse_constant=_refuse_constant)
        except RecursionError:
            raise ValueError(f"nested more than {min(max_depth, JSON_DEPTH_MAX)} deep") from None
        _check_parsed(value, max_depth, strings=True)
        return value
    if max_depth < JSON_DEPTH_MAX and _may_nest(text, max_depth):
        _check_parsed(value, max_depth, strings=False)
    return value


_SURROGATE_IN_JSON = "a string holds a lone surrogate, which is not valid Unicode"


def _may_nest(text: str | bytes | bytearray, max_depth: int) -> bool:
    # Cheap (C-speed counts): a text with few brackets cannot nest deeply, so most values need
    # no walk at all.
    if isinstance(text, str):
        return text.count("[") + text.count("{") > max_depth
    return text.count(b"[") + text.count(b"{") > max_depth


def _check_parsed(value: Any, max_depth: int, *, strings: bool) -> None:
    """Walks a parsed value without recursion: nesting depth, and (`strings`) lone surrogates."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
            if strings and any(has_surrogate(key) for key in item):
                raise ValueError(_SURROGATE_IN_JSON)
        elif isinstance(item, list):
            children = item
        else:
            if strings and isinstance(item, str) and has_surrogate(item):
                raise ValueError(_SURROGATE_IN_JSON)
            continue
        depth += 1
        if depth > max_depth:
            raise ValueError(f"nested more than {max_depth} deep")
        for child in children:
            if isinstance(child, dict | list) or (strings and isinstance(child, str)):
                stack.append((child, depth))


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
    policy: StreamPolicy = field(default_factory=StreamPolicy)
