"""Producer profiles: named producers configured in a TOML file.

    [producers.gpt]
    kind = "openai"                       # echo | openai | grpc
    base_url = "https://api.openai.com/v1"
    model = "gpt-4o-mini"
    api_key_env = "OPENAI_API_KEY"        # the variable's name; the key is never logged or stored
    idle_timeout_s = 60

    [producers.backend]
    kind = "grpc"
    target = "127.0.0.1:50061"
    multiplex = true                      # grpc: all answers on one GenerateMany call

Start picks a profile by name (`producer = "gpt"`); the built-in `echo` is always there. Who may
start a profile (`subjects`) and which options a client may set (`client_options`): see
relay.producers.policy.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from relay.domain.model import shown
from relay.producers import EchoProducer, Producer, ProducerRegistry, shown_names
from relay.producers.policy import (
    DEFAULT_CLIENT_OPTIONS,
    ClientOptionPolicy,
    PolicyError,
    ProducerPolicy,
    parse_subjects,
)

KINDS = ("echo", "openai", "grpc")


class ProfileError(ValueError):
    """The producers file is malformed; the message names the file, profile and field."""


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    kind: str
    base_url: str = ""  # openai: the API root, e.g. http://127.0.0.1:11434/v1 for Ollama
    target: str = ""  # grpc: host:port of a ProducerService
    model: str = ""
    api_key_env: str = ""  # the name of the environment variable holding the API key
    connect_timeout_s: float = 10.0
    idle_timeout_s: float = 60.0  # longest wait for the next upstream chunk before failing
    options: dict[str, str] = field(default_factory=dict)  # defaults for Start's options
    # grpc: how the relay reaches the ProducerService. token_env names the variable holding a
    # token sent as `authorization: Bearer`; tls_ca (PEM) turns TLS on, tls_cert and tls_key
    # present a client certificate (mutual TLS).
    token_env: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    # grpc: every answer on one GenerateMany call (relay.producers.grpc_many), not a Generate
    # call each: for a producer running many answers at once at token rate.
    multiplex: bool = False
    subjects: tuple[str, ...] = ("*",)  # fnmatch patterns of the subjects who may start it
    client_options: ClientOptionPolicy | None = None  # None: DEFAULT_CLIENT_OPTIONS[kind]

    @property
    def policy(self) -> ProducerPolicy:
        options = self.client_options
        return ProducerPolicy(
            self.subjects, DEFAULT_CLIENT_OPTIONS[self.kind] if options is None else options
        )


def load_profiles(path: str | Path) -> dict[str, Profile]:
    try:
        document = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ProfileError(f"{path}: {exc}") from None
    tables = document.get("producers", {})
    if not isinstance(tables, dict):
        raise ProfileError(f"{path}: [producers] must be a table of profiles")
    return {name: _profile(path, name, table) for name, table in tables.items()}


def _profile(path: str | Path, name: str, table: Any) -> Profile:
    where = f"{path}: producer {shown(name)}"
    if not isinstance(table, dict):
        raise ProfileError(f"{where} must be a table")
    known = {f.name for f in fields(Profile)} - {"name"}
    unknown = set(table) - known
    if unknown:
        raise ProfileError(f"{where}: unknown fields {shown_names(unknown)}")
    if table.get("kind") not in KINDS:
        raise ProfileError(f"{where}: kind must be one of {', '.join(KINDS)}")
    options = table.get("options", {})
    if not isinstance(options, dict):
        raise ProfileError(f"{where}: options must be a table")
    values = {**table, "options": {str(k): str(v) for k, v in options.items()}}
    try:
        if "subjects" in table:
            values["subjects"] = parse_subjects(table["subjects"])
        if "client_options" in table:
            values["client_options"] = _client_options(table["kind"], table["client_options"])
    except PolicyError as exc:
        raise ProfileError(f"{where}: {exc}") from None
    for key in ("connect_timeout_s", "idle_timeout_s"):
        if key in values and not isinstance(values[key], int | float):
            raise ProfileError(f"{where}: {key} must be a number")
    for key in ("token_env", "tls_ca", "tls_cert", "tls_key"):
        if key in values and not isinstance(values[key], str):
            raise ProfileError(f"{where}: {key} must be a string")
    if "multiplex" in values:
        if not isinstance(values["multiplex"], bool):
            raise ProfileError(f"{where}: multiplex must be true or false")
        if values["kind"] != "grpc":
            raise ProfileError(f'{where}: multiplex is for kind "grpc" only')
    try:
        return Profile(name=name, **values)
    except TypeError as exc:
        raise ProfileError(f"{where}: {exc}") from None


def _client_options(kind: str, table: object) -> ClientOptionPolicy:
    policy = ClientOptionPolicy.parse(table)
    known = _option_names(kind)
    strays = set(policy.rules or {}) - set(known or ())
    if known is not None and strays:
        raise PolicyError(
            f"client_options: the {kind} producer has no options {shown_names(strays)}; "
            f"it has: {', '.join(known)}"
        )
    return policy


def _option_names(kind: str) -> tuple[str, ...] | None:
    """The options a kind of producer understands; None: any (a grpc backend's own)."""
    if kind == "openai":
        from relay.producers.openai import OPTIONS

        return OPTIONS
    if kind == "echo":
        return EchoProducer.OPTIONS
    return None


def build_producer(profile: Profile, echo_delay_ms: float = 30.0) -> Producer:
    if profile.kind == "openai":
        from relay.producers.openai import OpenAIProducer

        return OpenAIProducer.from_profile(profile)
    if profile.kind == "grpc":
        from relay.producers.grpc_producer import GrpcProducer

        if profile.multiplex:
            from relay.producers.grpc_many import GrpcManyProducer

            return GrpcManyProducer.from_profile(profile)
        return GrpcProducer.from_profile(profile)
    return EchoProducer(delay_ms=float(profile.options.get("delay_ms", echo_delay_ms)))


def build_producers(
    profiles: Mapping[str, Profile], echo_delay_ms: float = 30.0
) -> dict[str, Producer]:
    producers: dict[str, Producer] = {"echo": EchoProducer(delay_ms=echo_delay_ms)}
    producers.update({name: build_producer(p, echo_delay_ms) for name, p in profiles.items()})
    return producers


def build_registry(
    profiles: Mapping[str, Profile],
    default: str = "echo",
    echo_delay_ms: float = 30.0,
    extra_producers: Mapping[str, Producer] | None = None,
) -> ProducerRegistry:
    """The registry of a relay: the built-in echo, the profiles' producers and policies, then
    `extra_producers` (registered in code, so open to any caller and option)."""
    producers = build_producers(profiles, echo_delay_ms)
    policies = {"echo": ProducerPolicy(client_options=DEFAULT_CLIENT_OPTIONS["echo"])}
    policies.update({name: profile.policy for name, profile in profiles.items()})
    for name, producer in (extra_producers or {}).items():
        producers[name] = producer
        policies.pop(name, None)
    return ProducerRegistry(producers, default, policies)
