"""Server URLs in messages: never with their password."""

from __future__ import annotations

from urllib.parse import urlsplit


def without_password(text: str, url: str) -> str:
    """`text` (an error, or the URL itself) with the URL's password replaced by `***`."""
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    return text.replace(password, "***") if password else text
