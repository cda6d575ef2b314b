"""Request bodies: read within a size bound, parsed as JSON, checked for shape.

The relay checks content (roles, parts, sizes); the gateway refuses what is not even the right
shape, so malformed input never reaches it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from gateway.errors import HttpError
from relay.model import ROLES, UIMessage, load_json

TRIGGERS = ("submit-message", "regenerate-message")


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
    try:
        value = load_json(body)
    except ValueError as exc:
        raise HttpError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise HttpError(400, "invalid_json", "the body must be a JSON object")
    return value


def _too_large(max_bytes: int) -> HttpError:
    return HttpError(413, "too_large", f"the request body is over the {max_bytes}-byte limit")


def parse_chat_request(body: dict[str, Any]) -> ChatRequest:
    chat_id = _string(body, "id", required=True)
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
    return ChatRequest(
        chat_id,
        messages,
        replace_history,
        producer=_string(body, "producer"),
        options={k: str(v) for k, v in options.items()},
    )


def parse_stop_body(body: dict[str, Any]) -> StopBody:
    partial = body.get("assistantMessage")
    return StopBody(
        stream_id=_string(body, "activeStreamId"),
        partial=None if partial is None else parse_message(partial, "assistantMessage"),
    )


def parse_message(value: Any, where: str) -> UIMessage:
    if not isinstance(value, dict):
        raise _bad(f"{where} must be a UI message object")
    message_id, role = value.get("id"), value.get("role")
    parts, metadata = value.get("parts"), value.get("metadata")
    if not isinstance(message_id, str) or not message_id:
        raise _bad(f"{where}.id must be a non-empty string")
    if role not in ROLES:
        raise _bad(f"{where}.role must be one of {', '.join(ROLES)}")
    if not isinstance(parts, list):
        raise _bad(f"{where}.parts must be an array")
    if metadata is not None and not isinstance(metadata, dict):
        raise _bad(f"{where}.metadata must be an object")
    return UIMessage(message_id, role, parts, metadata)


def _string(body: dict[str, Any], key: str, *, required: bool = False) -> str:
    value = body.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise _bad(f"`{key}` must be a{' non-empty' if required else ''} string")
    return value


def _bad(message: str) -> HttpError:
    return HttpError(400, "invalid_request", message)
