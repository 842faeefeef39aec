"""`qwen-batch serve`: OpenAI's Files and Batches API over the run-batch machinery.

The HTTP side (FastAPI) stores uploaded files and batch records (pipeline.ops.batch_store); one
worker thread runs the queued batches one at a time, each as a `qwen-batch run-batch` child
process (its own Ray driver, its own job, exactly once) writing the batch's output and error
files into the state. Status lifecycle: validating -> in_progress -> finalizing -> completed,
or failed, or cancelling -> cancelled. A server started again on the same --state queues the
batches that were not finished; their jobs resume from what they committed.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from fastapi import Request  # at module level: FastAPI resolves the handlers' annotations here
from pydantic import BaseModel, Field

from pipeline.errors import InputError
from pipeline.ops.batch_store import PRIVATE, BatchStore, new_id, public
from pipeline.ops.openai_format import CHAT_URL, EMBED_URL, HEADS, parse_batch

log = logging.getLogger("qwen_batch.serve")

ENDPOINTS = tuple(HEADS)  # /v1/chat/completions, /v1/embeddings
ACTIVE = ("validating", "in_progress", "finalizing")  # a worker owes these a run
FINAL = ("completed", "failed", "cancelled", "expired")
ATTEMPTS = 3  # a batch job that crashes (exit 3) is run again, resuming, this many times in all
STOP_GRACE_S = 60  # an interrupted batch job may take this long to end its engines


class ServeConfig(BaseModel):
    """What `qwen-batch serve` was started with."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    model: str
    api_key: str | None = None
    state: str = "qwen-batch-state"
    address: str | None = None
    overrides: list[str] = Field(default_factory=list)
    served_model_name: str | None = None
    max_model_len: int | None = None
    dtype: str | None = None
    max_upload_bytes: int = Field(200 * 1024 * 1024, ge=1)


def check_bind(config: ServeConfig) -> None:
    """Without an API key the server answers anyone who reaches it: loopback only."""
    if config.api_key:
        return
    host = config.host.strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise InputError(f"--host {config.host} is reachable from other machines, and without --api-key anyone "
                         f"there could run batches on your cluster: give --api-key KEY (clients send it as "
                         f"their OpenAI API key), or serve on 127.0.0.1")


def check_job(config: ServeConfig) -> None:
    """The batches' job spec checked once at start: a bad --set or --dtype stops the server here
    (SpecError, exit 2) instead of failing every batch."""
    from pipeline.api import load
    from pipeline.ops.openai_batch import job_spec

    probe = parse_batch(json.dumps({"custom_id": "probe", "method": "POST", "url": CHAT_URL,
                                    "body": {"messages": [{"role": "user", "content": "probe"}]}}).encode())
    load(job_spec(probe, model=config.model, work="/qwen-batch-serve-probe", max_model_len=config.max_model_len,
                  dtype=config.dtype), overrides=config.overrides, address=config.address)


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    def response(self):
        from fastapi.responses import JSONResponse

        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


# -- the worker ----------------------------------------------------------------------------------

