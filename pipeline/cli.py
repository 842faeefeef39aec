"""qwen-batch: run | validate | status | report | demo | make-tiny-model."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console

from pipeline.errors import (
    EXIT_CRASHED,
    EXIT_INVALID,
    InputError,
    NothingRan,
    RunInterrupted,
    SpecError,
    found,
    one_line,
)


class _Terminal:
    """Where the console writes: sys.stderr as it is at each write (pytest's capture, a live
    progress bar), or the terminal's own descriptor while quiet_stderr sends fd 2 to a log."""

    target = None  # set by quiet_stderr

    def _stream(self):
        return self.target or sys.stderr

    def write(self, text: str) -> int:
        return self._stream().write(text)

    def __getattr__(self, name: str):  # flush, isatty, fileno, encoding, ...
        return getattr(self._stream(), name)


terminal_output = _Terminal()
console = Console(file=terminal_output, stderr=True, soft_wrap=True)  # paths stay whole for copy and paste


def log_dir() -> Path:
    """Where runs keep what Ray and vLLM print: QWEN_BATCH_LOG_DIR, else ~/.cache/qwen-batch/logs."""
    if os.environ.get("QWEN_BATCH_LOG_DIR"):
        return Path(os.environ["QWEN_BATCH_LOG_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "qwen-batch" / "logs"


@contextmanager
def quiet_stderr(name: str):
    """Send everything written to file descriptor 2 (Ray's and vLLM's Python logging, Python
    warnings, Ray's C++ core worker, which writes to the descriptor directly) and to Python's
    sys.stdout (where Ray's driver prints the raylet's warnings) to a log file;
    our console keeps writing to the terminal through a copy of the original descriptor. At
    the end the descriptor is restored and the log's path printed once (an empty log is
    removed). Yields the log path, or None when nothing is redirected: with
    QWEN_BATCH_WORKER_LOGS set (the user wants the engines' lines live) or when no log can be
    written."""
    if os.environ.get("QWEN_BATCH_WORKER_LOGS"):
        yield None
        return
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60] or "run"
    try:
        folder = log_dir()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{time.strftime('%Y%m%dT%H%M%S')}-{safe}-{os.getpid()}.log"
        log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # it may quote secrets
    except OSError:
        yield None
        return
    sys.stderr.flush()
    saved_fd = os.dup(2)
    terminal = os.fdopen(saved_fd, "w", buffering=1, encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                         errors="replace", closefd=False)
    previous, terminal_output.target = terminal_output.target, terminal
    os.dup2(log_fd, 2)
    os.close(log_fd)
    # Python warnings go to the log by name, not through sys.stderr: a live progress bar
    # points sys.stderr at the console while it runs.
    log = open(path, "a", buffering=1, encoding="utf-8", errors="replace")
    show = warnings.showwarning
    warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: log.write(
        warnings.formatwarning(message, category, filename, lineno, line))
    stdout, sys.stdout = sys.stdout, log
    try:
        yield path
    finally:
        sys.stdout = stdout
        warnings.showwarning = show
        log.close()
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        terminal.flush()
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        terminal_output.target = previous
        try:
            empty = path.stat().st_size == 0
        except OSError:
            empty = True
        if empty:
            path.unlink(missing_ok=True)
        else:
            console.print(f"Ray and vLLM messages of this run: {path}", highlight=False, style="dim")


def _load(args):
    from pipeline.api import load

    return load(args.spec, overrides=args.set or [], address=getattr(args, "address", None))


def cmd_run(args) -> int:
    from pipeline.api import run

    if args.dry_run:
        return cmd_validate(args)
    spec = _load(args)
    with quiet_stderr(spec.name):
        report = run(spec, overwrite=args.overwrite, resume_anyway=args.resume_anyway, retry_errors=args.retry_errors,
                     retry_where=args.retry_where or [], progress=not args.no_progress, console=console)
    return report.exit_code


def cmd_status(args) -> int:
    import json

    from pipeline.ops.status import collect, render

    found = collect(args.output)
    if args.json:
        print(json.dumps(found, indent=2, default=str))
    else:
        out = Console(soft_wrap=True, highlight=False)
        for line in render(found):
            out.print(line, markup=False)
    return 0


def cmd_validate(args) -> int:
    from pipeline.redact import redact_text
    from pipeline.runner import estimate_input_tokens, plan_job

    plan = plan_job(_load(args), overwrite=args.overwrite, resume_anyway=args.resume_anyway)
    spec = plan.spec
    try:
        tokens, sampled = estimate_input_tokens(plan)
        estimate = f"about {tokens:,} input tokens of text (from {sampled} sampled rows)"
    except Exception as e:  # no tokenizer here (a hub id offline, say): the plan still stands
        estimate = f"input tokens unknown (tokenizer not available: {one_line(e, first=True)[:200]})"
    rows = sum(s.rows for s in plan.shards)
    todo_rows = sum(s.rows for s in plan.todo)
    devices = spec.model.devices_per_replica
    console.print(f"OK: {len(plan.shards)} shard(s), {rows:,} rows, head '{spec.task.head}', "
                  f"model {spec.model.source} ({plan.checkpoint.kind.replace('_', ' ')} checkpoint).",
                  highlight=False)
    low, high = spec.resources.replica_range
    console.print(f"Plan: {len(plan.todo)} shard(s) and {todo_rows:,} rows to run "
                  f"({len(plan.done)} already committed in {redact_text(spec.output.path)}); {estimate}; "
                  f"{low if low == high else f'{low}-{high}'} replica(s) x {devices} device(s) "
                  f"(tensor {spec.model.tensor_parallel_size} x pipeline {spec.model.pipeline_parallel_size}, "
                  f"device {spec.resources.device}).", highlight=False)
    for line in plan.checkpoint.sizing.lines() if plan.checkpoint.sizing else []:
        console.print(f"Sizing: {line}", highlight=False)
    if plan.kept:
        console.print(f"Kept by --resume-anyway: {len(plan.kept)} committed shard(s) of another spec or "
                      f"older input: " + ", ".join(f"{k['name']} ({k['why']})" for k in plan.kept[:5]),
                      highlight=False)
    if plan.orphaned:
        console.print(f"Orphaned: {len(plan.orphaned)} committed shard(s) in the output whose input file is "
                      f"gone (not counted, left as they are): {', '.join(plan.orphaned[:5])}"
                      + (" ..." if len(plan.orphaned) > 5 else ""), highlight=False)
    return 0


def cmd_make_tiny_model(args) -> int:
    from pipeline.ops.tiny_model import make_tiny_model

    if getattr(args, "quantize", None):
        from pipeline.engine.quantize import make_quantized_tiny_model

        if args.kind != "causal":
            console.print("--quantize writes a quantized causal tiny model; drop --kind")
            return 2
        path = make_quantized_tiny_model(args.dir, args.quantize, seed=args.seed)
        console.print(f"Tiny Qwen3 ({args.quantize}-quantized: random weights, real tokenizer) written to {path}")
        return 0
    path = make_tiny_model(args.dir, seed=args.seed, kind=args.kind, layers=args.layers)
    console.print(f"{'Bench-sized' if args.kind == 'bench' else 'Tiny'} Qwen3 ({args.kind}: random weights, "
                  f"real tokenizer) written to {path}")
    return 0


def cmd_report(args) -> int:
    from pipeline.ops.report import render_report

    console.print(f"Report written to {render_report(args.output)}")
    return 0


def batch_overrides(args) -> list[str]:
    """--set, and --lora-modules NAME=PATH as model.adapters.NAME=PATH (vLLM's flag)."""
    out = list(args.set or [])
    for module in args.lora_modules or []:
        name, sep, path = module.partition("=")
        if not sep or not name or not path or "." in name:
            raise SpecError(f"--lora-modules {module!r}: give NAME=PATH, the name body.model uses and the "
                            f"adapter's directory or Hugging Face id (e.g. --lora-modules sql=./lora/sql)")
        out.append(f"model.adapters.{name}={path}")
    return out


def cmd_run_batch(args) -> int:
    from pipeline.io.store_retry import StoreUnavailableError
    from pipeline.ops.openai_batch import run_batch

    try:
        with quiet_stderr("run-batch"):
            report = run_batch(args.input_file, args.output_file, model=args.model, overrides=batch_overrides(args),
                               work_dir=args.output_tmp_dir, served_model_name=args.served_model_name,
                               max_model_len=args.max_model_len, dtype=args.dtype,
                               tensor_parallel_size=args.tensor_parallel_size, address=args.address,
                               overwrite=args.overwrite, progress=not args.no_progress, console=console,
                               error_uri=args.error_file)
    except (SpecError, InputError, NothingRan, KeyboardInterrupt):
        raise
    except Exception as e:
        if found(e, StoreUnavailableError) is not None or os.environ.get("QWEN_BATCH_DEBUG"):
            raise
        from rich.markup import escape

        from pipeline.redact import redact_text

        console.print(f"[red]error:[/red] run-batch crashed: {type(e).__name__}: {escape(redact_text(str(e)))}\n"
                      f"Committed work is kept; rerun the same command to resume.", highlight=False)
        return EXIT_CRASHED
    if report.exit_code == EXIT_CRASHED:
        console.print("The job stopped before every request ran; no output file was written. Rerun the same "
                      "command to resume.", highlight=False)
    return report.exit_code


def cmd_serve(args) -> int:
    from pydantic import ValidationError

    from pipeline.ops.openai_serve import ServeConfig, serve

    try:
        config = ServeConfig(host=args.host, port=args.port, model=args.model, api_key=args.api_key,
                             state=args.state, address=args.address, overrides=batch_overrides(args),
                             served_model_name=args.served_model_name, max_model_len=args.max_model_len,
                             dtype=args.dtype, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024))
    except ValidationError as e:
        raise InputError("serve: " + "; ".join(f"--{'-'.join(map(str, x['loc']))}: {x['msg']}"
                                               for x in e.errors())) from None
    return serve(config, console=console)


