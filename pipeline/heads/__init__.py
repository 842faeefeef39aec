"""Task heads: plain Python that turns one input row into one result row."""

from __future__ import annotations

from pipeline.heads.base import ERROR_TYPES, Completion, Engine, GenerativeEngine, Head, PoolingEngine, RowError

__all__ = ["ERROR_TYPES", "Completion", "Engine", "GenerativeEngine", "Head", "PoolingEngine", "RowError",
           "head_class", "job_head", "results_schema"]


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
    """The job's head with its options, for the job's checkpoint (Head.for_model, Head.use_model:
    the model's config is read only for heads that override one of them)."""
    cls = head_class(spec.task.head)
    reads_model = cls.for_model.__func__ is not Head.for_model.__func__ or cls.use_model is not Head.use_model
    config = None
    if reads_model:
        from pipeline.engine_args import hf_config  # plain JSON (or transformers' AutoConfig): no vLLM

        config = hf_config(spec.model.source, spec.model.trust_remote_code)
        cls = cls.for_model(config)
    head = cls(spec.task.options, sampling=sampling)
    if config is not None and type(head).use_model is not Head.use_model:
        head.use_model(config)
    return head


def results_schema(spec, id_type):
    """The Arrow schema of a job's results (its head's result_schema with its options)."""
    return job_head(spec).result_schema(id_type)
