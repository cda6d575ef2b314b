"""Store operations that run to their end whatever happens to their caller."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class Uncut:
    """Runs each operation in a task of its own: a caller cancelled mid-way (a client deadline)
    stops waiting, but the transaction or pipeline under it still completes or fails whole.
    `drain` waits for those whose callers gave up, before the store closes."""

    def __init__(self) -> None:
        self._running: set[asyncio.Task[Any]] = set()

    async def run(self, operation: Coroutine[Any, Any, T]) -> T:
        task = asyncio.create_task(operation)
        self._running.add(task)
        task.add_done_callback(self._settled)
        return await asyncio.shield(task)

    async def drain(self) -> None:
        if self._running:
            await asyncio.wait(list(self._running))

    def _settled(self, task: asyncio.Task[Any]) -> None:
        # Retrieves the exception, which a caller that gave up waiting never will (the failure
        # itself is logged where it happened).
        self._running.discard(task)
        if not task.cancelled():
            task.exception()
