"""run_job(spec): the flow of one run, step by step.

    plan     pipeline.plan      spec, inputs, what the output already holds (checked first)
    lock     pipeline.io.output_lock   one run at a time per output folder, fenced writes
    ray      pipeline.engine.session   connect or start Ray; nothing left running afterwards
    flow     pipeline.dataflow  read -> engine actors (pipeline.worker) -> write tasks
    commit   pipeline.io.sink      per shard, by metadata, exactly once (pipeline.io.output)
    outcome  pipeline.io.manifest  the manifest and the exit code
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

from pipeline import dataflow
from pipeline.errors import InputError, JobError, LostLockError, NothingRan, RunInterrupted, found, one_line
from pipeline.io import manifest as manifests
from pipeline.io.manifest import EXIT_CRASHED, EXIT_INVALID, EXIT_OK, EXIT_TOO_MANY_ERRORS, RunReport  # noqa: F401
from pipeline.io.output import OutputStore, new_run_id
from pipeline.io.output_lock import OutputLock
from pipeline.io.sink import ShardCommitter, fault_point
from pipeline.ops.metrics import RunTotals, summary_table
from pipeline.plan import Plan, RetrySelection, estimate_input_tokens, plan_job, read_output_state  # noqa: F401
from pipeline.redact import redact_text
from pipeline.spec import JobSpec


@dataclass
class Run:
    """Everything one run carries from step to step."""

    spec: JobSpec
    plan: Plan
    run_id: str
    store: OutputStore
    lock: OutputLock
    console: object
    progress: bool
    engine_factory: object
    started: float
    totals: RunTotals = field(default_factory=RunTotals)


def run_job(spec: JobSpec, *, overwrite: bool = False, resume_anyway: bool = False, progress: bool = True,
            retry: RetrySelection | None = None, engine_factory=None, console=None) -> RunReport:
    """Run a job to completion and return its report; see the README for the output layout.

    retry: also compute again the committed rows it selects (`--retry-errors`); their new
    rows replace the old ones in their shards, exactly once.
    engine_factory replaces the vLLM engine (tests inject faults with it).
    """
    from rich.console import Console
    from rich.markup import escape

    console = console or Console(stderr=True, soft_wrap=True)
    started = time.time()
    try:  # refuse before writing
        plan = plan_job(spec, overwrite=overwrite, resume_anyway=resume_anyway, retry=retry)
    except JobError:
        raise
    except Exception as e:
        raise NothingRan(e) from e
    store = OutputStore(spec.output.path)
    if retry is not None and not plan.work:
        console.print(f"Nothing to retry: no committed row of {redact_text(spec.output.path)} is selected by "
                      f"{retry.describe()}.", highlight=False)
        return RunReport(spec.output.path, "", RunTotals(), time.time() - started,
                         skipped_shards=len(plan.shards), message="nothing to do")
    if retry is None and not plan.todo and not plan.moved and _finished(plan):
        return _nothing_to_do(plan, console, started)
    run_id = new_run_id()
    lock = OutputLock(store.fs, store.root, run_id)
    try:
        store.fs.create_dir(store.root, recursive=True)
        note = lock.acquire()  # OutputBusyError while another run writes here
    except OSError as e:
        if isinstance(e, JobError):  # the store kept failing: not the job's fault
            raise
        raise InputError(f"output.path {spec.output.path} is not writable: {e}") from None
    run = Run(spec, plan, run_id, store, lock, console, progress, engine_factory, started)
    try:
        if note:
            console.print(f"[yellow]{escape(redact_text(note))}[/yellow]", highlight=False)
        return _run_locked(run, overwrite=overwrite, resume_anyway=resume_anyway)
    except KeyboardInterrupt as e:
        raise RunInterrupted() from e
    finally:
        lock.release()
        store.release_reserve(run_id)


def _finished(plan: Plan) -> bool:
    """The last run recorded its outcome over the same shards: an input removed since (its
    output now orphaned), or a shard newly kept by --resume-anyway, makes a new manifest."""
    last_run = plan.last_run

    def kept(entries):
        return sorted((k["name"], repr(k.get("input"))) for k in entries or [])

    return manifests.outcome_recorded(last_run) \
        and sorted(last_run.get("orphaned") or []) == sorted(plan.orphaned) \
        and kept(last_run.get("kept")) == kept(plan.kept)


def _nothing_to_do(plan: Plan, console, started: float) -> RunReport:
    """Every shard is committed and the last run recorded its outcome: report that outcome
    (and its exit code, so a scheduler sees a failed labeling run fail again)."""
    last = plan.last_run
    code = last.get("exit_code", EXIT_OK)
    shown = redact_text(plan.spec.output.path)
    console.print(f"Nothing to do: all {len(plan.shards)} shard(s) are already committed in {shown}; "
                  f"the last run ({last['run_id']}) ended {last['status']}"
                  + (f": {redact_text(last.get('message') or '')}" if code else "."), highlight=False)
    return RunReport(plan.spec.output.path, last["run_id"], RunTotals(), time.time() - started,
                     skipped_shards=len(plan.shards), exit_code=code,
                     message="nothing to do" if code == EXIT_OK else redact_text(last.get("message") or ""))


def _run_locked(run: Run, *, overwrite: bool, resume_anyway: bool) -> RunReport:
    """Run the plan's shards into an output this run holds the lock of; record the outcome."""
    manifest = _prepare(run, overwrite=overwrite, resume_anyway=resume_anyway)
    stopped, invalid = None, False
    if run.plan.work:
        try:
            _execute(run)
        except Exception as e:
            lost = found(e, LostLockError)
            if lost is not None:  # another run owns the output now: write nothing more
                return _lost(run, lost)
            if os.environ.get("QWEN_BATCH_DEBUG"):
                raise
            stopped = _reason(e)
            invalid = getattr(found(e, JobError), "exit_code", None) == EXIT_INVALID  # e.g. a replica no node can hold
    try:
        report = _conclude(run, manifest, stopped=stopped, invalid=invalid)
    except LostLockError as e:
        return _lost(run, e)
    _print_outcome(run, report, invalid=invalid)
    return report


