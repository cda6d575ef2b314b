"""The gateway's security (issue 11): end-user authentication (JWTs from each key source, a
trusted header), chats that belong to a subject on every route, limits on SSE connections, the
relay's RESOURCE_EXHAUSTED as 429 + Retry-After, and browser safety (Host, CSRF, CORS, headers).

Everything runs against real servers on ephemeral ports (uvicorn, the relay, a JWKS server); no
test waits on a sleep for synchronisation.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import http.server
import json
import re
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from jwt.algorithms import ECAlgorithm, HMACAlgorithm, RSAAlgorithm

from gateway.app import GatewaySettings, create_app
from gateway.auth import AuthConfig, ConfigError, JwksUrl, JwtVerifier, build_verifier
from gateway.security import PAGE_CSP, default_allowed_hosts, host_allowed
from gateway.server import parse_args, settings_of
from relay.client import ClientTLS
from relay.v1 import relay_pb2 as pb
from relay.v1 import relay_pb2_grpc
from tests import openapi_check
from tests.conftest import ROOT, Env, eventually, text_chunks
from tests.test_gateway import SseReader, serve
from tests.tls import make_certificates

CHECKED = {"response": [openapi_check.hook]}
JSON_TYPE = {"content-type": "application/json"}
ISSUER = "https://issuer.test"
AUDIENCE = "stream-relay-test"


# ---- keys and tokens -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    rsa_key: rsa.RSAPrivateKey
    ec_key: ec.EllipticCurvePrivateKey
    secret: bytes
    other_rsa: rsa.RSAPrivateKey  # a key the gateway does not know

    def pem(self, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
        return bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def jwks(self, *kinds: str) -> dict[str, Any]:
        """A JWK Set with the public RSA ("rsa", kid k-rsa), EC ("ec", kid k-ec) and the HMAC
        ("hs", kid k-hs) keys."""
        made = {
            "rsa": RSAAlgorithm.to_jwk(self.rsa_key.public_key(), as_dict=True),
            "ec": ECAlgorithm.to_jwk(self.ec_key.public_key(), as_dict=True),
            "hs": HMACAlgorithm.to_jwk(self.secret, as_dict=True),
            "other": RSAAlgorithm.to_jwk(self.other_rsa.public_key(), as_dict=True),
        }
        return {"keys": [{**made[k], "kid": f"k-{k}", "use": "sig"} for k in kinds]}


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec.generate_private_key(ec.SECP256R1()),
        b"0123456789abcdef0123456789abcdef-test-secret",
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
    )


def claims(**changes: Any) -> dict[str, Any]:
    """Good claims for subject alice; a change to None leaves the claim out."""
    now = int(time.time())
    base = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 600}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def token(key: Any, algorithm: str, kid: str | None = None, /, **changes: Any) -> str:
    return jwt.encode(
        claims(**changes), key, algorithm=algorithm, headers={"kid": kid} if kid else None
    )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict[str, Any], payload: dict[str, Any], sign: Callable[[bytes], bytes]) -> str:
    """A JWT made by hand (what PyJWT would refuse to make): `sign` gets the signing input."""
    head = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    return head + "." + b64(sign(head.encode()))


def bearer(value: str) -> dict[str, str]:
    return {"authorization": f"Bearer {value}"}


# ---- running gateways ----------------------------------------------------------------------------


@dataclass
class Running:
    url: str
    http: httpx.AsyncClient
    app: Any

    @property
    def slots_open(self) -> int:
        return int(self.app.state.gateway.slots.open)

    def chat_body(self, chat_id: str, text: str = "hi", **extra: Any) -> dict[str, Any]:
        message = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": text}]}
        return {"id": chat_id, "messages": [message], "trigger": "submit-message", **extra}

    @asynccontextmanager
    async def open(self, method: str, path: str, **kwargs: Any) -> AsyncIterator[SseReader]:
        async with self.http.stream(method, self.url + path, **kwargs) as response:
            yield SseReader(response)


@asynccontextmanager
async def running(
    settings: GatewaySettings, *, checked: bool = True, **app_args: Any
) -> AsyncIterator[Running]:
    app = create_app(settings, **app_args)
    server, task, url = await serve(app)
    hooks = CHECKED if checked else {}
    try:
        async with httpx.AsyncClient(timeout=10, event_hooks=hooks) as http:
            yield Running(url, http, app)
    finally:
        server.should_exit = True
        await task


def jwt_config(**changes: Any) -> AuthConfig:
    return replace(
        AuthConfig(mode="jwt", jwt_issuer=ISSUER, jwt_audience=(AUDIENCE,), jwt_leeway_s=5),
        **changes,
    )


def write(path: Path, data: bytes | str) -> str:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


# ---- JWTs ----------------------------------------------------------------------------------------


KEY_SOURCES = ["secret file", "rsa pem", "ec pem", "certificate", "jwks file"]


def source_config(source: str, keys: Keys, tmp_path: Path) -> AuthConfig:
    if source == "secret file":
        return jwt_config(jwt_secret_file=write(tmp_path / "secret", keys.secret + b"\n"))
    if source == "rsa pem":
        return jwt_config(jwt_key_file=write(tmp_path / "rsa.pem", keys.pem(keys.rsa_key)))
    if source == "ec pem":
        return jwt_config(jwt_key_file=write(tmp_path / "ec.pem", keys.pem(keys.ec_key)))
    if source == "certificate":
        return jwt_config(jwt_key_file=write(tmp_path / "cert.pem", self_signed(keys.rsa_key)))
    jwks = json.dumps(keys.jwks("rsa", "ec", "hs"))
    return jwt_config(jwt_jwks_file=write(tmp_path / "jwks.json", jwks))


def self_signed(key: rsa.RSAPrivateKey) -> bytes:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def good_tokens(source: str, keys: Keys) -> list[str]:
    """A valid token for each algorithm the source's keys verify."""
    if source == "secret file":
        return [token(keys.secret, "HS256")]
    if source in ("rsa pem", "certificate"):
        return [token(keys.rsa_key, "RS256")]
    if source == "ec pem":
        return [token(keys.ec_key, "ES256")]
    return [
        token(keys.secret, "HS256", "k-hs"),
        token(keys.rsa_key, "RS256", "k-rsa"),
        token(keys.ec_key, "ES256", "k-ec"),
        token(keys.rsa_key, "RS256"),  # no kid: every key of the right kind is tried
    ]


