"""run_job(spec): plan, read, infer, write. The one entry point behind the CLI."""

from __future__ import annotations

import logging
import os
import posixpath
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.engine import RUN_MARK, engine_args, reap_on_every_node, reap_orphans
from pipeline.heads import head_class
from pipeline.ledger import RowLedger
from pipeline.metrics import RunTotals, shard_metrics, summary_table
from pipeline.output import OutputDir
from pipeline.output_lock import OutputLock
from pipeline.placement import ReplicaPlacer, ReplicaShape, replica_shape
from pipeline.redact import redact, redact_text
from pipeline.schemas import arrow_schema
from pipeline.shards import InputError, Shard, check_shards, open_shards, resolve_filesystem
from pipeline.spec import JobSpec, SpecError
from pipeline.worker import SHARD_COLUMN, InferenceWorker

# Exit codes of `qwen-batch run` (documented in the README).
EXIT_OK, EXIT_TOO_MANY_ERRORS, EXIT_INVALID, EXIT_CRASHED = 0, 1, 2, 3


@dataclass
class Plan:
    """What a run will do, known before any model loads."""

    spec: JobSpec
    shards: list[Shard]
    ids: dict[str, pa.Array] = field(repr=False)
    id_type: pa.DataType
    columns: list[str]  # columns read from the shards
    done: list[str]  # shard names already committed by an earlier run of the same spec

    @property
    def todo(self) -> list[Shard]:
        return [s for s in self.shards if s.name not in self.done]


@dataclass
class RunReport:
    output: str
    run_id: str
    totals: RunTotals
    wall_seconds: float
    skipped_shards: int = 0
    exit_code: int = EXIT_OK
    message: str = ""


def plan_job(spec: JobSpec, *, overwrite: bool = False, resume_anyway: bool = False) -> Plan:
    """Check the spec, the inputs and the output folder; raises SpecError or InputError.

    resume_anyway keeps shards committed by a run of another spec, or from since-changed
    input files, and plans only the rest.
    """
    if overwrite and resume_anyway:
        raise SpecError("--overwrite and --resume-anyway contradict each other; pick one")
    head = head_class(spec.task.head)
    problem = head.check_options(spec.task.options)
    if problem:
        raise SpecError(problem)
    head_obj = head(spec.task.options)
    fs, shards = open_shards(spec.input.path)
    _check_output_outside_input(spec)
    reads = head_obj.input_columns()
    ids = check_shards(fs, shards, id_column=spec.input.id_column,
                       any_of=head_obj.required_any(),
                       reads=reads)
    clash = [c for c in [spec.input.id_column] + reads if c == SHARD_COLUMN]
    if clash:
        raise InputError(f"the job reads a column named '{SHARD_COLUMN}', which Ray Data overwrites "
                         f"with each row's file name; rename that column (or the head's column option)")
    _check_model(spec)
    id_type = shards[0].schema.field(spec.input.id_column).type
    columns = [spec.input.id_column] + [c for c in reads if c in shards[0].schema.names]
    done = [] if overwrite else _committed(spec, shards, strict=not resume_anyway)
    return Plan(spec, shards, ids, id_type, columns, done)


