"""The Ray Data flow of a run: read the shards, run the head on every row in the engine
actors, write the rows in write tasks; the driver receives one summary per written part."""

from __future__ import annotations

from typing import Any

from pipeline.engine.placement import ReplicaPlacer
from pipeline.engine.session import actor_env
from pipeline.io.read import read_inputs
from pipeline.io.shard_column import SHARD_COLUMN, path_key
from pipeline.io.sink import write_parts
from pipeline.worker import InferenceWorker, worker_settings


def keep_rows_to_redo(batch, *, redo: dict, id_column: str):
    """Rows of shards to run whole, and of shards with rows to redo only those rows."""
    import pyarrow.compute as pc

    paths = batch.column(SHARD_COLUMN)
    keep = None
    for path in pc.unique(paths).to_pylist():
        rows = pc.equal(paths, path)
        if path_key(path) in redo:
            rows = pc.and_(rows, pc.is_in(batch.column(id_column), value_set=redo[path_key(path)]))
        keep = rows if keep is None else pc.or_(keep, rows)
    return batch.filter(keep) if keep is not None else batch


def rows_per_block(spec, rows: int) -> int:
    """Rows per block handed to an engine actor in one call: about 1/8 of each replica's
    share, between one batch and 64 batches (a Ray task, a ledger call and an output block
    each; an actor that dies reruns its blocks in flight)."""
    batch = spec.resources.batch_size
    return max(batch, min(64 * batch, rows // (8 * spec.resources.replica_range[1])))


def rows_per_write(spec, rows: int) -> int:
    """output.rows_per_file, or about 1/16 of the rows to run (at least one batch, at most 40,000:
    each write task costs a fixed overhead, and Parquet readers prefer fewer, larger files)."""
    if spec.output.rows_per_file:
        return spec.output.rows_per_file
    return max(spec.resources.batch_size, min(40_000, rows // 16))


def ledger_name(run_id: str) -> str:
    """The Ray name of a run's RowLedger actor (in the driver's namespace)."""
    return f"qwen-batch-ledger-{run_id}"


def build(plan, *, run_id: str, device: str, engine_args: dict[str, Any], engine_factory,
          placer: ReplicaPlacer, origin: float):
    """read the shards -> batches -> engine actors -> write tasks -> part summaries."""
    import ray

    from pipeline.io.ledger import RowLedger, read_poisoned

    spec = plan.spec
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = False
    # An error our stages raise reaches the driver as itself (RunStopped, LostLockError, ...,
    # pipeline.errors), not as Ray Data's UserCodeException, whose cause is lost in transit.
    ctx.raise_original_map_exception = True
    # All first replicas load before work starts, so that they share it from the first batch
    # (and an engine that cannot start fails the run now, not after the others finished).
    ctx.wait_for_min_actors_s = int(spec.resources.start_timeout_s)
    todo = plan.work
    # Exactly the plan's files, as they are (Parquet or JSON lines), each row with its file's path.
    ds = read_inputs(todo, plan.input_fs, plan.columns)
    if plan.redo:  # --retry-errors: of committed shards, only the rows to redo
        ds = ds.map_batches(keep_rows_to_redo, batch_format="pyarrow", zero_copy_batch=True, fn_kwargs={
            "redo": {path_key(s.path): plan.redo[s.name] for s in todo if s.name in plan.redo},
            "id_column": spec.input.id_column})
    # Blocks of several batches: every replica gets work and rows stream through instead of
    # waiting for whole files, while each Ray task (one worker call, one ledger record, one
    # output block) carries enough rows to pay for itself. The worker runs a block's batches
    # with at most rows_in_flight rows on its engine; one more block waits at each actor.
    block = rows_per_block(spec, sum(plan.rows_to_run(s) for s in todo))
    ds = ds.select_columns(plan.columns + [SHARD_COLUMN]).repartition(target_num_rows_per_block=block)
    # Actors restart without Ray's bound: the ledger keeps the budget, per poison row. The
    # ledger too restarts when its process dies (its calls are retried; the poison rows it
    # condemned are read back from OUTPUT/_poison); named, so that it can be found.
    ledger = ray.remote(RowLedger).options(name=ledger_name(run_id), num_cpus=0, max_restarts=-1,
                                           max_task_retries=-1).remote(
        spec.output.path, spec.resources.max_engine_restarts)
    ds = infer(ds, spec=spec, head=plan.head, id_type=plan.id_type, device=device, engine_args=engine_args,
               engine_factory=engine_factory, placer=placer, block=block, run_id=run_id, ledger=ledger,
               poisoned=frozenset(read_poisoned(spec.output.path)))
    # Write tasks bundle the actors' small batches into files of about rows_per_file rows.
    return ds.map_batches(
        write_parts,
        fn_kwargs={"output": spec.output.path, "run_id": run_id, "head": spec.task.head,
                   "id_type": plan.id_type, "shard_names": {s.path: s.name for s in todo}, "origin": origin,
                   "results_schema": plan.results_schema},
        batch_size=rows_per_write(spec, sum(plan.rows_to_run(s) for s in todo)),
        batch_format="pyarrow",
        zero_copy_batch=True,
        num_cpus=0.25,
    )


def infer(ds, *, spec, head, id_type, device: str, engine_args: dict[str, Any], engine_factory,
          placer: ReplicaPlacer, block: int, run_id: str, ledger=None, poisoned: frozenset = frozenset()):
    """The engine actors' stage: HEAD on every row of DS (blocks of BLOCK rows, each with its
    shard column), one engine per actor. With a ledger (pipeline.io.ledger) actors restart
    without Ray's bound, the ledger keeping the budget per poison row; without one Ray's
    bound is resources.max_engine_restarts."""
    import ray

    low, high = spec.resources.replica_range
    restarts = -1 if ledger is not None else spec.resources.max_engine_restarts
    return ds.map_batches(
        InferenceWorker,
        fn_constructor_kwargs={**worker_settings(spec, head), "id_type": id_type, "engine_args": engine_args,
                               "device": device, "engine_factory": engine_factory, "ledger": ledger,
                               "poisoned": poisoned},
        batch_size=block,
        batch_format="pyarrow",
        zero_copy_batch=True,
        compute=ray.data.ActorPoolStrategy(
            min_size=low, max_size=high,
            max_tasks_in_flight_per_actor=1 + max(1, -(-spec.resources.rows_in_flight // block))),
        ray_remote_args_fn=placer.remote_args_fn,
        **placer.shape.actor, runtime_env={"env_vars": actor_env(spec, device, run_id)},
        max_restarts=restarts, max_task_retries=restarts,
    )