class BatchWorker:
    """One thread running queued batches one at a time, each as a run-batch child process."""

    def __init__(self, store: BatchStore, config: ServeConfig):
        self.store, self.config = store, config
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.lock = threading.Lock()
        self.current: str | None = None
        self.proc: subprocess.Popen | None = None
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="batch-worker", daemon=True)

    def start(self) -> int:
        """Queue what an earlier server left unfinished (oldest first); start the thread."""
        left = [r for r in reversed(self.store.batches()) if r["status"] in (*ACTIVE, "cancelling")]
        for record in left:
            self.queue.put(record["id"])
        self.thread.start()
        return len(left)

    def submit(self, batch_id: str) -> None:
        self.queue.put(batch_id)

    def cancel(self, batch_id: str) -> None:
        """Interrupt the batch's job if it runs now (its record already says cancelling)."""
        with self.lock:
            if self.current == batch_id and self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)

    def stop(self) -> None:
        """Interrupt the running job (it stays in_progress: the next server resumes it)."""
        with self.lock:
            self.stopping = True
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
        self.queue.put(None)
        self.thread.join(STOP_GRACE_S + 5)

    def _loop(self) -> None:
        while True:
            batch_id = self.queue.get()
            if batch_id is None or self.stopping:
                return
            try:
                self._run(batch_id)
            except Exception as e:  # the batch fails, the server goes on
                log.exception("batch %s failed in the server", batch_id)
                if not self.stopping:
                    self._fail(batch_id, "server_error", f"the server failed running this batch: "
                                                         f"{type(e).__name__}: {e}")

    # each step reads the record again: a cancel may have come in between
    def _run(self, batch_id: str) -> None:
        record = self.store.batch(batch_id)
        if record is None or record["status"] in FINAL:
            return
        if record["status"] == "cancelling":
            return self._cancelled(record)
        if record["status"] == "validating" and not self._validate(record):
            return
        attempts = record[PRIVATE].get("attempts", 0)
        while True:
            attempts += 1
            self.store.update_batch(batch_id, lambda r, n=attempts: r[PRIVATE].update(attempts=n))
            code, message = self._job(batch_id)
            record = self.store.batch(batch_id)
            if record["status"] == "cancelling":
                return self._cancelled(record)
            if self.stopping:
                return  # in_progress: the next server start resumes it
            if code in (0, 1):
                return self._completed(record)
            if code == 3 and attempts < ATTEMPTS:
                log.warning("batch %s: its job stopped (%s); resuming it", batch_id, message)
                continue
            return self._fail(batch_id, "batch_failed" if code == 2 else "job_crashed", message)

    def _validate(self, record: dict) -> bool:
        """validating -> in_progress (the request count known), or failed (the file cannot run)."""
        data = self.store.content(record["input_file_id"])
        try:
            batch = parse_batch(data)
        except ValueError as e:
            self._fail(record["id"], "invalid_file", str(e))
            return False
        if batch.url is not None and batch.url != record["endpoint"]:
            first = next(r.line for r in batch.requests if r.url == batch.url and r.error is None)
            self._fail(record["id"], "mismatched_endpoint", f"the file's requests are for {batch.url}, the batch's "
                                                            f"endpoint is {record['endpoint']}", line=first)
            return False
        total = sum(1 for r in batch.requests if not r.dropped)

        def start(r):
            if r["status"] == "validating":  # not cancelled meanwhile
                r.update(status="in_progress", in_progress_at=int(time.time()))
                r["request_counts"]["total"] = total

        return self.store.update_batch(record["id"], start)["status"] == "in_progress"

    def _command(self, record: dict) -> list[str]:
        c, run, uri = self.config, record[PRIVATE], self.store.content_uri
        cmd = [sys.executable, "-m", "pipeline.cli", "run-batch", "-i", uri(record["input_file_id"]),
               "-o", uri(run["output_file"]), "--error-file", uri(run["error_file"]),
               "--output-tmp-dir", self.store.work_uri(record["id"]), "--model", c.model,
               "--served-model-name", c.served_model_name or c.model, "--no-progress"]
        for flag, value in (("--max-model-len", c.max_model_len), ("--dtype", c.dtype), ("--address", c.address)):
            if value:
                cmd += [flag, str(value)]
        for override in c.overrides:
            cmd += ["--set", override]
        return cmd

    def _job(self, batch_id: str) -> tuple[int, str]:
        """Run the batch's job to its end: (exit code, its last message line)."""
        record = self.store.batch(batch_id)
        with self.lock:
            if self.stopping:
                return 130, "the server is stopping"
            self.current = batch_id
            # the child ends (interrupted: it stops its engines) when this server dies
            self.proc = subprocess.Popen(self._command(record), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True, preexec_fn=_die_with_parent)
        proc = self.proc
        log.info("batch %s: its job started (run-batch, pid %s)", batch_id, proc.pid)
        if self.store.batch(batch_id)["status"] == "cancelling":  # cancelled as it started
            self.cancel(batch_id)
        out, _ = proc.communicate()
        with self.lock:
            self.current, self.proc = None, None
        lines = [x.strip() for x in (out or "").splitlines() if x.strip()]
        log.info("batch %s: its job (run-batch, pid %s) exited %s", batch_id, proc.pid, proc.returncode)
        if proc.returncode not in (0, 1):
            log.warning("batch %s: run-batch said:\n%s", batch_id, "\n".join(lines[-20:]))
        errors = [x.removeprefix("error: ") for x in lines if x.startswith("error:")]
        return proc.returncode, (errors[-1] if errors else lines[-1] if lines else f"exit code {proc.returncode}")

    def _completed(self, record: dict) -> None:
        """in_progress -> finalizing -> completed, with the output and error files."""
        batch_id = self.store.update_batch(record["id"], lambda r: r.update(status="finalizing",
                                                                            finalizing_at=int(time.time())))["id"]
        counts = self._record_outputs(record)

        def done(r):
            r.update(counts, status="completed", completed_at=int(time.time()))

        self.store.update_batch(batch_id, done)

    def _record_outputs(self, record: dict) -> dict:
        """File objects for the output and error files the job wrote (only those with lines);
        the batch record's output_file_id, error_file_id and request_counts."""
        found: dict[str, Any] = {"output_file_id": None, "error_file_id": None}
        counts = {}
        for kind, key, field in (("output", "output_file", "output_file_id"), ("error", "error_file", "error_file_id")):
            file_id = record[PRIVATE][key]
            size = self.store.size(self.store.content_uri(file_id))
            lines = self.store.content(file_id).count(b"\n") if size else 0
            counts[kind] = lines
            if lines:
                self.store.record_file(file_id, filename=f"{record['id']}_{kind}.jsonl", purpose="batch_output",
                                       size=size)
                found[field] = file_id
        total = counts["output"] + counts["error"]
        found["request_counts"] = {"total": max(total, record["request_counts"]["total"]),
                                   "completed": counts["output"], "failed": counts["error"]}
        return found

    def _cancelled(self, record: dict) -> None:
        """cancelling -> cancelled: what the job committed is the output; the rest fail as cancelled."""
        from pipeline.ops.openai_batch import write_partial

        c, run, uri = self.config, record[PRIVATE], self.store.content_uri
        found: dict[str, Any] = {}
        work = self.store.work_uri(record["id"])
        if record.get("in_progress_at") and self.store.size(work + "/input/requests.jsonl"):
            try:
                write_partial(uri(record["input_file_id"]), uri(run["output_file"]), uri(run["error_file"]),
                              work_dir=work,
                              model=c.model, served_model_name=c.served_model_name, overrides=c.overrides,
                              missing=("batch_cancelled", "the batch was cancelled before this request ran"),
                              max_model_len=c.max_model_len, dtype=c.dtype)
                found = self._record_outputs(record)
            except Exception:
                log.exception("batch %s: its partial output could not be written", record["id"])
        self.store.update_batch(record["id"], lambda r: r.update(found, status="cancelled",
                                                                 cancelled_at=int(time.time())))

    def _fail(self, batch_id: str, code: str, message: str, line: int | None = None) -> None:
        def failed(r):
            r.update(status="failed", failed_at=int(time.time()),
                     errors={"object": "list", "data": [{"code": code, "message": message, "param": None,
                                                         "line": line}]})

        self.store.update_batch(batch_id, failed)


