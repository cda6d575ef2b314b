"""Who a gRPC call is: its service token (if the relay has any) and the subject it acts for.

Without tokens the relay trusts every caller to name its subject (`x-relay-subject` metadata):
that is the embedded, loopback-only default. With tokens, see `Authenticator`.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import unquote

from relay.domain.model import Caller
from relay.rpc.convert import SUBJECT_METADATA

Metadata = Iterable[tuple[str, str | bytes]]


class Authenticator:
    def caller(self, metadata: Metadata | None, subject: str | None = None) -> Caller:
        """The Caller of a call with this invocation metadata. `subject`, if not empty, is one a
        request names for itself (an AttachMany subscription's) and overrides the metadata's.
        Raises Unauthenticated or PermissionDenied."""
        named = _named_subject(metadata)
        return Caller(subject=subject or named or "")


def _named_subject(metadata: Metadata | None) -> str | None:
    for key, value in metadata or ():
        if key == SUBJECT_METADATA:
            text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
            return unquote(text, errors="strict")
    return None
