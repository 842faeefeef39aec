"""The Python API: `run` a job spec as `qwen-batch run` does (the CLI is a thin layer over it),
or `process` a Ray Dataset's rows with a head, Ray-Data-native, as ray.data.llm's processors do.

    import pipeline
    report = pipeline.run("jobs/chat.yaml", overrides=["sampling.max_tokens=64"])
    report.exit_code, report.output, report.rows, report.results, report.errors

    ds = ray.data.read_json("prompts.jsonl")
    out = pipeline.process(ds, {"model": {"source": "Qwen/Qwen3-8B"}, "task": {"head": "chat"}})
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from pipeline.errors import InputError, JobError, NothingRan, SpecError
from pipeline.io.manifest import RunReport
from pipeline.spec import JobSpec, load_spec

# input.path and output.path of a spec that process() runs: rows come from a Dataset and go
# back as one (the run marks of its engine processes name it).
DATASET = "ray-dataset://"


def load(spec: JobSpec | dict | str | os.PathLike, *, overrides: Iterable[str] = (),
         address: str | None = None) -> JobSpec:
    """A checked JobSpec from a JobSpec, a dict of sections or the path of a YAML spec, with
    KEY=VALUE overrides (as `--set`) and a Ray address. SpecError says what is wrong."""
    overrides = list(overrides)
    try:
        if isinstance(spec, JobSpec):
            spec = load_spec(data=spec.model_dump(mode="json"), overrides=overrides) if overrides else spec
        elif isinstance(spec, dict):
            spec = load_spec(data=spec, overrides=overrides)
        else:
            spec = load_spec(spec, overrides=overrides)
    except JobError:
        raise
    except Exception as e:  # the spec could not even be read: nothing ran
        raise NothingRan(e) from e
    if address:
        spec.ray.address = address
    return spec


def run(spec: JobSpec | dict | str | os.PathLike, *, overrides: Iterable[str] = (), address: str | None = None,
        overwrite: bool = False, resume_anyway: bool = False, retry_errors: bool = False,
        retry_where: Iterable[str] = (), progress: bool = True, console=None, engine_factory=None) -> RunReport:
    """Run a job to completion, resuming what an earlier run committed, as `qwen-batch run`.

    Returns the run's report: exit_code (0 ok, 1 over output.max_error_rate, 3 the run
    stopped; committed shards are kept), output, rows, results, errors. A job that cannot
    start raises: SpecError or InputError (exit code 2, nothing written), OutputBusyError
    (another run writes there), StoreUnavailableError (the object store kept failing).
    retry_errors / retry_where: compute committed error rows (or rows whose COLUMN=VALUE)
    again, exactly once. engine_factory replaces the vLLM engine (fault injection in tests).
    """
    from pipeline.plan import RetrySelection
    from pipeline.runner import run_job

    spec = load(spec, overrides=overrides, address=address)
    retry_where = list(retry_where)
    retry = RetrySelection.parse(retry_where, all_errors=retry_errors) if (retry_errors or retry_where) else None
    return run_job(spec, overwrite=overwrite, resume_anyway=resume_anyway, retry=retry, progress=progress,
                   engine_factory=engine_factory, console=console)


def process(ds, spec: JobSpec | dict | str | os.PathLike, *, engine_factory=None):
    """Run a head over a Ray Dataset: a lazy Dataset of one row per input row.

    spec: the model, task, sampling and resources sections (a dict, a JobSpec or a YAML
    path; input and output are not used, except input.id_column, "id" unless set). DS needs
    that id column and the head's input columns (e.g. prompt or messages for chat). Each
    output row has the id column, the head's result columns (docs: the head's page) and
    error_type / error_message, null unless the row failed (then its reason: bad input, an
    engine timeout, ...). Nothing is written and nothing resumes: for exactly-once output use
    run(). An engine that keeps dying fails the Dataset after resources.max_engine_restarts.
    """
    import pyarrow as pa
    import ray

    from pipeline.checkpoint import resolve
    from pipeline.dataflow import infer
    from pipeline.engine.placement import ReplicaPlacer, replica_shape
    from pipeline.engine.session import device as session_device
    from pipeline.io.output import new_run_id

    if isinstance(spec, dict):
        spec = {**spec, "input": {**spec.get("input", {}), "path": DATASET},
                "output": {**spec.get("output", {}), "path": DATASET}}
    spec = load(spec)
    checkpoint = resolve(spec)
    head = checkpoint.head
    schema = ds.schema()
    if schema is None:
        raise InputError("the Dataset has no schema (no rows?); give a Dataset with an id column and the head's "
                         "input columns")
    columns = dict(zip(schema.names, schema.types))
    id_column = spec.input.id_column
    _check_columns(columns, id_column, head, spec.task.head)
    id_type = columns[id_column] if isinstance(columns[id_column], pa.DataType) else pa.string()
    if not ray.is_initialized():
        ray.init(address=spec.ray.address or os.environ.get("RAY_ADDRESS"))
    device = session_device(spec)
    placer = ReplicaPlacer(replica_shape(spec, device))
    placer.check()
    reads = [id_column] + [c for c in head.input_columns() if c in columns and c != id_column]
    ds = ds.select_columns(reads).map_batches(_with_shard_column, batch_format="pyarrow", zero_copy_batch=True)
    out = infer(ds, spec=spec, head=head, id_type=id_type, device=device,
                engine_args=checkpoint.engine_args(device), engine_factory=engine_factory,
                placer=placer, block=spec.resources.batch_size, run_id=new_run_id())
    results = [n for n in head.result_schema(id_type).names if n not in ("id", "path")]
    return out.map_batches(_result_rows, batch_format="pyarrow", zero_copy_batch=True,
                           fn_kwargs={"id_column": id_column, "columns": results})


def _check_columns(columns: dict, id_column: str, head, name: str) -> None:
    names = ", ".join(columns) or "none"
    if id_column not in columns:
        raise InputError(f"the Dataset has no column '{id_column}' (columns: {names}); every row needs a unique "
                         f"id: add one (e.g. ds.add_column) or set input.id_column")
    for column in head.required_all():
        if column not in columns:
            raise InputError(f"the Dataset has no column '{column}' (columns: {names}), which head '{name}' reads "
                             f"from every row; add it or set the head's column option")
    any_of = head.required_any()
    if any_of and not any(c in columns for c in any_of):
        raise InputError(f"the Dataset has none of the columns {', '.join(any_of)} (columns: {names}), one of "
                         f"which head '{name}' reads")


def _with_shard_column(batch):
    import pyarrow as pa

    from pipeline.io.shard_column import SHARD_COLUMN

    return batch.append_column(SHARD_COLUMN, pa.repeat(pa.scalar(DATASET), len(batch)))


def _result_rows(batch, *, id_column: str, columns: list[str]):
    table = batch.select(["id"] + columns + ["error_type", "error_message"])
    return table.rename_columns([id_column] + table.column_names[1:])


__all__ = ["DATASET", "InputError", "RunReport", "SpecError", "load", "process", "run"]
