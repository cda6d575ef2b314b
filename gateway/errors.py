"""HTTP errors with a JSON body `{"error": {"code", "message"}}`, and the relay's gRPC statuses
mapped onto them. The AI SDK client shows the body's text to the user."""

from __future__ import annotations

import grpc
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response


class HttpError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


STATUS_OF_GRPC: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_argument"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "out_of_range"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found"),
    grpc.StatusCode.FAILED_PRECONDITION: (409, "stream_already_live"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "resource_exhausted"),
    grpc.StatusCode.UNAVAILABLE: (503, "relay_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "relay_timeout"),
}


def from_grpc(error: grpc.aio.AioRpcError) -> HttpError:
    code = error.code()
    details = error.details() or code.name.lower()
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        return HttpError(413, "too_large", details)
    if code is grpc.StatusCode.UNAVAILABLE:
        details = f"the relay is unavailable: {details}"
    status, name = STATUS_OF_GRPC.get(code, (502, "relay_error"))
    return HttpError(status, name, details)


def error_response(error: HttpError) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": error.code, "message": error.message}}, status_code=error.status
    )


async def handle_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HttpError)
    return error_response(exc)


async def handle_grpc_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, grpc.aio.AioRpcError)
    return error_response(from_grpc(exc))


async def handle_starlette_error(request: Request, exc: Exception) -> Response:
    """Unknown routes and wrong methods answer JSON too."""
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(HttpError(exc.status_code, code, str(exc.detail)))
