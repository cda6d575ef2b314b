"""HTTP errors with a JSON body `{"error": {"code", "message"}}`, and the relay's gRPC statuses
mapped onto them. The AI SDK client shows the body's text to the user.

What the relay says about the caller's own request (400, 404, 409, 429) is passed on, cut to
`DETAIL_MAX_CHARS`; what it says about itself (an internal error, a connection failure) is not:
those answers carry a generic message and the gRPC status name, never exception names, SQLite or
gRPC-core text.

A 429 always says when to retry (`Retry-After`, whole seconds): the relay's RESOURCE_EXHAUSTED
carries a `google.rpc.RetryInfo` in its rich status (`grpc-status-details-bin`); without one, 1 s.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Mapping

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

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


# Statuses about the request: the relay's message says what was wrong with it.
STATUS_OF_GRPC: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_argument"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "out_of_range"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found"),
    grpc.StatusCode.FAILED_PRECONDITION: (409, "stream_already_live"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "resource_exhausted"),
}

# Statuses about the relay or the connection: a generic message, and the status name.
GENERIC_OF_GRPC: dict[grpc.StatusCode, tuple[int, str, str]] = {
    grpc.StatusCode.UNAVAILABLE: (
        503,
        "relay_unavailable",
        "the relay is unavailable; retry shortly",
    ),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "relay_timeout", "the relay did not answer in time"),
}


def from_grpc(error: grpc.aio.AioRpcError) -> HttpError:
    code = error.code()
    details = error.details() or ""
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and "received metadata size" in details:
        # The relay's status did not fit gRPC's metadata limit: its reply was unreadable, which
        # no retry fixes (the gateway bounds what it sends so that this does not happen).
        return HttpError(502, "relay_error", f"the relay's reply was unreadable ({code.name})")
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        return HttpError(413, "too_large", "the request is larger than the relay accepts")
    if code in STATUS_OF_GRPC:
        status, name = STATUS_OF_GRPC[code]
        headers = None
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            headers = {"retry-after": str(retry_after_s(error))}
        return HttpError(status, name, bounded(details or code.name.lower()), headers=headers)
    status, name, message = GENERIC_OF_GRPC.get(
        code, (502, "relay_error", "the relay failed to answer")
    )
    return HttpError(status, name, f"{message} ({code.name})")


def retry_after_s(error: grpc.aio.AioRpcError) -> int:
    """Seconds to wait, rounded up, from the status' RetryInfo; DEFAULT_RETRY_AFTER_S without."""
    try:
        status = rpc_status.from_call(error)
    except ValueError:  # a rich status that contradicts the call's: ignore it
        status = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            delay = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
            return int(min(max(math.ceil(delay), 1), MAX_RETRY_AFTER_S))
    return DEFAULT_RETRY_AFTER_S


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


async def handle_grpc_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, grpc.aio.AioRpcError)
    error = from_grpc(exc)
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