@pytest.mark.parametrize("source", KEY_SOURCES)
async def test_jwts_from_each_key_source_are_accepted_and_name_the_subject(
    env: Env, keys: Keys, tmp_path: Path, source: str
) -> None:
    settings = GatewaySettings(relay_target=env.target, auth=source_config(source, keys, tmp_path))
    async with running(settings) as gw:
        for good in good_tokens(source, keys):
            answer = await gw.http.post(
                gw.url + "/api/chat",
                json=gw.chat_body("c", options={"chunks": "2"}),
                headers=bearer(good),
            )
            assert answer.status_code == 200, answer.text
            listed = await gw.http.get(gw.url + "/api/chat/c/messages", headers=bearer(good))
            assert listed.status_code == 200
            assert [m["role"] for m in listed.json()["messages"]][-2:] == ["user", "assistant"]
        none = await gw.http.get(gw.url + "/api/chat/c/messages")
        assert none.status_code == 401


def bad_tokens(keys: Keys) -> dict[str, dict[str, str]]:
    """Requests' headers that must each get a 401, against a gateway verifying RS256 and ES256
    with the RSA key (PEM) and HS256 with no key at all."""
    rsa_pem = keys.pem(keys.rsa_key)
    payload = claims()
    return {
        "no Authorization header": {},
        "a bare scheme": {"authorization": "Bearer"},
        "another scheme": {"authorization": "Basic YWxpY2U6cGFzcw=="},
        "not a JWT": bearer("not-a-jwt"),
        "signed by another key": bearer(token(keys.other_rsa, "RS256")),
        "a tampered payload": bearer(
            ".".join(
                (lambda p: [p[0], b64(json.dumps(claims(sub="admin")).encode()), p[2]])(
                    token(keys.rsa_key, "RS256").split(".")
                )
            )
        ),
        "expired": bearer(token(keys.rsa_key, "RS256", exp=int(time.time()) - 60)),
        "not valid yet": bearer(token(keys.rsa_key, "RS256", nbf=int(time.time()) + 3600)),
        "without exp": bearer(token(keys.rsa_key, "RS256", exp=None)),
        "another issuer": bearer(token(keys.rsa_key, "RS256", iss="https://evil.test")),
        "another audience": bearer(token(keys.rsa_key, "RS256", aud="another-service")),
        "without a subject": bearer(token(keys.rsa_key, "RS256", sub=None)),
        "an empty subject": bearer(token(keys.rsa_key, "RS256", sub="")),
        "a blank subject": bearer(token(keys.rsa_key, "RS256", sub="   ")),
        # HS256 with the RSA public key as the HMAC secret: the classic algorithm confusion.
        "HS256 signed with the public key": bearer(
            forged(
                {"alg": "HS256", "typ": "JWT"},
                payload,
                lambda data: hmac.new(rsa_pem, data, hashlib.sha256).digest(),
            )
        ),
        "alg none": bearer(forged({"alg": "none", "typ": "JWT"}, payload, lambda _: b"")),
        "alg None": bearer(forged({"alg": "None", "typ": "JWT"}, payload, lambda _: b"")),
        "an algorithm not allowed (RS512)": bearer(token(keys.rsa_key, "RS512")),
        "ES256 by a key of another kind": bearer(token(keys.ec_key, "ES256")),
    }


async def test_bad_tokens_get_401_and_start_nothing(env: Env, keys: Keys, tmp_path: Path) -> None:
    config = jwt_config(
        jwt_key_file=write(tmp_path / "rsa.pem", keys.pem(keys.rsa_key)),
        jwt_algorithms=("RS256", "ES256", "HS256"),
    )
    async with running(GatewaySettings(relay_target=env.target, auth=config)) as gw:
        good = bearer(token(keys.rsa_key, "RS256"))
        assert (await gw.http.get(gw.url + "/api/chat/c/messages", headers=good)).status_code == 200
        for case, headers in bad_tokens(keys).items():
            for method, path in (
                ("POST", "/api/chat"),
                ("GET", "/api/chat/c/stream"),
                ("POST", "/api/chat/c/stop"),
                ("GET", "/api/chat/c/messages"),
            ):
                body = gw.chat_body("c") if path == "/api/chat" else {}
                response = await gw.http.request(
                    method,
                    gw.url + path,
                    headers=headers,
                    json=body if method == "POST" else None,
                )
                assert response.status_code == 401, (case, method, path, response.text)
                assert response.headers["www-authenticate"].startswith("Bearer"), case
                assert response.json()["error"]["code"] == "unauthenticated", case
        assert env.relay.streams == {}


async def test_leeway_allows_clock_skew(env: Env, keys: Keys, tmp_path: Path) -> None:
    config = jwt_config(jwt_key_file=write(tmp_path / "rsa.pem", keys.pem(keys.rsa_key)))
    now = int(time.time())
    async with running(GatewaySettings(relay_target=env.target, auth=config)) as gw:
        for changes, status in (
            ({"exp": now - 2}, 200),  # expired 2 s ago: within the 5 s leeway
            ({"nbf": now + 2}, 200),
            ({"exp": now - 30}, 401),
            ({"nbf": now + 30}, 401),
        ):
            headers = bearer(token(keys.rsa_key, "RS256", **changes))
            response = await gw.http.get(gw.url + "/api/chat/c/messages", headers=headers)
            assert response.status_code == status, changes


async def test_a_custom_subject_claim(env: Env, keys: Keys, tmp_path: Path) -> None:
    config = jwt_config(
        jwt_secret_file=write(tmp_path / "secret", keys.secret), jwt_subject_claim="email"
    )
    async with running(GatewaySettings(relay_target=env.target, auth=config)) as gw:
        ok = bearer(token(keys.secret, "HS256", email="alice@example.com"))
        assert (await gw.http.get(gw.url + "/api/chat/c/messages", headers=ok)).status_code == 200
        without = bearer(token(keys.secret, "HS256"))
        refused = await gw.http.get(gw.url + "/api/chat/c/messages", headers=without)
        assert refused.status_code == 401 and "email" in refused.json()["error"]["message"]


