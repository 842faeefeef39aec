"""Which rows were in flight when an engine died, so a row that kills every engine it meets
(a poison row) ends as one error row instead of stopping the run.

An engine actor takes a block of rows (several batches) in one call and tells the ledger once
that the block starts: one ledger call per block, not per batch, so the record costs nothing
a row would notice. When its actor dies, Ray restarts the actor and runs the block again; the
ledger tells the retry that it is a retry, and the search for the row narrows in steps, each
step paid by a death only if the poison row is really there:
- a retried block of several batches notes each batch before it starts (its rows still run
  together); a batch that was in flight when an engine died again is a suspect;
- a suspect batch (or a retried block of one batch) runs its rows one at a time with the engine
  to itself, noting each row before it starts. A row that was running alone when an engine died
  is condemned: the next retry writes it as an `engine_died` error row and runs the others.

Condemned rows are remembered in the output folder (OUTPUT/_poison/KEY.json), so a rerun after
a crash does not spend engine restarts on them again, and a ledger actor that Ray restarts
reads them back. The restart budget counts per poison row, not per actor: each poison row
may cost its three restarts (two when its block is one batch) on top of
resources.max_engine_restarts.
"""

from __future__ import annotations

import asyncio
import hashlib
from contextlib import asynccontextmanager
from typing import Any

from pipeline.io.shard_column import path_key

POISON = "_poison"
PER_POISON_ROW = 3  # restarts a poison row may cost: its block, its batch, itself alone


def batch_key(shard: str, ids: list[Any]) -> str:
    """The same for a batch and its retries, in any process and any run (the shard's path
    without scheme or leading slash: Ray Data may name it either way)."""
    return hashlib.sha1(repr((path_key(shard), ids)).encode()).hexdigest()


def read_poisoned(output: str) -> set[str]:
    """Keys of the rows condemned in earlier runs on this output."""
    import posixpath

    import pyarrow.fs as pafs

    from pipeline.io.shards import resolve_filesystem

    fs, root = resolve_filesystem(output)
    infos = fs.get_file_info(pafs.FileSelector(posixpath.join(root, POISON), allow_not_found=True))
    return {posixpath.basename(i.path).removesuffix(".json") for i in infos if i.path.endswith(".json")}


def poison_rows(output: str) -> list[dict]:
    """The rows condemned on this output (what each OUTPUT/_poison/KEY.json holds: the row's
    id and shard, the deaths it caused), with their key."""
    import json
    import posixpath

    from pipeline.io.shards import resolve_filesystem

    fs, root = resolve_filesystem(output)
    rows = []
    for key in sorted(read_poisoned(output)):
        try:
            with fs.open_input_stream(posixpath.join(root, POISON, f"{key}.json")) as f:
                row = json.loads(f.read())
        except (OSError, ValueError):
            row = {}
        rows.append({"key": key, "id": row.get("id"), "shard": row.get("path"), "deaths": row.get("deaths")})
    return rows


def forgive(output: str, keys: set[str]) -> int:
    """Delete the poison markers of these row keys, so that a --retry-errors run tries those
    rows again (and condemns them again if they still kill every engine); how many."""
    import posixpath

    from pipeline.io.shards import resolve_filesystem

    fs, root = resolve_filesystem(output)
    gone = sorted(keys & read_poisoned(output))
    for key in gone:
        try:
            fs.delete_file(posixpath.join(root, POISON, f"{key}.json"))
        except FileNotFoundError:
            pass
    return len(gone)


class RowLedger:
    """One per run, a Ray actor shared by all replicas (it holds a few keys per batch)."""

    def __init__(self, output: str | None = None, restart_budget: int = 3) -> None:
        self.output = output
        self.batches: dict[str, int] = {}  # block or batch key -> times begun and not ended
        self.retrying: set[str] = set()  # retried blocks not yet ended: each died with a suspect in it
        self.alone: dict[str, int] = {}  # row key -> times begun alone and not ended
        self.condemned: set[str] = read_poisoned(output) if output else set()
        self.restart_budget = restart_budget
        self.restarts = 0
        self.condemned_here = 0

    def restarted(self) -> str | None:
        """An engine actor came back after dying; a reason to stop if over the budget."""
        self.restarts += 1
        # A row that died running alone is a poison row from that moment (it is condemned when
        # it is next begun), and a retried block that died again holds one: counting them only
        # when condemned would stop a run whose other poison batch happened to die first.
        found = (self.condemned_here + sum(1 for key in self.alone if key not in self.condemned)
                 + len(self.retrying))
        allowed = self.restart_budget + PER_POISON_ROW * found
        if self.restarts > allowed:
            return (f"engine actors died {self.restarts} times, above resources.max_engine_restarts "
                    f"{self.restart_budget} (+{PER_POISON_ROW} for each of the {found} poison row(s) found)")
        return None

    def is_condemned(self, key: str) -> bool:
        return key in self.condemned

    def begin(self, key: str, ended: list[str] = (), *, block: bool = True) -> int:
        """Record a block (or, in a retried block, a batch) starting, and the caller's keys that
        ended since its last call; returns how many earlier attempts of it died."""
        for done in ended:
            self.batches.pop(done, None)
            self.retrying.discard(done)
        tries = self.batches.get(key, 0)
        self.batches[key] = tries + 1
        if block and tries:
            self.retrying.add(key)
        return tries

    def begin_alone(self, key: str, row: dict | None = None) -> int:
        """Record a row starting alone on an engine; returns how many engines died running it
        (a row condemned in an earlier run counts as one)."""
        if key in self.condemned:
            return max(1, self.alone.get(key, 0))
        deaths = self.alone.get(key, 0)
        self.alone[key] = deaths + 1
        if deaths:
            self._condemn(key, row or {}, deaths)
        return deaths

    def _condemn(self, key: str, row: dict, deaths: int) -> None:
        self.condemned.add(key)
        self.condemned_here += 1
        if not self.output:
            return
        import json
        import posixpath

        from pipeline.io.shards import resolve_filesystem

        fs, root = resolve_filesystem(self.output)
        try:
            fs.create_dir(posixpath.join(root, POISON), recursive=True)
            with fs.open_output_stream(posixpath.join(root, POISON, f"{key}.json")) as f:
                f.write(json.dumps({**row, "deaths": deaths}, default=str).encode())
        except OSError:  # a full disk: the row is still an error row in this run
            pass

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
