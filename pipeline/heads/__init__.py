"""Task heads: plain Python that turns one input row into one result row, and the registry
that maps a task.head name to its head (the one place a head is named)."""

from __future__ import annotations

import importlib

from pipeline.heads.base import ERROR_TYPES, Completion, Engine, GenerativeEngine, Head, PoolingEngine, RowError

__all__ = ["ERROR_TYPES", "HEADS", "Completion", "Engine", "GenerativeEngine", "Head", "PoolingEngine", "RowError",
           "VARIANTS", "has_variants", "head_class", "head_names"]

# task.head name -> "module:class", imported when first used (a job loads only its own head).
HEADS = {
    "chat": "pipeline.heads.chat:ChatHead",
    "summarize": "pipeline.heads.summarize:SummarizeHead",
    "classify": "pipeline.heads.classify:ClassifyHead",
    "extract": "pipeline.heads.extract:ExtractHead",
    "embed": "pipeline.heads.embed:EmbedHead",
    "rerank": "pipeline.heads.rerank:RerankHead",
    "qa": "pipeline.heads.qa:QaHead",
}
# The head that runs a task on a kind of checkpoint (pipeline.checkpoint.checkpoint_kind) other
# than its default: a classification checkpoint's own classes instead of scoring label texts.
VARIANTS = {
    ("classify", "sequence_classification"): "pipeline.heads.checkpoint_classify:SequenceClassifyHead",
    ("classify", "token_classification"): "pipeline.heads.checkpoint_classify:TokenClassifyHead",
}


def head_names() -> tuple[str, ...]:
    """The names task.head accepts."""
    return tuple(HEADS)


def has_variants(name: str) -> bool:
    """Whether the head that runs task NAME depends on the checkpoint's kind."""
    return any(n == name for n, _ in VARIANTS)


def head_class(name: str, kind: str | None = None) -> type[Head]:
    """The head registered under task.head NAME, for a checkpoint of this kind."""
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; the heads are {', '.join(HEADS)}")
    module, cls = VARIANTS.get((name, kind), HEADS[name]).split(":")
    return getattr(importlib.import_module(module), cls)
