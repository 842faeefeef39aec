"""The docs' sizing table (docs/sizing.md, `<!-- generated: sizing-table -->`): the published
Qwen3 checkpoints on 80 GB and 141 GB GPUs in bf16 and fp8, computed by pipeline.engine.sizing,
the code that validate and --dry-run run."""

from __future__ import annotations

from pipeline.engine.qwen3_configs import QWEN3
from pipeline.engine.sizing import GIB, Shape, Sizing, parameters, size, smallest_fit

# (name, GiB as nvidia-smi reports it: 81,559 MiB for an H100 80GB, 143,771 MiB for an H200)
GPUS = (("80 GB (H100)", 79.6), ("141 GB (H200)", 140.4))
PRECISIONS = (("bf16", None), ("fp8", "fp8"))


def _placement(s: Sizing) -> str:
    where = f"tensor {s.tp}" + (f" x pipeline {s.pp}" if s.pp > 1 else "")
    return f"{where}: {s.device_weight_bytes / GIB:.1f} GiB a device, {s.kv_tokens:,} KV tokens"


def _cell(shape: Shape, quantization: str | None, memory_gib: float) -> str:
    fewest = smallest_fit(shape, quantization=quantization, memory_gib=memory_gib)
    if fewest is None:
        return "does not fit on 64 devices"
    text = _placement(fewest)
    tensor_only = smallest_fit(shape, quantization=quantization, memory_gib=memory_gib, pipeline=False)
    if tensor_only is not None and (tensor_only.tp, tensor_only.pp) != (fewest.tp, fewest.pp):
        text += f"; {_placement(tensor_only)}"
    return text


def sizing_table() -> str:
    """Markdown: one row per checkpoint and precision."""
    header = ["Checkpoint", "Weights", "Parameters", "KV a token"] + [f"Fewest devices on {g}" for g, _ in GPUS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, config in QWEN3.items():
        shape = Shape.of(config)
        params = f"{parameters(shape) / 1e9:.1f}B"
        if shape.moe:
            params += f" ({parameters(shape, active=True) / 1e9:.1f}B active)"
        for label, quantization in PRECISIONS:
            whole = size(shape, quantization=quantization)
            cells = [f"`{name}`", f"{label}: {whole.weight_bytes / GIB:.1f} GiB", params,
                     f"{whole.kv_bytes_per_token // 1024:,} KiB"]
            cells += [_cell(shape, quantization, gib) for _, gib in GPUS]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
