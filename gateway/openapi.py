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
from relay.domain.model import ROLES, EndReason, StopOutcome, StreamState

JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {JSON: {"schema": _ref("Error")}},
    }
    if headers:
        response["headers"] = headers
    return response


RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
}
WWW_AUTHENTICATE = {
    "WWW-Authenticate": {
        "description": 'The scheme to use: `Bearer realm="stream-relay"` (RFC 6750)',
        "schema": {"type": "string"},
    }
}

ERRORS: dict[str, dict[str, Any]] = {
    "400": _error("Malformed JSON, a wrong type, or input the relay refuses (`invalid_argument`)"),
    "401": _error(
        "No credential, or one that is not valid (`--auth jwt` or `trusted-header`)",
        WWW_AUTHENTICATE,
    ),
    "403": _error(
        "A browser request from an origin that is neither this gateway nor an allowed CORS "
        "origin (`cross_origin`)"
    ),
    "404": _error("No such chat or stream (another subject's chat does not exist for you)"),
    "408": _error("The request's body did not arrive within the body timeout"),
    "409": _error("The chat's answer is still live (`--on-live-stream refuse`)"),
    "413": _error("The request body is over `--max-body-bytes`"),
    "415": _error("A POST that is not `Content-Type: application/json` (a CSRF defence)"),
    "429": _error(
        "Too many open streams (`too_many_streams`: `--max-sse-per-subject`, `--max-sse-total`)"
        " or a relay limit (`resource_exhausted`); retry after `Retry-After` seconds",
        RETRY_AFTER,
    ),
    "500": _error(
        "An unexpected error in the gateway (`internal`); the message names an id in its log"
    ),
    "502": _error("The relay failed; the message names the gRPC status only"),
    "503": _error("The relay is unreachable, or the keys that verify sign-ins are"),
    "504": _error("The relay did not answer in time"),
}


def _errors(*codes: str) -> dict[str, dict[str, Any]]:
    return {code: ERRORS[code] for code in codes}


RELAY_ERRORS = ("400", "401", "404", "429", "500", "502", "503", "504")
# What a POST may get from the browser-safety checks (gateway/security.py).
POST_ERRORS = ("403", "415")
# The /api routes take a bearer token when the gateway verifies JWTs; none in the other modes.
SECURITY: list[dict[str, list[str]]] = [{"bearer": []}, {}]

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
            "requestId": {
                "type": "string",
                "maxLength": IDEMPOTENCY_KEY_MAX_CHARS,
                "description": "the chat POST the client means, by its `Idempotency-Key`: if "
                "it has not reached the relay yet, its answer ends stopped as it starts "
                "(`stopped_before_start`). Ignored with `activeStreamId`",
            },
            "messageId": {
                "type": "string",
                "maxLength": MESSAGE_ID_MAX_CHARS,
                "description": "as `requestId` (which wins), by the id of the user message the "
                "answer replies to; a message already saved means its POST has arrived",
            },
        },
    },
    "StopResult": {
        "type": "object",
        "description": "The stop's receipt: what it did and, once the stream has ended, its end.",
        "required": [
            "stopped",
            "outcome",
            "streamId",
            "finalOffset",
            "state",
            "reason",
            "message",
            "usage",
        ],
        "properties": {
            "stopped": {
                "type": "boolean",
                "description": "this stop ended the answer (`stopped`) or will as it starts "
                "(`stopped_before_start`)",
            },
            "outcome": {"enum": [outcome.value for outcome in StopOutcome]},
            "streamId": {"type": ["string", "null"]},
            "finalOffset": {"type": ["integer", "null"], "minimum": 0},
            "state": {"enum": [*(state.value for state in StreamState), None]},
            "reason": {
                "enum": [*(reason.label for reason in EndReason), None],
                "description": "why the stream ended (`stop`: a stop; `superseded`: a newer "
                "message; `stopped_before_start`...); null without an end",
            },
            "message": {
                "anyOf": [_ref("UIMessage"), {"type": "null"}],
                "description": "the answer as persisted with the end: for one that did not "
                "complete, `metadata.streamEnd` = `{state, reason, error?}` says why",
            },
            "usage": {
                "type": ["object", "null"],
                "description": "the producer's usage report so far (the message's "
                "`metadata.usage`), if it sent one",
            },
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
        '`{"error": {"code", "message"}}`. Every request must carry a `Host` this gateway '
        "serves (`--allowed-hosts`; else 400 `host_not_allowed`). The /api routes act for "
        "the signed-in subject (`--auth`): with `jwt`, `Authorization: Bearer <JWT>`; a chat "
        "another subject started answers as an unknown one.",
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
                "security": SECURITY,
                "responses": {
                    "200": SSE_RESPONSE,
                    **_errors("408", "409", "413", *POST_ERRORS, *RELAY_ERRORS),
                },
            }
        },
        "/api/chat/{chat_id}/stream": {
            "get": {
                "operationId": "resume",
                "summary": "Resume the chat's active answer",
                "description": "The whole answer from its first chunk, then live; with "
                "`Last-Event-ID: n`, a snapshot of the message as of chunk n, then chunk n+1 "
                "on. Either parses from an empty message, as the AI SDK client resumes. Each "
                "event's `id` is the offset of the last chunk it stands for.",
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
                    {
                        "name": "replay",
                        "in": "query",
                        "required": False,
                        "description": "`compact` (the default unless the gateway says "
                        "otherwise): what the answer holds already comes with each part's "
                        "deltas merged; `plain`: one by one; `exact`: from Last-Event-ID exactly "
                        "as stored, with no snapshot, for a client that keeps its own state",
                        "schema": {"type": "string", "enum": ["compact", "plain", "exact"]},
                    },
                ],
                "security": SECURITY,
                "responses": {
                    "200": SSE_RESPONSE,
                    "204": {
                        "description": "The chat has no active answer (or is not yours)",
                    },
                    **_errors(*RELAY_ERRORS),
                },
            }
        },
        "/api/chat/{chat_id}/stop": {
            "post": {
                "operationId": "stop",
                "summary": "Stop the chat's active answer (the explicit cancel)",
                "description": "The body is optional, `Content-Type: application/json` is not.",
                "parameters": [CHAT_ID],
                "security": SECURITY,
                "requestBody": {
                    "required": False,
                    "content": {JSON: {"schema": _ref("StopRequest")}},
                },
                "responses": {
                    "200": {
                        "description": "What the stop did",
                        "content": {JSON: {"schema": _ref("StopResult")}},
                    },
                    **_errors("408", "413", *POST_ERRORS, *RELAY_ERRORS),
                },
            }
        },
        "/api/chat/{chat_id}/messages": {
            "get": {
                "operationId": "messages",
                "summary": "The chat's persisted messages",
                "description": "Empty for an unknown chat, and for another subject's.",
                "parameters": [CHAT_ID],
                "security": SECURITY,
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
        "/demo.js": {
            "get": {
                "operationId": "demoScript",
                "summary": "The demo page's script",
                "responses": {
                    "200": {
                        "description": "JavaScript",
                        "content": {"text/javascript": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/demo.css": {
            "get": {
                "operationId": "demoStyle",
                "summary": "The demo page's style sheet",
                "responses": {
                    "200": {
                        "description": "CSS",
                        "content": {"text/css": {"schema": {"type": "string"}}},
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
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "bearerFormat": "JWT",
                "description": "Only with `--auth jwt`; `trusted-header` reads a header an "
                "authenticating proxy sets, `anonymous` nothing.",
            }
        },
    },
}
