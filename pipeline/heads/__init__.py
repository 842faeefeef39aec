"""Task heads: plain Python that turns one input row into one result row."""

from __future__ import annotations

from pipeline.heads.base import ERROR_TYPES, Completion, Engine, Head, RowError

__all__ = ["ERROR_TYPES", "Completion", "Engine", "Head", "RowError", "head_class"]


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
    raise ValueError(f"unknown head {name!r}")