def _prepare(run: Run, *, overwrite: bool, resume_anyway: bool) -> dict:
    """Under the lock: the output's state read again, what dead runs left ended and deleted,
    the starting manifest written. Returns it."""
    from pipeline.engine.session import reap_dead_runs_everywhere

    spec, store = run.spec, run.store
    try:
        read_output_state(run.plan, overwrite=overwrite, resume_anyway=resume_anyway)
        run.lock.verify()
        reaped = reap_dead_runs_everywhere(spec, run.run_id, dead=_dead_runs(run))
        if reaped:
            run.console.print(f"Ended {reaped} process(es) left running by an earlier run on this output "
                              f"(its driver was killed).", highlight=False)
        names = [sh.name for sh in run.plan.shards]
        _move_renamed(run)
        _forgive_retried_poison_rows(run)
        if overwrite:
            store.clear(names)
        store.delete(store.garbage(shard_names=names))  # files of killed attempts: no record names them
        manifest = manifests.start(spec, run.plan, run.run_id, started=run.started)
        store.reserve_for(manifest, run.run_id)
        store.write_manifest(manifest)
    except OSError as e:
        raise InputError(f"output.path {spec.output.path} is not writable: {e}") from None
    return manifest


def _move_renamed(run: Run) -> None:
    """Commit records of renamed input files moved to the files' new names (plan.moved): the
    old record goes first, so a crash in between leaves files no record names (deleted and
    computed again), never two records naming the same rows."""
    by_name = {s.name: s for s in run.plan.shards}
    for new, old in run.plan.moved.items():
        record = run.plan.records[old]
        run.lock.verify()
        run.store.delete([run.store.record_name(old)])
        run.store.commit({**record, "name": new, "input": by_name[new].fingerprint(),
                          "moved_from": [*record.get("moved_from", []), old]})
    if run.plan.moved:
        run.console.print(f"{len(run.plan.moved)} committed shard(s) follow their renamed input file(s): "
                          + ", ".join(f"{o} -> {n}" for n, o in list(run.plan.moved.items())[:3]), highlight=False)