def estimate_input_tokens(plan: Plan, *, sample_rows: int = 256) -> tuple[int, int]:
    """(estimated text tokens of the input, rows sampled): the tokenizer's count over a sample
    of rows from up to 16 shards, scaled to all rows. Chat templates add a few tokens a row."""
    import json
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    spec = plan.spec
    tokenizer = AutoTokenizer.from_pretrained(spec.model.source, trust_remote_code=spec.model.trust_remote_code)
    fs, _ = resolve_filesystem(spec.input.path)
    text_columns = [c for c in plan.columns if c != spec.input.id_column]
    picked = plan.shards[:: max(1, len(plan.shards) // 16)][:16]
    per_shard = max(1, sample_rows // len(picked))
    tokens = rows = 0
    for shard in picked:
        with fs.open_input_file(shard.path) as f:
            batch = next(pq.ParquetFile(f).iter_batches(batch_size=per_shard, columns=text_columns), None)
        for row in (batch.to_pylist() if batch is not None else []):
            texts = [v if isinstance(v, str) else json.dumps(v) for v in row.values() if v is not None]
            tokens += sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in texts)
            rows += 1
    total_rows = sum(s.rows for s in plan.shards)
    return (round(tokens / rows * total_rows) if rows else 0), rows


def _check_model(spec: JobSpec) -> None:
    """The checkpoint's config must load (weights are not touched)."""
    from pipeline.engine import hf_config

    try:
        hf_config(spec.model.source, spec.model.trust_remote_code)
    except Exception as e:  # transformers raises OSError, ValueError, ... with long texts
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SpecError(f"model.source {spec.model.source}: cannot read the checkpoint's config "
                        f"({first}); give a Hugging Face id such as Qwen/Qwen3-8B or a local "
                        f"checkpoint directory") from None


def _check_output_outside_input(spec: JobSpec) -> None:
    _, out = resolve_filesystem(spec.output.path)
    _, inp = resolve_filesystem(spec.input.path.split("*")[0])
    inp = inp.rstrip("/")
    if out == inp or out.startswith(inp + "/"):
        raise InputError(f"output.path {spec.output.path} is inside input.path {spec.input.path}; "
                         f"the next run would read its own output. Choose a folder outside the input")


CHOICES = ("use another output path, pass --overwrite to replace it, or --resume-anyway to keep "
           "its committed shards and run only the others")


def _committed(spec: JobSpec, shards: list[Shard], *, strict: bool = True) -> list[str]:
    """Shards an earlier run of the same spec on the same input committed (its metrics file,
    written last, is there); refuses an output folder that holds another job's results,
    unless not strict."""
    out = OutputDir(spec.output.path, "probe")
    manifest = out.read_manifest()
    committed = out.committed_names()
    if manifest is None and committed and strict:
        raise InputError(f"output.path {spec.output.path} holds results without a _manifest.json; {CHOICES}")
    if manifest and manifest.get("spec_fingerprint") != spec.fingerprint() and strict:
        raise InputError(f"output.path {spec.output.path} holds a run of a different job spec; {CHOICES}")
    inputs = {e["name"]: e.get("input") for e in (manifest or {}).get("shards", [])}
    done = []
    for s in shards:
        if s.name in committed:
            if strict and inputs.get(s.name) != s.fingerprint():
                raise InputError(f"input shard {s.path} changed since it was processed into "
                                 f"{spec.output.path}; {CHOICES}")
            done.append(s.name)
    return done


def _connect_ray(spec: JobSpec, devices_per_replica: int) -> str | None:
    """Join spec.ray.address / RAY_ADDRESS, or start a local Ray. Returns "local" or "cluster"
    when this call connected (the run then disconnects), None when Ray was already up."""
    import ray

    if ray.is_initialized():
        return None
    address = spec.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=bool(os.environ.get("QWEN_BATCH_WORKER_LOGS")),
                 logging_level="WARNING")
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        return "cluster"
    cores = os.cpu_count() or 1
    # The CPU build's engines pin their own threads; Ray's CPU count is only for scheduling,
    # sized so that every replica and one read task can be placed at once.
    # Workers' logs (vLLM's start-up chatter) stay in Ray's session folder unless asked for.
    # address="local": a new private Ray, even when a `ray start` cluster runs on this machine
    # (plain ray.init() would join it, or fail on the stale address a killed one left behind).
    # Ray starts its workers at nice 15, below the driver and Ray's own services; on a small
    # machine those then preempt the engine. A run owns this Ray: engines at normal priority.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(address="local", num_cpus=max(cores, spec.resources.replica_range[1] * devices_per_replica + 1),
             include_dashboard=False, log_to_driver=bool(os.environ.get("QWEN_BATCH_WORKER_LOGS")),
             logging_level="WARNING")
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return "local"


def _device(spec: JobSpec) -> str:
    if spec.resources.device != "auto":
        return spec.resources.device
    import ray

    return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


