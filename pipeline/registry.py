"""The head registry: the one place a task.head name maps to its head class, by import path,
so that the spec checks names without importing a head (pipeline.spec stays plain data)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.heads.base import Head

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


def checked_options(name: str, options: dict) -> dict:
    """Head NAME's options, checked (Head.check_options) and as the job runs them
    (Head.resolve_options: a file they name, read in); ValueError says what is wrong."""
    cls = head_class(name)
    problem = cls.check_options(options)
    if problem:
        raise ValueError(problem)
    return cls.resolve_options(options)