def cmd_demo(args) -> int:
    from pipeline.ops.demo import run_demo

    with quiet_stderr("demo"):
        return run_demo(args.dir, console=console)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qwen-batch", description="Batch inference with Qwen3 on Ray + vLLM.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("run", "run a job spec"), ("validate", "check a job spec and its inputs, load no model")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("spec", help="job spec YAML")
        s.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a spec key, e.g. --set sampling.max_tokens=64 (repeatable)")
        s.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
        s.add_argument("--overwrite", action="store_true", help="replace what output.path holds")
        s.add_argument("--resume-anyway", action="store_true",
                       help="keep shards committed by a different spec or from changed inputs; run the rest")
        if name == "run":
            s.add_argument("--no-progress", action="store_true", help="no progress bar")
            s.add_argument("--retry-errors", action="store_true",
                           help="compute the committed error rows again (with this spec, which may differ); "
                                "their new rows replace them, exactly once")
            s.add_argument("--retry-where", action="append", metavar="COLUMN=VALUE[,VALUE]",
                           help="compute again the committed rows (results or errors) whose COLUMN holds a "
                                "VALUE, e.g. finish_reason=length or error_type=engine_timeout (repeatable; "
                                "implies --retry-errors, any condition may match)")
            s.add_argument("--dry-run", action="store_true",
                           help="check everything and print the plan; load no model")
    s = sub.add_parser("make-tiny-model", help="write the tiny random-weight Qwen3 used by the demo and tests")
    s.add_argument("dir")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--kind", choices=("causal", "embed", "rerank", "qa", "moe", "bench"), default="causal",
                   help="causal: Qwen3ForCausalLM (default); embed: Qwen3-Embedding's layout (Qwen3Model "
                        "weights under a Qwen3ForCausalLM config); rerank: Qwen3-Reranker's (a causal LM); "
                        "qa: Qwen3ForQuestionAnswering (extractive question answering); moe: Qwen3-30B-A3B's "
                        "layout, Qwen3MoeForCausalLM (8 experts, top-2); bench: Qwen3-0.6B's exact shape "
                        "(28 layers, hidden 1024, bfloat16: 1.2 GB, for benchmarks)")
    s.add_argument("--layers", type=int, default=None,
                   help="decoder layers (default: the kind's own; fewer makes a quick bench model)")
    s.add_argument("--quantize", choices=("w8a8", "gptq"), default=None,
                   help="write it quantized (the causal kind): w8a8: compressed-tensors int8 weights and "
                        "activations; gptq: GPTQ 4-bit, group 32, bfloat16 (both run on the CPU build of vLLM)")
    s = sub.add_parser("status", help="the last run's outcome, shards committed and pending, errors, tokens, "
                                      "the lock, and what a rerun would do (reads no input)")
    s.add_argument("output", help="the job's output.path")
    s.add_argument("--json", action="store_true", help="print the status as JSON (for scripts)")
    s = sub.add_parser("report", help="charts and an HTML page from a run's metrics")
    s.add_argument("output", help="the job's output.path")
    s = sub.add_parser("demo", help="build the tiny model, write sample shards, run the demo jobs")
    s.add_argument("--dir", default="demo", help="working folder (default: ./demo)")
    s = sub.add_parser("run-batch", help="run an OpenAI Batch file (as vLLM's run-batch): chat completions or "
                                         "embeddings, written as OpenAI's output file; a rerun resumes")
    s.add_argument("-i", "--input-file", required=True, help="the batch file (JSON lines; local or s3://)")
    s.add_argument("-o", "--output-file", required=True, help="where the output file goes (local or s3://)")
    s.add_argument("--error-file", help="write failed requests' lines here, as OpenAI's error file (default: "
                                        "every line in OUTPUT_FILE)")
    s.add_argument("--model", required=True, help="checkpoint folder or hub id")
    s.add_argument("--served-model-name", help="the model name written in each response (default: --model)")
    s.add_argument("--output-tmp-dir", help="work folder: the job's input shard and committed rows, which a "
                                            "rerun resumes from (default: OUTPUT_FILE.work)")
    s.add_argument("--max-model-len", type=int, help="model.max_model_len")
    s.add_argument("--dtype", help="model.dtype (auto, bfloat16, float16, float32)")
    s.add_argument("--tensor-parallel-size", type=int, help="model.tensor_parallel_size")
    s.add_argument("--lora-modules", nargs="+", metavar="NAME=PATH",
                   help="LoRA adapters a request picks by body.model (model.adapters; as vLLM's flag)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a key of the job's spec, e.g. --set sampling.max_tokens=64 (repeatable)")
    s.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    s.add_argument("--overwrite", action="store_true", help="start over: replace the work folder's committed rows")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s = sub.add_parser("serve", help="serve OpenAI's Files and Batches API: batches uploaded with the openai client "
                                     "run as run-batch jobs, one at a time; state survives a restart")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; any other "
                                                       "needs --api-key)")
    s.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    s.add_argument("--model", required=True, help="checkpoint folder or hub id every batch runs on")
    s.add_argument("--api-key", default=os.environ.get("QWEN_BATCH_API_KEY"),
                   help="the bearer key clients must send (default: QWEN_BATCH_API_KEY)")
    s.add_argument("--state", default="qwen-batch-state",
                   help="where files, batches and their jobs are kept (local or s3://; default: ./qwen-batch-state)")
    s.add_argument("--served-model-name", help="the model name written in each response (default: --model)")
    s.add_argument("--max-model-len", type=int, help="model.max_model_len")
    s.add_argument("--dtype", help="model.dtype (auto, bfloat16, float16, float32)")
    s.add_argument("--max-upload-mb", type=float, default=200, help="largest file accepted (default: 200, as OpenAI)")
    s.add_argument("--lora-modules", nargs="+", metavar="NAME=PATH",
                   help="LoRA adapters a request picks by body.model (model.adapters; as vLLM's flag)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a key of every batch's job spec, e.g. --set sampling.max_tokens=64 (repeatable)")
    s.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray per batch)")
    args = p.parse_args(argv)

    handler = {"run": cmd_run, "validate": cmd_validate, "make-tiny-model": cmd_make_tiny_model,
               "demo": cmd_demo, "run-batch": cmd_run_batch, "serve": cmd_serve, "report": cmd_report,
               "status": cmd_status}[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt as e:
        return _interrupted(args, e)
    except Exception as e:
        if os.environ.get("QWEN_BATCH_DEBUG") and not isinstance(e, (SpecError, InputError)):
            raise
        return _failed(args, e)


def _checks_only(args) -> bool:
    """validate and run --dry-run: they check, and never write."""
    return args.command == "validate" or (args.command == "run" and args.dry_run)


def _interrupted(args, e: KeyboardInterrupt) -> int:
    if _checks_only(args) or (args.command == "run" and not isinstance(e, RunInterrupted)):
        console.print("[red]interrupted[/red] before anything ran; nothing was written")
    elif args.command == "run":
        console.print("[red]interrupted[/red]: committed shards are kept; rerun the same command to resume")
    else:
        console.print("[red]interrupted[/red]")
    return 130


def _failed(args, e: Exception) -> int:
    """The message and exit code of a command that raised e, by e's type."""
    from rich.markup import escape

    from pipeline.io.store_retry import StoreUnavailableError  # pyarrow: imported when needed
    from pipeline.redact import redact_text

    store = found(e, StoreUnavailableError)
    if store is not None:  # an input or output check, or a write, the store failed to answer
        return _store_failed(args, store)
    if isinstance(e, (SpecError, InputError)):
        console.print(f"[red]error:[/red] {escape(redact_text(str(e)))}", highlight=False)
        return EXIT_INVALID
    nothing_ran = _checks_only(args) or isinstance(e, NothingRan)
    cause = e.cause if isinstance(e, NothingRan) else e
    if isinstance(cause, FileNotFoundError) and (args.command != "run" or nothing_ran):
        console.print(f"[red]error:[/red] {escape(redact_text(str(cause)))}", highlight=False)
        return EXIT_INVALID
    what = escape(redact_text(one_line(cause)))
    details = "For details set QWEN_BATCH_DEBUG=1 (traceback)"
    if nothing_ran:
        console.print(f"[red]error:[/red] checking the job failed before anything ran (nothing was "
                      f"written): {what}\n{details}.", highlight=False)
        return EXIT_CRASHED
    if args.command == "run":
        console.print(f"[red]error:[/red] the run crashed: {what}\nCommitted shards are kept; rerun the same "
                      f"command to resume. {details} and QWEN_BATCH_WORKER_LOGS=1 (engine logs).",
                      highlight=False)
        return EXIT_CRASHED
    if args.command == "demo":
        console.print(f"[red]error:[/red] the demo crashed: {what}\nRerun `qwen-batch demo` to start it "
                      f"again. {details}.", highlight=False)
        return EXIT_CRASHED
    console.print(f"[red]error:[/red] {args.command} failed: {what}\n{details}.", highlight=False)
    return 1


def _store_failed(args, e: BaseException) -> int:
    """Exit 3, never 2: the store failed, not the job (a scheduler's retry of exit 3 resumes)."""
    from rich.markup import escape

    from pipeline.redact import redact_text

    then = ("rerun the same command to resume (committed shards are kept)" if args.command == "run"
            else f"run `qwen-batch {args.command}` again")
    console.print(f"[red]error:[/red] the object store kept failing, so {args.command} stopped: "
                  f"{escape(redact_text(str(e)))}\nNothing is wrong with the job; once the store answers "
                  f"again, {then}.", highlight=False)
    return EXIT_CRASHED


if __name__ == "__main__":
    sys.exit(main())
