"""Task heads: plain Python that turns one input row into one result row (the registry that
names them is pipeline.registry)."""

from __future__ import annotations

from pipeline.heads.base import ERROR_TYPES, Completion, Engine, GenerativeEngine, Head, PoolingEngine, RowError
from pipeline.registry import HEADS, VARIANTS, has_variants, head_class, head_names

__all__ = ["ERROR_TYPES", "HEADS", "Completion", "Engine", "GenerativeEngine", "Head", "PoolingEngine", "RowError",
           "VARIANTS", "has_variants", "head_class", "head_names"]
