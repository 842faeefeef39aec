"""LoRA adapters (model.adapters): the engine arguments that let every replica serve them all,
and which adapter a row's requests use. Heads know nothing of adapters: the worker names a
row's adapter (ROW_ADAPTER, a context variable its engine calls inherit) and the engine turns
the name into vLLM's LoRARequest. Plain data here, no vLLM import."""

from __future__ import annotations

import json
import os
from contextvars import ContextVar
from typing import Any

# The adapter the current row's engine calls use (None: the base weights). Set by the worker
# around a row's head.run; the row's task copies it when it starts.
ROW_ADAPTER: ContextVar[str | None] = ContextVar("qwen_batch_row_adapter", default=None)

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts
MAX_ACTIVE_LORAS = 8  # adapters in one engine step (vLLM's max_loras); the rest wait their turn
ENGINE_KEY = "lora_adapters"  # engine_args' {name: path}, taken out before vLLM sees the args


def adapter_config(name: str, path: str) -> dict[str, Any]:
    """The adapter_config.json of a local PEFT adapter directory or a Hugging Face id (its
    cache first); SpecError saying what is missing."""
    from pipeline.spec import SpecError

    where = f"model.adapters.{name}"
    file = os.path.join(path, "adapter_config.json")
    if not os.path.isdir(path):
        try:
            from huggingface_hub import hf_hub_download

            file = hf_hub_download(path, "adapter_config.json")
        except Exception as e:
            raise SpecError(f"{where}: {path} is neither a local adapter directory nor a Hugging Face adapter "
                            f"whose adapter_config.json can be read ({type(e).__name__}); give the directory "
                            f"holding adapter_config.json and adapter_model.safetensors") from None
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SpecError(f"{where}: cannot read {file} ({e}); a PEFT LoRA adapter ships adapter_config.json "
                        f"next to adapter_model.safetensors") from None
    if config.get("peft_type", "LORA") != "LORA" or not isinstance(config.get("r"), int):
        raise SpecError(f"{where}: {file} is not a LoRA adapter's config (peft_type LORA with a rank r)")
    return config


def adapter_args(adapters: dict[str, str], args: dict[str, Any], *, device: str) -> dict[str, Any]:
    """vLLM arguments that serve these adapters on every replica: enable_lora, max_lora_rank
    (the smallest vLLM accepts that holds the largest adapter's rank), max_loras and
    max_cpu_loras, and ENGINE_KEY for VllmEngine; args: the engine's so far (a pooling or
    question-answering runner cannot take adapters)."""
    from pipeline.spec import SpecError

    if args.get("runner"):
        raise SpecError(f"model.adapters: LoRA adapters are for generative checkpoints; model.source "
                        f"{args.get('model')} runs the {args['runner']} runner: drop model.adapters")
    ranks = {name: adapter_config(name, path)["r"] for name, path in adapters.items()}
    largest = max(ranks.values())
    fits = [r for r in LORA_RANKS if r >= largest]
    if not fits:
        name = max(ranks, key=ranks.get)
        raise SpecError(f"model.adapters.{name}: rank {largest} is above the largest vLLM serves "
                        f"({LORA_RANKS[-1]})")
    # the CPU build runs base rows on a zero adapter (zero_adapter): one more slot
    served = len(adapters) + (device == "cpu")
    return {"enable_lora": True, "max_lora_rank": fits[0], "max_loras": min(served, MAX_ACTIVE_LORAS),
            "max_cpu_loras": served, ENGINE_KEY: dict(adapters)}


def zero_adapter(path: str) -> str:
    """A rank-1 adapter with every weight zero on the same modules as the adapter at path (a
    local directory or a Hugging Face id): on it a request computes exactly the base model's
    output. vLLM's CPU build (0.32) applies the adapter in the batch's last slot to requests
    without one (its torch LoRA kernels index the slots with -1), so on CPU the base rows of an
    engine that serves adapters run on this one instead. Written once per layout in the
    temporary folder (a few KB; replicas on a node share it)."""
    import hashlib
    import tempfile

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    if not os.path.isdir(path):
        from huggingface_hub import snapshot_download

        path = snapshot_download(path, allow_patterns=["adapter_config.json", "adapter_model.safetensors"])
    with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    shapes = {}
    with safe_open(os.path.join(path, "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            rows, cols = f.get_slice(key).get_shape()[-2:]
            shapes[key] = [1, cols] if ".lora_A." in key else [rows, 1] if ".lora_B." in key else None
    shapes = {k: v for k, v in shapes.items() if v is not None}
    config = {**config, "r": 1, "lora_alpha": 1, "modules_to_save": None, "use_dora": False}
    layout = json.dumps([config.get("target_modules"), sorted(shapes.items())], default=str)
    digest = hashlib.sha256(layout.encode()).hexdigest()[:16]
    out = os.path.join(tempfile.gettempdir(), f"qwen-batch-zero-lora-{digest}")
    if not os.path.isdir(out):
        part = tempfile.mkdtemp(prefix=os.path.basename(out) + ".part-", dir=os.path.dirname(out))
        save_file({k: torch.zeros(v) for k, v in shapes.items()}, os.path.join(part, "adapter_model.safetensors"))
        with open(os.path.join(part, "adapter_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f)
        try:
            os.rename(part, out)
        except OSError:  # another replica wrote it first
            import shutil

            shutil.rmtree(part, ignore_errors=True)
    return out


def row_adapter(row: dict[str, Any], column: str, names: tuple[str, ...] | list[str]) -> str | None:
    """The adapter a row picks in its column (None or empty: the base weights); ValueError
    saying what to do for a name that is not one of model.adapters."""
    value = row.get(column)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or value not in names:
        shown = repr(value) if isinstance(value, str) else f"a {type(value).__name__}"
        raise ValueError(f"column '{column}' names adapter {shown}, which is not one of model.adapters "
                         f"({', '.join(sorted(names))}); use one of those names, or leave it empty for the "
                         f"base model")
    return value
