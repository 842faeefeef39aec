"""Task heads: plain Python that turns one input row into one result row."""

from __future__ import annotations

from pipeline.heads.base import ERROR_TYPES, Completion, Engine, Head, RowError

__all__ = ["ERROR_TYPES", "Completion", "Engine", "Head", "RowError", "head_class", "results_schema"]


def head_class(name: str) -> type[Head]:
    """The head registered under task.head NAME."""
    if name == "chat":
        from pipeline.heads.chat import ChatHead

        return ChatHead
    if name == "summarize":
        from pipeline.heads.summarize import SummarizeHead

        return SummarizeHead
    if name == "classify":
        from pipeline.heads.classify import ClassifyHead

        return ClassifyHead
    if name == "extract":
        from pipeline.heads.extract import ExtractHead

        return ExtractHead
    raise ValueError(f"unknown head {name!r}")


def results_schema(spec, id_type):
    """The Arrow schema of a job's results (its head's result_schema with its options)."""
    return head_class(spec.task.head)(spec.task.options).result_schema(id_type)
