"""JobSpec: the typed, strict description of one batch job, loaded from YAML."""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class SpecError(ValueError):
    """A job spec that cannot run; the message says what to change."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputSpec(_Section):
    path: str = Field(
        description="Parquet prompt shards: a file, a directory (all *.parquet inside, "
        "recursively) or a glob; local or any URI pyarrow understands (s3://, gs://, hdfs://)."
    )
    id_column: str = Field("id", description="Column holding each row's unique id.")


class OutputSpec(_Section):
    path: str = Field(
        description="Output directory: results/, errors/, metrics/ and _manifest.json go here."
    )
    max_error_rate: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="The run fails (non-zero exit) when errors / rows exceeds this share.",
    )


class ModelSpec(_Section):
    source: str = Field(
        description="Hugging Face id (Qwen/Qwen3-8B) or a local checkpoint directory."
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="Devices per replica that split each layer (GPUs, or CPU cores)."
    )
    pipeline_parallel_size: int = Field(
        1, ge=1, description="Devices per replica that split the layer stack."
    )
    max_model_len: int | None = Field(
        None, ge=16, description="Context length in tokens (prompt + output); default: the model's."
    )
    long_context: int | None = Field(
        None, ge=1024, le=131072,
        description="Context wanted, in tokens. Above the model's native length (32,768 for "
        "Qwen3) this turns on YaRN rope scaling with factor wanted/native (at most 4.0, i.e. "
        "131,072 tokens). Static YaRN can lower quality on short texts: prefer chunking "
        "(the summarize head) unless documents need the whole context at once.",
    )
    dtype: str = Field("auto", description="Weights dtype: auto, bfloat16, float16, float32.")
    quantization: str | None = Field(
        None, description="vLLM quantization method (awq, gptq, fp8, ...); default: none."
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with the checkpoint. Off unless you trust it."
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra vLLM engine arguments, passed through as-is "
        "(e.g. max_num_seqs, enable_prefix_caching, gpu_memory_utilization).",
    )


class SamplingSpec(_Section):
    """Sampling for every row; unset fields take the head's defaults (Qwen3's recommended)."""

    temperature: float | None = Field(None, ge=0.0, description="0 means greedy.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int | None = Field(None, description="Sample among the k likeliest tokens; -1: all.")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="Minimum token probability.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate per row.")
    seed: int | None = Field(None, description="Per-request seed, for reproducible sampling.")
    repetition_penalty: float | None = Field(None, gt=0.0, description="1.0 means none.")
    presence_penalty: float | None = Field(None, description="Penalty for tokens already used.")
    frequency_penalty: float | None = Field(None, description="Penalty growing with use count.")
    stop: list[str] | None = Field(None, description="Strings that end generation.")
    ignore_eos: bool | None = Field(None, description="Keep generating past end-of-sequence.")

    def merged(self, *overrides: dict[str, Any] | None) -> dict[str, Any]:
        """These settings with each override's set values laid over them, in order."""
        out = self.model_dump(exclude_none=True)
        for o in overrides:
            out.update({k: v for k, v in (o or {}).items() if v is not None})
        return out


class TaskSpec(_Section):
    head: Literal["chat", "summarize", "classify"] = Field(
        description="Which task head turns each row into a result."
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="The head's own options (see the README's head sections); checked strictly.",
    )


