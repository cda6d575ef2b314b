"""Service tokens and TLS on the relay's gRPC port (relay.rpc.auth, relay.server, relay.client).

Every relay here is a real grpc.aio server on an ephemeral port, its certificates made per test
(tests/tls.py). Rotation is driven both in-process (`reload_tokens`) and by SIGHUP to a
`python -m relay.server`, whose log line says when the reload is done: no sleeps.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2

from relay.client import ClientTLS, ReaderRefused, RelayClient
from relay.client.errors import RelayError
from relay.domain.core import Relay
from relay.domain.errors import InvalidArgument, PermissionDenied, Unauthenticated
from relay.domain.model import Caller, StreamEnd, StreamState
from relay.producers import EchoProducer, ProducerRegistry
from relay.rpc.auth import (
    Authenticator,
    Security,
    SecurityError,
    ServerTLS,
    ServiceToken,
    load_tokens_file,
    open_services,
    simple_tokens,
)
from relay.server import ServerConfig, load_security, parse_config, reload_tokens, start_server
from relay.stores.sqlite import SqliteStore
from tests.conftest import ROOT, collect, python_service, user
from tests.reflection import reflection_info
from tests.tls import Certificates, make_certificates

TOKEN_A = "token-a-0123456789abcdef"
TOKEN_B = "token-b-0123456789abcdef"
BILLING = "billing-0123456789abcdef"
GATEWAY = "gateway-0123456789abcdef"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@asynccontextmanager
async def relay_on_port(tmp_path: Path, security: Security) -> AsyncIterator[str]:
    """A relay (echo, no delay) served with `security`; yields its 127.0.0.1 target."""
    relay = Relay(
        SqliteStore(tmp_path / "relay.sqlite3"),
        ProducerRegistry({"echo": EchoProducer(delay_ms=0)}, "echo"),
        journal_interval=0.001,
        sweep_interval=None,
    )
    await relay.open()
    server = await start_server(relay, "127.0.0.1:0", security=security)
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        await server.stop(grace=0)
        await relay.close(grace=0)


def tokens_file(tmp_path: Path, text: str, name: str = "tokens.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


async def refused(call: Any) -> RelayError:
    """The error a call of the client raises."""
    with pytest.raises(RelayError) as caught:
        await call
    return caught.value


async def completes(client: RelayClient, chat_id: str = "chat-1", **kwargs: Any) -> str:
    """A Start and a whole Attach succeed; returns the stream's id."""
    started = await client.start(chat_id, [user("hi")], timeout=10, **kwargs)
    chunks, end = await collect(client.attach(stream_id=started.stream_id, timeout=10, **kwargs))
    assert end.state is StreamState.COMPLETED and chunks
    return started.stream_id


# -- tokens --------------------------------------------------------------------------------------


async def test_without_tokens_every_caller_is_trusted(tmp_path: Path) -> None:
    async with relay_on_port(tmp_path, Security()) as target, RelayClient(target) as client:
        await completes(client)
        await completes(client, "chat-2", subject="alice")


async def test_a_call_without_a_token_is_unauthenticated_on_every_kind_of_rpc(
    tmp_path: Path,
) -> None:
    security = Security(Authenticator(simple_tokens(TOKEN_A)))
    async with relay_on_port(tmp_path, security) as target, RelayClient(target) as client:
        for call in (  # unary, server-streaming
            client.start("chat-1", [user("hi")], timeout=10),
            client.get_active("chat-1", timeout=10),
            client.open_attach(chat_id="chat-1", timeout=10),
        ):
            error = await refused(call)
            assert error.code == "UNAUTHENTICATED"
            assert "requires a service token" in error.message
        async with client.attach_many(timeout=10) as readers:  # bidirectional
            readers.subscribe(1, chat_id="chat-1")
            with pytest.raises(RelayError) as caught:
                async for _ in readers:
                    pass
            assert caught.value.code == "UNAUTHENTICATED"
        async with RelayClient(target, token=TOKEN_A) as good:
            assert await good.get_active("chat-1", timeout=10) is None  # nothing was started


