"""OpenAI Batch files, pure conversion (no Ray, no engine, no I/O): request lines into job rows,
committed result and error rows back into OpenAI's output lines.

Input, one JSON object per line: {"custom_id", "method": "POST", "url", "body"}. Output, one per
request in input order: {"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error"}; a request that failed has error {"code", "message"} (and status_code 400, 404 or 500).
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from dataclasses import dataclass, field
from typing import Any

CHAT_URL, EMBED_URL = "/v1/chat/completions", "/v1/embeddings"
HEADS = {CHAT_URL: "chat", EMBED_URL: "embed"}

# body keys of /v1/chat/completions mapped onto our sampling keys (pipeline.sampling.SamplingValues)
CHAT_SAMPLING = {"max_tokens": "max_tokens", "max_completion_tokens": "max_tokens", "temperature": "temperature",
                 "top_p": "top_p", "stop": "stop", "seed": "seed", "presence_penalty": "presence_penalty",
                 "frequency_penalty": "frequency_penalty",
                 # vLLM's extra sampling parameters, as its OpenAI server takes them
                 "top_k": "top_k", "min_p": "min_p", "repetition_penalty": "repetition_penalty",
                 "ignore_eos": "ignore_eos"}
# keys accepted and ignored: they do not change the answer (body.model picks a LoRA adapter: Served)
CHAT_IGNORED = {"model", "user", "metadata", "store", "service_tier", "parallel_tool_calls"}
EMBED_IGNORED = {"model", "user"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# error_type of a row -> the HTTP status its output line carries (the request's fault: 400)
CLIENT_ERRORS = {"invalid_input", "invalid_request", "prompt_too_long", "template_error", "duplicate_custom_id",
                 "unsupported"}
STATUS = {"model_not_found": 404}  # as OpenAI's and vLLM's servers answer it


class LineError(Exception):
    """One request line cannot run: its error code and message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class Served:
    """What a request's body.model may name: the base model (its served name, or --model) or
    one of the job's LoRA adapters (model.adapters), whose name goes in the row's adapter
    column. Without adapters body.model is not looked at: every request runs on the base."""

    base: tuple[str, ...] = ()
    adapters: tuple[str, ...] = ()
    column: str = "adapter"

    def adapter(self, model: Any) -> str | None:
        """The adapter body.model names (None: the base model); LineError for another name."""
        if not self.adapters or model is None or model in self.base:
            return None
        if isinstance(model, str) and model in self.adapters:
            return model
        raise LineError("model_not_found", f"body.model {model!r} is not served by this batch: use "
                                           f"{self.base[0]!r} (the base model) or an adapter: "
                                           f"{', '.join(sorted(self.adapters))}")


@dataclass
class Request:
    """One line of the batch file: its 1-based line number, custom_id (None when unreadable),
    url, and either the job row it becomes or the error that stops it."""

    line: int
    custom_id: str | None
    url: str | None = None
    row: dict[str, Any] | None = None
    error: LineError | None = None
    dropped: bool = False  # a duplicate custom_id's later line: the first line carries its error


@dataclass
class Batch:
    """A parsed batch file: every request in order, the endpoint (None: no valid request), and
    what the job needs to run the rows (the largest per-row max_tokens, the encoding formats)."""

    requests: list[Request]
    url: str | None
    digest: str
    max_tokens: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    schema: dict[str, Any] | None = None  # the json_schema every request asks for: the extract head runs it
    served: Served = field(default_factory=lambda: Served())

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [r.row for r in self.requests if r.row is not None and r.error is None]


