"""The job's checkpoint, read once at planning: its config and what kind of model it is, and
the head that runs the job on it (the registry's variant for its kind, Head.use_model)."""

from __future__ import annotations

from typing import Any

from pipeline.engine_args import hf_config  # plain JSON (or transformers' AutoConfig): no vLLM
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


def checkpoint_kind(config: Any) -> str:
    """causal, moe, sequence_classification, token_classification, question_answering,
    embedding, or unknown: from the config's architectures."""
    archs = getattr(config, "architectures", None) or []
    for suffix, kind in KINDS.items():
        if any(a.endswith(suffix) for a in archs):
            return kind
    return "unknown"


def job_head(spec, *, sampling: dict | None = None) -> Head:
    """The job's head with its options, for the job's checkpoint (the model's config is read
    only for a task whose head depends on the checkpoint's kind, or that uses the config)."""
    cls = head_class(spec.task.head)
    config = None
    if has_variants(spec.task.head) or cls.use_model is not Head.use_model:
        config = hf_config(spec.model.source, spec.model.trust_remote_code)
        cls = head_class(spec.task.head, checkpoint_kind(config))
    head = cls(spec.task.options, sampling=sampling)
    if config is not None and type(head).use_model is not Head.use_model:
        head.use_model(config)
    return head