def _actor_options(spec: JobSpec, device: str, run_id: str, shape: ReplicaShape) -> dict:
    devices = spec.model.tensor_parallel_size * spec.model.pipeline_parallel_size
    env = {RUN_MARK: run_id, "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR"),
           "TOKENIZERS_PARALLELISM": "false"}
    if device == "cpu" and devices > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        cores = os.cpu_count() or 1
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % cores) for i in range(devices))
    restarts = spec.resources.max_engine_restarts
    return {**shape.actor, "runtime_env": {"env_vars": env},
            "max_restarts": restarts, "max_task_retries": restarts}


class _ShardAssembler:
    """Collects stage rows per shard; a shard is complete when each of its ids came back once."""

    def __init__(self, plan: Plan):
        self.expected = {s.path: s for s in plan.todo}
        self.ids = {s.path: set(plan.ids[s.path].to_pylist()) for s in plan.todo}
        self.seen: dict[str, set] = {p: set() for p in self.expected}
        self.parts: dict[str, list[pa.Table]] = {p: [] for p in self.expected}

    def add(self, batch: pa.Table) -> list[tuple[Shard, pa.Table]]:
        """Add a batch of stage rows; return the shards this batch completed."""
        completed = []
        for path in pc.unique(batch.column(SHARD_COLUMN)).to_pylist():
            rows = batch.filter(pc.equal(batch.column(SHARD_COLUMN), path))
            shard_path = self._match(path)
            seen = self.seen[shard_path]
            keep = [i for i, v in enumerate(rows.column("id").to_pylist()) if not (v in seen or seen.add(v))]
            if len(keep) < rows.num_rows:  # a retried task sent rows twice: keep the first
                rows = rows.take(keep)
            self.parts[shard_path].append(rows)
            if len(seen) == self.expected[shard_path].rows:
                completed.append(self.pop(shard_path))
        return completed

    def _match(self, path: str) -> str:
        if path in self.expected:
            return path
        for p in self.expected:  # Ray may name a file without the filesystem's prefix
            if p.endswith("/" + path.lstrip("/")) or path.endswith("/" + p.lstrip("/")):
                return p
        raise RuntimeError(f"a row came back from unknown shard {path!r}")

    def pop(self, path: str) -> tuple[Shard, pa.Table]:
        shard = self.expected.pop(path)
        parts = self.parts.pop(path)
        return shard, (pa.concat_tables(parts) if parts else None)

    def leftovers(self) -> list[tuple[Shard, pa.Table | None, list]]:
        """Incomplete shards with their missing ids (rows that never came back)."""
        out = []
        for path in list(self.expected):
            missing = [i for i in self.ids[path] if i not in self.seen[path]]
            shard, table = self.pop(path)
            out.append((shard, table, missing))
        return out


def _split(stage: pa.Table | None, spec: JobSpec, id_type: pa.DataType) -> tuple[pa.Table, pa.Table]:
    results_schema = arrow_schema(f"results_{spec.task.head}", id_type=id_type)
    errors_schema = arrow_schema("errors", id_type=id_type)
    if stage is None or stage.num_rows == 0:
        return results_schema.empty_table(), errors_schema.empty_table()
    failed = pc.is_valid(stage.column("error_type"))
    results = stage.filter(pc.invert(failed)).select(results_schema.names).cast(results_schema)
    errors = stage.filter(failed).select(errors_schema.names).cast(errors_schema)
    return results, errors


def run_job(spec: JobSpec, *, overwrite: bool = False, resume_anyway: bool = False, progress: bool = True,
            engine_factory=None, console=None) -> RunReport:
    """Run a job to completion and return its report; see the README for the output layout.

    engine_factory replaces the vLLM engine (tests inject faults with it).
    """
    from rich.console import Console
    from rich.markup import escape

    console = console or Console(stderr=True, soft_wrap=True)
    t0 = time.time()
    plan = plan_job(spec, overwrite=overwrite, resume_anyway=resume_anyway)
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    out = OutputDir(spec.output.path, run_id)
    if not plan.todo:
        console.print(f"Nothing to do: all {len(plan.shards)} shards are already in "
                      f"{redact_text(spec.output.path)}.")
        return RunReport(spec.output.path, run_id, RunTotals(), time.time() - t0,
                         skipped_shards=len(plan.shards), message="nothing to do")
    lock = OutputLock(out.fs, out.root, run_id)
    try:
        out.fs.create_dir(out.root, recursive=True)
        note = lock.acquire()  # OutputBusyError while another run writes here
    except OSError as e:
        raise InputError(f"output.path {spec.output.path} is not writable: {e}") from None
    try:
        if note:
            console.print(f"[yellow]{escape(redact_text(note))}[/yellow]", highlight=False)
        if overwrite:
            for kind in ("results", "errors", "metrics"):
                out.fs.delete_dir_contents(posixpath.join(out.root, kind), missing_dir_ok=True)
        return _run_locked(spec, plan, out, run_id, resume_anyway=resume_anyway, progress=progress,
                           engine_factory=engine_factory, console=console, t0=t0)
    finally:
        lock.release()