def parse_batch(data: bytes, *, options: dict[str, Any] | None = None, served: Served | None = None) -> Batch:
    """Every line of an OpenAI Batch file as a Request: valid ones carry the job row, the others
    an error naming the line. Deterministic: the same bytes give the same rows. Raises ValueError
    for a file mixing endpoints (OpenAI refuses those too). options: the head's options of the
    job (enable_thinking, dimensions), which a request must agree with; served: the model names
    body.model may give (its LoRA adapters)."""
    options, served = options or {}, served or Served()
    digest = hashlib.sha256(data).hexdigest()
    text = data.decode("utf-8", errors="replace")
    requests: list[Request] = []
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue  # blank lines are skipped (as OpenAI's and vLLM's readers do)
        requests.append(_parse_line(number, raw, options, served))
    urls = sorted({r.url for r in requests if r.error is None and r.url})
    if len(urls) > 1:
        first = {u: next(r.line for r in requests if r.url == u and r.error is None) for u in urls}
        raise ValueError("the batch file mixes endpoints (" + ", ".join(f"{u} on line {first[u]}" for u in urls)
                         + "); a batch runs one endpoint, as OpenAI's does: split the file by url")
    _refuse_duplicates(requests)
    url = urls[0] if urls else None
    schema = _one_schema(requests) if url == CHAT_URL else None
    max_tokens = max((r.row["_max_tokens"] for r in requests
                      if r.error is None and r.row is not None and r.row.get("_max_tokens")),
                     default=None)
    for r in requests:
        if r.row is not None:
            r.row.pop("_max_tokens", None)
            r.row.pop("_schema", None)
    return Batch(requests, url, digest, max_tokens=max_tokens, options=options, schema=schema, served=served)


def _refuse_duplicates(requests: list[Request]) -> None:
    """A custom_id on several lines: none of them runs (which one is meant is unknown); the
    first keeps the custom_id's one output line, with an error naming every line."""
    where: dict[str, list[Request]] = {}
    for r in requests:
        if r.custom_id is not None:
            where.setdefault(r.custom_id, []).append(r)
    for cid, same in where.items():
        if len(same) < 2:
            continue
        numbers = ", ".join(str(r.line) for r in same)
        same[0].error = LineError("duplicate_custom_id", f"custom_id {cid!r} is on lines {numbers}; every "
                                  f"custom_id must be unique in a batch, so none of these requests ran")
        same[0].row = None
        for r in same[1:]:
            r.dropped = True  # its custom_id already has its output line
            r.row = None