def _forgive_retried_poison_rows(run: Run) -> None:
    """--retry-errors: rows condemned as poison (OUTPUT/_poison) that the selection redoes run
    again, searched for as before; a row that still kills every engine is condemned again."""
    from pipeline.io.ledger import batch_key, forgive

    if not run.plan.redo:
        return
    by_name = {s.name: s for s in run.plan.shards}
    keys = {batch_key(by_name[name].path, [i]) for name, ids in run.plan.redo.items() for i in ids.to_pylist()}
    run.lock.verify()
    if forgive(run.spec.output.path, keys):
        run.console.print("Rows condemned as poison in an earlier run are tried again.", highlight=False)


def _dead_runs(run: Run) -> tuple[str, ...]:
    """Earlier runs on this output known to be dead: the one whose stale lock this run took
    over (unless its driver still lives on this machine: paused, it stops itself when it
    wakes), or the one the manifest says is running when there was no lock (deleted by hand,
    as the busy message advises only for a dead run)."""
    previous = run.lock.previous
    if previous is not None:
        return () if run.lock.previous_alive_here() else (previous.get("run_id") or "",)
    last = run.plan.last_run or {}
    return (last["run_id"],) if last.get("status") == "running" and last.get("run_id") else ()


def _conclude(run: Run, manifest: dict, *, stopped: str | None, invalid: bool) -> RunReport:
    """The outcome from what is committed now; the final manifest (fenced)."""
    spec, store = run.spec, run.store
    wall = time.time() - run.started
    try:
        run.lock.verify()
        records = store.records()
        store.delete(store.garbage(records, [sh.name for sh in run.plan.shards]))
    except OSError as e:  # the output went away (network, permissions): nothing more to record
        message = (f"the run ended but {spec.output.path} cannot be read back ({e}); "
                   f"committed shards are kept; rerun the same command to finish")
        return RunReport(spec.output.path, run.run_id, run.totals, wall, exit_code=EXIT_CRASHED, message=message)
    manifest["shards"] = manifests.shard_entries(run.plan, records)
    code, message = manifests.outcome(spec, manifest, stopped=stopped, invalid=invalid)
    manifests.finish(manifest, code=code, message=redact_text(message), stopped=stopped and redact_text(stopped),
                     wall=wall, totals=run.totals)
    report = RunReport(spec.output.path, run.run_id, run.totals, wall, skipped_shards=len(run.plan.done),
                       exit_code=code, message=message)
    fault_point("before-manifest")
    run.lock.verify()
    try:
        store.write_manifest(manifest)
    except OSError as e:  # what is committed stays valid without the final manifest
        report.message += f"\nThe manifest could not be updated: {e}"
        report.exit_code = report.exit_code or EXIT_CRASHED
    return report


def _print_outcome(run: Run, report: RunReport, *, invalid: bool) -> None:
    from rich.markup import escape

    if not invalid:  # a run refused before it started has nothing to show
        run.console.print(summary_table(run.totals, wall_seconds=report.wall_seconds,
                                        title=f"qwen-batch {run.spec.name} ({run.run_id})"))
        shown = redact_text(run.spec.output.path)
        parts = ([f"Results in {shown}/results"] + ([f"errors in {shown}/errors"] if run.totals.errors else [])
                 + [f"metrics in {shown}/metrics"])
        run.console.print(", ".join(parts) + f" (committed files are listed in {shown}/_commits).",
                          highlight=False)
    if report.message:
        report.message = redact_text(report.message)
        run.console.print(f"[red]{escape(report.message)}[/red]", highlight=False)


def _lost(run: Run, e: LostLockError) -> RunReport:
    from rich.markup import escape

    message = redact_text(str(e))
    run.console.print(f"[red]{escape(message)}[/red]", highlight=False)
    return RunReport(run.spec.output.path, run.run_id, run.totals, time.time() - run.started,
                     exit_code=EXIT_CRASHED, message=message)


def _reason(e: BaseException) -> str:
    """One line for people: why the run stopped (the message of a typed failure, wherever
    Ray carried it from), or the last line of an unexpected error."""
    typed = found(e, JobError)
    if typed is not None:
        return str(typed)
    return (f"{one_line(e)} (details: rerun with "
            f"QWEN_BATCH_DEBUG=1 for the traceback, QWEN_BATCH_WORKER_LOGS=1 for engine logs)")