def _run_locked(spec: JobSpec, plan: Plan, out: OutputDir, run_id: str, *, resume_anyway: bool, progress: bool,
                engine_factory, console, t0: float) -> RunReport:
    """Run the plan's shards into an output this run holds the lock of; record the outcome."""
    from rich.markup import escape

    manifest = _manifest(spec, plan, run_id, status="running")
    if resume_anyway:  # some committed shards may come from another spec or older input
        manifest["resumed_anyway"] = True
    try:
        out.prepare()
        out.write_manifest(manifest)
    except OSError as e:
        raise InputError(f"output.path {spec.output.path} is not writable: {e}") from None
    devices = spec.model.tensor_parallel_size * spec.model.pipeline_parallel_size
    totals = RunTotals()
    stopped = None  # why the run stopped early, if it did
    invalid = False
    connected = _connect_ray(spec, devices)
    try:
        device = _device(spec)
        args = engine_args(spec.model, device=device)
        _execute(spec, plan, out, run_id, device, args, engine_factory, progress, console, totals)
    except Exception as e:
        if os.environ.get("QWEN_BATCH_DEBUG"):
            raise
        stopped = _reason(e)
        invalid = isinstance(e, (SpecError, InputError))  # e.g. a replica no node can hold
    finally:
        if connected:
            import ray

            if connected == "cluster":  # engines orphaned on other nodes, while we can reach them
                reap_on_every_node(run_id)
            ray.shutdown()
            reap_orphans(run_id)
    wall = time.time() - t0
    manifest["shards"] = _shard_entries(out, plan)
    whole = {k: sum(e.get(k, 0) for e in manifest["shards"]) for k in ("rows", "results", "errors")}
    rate = whole["errors"] / whole["rows"] if whole["rows"] else 0.0
    report = RunReport(spec.output.path, run_id, totals, wall, skipped_shards=len(plan.done))
    pending = [e["path"] for e in manifest["shards"] if e["status"] != "committed"]
    if pending:
        report.exit_code = EXIT_CRASHED
        report.message = (f"{len(pending)} shard(s) were not committed: {', '.join(pending[:5])}"
                          + (f"\nThe run stopped: {stopped}" if stopped else "")
                          + f"\n{len(manifest['shards']) - len(pending)} committed shard(s) are kept; "
                            f"rerun the same command to resume.")
    if invalid:
        report.exit_code, report.message = EXIT_INVALID, stopped
    elif rate > spec.output.max_error_rate and not pending:
        report.exit_code = EXIT_TOO_MANY_ERRORS
        report.message = (f"{whole['errors']} of {whole['rows']} rows failed ({rate:.1%}), above "
                          f"output.max_error_rate {spec.output.max_error_rate:.1%}")
    manifest.update(status="failed" if report.exit_code else "complete", finished_at=time.time(),
                    wall_seconds=wall, totals=whole, stopped_because=stopped,
                    this_run={k: getattr(totals, k) for k in
                              ("rows", "results", "errors", "prompt_tokens", "completion_tokens")})
    try:
        out.write_manifest(manifest)
    except OSError as e:  # a full disk: what is committed stays valid without the final manifest
        report.message += f"\nThe manifest could not be updated: {e}"
        report.exit_code = report.exit_code or EXIT_CRASHED
    out.cleanup()
    console.print(summary_table(totals, wall_seconds=wall, title=f"qwen-batch {spec.name} ({run_id})"))
    shown = redact_text(spec.output.path)
    console.print(f"Results in {shown}/results, errors in {shown}/errors, metrics in {shown}/metrics.")
    if report.message:
        report.message = redact_text(report.message)
        console.print(f"[red]{escape(report.message)}[/red]", highlight=False)
    return report


