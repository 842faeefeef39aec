"""`qwen-batch run-batch`: an OpenAI Batch file run as a pipeline job, written back as OpenAI's
output file. A thin translation around pipeline.api.run:

1. INPUT's lines become one JSON lines shard in the work folder (OUTPUT + ".work/" unless
   --output-tmp-dir names one): id (the line number), custom_id, and the head's columns
   (messages + sampling for chat, text for embeddings). Lines that cannot run become error
   lines here. The conversion is deterministic: a rerun writes the same shard, so the job resumes.
2. The job runs (head chat or embed) into WORK/job, exactly once, resumable.
3. OUTPUT is assembled from the committed rows (OutputStore.read_committed) and the
   conversion's errors, in input order, and written whole at the end (a temporary file renamed,
   or one put on an object store).
"""

from __future__ import annotations

import json
import os
import posixpath
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow.fs as pafs

from pipeline.errors import EXIT_CRASHED, EXIT_OK, InputError
from pipeline.io.shards import resolve_filesystem
from pipeline.ops.openai_format import CHAT_URL, HEADS, Batch, Served, output_line, parse_batch

SHARD = "input/requests.jsonl"
JOB = "job"


@dataclass
class BatchReport:
    exit_code: int
    output: str | None
    requests: int
    succeeded: int
    failed: int
    computed: int  # rows this run computed (0: everything was committed before)


def work_folder(output: str, work_dir: str | None = None) -> str:
    return (work_dir or output + ".work").rstrip("/")


def _read(uri: str) -> bytes:
    from pipeline.io.store_retry import StoreUnavailableError

    try:
        fs, path = resolve_filesystem(uri)
        with fs.open_input_stream(path) as f:
            return f.read()
    except StoreUnavailableError:
        raise  # the store, not the file: exit 3, a rerun resumes
    except OSError as e:
        raise InputError(f"the batch file {uri} cannot be read: {e}") from None


def read_if_exists(uri: str) -> bytes | None:
    fs, path = resolve_filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read()


