"""Whether a job's placement holds its checkpoint: the job's sizing (pipeline.engine.sizing)
from its spec and config, and the plan-time refusal of a placement whose devices cannot hold
the weights.

Device memory: resources.gpu_memory_gib if set, else the smallest GPU that `nvidia-smi` lists on
this machine (the driver; read without starting CUDA here, which would take memory from a
replica on the same GPU), else unknown: the sizing is then printed for an assumed 80 GiB
device and nothing is refused. Nothing is refused on resources.device cpu either.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from typing import Any

from pipeline.engine.sizing import GIB, VLLM_GPU_MEMORY_UTILIZATION, Shape, Sizing, _gib, size, smallest_fit
from pipeline.errors import SpecError

SIZED_KINDS = ("causal", "moe", "embedding", "sequence_classification", "token_classification")


@functools.cache
def local_gpu_memory_gib() -> float | None:
    """The memory of this machine's smallest GPU (nvidia-smi), None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        mib = [float(x) for x in out.split()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return min(mib) / 1024 if mib else None


def job_sizing(spec, config: Any, kind: str) -> Sizing | None:
    """The sizing of the job's checkpoint on its placement; None for a checkpoint it does not
    size (question answering, run by transformers; a config without Qwen3's sizes)."""
    from pipeline.engine.engine_args import run_dtype
    from pipeline.engine.quantize import checkpoint_quantization

    if kind not in SIZED_KINDS:
        return None
    model, kwargs = spec.model, spec.model.engine_kwargs
    memory = spec.resources.gpu_memory_gib
    if memory is None and spec.resources.device != "cpu":
        memory = local_gpu_memory_gib()
    dtype = run_dtype(model, config)
    try:
        return size(Shape.of(config, kind), tp=model.tensor_parallel_size, pp=model.pipeline_parallel_size,
                    dtype="bfloat16" if dtype == "auto" else dtype,
                    quantization=model.quantization or checkpoint_quantization(config),
                    quantization_config=getattr(config, "quantization_config", None),
                    kv_cache_dtype=str(kwargs.get("kv_cache_dtype", "auto")), memory_gib=memory,
                    utilization=float(kwargs.get("gpu_memory_utilization", VLLM_GPU_MEMORY_UTILIZATION)))
    except (TypeError, ValueError, AttributeError, KeyError, ZeroDivisionError):  # not Qwen3's fields
        return None


def check_fits(spec, sizing: Sizing | None) -> None:
    """SpecError when the device memory is known (and the job is not on CPU) and the heaviest
    device of a replica cannot hold its share of the weights, naming the placements that would."""
    if sizing is None or sizing.fits or not sizing.memory_known or spec.resources.device == "cpu":
        return
    kwargs = dict(dtype=sizing.dtype, quantization=sizing.quantization, utilization=sizing.utilization,
                  memory_gib=sizing.device_memory_bytes / GIB)
    fewest = smallest_fit(sizing.shape, **kwargs)
    tensor_only = smallest_fit(sizing.shape, pipeline=False, **kwargs)
    where = (f"resources.gpu_memory_gib {spec.resources.gpu_memory_gib:g}" if spec.resources.gpu_memory_gib
             else "this machine's GPU (nvidia-smi)")
    if fewest is None:
        instead = "no placement of up to 64 devices does; quantize it (model.quantization) or use larger GPUs"
    else:
        instead = (f"the fewest devices that hold them: model.tensor_parallel_size {fewest.tp}, "
                   f"model.pipeline_parallel_size {fewest.pp}")
        if tensor_only is not None and (tensor_only.tp, tensor_only.pp) != (fewest.tp, fewest.pp):
            instead += f" (or tensor parallel alone: model.tensor_parallel_size {tensor_only.tp})"
        instead += (f"; {fewest.tp * fewest.pp} device(s) a replica leave room for about "
                    f"{fewest.kv_tokens:,} tokens of KV")
    raise SpecError(
        f"model.source {spec.model.source}: a device at tensor {sizing.tp} x pipeline {sizing.pp} would hold "
        f"{_gib(sizing.device_weight_bytes)} of weights, more than gpu_memory_utilization "
        f"{sizing.utilization:g} of {sizing.device_memory_bytes / GIB:g} GiB ({where}) = "
        f"{_gib(sizing.budget_bytes)}; {instead}")