async def test_a_wrong_token_is_unauthenticated_and_never_echoed(tmp_path: Path) -> None:
    security = Security(Authenticator(simple_tokens(TOKEN_A)))
    wrong = "wrong-token-that-must-not-be-echoed"
    async with (
        relay_on_port(tmp_path, security) as target,
        RelayClient(target, token=wrong) as client,
    ):
        error = await refused(client.start("chat-1", [user("hi")], timeout=10))
        assert error.code == "UNAUTHENTICATED"
        assert error.message == "the service token is not valid"
        # A prefix of the right token is no better than anything else.
        async with RelayClient(target, token=TOKEN_A[:-1]) as prefix:
            error = await refused(prefix.get_active("chat-1", timeout=10))
            assert error.code == "UNAUTHENTICATED"
        async with RelayClient(target, token=TOKEN_A) as good:
            await completes(good)


async def test_a_malformed_authorization_is_unauthenticated(tmp_path: Path) -> None:
    security = Security(Authenticator(simple_tokens(TOKEN_A)))
    async with relay_on_port(tmp_path, security) as target, RelayClient(target) as client:
        from relay.v1 import relay_pb2

        stub_call = client._stub.GetActive(
            relay_pb2.GetActiveRequest(chat_id="c"),
            metadata=(("authorization", f"Basic {TOKEN_A}"),),
            timeout=10,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub_call
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert caught.value.details() == "the authorization metadata must be `Bearer <token>`"


async def test_two_tokens_work_at_once_and_a_removed_one_is_refused_after_a_reload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OLD_TOKEN", TOKEN_A)
    path = tokens_file(
        tmp_path,
        '[tokens.old]\nsecret_env = "OLD_TOKEN"\nact_for_subjects = true\n'
        f'[tokens.new]\nsecret = "{TOKEN_B}"\nact_for_subjects = true\n',
    )
    config = ServerConfig(tokens_file=str(path))
    security = load_security(config)
    async with (
        relay_on_port(tmp_path, security) as target,
        RelayClient(target, token=TOKEN_A) as old,
        RelayClient(target, token=TOKEN_B) as new,
    ):
        await completes(old, "chat-old")
        await completes(new, "chat-new")

        path.write_text(f'[tokens.new]\nsecret = "{TOKEN_B}"\nact_for_subjects = true\n')
        assert reload_tokens(config, security.authenticator)

        error = await refused(old.get_active("chat-old", timeout=10))
        assert error.code == "UNAUTHENTICATED"
        await completes(new, "chat-new-2")

        # A file broken on reload changes nothing: the tokens it had stay.
        path.write_text("[tokens.new]\nsecret = 'short'\n")
        assert not reload_tokens(config, security.authenticator)
        await completes(new, "chat-new-3")


async def test_sighup_rereads_the_tokens_file_of_a_running_relay(tmp_path: Path) -> None:
    path = tokens_file(
        tmp_path,
        f'[tokens.a]\nsecret = "{TOKEN_A}"\n[tokens.b]\nsecret = "{TOKEN_B}"\n',
    )
    async with python_service(
        "-m",
        "relay.server",
        "--address",
        "127.0.0.1:0",
        "--db",
        str(tmp_path / "relay.sqlite3"),
        "--tokens-file",
        str(path),
        "--echo-delay-ms",
        "0",
        ready=lambda entry: entry["message"] == "relay listening",
    ) as (process, listening):
        assert listening["service_tokens"] == 2 and listening["tls"] == "off"
        target = listening["address"]
        async with (
            RelayClient(target, token=TOKEN_A) as a,
            RelayClient(target, token=TOKEN_B) as b,
        ):
            await completes(a, "chat-a")
            await completes(b, "chat-b")

            async def hup_and_read(message: str) -> dict[str, Any]:
                process.send_signal(signal.SIGHUP)
                assert process.stderr is not None
                async with asyncio.timeout(30):
                    while True:
                        line = await process.stderr.readline()
                        assert line, "the relay exited"
                        entry: dict[str, Any] = json.loads(line)
                        if entry["message"] == message:
                            return entry

            path.write_text(f'[tokens.b]\nsecret = "{TOKEN_B}"\n')
            assert (await hup_and_read("service tokens reloaded"))["tokens"] == 1
            error = await refused(a.get_active("chat-a", timeout=10))
            assert error.code == "UNAUTHENTICATED"
            await completes(b, "chat-b2")

            path.write_text("[tokens.b]\nsecret_env = 'NOT_SET_ANYWHERE_42'\n")
            entry = await hup_and_read("service tokens not reloaded; the old ones stay")
            assert "NOT_SET_ANYWHERE_42 is not set" in entry["reason"]
            await completes(b, "chat-b3")


async def test_health_and_reflection_are_open_by_default_and_can_be_closed(
    tmp_path: Path,
) -> None:
    async def check(target: str, token: str | None) -> str:
        async with RelayClient(target, token=token) as client:
            try:
                status = await client.health("", timeout=10)
            except RelayError as exc:
                return exc.code
            assert status == "serving"
            return "OK"

    async def reflect(target: str) -> grpc.StatusCode:
        async with RelayClient(target) as client:
            call = reflection_info(client.channel)(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
            )
            try:
                async for _ in call:
                    pass
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

    tokens = simple_tokens(TOKEN_A)
    async with relay_on_port(tmp_path, Security(Authenticator(tokens))) as target:
        assert await check(target, None) == "OK"
        assert await reflect(target) is grpc.StatusCode.OK
    closed = Security(Authenticator(tokens), open_services=open_services("none"))
    async with relay_on_port(tmp_path, closed) as target:
        assert await check(target, None) == "UNAUTHENTICATED"
        assert await check(target, TOKEN_A) == "OK"
        assert await reflect(target) is grpc.StatusCode.UNAUTHENTICATED
    only_health = Security(Authenticator(tokens), open_services=open_services("health"))
    async with relay_on_port(tmp_path, only_health) as target:
        assert await check(target, None) == "OK"
        assert await reflect(target) is grpc.StatusCode.UNAUTHENTICATED


async def test_a_token_that_may_not_act_for_others_naming_a_subject_is_permission_denied(
    tmp_path: Path,
) -> None:
    path = tokens_file(
        tmp_path,
        f'[tokens.billing]\nsecret = "{BILLING}"\nsubject = "service:billing"\n'
        f'[tokens.gateway]\nsecret = "{GATEWAY}"\nact_for_subjects = true\n',
    )
    security = Security(Authenticator(load_tokens_file(path)))
    async with (
        relay_on_port(tmp_path, security) as target,
        RelayClient(target, token=BILLING) as billing,
        RelayClient(target, token=GATEWAY) as gateway,
    ):
        error = await refused(billing.start("chat-1", [user("hi")], subject="alice", timeout=10))
        assert error.code == "PERMISSION_DENIED"
        assert "'billing' may not act for another subject" in error.message
        own = await completes(billing, "chat-own", subject="service:billing")  # its own: fine
        await completes(billing, "chat-none")  # none named: its own
        await completes(gateway, "chat-alice", subject="alice")
        # A shared reader naming a subject (Subscribe.subject) is held to the same rule.
        async with billing.attach_many(timeout=10) as readers:
            readers.subscribe(1, chat_id="chat-alice", subject="alice")
            readers.subscribe(2, stream_id=own, subject="service:billing")
            readers.done_subscribing()
            events = [(tag, event) async for tag, event in readers]
        assert events[0] == (1, ReaderRefused("PERMISSION_DENIED", ANY))
        assert isinstance(events[-1][1], StreamEnd) and events[-1][0] == 2


def test_the_caller_of_a_call() -> None:
    tokens = [
        *simple_tokens(TOKEN_A),
        ServiceToken.of_secret("billing", BILLING, subject="service:billing", profiles={"echo"}),
        ServiceToken.of_secret("gateway", GATEWAY, subject="token:gateway", act_for_subjects=True),
    ]
    auth_ = Authenticator(tokens)

    def bearer(token: str, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {token}"), *extra)

    alice = ("x-relay-subject", "alice%20%C3%A9")
    assert auth_.caller(bearer(TOKEN_A)) == Caller("")
    assert auth_.caller(bearer(TOKEN_A, alice)) == Caller("alice é")
    assert auth_.caller(bearer(BILLING)) == Caller("service:billing", frozenset({"echo"}))
    assert auth_.caller(bearer(GATEWAY), subject="bob") == Caller("bob")
    with pytest.raises(PermissionDenied):
        auth_.caller(bearer(BILLING, alice))
    with pytest.raises(PermissionDenied):  # an AttachMany subscription's own subject
        auth_.caller(bearer(BILLING), subject="alice")
    assert auth_.caller(bearer(BILLING), subject="service:billing").subject == "service:billing"
    with pytest.raises(Unauthenticated):
        auth_.caller((alice,))
    with pytest.raises(Unauthenticated):
        auth_.caller(bearer(TOKEN_A) + bearer(TOKEN_B))  # two authorizations
    with pytest.raises(InvalidArgument):
        auth_.caller(bearer(TOKEN_A, ("x-relay-subject", "%ff")))
    # Off: whoever calls names its subject.
    assert Authenticator().caller((alice,)) == Caller("alice é")
    assert Authenticator().caller(()) == Caller("")


def test_tokens_are_compared_by_digest_with_compare_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)  # what relay.rpc.auth calls
    authenticator = Authenticator(simple_tokens(f"{TOKEN_A},{TOKEN_B}"))
    assert authenticator.token_of((("authorization", f"Bearer {TOKEN_B}"),)) is not None
    with pytest.raises(Unauthenticated):
        authenticator.token_of((("authorization", "Bearer x"),))
    # Every token compared each time (no early exit), as fixed-size digests whatever was sent.
    assert compared == [(32, 32)] * 4
    assert TOKEN_A not in repr(authenticator.tokens)


def test_rotation_never_turns_authentication_off() -> None:
    authenticator = Authenticator(simple_tokens(TOKEN_A))
    with pytest.raises(SecurityError):
        authenticator.replace([])
    assert authenticator.enabled


BAD_TOKEN_FILES = [
    ("", "no tokens"),
    ("[tokens.x]\n", "token 'x': give exactly one of secret_env, secret_file or secret"),
    (
        f'[tokens.x]\nsecret = "{TOKEN_A}"\nsecret_env = "A"\n',
        "token 'x': give exactly one of",
    ),
    (f'[tokens.x]\nsecret = "{TOKEN_A}"\nsubjekt = "a"\n', "token 'x': unknown fields ['subjekt']"),
    ('[tokens.x]\nsecret_env = "NOT_SET_ANYWHERE_42"\n', "token 'x': secret_env: the variable"),
    ('[tokens.x]\nsecret = "short"\n', "token 'x': secret: a secret must have at least 16"),
    (
        '[tokens.x]\nsecret = "has a space in it ok"\n',
        "token 'x': secret: a secret must be visible",
    ),
    (f'[tokens.x]\nsecret = "{TOKEN_A}"\nact_for_subjects = "yes"\n', "act_for_subjects must be"),
    (f'[tokens.x]\nsecret = "{TOKEN_A}"\nprofiles = "echo"\n', "profiles must be a list"),
    (f'[tokens.x]\nsecret = "{TOKEN_A}"\nsubject = 7\n', "token 'x': subject must be a string"),
    (
        f'[tokens.x]\nsecret = "{TOKEN_A}"\n[tokens.y]\nsecret = "{TOKEN_A}"\n',
        "tokens 'x' and 'y' have the same secret",
    ),
    ('[tokens.x]\nsecret_file = "missing.txt"\n', "token 'x': secret_file"),
    ("[tokens.x\n", "Expected ']'"),
    (f'[token.x]\nsecret = "{TOKEN_A}"\n', "unknown tables ['token']"),
    ("tokens = 3\n", "no tokens"),
]


@pytest.mark.parametrize(("text", "reason"), BAD_TOKEN_FILES)
def test_a_malformed_tokens_file_names_the_file_the_token_and_the_field(
    tmp_path: Path, text: str, reason: str
) -> None:
    path = tokens_file(tmp_path, text)
    with pytest.raises(SecurityError) as caught:
        load_tokens_file(path, env={})
    message = str(caught.value)
    assert str(path) in message and reason in message
    assert TOKEN_A not in message


def test_a_secret_file_is_read_next_to_the_tokens_file(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text(TOKEN_A + "\n")
    path = tokens_file(tmp_path, '[tokens.x]\nsecret_file = "secret.txt"\nprofiles = ["echo"]\n')
    (token,) = load_tokens_file(path, env={})
    assert (token.name, token.subject, token.profiles) == ("x", "token:x", frozenset({"echo"}))
    assert Authenticator([token]).token_of((("authorization", f"Bearer {TOKEN_A}"),)) == token


def test_open_services_names() -> None:
    assert open_services("health") == {"grpc.health.v1.Health"}
    assert open_services("none") == frozenset()
    assert "grpc.reflection.v1alpha.ServerReflection" in open_services("health,reflection")
    with pytest.raises(SecurityError, match="'relay' is not health, reflection"):
        open_services("health,relay")


def test_security_flags_and_environment() -> None:
    config = parse_config(
        ["--tls-cert", "c.pem"],
        {"RELAY_TOKENS": f"{TOKEN_A},{TOKEN_B}", "RELAY_TLS_KEY": "k.pem"},
    )
    assert (config.tokens, config.tls_cert, config.tls_key) == (
        f"{TOKEN_A},{TOKEN_B}",
        "c.pem",
        "k.pem",
    )
    assert TOKEN_A not in repr(config)
    assert config.auth_open_services == "health,reflection"


def test_a_client_token_must_be_sendable() -> None:
    with pytest.raises(ValueError, match="visible ASCII"):
        RelayClient("127.0.0.1:1", token="two words")
    with pytest.raises(ValueError, match="both a certificate and its key"):
        RelayClient("127.0.0.1:1", tls=ClientTLS(cert="c.pem"))


# -- TLS and mutual TLS -----------------------------------------------------------------------


def server_tls(certs: Certificates, mutual: bool = False) -> ServerTLS:
    pair = certs.server
    return ServerTLS(str(pair.cert), str(pair.key), str(certs.ca.cert) if mutual else "")


async def test_tls_works_with_the_right_ca_and_fails_with_another(
    tmp_path: Path, certs: Certificates
) -> None:
    async with relay_on_port(tmp_path, Security(tls=server_tls(certs))) as target:
        async with RelayClient(target, tls=ClientTLS(ca=certs.ca.cert)) as client:
            await completes(client)
        # The certificate names relay.test too: a client may check that name instead.
        tls = ClientTLS(ca=certs.ca.cert, server_name="relay.test")
        async with RelayClient(target, tls=tls) as client:
            assert await client.get_active("chat-1", timeout=10) is None
        for tls_ in (
            ClientTLS(ca=certs.other_ca.cert),
            ClientTLS(ca=certs.ca.cert, server_name="x"),
        ):
            async with RelayClient(target, tls=tls_) as client:
                error = await refused(client.get_active("chat-1", timeout=10))
                assert error.code == "UNAVAILABLE"
        async with RelayClient(target) as plaintext:
            error = await refused(plaintext.get_active("chat-1", timeout=10))
            assert error.code == "UNAVAILABLE"


async def test_mutual_tls_refuses_clients_without_a_certificate_of_its_ca(
    tmp_path: Path, certs: Certificates
) -> None:
    security = Security(tls=server_tls(certs, mutual=True))
    async with relay_on_port(tmp_path, security) as target:
        pair = certs.client
        good = ClientTLS(ca=certs.ca.cert, cert=pair.cert, key=pair.key)
        async with RelayClient(target, tls=good) as client:
            await completes(client)
        foreign = certs.foreign_client
        for tls in (
            ClientTLS(ca=certs.ca.cert),
            ClientTLS(ca=certs.ca.cert, cert=foreign.cert, key=foreign.key),
        ):
            async with RelayClient(target, tls=tls) as client:
                error = await refused(client.get_active("chat-1", timeout=10))
                assert error.code == "UNAVAILABLE"


async def test_relay_client_over_mutual_tls_with_a_token_does_a_full_session(
    tmp_path: Path, certs: Certificates
) -> None:
    security = Security(Authenticator(simple_tokens(TOKEN_A)), tls=server_tls(certs, True))
    pair = certs.client
    tls = ClientTLS(ca=certs.ca.cert, cert=pair.cert, key=pair.key)
    async with (
        relay_on_port(tmp_path, security) as target,
        RelayClient(target, token=TOKEN_A, tls=tls) as client,
    ):
        started = await client.start("chat-1", [user("over tls")], subject="alice", timeout=10)
        chunks, end = await collect(client.attach(stream_id=started.stream_id, subject="alice"))
        assert end.state is StreamState.COMPLETED and chunks
        async with client.attach_many(subject="alice", timeout=10) as readers:
            readers.subscribe(1, stream_id=started.stream_id)
            readers.done_subscribing()
            events = [event async for _, event in readers]
        assert events[-1] == end
        messages = await client.list_messages("chat-1", subject="alice", timeout=10)
        assert [m.role for m in messages] == ["user", "assistant"]
        async with RelayClient(target, tls=tls) as tokenless:
            error = await refused(tokenless.list_messages("chat-1", timeout=10))
            assert error.code == "UNAUTHENTICATED"


def test_bad_tls_files_are_refused_with_the_reason(tmp_path: Path, certs: Certificates) -> None:
    server, client = certs.server, certs.client
    cases = [
        (ServerTLS(str(tmp_path / "none.pem"), str(server.key)), "cannot read the TLS certificate"),
        (ServerTLS(str(server.cert), str(client.key)), "does not match the certificate"),
        (ServerTLS(str(server.key), str(server.key)), "holds no valid PEM certificate"),
        (ServerTLS(str(server.cert), str(server.cert)), "not a PEM private key"),
        (ServerTLS(str(server.cert), str(server.key), str(server.key)), "client CA"),
    ]
    for tls, reason in cases:
        with pytest.raises(SecurityError, match=reason):
            tls.credentials()
    with pytest.raises(ValueError, match="cannot read the CA certificates file"):
        ClientTLS(ca=tmp_path / "none.pem").credentials()


# -- the relay process refuses bad configuration --------------------------------------------------


def run_relay(tmp_path: Path, *flags: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "relay.server",
            "--address",
            "127.0.0.1:0",
            "--db",
            str(tmp_path / "db"),
            "--log-format",
            "text",
            *flags,
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result.returncode, result.stderr


def test_the_relay_exits_1_on_a_bad_tokens_file(tmp_path: Path) -> None:
    path = tokens_file(tmp_path, '[tokens.gateway]\nsecret_env = "GATEWAY_RELAY_TOKEN_X"\n')
    code, stderr = run_relay(tmp_path, "--tokens-file", str(path))
    assert code == 1
    assert stderr.strip().splitlines()[-1] == (
        f"stream-relay: {path}: token 'gateway': secret_env: the variable "
        "GATEWAY_RELAY_TOKEN_X is not set"
    )
    assert not (tmp_path / "db").exists()  # refused before the store was opened


def test_the_relay_exits_1_on_a_short_token_without_showing_it(tmp_path: Path) -> None:
    code, stderr = run_relay(tmp_path, env={"RELAY_TOKENS": "tiny-secret"})
    assert code == 1
    assert "secret #1: a secret must have at least 16 characters" in stderr
    assert "tiny-secret" not in stderr


def test_the_relay_exits_1_on_bad_tls_files(tmp_path: Path, certs: Certificates) -> None:
    missing = tmp_path / "missing.pem"
    code, stderr = run_relay(tmp_path, "--tls-cert", str(missing), "--tls-key", str(missing))
    assert code == 1
    assert stderr.strip().splitlines()[-1] == (
        f"stream-relay: cannot read the TLS certificate file '{missing}': No such file or directory"
    )
    code, stderr = run_relay(
        tmp_path, "--tls-cert", str(certs.server.cert), "--tls-key", str(certs.client.key)
    )
    assert code == 1 and "does not match the certificate" in stderr.strip().splitlines()[-1]
    code, stderr = run_relay(tmp_path, "--tls-cert", str(certs.server.cert))
    assert code == 1 and "TLS needs both --tls-cert and --tls-key" in stderr
    code, stderr = run_relay(tmp_path, "--auth-open-services", "everything")
    assert code == 1 and "--auth-open-services: 'everything'" in stderr


async def test_the_relay_process_serves_mutual_tls_with_tokens(
    tmp_path: Path, certs: Certificates
) -> None:
    async with python_service(
        "-m",
        "relay.server",
        "--address",
        "127.0.0.1:0",
        "--db",
        str(tmp_path / "relay.sqlite3"),
        "--echo-delay-ms",
        "0",
        "--tls-cert",
        str(certs.server.cert),
        "--tls-key",
        str(certs.server.key),
        "--tls-client-ca",
        str(certs.ca.cert),
        env={"RELAY_TOKENS": TOKEN_A},
        ready=lambda entry: entry["message"] == "relay listening",
    ) as (_, listening):
        assert (listening["tls"], listening["service_tokens"]) == ("mtls", 1)
        pair = certs.client
        tls = ClientTLS(ca=certs.ca.cert, cert=pair.cert, key=pair.key)
        async with RelayClient(listening["address"], token=TOKEN_A, tls=tls) as client:
            await completes(client)
