"""Who the end user is: a pluggable `Verifier` turns a request into its subject, the name the
relay binds chats to (a chat started by one subject does not exist for another).

- `anonymous`: everyone is the anonymous subject "" (the demo; `make run`).
- `jwt`: `Authorization: Bearer <JWT>`, verified with PyJWT against keys from a PEM file, an HMAC
  secret file, a JWKS file or a JWKS URL (fetched in a thread, cached). The allowed algorithms
  are configured, never read from the token, and each key verifies only the algorithms of its
  own kind (an HS256 token is never checked against an RSA public key used as a secret). `exp`
  is required; `nbf`, issuer and audience are checked, with a leeway for clock skew.
- `trusted-header`: the subject is a header an authenticating proxy in front sets (e.g.
  `X-Forwarded-User`). Only safe when that proxy removes the header from every client request
  and nothing reaches the gateway but through it.

A missing or invalid credential is a 401 with `WWW-Authenticate: Bearer` and a JSON body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import ECAlgorithm, HMACAlgorithm, OKPAlgorithm, RSAAlgorithm
from starlette.requests import Request

from gateway.errors import HttpError
from relay.domain.model import SUBJECT_MAX_CHARS

log = logging.getLogger("gateway.auth")

MODES = ("anonymous", "jwt", "trusted-header")
ANONYMOUS = ""
TOKEN_MAX_CHARS = 16 * 1024
REALM = "stream-relay"

# The algorithms a key of each kind verifies. `none` is in no list, so it is never accepted.
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
SUPPORTED_ALGORITHMS = (*HMAC_ALGORITHMS, *RSA_ALGORITHMS, *EC_ALGORITHMS.values(), "EdDSA")
DEFAULT_ALGORITHMS = ("HS256", "RS256", "ES256")
HMAC_SECRET_MIN_BYTES = 32  # RFC 7518 §3.2: a key at least as long as the hash (256 bits)
JWKS_MAX_BYTES = 1 << 20


class ConfigError(ValueError):
    """Authentication is configured wrongly; the message says how, in one line."""


class Verifier(Protocol):
    async def subject(self, request: Request) -> str:
        """The request's subject. Raises HttpError 401 for a missing or invalid credential."""
        ...


def unauthenticated(message: str, *, invalid: bool = True) -> HttpError:
    challenge = f'Bearer realm="{REALM}"'
    if invalid:  # RFC 6750 §3: a credential was sent and is not good
        challenge += f', error="invalid_token", error_description="{message}"'
    return HttpError(401, "unauthenticated", message, headers={"www-authenticate": challenge})


class AnonymousVerifier:
    async def subject(self, request: Request) -> str:
        return ANONYMOUS


@dataclass(frozen=True, slots=True)
class TrustedHeaderVerifier:
    header: str = "X-Forwarded-User"

    async def subject(self, request: Request) -> str:
        values = request.headers.getlist(self.header)
        if len(values) > 1:  # a proxy that adds its header instead of replacing the client's
            log.error("a request carried the trusted header twice", extra={"header": self.header})
            raise unauthenticated(f"{self.header} given {len(values)} times")
        value = _utf8(values[0] if values else "").strip()
        if not value:
            raise unauthenticated(f"no {self.header} header: not signed in", invalid=False)
        return check_subject(value)


def _utf8(header: str) -> str:
    """A header value as its sender most likely meant it: HTTP headers arrive as latin-1, and a
    proxy naming `zoë` sends UTF-8 bytes."""
    try:
        return header.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return header


def check_subject(subject: str) -> str:
    if len(subject) > SUBJECT_MAX_CHARS:
        raise unauthenticated(f"the subject is over {SUBJECT_MAX_CHARS} characters")
    if not subject.isprintable():
        raise unauthenticated("the subject holds control characters")
    if not subject.strip():
        raise unauthenticated("the subject is blank")
    return subject


# ---- keys --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Key:
    """A verification key: the algorithms its kind verifies, its `kid` and JWK `alg`, if any."""

    key: Any  # bytes (an HMAC secret) or a cryptography public key
    algorithms: tuple[str, ...]
    kid: str | None = None
    alg: str | None = None

    def fits(self, algorithm: str) -> bool:
        return algorithm in self.algorithms and self.alg in (None, algorithm)