def _execute(run: Run) -> None:
    """Start Ray, run the flow, commit each shard as its rows are all written."""
    from pipeline.engine import session
    from pipeline.engine.placement import ReplicaPlacer, replica_shape

    spec, plan = run.spec, run.plan
    with session.ray_session(spec, run.run_id):
        device = session.device(spec)
        args = plan.checkpoint.engine_args(device)
        placer = ReplicaPlacer(replica_shape(spec, device))
        placer.check()
        try:
            ds = dataflow.build(plan, run_id=run.run_id, device=device, engine_args=args,
                                engine_factory=run.engine_factory, placer=placer, origin=run.started)
            context = {"run_id": run.run_id, "replicas": spec.resources.replica_range[1],
                       "model": redact_text(spec.model.source), "head": spec.task.head,
                       "tensor_parallel_size": spec.model.tensor_parallel_size,
                       "pipeline_parallel_size": spec.model.pipeline_parallel_size, "device": device}
            committer = ShardCommitter(
                store=run.store, input_fs=plan.input_fs, id_column=spec.input.id_column, shards=plan.work,
                head=spec.task.head, id_type=plan.id_type, context=context, fence=run.lock.verify,
                totals=run.totals, record={"run_id": run.run_id, "spec_fingerprint": spec.fingerprint(),
                                           "weights": plan.checkpoint.weights},
                redo={name: (ids, plan.records[name]) for name, ids in plan.redo.items()},
                redo_where=plan.retry.describe() if plan.retry else None,
                results_schema=plan.results_schema)
            _stream(run, ds, committer)
        finally:
            placer.release()


def _stream(run: Run, ds, committer: ShardCommitter) -> None:
    """Pull part summaries from the write tasks, with a progress bar; commit as shards complete."""
    import json

    import pyarrow.compute as pc
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    spec, todo = run.spec, run.plan.work
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("rows  {task.fields[errors]} errors  {task.fields[tok]} out tok/s"),
                   TimeElapsedColumn(), console=run.console, disable=not run.progress,
                   redirect_stdout=False, redirect_stderr=False)  # Ray's lines stay in the run's log
    with bar:
        task = bar.add_task(f"{spec.task.head} on {len(todo)} shards", total=sum(run.plan.rows_to_run(s) for s in todo),
                            errors=0, tok="-")
        first = None
        done_rows = errors = out_tokens = 0
        # prefetch_batches=0: no background prefetch thread, which could still call into Ray
        # after a run that stopped early has shut it down (Ray then ends the process, exit 1).
        threads_before = set(threading.enumerate())
        batches = iter(ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0))
        try:
            for parts in batches:
                first = first or time.time()
                done_rows += int(pc.sum(parts.column("id_count")).as_py() or 0)
                errors += int(pc.sum(parts.column("errors")).as_py() or 0)
                out_tokens += sum(json.loads(s)["completion_tokens"] or 0
                                  for s in parts.column("summary").to_pylist())
                elapsed = time.time() - first
                bar.update(task, completed=done_rows, errors=errors,
                           tok=f"{out_tokens / elapsed:,.0f}" if elapsed > 1 else "-")
                committer.add(parts)  # OutputWriteError stops it: the next shards would fail the same way
        except BaseException:
            # Stopping early (a full disk): stop Ray Data's executor now, not when the iterator
            # is collected, and let its threads wind down, or one may call into Ray after the
            # run shut it down (Ray then ends the process with exit code 1).
            getattr(batches, "close", lambda: None)()
            deadline = time.time() + 10
            for t in set(threading.enumerate()) - threads_before:
                t.join(timeout=max(0.0, deadline - time.time()))
            raise
    if os.environ.get("QWEN_BATCH_DATA_STATS"):  # Ray Data's time per operator, for tuning
        run.console.print(ds.stats(), highlight=False, markup=False)
    for shard, missing, dupes in committer.finish():
        run.console.print(f"warning: {shard.path}: {missing} row(s) never came back (recorded as errors)"
                          + (f", {dupes} came back twice (kept once)" if dupes else ""), highlight=False)
