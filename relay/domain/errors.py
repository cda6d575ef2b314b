"""Domain errors: raised by the relay's domain, translated to gRPC status codes by the service.

RelayError
├── InvalidArgument      the request itself is malformed or over a size limit
├── NotFound             the chat or stream does not exist (or its retention has passed)
├── AlreadyExists        a name the caller chose is taken (an AttachMany reader's tag)
├── FailedPrecondition   the request is valid but the chat's state refuses it
├── OutOfRange           an offset past the end of a stream
├── ResourceExhausted    a relay-wide or per-stream capacity limit is reached
└── Unavailable          the relay is shutting down
"""

from __future__ import annotations


class RelayError(Exception):
    """Base of every error the domain raises on purpose."""


class InvalidArgument(RelayError):
    pass


class NotFound(RelayError):
    pass


class AlreadyExists(RelayError):
    pass


class FailedPrecondition(RelayError):
    pass


class OutOfRange(RelayError):
    pass


class ResourceExhausted(RelayError):
    pass


class Unavailable(RelayError):
    pass