# ---- a JWKS URL ----------------------------------------------------------------------------------


@dataclass
class JwksServer:
    """Serves a JWK Set over HTTP on loopback, counting the fetches; `hold` makes a fetch wait
    until it is released (to show the gateway serves meanwhile)."""

    document: dict[str, Any]
    fetches: int = 0
    status: int = 200
    hold: threading.Event | None = None
    arrived: threading.Event = field(default_factory=threading.Event)
    url: str = ""
    redirect: str | None = None

    @contextmanager
    def serving(self) -> Iterator[JwksServer]:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.fetches += 1
                outer.arrived.set()
                if outer.hold is not None:
                    outer.hold.wait(30)
                body = json.dumps(outer.document).encode()
                self.send_response(outer.status)
                if outer.redirect is not None:
                    self.send_header("location", outer.redirect)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        self.url = f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"
        try:
            yield self
        finally:
            if self.hold is not None:
                self.hold.set()
            server.shutdown()
            server.server_close()
            thread.join()


def url_verifier(url: str, *, min_refresh_s: float = 30.0) -> JwtVerifier:
    return JwtVerifier(
        JwksUrl(url, min_refresh_s=min_refresh_s),
        ("RS256", "ES256"),
        ISSUER,
        (AUDIENCE,),
    )


async def test_a_jwks_url_is_fetched_once_for_many_requests(env: Env, keys: Keys) -> None:
    with JwksServer(keys.jwks("rsa", "ec")).serving() as jwks:
        config = jwt_config(jwt_jwks_url=jwks.url)
        async with running(GatewaySettings(relay_target=env.target, auth=config)) as gw:
            assert jwks.fetches == 0  # fetched on the first request, not before
            tokens = [
                token(keys.rsa_key, "RS256", "k-rsa"),
                token(keys.ec_key, "ES256", "k-ec"),
            ] * 10
            answers = await asyncio.gather(
                *(gw.http.get(gw.url + "/api/chat/c/messages", headers=bearer(t)) for t in tokens)
            )
            assert [a.status_code for a in answers] == [200] * len(tokens)
            bad = bearer(token(keys.other_rsa, "RS256", "k-rsa"))
            refused = await gw.http.get(gw.url + "/api/chat/c/messages", headers=bad)
            assert refused.status_code == 401
            # A kid the set lacks asks again, at most once per 30 s: not now.
            unknown = bearer(token(keys.other_rsa, "RS256", "k-unknown"))
            for _ in range(5):
                refused = await gw.http.get(gw.url + "/api/chat/c/messages", headers=unknown)
                assert refused.status_code == 401
        assert jwks.fetches == 1


async def test_a_rotated_key_is_fetched_when_a_token_names_it(env: Env, keys: Keys) -> None:
    with JwksServer(keys.jwks("rsa")).serving() as jwks:
        settings = GatewaySettings(relay_target=env.target)
        async with running(settings, verifier=url_verifier(jwks.url, min_refresh_s=0)) as gw:
            first = bearer(token(keys.rsa_key, "RS256", "k-rsa"))
            assert (
                await gw.http.get(gw.url + "/api/chat/c/messages", headers=first)
            ).status_code == 200
            rotated = bearer(token(keys.other_rsa, "RS256", "k-other"))
            refused = await gw.http.get(gw.url + "/api/chat/c/messages", headers=rotated)
            assert refused.status_code == 401 and jwks.fetches == 2
            jwks.document = keys.jwks("rsa", "other")
            accepted = await gw.http.get(gw.url + "/api/chat/c/messages", headers=rotated)
            assert accepted.status_code == 200 and jwks.fetches == 3
            # The known key needs no fetch.
            assert (
                await gw.http.get(gw.url + "/api/chat/c/messages", headers=first)
            ).status_code == 200
            assert jwks.fetches == 3


async def test_a_jwks_fetch_does_not_block_the_gateway(env: Env, keys: Keys) -> None:
    with JwksServer(keys.jwks("rsa"), hold=threading.Event()).serving() as jwks:
        assert jwks.hold is not None
        config = jwt_config(jwt_jwks_url=jwks.url)
        async with running(GatewaySettings(relay_target=env.target, auth=config)) as gw:
            headers = bearer(token(keys.rsa_key, "RS256", "k-rsa"))
            waiting = asyncio.create_task(
                gw.http.get(gw.url + "/api/chat/c/messages", headers=headers)
            )
            await asyncio.to_thread(jwks.arrived.wait, 10)
            # The fetch hangs on the JWKS server; the event loop serves others meanwhile.
            health = await gw.http.get(gw.url + "/healthz")
            assert health.status_code == 200 and not waiting.done()
            jwks.hold.set()
            assert (await waiting).status_code == 200


async def test_a_hung_identity_provider_never_holds_requests_whose_keys_are_known(
    env: Env, keys: Keys
) -> None:
    """Once the cached keys are stale, they still answer at once while the refresh hangs in the
    background (before, every signed-in request waited for that fetch)."""
    with JwksServer(keys.jwks("rsa")).serving() as jwks:
        source = JwksUrl(jwks.url, ttl_s=0, min_refresh_s=0)
        verifier = JwtVerifier(source, ("RS256",), ISSUER, (AUDIENCE,))
        settings = GatewaySettings(relay_target=env.target)
        async with running(settings, verifier=verifier) as gw:
            headers = bearer(token(keys.rsa_key, "RS256", "k-rsa"))
            first = await gw.http.get(gw.url + "/api/chat/c/messages", headers=headers)
            assert first.status_code == 200 and jwks.fetches == 1
            jwks.hold, jwks.arrived = threading.Event(), threading.Event()
            answers = await asyncio.gather(
                *(gw.http.get(gw.url + "/api/chat/c/messages", headers=headers) for _ in range(5))
            )
            assert [a.status_code for a in answers] == [200] * 5
            assert jwks.arrived.is_set() and jwks.fetches == 2  # one refresh, still hanging
            jwks.hold.set()
            assert source._fetch_task is not None
            await source._fetch_task  # done before the server goes


