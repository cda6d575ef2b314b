"""HTTP errors with a JSON body `{"error": {"code", "message"}}`, and the relay's errors
(`relay.client.errors`) mapped onto them. The AI SDK client shows the body's text to the user.

What the relay says about the caller's own request (400, 404, 409, 429) is passed on, cut to
`DETAIL_MAX_CHARS`; what it says about itself (an internal error, a connection failure) is not:
those answers carry a generic message and the status name, never exception names, SQLite or
gRPC-core text.

A 429 always says when to retry (`Retry-After`, whole seconds): the relay's ResourceExhausted
carries the delay it asked for (`retry_after_s`, from its status' RetryInfo); without one, 1 s.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Mapping

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from relay.client.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    RelayError,
    ResourceExhausted,
    TooLarge,
    Unavailable,
    UnreadableReply,
)

log = logging.getLogger("gateway")

# The longest relay message an HTTP error passes on (a relay echoing a huge input stays bounded).
DETAIL_MAX_CHARS = 500


class HttpError(Exception):
    def __init__(
        self, status: int, code: str, message: str, *, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


# Retry-After when the relay says nothing more precise.
DEFAULT_RETRY_AFTER_S = 1
# The longest Retry-After passed on (a relay asking for more is capped).
MAX_RETRY_AFTER_S = 3600


# Errors about the request: the relay's message says what was wrong with it.
STATUS_OF_ERROR: dict[type[RelayError], tuple[int, str]] = {
    InvalidArgument: (400, "invalid_argument"),
    OutOfRange: (400, "out_of_range"),
    NotFound: (404, "not_found"),
    FailedPrecondition: (409, "stream_already_live"),
    ResourceExhausted: (429, "resource_exhausted"),
}

# Errors about the relay or the connection: a generic message, and the status name.
GENERIC_OF_ERROR: dict[type[RelayError], tuple[int, str, str]] = {
    Unavailable: (503, "relay_unavailable", "the relay is unavailable; retry shortly"),
    DeadlineExceeded: (504, "relay_timeout", "the relay did not answer in time"),
    # The relay's status did not fit the client's metadata limit: its reply was unreadable,
    # which no retry fixes (the gateway bounds what it sends so that this does not happen).
    UnreadableReply: (502, "relay_error", "the relay's reply was unreadable"),
}


def from_relay(error: RelayError) -> HttpError:
    if isinstance(error, TooLarge):
        return HttpError(413, "too_large", "the request is larger than the relay accepts")
    kinds = type(error).__mro__
    about_request = next((STATUS_OF_ERROR[k] for k in kinds if k in STATUS_OF_ERROR), None)
    if about_request is not None:
        status, name = about_request
        headers = None
        if isinstance(error, ResourceExhausted):
            headers = {"retry-after": str(retry_after_s(error))}
        return HttpError(
            status, name, bounded(error.message or error.code.lower()), headers=headers
        )
    status, name, message = next(
        (GENERIC_OF_ERROR[k] for k in kinds if k in GENERIC_OF_ERROR),
        (502, "relay_error", "the relay failed to answer"),
    )
    return HttpError(status, name, f"{message} ({error.code})")


def retry_after_s(error: ResourceExhausted) -> int:
    """Seconds to wait, rounded up, from the relay's RetryInfo; DEFAULT_RETRY_AFTER_S without."""
    if error.retry_after_s is None:
        return DEFAULT_RETRY_AFTER_S
    return int(min(max(math.ceil(error.retry_after_s), 1), MAX_RETRY_AFTER_S))


# On every response (gateway.security.SecurityHeaders), the unexpected 500 included.
ALWAYS_HEADERS = {"x-content-type-options": "nosniff", "referrer-policy": "no-referrer"}


def bounded(text: str, limit: int = DETAIL_MAX_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def error_response(error: HttpError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": error.code, "message": error.message}},
        status_code=error.status,
        headers=headers,
    )


async def handle_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HttpError)
    return error_response(exc, exc.headers)


async def handle_relay_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RelayError)
    error = from_relay(exc)
    return error_response(error, error.headers)


async def handle_starlette_error(request: Request, exc: Exception) -> Response:
    """Unknown routes and wrong methods answer JSON too."""
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(HttpError(exc.status_code, code, str(exc.detail)), exc.headers)


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    """Anything else a route or a pluggable verifier raises: JSON like every other error, with
    the security headers (this answers outside the middleware that adds them), the details in
    the log under an id the client can quote."""
    error_id = secrets.token_hex(4)
    log.error(
        "unexpected error; the client got 500",
        exc_info=exc,
        extra={"error_id": error_id, "path": request.url.path},
    )
    error = HttpError(500, "internal", f"internal error (id {error_id}); see the gateway log")
    return error_response(error, ALWAYS_HEADERS)
