"""The errors `relay.client` raises: every failed call, and every stream that fails mid-way, raises
one of these, never a transport exception (the gRPC one stays reachable as `__cause__`).

RelayError               any other status (INTERNAL, UNKNOWN, DATA_LOSS, UNIMPLEMENTED, ...)
├── InvalidArgument      INVALID_ARGUMENT: the request is malformed or over a size limit
├── OutOfRange           OUT_OF_RANGE: an offset past the end of a stream
├── NotFound             NOT_FOUND: no such chat or stream (or another subject's)
├── FailedPrecondition   FAILED_PRECONDITION: the chat's state refuses it (a live answer)
├── ResourceExhausted    RESOURCE_EXHAUSTED: a limit of the relay; `retry_after_s` if it said
├── TooLarge             RESOURCE_EXHAUSTED from a message size limit: a retry cannot succeed
├── UnreadableReply      RESOURCE_EXHAUSTED from this client's metadata limit: the relay's
│                        reply could not be read
├── Unauthenticated      UNAUTHENTICATED: no valid service token
├── PermissionDenied     PERMISSION_DENIED: the token may not do that (e.g. act for a subject)
├── Unavailable          UNAVAILABLE: the relay cannot be reached, or went away
├── DeadlineExceeded     DEADLINE_EXCEEDED: the call's timeout passed
└── Cancelled            CANCELLED: the relay (or a shared call being closed) cancelled it

`code` is the status' canonical name (as gRPC and google.rpc spell it), `message` what the relay
said. The relay's own errors (`relay.domain.errors`) arrive as the classes of the same name.
"""

from __future__ import annotations


class RelayError(Exception):
    """A call to the relay failed. `code`: the status' name, e.g. "INTERNAL"; `message`: what the
    relay (or the connection to it) said about it."""

    code: str = "UNKNOWN"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidArgument(RelayError):
    code = "INVALID_ARGUMENT"


class OutOfRange(RelayError):
    code = "OUT_OF_RANGE"


class NotFound(RelayError):
    code = "NOT_FOUND"


class FailedPrecondition(RelayError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(RelayError):
    """`retry_after_s`: when the relay said a retry may succeed (its RetryInfo), if it did."""

    code = "RESOURCE_EXHAUSTED"

    def __init__(
        self, message: str, *, code: str | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class TooLarge(RelayError):
    """A message over a size limit, this client's or the relay's."""

    code = "RESOURCE_EXHAUSTED"


class UnreadableReply(RelayError):
    """The relay's status or headers did not fit this client's metadata limit."""

    code = "RESOURCE_EXHAUSTED"


class Unauthenticated(RelayError):
    code = "UNAUTHENTICATED"


class PermissionDenied(RelayError):
    code = "PERMISSION_DENIED"


class Unavailable(RelayError):
    code = "UNAVAILABLE"


class DeadlineExceeded(RelayError):
    code = "DEADLINE_EXCEEDED"


class Cancelled(RelayError):
    code = "CANCELLED"


_BY_CODE: dict[str, type[RelayError]] = {
    kind.code: kind
    for kind in (
        InvalidArgument,
        OutOfRange,
        NotFound,
        FailedPrecondition,
        ResourceExhausted,
        Unauthenticated,
        PermissionDenied,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
    )
}

# What gRPC's core says when a message or the metadata exceeds a limit (it is no status of the
# relay's, which says what was over a limit in its own words).
_TOO_LARGE = "larger than max"
_METADATA_TOO_LARGE = "received metadata size"


def error_of(code: str, message: str, *, retry_after_s: float | None = None) -> RelayError:
    """The error for a status named `code` (e.g. "NOT_FOUND") with `message`."""
    if code == "RESOURCE_EXHAUSTED":
        if _METADATA_TOO_LARGE in message:
            return UnreadableReply(message)
        if _TOO_LARGE in message:
            return TooLarge(message)
        return ResourceExhausted(message, retry_after_s=retry_after_s)
    kind = _BY_CODE.get(code)
    return RelayError(message, code=code) if kind is None else kind(message)