async def test_a_jwks_redirect_to_plain_http_elsewhere_is_not_followed(
    env: Env, keys: Keys
) -> None:
    with JwksServer(keys.jwks("rsa"), status=302).serving() as jwks:
        jwks.redirect = "http://jwks.evil.example/keys.json"
        with pytest.raises(ValueError, match="the JWKS redirect"):  # not followed, not fetched
            await asyncio.to_thread(JwksUrl(jwks.url)._fetch)
        config = jwt_config(jwt_jwks_url=jwks.url)
        async with running(GatewaySettings(relay_target=env.target, auth=config)) as gw:
            headers = bearer(token(keys.rsa_key, "RS256", "k-rsa"))
            response = await gw.http.get(gw.url + "/api/chat/c/messages", headers=headers)
        assert response.status_code == 503 and jwks.fetches == 2


async def test_unreachable_keys_are_503_not_401(env: Env, keys: Keys) -> None:
    with JwksServer({"keys": []}, status=500).serving() as jwks:
        config = jwt_config(jwt_jwks_url=jwks.url)
        async with running(GatewaySettings(relay_target=env.target, auth=config)) as gw:
            headers = bearer(token(keys.rsa_key, "RS256", "k-rsa"))
            response = await gw.http.get(gw.url + "/api/chat/c/messages", headers=headers)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "auth_unavailable"


# ---- trusted header ------------------------------------------------------------------------------


async def test_trusted_header_mode(env: Env) -> None:
    config = AuthConfig(mode="trusted-header", header="X-Forwarded-User")
    async with running(GatewaySettings(relay_target=env.target, auth=config)) as gw:
        missing = await gw.http.get(gw.url + "/api/chat/c/messages")
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthenticated"
        assert missing.headers["www-authenticate"].startswith("Bearer")
        blank = await gw.http.get(gw.url + "/api/chat/c/messages", headers={"x-forwarded-user": ""})
        assert blank.status_code == 401
        # Twice: a proxy that appended its value after the client's forged one. Refused, not
        # the first value (which would be the client's choice).
        twice = await gw.http.get(
            gw.url + "/api/chat/c/messages",
            headers=[("x-forwarded-user", "alice"), ("x-forwarded-user", "mallory")],
        )
        assert twice.status_code == 401
        assert twice.json()["error"]["message"] == "X-Forwarded-User given 2 times"
        too_long = await gw.http.get(
            gw.url + "/api/chat/c/messages", headers={"x-forwarded-user": "a" * 300}
        )
        assert too_long.status_code == 401
        alice = {"x-forwarded-user": "alice@example.com"}
        answer = await gw.http.post(
            gw.url + "/api/chat", json=gw.chat_body("c", options={"chunks": "2"}), headers=alice
        )
        assert answer.status_code == 200
        listed = await gw.http.get(gw.url + "/api/chat/c/messages", headers=alice)
        assert [m["role"] for m in listed.json()["messages"]] == ["user", "assistant"]
        # Health, metrics, the OpenAPI document and the page need no credential.
        for path in ("/healthz", "/metrics", "/openapi.json", "/", "/demo.js", "/demo.css"):
            assert (await gw.http.get(gw.url + path)).status_code == 200, path


# ---- chats belong to their subject ---------------------------------------------------------------

OWNERSHIP = pytest.mark.xfail(strict=True, reason="relay ownership pending")


@pytest.mark.parametrize("reads", ["shared", "per-request"])
async def test_another_subject_cannot_see_resume_stop_or_take_over_a_chat(
    env: Env, reads: str
) -> None:
    """Mallory knows the id of Alice's chat: every route answers as for an unknown chat, and
    Alice's live answer and her history are as they were."""
    config = AuthConfig(mode="trusted-header")
    settings = GatewaySettings(relay_target=env.target, auth=config, relay_reads=reads)
    alice = {"x-forwarded-user": "alice"}
    mallory = {"x-forwarded-user": "mallory"}
    async with running(settings) as gw:
        body = gw.chat_body("shared-id", text="alice's secret", producer="scripted")
        async with gw.open("POST", "/api/chat", json=body, headers=alice) as sse:
            assert sse.response.status_code == 200
            stream_id = sse.response.headers["x-stream-id"]
            script = gw_script(env, stream_id)
            script.put(*text_chunks(2))
            for _ in range(5):
                await sse.next()

            post = await gw.http.post(
                gw.url + "/api/chat",
                json=gw.chat_body("shared-id", text="mallory's", producer="scripted"),
                headers=mallory,
            )
            assert post.status_code == 404, post.text
            assert post.json()["error"]["code"] == "not_found"
            for last_event_id in (None, "2"):
                headers = dict(mallory)
                if last_event_id is not None:
                    headers["last-event-id"] = last_event_id
                resume = await gw.http.get(gw.url + "/api/chat/shared-id/stream", headers=headers)
                assert resume.status_code == 204
            for stop_body in ({}, {"activeStreamId": stream_id}):
                stop = await gw.http.post(
                    gw.url + "/api/chat/shared-id/stop", json=stop_body, headers=mallory
                )
                assert stop.status_code == 200
                assert stop.json()["stopped"] is False
                assert stop.json()["outcome"] == "no_active_stream"
            listed = await gw.http.get(gw.url + "/api/chat/shared-id/messages", headers=mallory)
            assert listed.json() == {"chatId": "shared-id", "messages": []}

            # Nothing changed: the same stream, not cancelled, Alice still reads it live.
            assert not script.cancelled.is_set()
            assert list(env.relay.streams) == [stream_id]
            script.put({"type": "text-end", "id": "t"}, {"type": "finish"}, None)
            rest = [e.chunk for e in await sse.rest()]
        assert rest[-1] == {"type": "finish"}
        mine = await gw.http.get(gw.url + "/api/chat/shared-id/messages", headers=alice)
        texts = [m["parts"][0].get("text") for m in mine.json()["messages"]]
        assert [m["role"] for m in mine.json()["messages"]] == ["user", "assistant"]
        assert texts[0] == "alice's secret"


def gw_script(env: Env, stream_id: str) -> Any:
    return env.scripted.script(stream_id)


# ---- SSE limits ----------------------------------------------------------------------------------


