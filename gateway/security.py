"""Browser safety, as ASGI middleware (outermost first in `middleware()`):

- `SecurityHeaders`: `X-Content-Type-Options: nosniff` and `Referrer-Policy: no-referrer` on every
  response (the demo page adds its CSP and `X-Frame-Options` itself: `PAGE_HEADERS`).
- `HostCheck`: the `Host` header must name this gateway (`--allowed-hosts`); another is a 400.
  A page on `evil.example` whose name an attacker re-points at 127.0.0.1 (DNS rebinding) is then
  same-origin with nothing here.
- `Cors`: closed unless origins are allowed (`--cors-origin`); then preflights for GET and POST
  with the AI SDK's headers are answered, and responses to those origins carry
  `Access-Control-Allow-Origin`. Any other origin gets no CORS header at all.
- `Csrf`: a POST whose `Origin` is neither this gateway's nor an allowed one is a 403, as is one
  marked `Sec-Fetch-Site: cross-site` without an allowed Origin; then every POST must be
  `Content-Type: application/json` (else 415), the stop route's too although its body is
  optional: a browser sends that type cross-origin only after a preflight, which `Cors` refuses
  to unknown origins, so an HTML form or a `no-cors` fetch from another site can start or stop
  nothing even when a browser sends no Origin. Requests without Origin (curl, servers) pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import ALWAYS_HEADERS, HttpError, error_response

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
CORS_METHODS = ("GET", "POST")
CORS_HEADERS = ("content-type", "authorization", "last-event-id", "idempotency-key")
CORS_EXPOSED = ("x-vercel-ai-ui-message-stream", "x-stream-id", "retry-after")
CORS_MAX_AGE_S = 600

ALWAYS = ALWAYS_HEADERS
# The demo page: its script and style are files of this gateway (no inline code), it talks only
# to this gateway and may not be framed (clickjacking).
PAGE_CSP = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)
PAGE_HEADERS = {"content-security-policy": PAGE_CSP, "x-frame-options": "DENY"}


def normalized_origin(origin: str) -> str:
    """An allowed origin as browsers send one (`scheme://host[:port]`, lower case, no slash),
    so `https://App.example/` matches; ValueError for one with a path, query or no host."""
    parts = urlsplit(origin.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"the origin {origin!r} is not http(s)://host[:port]")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"the origin {origin!r} has more than scheme, host and port")
    return f"{parts.scheme}://{parts.netloc.lower()}"


def default_allowed_hosts(address: str) -> tuple[str, ...]:
    """The loopback names, and the host of `address` (host:port) unless it is a wildcard."""
    host = address.rsplit(":", 1)[0].lower()
    if host in ("", "0.0.0.0", "::", "[::]") or host in LOOPBACK_HOSTS:
        return LOOPBACK_HOSTS
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return (*LOOPBACK_HOSTS, host)


def host_name(host: str) -> str:
    """`Host` without its port, lowercased: `example.com:8080` -> `example.com`, `[::1]:80` ->
    `[::1]`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def host_allowed(host: str, allowed: Iterable[str]) -> bool:
    name = host_name(host)
    if not name:
        return False
    for pattern in allowed:
        pattern = pattern.lower()
        if pattern == "*" or name == pattern:
            return True
        if pattern.startswith("*.") and name.endswith(pattern[1:]):
            return True
    return False


async def _refuse(error: HttpError, scope: Scope, receive: Receive, send: Send) -> None:
    await error_response(error, error.headers)(scope, receive, send)


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in ALWAYS.items():
                    if name not in headers:
                        headers[name] = value
            await send(message)

        await self.app(scope, receive, with_headers)


class HostCheck:
    def __init__(self, app: ASGIApp, allowed: Sequence[str]) -> None:
        self.app = app
        self.allowed = tuple(allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = Headers(scope=scope).get("host", "")
            if not host_allowed(host, self.allowed):
                error = HttpError(
                    400, "host_not_allowed", "the Host header does not name this server"
                )
                await _refuse(error, scope, receive, send)
                return
        await self.app(scope, receive, send)


class Cors:
    def __init__(self, app: ASGIApp, origins: Sequence[str]) -> None:
        self.app = app
        self.origins = frozenset(origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.origins:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        allowed = origin is not None and origin in self.origins
        method = scope["method"]
        if allowed and method == "OPTIONS" and "access-control-request-method" in headers:
            await self._preflight(origin or "", scope, receive, send)
            return

        async def with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                out = MutableHeaders(scope=message)
                out.add_vary_header("Origin")
                if allowed:
                    out["access-control-allow-origin"] = origin or ""
                    out["access-control-expose-headers"] = ", ".join(CORS_EXPOSED)
            await send(message)

        await self.app(scope, receive, with_cors)

    async def _preflight(self, origin: str, scope: Scope, receive: Receive, send: Send) -> None:
        response = Response(
            status_code=204,
            headers={
                "access-control-allow-origin": origin,
                "access-control-allow-methods": ", ".join(CORS_METHODS),
                "access-control-allow-headers": ", ".join(CORS_HEADERS),
                "access-control-max-age": str(CORS_MAX_AGE_S),
                "vary": "Origin",
            },
        )
        await response(scope, receive, send)


class Csrf:
    def __init__(self, app: ASGIApp, origins: Sequence[str]) -> None:
        self.app = app
        self.origins = frozenset(origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in SAFE_METHODS:
            error = self.refusal(Headers(scope=scope))
            if error is not None:
                await _refuse(error, scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, headers: Headers) -> HttpError | None:
        origin = headers.get("origin")
        if origin is not None:
            if origin not in self.origins and not same_origin(origin, headers.get("host", "")):
                return HttpError(
                    403, "cross_origin", "requests from this origin are not allowed here"
                )
        elif headers.get("sec-fetch-site") == "cross-site":
            return HttpError(403, "cross_origin", "cross-site requests are not allowed here")
        media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != "application/json":
            return HttpError(
                415, "unsupported_media_type", "a POST must be `Content-Type: application/json`"
            )
        return None


def same_origin(origin: str, host: str) -> bool:
    """`Origin` names the host and port the request was sent to (its scheme is not compared: a
    proxy in front may terminate TLS)."""
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False
    return parts.netloc.lower() == host.strip().lower()
