"""Request bodies: read within a size bound, parsed as JSON, checked for shape.

The relay checks content (roles, parts, sizes); the gateway refuses what is not even the right
shape, so malformed input never reaches it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.requests import Request

from gateway.errors import HttpError
from relay.domain.model import ROLES, ReplayMode, UIMessage

TRIGGERS = ("submit-message", "regenerate-message")

# Bounds on what the gateway sends the relay, so that nothing it sends can come back as an
# oversized error message: identifiers the relay may quote in an error are short.
JSON_MAX_DEPTH = 100  # a body nests objects and arrays this deep at most
CHAT_ID_MAX_CHARS = 128
MESSAGE_ID_MAX_CHARS = 256
STREAM_ID_MAX_CHARS = 64
PRODUCER_MAX_CHARS = 128
OPTION_KEY_MAX_CHARS = 128
OPTION_VALUE_MAX_CHARS = 1024
IDEMPOTENCY_KEY_MAX_CHARS = 128
INT64_MAX = 2**63 - 1


@dataclass(frozen=True, slots=True)
class ChatRequest:
    chat_id: str
    messages: list[UIMessage]
    replace_history: bool  # `messages` is the whole history (vs. `message`, only the newest)
    producer: str = ""
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StopBody:
    stream_id: str = ""
    partial: UIMessage | None = None
    # The chat POST this stop means, which may not have reached the relay yet: its
    # Idempotency-Key, or the id of the user message it sends.
    request_id: str = ""
    message_id: str = ""


async def read_json(request: Request, max_bytes: int, *, optional: bool = False) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > max_bytes:
            raise _too_large(max_bytes)
    if not body.strip():
        if optional:
            return {}
        raise HttpError(400, "invalid_json", "the request body is empty; a JSON object is needed")
    value = parse_json(bytes(body))
    if not isinstance(value, dict):
        raise HttpError(400, "invalid_json", "the body must be a JSON object")
    return value


def parse_json(body: bytes) -> Any:
    """Strict JSON: UTF-8, no lone surrogates, at most JSON_MAX_DEPTH levels deep; else a 400."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        # orjson refuses integers beyond 64 bits, which are valid JSON; the json module takes
        # those, and says where the text is wrong when it is.
        try:
            text = body.decode("utf-8")
            value = json.loads(text, parse_constant=_refuse_constant)
        except UnicodeDecodeError:
            raise _invalid_json("the body is not UTF-8") from None
        except RecursionError:
            raise _invalid_json(f"the body nests deeper than {JSON_MAX_DEPTH} levels") from None
        except ValueError as exc:  # JSONDecodeError, and integers over Python's digit limit
            raise _invalid_json(f"the body is not valid JSON: {str(exc)[:200]}") from None
    _check_json(value)
    return value


def _check_json(value: Any) -> None:
    """Depth and strings, without recursion (the value may be deep)."""
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, str):
            _check_text(item)
        elif isinstance(item, dict | list):
            if depth > JSON_MAX_DEPTH:
                raise _invalid_json(f"the body nests deeper than {JSON_MAX_DEPTH} levels")
            if isinstance(item, dict):
                for key, inner in item.items():
                    _check_text(key)
                    pending.append((inner, depth + 1))
            else:
                pending.extend((inner, depth + 1) for inner in item)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid_json("the body holds a lone surrogate in a string") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _invalid_json(message: str) -> HttpError:
    return HttpError(400, "invalid_json", message)


def _too_large(max_bytes: int) -> HttpError:
    return HttpError(413, "too_large", f"the request body is over the {max_bytes}-byte limit")


def parse_chat_request(body: dict[str, Any]) -> ChatRequest:
    chat_id = _string(body, "id", required=True, max_chars=CHAT_ID_MAX_CHARS)
    trigger = body.get("trigger", "submit-message")
    if trigger not in TRIGGERS:
        raise _bad(f"trigger must be one of {', '.join(TRIGGERS)}")
    if "messages" in body:
        raw = body["messages"]
        if not isinstance(raw, list):
            raise _bad("messages must be an array of UI messages")
        messages = [parse_message(m, f"messages[{i}]") for i, m in enumerate(raw)]
        replace_history = True
    elif "message" in body:
        messages = [parse_message(body["message"], "message")]
        replace_history = False
    else:
        raise _bad("the body needs `messages` (the history) or `message` (the newest one)")
    options = body.get("options", {})
    if not isinstance(options, dict) or not all(
        isinstance(k, str) and isinstance(v, str | int | float) for k, v in options.items()
    ):
        raise _bad("options must be an object of strings or numbers")
    values = {k: _number_text(v) if not isinstance(v, str) else v for k, v in options.items()}
    for key, value in values.items():
        if not key or len(key) > OPTION_KEY_MAX_CHARS:
            raise _bad(f"an option name must be 1 to {OPTION_KEY_MAX_CHARS} characters")
        if len(value) > OPTION_VALUE_MAX_CHARS:
            raise _bad(f"an option value must be at most {OPTION_VALUE_MAX_CHARS} characters")
    return ChatRequest(
        chat_id,
        messages,
        replace_history,
        producer=_string(body, "producer", max_chars=PRODUCER_MAX_CHARS),
        options=values,
    )


