"""What an upstream's misbehaviour becomes: `Failure`, the exception whose message the stream
fails with, and `error_text`, the message of an upstream error in the shapes servers send it
(`clip` shortens what is quoted from the upstream)."""

from __future__ import annotations

from typing import Any

from relay.domain.model import dump_json


class Failure(Exception):
    """The upstream misbehaved; the message is what the stream fails with."""


def error_text(error: Any) -> str:
    """The message of an upstream error, in the shapes servers use: OpenAI's
    `{"error": {"message"}}`, `{"error": "..."}`, vLLM's `{"message"}`, FastAPI's `{"detail"}`."""
    if isinstance(error, dict):
        for key in ("error", "message", "detail"):
            value = error.get(key)
            if isinstance(value, str) and value:
                return clip(value)
            if isinstance(value, dict | list) and value:
                return error_text(value)
    if isinstance(error, str) and error:
        return clip(error)
    return clip(dump_json(error))


def clip(text: str, limit: int = 500) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