class ResourcesSpec(_Section):
    replicas: int | tuple[int, int] = Field(
        1, description="Engine actors, each holding one model copy: a number, or [min, max] to "
        "let Ray Data add replicas while work is queued (the cluster autoscaler adds nodes).")
    replica_resources: dict[str, float] = Field(
        default_factory=dict, description="Extra Ray resources each replica reserves on its node, "
        "e.g. {\"accelerator_type:H100\": 0.001} or a custom resource that pins replicas to a "
        "node type.")
    start_timeout_s: float = Field(
        1800, gt=0, description="How long the first replicas (resources.replicas, or its min) "
        "may take to be placed and load the model; work starts once all are up, and the run "
        "fails if they are not up in time (an autoscaling cluster may need to start nodes).")
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="auto: GPUs when the Ray cluster has them, else the CPU build."
    )
    batch_size: int = Field(
        64, ge=1, description="Rows per batch handed to an engine actor (several run at once)."
    )
    max_engine_restarts: int = Field(
        3, ge=0, description="Times an engine actor that died (killed, out of memory, engine "
        "crash) is restarted and its unfinished rows retried. A row that kills the engine on "
        "its own uses two restarts and then ends as an engine_died error row. Past the bound the "
        "run stops, keeps the committed shards, and a rerun resumes."
    )
    rows_in_flight: int = Field(
        512, ge=1, description="Rows submitted to each engine at once; keep it above the "
        "engine's max_num_seqs so it always has a full batch to schedule."
    )


    @field_validator("replicas", mode="before")
    @classmethod
    def _replicas_range(cls, v):
        value = v
        if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) for x in v):
            value = tuple(v)
            low, high = value
        elif isinstance(v, int) and not isinstance(v, bool):
            low = high = v
        else:
            low = high = 0
        if low < 1 or high < low:
            raise ValueError("give a number >= 1, or [min, max] with 1 <= min <= max")
        return value

    @property
    def replica_range(self) -> tuple[int, int]:
        """(min, max) replicas."""
        r = self.replicas
        return (r, r) if isinstance(r, int) else (r[0], r[1])


class RaySpec(_Section):
    address: str | None = Field(
        None, description="Ray cluster to join (ray://... or host:port); default: start one here."
    )


class JobSpec(_Section):
    """One batch job: where rows come from, which model and head, where results go."""

    name: str = Field("job", description="A name for logs and the manifest.")
    input: InputSpec
    output: OutputSpec
    model: ModelSpec
    task: TaskSpec
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    ray: RaySpec = Field(default_factory=RaySpec)

    @field_validator("name")
    @classmethod
    def _name_is_simple(cls, v: str) -> str:
        if not v or "/" in v:
            raise ValueError("use a non-empty name without '/'")
        return v

    def fingerprint(self) -> str:
        """Hash of everything that changes results (not where they go, nor the cluster)."""
        d = self.model_dump(mode="json", exclude={"output": {"path"}, "ray": True, "name": True})
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names valid at a location of a validation error (the unknown key's parent)."""
    cur: Any = model
    for part in loc[:-1]:
        field = cur.model_fields.get(part) if isinstance(cur, type) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        cur = field.annotation
    return list(cur.model_fields) if isinstance(cur, type) else []


def explain_validation_error(model: type[BaseModel], err: ValidationError, source: str) -> str:
    """Turn pydantic's errors into lines a user can act on, with did-you-mean for typos."""
    lines = [f"{source}: the job spec is not valid:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            known = _known_keys(model, e["loc"])
            close = difflib.get_close_matches(str(e["loc"][-1]), known, n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            lines.append(f"  - {where}: unknown key.{hint} Valid keys here: {', '.join(known)}.")
        elif e["type"] == "missing":
            lines.append(f"  - {where}: required key is missing.")
        else:
            lines.append(f"  - {where}: {e['msg']} (got {e.get('input')!r}).")
    return "\n".join(lines)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = data
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise SpecError(f"--set {dotted}: '{p}' is not a section")
        cur = nxt
    cur[parts[-1]] = value


def load_spec(path: str | Path | None = None, *, data: dict | None = None,
              overrides: list[str] = ()) -> JobSpec:
    """Read a YAML job spec (or a dict), apply `KEY=VALUE` overrides, validate strictly.

    Relative input/output/model paths in a file are resolved against the current directory.
    """
    source = str(path) if path is not None else "job spec"
    if data is None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise SpecError(f"{source}: cannot read the job spec ({e.strerror}).") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise SpecError(f"{source}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{source}: the job spec must be a mapping of sections (input, output, ...).")
    data = json.loads(json.dumps(data))  # deep copy, plain types
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SpecError(f"--set {item!r}: write it as KEY=VALUE, e.g. --set sampling.max_tokens=64")
        _set_dotted(data, key.strip(), yaml.safe_load(raw))
    try:
        return JobSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(explain_validation_error(JobSpec, e, source)) from None
