"""Who a gRPC call is: its service token (if the relay has any) and the subject it acts for; and the
transport that carries it (TLS, mutual TLS).

Without tokens the relay trusts every caller to name its subject (`x-relay-subject` metadata):
that is the embedded, loopback-only default. With tokens, every call but those to the open
services (health and reflection by default) must carry `authorization: Bearer <secret>` with
one of them: `AuthInterceptor` refuses the others with UNAUTHENTICATED before any handler runs,
and `Authenticator.caller` tells the handlers whom a call acts for.

Tokens come from `--tokens` / RELAY_TOKENS (comma-separated secrets, each trusted to act for any
subject) and from a TOML file (`--tokens-file`) of named, narrower tokens:

    [tokens.gateway]
    secret_env = "GATEWAY_RELAY_TOKEN"   # or secret_file = "path", or secret = "..." (inline)
    act_for_subjects = true              # may name a subject (x-relay-subject, Subscribe.subject)
    [tokens.billing]
    secret_env = "BILLING_TOKEN"
    subject = "service:billing"          # the subject it acts as (default "token:billing")
    profiles = ["echo", "gpt"]           # producer profiles it may start (default: any)

Secrets are kept only as SHA-256 digests and compared with hmac.compare_digest, so neither the
time a comparison takes nor the secrets' lengths tell a caller anything.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import tomllib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote

import grpc

from relay.domain.errors import InvalidArgument, PermissionDenied, Unauthenticated
from relay.domain.model import SUBJECT_MAX_CHARS, Caller, shown
from relay.rpc.convert import SUBJECT_METADATA

Metadata = Iterable[tuple[str, str | bytes]]

AUTHORIZATION_METADATA = "authorization"
TOKEN_MAX_CHARS = 4_096
SECRET_MIN_CHARS = 16  # a relay refuses shorter secrets: they could be guessed

HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICES = frozenset(
    {"grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}
)
OPEN_SERVICE_ALIASES: Mapping[str, frozenset[str]] = {
    "health": frozenset({HEALTH_SERVICE}),
    "reflection": REFLECTION_SERVICES,
}
DEFAULT_OPEN_SERVICES = "health,reflection"


class SecurityError(ValueError):
    """Security configuration that cannot work (a malformed tokens file, an unreadable or
    mismatched certificate); the message names the file and what is wrong, never a secret."""


def check_token(token: str) -> None:
    """Raises ValueError unless `token` can travel as a metadata value: 1 to TOKEN_MAX_CHARS
    visible ASCII characters. The message never quotes the token."""
    if not 0 < len(token) <= TOKEN_MAX_CHARS or not all("!" <= c <= "~" for c in token):
        raise ValueError(
            f"a service token must be 1 to {TOKEN_MAX_CHARS} visible ASCII characters "
            "(no spaces or control characters)"
        )


def read_pem(path: str | PathLike[str], what: str) -> bytes:
    """The bytes of a PEM file. Raises SecurityError (a ValueError) naming `what` and the file
    when it cannot be read or holds no PEM block (gRPC itself would only fail at the first
    handshake)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SecurityError(f"cannot read the {what} file {str(path)!r}: {exc.strerror}") from None
    if b"-----BEGIN " not in data:
        raise SecurityError(f"the {what} file {str(path)!r} is not PEM")
    return data


# -- tokens ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServiceToken:
    """A token the relay accepts. Only the secret's digest is kept."""

    name: str
    digest: bytes = field(repr=False)
    subject: str = ""  # the subject it acts as when it names none
    act_for_subjects: bool = False  # may name any subject
    profiles: frozenset[str] | None = None  # producer profiles it may start (None: any)

    @classmethod
    def of_secret(cls, name: str, secret: str, **kwargs: Any) -> ServiceToken:
        return cls(name, _digest(secret), **kwargs)


def _digest(secret: str | bytes) -> bytes:
    data = secret.encode("utf-8", "surrogateescape") if isinstance(secret, str) else secret
    return hashlib.sha256(data).digest()


