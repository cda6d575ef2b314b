"""The gateway's HTTP interface as an OpenAPI 3.1 document, served at GET /openapi.json.

Written by hand (the routes are few and their bodies are the AI SDK's); `tests/test_openapi.py`
keeps it true: every route is described and nothing else is, and the route tests' responses
validate against it. `make fuzz` runs schemathesis against a live gateway with it.
"""

from __future__ import annotations

from typing import Any

from gateway.bodies import (
    CHAT_ID_MAX_CHARS,
    IDEMPOTENCY_KEY_MAX_CHARS,
    MESSAGE_ID_MAX_CHARS,
    OPTION_KEY_MAX_CHARS,
    OPTION_VALUE_MAX_CHARS,
    PRODUCER_MAX_CHARS,
    STREAM_ID_MAX_CHARS,
    TRIGGERS,
)
from relay.domain.model import ROLES, StopOutcome, StreamState

JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": _ref("Error")}}}


ERRORS: dict[str, dict[str, Any]] = {
    "400": _error("Malformed JSON, a wrong type, or input the relay refuses (`invalid_argument`)"),
    "404": _error("No such chat or stream"),
    "408": _error("The request's body did not arrive within the body timeout"),
    "409": _error("The chat's answer is still live (`--on-live-stream refuse`)"),
    "413": _error("The request body is over `--max-body-bytes`"),
    "429": _error("The relay is at a capacity limit; retry later"),
    "502": _error("The relay failed; the message names the gRPC status only"),
    "503": _error("The relay is unreachable"),
    "504": _error("The relay did not answer in time"),
}


def _errors(*codes: str) -> dict[str, dict[str, Any]]:
    return {code: ERRORS[code] for code in codes}


RELAY_ERRORS = ("400", "404", "429", "502", "503", "504")

SSE_HEADERS = {
    "x-vercel-ai-ui-message-stream": {
        "description": "The AI SDK UI message stream protocol version",
        "schema": {"type": "string", "const": "v1"},
    },
    "x-stream-id": {
        "description": "The stream being served; a later stop may name it (`activeStreamId`)",
        "schema": {"type": "string"},
    },
}

SSE_RESPONSE = {
    "description": (
        "The answer as an AI SDK UI message stream: per chunk `id: <offset>` and "
        "`data: <chunk JSON>`, then `data: [DONE]`, then the connection closes. A stopped "
        "stream ends with an `abort` chunk; a failed or interrupted one, a gateway shutting "
        "down or a relay lost mid-stream with an `error` chunk (`errorText`; resume to "
        "continue). Idle streams get `: keep-alive` comments."
    ),
    "headers": SSE_HEADERS,
    "content": {
        "text/event-stream": {
            # One event (as schemathesis reads a stream): `data` a chunk's JSON or [DONE].
            "schema": {
                "type": "object",
                "required": ["data"],
                "properties": {
                    "id": {"type": "string", "pattern": "^[0-9]+$"},
                    "event": {"type": "string"},
                    "data": {"type": "string"},
                },
            }
        }
    },
}