async def test_sse_limits_per_subject_and_in_total_answer_429_and_start_nothing(env: Env) -> None:
    settings = GatewaySettings(
        relay_target=env.target,
        auth=AuthConfig(mode="trusted-header"),
        max_sse_per_subject=2,
        max_sse_total=3,
    )

    def who(name: str) -> dict[str, str]:
        return {"x-forwarded-user": name}

    async with running(settings) as gw:
        opened: list[Any] = []

        async def open_chat(user: str, chat_id: str) -> SseReader:
            body = gw.chat_body(chat_id, producer="scripted")
            context = gw.open("POST", "/api/chat", json=body, headers=who(user))
            reader = await context.__aenter__()
            opened.append(context)
            assert reader.response.status_code == 200
            return reader

        try:
            await open_chat("alice", "a1")
            await open_chat("alice", "a2")
            # Alice's third stream, a new chat or a resume: 429, and nothing starts.
            refused = await gw.http.post(
                gw.url + "/api/chat",
                json=gw.chat_body("a3", producer="scripted"),
                headers=who("alice"),
            )
            assert refused.status_code == 429, refused.text
            assert refused.headers["retry-after"].isdigit()
            assert refused.json()["error"]["code"] == "too_many_streams"
            resumed = await gw.http.get(gw.url + "/api/chat/a1/stream", headers=who("alice"))
            assert resumed.status_code == 429 and "retry-after" in resumed.headers
            assert len(env.relay.streams) == 2
            a3 = await gw.http.get(gw.url + "/api/chat/a3/messages", headers=who("alice"))
            assert a3.json()["messages"] == []
            # Bob has his own allowance, until the total is reached.
            await open_chat("bob", "b1")
            total = await gw.http.post(
                gw.url + "/api/chat",
                json=gw.chat_body("c1", producer="scripted"),
                headers=who("carol"),
            )
            assert total.status_code == 429 and "retry-after" in total.headers
            assert len(env.relay.streams) == 3
            # Stops and message lists are not streams: they still work.
            listed = await gw.http.get(gw.url + "/api/chat/a1/messages", headers=who("alice"))
            assert listed.status_code == 200
            # Alice closes one: her next stream is served.
            await opened.pop(0).__aexit__(None, None, None)
            await eventually(lambda: gw.slots_open == 2)
            await open_chat("alice", "a3")
        finally:
            for context in reversed(opened):
                await context.__aexit__(None, None, None)
        await eventually(lambda: gw.slots_open == 0)


async def test_anonymous_clients_share_only_the_total(env: Env) -> None:
    """In anonymous mode everyone is one subject: the per-subject bound would be a global one."""
    settings = GatewaySettings(relay_target=env.target, max_sse_per_subject=1, max_sse_total=2)
    async with running(settings) as gw:
        body = gw.chat_body("x1", producer="scripted")
        async with gw.open("POST", "/api/chat", json=body) as first:
            assert first.response.status_code == 200
            body = gw.chat_body("x2", producer="scripted")
            async with gw.open("POST", "/api/chat", json=body) as second:
                assert second.response.status_code == 200
                third = await gw.http.post(
                    gw.url + "/api/chat", json=gw.chat_body("x3", producer="scripted")
                )
                assert third.status_code == 429 and "retry-after" in third.headers


async def test_a_refused_or_failed_stream_releases_its_slot(env: Env) -> None:
    settings = GatewaySettings(relay_target=env.target, max_sse_total=1)
    async with running(settings) as gw:
        for _ in range(3):  # a relay refusal (unknown producer) frees its place each time
            bad = await gw.http.post(gw.url + "/api/chat", json=gw.chat_body("c", producer="no"))
            assert bad.status_code == 400
            nothing = await gw.http.get(gw.url + "/api/chat/none/stream")
            assert nothing.status_code == 204
        assert gw.slots_open == 0
        done = await gw.http.post(
            gw.url + "/api/chat", json=gw.chat_body("c", options={"chunks": "2"})
        )
        assert done.status_code == 200
        await eventually(lambda: gw.slots_open == 0)


# ---- the relay's RESOURCE_EXHAUSTED --------------------------------------------------------------


