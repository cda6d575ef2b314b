"""A fault seam: the embedded store, made to fail or block on command, operation by operation.

Faults are injected under the store's own error handling (where SQLite would raise), so what the
relay sees is exactly what a full disk or a hung file system would show it.
"""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass, field
from typing import TypeVar

import aiosqlite

from relay.stores.sqlite import SqliteStore, Work

T = TypeVar("T")

DISK_FULL = "database or disk is full"


@dataclass
class Fault:
    failures: int  # how many more calls fail; -1: all of them, until healed
    blocked: asyncio.Event | None = None  # set: the call goes on
    entered: asyncio.Event = field(default_factory=asyncio.Event)  # a call reached the fault


class FaultyStore(SqliteStore):
    """`fail("end_stream")` makes the next end_stream calls raise as a full disk would;
    `block("get_active")` holds them, inside their transaction, until `release`."""

    def __init__(self, path: object) -> None:
        super().__init__(str(path))
        self.faults: dict[str, Fault] = {}
        self.calls: dict[str, int] = {}

    def fail(self, operation: str, times: int = -1) -> Fault:
        fault = self.faults[operation] = Fault(times)
        return fault

    def block(self, operation: str) -> Fault:
        fault = self.faults[operation] = Fault(0, asyncio.Event())
        return fault

    def heal(self, operation: str) -> None:
        fault = self.faults.pop(operation, None)
        if fault is not None and fault.blocked is not None:
            fault.blocked.set()

    async def _transaction(self, operation: str, work: Work[T]) -> T:
        self.calls[operation] = self.calls.get(operation, 0) + 1
        fault = self.faults.get(operation)
        if fault is None:
            return await super()._transaction(operation, work)

        async def faulty(db: aiosqlite.Connection) -> T:
            fault.entered.set()
            if fault.blocked is not None:
                await fault.blocked.wait()
            if fault.failures != 0:
                if fault.failures > 0:
                    fault.failures -= 1
                raise sqlite3.OperationalError(DISK_FULL)
            return await work(db)

        return await super()._transaction(operation, faulty)
