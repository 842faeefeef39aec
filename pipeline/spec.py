"""JobSpec: the typed, strict description of one batch job, loaded from YAML."""

from __future__ import annotations

import copy
import datetime
import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator

from pipeline.errors import SpecError
from pipeline.registry import checked_options, head_class, head_names
from pipeline.sampling import MAX_STOP_CHARS, MAX_STOP_STRINGS, SamplingValues  # noqa: F401 (re-exported)
from pipeline.strict_config import StrictSection, explain_validation_error


class InputSpec(StrictSection):
    path: str = Field(
        description="Prompt shards, Parquet or JSON lines told apart by extension (.jsonl, .json, "
        ".ndjson: JSON lines, one object per line; any other name: Parquet; one format per job): a "
        "file, a directory (every file inside, recursively, except names starting with _ or .) or a "
        "glob; local or any URI pyarrow understands (s3://, gs://, hdfs://)."
    )
    id_column: str = Field("id", description="Column holding each row's unique id.")


class OutputSpec(StrictSection):
    path: str = Field(
        description="Output directory: results/, errors/, metrics/ and _manifest.json go here."
    )
    max_error_rate: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="The run fails (non-zero exit) when errors / rows exceeds this share.",
    )
    rows_per_file: int | None = Field(
        None, ge=1, description="Rows gathered into one write (one results file per shard it "
        "touches). Larger: fewer files; smaller: shards commit sooner, and a crash loses less "
        "finished work. Default: 1/16 of the rows to run, between resources.batch_size and 40,000.",
    )


# model.engine_kwargs is an allowlist: vLLM's engine takes some 250 arguments, many of which
# change which model, tokenizer or Python code runs (worker_cls, scheduler_cls,
# logits_processors, kv_transfer_config, model_loader_extra_config, ...) and new ones arrive
# with every release; a denylist would let the next one through. These only change speed,
# memory and logging. Values must be plain scalars (or a list of numbers): nested configs can
# name classes to import.
ENGINE_KWARGS_ALLOWED = frozenset({
    "max_num_seqs", "max_num_batched_tokens", "enable_prefix_caching", "prefix_caching_hash_algo",
    "enable_chunked_prefill", "long_prefill_token_threshold", "gpu_memory_utilization",
    "kv_cache_memory_bytes", "num_gpu_blocks_override", "kv_cache_dtype", "block_size",
    "cpu_offload_gb", "enforce_eager", "cudagraph_capture_sizes", "max_cudagraph_capture_size",
    "optimization_level", "disable_custom_all_reduce", "disable_cascade_attn",
    "disable_sliding_window", "async_scheduling", "scheduling_policy",
    "attention_backend", "seed", "max_logprobs", "disable_log_stats", "max_parallel_loading_workers",
    "use_tqdm_on_load", "hf_token",
})
# Refused keys with a reason, and the spec key to use where there is one.
_SPEC_KEY = "use {} instead"
ENGINE_KWARGS_REFUSED = {
    "model": _SPEC_KEY.format("model.source"),
    "tokenizer": "qwen-batch tokenizes prompts itself with model.source's tokenizer; "
                 "point model.source at a checkpoint that ships the tokenizer you want",
    "tokenizer_mode": "qwen-batch tokenizes prompts itself with model.source's tokenizer",
    "skip_tokenizer_init": "qwen-batch needs the engine's detokenizer (stop strings, text)",
    "trust_remote_code": _SPEC_KEY.format("model.trust_remote_code"),
    "tensor_parallel_size": _SPEC_KEY.format("model.tensor_parallel_size"),
    "pipeline_parallel_size": _SPEC_KEY.format("model.pipeline_parallel_size"),
    "data_parallel_size": "replicas are Ray actors: set resources.replicas instead",
    "distributed_executor_backend": "qwen-batch picks it to match placement "
                                    "(model.tensor_parallel_size, model.pipeline_parallel_size)",
    "max_model_len": _SPEC_KEY.format("model.max_model_len"),
    "dtype": _SPEC_KEY.format("model.dtype"),
    "quantization": _SPEC_KEY.format("model.quantization"),
    "enable_expert_parallel": _SPEC_KEY.format("model.expert_parallel"),
    "hf_overrides": "it rewrites the checkpoint's config (architecture, rope, lengths); "
                    "for a longer context set model.long_context",
    "runner": "chosen from the checkpoint's architecture (generate, or pooling for "
              "*ForSequenceClassification / *ForTokenClassification)",
    "convert": "chosen from the checkpoint's architecture",
    "revision": "qwen-batch reads the config and tokenizer from model.source at its default "
                "revision; point model.source at a local snapshot of the revision you want",
    "tokenizer_revision": "point model.source at a local snapshot of the revision you want",
    "code_revision": "point model.source at a local snapshot of the revision you want",
    "download_dir": "where weights are downloaded is the environment's (HF_HOME / HF_HUB_CACHE "
                    "on every node), not the job's",
    "load_format": "weights load from model.source as published ('dummy' would give random "
                   "weights, 'pt' unpickles files)",
    "worker_cls": "it loads Python code by name into the engine",
    "worker_extension_cls": "it loads Python code by name into the engine",
    "scheduler_cls": "it loads Python code by name into the engine",
    "logits_processors": "it loads Python code by name into the engine",
    "model_class_overrides": "it loads Python code by name into the engine",
    "reasoning_parser_plugin": "it loads Python code by name into the engine",
    "io_processor_plugin": "it loads Python code by name into the engine",
    "model_loader_extra_config": "it changes how weights are loaded from model.source",
}


