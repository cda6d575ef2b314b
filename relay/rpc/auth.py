"""Who a gRPC call is: its service token (if the relay has any) and the subject it acts for.

Without tokens the relay trusts every caller to name its subject (`x-relay-subject` metadata):
that is the embedded, loopback-only default. With tokens, see `Authenticator`.
"""

from __future__ import annotations

from collections.abc import Iterable
from os import PathLike
from pathlib import Path
from urllib.parse import unquote

from relay.domain.model import Caller
from relay.rpc.convert import SUBJECT_METADATA

Metadata = Iterable[tuple[str, str | bytes]]

AUTHORIZATION_METADATA = "authorization"
TOKEN_MAX_CHARS = 4_096


def check_token(token: str) -> None:
    """Raises ValueError unless `token` can travel as a metadata value: 1 to TOKEN_MAX_CHARS
    visible ASCII characters. The message never quotes the token."""
    if not 0 < len(token) <= TOKEN_MAX_CHARS or not all("!" <= c <= "~" for c in token):
        raise ValueError(
            f"a service token must be 1 to {TOKEN_MAX_CHARS} visible ASCII characters "
            "(no spaces or control characters)"
        )


def read_pem(path: str | PathLike[str], what: str) -> bytes:
    """The bytes of a PEM file. Raises ValueError naming `what` and the file when it cannot be
    read or holds no PEM block (gRPC itself would only fail at the first handshake)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} file {str(path)!r}: {exc.strerror}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"the {what} file {str(path)!r} is not PEM")
    return data


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