def _die_with_parent() -> None:
    """In the child: SIGINT when the server dies (Linux), so that no job outlives its server."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG
    except Exception:
        pass


# -- the HTTP API ---------------------------------------------------------------------------------

def new_batch(store: BatchStore, config: ServeConfig, body: Any) -> dict:
    """A batch record from POST /v1/batches's body (ApiError when it cannot be one)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    known = {"input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after"}
    for key in body:
        if key not in known:
            raise ApiError(400, f"unknown parameter {key!r}; a batch takes {', '.join(sorted(known))}", param=key,
                           code="unknown_parameter")
    file_id = body.get("input_file_id")
    if not isinstance(file_id, str) or not file_id:
        raise ApiError(400, "input_file_id is required: the id of a file uploaded with purpose 'batch'",
                       param="input_file_id", code="missing_required_parameter")
    endpoint = body.get("endpoint")
    if endpoint not in ENDPOINTS:
        raise ApiError(400, f"endpoint {endpoint!r} is not supported; use {CHAT_URL} or {EMBED_URL}",
                       param="endpoint", code="invalid_value")
    if body.get("completion_window") != "24h":
        raise ApiError(400, f"completion_window {body.get('completion_window')!r} is not supported; use '24h'",
                       param="completion_window", code="invalid_value")
    metadata = body.get("metadata")
    if metadata is not None and (not isinstance(metadata, dict) or len(metadata) > 16 or any(
            not isinstance(k, str) or not isinstance(v, str) or len(k) > 64 or len(v) > 512
            for k, v in metadata.items())):
        raise ApiError(400, "metadata must be up to 16 string keys (64 characters at most) with string values "
                            "(512 characters at most)", param="metadata", code="invalid_value")
    found = store.file(file_id)
    if found is None:
        raise ApiError(404, f"No such File object: {file_id}", param="input_file_id")
    if found["purpose"] != "batch":
        raise ApiError(400, f"file {file_id} has purpose {found['purpose']!r}; a batch's input file needs "
                            f"purpose 'batch'", param="input_file_id", code="invalid_value")
    record = {"id": new_id("batch_"), "object": "batch", "endpoint": endpoint, "errors": None,
              "input_file_id": file_id, "completion_window": "24h", "status": "validating",
              "output_file_id": None, "error_file_id": None, "created_at": int(time.time()),
              "in_progress_at": None, "expires_at": None, "finalizing_at": None, "completed_at": None,
              "failed_at": None, "expired_at": None, "cancelling_at": None, "cancelled_at": None,
              "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": metadata,
              "model": config.served_model_name or config.model,
              PRIVATE: {"output_file": new_id("file-"), "error_file": new_id("file-"), "attempts": 0,
                        "created_ns": time.time_ns()}}
    store.save_batch(record)
    return record


