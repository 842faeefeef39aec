"""The Ray Data stage that runs a head on every row, many rows in flight per engine."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import types
from collections.abc import AsyncIterator
from typing import Any

import pyarrow as pa

from pipeline.engine.adapters import ROW_ADAPTER, row_adapter
from pipeline.errors import RunStopped, is_engine_dead
from pipeline.heads import Head, RowError
from pipeline.io.ledger import EngineGate, batch_key
from pipeline.io.schemas import arrow_schema
from pipeline.io.shard_column import SHARD_COLUMN
from pipeline.spec import JobSpec

STATUS_COLUMNS = [
    pa.field("error_type", pa.string()),
    pa.field("error_message", pa.string()),
    pa.field("_started", pa.float64()),
    pa.field("_finished", pa.float64()),
    pa.field("_engine_settings", pa.string()),
    pa.field("_worker", pa.string()),
]


PER_WORKER = ("_engine_settings", "_worker")  # stage columns that are the same in every row of a worker


def stage_schema(head, id_type: pa.DataType) -> pa.Schema:
    """What the stage emits: the head's result columns, the error columns, timing, shard.
    head: a Head (its result_schema, which may follow its options) or a head's name."""
    results = arrow_schema(f"results_{head}", id_type=id_type) if isinstance(head, str) else head.result_schema(id_type)
    fields = [results.field(i).with_nullable(True) for i in range(len(results))]
    return pa.schema(fields + STATUS_COLUMNS + [pa.field(SHARD_COLUMN, pa.string())])


def _reconstructed() -> bool:
    """Whether Ray restarted this actor after it died."""
    try:
        import ray

        return ray.get_runtime_context().was_current_actor_reconstructed
    except Exception:  # outside Ray (unit tests)
        return False


LEDGER_GONE = ("the run's row ledger (the Ray actor that tracks batches for poison-row recovery and the engine "
               "restart budget) is gone for good (ended with ray.kill, or its Ray lost it); without it a dying "
               "engine could restart forever, so the run stops; committed shards are kept, rerun the same command "
               "to finish")


def _ledger_gone(e: BaseException) -> bool:
    """Whether a ledger call failed because the actor is dead for good. A ledger whose process
    died is restarted by Ray and the call retried: that never gets here."""
    try:
        from ray.exceptions import RayActorError
    except ImportError:
        return False
    return isinstance(e, RayActorError)


def _node_id() -> str:
    """The Ray node this actor runs on (short), so metrics show where each replica ran."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id()[:12]
    except Exception:  # outside Ray (unit tests)
        return "local"


def start_eagerly(coro):
    """Run a coroutine up to its first real wait: a row that needs no engine round trip (a
    bad row, an instant engine) is done without a task; else a task goes on from there.
    Returns (done, result) or (False, task). Python 3.12's eager task factory does this."""
    try:
        first = coro.send(None)
    except StopIteration as e:
        return True, e.value
    return False, asyncio.ensure_future(_go_on(coro, first))


async def _go_on(coro, first):
    return await _delegate(coro, first)


@types.coroutine
def _delegate(coro, value):
    """`yield from` an already started coroutine: what it waits on is waited on by the task."""
    while True:
        try:
            sent = yield value
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as e:  # the task's cancellation goes into the row's coroutine
            try:
                value = coro.throw(e)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                value = coro.send(sent)
            except StopIteration as stop:
                return stop.value


def worker_settings(spec: JobSpec, head: Head) -> dict[str, Any]:
    """InferenceWorker's arguments from the job: its head (the plan's) and the spec's row bounds."""
    out = {"head": head, "id_column": spec.input.id_column, "batch_size": spec.resources.batch_size,
           "row_timeout": spec.resources.row_timeout(spec.sampling.max_tokens),
           "rows_in_flight": spec.resources.rows_in_flight}
    if spec.model.adapters:
        out.update(adapters=tuple(spec.model.adapters), adapter_column=spec.model.adapter_column)
    return out


