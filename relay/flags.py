"""Command-line flags that also read an environment variable, for both servers' `--help`."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any


def env_option(
    parser: argparse.ArgumentParser,
    group: argparse._ActionsContainer,
    env: Mapping[str, str],
    prefix: str,
    name: str,
    default: object,
    help_text: str,
    kind: type = str,
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
            parser.error(f"{variable}={raw!r} is not a valid {kind.__name__}")
        choices = extra.get("choices")
        if choices is not None and value not in choices:  # argparse checks only the flag's
            parser.error(f"{variable}={raw!r} is not one of {', '.join(map(str, choices))}")
    shown = "" if default in (None, "") else " (default: %(default)s)"
    escaped = help_text.replace("%", "%%")  # argparse formats help with %
    group.add_argument(
        f"--{name}", type=kind, default=value, help=f"{escaped}{shown} [{variable}]", **extra
    )