class OutputWriteError(RuntimeError):
    """A shard's output could not be written (full disk, no permission, ...)."""


def _reason(e: BaseException) -> str:
    """One line for people: the last line of the error that stopped the run."""
    if isinstance(e, (OutputWriteError, SpecError, InputError)):
        return str(e)
    lines = [line for line in str(e).splitlines() if line.strip()]
    return (f"{type(e).__name__}: {lines[-1] if lines else ''} (details: rerun with "
            f"QWEN_BATCH_DEBUG=1 for the traceback, QWEN_BATCH_WORKER_LOGS=1 for engine logs)")


def _manifest(spec: JobSpec, plan: Plan, run_id: str, *, status: str) -> dict:
    return {
        "run_id": run_id,
        "status": status,
        "spec_fingerprint": spec.fingerprint(),
        "spec": redact(spec.model_dump(mode="json")),
        "started_at": time.time(),
        "shards": [{"name": s.name, "path": s.path, "input": s.fingerprint(), "status": "pending"}
                   for s in plan.shards],
    }


def _shard_entries(out: OutputDir, plan: Plan) -> list[dict]:
    """Per-shard manifest entries from what is committed (this run's and earlier runs')."""
    committed = out.committed_names()
    entries = []
    for s in plan.shards:
        entry = {"name": s.name, "path": s.path, "input": s.fingerprint(), "status": "pending"}
        if s.name in committed:
            m = out.read_metrics(s.name)
            entry.update(status="committed", run_id=m["run_id"], rows=m["rows"], results=m["results"],
                         errors=m["errors"], exactly_once=True)
        entries.append(entry)
    return entries


def _check_exactly_once(shard: Shard, ids: pa.Array, results: pa.Table, errors: pa.Table) -> None:
    """Every input id is in results or errors, once; refuse to commit otherwise."""
    out = results.column("id").to_pylist() + errors.column("id").to_pylist()
    expected = ids.to_pylist()
    if len(out) != len(expected) or set(out) != set(expected):
        missing = set(expected) - set(out)
        extra = len(out) - len(set(out))
        raise RuntimeError(f"{shard.path}: refusing to commit: {len(missing)} id(s) missing, "
                           f"{extra} duplicated (rows in {len(expected)}, out {len(out)})")


def _execute(spec, plan, out, run_id, device, args, engine_factory, progress, console, totals: RunTotals):
    placer = ReplicaPlacer(replica_shape(spec, device))
    placer.check()
    try:
        ds = _inference_dataset(spec, plan, run_id, device, args, engine_factory, placer)
        context = {"run_id": run_id, "replicas": spec.resources.replica_range[1], "model": spec.model.source,
                   "head": spec.task.head, "tensor_parallel_size": spec.model.tensor_parallel_size,
                   "pipeline_parallel_size": spec.model.pipeline_parallel_size, "device": device}
        _stream(ds, spec, plan, out, context, progress, console, totals, origin=time.time())
    finally:
        placer.release()