def write_whole(uri: str, data: bytes) -> None:
    """Write a file in one step: a local one through a temporary file renamed over it, an object
    store's with one put."""
    fs, path = resolve_filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def shard_bytes(batch: Batch) -> bytes:
    """The job's input shard: one JSON object per runnable request, keys sorted (deterministic)."""
    return "".join(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n" for row in batch.rows).encode()


def job_spec(batch: Batch, *, model: str, work: str, max_model_len: int | None = None,
             dtype: str | None = None, tensor_parallel_size: int | None = None) -> dict:
    """The job's spec (as a dict of sections; --set overrides lay over it)."""
    model_section: dict = {"source": model}
    if max_model_len:
        model_section["max_model_len"] = max_model_len
    if dtype:
        model_section["dtype"] = dtype
    if tensor_parallel_size:
        model_section["tensor_parallel_size"] = tensor_parallel_size
    spec = {"name": "run-batch", "input": {"path": posixpath.join(work, SHARD), "id_column": "id"},
            "output": {"path": posixpath.join(work, JOB)}, "model": model_section,
            "task": {"head": HEADS[batch.url or CHAT_URL]}}
    if batch.url == CHAT_URL and batch.schema is not None:  # response_format json_schema: the extract head
        spec["task"] = {"head": "extract", "options": {"schema": batch.schema, "messages_column": "messages",
                                                       "sampling_column": "sampling"}}
        if batch.max_tokens:
            spec["sampling"] = {"row_max_tokens": batch.max_tokens}
    elif batch.url == CHAT_URL:
        spec["task"]["options"] = {"messages_column": "messages", "sampling_column": "sampling"}
        if batch.max_tokens:  # a request may ask for as many tokens as the file's largest request
            spec["sampling"] = {"row_max_tokens": batch.max_tokens}
    else:
        spec["task"]["options"] = {"text_column": "text"}
    return spec


def _prepare(input_uri: str, work: str, *, model: str, overrides: list[str], address: str | None,
             served_model_name: str | None = None, **model_keys) -> tuple[Batch, dict]:
    """The parsed batch file (its requests checked against the job's options, body.model against
    the base model's names and the job's adapters) and the job's spec as a dict of sections.
    InputError for a file that cannot be read or mixes endpoints."""
    from pipeline.api import load

    data = _read(input_uri)
    try:
        batch = parse_batch(data)
        spec = load(job_spec(batch, model=model, work=work, **model_keys), overrides=overrides, address=address)
        served = Served(base=(served_model_name or model, model), adapters=tuple(spec.model.adapters),
                        column=spec.model.adapter_column)
        batch = parse_batch(data, options=spec.task.options, served=served)
    except ValueError as e:
        raise InputError(f"{input_uri}: {e}") from None
    return batch, job_spec(batch, model=model, work=work, **model_keys)


def run_batch(input_uri: str, output_uri: str, *, model: str, overrides: Iterable[str] = (),
              work_dir: str | None = None, served_model_name: str | None = None, max_model_len: int | None = None,
              dtype: str | None = None, tensor_parallel_size: int | None = None, address: str | None = None,
              overwrite: bool = False, progress: bool = True, console=None, engine_factory=None,
              error_uri: str | None = None) -> BatchReport:
    """Run an OpenAI Batch file: see the module's docstring. Raises InputError (exit 2) for a
    file that cannot be read or mixes endpoints; a job that stopped returns exit code 3 and
    writes no OUTPUT (rerun the same command to resume). error_uri: failed requests' lines go
    there (as OpenAI's error file), OUTPUT keeps the succeeded ones."""
    from pipeline.api import load, run

    overrides = list(overrides)
    work = work_folder(output_uri, work_dir)
    batch, sections = _prepare(input_uri, work, model=model, overrides=overrides, address=address,
                               served_model_name=served_model_name, max_model_len=max_model_len, dtype=dtype,
                               tensor_parallel_size=tensor_parallel_size)
    report = None
    if batch.rows:
        spec = load(sections, overrides=overrides, address=address)
        shard = posixpath.join(work, SHARD)
        content = shard_bytes(batch)
        if read_if_exists(shard) != content:  # the same file is kept as it is: the job resumes
            write_whole(shard, content)
        report = run(spec, overwrite=overwrite, progress=progress, console=console, engine_factory=engine_factory)
        if report.exit_code == EXIT_CRASHED:
            return BatchReport(EXIT_CRASHED, None, len(batch.requests), 0, 0, report.rows)
    succeeded, failed = write_output(batch, work, output_uri, error_uri, model=served_model_name or model)
    out = BatchReport(report.exit_code if report else EXIT_OK, output_uri, succeeded + failed, succeeded, failed,
                      report.rows if report else 0)
    if console is not None:
        console.print(f"run-batch: {out.requests} request(s): {out.succeeded} succeeded, {out.failed} failed; "
                      f"{out.computed} computed by this run. Output: {output_uri}", highlight=False)
    return out


def write_output(batch: Batch, work: str, output_uri: str, error_uri: str | None, *, model: str,
                 missing: tuple[str, str] | None = None) -> tuple[int, int]:
    """OUTPUT (and the error file, when error_uri is given) from the job's committed rows, in
    input order: (succeeded, failed). missing: the (code, message) of requests without a
    committed row (default: not_run, "rerun the same command")."""
    results, errors = _committed(posixpath.join(work, JOB)) if batch.rows else ({}, {})
    created = int(time.time())
    lines = []
    for req in batch.requests:
        row_id = req.row["id"] if req.row is not None else None
        line = output_line(batch, req, result=results.get(row_id), error=errors.get(row_id), model=model,
                           created=created, missing=missing)
        if line is not None:
            lines.append(line)
    failed = [x for x in lines if x["error"] is not None]

    def text(xs):
        return "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in xs).encode()

    if error_uri is None:
        write_whole(output_uri, text(lines))
    else:
        write_whole(output_uri, text([x for x in lines if x["error"] is None]))
        write_whole(error_uri, text(failed))
    return len(lines) - len(failed), len(failed)


def write_partial(input_uri: str, output_uri: str, error_uri: str | None, *, work_dir: str, model: str,
                  served_model_name: str | None = None, overrides: Iterable[str] = (),
                  missing: tuple[str, str] = ("not_run", "this request was not computed"),
                  **model_keys) -> tuple[int, int]:
    """OUTPUT from what the job committed so far, without running anything (a cancelled
    batch's partial results): (succeeded, failed), the requests not run failing with missing."""
    batch, _ = _prepare(input_uri, work_folder(output_uri, work_dir), model=model, overrides=list(overrides),
                        address=None, served_model_name=served_model_name, **model_keys)
    return write_output(batch, work_folder(output_uri, work_dir), output_uri, error_uri,
                        model=served_model_name or model, missing=missing)


def _committed(job_output: str) -> tuple[dict, dict]:
    """Committed result and error rows of the job, by id (only rows of committed shards)."""
    from pipeline.io.output import OutputStore

    store = OutputStore(job_output)
    records = store.records()
    found = []
    for kind in ("results", "errors"):
        table = store.read_committed(kind, records)
        found.append({r["id"]: r for r in table.to_pylist()} if table is not None else {})
    return found[0], found[1]