def engine_kwarg_problem(key: str, value: Any) -> str | None:
    """None if model.engine_kwargs may hold key: value, else why not (naming the spec key to use)."""
    where = f"model.engine_kwargs.{key}"
    if key in ENGINE_KWARGS_REFUSED:
        return f"{where} is refused: {ENGINE_KWARGS_REFUSED[key]}"
    if key not in ENGINE_KWARGS_ALLOWED:
        close = difflib.get_close_matches(key, sorted(ENGINE_KWARGS_ALLOWED), n=1, cutoff=0.7)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return (f"{where} is not on the allowlist of engine settings (speed, memory, logging: "
                f"see ENGINE_KWARGS_ALLOWED in pipeline/spec.py and the README).{hint}")
    scalar = (bool, int, float, str, type(None))
    if not (isinstance(value, scalar) or (isinstance(value, list)
                                          and all(isinstance(x, (int, float)) for x in value))):
        return f"{where} must be a plain value (a number, text, true/false or a list of numbers)"
    return None


class ModelSpec(StrictSection):
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
        None, description="vLLM quantization method; default: none (a quantized checkpoint's own "
        "method is read by vLLM). Checked against resources.device (pipeline/engine/quantize.py): the CPU "
        "build runs compressed-tensors (int8 W8A8), gptq and awq (4-bit, bfloat16/float16); GPUs also "
        "fp8, *_marlin, bitsandbytes (the model card's 4-bit NF4), ..."
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with the checkpoint. Off unless you trust it."
    )
    expert_parallel: bool = Field(
        False, description="MoE checkpoints (Qwen3-30B-A3B, Qwen3-235B-A22B): vLLM's expert parallelism "
        "(enable_expert_parallel) places whole experts on each of a replica's tensor-parallel devices "
        "instead of a slice of every expert (the same bytes a device; fewer, larger expert kernels). "
        "Needs model.tensor_parallel_size > 1; refused for a dense checkpoint."
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra vLLM engine arguments for speed and memory, from an allowlist "
        "(ENGINE_KWARGS_ALLOWED: max_num_seqs, enable_prefix_caching, gpu_memory_utilization, "
        "...); keys the spec sets elsewhere, or that change which model, tokenizer or code "
        "runs, are refused with the key to use instead.",
    )

    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="LoRA adapters rows may pick, {name: path}: a local PEFT adapter directory "
        "(adapter_config.json, adapter_model.safetensors) or a Hugging Face id. Every replica "
        "serves them all beside the base weights (vLLM's enable_lora, max_lora_rank from their "
        "configs), so rows with different adapters share replicas and batches. A row picks one "
        "by name in model.adapter_column; rows without one run on the base model.",
    )
    adapter_column: str = Field(
        "adapter", description="Column naming each row's adapter (a key of model.adapters; empty "
        "or null: the base model). Read only when model.adapters is set; a name not in it makes "
        "the row an invalid_input error row.",
    )

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name, path in v.items():
            if not name.strip() or not path.strip():
                raise ValueError("give every adapter a non-empty name and path, e.g. {support: ./lora/support}")
        return v

    @property
    def devices_per_replica(self) -> int:
        """Devices one model copy spans: tensor x pipeline parallel."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @field_validator("engine_kwargs")
    @classmethod
    def _engine_kwargs_cannot_undo_the_spec(cls, v: dict[str, Any]) -> dict[str, Any]:
        problems = [p for k, val in v.items() if (p := engine_kwarg_problem(k, val))]
        if problems:
            raise ValueError("\n".join(problems))
        return v


# Keys of SamplingSpec that bound rows' overrides; heads take them out of the sampling dict.
SAMPLING_LIMIT_KEYS = ("row_max_tokens",)


class SamplingSpec(SamplingValues):
    """Sampling for every row; unset fields take the head's defaults (Qwen3's recommended)."""

    row_max_tokens: int | None = Field(
        None, ge=1, description="Most max_tokens a row's own `sampling` may ask for; a row asking "
        "more becomes an invalid_input error row. Default: the job's max_tokens (sampling.max_tokens, "
        "else the head's max_tokens option), so rows can lower it but not raise it.")

    def merged(self, *overrides: dict[str, Any] | None) -> dict[str, Any]:
        """These settings with each override's set values laid over them, in order
        (row_max_tokens included when set: Head takes it out)."""
        out = self.model_dump(exclude_none=True)
        for o in overrides:
            out.update({k: v for k, v in (o or {}).items() if v is not None})
        return out


class TaskSpec(StrictSection):
    head: str = Field(description="Which task head turns each row into a result: one of the "
                      "names in pipeline.registry.HEADS (chat, summarize, classify, extract, embed, rerank, qa).")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="The head's own options (see the README's head sections); checked strictly.",
    )

    @field_validator("head")
    @classmethod
    def _head_is_registered(cls, v: str) -> str:
        if v not in head_names():
            close = difflib.get_close_matches(v, head_names(), n=1, cutoff=0.6)
            names = [repr(n) for n in head_names()]
            raise ValueError(f"unknown head {v!r}." + (f" Did you mean '{close[0]}'?" if close else "")
                             + f" Use {', '.join(names[:-1])} or {names[-1]}")
        return v

    @field_validator("options")
    @classmethod
    def _resolve_options(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """The head's options, checked when the spec loads; a file they name (extract's schema) is
        read in now, so the workers, the fingerprint and the manifest hold the content."""
        return checked_options(info.data["head"], v) if "head" in info.data else v


class ResourcesSpec(StrictSection):
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
        "its own uses up to three restarts (counted on top of this bound) and then ends as an "
        "engine_died error row. Past the bound the "
        "run stops, keeps the committed shards, and a rerun resumes."
    )
    row_timeout_s: float | None = Field(
        None, gt=0, description="A row whose engine calls take longer than this becomes an "
        "engine_timeout error row (a hung request must not hang a scheduled job). Default: "
        "600 s plus 1 s per token of sampling.max_tokens (or 4,096 when unset).",
    )
    gpu_memory_gib: float | None = Field(
        None, gt=0, description="Memory of one GPU in GiB (nvidia-smi's MiB / 1024: 79.6 for an "
        "H100 80GB, 140.4 for an H200), for the sizing that validate and --dry-run print and the "
        "refusal of a placement whose devices cannot hold the weights. Default: the smallest GPU "
        "nvidia-smi lists where the job is planned; with none there, sizing assumes 80 GiB and "
        "refuses nothing. Not used with resources.device cpu.",
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

    def row_timeout(self, max_tokens: int | None) -> float:
        """row_timeout_s, or its default for this max_tokens."""
        return self.row_timeout_s or 600.0 + (max_tokens or 4096)

    @property
    def replica_range(self) -> tuple[int, int]:
        """(min, max) replicas."""
        r = self.replicas
        return (r, r) if isinstance(r, int) else (r[0], r[1])


class RaySpec(StrictSection):
    address: str | None = Field(
        None, description="Ray cluster to join (ray://... or host:port); default: start one here."
    )


class JobSpec(StrictSection):
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

    @field_validator("sampling")
    @classmethod
    def _samples_need_a_head_that_keeps_them(cls, v: SamplingSpec, info: ValidationInfo) -> SamplingSpec:
        task = info.data.get("task")
        if task is not None and (v.n or 1) > 1 and not head_class(task.head).many_samples:
            raise ValueError(f"n is {v.n}, but head '{task.head}' gives one answer a row; "
                             f"set sampling.n to 1 (n > 1 is for the chat head)")
        return v

    def fingerprint(self) -> str:
        """Hash of everything that changes a result row: not where rows go, how the job is
        placed, retried or timed, nor the engine's speed and memory settings (RUN_ONLY), so
        changing those never blocks resuming. Settings at their defaults are left out, so a
        setting a later qwen-batch adds (whose default keeps today's rows) never does either."""
        return _digest(result_settings(self.model_dump(mode="json", exclude_defaults=True)))

    def fingerprints(self) -> set[str]:
        """This spec's fingerprint and those earlier qwen-batch versions gave it, so that their
        committed shards of the same spec are this spec's: every setting hashed, defaults
        included; and before RUN_ONLY, every setting but output.path, rows_per_file, ray and name."""
        before_run_only = self.model_dump(mode="json", exclude={"output": {"path", "rows_per_file"}, "ray": True,
                                                                "name": True})
        return {self.fingerprint(), _digest(result_settings(self.model_dump(mode="json"))), _digest(before_run_only)}


def _digest(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# Settings that decide how a job runs, not what a result row holds (JobSpec.fingerprint).
RUN_ONLY: dict[str, Any] = {
    "name": True, "ray": True, "resources": True,
    "output": {"path", "rows_per_file", "max_error_rate"},
    "model": {"tensor_parallel_size", "pipeline_parallel_size", "expert_parallel"},
}
RUN_ONLY_ENGINE_KWARGS = frozenset({
    "max_num_seqs", "max_num_batched_tokens", "enable_prefix_caching", "prefix_caching_hash_algo",
    "enable_chunked_prefill", "long_prefill_token_threshold", "gpu_memory_utilization",
    "kv_cache_memory_bytes", "num_gpu_blocks_override", "block_size", "cpu_offload_gb", "enforce_eager",
    "cudagraph_capture_sizes", "max_cudagraph_capture_size", "optimization_level",
    "disable_custom_all_reduce", "async_scheduling", "scheduling_policy", "disable_log_stats",
    "max_parallel_loading_workers", "use_tqdm_on_load", "hf_token",
})


def result_settings(dump: dict) -> dict:
    """A spec's dump (model_dump(mode="json"), or a manifest's spec) without RUN_ONLY settings."""
    d = copy.deepcopy(dump)
    for key, sub in RUN_ONLY.items():
        if sub is True:
            d.pop(key, None)
        else:
            for k in sub:
                (d.get(key) or {}).pop(k, None)
    model = d.get("model") or {}
    model["engine_kwargs"] = {k: v for k, v in (model.get("engine_kwargs") or {}).items()
                              if k not in RUN_ONLY_ENGINE_KWARGS}
    return d


def spec_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two spec dumps, as 'key: old -> new'."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b, where = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += spec_changes(a, b, where + ".")
        elif a != b:
            out.append(f"{where}: {a!r} -> {b!r}")
    return out


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int):
        super().__init__(f"line {line}: the key '{key}' is given twice in the same mapping (first on "
                         f"line {first}); YAML would silently keep the last one: remove one of them")


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: later keys override it
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise _DuplicateKey(key, line, seen[key])
                    seen[key] = line
                except TypeError:  # an unhashable key: SafeLoader refuses it itself
                    continue
        return super().construct_mapping(node, deep=deep)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_StrictLoader)


