"""The event loop a server runs on: uvloop (libuv's, the default) or asyncio's own.

uvloop does the same work for less CPU: in the browsers benchmark (bench/s7_browsers.py, 200
browsers at 50 chunks/s) the gateway spent about a fifth less per chunk delivered and the relay a
little less per chunk. `--event-loop asyncio` is the way back, should a platform or a library
not get along with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

LOOPS = ("uvloop", "asyncio")
DEFAULT = "uvloop"
HELP = "the event loop: uvloop (libuv's, less CPU per chunk) or asyncio's own"

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T], loop: str = DEFAULT) -> T:
    """asyncio.run on the chosen loop."""
    if loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return asyncio.run(main)