class InferenceWorker:
    """Holds one engine for the actor's life; each call runs a head on a block of rows."""

    def __init__(self, *, head: Head, id_column: str, row_timeout: float, batch_size: int, rows_in_flight: int,
                 id_type: pa.DataType, engine_args: dict[str, Any], device: str, engine_factory=None, ledger=None,
                 poisoned: frozenset = frozenset(), adapters: tuple[str, ...] = (), adapter_column: str = "adapter"):
        self.id_column = id_column
        self.adapters, self.adapter_column = adapters, adapter_column  # model.adapters' names; the rows' column
        self.head = head  # the plan's (pipeline.checkpoint.Checkpoint.head)
        self.schema = stage_schema(self.head, id_type)
        self.row_schema = pa.schema([f for f in self.schema if f.name not in PER_WORKER])
        if engine_factory is None:
            from pipeline.engine.vllm_engine import VllmEngine as engine_factory
        self.reconstructed = _reconstructed()
        if ledger is not None and self.reconstructed:  # this actor died before: within budget?
            import ray

            try:
                over = ray.get(ledger.restarted.remote())
            except Exception as e:
                if _ledger_gone(e):
                    raise RunStopped(LEDGER_GONE) from None
                raise
            if over:
                raise RunStopped(f"{over}; the run stops, committed shards are kept")
        self.engine = engine_factory(engine_args, device=device)
        self.engine_settings = getattr(self.engine, "settings", None)
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}@{_node_id()}"
        self.ledger = ledger  # a RowLedger actor handle, or None (no poison-row recovery)
        self.ended: list[str] = []  # blocks and batches done since the ledger was last told (pipeline.io.ledger)
        self.timeout = row_timeout
        self.batch_size = batch_size
        self.in_flight = asyncio.Semaphore(max(1, rows_in_flight // self.batch_size))
        self.gate = EngineGate()
        self.last_answer = 0.0  # when a row last finished on this engine (hung-engine check)
        self.poisoned = poisoned  # row keys condemned in earlier runs (pipeline.io.ledger)

    def _start(self, row: dict[str, Any]) -> tuple[bool, Any]:
        """One row through the head, eagerly (start_eagerly): (True, its output row) when it
        needed no engine round trip, else (False, a task that ends with it)."""
        started = time.time()
        try:
            name = row_adapter(row, self.adapter_column, self.adapters) if self.adapters else None
        except ValueError as e:  # a name not in model.adapters: this row's error
            return True, self._finish(self._failed(RowError("invalid_input", str(e))), row, started)
        adapter = ROW_ADAPTER.set(name)  # the row's engine calls, and the task they go on in, use it
        try:
            finished, value = start_eagerly(self.head.run(row, self.engine))
        except Exception as e:
            return True, self._finish(self._failed(e), row, started)
        finally:
            ROW_ADAPTER.reset(adapter)
        if finished:
            return True, self._finish(value, row, started)
        return False, asyncio.ensure_future(self._end(value, row, started))

    async def _end(self, task: asyncio.Future, row: dict[str, Any], started: float) -> dict[str, Any]:
        try:
            out = await task
        except Exception as e:
            out = self._failed(e)
        return self._finish(out, row, started)

    def _failed(self, e: Exception) -> dict[str, Any]:
        """The error columns of a row whose head raised."""
        if isinstance(e, RowError):
            return {"error_type": e.error_type, "error_message": e.message}
        if is_engine_dead(e):
            # Not this row's fault, and this engine will not answer again: end the actor
            # so that Ray restarts it (a fresh engine) and retries its unfinished rows.
            self._shutdown_engine()
            os._exit(70)
        return {"error_type": "internal_error", "error_message": f"{type(e).__name__}: {e}"}

    async def _timed(self, rows: list[dict[str, Any]], *, alone: bool = False) -> list[dict[str, Any]]:
        """Rows at once; those not done within the row timeout become engine_timeout rows
        (one deadline for the batch: its rows start together). The deadline covers a head's own
        work too: heads let the event loop run between pieces of it, so a row busy counting or
        cutting is cancelled there like one waiting on the engine. If no row at all finished on
        this engine meanwhile, the engine is hung, not the rows: the actor ends so that Ray
        restarts it with a fresh engine and runs the block again, narrowed down to its rows one
        at a time as for a poison row (a row that hangs alone then becomes the engine_timeout
        row)."""
        started = time.time()
        runs = [self._start(r) for r in rows]
        tasks = [task for finished, task in runs if not finished]
        done, pending = await asyncio.wait(tasks, timeout=self.timeout) if tasks else ((), ())
        if pending and not alone and self.last_answer < started:
            self._shutdown_engine()
            os._exit(71)
        for t in pending:
            t.cancel()
        return [out if finished else out.result() if out in done else self._finish(
            {"error_type": "engine_timeout", "error_message": (
                f"the engine did not answer within {self.timeout:g} s (resources.row_timeout_s), or the "
                f"row's own work (such as counting and cutting a long document) took longer; the row was "
                f"cancelled")}, r, started) for (finished, out), r in zip(runs, rows)]

    def _finish(self, out: dict[str, Any], row: dict[str, Any], started: float) -> dict[str, Any]:
        self.last_answer = time.time()
        out.update(id=row[self.id_column], path=row[SHARD_COLUMN], _started=started, _finished=time.time())
        return out

    async def _suspect(self, row: dict[str, Any]) -> dict[str, Any]:
        """Run a row of a batch whose engine died: alone, so a second death names this row."""
        key = self._key([row])
        # The gate first: a row is on record as running alone only while it has the engine to
        # itself (noted while it waited, it would be blamed for the row that held the engine).
        async with self.gate.exclusive():
            deaths = await self.ledger.begin_alone.remote(key, {"path": row[SHARD_COLUMN], "id": row[self.id_column]})
            if deaths:
                out = self._condemned(row, deaths)
            else:
                out = (await self._timed([row], alone=True))[0]
            await self.ledger.end_alone.remote(key)
        return out

    def _condemned(self, row: dict[str, Any], deaths: int) -> dict[str, Any]:
        return self._finish({"error_type": "engine_died", "error_message": (
            f"the engine process died {deaths} time(s) while running this row alone, so the row "
            f"was not tried again; it likely hits an engine bug or runs out of memory "
            f"(check its length and content)")}, row, time.time())

    def _rows(self, batch: pa.Table) -> tuple[list[dict[str, Any]], dict[int, str]]:
        """The batch as dicts; rows whose text is not valid UTF-8 come back as problems."""
        try:
            return batch.to_pylist(), {}
        except UnicodeDecodeError:
            pass
        rows, problems = [], {}
        for i in range(batch.num_rows):
            row = {}
            for name in batch.column_names:
                try:
                    row[name] = batch.column(name)[i].as_py()
                except UnicodeDecodeError as e:
                    row[name] = None
                    problems[i] = (f"column '{name}' is not valid UTF-8 (byte 0x{e.object[e.start]:02x} "
                                   f"at byte {e.start}); write the text as UTF-8")
            rows.append(row)
        return rows, problems

    async def __call__(self, block: pa.Table) -> AsyncIterator[pa.Table]:
        rows, bad = self._rows(block)
        try:
            out = await self._run_block([r for i, r in enumerate(rows) if i not in bad])
        except Exception as e:
            # the engine is in this process: only the ledger is an actor
            if self.ledger is not None and _ledger_gone(e):
                raise RunStopped(LEDGER_GONE) from None
            raise
        out += [self._finish({"error_type": "invalid_input", "error_message": bad[i]}, rows[i], time.time())
                for i in bad]
        yield self._table(out)

    def _table(self, rows: list[dict[str, Any]]) -> pa.Table:
        """The stage's rows as Arrow; the columns that are this worker's own (the same for every
        row) are repeated in Arrow, not converted from every row's dict."""
        table = pa.Table.from_pylist(rows, schema=self.row_schema)
        for name, value in (("_engine_settings", self.engine_settings), ("_worker", self.worker_id)):
            table = table.append_column(self.schema.field(name), pa.repeat(pa.scalar(value, pa.string()), len(table)))
        return table.select(self.schema.names)

    def _key(self, rows: list[dict[str, Any]]) -> str:
        """The ledger's key of these rows (a block, a batch or one row)."""
        return batch_key(rows[0][SHARD_COLUMN], [r[self.id_column] for r in rows])

    async def _run_block(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A block's rows in batches of resources.batch_size, at most rows_in_flight rows on the
        engine at once (over all the blocks this actor holds). One ledger record for the block;
        a retried block narrows down the row that killed the engine (pipeline.io.ledger)."""
        if not rows:
            return []
        key = self._key(rows)
        if self.poisoned:  # rows that killed engines in an earlier run on this output
            rows, done = self._skip_poisoned(rows)
        else:
            done = []
        batches = [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        tries = await self._begin(key) if self.ledger else 0
        if not tries:  # the common case
            run = self._shared
        elif len(batches) == 1:  # the block was one batch: it is the suspect
            run = self._alone
        else:  # which batch was it? note each, and a death names it
            run = self._noted
        parts = await asyncio.gather(*(run(b) for b in batches))
        if self.ledger:
            self.ended.append(key)
        return done + [r for part in parts for r in part]

    async def _shared(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A batch with its rows on the engine together (and with other batches')."""
        async with self.in_flight:
            return await self._together(rows)

    async def _together(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        async with self.gate.shared():
            return await self._timed(rows)

    async def _alone(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A suspect batch: its rows one at a time, each with the engine to itself."""
        return [await self._suspect(r) for r in rows]

    async def _noted(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A batch of a retried block: on record before it starts, alone if it was in flight
        when an engine died again."""
        key = self._key(rows)
        async with self.in_flight:  # on record once it is about to run, not while it waits
            ended, self.ended = self.ended, []
            tries = await self.ledger.begin.remote(key, ended, block=False)
            out = await (self._alone(rows) if tries else self._together(rows))
        self.ended.append(key)
        return out

    async def _begin(self, key: str) -> int:
        """Tell the ledger a block starts, and which keys ended since the last call (one call a
        block, not two); how many earlier attempts of it died. Awaited: a block must be on
        record before its rows can kill the engine, or its retry would not know it is one (and
        a poison row would cost an extra restart). Ends not yet told when the engine dies only
        make those blocks' rows be searched again if they are retried."""
        ended, self.ended = self.ended, []
        return await self.ledger.begin.remote(key, ended)

    def _skip_poisoned(self, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(rows to run, error rows for those condemned in an earlier run)."""
        run, done = [], []
        for r in rows:
            if self._key([r]) in self.poisoned:
                done.append(self._condemned(r, 1))
            else:
                run.append(r)
        return run, done

    def _shutdown_engine(self) -> None:
        shutdown = getattr(getattr(self, "engine", None), "shutdown", None)
        if shutdown is not None:
            shutdown()

    def __del__(self):
        self._shutdown_engine()
