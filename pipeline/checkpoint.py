"""The job's checkpoint, read once at planning: its config and what kind of model it is, and
the head that runs the job on it (the registry's variant for its kind, Head.use_model)."""

from __future__ import annotations

import functools
import json
import os
from typing import Any

from pipeline.errors import SpecError
from pipeline.heads import Head, has_variants, head_class

# Architecture name suffix -> the kind of checkpoint (Qwen3ForCausalLM, Qwen3MoeForCausalLM, ...).
KINDS = {
    "MoeForCausalLM": "moe",
    "ForCausalLM": "causal",
    "ForSequenceClassification": "sequence_classification",
    "ForTokenClassification": "token_classification",
    "ForQuestionAnswering": "question_answering",
    "Model": "embedding",
}


@functools.cache  # one read per process, whoever asks (plan, engine arguments, the engine)
def hf_config(source: str, trust_remote_code: bool = False):
    """The checkpoint's config. A local config.json is read as JSON (importing transformers
    costs seconds on the driver); hub ids go through AutoConfig. No vLLM."""
    from types import SimpleNamespace

    local = os.path.join(source, "config.json")
    if os.path.isfile(local):
        with open(local) as f:
            data = json.load(f)
        data.setdefault("architectures", [])
        data.setdefault("id2label", {})
        return SimpleNamespace(**data)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)


def read_config(model) -> Any:
    """The config of model.source (weights are not touched), or SpecError saying why not."""
    try:
        return hf_config(model.source, model.trust_remote_code)
    except Exception as e:  # transformers raises OSError, ValueError, ... with long texts
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SpecError(f"model.source {model.source}: cannot read the checkpoint's config "
                        f"({first}); give a Hugging Face id such as Qwen/Qwen3-8B or a local "
                        f"checkpoint directory") from None


def checkpoint_kind(config: Any) -> str:
    """causal, moe, sequence_classification, token_classification, question_answering,
    embedding, or unknown: from the config's architectures."""
    archs = getattr(config, "architectures", None) or []
    for suffix, kind in KINDS.items():
        if any(a.endswith(suffix) for a in archs):
            return kind
    return "unknown"


def job_head(spec, *, config: Any = None, sampling: dict | None = None) -> Head:
    """The job's head with its options, for the job's checkpoint (config: the checkpoint's,
    read here only for a task whose head depends on the checkpoint's kind or uses the config)."""
    cls = head_class(spec.task.head)
    if config is None and (has_variants(spec.task.head) or cls.use_model is not Head.use_model):
        config = hf_config(spec.model.source, spec.model.trust_remote_code)
    if config is not None:
        cls = head_class(spec.task.head, checkpoint_kind(config))
    head = cls(spec.task.options, sampling=sampling)
    if config is not None and type(head).use_model is not Head.use_model:
        head.use_model(config)
    return head
