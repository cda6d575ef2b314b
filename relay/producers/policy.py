"""What a client may choose: which producer profiles a caller may start, and which of a
profile's options a Start may set, within which bounds.

The operator's profile `options` are trusted defaults and are not checked here; only the options a
client sends are. An option a profile's `client_options` does not list is refused, so a client can
never override the operator's system prompt, model or tools unless the profile says it may:

    [producers.gpt]
    subjects = ["user:*"]                         # who may start it (fnmatch); default ["*"]
    [producers.gpt.client_options]
    temperature = { min = 0, max = 1.5 }          # a number within [min, max]
    max_tokens = { min = 1, max = 2048, integer = true }
    model = { allowed = ["gpt-4o-mini", "gpt-4o"] }
    label = { any = true, max_chars = 64 }        # any text up to max_chars (default 1024)

A profile without `client_options` gets its kind's defaults (DEFAULT_CLIENT_OPTIONS).

This module imports nothing from `relay.producers`, which imports it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from relay.domain.errors import InvalidArgument
from relay.domain.model import Caller, shown

TEXT_MAX_CHARS = 1_024  # `{ any = true }` without max_chars: the relay's own option value limit


class PolicyError(ValueError):
    """A malformed `subjects` or `client_options`; the message starts with the field's path."""


def shown_names(names: Iterable[str], most: int = 5) -> str:
    """Client-chosen names (unknown options) as an error message lists them: sorted, each cut
    short, at most `most` of them."""
    ordered = sorted(names)
    listed = ", ".join(shown(name) for name in ordered[:most])
    more = len(ordered) - most
    return f"[{listed}{f', and {more} more' if more > 0 else ''}]"


@dataclass(frozen=True, slots=True)
class NumberRule:
    """A number within [low, high]; a whole number if `integer`."""

    low: float
    high: float
    integer: bool = False

    def refusal(self, value: str) -> str | None:
        try:
            number: float = int(value) if self.integer else float(value)
        except ValueError:
            return f"must be {'a whole number' if self.integer else 'a number'}, got {shown(value)}"
        if not self.low <= number <= self.high:  # nan is within no bounds
            bounds = f"{_number(self.low)} and {_number(self.high)}"
            return f"must be between {bounds}, got {shown(value)}"
        return None


@dataclass(frozen=True, slots=True)
class ChoiceRule:
    """One of the listed strings, exactly."""

    allowed: tuple[str, ...]

    def refusal(self, value: str) -> str | None:
        if value in self.allowed:
            return None
        listed = ", ".join(repr(a) for a in self.allowed)
        return f"must be one of {listed}, got {shown(value)}"


@dataclass(frozen=True, slots=True)
class TextRule:
    """Any text of at most `max_chars` characters."""

    max_chars: int = TEXT_MAX_CHARS

    def refusal(self, value: str) -> str | None:
        if len(value) <= self.max_chars:
            return None
        return f"must be at most {self.max_chars} characters, got {len(value)}"


Rule = NumberRule | ChoiceRule | TextRule


@dataclass(frozen=True, slots=True)
class ClientOptionPolicy:
    """The options a client may set on one profile, each with its rule; `rules` None lets every
    option through (a producer registered in code, which checks its own options)."""

    rules: Mapping[str, Rule] | None = field(default_factory=dict)

    def allows(self, option: str) -> bool:
        """Whether a client may set `option` at all."""
        return self.rules is None or option in self.rules

    def check(self, producer: str, options: Mapping[str, str]) -> None:
        """Raises InvalidArgument naming the first option a client may not set as it asked."""
        if self.rules is None:
            return
        refused = set(options) - set(self.rules)
        if refused:
            may = ", ".join(sorted(self.rules)) or "none"
            raise InvalidArgument(
                f"producer {shown(producer)}: a client may not set the options "
                f"{shown_names(refused)}; it may set: {may}"
            )
        for key in sorted(options):
            refusal = self.rules[key].refusal(options[key])
            if refusal is not None:
                # `key` is one the operator declared: quoted as is.
                raise InvalidArgument(f"producer {shown(producer)}: {key} {refusal}")

    @classmethod
    def parse(cls, table: object) -> ClientOptionPolicy:
        """A `client_options` TOML table; PolicyError naming the field otherwise."""
        if not isinstance(table, dict):
            raise PolicyError("client_options must be a table of options")
        return cls({str(key): _rule(f"client_options.{key}", spec) for key, spec in table.items()})