class ExhaustedRelay(relay_pb2_grpc.RelayServiceServicer):
    """A relay that refuses Start and ListMessages as over a limit, with a RetryInfo or without,
    and records each call's metadata."""

    def __init__(self) -> None:
        self.retry_delay: float | None = 2.5
        self.metadata: list[dict[str, str | bytes]] = []

    async def _refuse(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.metadata.append({k: v for k, v in context.invocation_metadata() or ()})
        status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message="over a limit")
        if self.retry_delay is not None:
            info = error_details_pb2.RetryInfo(
                retry_delay=duration_pb2.Duration(
                    seconds=int(self.retry_delay), nanos=int(self.retry_delay % 1 * 1e9)
                )
            )
            status.details.add().Pack(info)
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "over a limit",
            trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),),
        )

    async def Start(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await self._refuse(context)

    async def ListMessages(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await self._refuse(context)

    async def GetActive(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        self.metadata.append({k: v for k, v in context.invocation_metadata() or ()})
        return pb.GetActiveResponse()


@asynccontextmanager
async def fake_relay(
    servicer: relay_pb2_grpc.RelayServiceServicer,
    credentials: grpc.ServerCredentials | None = None,
) -> AsyncIterator[str]:
    server = grpc.aio.server()
    relay_pb2_grpc.add_RelayServiceServicer_to_server(servicer, server)
    checker = health.aio.HealthServicer()
    await checker.set("relay.v1.RelayService", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=0)


@pytest.mark.parametrize("reads", ["shared", "per-request"])
async def test_resource_exhausted_from_the_relay_is_429_with_retry_after(reads: str) -> None:
    relay = ExhaustedRelay()  # type: ignore[abstract]  # the RPCs it lacks answer UNIMPLEMENTED
    async with fake_relay(relay) as target:
        settings = GatewaySettings(relay_target=target, relay_reads=reads)
        async with running(settings) as gw:
            chat = await gw.http.post(gw.url + "/api/chat", json=gw.chat_body("c"))
            assert chat.status_code == 429
            assert chat.headers["retry-after"] == "3"  # 2.5 s, rounded up
            assert chat.json()["error"] == {"code": "resource_exhausted", "message": "over a limit"}
            relay.retry_delay = None
            listed = await gw.http.get(gw.url + "/api/chat/c/messages")
            assert listed.status_code == 429 and listed.headers["retry-after"] == "1"


# ---- the connection to the relay: token and TLS -------------------------------------------------


async def test_the_relay_token_and_the_subject_go_with_every_call() -> None:
    relay = ExhaustedRelay()  # type: ignore[abstract]  # the RPCs it lacks answer UNIMPLEMENTED
    async with fake_relay(relay) as target:
        settings = GatewaySettings(
            relay_target=target,
            relay_token="s3cret-service-token",
            auth=AuthConfig(mode="trusted-header"),
        )
        assert "s3cret" not in repr(settings)
        async with running(settings) as gw:
            user = {b"x-forwarded-user": "zoë@example.com".encode()}
            await gw.http.get(gw.url + "/api/chat/c/messages", headers=user)
            await gw.http.get(gw.url + "/api/chat/c/stream", headers=user)
            assert (await gw.http.get(gw.url + "/healthz")).status_code == 200
    assert len(relay.metadata) == 2
    for seen in relay.metadata:
        assert seen["authorization"] == "Bearer s3cret-service-token"
        assert seen["x-relay-subject"] == "zo%C3%AB%40example.com"


async def test_mutual_tls_to_the_relay_from_the_flags(tmp_path: Path) -> None:
    made = make_certificates(tmp_path)
    credentials = grpc.ssl_server_credentials(
        [(made.server.key.read_bytes(), made.server.cert.read_bytes())],
        root_certificates=made.ca.cert.read_bytes(),
        require_client_auth=True,
    )
    relay = ExhaustedRelay()  # type: ignore[abstract]  # the RPCs it lacks answer UNIMPLEMENTED
    async with fake_relay(relay, credentials) as target:
        argv = [
            *("--relay", target, "--relay-tls-ca", str(made.ca.cert)),
            *("--relay-tls-cert", str(made.client.cert), "--relay-tls-key", str(made.client.key)),
        ]
        settings = replace(settings_of(parse_args(argv)), relay_target=target, relay_timeout_s=5)
        assert settings.relay_tls is not None
        async with running(settings) as gw:
            listed = await gw.http.get(gw.url + "/api/chat/c/messages")
            assert listed.status_code == 429  # the call reached the relay
        assert len(relay.metadata) == 1
        for refused_settings in (
            replace(settings, relay_tls=None),  # plaintext to a TLS port
            replace(settings, relay_tls=ClientTLS(ca=str(made.ca.cert))),  # no client cert
        ):
            async with running(refused_settings) as gw:
                refused = await gw.http.get(gw.url + "/api/chat/c/messages")
                assert refused.status_code in (503, 504), refused.text
        assert len(relay.metadata) == 1


# ---- configuration -------------------------------------------------------------------------------


def config_error(argv: list[str]) -> str:
    with pytest.raises(ConfigError) as caught:
        build_verifier(settings_of(parse_args(argv)).auth)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_bad_configurations_are_refused_with_one_line(keys: Keys, tmp_path: Path) -> None:
    rsa_pem = write(tmp_path / "rsa.pem", keys.pem(keys.rsa_key))
    private = write(
        tmp_path / "private.pem",
        keys.rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    short = write(tmp_path / "short", b"too short")
    junk = write(tmp_path / "junk.pem", b"not a key")
    jwks_none = write(tmp_path / "jwks.json", json.dumps({"keys": [{"kty": "XX"}]}))
    good = ["--auth", "jwt", "--jwt-issuer", ISSUER, "--jwt-audience", AUDIENCE]
    cases = {
        "no key": (good, "exactly one of"),
        "two keys": ([*good, "--jwt-key-file", rsa_pem, "--jwt-secret-file", short], "exactly"),
        "no issuer": (["--auth", "jwt", "--jwt-audience", "a", "--jwt-key-file", rsa_pem], "iss"),
        "no audience": (["--auth", "jwt", "--jwt-issuer", "i", "--jwt-key-file", rsa_pem], "aud"),
        "alg none": ([*good, "--jwt-key-file", rsa_pem, "--jwt-algorithms", "none"], "none"),
        "alg unknown": ([*good, "--jwt-key-file", rsa_pem, "--jwt-algorithms", "XS1"], "XS1"),
        "no key fits": ([*good, "--jwt-key-file", rsa_pem, "--jwt-algorithms", "ES256"], "fits"),
        "a private key": ([*good, "--jwt-key-file", private], "private key"),
        "not PEM": ([*good, "--jwt-key-file", junk], "not a PEM"),
        "missing file": ([*good, "--jwt-key-file", str(tmp_path / "nope")], "cannot read"),
        "short secret": ([*good, "--jwt-secret-file", short], "32 bytes"),
        "a PEM as secret": ([*good, "--jwt-secret-file", rsa_pem], "PEM"),
        "an unusable JWKS": ([*good, "--jwt-jwks-file", jwks_none], "no usable"),
        "JWKS over http": ([*good, "--jwt-jwks-url", "http://idp.example/jwks"], "https"),
        "JWKS not a URL": ([*good, "--jwt-jwks-url", "file:///etc/passwd"], "http"),
        "header name": (["--auth", "trusted-header", "--auth-header", "X Bad"], "header"),
        "TLS CA missing": (["--relay-tls-ca", str(tmp_path / "nope.pem")], "relay-tls"),
        "TLS cert without key": (["--relay-tls-cert", rsa_pem], "relay-tls"),
        "a token with spaces": (["--relay-token", "two words"], "token"),
        "no SSE at all": (["--max-sse-total", "0"], "max-sse"),
    }
    for case, (argv, expected) in cases.items():
        assert expected in config_error(argv), case


def test_settings_from_flags_and_environment(
    keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_RELAY_TOKEN", "from-the-environment")
    monkeypatch.setenv("GATEWAY_JWT_AUDIENCE", "a1,a2")
    rsa_pem = write(tmp_path / "rsa.pem", keys.pem(keys.rsa_key))
    args = parse_args(
        [
            "--auth",
            "jwt",
            "--jwt-key-file",
            rsa_pem,
            "--jwt-issuer",
            ISSUER,
            "--address",
            "chat.example.com:8080",
            "--max-sse-per-subject",
            "4",
        ]
    )
    settings = settings_of(args)
    assert settings.relay_token == "from-the-environment"
    assert settings.auth.jwt_audience == ("a1", "a2")
    assert settings.allowed_hosts == ("localhost", "127.0.0.1", "[::1]", "chat.example.com")
    assert settings.max_sse_per_subject == 4 and settings.max_sse_total == 20_000
    build_verifier(settings.auth)
    defaults = settings_of(parse_args([]))
    assert defaults.auth.mode == "anonymous" and defaults.relay_tls is None
    assert defaults.max_sse_per_subject == 32
    hosts = settings_of(parse_args(["--allowed-hosts", "a.example,b.example"])).allowed_hosts
    assert hosts == ("a.example", "b.example")


async def test_a_bad_configuration_exits_1_with_the_reason(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.server",
        "--auth",
        "jwt",
        "--log-format",
        "text",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        _, err = await process.communicate()
    assert process.returncode == 1
    last = err.decode().strip().splitlines()[-1]
    assert last.startswith("stream-relay-gateway: --auth jwt needs --jwt-issuer"), last


# ---- browser safety ------------------------------------------------------------------------------


async def test_a_text_plain_post_is_415_and_starts_or_stops_nothing(env: Env) -> None:
    async with running(GatewaySettings(relay_target=env.target)) as gw:
        body = json.dumps(gw.chat_body("c", producer="scripted"))
        for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
            headers = {"content-type": content_type} if content_type else {}
            chat = await gw.http.post(gw.url + "/api/chat", content=body, headers=headers)
            assert chat.status_code == 415, content_type
            assert chat.json()["error"]["code"] == "unsupported_media_type"
        assert env.relay.streams == {}
        async with gw.open("POST", "/api/chat", json=json.loads(body)) as sse:
            assert sse.response.status_code == 200
            script = env.scripted.script(sse.response.headers["x-stream-id"])
            for headers in ({"content-type": "text/plain"}, {}):
                stop = await gw.http.post(gw.url + "/api/chat/c/stop", headers=headers)
                assert stop.status_code == 415
            assert not script.cancelled.is_set()
            typed = {"content-type": "Application/JSON; charset=utf-8"}
            stop = await gw.http.post(gw.url + "/api/chat/c/stop", headers=typed)
            assert stop.status_code == 200 and stop.json()["stopped"] is True


async def test_cross_origin_posts_are_403(env: Env) -> None:
    settings = GatewaySettings(relay_target=env.target, cors_origins=("http://app.example",))
    async with running(settings) as gw:
        own = gw.url  # http://127.0.0.1:<port>
        for headers in (
            {"origin": "http://evil.example"},
            {"origin": "null"},
            {"origin": own.replace("127.0.0.1", "localhost")},  # another origin, same machine
            {"origin": "http://app.example.evil"},
            {"sec-fetch-site": "cross-site"},
        ):
            refused = await gw.http.post(
                gw.url + "/api/chat", json=gw.chat_body("c"), headers=headers
            )
            assert refused.status_code == 403, headers
            assert refused.json()["error"]["code"] == "cross_origin"
            stop = await gw.http.post(gw.url + "/api/chat/c/stop", json={}, headers=headers)
            assert stop.status_code == 403, headers
        assert env.relay.streams == {}
        for headers in (
            {},  # curl, a server
            {"origin": own, "sec-fetch-site": "same-origin"},
            {"origin": "http://app.example", "sec-fetch-site": "cross-site"},
        ):
            body = gw.chat_body("c", options={"chunks": "1"})
            ok = await gw.http.post(gw.url + "/api/chat", json=body, headers=headers)
            assert ok.status_code == 200, headers


async def test_a_foreign_host_is_400(env: Env) -> None:
    async with running(GatewaySettings(relay_target=env.target), checked=False) as gw:
        for path in ("/", "/healthz", "/api/chat/c/messages"):
            refused = await gw.http.get(gw.url + path, headers={"host": "evil.example"})
            assert refused.status_code == 400, path
            assert refused.json()["error"]["code"] == "host_not_allowed"
            assert refused.headers["x-content-type-options"] == "nosniff"
        post = await gw.http.post(
            gw.url + "/api/chat", json=gw.chat_body("c"), headers={"host": "evil.example:80"}
        )
        assert post.status_code == 400 and env.relay.streams == {}
        for host in ("localhost:1234", "127.0.0.1", "[::1]:8080", "LOCALHOST"):
            ok = await gw.http.get(gw.url + "/healthz", headers={"host": host})
            assert ok.status_code == 200, host
    settings = GatewaySettings(relay_target=env.target, allowed_hosts=("*.example.com",))
    async with running(settings, checked=False) as gw:
        for host, status in (
            ("chat.example.com", 200),
            ("chat.example.com:443", 200),
            ("example.com", 400),
            ("example.com.evil.net", 400),
            ("127.0.0.1", 400),
        ):
            answer = await gw.http.get(gw.url + "/healthz", headers={"host": host})
            assert answer.status_code == status, host


def test_host_names() -> None:
    assert host_allowed("[::1]:8080", ["[::1]"])
    assert not host_allowed("", ["*.example.com"])
    assert host_allowed("anything:1", ["*"])
    assert default_allowed_hosts("0.0.0.0:8080") == ("localhost", "127.0.0.1", "[::1]")
    assert default_allowed_hosts("10.0.0.5:80")[-1] == "10.0.0.5"
    assert default_allowed_hosts("[::]:80") == ("localhost", "127.0.0.1", "[::1]")


async def test_cors_is_closed_by_default(env: Env) -> None:
    async with running(GatewaySettings(relay_target=env.target), checked=False) as gw:
        preflight = await gw.http.options(
            gw.url + "/api/chat",
            headers={
                "origin": "http://app.example",
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type",
            },
        )
        assert preflight.status_code == 405
        read = await gw.http.get(
            gw.url + "/api/chat/c/messages", headers={"origin": "http://app.example"}
        )
        for response in (preflight, read):
            assert not [h for h in response.headers if h.startswith("access-control-")]


async def test_cors_preflight_for_an_allowed_origin_and_nothing_for_another(env: Env) -> None:
    settings = GatewaySettings(relay_target=env.target, cors_origins=("http://app.example",))
    async with running(settings, checked=False) as gw:
        asked = {
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type, authorization, idempotency-key",
        }
        ok = await gw.http.options(
            gw.url + "/api/chat", headers={"origin": "http://app.example", **asked}
        )
        assert ok.status_code == 204
        assert ok.headers["access-control-allow-origin"] == "http://app.example"
        assert set(ok.headers["access-control-allow-methods"].split(", ")) == {"GET", "POST"}
        allowed = set(ok.headers["access-control-allow-headers"].split(", "))
        assert allowed >= {"content-type", "authorization", "last-event-id", "idempotency-key"}
        assert "access-control-allow-credentials" not in ok.headers
        other = await gw.http.options(
            gw.url + "/api/chat", headers={"origin": "http://evil.example", **asked}
        )
        assert not [h for h in other.headers if h.startswith("access-control-")]
        read = await gw.http.get(
            gw.url + "/api/chat/c/messages", headers={"origin": "http://app.example"}
        )
        assert read.headers["access-control-allow-origin"] == "http://app.example"
        exposed = read.headers["access-control-expose-headers"]
        assert "x-stream-id" in exposed and "x-vercel-ai-ui-message-stream" in exposed
        assert "retry-after" in exposed
        foreign = await gw.http.get(
            gw.url + "/api/chat/c/messages", headers={"origin": "http://evil.example"}
        )
        assert not [h for h in foreign.headers if h.startswith("access-control-")]


async def test_security_headers_and_the_demo_pages_csp(env: Env) -> None:
    async with running(GatewaySettings(relay_target=env.target)) as gw:
        for path in ("/", "/healthz", "/api/chat/c/messages", "/nowhere", "/demo.js"):
            response = await gw.http.get(gw.url + path)
            assert response.headers["x-content-type-options"] == "nosniff", path
            assert response.headers["referrer-policy"] == "no-referrer", path
        page = await gw.http.get(gw.url + "/")
        csp = {
            d.split(" ", 1)[0]: d.split(" ", 1)[1]
            for d in page.headers["content-security-policy"].split("; ")
        }
        assert page.headers["content-security-policy"] == PAGE_CSP
        assert csp["default-src"] == "'self'" and csp["script-src"] == "'self'"
        assert csp["connect-src"] == "'self'" and csp["frame-ancestors"] == "'none'"
        assert "unsafe-inline" not in PAGE_CSP and "unsafe-eval" not in PAGE_CSP
        assert page.headers["x-frame-options"] == "DENY"
        html = page.text
        assert not re.search(r"<script(?![^>]*\bsrc=)", html), "an inline script"
        assert "<style" not in html and " style=" not in html, "an inline style"
        assert not re.search(r"\son[a-z]+=", html), "an inline event handler"
        script = await gw.http.get(gw.url + "/demo.js")
        assert script.headers["content-type"].startswith("text/javascript")
        assert "authorization" in script.text  # the page sends its token when it has one
        style = await gw.http.get(gw.url + "/demo.css")
        assert style.headers["content-type"].startswith("text/css")


async def test_the_embedded_relay_takes_its_service_tokens_and_the_gateway_presents_one(
    tmp_path: Path,
) -> None:
    """`make run` with RELAY_TOKENS: the embedded relay refuses calls without the token, so the
    gateway must present it (GATEWAY_RELAY_TOKEN); before, the embedded relay ignored it."""
    from tests.conftest import gateway_process

    secret = "embedded-relay-secret-0123456789"
    body = {
        "id": "chat-1",
        "trigger": "submit-message",
        "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}],
    }
    for gateway_token, expected in ((None, 502), (secret, 200)):
        env = {"RELAY_TOKENS": secret}
        if gateway_token is not None:
            env["GATEWAY_RELAY_TOKEN"] = gateway_token
        async with (
            gateway_process(tmp_path / str(expected), env=env) as running,
            httpx.AsyncClient(base_url=running.url, timeout=30) as http,
        ):
            response = await http.post("/api/chat", json=body)
            assert response.status_code == expected, response.text


def test_a_bad_number_in_the_environment_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before, GATEWAY_KEEPALIVE_S=abc stopped the gateway with a ValueError traceback."""
    monkeypatch.setenv("GATEWAY_KEEPALIVE_S", "abc")
    with pytest.raises(SystemExit) as stopped:
        parse_args([])
    assert stopped.value.code == 2
    assert "GATEWAY_KEEPALIVE_S='abc' is not a valid float" in capsys.readouterr().err
    monkeypatch.setenv("GATEWAY_KEEPALIVE_S", "2.5")
    monkeypatch.setenv("GATEWAY_MAX_SSE_TOTAL", "7")
    args = parse_args(["--max-sse-total", "9"])
    assert (args.keepalive_s, args.max_sse_total) == (2.5, 9)  # the flag wins


async def test_an_unexpected_error_is_json_with_the_security_headers(env: Env) -> None:
    """A pluggable verifier that breaks: 500 as JSON, with nosniff and no-referrer (before:
    text/plain "Internal Server Error" without them)."""

    class Broken:
        async def subject(self, request: Any) -> str:
            raise RuntimeError("the verifier's own bug, with a secret inside")

    settings = GatewaySettings(relay_target=env.target)
    async with running(settings, verifier=Broken()) as gw:
        response = await gw.http.get(gw.url + "/api/chat/c/messages")
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "internal" and "secret" not in error["message"]
    assert re.fullmatch(r"internal error \(id [0-9a-f]{8}\); see the gateway log", error["message"])
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"


def test_allowed_origins_are_normalized_as_browsers_send_them() -> None:
    """`--cors-origin https://App.example/` used to never match (compared as typed)."""
    settings = settings_of(
        parse_args(["--cors-origin", "https://App.example/", "--cors-origin", "http://a.test:3000"])
    )
    assert settings.cors_origins == ("https://app.example", "http://a.test:3000")
    for bad in ("https://app.example/chat", "app.example", "https://app.example/?x=1"):
        with pytest.raises(ConfigError, match="--cors-origin"):
            settings_of(parse_args(["--cors-origin", bad]))
