"""Domain errors: raised by the relay's domain, translated to gRPC status codes by the service.

RelayError
├── InvalidArgument      the request itself is malformed or over a size limit
├── NotFound             the chat or stream does not exist (or its retention has passed)
├── AlreadyExists        a name the caller chose is taken (an AttachMany reader's tag)
├── FailedPrecondition   the request is valid but the chat's state refuses it
├── OutOfRange           an offset past the end of a stream
├── ResourceExhausted    a capacity or rate limit is reached (retry_after_s: when to retry)
├── Unavailable          the relay is shutting down
├── Unauthenticated      the caller presented no valid credentials
└── PermissionDenied     the caller's credentials do not allow what it asked (e.g. to act for
                         a subject it names); never used for another subject's chat, which is
                         refused as if it did not exist (NotFound)
"""

from __future__ import annotations


class RelayError(Exception):
    """Base of every error the domain raises on purpose."""


class InvalidArgument(RelayError):
    pass


class NotFound(RelayError):
    pass


def stream_not_found(stream_id: str) -> NotFound:
    return NotFound(f"stream {stream_id} not found (unknown, or its retention has passed)")


def chat_not_found(chat_id: str) -> NotFound:
    """What a Start on another subject's chat gets: the same code as every other call on it."""
    return NotFound(f"chat {chat_id!r} not found")


class AlreadyExists(RelayError):
    pass


class FailedPrecondition(RelayError):
    pass


class OutOfRange(RelayError):
    pass


class ResourceExhausted(RelayError):
    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s  # when a retry may succeed, if known


class Unavailable(RelayError):
    pass


class Unauthenticated(RelayError):
    pass


class PermissionDenied(RelayError):
    pass