UNRESTRICTED = ClientOptionPolicy(None)


def _rule(where: str, spec: object) -> Rule:
    if not isinstance(spec, dict):
        raise PolicyError(
            f"{where} must be a table: {{ min = ..., max = ... }}, {{ allowed = [...] }} "
            "or { any = true }"
        )
    keys = set(spec)
    if "allowed" in keys:
        _only(where, keys, {"allowed"})
        allowed = spec["allowed"]
        if not isinstance(allowed, list) or not allowed:
            raise PolicyError(f"{where}: allowed must be a non-empty list")
        if not all(isinstance(a, str | int | float) and not isinstance(a, bool) for a in allowed):
            raise PolicyError(f"{where}: allowed must list strings or numbers")
        return ChoiceRule(tuple(str(a) for a in allowed))
    if "any" in keys:
        _only(where, keys, {"any", "max_chars"})
        if spec["any"] is not True:
            raise PolicyError(f"{where}: any must be true (leave the option out to refuse it)")
        max_chars = spec.get("max_chars", TEXT_MAX_CHARS)
        if not _is_number(max_chars) or not isinstance(max_chars, int) or max_chars < 1:
            raise PolicyError(f"{where}: max_chars must be a whole number of at least 1")
        return TextRule(max_chars)
    if keys & {"min", "max"}:
        _only(where, keys, {"min", "max", "integer"})
        if not {"min", "max"} <= keys:
            raise PolicyError(f"{where}: a number needs both min and max")
        low, high = spec["min"], spec["max"]
        if not (_is_number(low) and _is_number(high)):
            raise PolicyError(f"{where}: min and max must be numbers")
        if low > high:
            raise PolicyError(f"{where}: min must not be more than max")
        integer = spec.get("integer", False)
        if not isinstance(integer, bool):
            raise PolicyError(f"{where}: integer must be true or false")
        return NumberRule(float(low), float(high), integer)
    raise PolicyError(
        f"{where} must have min and max, allowed, or any; got {shown_names(map(str, keys))}"
    )


def _only(where: str, keys: set[str], known: set[str]) -> None:
    unknown = keys - known
    if unknown:
        raise PolicyError(f"{where}: unknown fields {shown_names(map(str, unknown))}")


def _is_number(value: Any) -> bool:
    # TOML's true/false are Python bools, an int subclass: not numbers here.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _number(value: float) -> str:
    value = float(value)  # the defaults below are written as ints
    return str(int(value)) if value.is_integer() else repr(value)


def parse_subjects(value: object) -> tuple[str, ...]:
    """A profile's `subjects`: a list of fnmatch patterns (an empty list: nobody)."""
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise PolicyError('subjects must be a list of patterns, e.g. ["*"] or ["team-a:*"]')
    return tuple(value)


# What a client may set on a profile that declares no `client_options`. The system prompt, the
# model and tools are the operator's unless a profile opens them.
DEFAULT_CLIENT_OPTIONS: Mapping[str, ClientOptionPolicy] = {
    "echo": ClientOptionPolicy(
        {
            "delay_ms": NumberRule(0, 60_000),
            "chunks": NumberRule(1, 1_000_000, integer=True),
            "parts": TextRule(64),  # e.g. "reasoning,tool,text"; the producer checks the names
        }
    ),
    "openai": ClientOptionPolicy(
        {
            "temperature": NumberRule(0, 2),
            "top_p": NumberRule(0, 1),
            "max_tokens": NumberRule(1, 4_096, integer=True),
        }
    ),
    "grpc": ClientOptionPolicy({}),  # the backend's options are unknown here: none
}


@dataclass(frozen=True, slots=True)
class ProducerPolicy:
    """Who may start a producer and which options they may set."""

    subjects: tuple[str, ...] = ("*",)
    client_options: ClientOptionPolicy = UNRESTRICTED

    def admits(self, name: str, caller: Caller) -> bool:
        """Whether `caller` may start the producer called `name`: its token's profiles (if
        restricted) name it, and its subject matches one of the patterns."""
        if caller.profiles is not None and name not in caller.profiles:
            return False
        return any(fnmatchcase(caller.subject, pattern) for pattern in self.subjects)


OPEN = ProducerPolicy()  # anyone, any option: for producers registered in code without a policy