def _parse_line(number: int, raw: str, options: dict[str, Any], served: Served) -> Request:
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:
        return Request(number, None, error=LineError("invalid_json", f"line {number} is not valid JSON "
                                                     f"({getattr(e, 'msg', 'nested too deep')})"))
    if not isinstance(obj, dict):
        return Request(number, None, error=LineError("invalid_request", f"line {number} is not a JSON object"))
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return Request(number, None, error=LineError(
            "invalid_request", f"line {number} has no custom_id (a non-empty string is required)"))
    req = Request(number, cid, url=obj.get("url") if isinstance(obj.get("url"), str) else None)
    try:
        extra = sorted(set(obj) - {"custom_id", "method", "url", "body"})
        if extra:
            raise LineError("invalid_request", f"unknown field(s) {', '.join(extra)}; a request has custom_id, "
                                               f"method, url and body")
        if obj.get("method", "POST") != "POST":
            raise LineError("invalid_request", f"method {obj.get('method')!r} is not supported; use POST")
        if req.url not in HEADS:
            raise LineError("invalid_request", f"url {obj.get('url')!r} is not supported; use {CHAT_URL} or "
                                               f"{EMBED_URL}")
        body = obj.get("body")
        if not isinstance(body, dict):
            raise LineError("invalid_request", "body must be a JSON object")
        row = chat_row(body, options) if req.url == CHAT_URL else embed_row(body, options)
        adapter = served.adapter(body.get("model"))
        if adapter is not None:
            row[served.column] = adapter
        req.row = {"id": number, "custom_id": cid, **row}
    except LineError as e:
        req.error = LineError(e.code, f"line {number}: {e.message}")
        req.url = req.url if req.url in HEADS else None
    return req


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # content parts: text only
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise LineError("unsupported", f"{where}: only text content parts are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise LineError("invalid_request", f"{where} must be text or a list of text parts")


def chat_row(body: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """The chat head's row for a /v1/chat/completions body: messages and a sampling JSON."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise LineError("invalid_request", "body.messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise LineError("invalid_request", f"body.messages[{i}].role must be one of {', '.join(ROLES)}")
        out.append({"role": ROLES[m["role"]], "content": _content(m.get("content"), f"body.messages[{i}].content")})
    sampling: dict[str, Any] = {}
    row: dict[str, Any] = {}
    for key, value in body.items():
        if key in ("messages",) or key in CHAT_IGNORED or value is None:
            continue
        if key in CHAT_SAMPLING:
            if key == "stop" and isinstance(value, str):
                value = [value]
            sampling[CHAT_SAMPLING[key]] = value
        elif key == "n":
            if value != 1:  # the chat head's samples: one choice each
                sampling["n"] = value
        elif key == "stream":
            if value:
                raise LineError("unsupported", "stream is not supported in a batch")
        elif key in ("logprobs", "top_logprobs"):
            if value:
                raise LineError("unsupported", f"{key} is not supported yet")
        elif key == "response_format":
            schema = response_schema(value)
            if schema is not None:
                row["_schema"] = schema
        elif key == "chat_template_kwargs":
            thinking = bool(options.get("enable_thinking", False))
            if not isinstance(value, dict) or set(value) - {"enable_thinking"} \
                    or bool(value.get("enable_thinking", thinking)) != thinking:
                raise LineError("unsupported", f"chat_template_kwargs must agree with the job's enable_thinking "
                                               f"({str(thinking).lower()}): thinking is set for the whole batch, "
                                               f"with --set task.options.enable_thinking=true")
        else:
            raise LineError("unsupported", f"body.{key} is not supported")
    _check_sampling(sampling)
    row.update(messages=out, sampling=json.dumps(sampling, sort_keys=True))
    if "max_tokens" in sampling:
        row["_max_tokens"] = sampling["max_tokens"]
    return row


def response_schema(value: Any) -> dict[str, Any] | None:
    """The JSON Schema a response_format asks for (None for {"type": "text"}), checked as the
    extract head checks its schema."""
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_schema"):
        raise LineError("unsupported", "response_format is not supported yet (only {\"type\": \"text\"} and "
                                       "{\"type\": \"json_schema\", ...})")
    if value["type"] == "text":
        return None
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise LineError("invalid_request", "response_format.json_schema.schema must be a JSON Schema object")
    from pipeline.heads.extract import SchemaError, check_schema

    try:
        check_schema(spec["schema"])
    except SchemaError as e:
        raise LineError("unsupported", f"response_format.json_schema.schema: {e}") from None
    return spec["schema"]


def _one_schema(requests: list[Request]) -> dict[str, Any] | None:
    """A batch runs one head: when a request asks for a json_schema, every runnable request must
    ask for the same one (the extract head's job-wide schema); the others become errors."""
    runnable = [r for r in requests if r.error is None and r.row is not None]
    first = next((r for r in runnable if "_schema" in r.row), None)
    if first is None:
        return None
    schema = first.row["_schema"]
    key = json.dumps(schema, sort_keys=True)
    for r in runnable:
        if json.dumps(r.row.get("_schema"), sort_keys=True) != key:
            r.error = LineError("unsupported", f"line {r.line}: its response_format differs from line {first.line}'s; "
                                               f"a batch runs one json_schema for every request: split the file")
            r.row = None
    return schema


def _check_sampling(sampling: dict[str, Any]) -> None:
    """The bounds the chat head checks again (pipeline.heads.chat.row_sampling), here so that the
    line's error names the body's key before anything runs."""
    from pydantic import ValidationError

    from pipeline.sampling import SamplingValues

    try:
        SamplingValues.model_validate(sampling)
    except ValidationError as e:
        bad = "; ".join(f"{'.'.join(map(str, ('body', *x['loc'])))}: {x['msg'].removeprefix('Value error, ')}"
                        for x in e.errors())
        raise LineError("invalid_request", bad) from None


def embed_row(body: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """The embed head's row for a /v1/embeddings body: one text."""
    text = body.get("input")
    if isinstance(text, list) and len(text) == 1:
        text = text[0]
    if isinstance(text, list):
        raise LineError("unsupported", "body.input holds several texts; give one text per request for now")
    if not isinstance(text, str) or not text:
        raise LineError("invalid_request", "body.input must be a non-empty string")
    for key, value in body.items():
        if key == "input" or key in EMBED_IGNORED or value is None:
            continue
        if key == "encoding_format":
            if value not in ("float", "base64"):
                raise LineError("invalid_request", "encoding_format must be float or base64")
        elif key == "dimensions":
            if value != options.get("dimensions"):
                raise LineError("unsupported", f"dimensions {value} differs from the job's "
                                               f"({options.get('dimensions') or 'the model size'}); set it for "
                                               f"the whole batch with --set task.options.dimensions={value}")
        else:
            raise LineError("unsupported", f"body.{key} is not supported")
    return {"text": text, "encoding": body.get("encoding_format") or "float"}


# -- output --------------------------------------------------------------------------------------

def _hex(*parts: Any, n: int = 24) -> str:
    return hashlib.sha256("\x00".join(map(str, parts)).encode()).hexdigest()[:n]


def output_line(batch: Batch, req: Request, *, result: dict | None, error: dict | None, model: str,
                created: int, missing: tuple[str, str] | None = None) -> dict[str, Any] | None:
    """The OpenAI output line of one request (None for a duplicate's later lines). missing: the
    (code, message) of a request that has neither result nor error."""
    if req.dropped:
        return None
    line_id = f"batch_req_{_hex(batch.digest, req.line)}"
    request_id = f"req_{_hex(batch.digest, req.line, 'request')}"
    if req.error is not None:
        code, message = req.error.code, req.error.message
    elif error is not None:
        code, message = error["error_type"], f"line {req.line}: {error['error_message']}"
    elif result is None:
        code, message = missing or ("not_run", "this request was not computed; rerun the same command")
        message = f"line {req.line}: {message}"
    else:
        model = req.row.get(batch.served.column) or model  # an adapter's request answers with its name
        body = (chat_body(batch, req, result, model, created) if batch.url == CHAT_URL
                else embed_body(req, result, model))
        return {"id": line_id, "custom_id": req.custom_id,
                "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}
    status = STATUS.get(code) or (400 if code in CLIENT_ERRORS or code.startswith("invalid") else 500)
    return {"id": line_id, "custom_id": req.custom_id,
            "response": {"status_code": status, "request_id": request_id,
                         "body": {"error": {"message": message, "type": "invalid_request_error" if status < 500
                                            else "server_error", "param": None, "code": code}}},
            "error": {"code": code, "message": message}}


def chat_body(batch: Batch, req: Request, result: dict, model: str, created: int) -> dict[str, Any]:
    """A chat.completion object as OpenAI's (and vLLM's) server returns it."""
    answer = result.get("raw") if batch.schema is not None else result.get("response")  # extract: the JSON
    samples = result.get("samples") or [{**result, "index": 0, "response": answer}]  # n > 1: one choice each
    choices = []
    for s in samples:
        message = {"role": "assistant", "content": s.get("response") or ""}
        if s.get("reasoning") is not None:
            message["reasoning_content"] = s["reasoning"]
        choices.append({"index": s["index"], "message": message, "finish_reason": s.get("finish_reason") or "stop",
                        "logprobs": None})
    prompt, completion = int(result.get("prompt_tokens") or 0), int(result.get("completion_tokens") or 0)
    return {"id": f"chatcmpl-{_hex(batch.digest, req.line, 'completion', n=32)}", "object": "chat.completion",
            "created": created, "model": model, "choices": choices,
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}


def embed_body(req: Request, result: dict, model: str) -> dict[str, Any]:
    """A list of one embedding object, as OpenAI's /v1/embeddings returns it."""
    vector = [float(x) for x in result["embedding"]]
    value: Any = vector
    if (req.row or {}).get("encoding") == "base64":
        value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    prompt = int(result.get("prompt_tokens") or 0)
    return {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": value}], "model": model,
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}
