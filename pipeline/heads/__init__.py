"""Task heads: plain Python that turns one input row into one result row."""

from __future__ import annotations

from pipeline.heads.base import ERROR_TYPES, Completion, Engine, Head, RowError

__all__ = ["ERROR_TYPES", "Completion", "Engine", "Head", "RowError", "head_class", "job_head", "results_schema"]


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
    if name == "embed":
        from pipeline.heads.embed import EmbedHead

        return EmbedHead
    if name == "rerank":
        from pipeline.heads.rerank import RerankHead

        return RerankHead
    if name == "qa":
        from pipeline.heads.qa import QaHead

        return QaHead
    raise ValueError(f"unknown head {name!r}")


def job_head(spec, *, sampling: dict | None = None) -> Head:
    """The job's head with its options, told about the checkpoint (Head.use_model: only for
    heads that override it, so other jobs never read the model's config here)."""
    head = head_class(spec.task.head)(spec.task.options, sampling=sampling)
    if type(head).use_model is not Head.use_model:
        from pipeline.engine_args import hf_config  # plain JSON (or transformers' AutoConfig): no vLLM

        head.use_model(hf_config(spec.model.source, spec.model.trust_remote_code))
    return head


def results_schema(spec, id_type):
    """The Arrow schema of a job's results (its head's result_schema with its options)."""
    return job_head(spec).result_schema(id_type)
