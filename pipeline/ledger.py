"""Which rows were in flight when an engine died, so a row that kills every engine it meets
(a poison row) ends as one error row instead of stopping the run.

A batch runs with all its rows in flight at once. When its actor dies, Ray restarts the actor
and runs the batch again; the ledger tells the retry that it is a retry, and the retry runs
its rows one at a time with the engine to itself, noting each row before it starts. A row
that was running alone when an engine died is condemned: the next retry writes it as an
`engine_died` error row and runs the others.
"""

from __future__ import annotations

import asyncio
import hashlib
from contextlib import asynccontextmanager
from typing import Any


def batch_key(shard: str, ids: list[Any]) -> str:
    """The same for a batch and its retries, in any process."""
    return hashlib.sha1(repr((shard, ids)).encode()).hexdigest()


class RowLedger:
    """One per run, a Ray actor shared by all replicas (it holds a few keys per batch)."""

    def __init__(self) -> None:
        self.batches: dict[str, int] = {}  # batch key -> times begun and not ended
        self.alone: dict[str, int] = {}  # row key -> times begun alone and not ended

    def begin(self, key: str) -> int:
        """Record a batch starting; returns how many earlier attempts died."""
        tries = self.batches.get(key, 0)
        self.batches[key] = tries + 1
        return tries

    def end(self, key: str) -> None:
        self.batches.pop(key, None)

    def begin_alone(self, key: str) -> int:
        """Record a row starting alone on an engine; returns how many engines died running it."""
        deaths = self.alone.get(key, 0)
        self.alone[key] = deaths + 1
        return deaths

    def end_alone(self, key: str) -> None:
        self.alone.pop(key, None)


class EngineGate:
    """Shared use of an engine by many rows, or exclusive use by one (a suspect row, so
    that a crash can be blamed on it alone)."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0  # exclusive users waiting: new shared users queue behind them

    @asynccontextmanager
    async def shared(self):
        if self._exclusive or self._waiting:  # the slow path: queue behind the exclusive user
            async with self._cond:
                await self._cond.wait_for(lambda: not self._exclusive and not self._waiting)
        self._shared += 1  # no await between the check and this: one event loop, no race
        try:
            yield
        finally:
            self._shared -= 1
            if self._waiting:
                async with self._cond:
                    self._cond.notify_all()

    @asynccontextmanager
    async def exclusive(self):
        async with self._cond:
            self._waiting += 1
            await self._cond.wait_for(lambda: not self._exclusive and self._shared == 0)
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            async with self._cond:
                self._exclusive = False
                self._cond.notify_all()