def _check_secret(secret: str, where: str) -> None:
    try:
        check_token(secret)
    except ValueError:
        raise SecurityError(
            f"{where}: a secret must be visible ASCII characters (no spaces)"
        ) from None
    if len(secret) < SECRET_MIN_CHARS:
        raise SecurityError(f"{where}: a secret must have at least {SECRET_MIN_CHARS} characters")


def simple_tokens(secrets: str) -> list[ServiceToken]:
    """The tokens of `--tokens` / RELAY_TOKENS: comma-separated secrets, each trusted to act for
    any subject it names (and for the anonymous subject "" when it names none)."""
    tokens = []
    for number, secret in enumerate((s.strip() for s in secrets.split(",")), 1):
        if secret:
            _check_secret(secret, f"--tokens (RELAY_TOKENS): secret #{number}")
            tokens.append(ServiceToken.of_secret(f"#{number}", secret, act_for_subjects=True))
    return tokens


_TOKEN_FIELDS = frozenset(
    {"secret", "secret_env", "secret_file", "subject", "act_for_subjects", "profiles"}
)


def load_tokens_file(
    path: str | PathLike[str], env: Mapping[str, str] | None = None
) -> list[ServiceToken]:
    """The tokens of a TOML tokens file (see the module's doc). Raises SecurityError naming the
    file, the token and the field for anything malformed, and for a file with no tokens (which
    would turn authentication off)."""
    env = os.environ if env is None else env
    try:
        document = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise SecurityError(f"cannot read the tokens file {str(path)!r}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SecurityError(f"{path}: {exc}") from None
    unknown = set(document) - {"tokens"}
    if unknown:
        raise SecurityError(f"{path}: unknown tables {sorted(unknown)} (only [tokens.<name>])")
    tables = document.get("tokens", {})
    if not isinstance(tables, dict) or not tables:
        raise SecurityError(f"{path}: no tokens; add at least one [tokens.<name>] table")
    tokens = [_file_token(Path(path), name, table, env) for name, table in tables.items()]
    seen: dict[bytes, str] = {}
    for token in tokens:
        if token.digest in seen:
            raise SecurityError(
                f"{path}: tokens {shown(seen[token.digest])} and {shown(token.name)} have the "
                "same secret"
            )
        seen[token.digest] = token.name
    return tokens


def _file_token(path: Path, name: str, table: Any, env: Mapping[str, str]) -> ServiceToken:
    where = f"{path}: token {shown(name)}"
    if not isinstance(table, dict):
        raise SecurityError(f"{where} must be a table")
    unknown = set(table) - _TOKEN_FIELDS
    if unknown:
        raise SecurityError(f"{where}: unknown fields {sorted(unknown)}")
    sources = [key for key in ("secret", "secret_env", "secret_file") if key in table]
    if len(sources) != 1:
        raise SecurityError(f"{where}: give exactly one of secret_env, secret_file or secret")
    source = sources[0]
    value = table[source]
    if not isinstance(value, str) or not value:
        raise SecurityError(f"{where}: {source} must be a non-empty string")
    if source == "secret_env":
        secret = env.get(value, "")
        if not secret:
            raise SecurityError(f"{where}: secret_env: the variable {value} is not set")
    elif source == "secret_file":
        secret_path = path.parent / value  # relative to the tokens file
        try:
            secret = secret_path.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise SecurityError(f"{where}: secret_file {str(secret_path)!r}: {reason}") from None
    else:
        secret = value
    _check_secret(secret, f"{where}: {source}")
    subject = table.get("subject", f"token:{name}")
    if not isinstance(subject, str) or len(subject) > SUBJECT_MAX_CHARS:
        raise SecurityError(f"{where}: subject must be a string of at most {SUBJECT_MAX_CHARS}")
    act_for = table.get("act_for_subjects", False)
    if not isinstance(act_for, bool):
        raise SecurityError(f"{where}: act_for_subjects must be true or false")
    profiles = table.get("profiles")
    if profiles is not None and (
        not isinstance(profiles, list) or not all(isinstance(p, str) and p for p in profiles)
    ):
        raise SecurityError(f"{where}: profiles must be a list of profile names")
    return ServiceToken.of_secret(
        name,
        secret,
        subject=subject,
        act_for_subjects=act_for,
        profiles=None if profiles is None else frozenset(profiles),
    )


class Authenticator:
    """Checks calls against the relay's service tokens; with none, authentication is off and
    every caller is trusted to name its subject. `replace` swaps the tokens (rotation) for
    every call that starts afterwards."""

    def __init__(self, tokens: Iterable[ServiceToken] = ()) -> None:
        self._tokens = tuple(tokens)

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    @property
    def tokens(self) -> tuple[ServiceToken, ...]:
        return self._tokens

    def replace(self, tokens: Iterable[ServiceToken]) -> None:
        """New tokens. Never none once there were some: that would turn authentication off."""
        new = tuple(tokens)
        if self._tokens and not new:
            raise SecurityError("refusing to replace the service tokens with none")
        self._tokens = new

    def token_of(self, metadata: Metadata | None) -> ServiceToken | None:
        """The token a call presents (None when authentication is off). Raises Unauthenticated;
        its message never quotes what was presented."""
        tokens = self._tokens
        if not tokens:
            return None
        values = [value for key, value in metadata or () if key == AUTHORIZATION_METADATA]
        if not values:
            raise Unauthenticated(
                "this relay requires a service token: send `authorization: Bearer <token>` metadata"
            )
        if len(values) > 1:
            raise Unauthenticated("more than one authorization metadata entry")
        value = values[0]
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        scheme, _, secret = text.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise Unauthenticated("the authorization metadata must be `Bearer <token>`")
        digest = _digest(secret.strip())
        found = None
        for token in tokens:  # every token compared, in constant time each
            if hmac.compare_digest(digest, token.digest):
                found = token
        if found is None:
            raise Unauthenticated("the service token is not valid")
        return found

    def caller(self, metadata: Metadata | None, subject: str | None = None) -> Caller:
        """The Caller of a call with this invocation metadata. `subject`, if not empty, is one a
        request names for itself (an AttachMany subscription's) and overrides the metadata's.
        Raises Unauthenticated (no or a wrong token), PermissionDenied (the token may not act
        for the subject named) or InvalidArgument (a subject that is not percent-encoded
        UTF-8)."""
        named = subject or _named_subject(metadata)
        token = self.token_of(metadata)
        if token is None:
            return Caller(subject=named or "")
        if not named or named == token.subject:
            return Caller(subject=token.subject, profiles=token.profiles)
        if not token.act_for_subjects:
            raise PermissionDenied(
                f"service token {shown(token.name)} may not act for another subject "
                "(act_for_subjects is off)"
            )
        return Caller(subject=named, profiles=token.profiles)


def _named_subject(metadata: Metadata | None) -> str | None:
    for key, value in metadata or ():
        if key == SUBJECT_METADATA:
            text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
            try:
                subject = unquote(text, errors="strict")
            except UnicodeDecodeError:
                raise InvalidArgument(f"{SUBJECT_METADATA} must be percent-encoded UTF-8") from None
            if len(subject) > SUBJECT_MAX_CHARS:
                raise InvalidArgument(
                    f"{SUBJECT_METADATA} is longer than {SUBJECT_MAX_CHARS} characters"
                )
            return subject
    return None


# -- the interceptor -------------------------------------------------------------------------------


def open_services(text: str) -> frozenset[str]:
    """The services of `--auth-open-services`: `health`, `reflection`, full gRPC service names
    (e.g. grpc.health.v1.Health), comma-separated; `none` for none. Raises SecurityError."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["none"]:
        return frozenset()
    services: set[str] = set()
    for name in names:
        if name in OPEN_SERVICE_ALIASES:
            services |= OPEN_SERVICE_ALIASES[name]
        elif "." in name and name != "none":
            services.add(name)
        else:
            raise SecurityError(
                f"--auth-open-services: {shown(name)} is not health, reflection, none or a full "
                "gRPC service name"
            )
    return frozenset(services)


_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")

_REFUSALS: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses a call without a valid token (UNAUTHENTICATED), or naming in its metadata a
    subject its token may not act for (PERMISSION_DENIED), before any handler runs; calls to
    `open` services pass. The handlers still ask `Authenticator.caller` whom a call acts for
    (an AttachMany subscription may name its own subject)."""

    def __init__(self, authenticator: Authenticator, open: frozenset[str]) -> None:
        self.authenticator = authenticator
        self.open = open

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[_Req, _Resp] | None]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[_Req, _Resp] | None:
        service = details.method.lstrip("/").split("/", 1)[0]
        if not self.authenticator.enabled or service in self.open:
            return await continuation(details)
        try:
            self.authenticator.caller(details.invocation_metadata)
        except (Unauthenticated, PermissionDenied, InvalidArgument) as exc:
            code = next(code for kind, code in _REFUSALS if isinstance(exc, kind))
            handler = await continuation(details)
            return None if handler is None else _refusing(handler, code, str(exc))
        return await continuation(details)