CHAT_ID = {
    "name": "chat_id",
    "in": "path",
    "required": True,
    "description": "The chat's id (letters, digits and `. _ : @ -`)",
    "schema": {"type": "string", "pattern": rf"^[A-Za-z0-9._:@-]{{1,{CHAT_ID_MAX_CHARS}}}$"},
}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string", "description": "machine-readable, snake_case"},
                    "message": {"type": "string", "description": "for people"},
                },
            }
        },
    },
    "UIMessage": {
        "type": "object",
        "required": ["id", "role", "parts"],
        "properties": {
            "id": {"type": "string", "minLength": 1, "maxLength": MESSAGE_ID_MAX_CHARS},
            "role": {"enum": list(ROLES)},
            "parts": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["type"],
                    "properties": {"type": {"type": "string"}},
                },
            },
            "metadata": {"type": "object"},
        },
    },
    "ChatRequest": {
        "type": "object",
        "description": "The AI SDK's chat request; `messages` (the history) or `message` (the "
        "newest one) is required.",
        "required": ["id"],
        "anyOf": [{"required": ["messages"]}, {"required": ["message"]}],
        "properties": {
            "id": {"type": "string", "minLength": 1, "maxLength": CHAT_ID_MAX_CHARS},
            "messages": {"type": "array", "items": _ref("UIMessage")},
            "message": _ref("UIMessage"),
            "trigger": {"enum": list(TRIGGERS)},
            "messageId": {"type": "string"},
            "producer": {
                "type": "string",
                "maxLength": PRODUCER_MAX_CHARS,
                "description": "a producer profile of the relay (default: its default)",
            },
            "options": {
                "type": "object",
                "description": "the producer's options (e.g. echo: `delay_ms`, `chunks`)",
                "propertyNames": {"minLength": 1, "maxLength": OPTION_KEY_MAX_CHARS},
                "additionalProperties": {
                    "anyOf": [
                        {"type": "string", "maxLength": OPTION_VALUE_MAX_CHARS},
                        {"type": "number"},
                    ]
                },
            },
        },
    },
    "StopRequest": {
        "type": "object",
        "properties": {
            "assistantMessage": {
                **_ref("UIMessage"),
                "description": "the partial answer as the client has it; persisted",
            },
            "activeStreamId": {
                "type": "string",
                "maxLength": STREAM_ID_MAX_CHARS,
                "description": "the stream the client means; a stop naming another changes "
                "nothing (`not_active`)",
            },
        },
    },
    "StopResult": {
        "type": "object",
        "required": ["stopped", "outcome", "streamId", "finalOffset", "state"],
        "properties": {
            "stopped": {"type": "boolean"},
            "outcome": {"enum": [outcome.value for outcome in StopOutcome]},
            "streamId": {"type": ["string", "null"]},
            "finalOffset": {"type": ["integer", "null"], "minimum": 0},
            "state": {"enum": [*(state.value for state in StreamState), None]},
        },
    },
    "Messages": {
        "type": "object",
        "required": ["chatId", "messages"],
        "properties": {
            "chatId": {"type": "string"},
            "messages": {"type": "array", "items": _ref("UIMessage")},
        },
    },
    "Health": {
        "type": "object",
        "required": ["status", "relay"],
        "properties": {
            "status": {"enum": ["ok", "unavailable"]},
            "relay": {"type": "string", "description": "the relay's health, or why it is down"},
        },
    },
}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "stream-relay gateway",
        "version": "0.1.0",
        "description": "Resumable AI SDK chat streams. Errors are JSON "
        '`{"error": {"code", "message"}}`.',
    },
    "paths": {
        "/api/chat": {
            "post": {
                "operationId": "chat",
                "summary": "Start an answer and stream it",
                "description": "A POST while the chat's answer is live stops that answer "
                "first (default), or is refused with 409 (`--on-live-stream refuse`).",
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "description": "a retried POST with the same key returns the same stream",
                        "schema": {"type": "string", "maxLength": IDEMPOTENCY_KEY_MAX_CHARS},
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {JSON: {"schema": _ref("ChatRequest")}},
                },
                "responses": {"200": SSE_RESPONSE, **_errors("408", "409", "413", *RELAY_ERRORS)},
            }
        },
        "/api/chat/{chat_id}/stream": {
            "get": {
                "operationId": "resume",
                "summary": "Resume the chat's active answer",
                "description": "The whole answer from its first chunk, then live; with "
                "`Last-Event-ID: n`, from chunk n+1.",
                "parameters": [
                    CHAT_ID,
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "required": False,
                        "description": "the offset of the last chunk seen (ASCII digits); one "
                        "past the stream's end is 400 `out_of_range`",
                        "schema": {"type": "string", "pattern": "^[0-9]+$"},
                    },
                ],
                "responses": {
                    "200": SSE_RESPONSE,
                    "204": {"description": "The chat has no active answer"},
                    **_errors(*RELAY_ERRORS),
                },
            }
        },
        "/api/chat/{chat_id}/stop": {
            "post": {
                "operationId": "stop",
                "summary": "Stop the chat's active answer (the explicit cancel)",
                "parameters": [CHAT_ID],
                "requestBody": {
                    "required": False,
                    "content": {JSON: {"schema": _ref("StopRequest")}},
                },
                "responses": {
                    "200": {
                        "description": "What the stop did",
                        "content": {JSON: {"schema": _ref("StopResult")}},
                    },
                    **_errors("408", "413", *RELAY_ERRORS),
                },
            }
        },
        "/api/chat/{chat_id}/messages": {
            "get": {
                "operationId": "messages",
                "summary": "The chat's persisted messages",
                "parameters": [CHAT_ID],
                "responses": {
                    "200": {
                        "description": "Oldest first",
                        "content": {JSON: {"schema": _ref("Messages")}},
                    },
                    **_errors(*RELAY_ERRORS),
                },
            }
        },
        "/healthz": {
            "get": {
                "operationId": "health",
                "summary": "The gateway's health, the relay's included",
                "responses": {
                    "200": {
                        "description": "The relay is serving",
                        "content": {JSON: {"schema": _ref("Health")}},
                    },
                    "503": {
                        "description": "The relay is not serving or does not answer",
                        "content": {JSON: {"schema": _ref("Health")}},
                    },
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics: the gateway's and the relay's",
                "responses": {
                    "200": {
                        "description": "Prometheus text format 0.0.4",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/": {
            "get": {
                "operationId": "demo",
                "summary": "The demo chat page",
                "responses": {
                    "200": {
                        "description": "HTML",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "responses": {
                    "200": {"description": "OpenAPI 3.1", "content": {JSON: {"schema": {}}}}
                },
            }
        },
    },
    "components": {"schemas": SCHEMAS},
}