def key_of(public: Any, kid: str | None = None, alg: str | None = None) -> Key:
    if isinstance(public, bytes):
        return Key(public, HMAC_ALGORITHMS, kid, alg)
    if isinstance(public, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        public = public.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        return Key(public, RSA_ALGORITHMS, kid, alg)
    if isinstance(public, ec.EllipticCurvePublicKey):
        algorithm = EC_ALGORITHMS.get(public.curve.name)
        if algorithm is None:
            raise ConfigError(f"the EC curve {public.curve.name} is not supported")
        return Key(public, (algorithm,), kid, alg)
    if isinstance(public, ed25519.Ed25519PublicKey):
        return Key(public, ("EdDSA",), kid, alg)
    raise ConfigError(f"a {type(public).__name__} cannot verify JWTs")


def read_file(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {str(path)!r}: {exc.strerror}") from None


def load_pem_key(path: str | Path) -> Key:
    """A PEM public key or certificate (RSA, EC or Ed25519). Private keys are refused: the
    gateway only verifies."""
    data = read_file(path, "JWT key file")
    if b"PRIVATE KEY" in data:
        raise ConfigError(f"{str(path)!r} holds a private key; give the gateway the public key")
    try:
        if b"-----BEGIN CERTIFICATE" in data:
            public: Any = x509.load_pem_x509_certificate(data).public_key()
        else:
            public = load_pem_public_key(data)
    except ValueError as exc:
        raise ConfigError(f"{str(path)!r} is not a PEM public key or certificate: {exc}") from None
    return key_of(public)


def load_secret(path: str | Path) -> Key:
    secret = read_file(path, "JWT secret file").strip()
    if len(secret) < HMAC_SECRET_MIN_BYTES:
        raise ConfigError(f"the JWT secret in {str(path)!r} is under {HMAC_SECRET_MIN_BYTES} bytes")
    if b"-----BEGIN" in secret:
        raise ConfigError(f"{str(path)!r} is PEM: give it as --jwt-key-file, not as a secret")
    return key_of(secret)


_KTY: dict[str, Any] = {
    "RSA": RSAAlgorithm,
    "EC": ECAlgorithm,
    "oct": HMACAlgorithm,
    "OKP": OKPAlgorithm,
}


def parse_jwks(data: bytes, where: str) -> list[Key]:
    """The signing keys of a JWK Set; keys of another use or an unknown kind are left out."""
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise ValueError(f"the JWKS at {where} is not JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError(f"the JWKS at {where} has no `keys` array")
    keys = []
    for jwk in document["keys"]:
        if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
            continue
        kind = _KTY.get(jwk.get("kty", ""))
        if kind is None:
            continue
        try:
            public = kind.from_jwk(jwk)
            kid, alg = jwk.get("kid"), jwk.get("alg")
            key = key_of(
                public, kid if isinstance(kid, str) else None, alg if isinstance(alg, str) else None
            )
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            log.warning("a JWKS key is unusable", extra={"jwks": where, "reason": str(exc)})
            continue
        keys.append(key)
    if not keys:
        raise ValueError(f"the JWKS at {where} holds no usable signing key")
    return keys


class KeySource(Protocol):
    async def keys(self, *, refresh: bool = False) -> Sequence[Key]:
        """The keys; `refresh`: the caller met an unknown `kid` (a source that can fetch may)."""
        ...


@dataclass(frozen=True, slots=True)
class StaticKeys:
    loaded: tuple[Key, ...]

    async def keys(self, *, refresh: bool = False) -> Sequence[Key]:
        return self.loaded


@dataclass(eq=False)
class JwksUrl:
    """A JWKS fetched over HTTP(S) and cached for `ttl_s`. Known keys always answer at once: a
    stale cache is refreshed in the background. Only a request that needs a fetch (no keys yet,
    or a token naming an unknown `kid`: a rotated key) waits for one, at most `timeout_s`; a
    fetch starts at most once per `min_refresh_s` and concurrent requests share it. It runs in
    a thread (urllib blocks). A failed or slow fetch keeps the keys it had."""

    url: str
    ttl_s: float = 300.0
    min_refresh_s: float = 30.0
    timeout_s: float = 5.0
    fetches: int = 0
    _keys: tuple[Key, ...] = ()
    _fetched_at: float = float("-inf")
    _attempted_at: float = float("-inf")
    _fetch_task: asyncio.Task[None] | None = None

    async def keys(self, *, refresh: bool = False) -> Sequence[Key]:
        now = time.monotonic()
        if self._keys and not refresh:
            if now - self._fetched_at >= self.ttl_s:
                self._start_fetch(now)  # the cached keys serve meanwhile
            return self._keys
        fetch = self._start_fetch(now)
        if fetch is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(fetch), self.timeout_s)
        if not self._keys:
            raise HttpError(
                503, "auth_unavailable", "the keys that verify sign-ins are unreachable"
            )
        return self._keys

    def _start_fetch(self, now: float) -> asyncio.Task[None] | None:
        """The fetch in flight, or a new one unless one began within `min_refresh_s` (never
        hammer the issuer, whatever tokens arrive)."""
        if self._fetch_task is not None and not self._fetch_task.done():
            return self._fetch_task
        if now - self._attempted_at < self.min_refresh_s:
            return None
        self._attempted_at = now
        self._fetch_task = asyncio.create_task(self._refetch(), name="jwks-fetch")
        return self._fetch_task

    async def _refetch(self) -> None:
        self.fetches += 1
        try:
            # The whole fetch has a deadline (a server sending a byte at a time would pass
            # every socket timeout); a thread that overruns it is left to finish alone.
            data = await asyncio.wait_for(asyncio.to_thread(self._fetch), self.timeout_s)
            self._keys = tuple(parse_jwks(data, self.url))
            self._fetched_at = time.monotonic()
        except (OSError, ValueError, TimeoutError) as exc:  # the keys it had, if any, stay
            log.warning("the JWKS fetch failed", extra={"url": self.url, "reason": str(exc)})

    def _fetch(self) -> bytes:
        request = urllib.request.Request(self.url, headers={"accept": "application/json"})
        opener = urllib.request.build_opener(_CheckedRedirects())
        try:
            with opener.open(request, timeout=self.timeout_s) as response:
                data: bytes = response.read(JWKS_MAX_BYTES + 1)
        except urllib.error.HTTPError as exc:
            exc.close()  # it holds the connection: closed now, not whenever it is collected
            raise ValueError(f"the JWKS at {self.url} answered {exc.code}") from None
        if len(data) > JWKS_MAX_BYTES:
            raise ValueError(f"the JWKS at {self.url} is over {JWKS_MAX_BYTES} bytes")
        return data


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect may not lead where the URL itself could not point (e.g. from https to http)."""

    def redirect_request(
        self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> Any:
        try:
            check_jwks_url(newurl)
        except ConfigError as exc:
            fp.close()  # the redirect's response holds the connection: closed now
            raise ValueError(f"the JWKS redirect: {exc}") from None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def check_jwks_url(url: str) -> str:
    """https, or http to a loopback address only (keys fetched in clear could be swapped)."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and parts.hostname:
        host = parts.hostname
        try:
            loopback = ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if loopback:
            return url
        raise ConfigError(f"the JWKS URL {url!r} must be https (http only to a loopback address)")
    raise ConfigError(f"the JWKS URL {url!r} is not an http(s) URL")


# ---- JWTs --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JwtVerifier:
    source: KeySource
    algorithms: tuple[str, ...]
    issuer: str
    audience: tuple[str, ...]
    leeway_s: float = 30.0
    subject_claim: str = "sub"

    async def subject(self, request: Request) -> str:
        token = bearer_token(request.headers.get("authorization"))
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise unauthenticated("the token is not a JWT") from None
        algorithm, kid = header.get("alg"), header.get("kid")
        if not isinstance(algorithm, str) or algorithm not in self.algorithms:
            raise unauthenticated("the token's algorithm is not allowed")
        if kid is not None and not isinstance(kid, str):
            raise unauthenticated("the token's kid is not a string")
        candidates = self._candidates(await self.source.keys(), algorithm, kid)
        if not candidates and kid is not None:  # perhaps a rotated key: look again (bounded)
            candidates = self._candidates(await self.source.keys(refresh=True), algorithm, kid)
        if not candidates:
            raise unauthenticated("no key verifies the token")
        claims = self._verified(token, candidates)
        value = claims.get(self.subject_claim)
        if not isinstance(value, str) or not value:
            raise unauthenticated(f"the token has no `{self.subject_claim}` claim")
        return check_subject(value)

    def _candidates(self, keys: Sequence[Key], algorithm: str, kid: str | None) -> list[Key]:
        return [k for k in keys if k.fits(algorithm) and (kid is None or k.kid == kid)]

    def _verified(self, token: str, candidates: Sequence[Key]) -> dict[str, Any]:
        for key in candidates:
            # The algorithms this key may verify among those configured: never the token's say.
            allowed = [a for a in self.algorithms if key.fits(a)]
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    key.key,
                    algorithms=allowed,
                    issuer=self.issuer,
                    audience=list(self.audience),
                    leeway=self.leeway_s,
                    options={"require": ["exp", "iss", "aud"], "verify_sub": False},
                )
                return claims
            except jwt.InvalidSignatureError:
                continue  # another key of the set may have signed it
            except jwt.ExpiredSignatureError:
                raise unauthenticated("the token has expired") from None
            except jwt.ImmatureSignatureError:
                raise unauthenticated("the token is not valid yet") from None
            except jwt.InvalidIssuerError:
                raise unauthenticated("the token's issuer is not accepted") from None
            except jwt.InvalidAudienceError:
                raise unauthenticated("the token's audience is not accepted") from None
            except jwt.MissingRequiredClaimError as exc:
                raise unauthenticated(f"the token has no `{exc.claim}` claim") from None
            except jwt.PyJWTError:
                raise unauthenticated("the token is invalid") from None
        raise unauthenticated("the token's signature is invalid")


def bearer_token(header: str | None) -> str:
    if not header:
        raise unauthenticated("an Authorization: Bearer token is required", invalid=False)
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise unauthenticated("the Authorization header must be `Bearer <token>`")
    if len(token) > TOKEN_MAX_CHARS:
        raise unauthenticated(f"the token is over {TOKEN_MAX_CHARS} characters")
    return token


# ---- configuration -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuthConfig:
    mode: str = "anonymous"
    # jwt: keys from any of these (at least one)
    jwt_key_file: str | None = None
    jwt_secret_file: str | None = None
    jwt_jwks_file: str | None = None
    jwt_jwks_url: str | None = None
    jwt_jwks_cache_s: float = 300.0
    jwt_algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    jwt_issuer: str | None = None
    jwt_audience: tuple[str, ...] = ()
    jwt_leeway_s: float = 30.0
    jwt_subject_claim: str = "sub"
    # trusted-header
    header: str = "X-Forwarded-User"


def build_verifier(config: AuthConfig) -> Verifier:
    """The verifier `config` describes; its files are read now. Raises ConfigError."""
    if config.mode == "anonymous":
        return AnonymousVerifier()
    if config.mode == "trusted-header":
        if not config.header or not config.header.replace("-", "").isalnum():
            raise ConfigError(f"--auth-header {config.header!r} is not a header name")
        return TrustedHeaderVerifier(config.header)
    if config.mode != "jwt":
        raise ConfigError(f"--auth must be one of {', '.join(MODES)}, not {config.mode!r}")
    return _jwt_verifier(config)


def _jwt_verifier(config: AuthConfig) -> JwtVerifier:
    algorithms = tuple(config.jwt_algorithms)
    if not algorithms:
        raise ConfigError("--jwt-algorithms is empty")
    for algorithm in algorithms:
        if algorithm not in SUPPORTED_ALGORITHMS:
            raise ConfigError(
                f"--jwt-algorithms: {algorithm!r} is not one of {', '.join(SUPPORTED_ALGORITHMS)}"
            )
    if not config.jwt_issuer:
        raise ConfigError("--auth jwt needs --jwt-issuer (the tokens' `iss`)")
    if not config.jwt_audience or not all(config.jwt_audience):
        raise ConfigError("--auth jwt needs --jwt-audience (the tokens' `aud`: this service)")
    if config.jwt_leeway_s < 0:
        raise ConfigError("--jwt-leeway-s must not be negative")
    if not config.jwt_subject_claim:
        raise ConfigError("--jwt-subject-claim is empty")
    sources = [
        config.jwt_key_file,
        config.jwt_secret_file,
        config.jwt_jwks_file,
        config.jwt_jwks_url,
    ]
    if sum(s is not None for s in sources) != 1:
        raise ConfigError(
            "--auth jwt needs exactly one of --jwt-key-file, --jwt-secret-file (GATEWAY_JWT_"
            "SECRET_FILE), --jwt-jwks-file, --jwt-jwks-url"
        )
    source: KeySource
    if config.jwt_jwks_url is not None:
        if config.jwt_jwks_cache_s <= 0:
            raise ConfigError("--jwt-jwks-cache-s must be positive")
        source = JwksUrl(check_jwks_url(config.jwt_jwks_url), ttl_s=config.jwt_jwks_cache_s)
    else:
        if config.jwt_key_file is not None:
            keys = [load_pem_key(config.jwt_key_file)]
        elif config.jwt_secret_file is not None:
            keys = [load_secret(config.jwt_secret_file)]
        else:
            assert config.jwt_jwks_file is not None
            path = config.jwt_jwks_file
            try:
                keys = parse_jwks(read_file(path, "JWKS file"), repr(path))
            except ConfigError:
                raise
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if not any(k.fits(a) for k in keys for a in algorithms):
            kinds = sorted({a for k in keys for a in k.algorithms})
            raise ConfigError(
                f"no key fits --jwt-algorithms {','.join(algorithms)} (the keys verify "
                f"{', '.join(kinds)})"
            )
        source = StaticKeys(tuple(keys))
    return JwtVerifier(
        source,
        algorithms,
        config.jwt_issuer,
        tuple(config.jwt_audience),
        config.jwt_leeway_s,
        config.jwt_subject_claim,
    )


def split_list(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """`a,b` or ["a", "b,c"] -> ("a", "b", "c"), blanks left out."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    return tuple(p.strip() for item in items for p in item.split(",") if p.strip())


def describe(config: AuthConfig) -> Mapping[str, Any]:
    """What to log at start (no secrets)."""
    if config.mode != "jwt":
        return {
            "auth": config.mode,
            **({"header": config.header} if config.mode != "anonymous" else {}),
        }
    return {
        "auth": "jwt",
        "algorithms": ",".join(config.jwt_algorithms),
        "issuer": config.jwt_issuer,
        "audience": ",".join(config.jwt_audience),
    }