def _not_plain(value: Any, where: str = "") -> str | None:
    """Why a loaded YAML value is not plain JSON data (a date, bytes, a set), naming its key, or None."""
    if isinstance(value, dict):
        for k, v in value.items():
            key = f"{where}.{k}" if where else str(k)
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                return _not_plain(k, key) or f"{key}: YAML reads this key as a {type(k).__name__}; quote it"
            if problem := _not_plain(v, key):
                return problem
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if problem := _not_plain(v, f"{where}[{i}]"):
                return problem
    elif isinstance(value, (datetime.date, datetime.datetime)):
        what = "date and time" if isinstance(value, datetime.datetime) else "date"
        return (f"{where or '(top level)'}: YAML reads {value.isoformat()} as a {what}, not text; quote it "
                f"to give text, e.g. {where.rsplit('.', 1)[-1] or 'key'}: \"{value.isoformat()}\"")
    elif not isinstance(value, (str, int, float, bool, type(None))):
        return (f"{where or '(top level)'}: YAML reads this as {type(value).__name__}; write plain text "
                f"(quoted), a number, true/false, a list or a mapping")
    return None


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
            data = _yaml(text) or {}
        except _DuplicateKey as e:
            raise SpecError(f"{source}: {e}") from None
        except yaml.YAMLError as e:
            raise SpecError(f"{source}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{source}: the job spec must be a mapping of sections (input, output, ...).")
    if problem := _not_plain(data):
        raise SpecError(f"{source}: {problem}.")
    data = json.loads(json.dumps(data))  # deep copy, plain types
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SpecError(f"--set {item!r}: write it as KEY=VALUE, e.g. --set sampling.max_tokens=64")
        try:
            value = _yaml(raw)
        except yaml.YAMLError as e:
            raise SpecError(f"--set {item!r}: the value is not valid YAML: {e}") from None
        if problem := _not_plain(value, key.strip()):
            raise SpecError(f"--set {item!r}: {problem}.")
        _set_dotted(data, key.strip(), value)
    try:
        return JobSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(explain_validation_error(JobSpec, e, source)) from None