def _number_text(value: float) -> str:
    text = str(value)
    if len(text) > OPTION_VALUE_MAX_CHARS:  # a huge integer: str() of it is the bound's problem
        raise _bad(f"an option value must be at most {OPTION_VALUE_MAX_CHARS} characters")
    return text


def parse_stop_body(body: dict[str, Any]) -> StopBody:
    partial = body.get("assistantMessage")
    return StopBody(
        stream_id=_string(body, "activeStreamId", max_chars=STREAM_ID_MAX_CHARS),
        partial=None if partial is None else parse_message(partial, "assistantMessage"),
        request_id=_string(body, "requestId", max_chars=IDEMPOTENCY_KEY_MAX_CHARS),
        message_id=_string(body, "messageId", max_chars=MESSAGE_ID_MAX_CHARS),
    )


def parse_message(value: Any, where: str) -> UIMessage:
    if not isinstance(value, dict):
        raise _bad(f"{where} must be a UI message object")
    message_id, role = value.get("id"), value.get("role")
    parts, metadata = value.get("parts"), value.get("metadata")
    if not isinstance(message_id, str) or not message_id:
        raise _bad(f"{where}.id must be a non-empty string")
    if len(message_id) > MESSAGE_ID_MAX_CHARS:
        raise _bad(f"{where}.id is longer than {MESSAGE_ID_MAX_CHARS} characters")
    if role not in ROLES:
        raise _bad(f"{where}.role must be one of {', '.join(ROLES)}")
    if not isinstance(parts, list):
        raise _bad(f"{where}.parts must be an array")
    if metadata is not None and not isinstance(metadata, dict):
        raise _bad(f"{where}.metadata must be an object")
    return UIMessage(message_id, role, parts, metadata)


def _string(
    body: dict[str, Any], key: str, *, required: bool = False, max_chars: int = 1024
) -> str:
    value = body.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise _bad(f"`{key}` must be a{' non-empty' if required else ''} string")
    if len(value) > max_chars:
        raise _bad(f"`{key}` is longer than {max_chars} characters")
    return value


def parse_last_event_id(header: str | None) -> int:
    """The offset to resume from: 0 without the header, else the chunk after the one named.

    Only ASCII digits are an offset (`str.isdigit` also takes `²`); an offset no stream can reach
    (past int64) is `out_of_range`, as the relay answers for an offset past a stream's end.
    """
    if header is None:
        return 0
    if not (header.isascii() and header.isdigit()):
        raise _bad("Last-Event-ID must be a chunk offset: a non-negative integer")
    if len(header) > 19 or int(header) >= INT64_MAX:
        raise HttpError(400, "out_of_range", "Last-Event-ID is past the end of any stream")
    return int(header) + 1


# `?replay=` of the resume route: how what the answer holds already is sent.
REPLAY_MODES = {
    "compact": ReplayMode.COMPACT,  # each part's deltas merged; parses from an empty message
    "plain": ReplayMode.PART_SAFE,  # one by one; from Last-Event-ID, a snapshot first
    "exact": ReplayMode.EXACT,  # from Last-Event-ID as stored, for a client keeping its state
}


def parse_replay(value: str | None, default: str) -> ReplayMode:
    if value is None:
        return REPLAY_MODES[default]
    mode = REPLAY_MODES.get(value)
    if mode is None:
        raise _bad(f"replay must be one of {', '.join(REPLAY_MODES)}")
    return mode


def idempotency_key(header: str | None) -> str:
    if header is not None and len(header) > IDEMPOTENCY_KEY_MAX_CHARS:
        raise _bad(f"Idempotency-Key is longer than {IDEMPOTENCY_KEY_MAX_CHARS} characters")
    return header or ""


def _bad(message: str) -> HttpError:
    return HttpError(400, "invalid_request", message)
