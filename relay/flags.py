"""Command-line flags that also read an environment variable, for both servers' `--help`."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from typing import Any


def env_option(
    parser: argparse.ArgumentParser,
    group: argparse._ActionsContainer,
    env: Mapping[str, str],
    prefix: str,
    name: str,
    default: object,
    help_text: str,
    kind: Callable[[str], Any] = str,
    **extra: Any,
) -> None:
    """Adds `--name` to `group`, its default read from `<prefix><NAME>` (e.g. RELAY_ADDRESS)
    when set; a flag on the command line wins. A value the flag's type refuses stops the
    program with the variable's name, not a traceback."""
    variable = prefix + name.upper().replace("-", "_")
    raw = env.get(variable)
    value = default
    if raw is not None:
        try:
            value = kind(raw)
        except ValueError:
            parser.error(f"{variable}={raw!r} is not a valid {getattr(kind, '__name__', 'value')}")
        choices = extra.get("choices")
        if choices is not None and value not in choices:  # argparse checks only the flag's
            parser.error(f"{variable}={raw!r} is not one of {', '.join(map(str, choices))}")
    # The code's default, never the variable's value: that may hold a secret (a password in
    # a store URL). argparse formats help with %, hence the escapes.
    shown = "" if default in (None, "") else f" (default: {default})"
    text = f"{help_text}{shown}".replace("%", "%%")
    group.add_argument(f"--{name}", type=kind, default=value, help=f"{text} [{variable}]", **extra)