def _refusing(
    handler: grpc.RpcMethodHandler[_Req, _Resp], code: grpc.StatusCode, detail: str
) -> grpc.RpcMethodHandler[_Req, _Resp]:
    """A handler of the same kind as `handler` that only refuses the call; it reads nothing."""

    async def refuse(request: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(code, detail)

    async def refuse_streaming(request: object, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, detail)
        yield  # an async generator, as grpc.aio expects of a streaming response

    streaming = handler.request_streaming, handler.response_streaming
    make: Callable[..., grpc.RpcMethodHandler[_Req, _Resp]] = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[streaming]
    return make(
        refuse_streaming if handler.response_streaming else refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


# -- TLS ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerTLS:
    """The relay's TLS: its certificate chain and key (PEM files); with `client_ca`, clients
    must present a certificate that CA signed (mutual TLS)."""

    cert: str
    key: str
    client_ca: str = ""

    def credentials(self) -> grpc.ServerCredentials:
        """Reads and checks the files now. Raises SecurityError naming a file that cannot be
        read, is not what it should be, or a key that does not match the certificate."""
        chain = read_pem(self.cert, "TLS certificate")
        key = read_pem(self.key, "TLS key")
        _check_key_pair(chain, key, self.cert, self.key)
        ca = None
        if self.client_ca:
            ca = read_pem(self.client_ca, "client CA")
            _certificates(ca, self.client_ca, "client CA")
        return grpc.ssl_server_credentials(
            [(key, chain)], root_certificates=ca, require_client_auth=ca is not None
        )

    @property
    def mode(self) -> str:
        return "mtls" if self.client_ca else "tls"


def _certificates(data: bytes, path: str, what: str) -> list[Any]:
    from cryptography import x509

    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        certificates = []
    if not certificates:
        raise SecurityError(f"the {what} file {path!r} holds no valid PEM certificate")
    return certificates


def _check_key_pair(chain: bytes, key: bytes, cert_path: str, key_path: str) -> None:
    from cryptography.hazmat.primitives import serialization

    certificate = _certificates(chain, cert_path, "TLS certificate")[0]
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as exc:
        reason = "it is encrypted" if isinstance(exc, TypeError) else "not a PEM private key"
        raise SecurityError(f"the TLS key file {key_path!r} cannot be used: {reason}") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(*spki) != certificate.public_key().public_bytes(*spki):
        raise SecurityError(
            f"the TLS key file {key_path!r} does not match the certificate {cert_path!r}"
        )


@dataclass(frozen=True, slots=True)
class Security:
    """What `relay.server.start_server` puts on the port: the authenticator (shared with the
    service's handlers), the services open without a token, and TLS (None: plaintext)."""

    authenticator: Authenticator = field(default_factory=Authenticator)
    open_services: frozenset[str] = field(
        default_factory=lambda: open_services(DEFAULT_OPEN_SERVICES)
    )
    tls: ServerTLS | None = None

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        if not self.authenticator.enabled:
            return []
        return [AuthInterceptor(self.authenticator, self.open_services)]