def _inference_dataset(spec, plan, run_id, device, args, engine_factory, placer):
    """read_parquet -> batches -> engine actors (one placement group each) -> stage rows."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = False
    # All first replicas load before work starts, so that they share it from the first batch
    # (and an engine that cannot start fails the run now, not after the others finished).
    ctx.wait_for_min_actors_s = int(spec.resources.start_timeout_s)
    fs, _ = resolve_filesystem(spec.input.path)
    ds = ray.data.read_parquet([s.path for s in plan.todo], filesystem=fs, include_paths=True)
    # Blocks of one batch each, so that every replica gets work and rows stream through
    # instead of waiting for whole files.
    batch = spec.resources.batch_size
    ds = ds.select_columns(plan.columns + [SHARD_COLUMN]).repartition(target_num_rows_per_block=batch)
    low, high = spec.resources.replica_range
    ledger = ray.remote(RowLedger).options(num_cpus=0).remote()
    return ds.map_batches(
        InferenceWorker,
        fn_constructor_kwargs={"spec_json": spec.model_dump_json(), "id_type": plan.id_type,
                               "engine_args": args, "device": device, "engine_factory": engine_factory,
                               "ledger": ledger},
        batch_size=batch,
        batch_format="pyarrow",
        zero_copy_batch=True,
        compute=ray.data.ActorPoolStrategy(
            min_size=low, max_size=high,
            max_tasks_in_flight_per_actor=max(2, -(-spec.resources.rows_in_flight // batch))),
        ray_remote_args_fn=placer.remote_args_fn,
        **_actor_options(spec, device, run_id, placer.shape),
    )


def _stream(ds, spec, plan, out, context, progress, console, totals: RunTotals, *, origin: float) -> None:
    """Pull stage rows from the engine actors; commit each shard once all its rows are back."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    todo = plan.todo
    metrics_schema = arrow_schema("metrics")
    assembler = _ShardAssembler(plan)

    def commit(shard: Shard, stage: pa.Table | None, missing: list = ()):
        results, errors = _split(stage, spec, plan.id_type)
        if missing:
            lost = pa.table({"id": pa.array(missing, plan.id_type),
                             "error_type": ["engine_died"] * len(missing),
                             "error_message": ["the row never came back from the engine actors"] * len(missing)})
            errors = pa.concat_tables([errors, lost.cast(errors.schema)])
        _check_exactly_once(shard, plan.ids[shard.path], results, errors)
        m = shard_metrics(stage if stage is not None else pa.table({}), shard=shard.path, rows=shard.rows,
                          origin=origin,
                          errors=errors.num_rows, context=context)
        try:
            out.commit_shard(shard.name, {"results": results, "errors": errors,
                                          "metrics": pa.Table.from_pylist([m], schema=metrics_schema)})
        except OSError as e:  # stop: the next shards would fail the same way
            raise OutputWriteError(f"cannot write the output of {shard.path} to {spec.output.path}: "
                                   f"{e}. Free space or fix permissions there") from e
        totals.add(m)

    for shard in [s for s in todo if s.rows == 0]:
        assembler.pop(shard.path)
        commit(shard, None)
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("rows  {task.fields[errors]} errors  {task.fields[tok]} out tok/s"),
                   TimeElapsedColumn(), console=console, disable=not progress)
    with bar:
        task = bar.add_task(f"{spec.task.head} on {len(todo)} shards", total=sum(s.rows for s in todo),
                            errors=0, tok="-")
        first = None
        done_rows = errors = out_tokens = 0
        # prefetch_batches=0: no background prefetch thread, which could still call into Ray
        # after a run that stopped early has shut it down (Ray then ends the process, exit 1).
        threads_before = set(threading.enumerate())
        batches = iter(ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0))
        try:
            for batch in batches:
                first = first or time.time()
                done_rows += batch.num_rows
                errors += batch.num_rows - batch.column("error_type").null_count
                out_tokens += int(pc.sum(batch.column("completion_tokens")).as_py() or 0) \
                    if "completion_tokens" in batch.column_names else 0
                elapsed = time.time() - first
                bar.update(task, completed=done_rows, errors=errors,
                           tok=f"{out_tokens / elapsed:,.0f}" if elapsed > 1 else "-")
                for shard, stage in assembler.add(batch):
                    commit(shard, stage)
        except BaseException:
            # Stopping early (a full disk): stop Ray Data's executor now, not when the iterator
            # is collected, and let its threads wind down, or one may call into Ray after the
            # run shut it down (Ray then ends the process with exit code 1).
            getattr(batches, "close", lambda: None)()
            deadline = time.time() + 10
            for t in set(threading.enumerate()) - threads_before:
                t.join(timeout=max(0.0, deadline - time.time()))
            raise
    for shard, stage, missing in assembler.leftovers():
        print(f"warning: {len(missing)} row(s) of {shard.path} never came back; "
              f"recorded as errors", file=sys.stderr)
        commit(shard, stage, missing)
