"""Embed head: one vector per row, for Qwen3-Embedding-style checkpoints.

The engine runs vLLM's pooling runner (this head's engine_task "embed"): the final hidden
state of the prompt's last token, L2-normalised. The prompt is built as the Qwen3-Embedding
model card builds it: the text (a query with an instruction as `Instruct: {instruction}\nQuery:{text}`),
then <|endoftext|>, the token whose hidden state is the embedding (the card's tokenize()
appends it; the checkpoint's tokenizer does the same). The row's text is tokenized as plain
text: a control string in it stays text. `dimensions` keeps the first N values and
renormalises them (Matryoshka), here, exactly, rather than in the engine.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field, field_validator

from pipeline.heads.base import Head, HeadOptions, PoolingEngine, RowError, require_text

END_OF_TEXT = "<|endoftext|>"
QUERY_TEMPLATE = "Instruct: {instruction}\nQuery:{text}"  # the model card's get_detailed_instruct


class EmbedOptions(HeadOptions):
    text_column: str = Field("text", description="Column holding the text to embed.")
    instruction: str | None = Field(
        None, description="A one-line task description for queries (Qwen3-Embedding's "
        "instruction, e.g. 'Given a web search query, retrieve relevant passages that answer the "
        "query'): each text is embedded as 'Instruct: {instruction}\\nQuery:{text}'. Leave it "
        "unset for documents, which the model card embeds as they are.")
    dimensions: int | None = Field(
        None, ge=1, description="Keep the first N values of each embedding and renormalise them "
        "(Matryoshka; Qwen3-Embedding supports 32 up to its hidden size). Default: all of them "
        "(the checkpoint's hidden_size).")

    @field_validator("instruction")
    @classmethod
    def _instruction_is_text(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("instruction is empty; leave it unset to embed texts as they are")
        return v


def truncate_normalized(vector: list[float], dimensions: int | None) -> list[float]:
    """The first `dimensions` values, renormalised to unit length (all of them when None)."""
    kept = vector[:dimensions] if dimensions else list(vector)
    norm = math.sqrt(math.fsum(x * x for x in kept))
    if norm == 0.0 or not math.isfinite(norm):
        raise RowError("output_parse_error", f"the engine's embedding has norm {norm}; it cannot be normalised")
    return [x / norm for x in kept]


class EmbedHead(Head):
    name = "embed"
    Options = EmbedOptions
    options: EmbedOptions
    engine_task = "embed"

    def __init__(self, options: dict[str, Any] | None = None, *, sampling: dict[str, Any] | None = None):
        super().__init__(options, sampling=sampling)
        self.hidden_size: int | None = None

    def use_model(self, config: Any) -> None:
        hidden = getattr(config, "hidden_size", None)
        if hidden is None:
            text = getattr(config, "text_config", None)
            hidden = getattr(text, "hidden_size", None) if text is not None else None
        if hidden is None:
            raise ValueError("the checkpoint's config has no hidden_size; cannot size the embedding column")
        dims = self.options.dimensions
        if dims is not None and dims > hidden:
            raise ValueError(f"dimensions {dims} is more than the model's hidden size {hidden}; "
                             f"use at most {hidden} (or leave it unset)")
        self.hidden_size = int(hidden)

    @property
    def size(self) -> int:
        """Floats per embedding in this job's results."""
        if self.options.dimensions:
            return self.options.dimensions
        if self.hidden_size is None:
            raise RuntimeError("EmbedHead.use_model(config) was not called: the embedding size is unknown")
        return self.hidden_size

    def result_schema(self, id_type: Any) -> Any:
        from pipeline.io.schemas import arrow_schema

        return arrow_schema("results_embed", id_type=id_type, sizes={"N": self.size})

    def input_columns(self) -> list[str]:
        return [self.options.text_column]

    def prompt_ids(self, text: str, engine: PoolingEngine) -> list[int]:
        """The row's prompt: the (instructed) text as plain text, then <|endoftext|>."""
        o = self.options
        shown = QUERY_TEMPLATE.format(instruction=o.instruction, text=text) if o.instruction else text
        # The template is the job's; the row's text is untrusted and stays text. One plain-text
        # pass over the whole string keeps the model card's token boundaries (":" joins the
        # query's first word, as the card's tokenizer call does).
        return engine.tokenize_text(shown) + engine.tokenize(END_OF_TEXT)

    async def run(self, row: dict[str, Any], engine: PoolingEngine) -> dict[str, Any]:
        text = require_text(row, self.options.text_column)
        await self.refuse_oversized(engine, [text], turns=0, columns=[self.options.text_column])
        prompt = self.prompt_ids(text, engine)
        if len(prompt) > engine.max_model_len:
            raise RowError("prompt_too_long", f"the text has {len(prompt)} tokens (with the instruction and "
                                              f"<|endoftext|>) but model.max_model_len is {engine.max_model_len}; "
                                              f"shorten it or raise max_model_len")
        vector = await engine.embed(prompt)
        if self.options.dimensions and self.options.dimensions > len(vector):
            raise RowError("internal_error", f"the engine's embedding has {len(vector)} values, fewer than "
                                             f"dimensions {self.options.dimensions}")
        embedding = truncate_normalized(vector, self.options.dimensions)
        if self.hidden_size is not None and not self.options.dimensions and len(embedding) != self.hidden_size:
            raise RowError("internal_error", f"the engine's embedding has {len(embedding)} values, not the "
                                             f"model's hidden size {self.hidden_size}")
        return {"embedding": embedding, "prompt_tokens": len(prompt), "completion_tokens": 0}