def create_app(store: BatchStore, worker: BatchWorker, config: ServeConfig):
    """The FastAPI application of the Files and Batches API."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

    app = FastAPI(title="qwen-batch", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if config.api_key:
            given = request.headers.get("authorization", "")
            if not given:
                return ApiError(401, "You didn't provide an API key: send it as 'Authorization: Bearer KEY' (the "
                                     "openai client's api_key)", type_="invalid_request_error").response()
            if not hmac.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
                return ApiError(401, "Incorrect API key provided: use the key the server was started with "
                                     "(--api-key)", code="invalid_api_key").response()
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > config.max_upload_bytes + 64 * 1024:
            return _too_large(config).response()
        try:
            return await call_next(request)
        except ApiError as e:
            return e.response()

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return e.response()

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        if e.status_code == 404:
            return ApiError(404, f"Unknown request URL: {request.method} {request.url.path}",
                            code="unknown_url").response()
        if e.status_code == 405:
            return ApiError(405, f"{request.method} is not allowed on {request.url.path}",
                            code="method_not_allowed").response()
        return ApiError(e.status_code, str(e.detail)).response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = (e.errors() or [{}])[0]
        param = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return ApiError(400, f"{param or 'the request'}: {first.get('msg', 'invalid')}", param=param).response()

    @app.exception_handler(Exception)
    async def crashed(request, e: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return ApiError(500, f"the server failed on this request ({type(e).__name__}); its log has the details; "
                             f"retry the request").response()

    @app.post("/v1/files")
    async def upload(request: Request):
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception as e:
            raise ApiError(400, f"the body must be multipart/form-data with a 'file' and a 'purpose' ({e})") from None
        file, purpose = form.get("file"), form.get("purpose")
        if purpose != "batch":
            raise ApiError(400, f"purpose {purpose!r} is not supported; this server takes purpose 'batch' only",
                           param="purpose", code="invalid_value")
        if file is None or isinstance(file, str):
            raise ApiError(400, "'file' is required: the batch file (JSON lines) as a multipart file",
                           param="file", code="missing_required_parameter")
        content = await file.read(config.max_upload_bytes + 1)
        if len(content) > config.max_upload_bytes:
            raise _too_large(config)
        if not content.strip():
            raise ApiError(400, "the file is empty: a batch file holds one request per line", param="file")
        obj = store.add_file(content, filename=os.path.basename(file.filename or "batch.jsonl"), purpose="batch")
        return obj

    def file_or_404(file_id: str) -> dict:
        found = store.file(file_id)
        if found is None:
            raise ApiError(404, f"No such File object: {file_id}", param="id")
        return found

    @app.get("/v1/files/{file_id}")
    async def get_file(file_id: str):
        return file_or_404(file_id)

    @app.get("/v1/files/{file_id}/content")
    async def get_content(file_id: str):
        file_or_404(file_id)
        return Response(store.content(file_id), media_type="application/octet-stream")

    @app.post("/v1/batches")
    async def create_batch(request: Request):
        try:
            body = json.loads(await request.body() or b"null")
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON") from None
        record = new_batch(store, config, body)
        worker.submit(record["id"])
        return public(record)

    def batch_or_404(batch_id: str) -> dict:
        found = store.batch(batch_id)
        if found is None:
            raise ApiError(404, f"No such Batch object: {batch_id}", param="batch_id")
        return found

    @app.get("/v1/batches/{batch_id}")
    async def get_batch(batch_id: str):
        return public(batch_or_404(batch_id))

    @app.get("/v1/batches")
    async def list_batches(limit: str = "20", after: str | None = None):
        if not limit.isdigit() or not 1 <= int(limit) <= 100:
            raise ApiError(400, f"limit must be between 1 and 100 (got {limit!r})", param="limit")
        records = store.batches()
        if after is not None:
            ids = [r["id"] for r in records]
            if after not in ids:
                raise ApiError(400, f"after {after!r} is not a batch id of this server", param="after")
            records = records[ids.index(after) + 1:]
        page = [public(r) for r in records[:int(limit)]]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(records) > len(page)}

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str):
        batch_or_404(batch_id)

        def cancelling(r):
            if r["status"] in FINAL:
                raise ApiError(400, f"batch {batch_id} is {r['status']}; only a batch that is validating or in "
                                    f"progress can be cancelled", code="invalid_state")
            if r["status"] != "cancelling":
                r.update(status="cancelling", cancelling_at=int(time.time()))

        record = store.update_batch(batch_id, cancelling)
        worker.cancel(batch_id)
        if worker.current != batch_id:  # waiting in the queue, or no longer queued: the worker finishes it
            worker.submit(batch_id)
        return public(record)

    @app.get("/health")
    async def health():
        return JSONResponse({"status": "ok"})

    return app


def _too_large(config: ServeConfig) -> ApiError:
    mb = config.max_upload_bytes / 1024 / 1024
    return ApiError(413, f"the file is over the upload limit ({mb:g} MB): split the batch, or start the server "
                         f"with a larger --max-upload-mb", param="file", code="file_too_large")


def serve(config: ServeConfig, console=None) -> int:
    """Serve until interrupted (SIGINT, SIGTERM); the running batch is resumed by the next start."""
    import uvicorn

    check_bind(config)
    check_job(config)
    if not log.handlers:  # one line a batch event on the server's stderr
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s qwen-batch serve: %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    store = BatchStore(config.state)
    worker = BatchWorker(store, config)
    app = create_app(store, worker, config)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                                          access_log=False, lifespan="off"))
    resumed = worker.start()
    if console is not None:
        console.print(f"qwen-batch serve: OpenAI Files + Batches API on http://{config.host}:{config.port}/v1, "
                      f"model {config.model}, state {store.root_uri}"
                      + (f"; {resumed} unfinished batch(es) queued again" if resumed else ""), highlight=False)
    try:
        server.run()
    finally:
        worker.stop()
    return 0 if server.started else 2
