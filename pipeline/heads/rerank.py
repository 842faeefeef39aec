"""Rerank head: how relevant a document is to a query, for Qwen3-Reranker checkpoints.

Qwen3-Reranker is a generative Qwen3 that answers "yes" or "no". The prompt is the model
card's, token for token: its system turn, a user turn `<Instruct>: {instruction}\n<Query>:
{query}\n<Document>: {document}`, and the assistant turn opened with an empty think block.
The score is the card's formula, softmax over [logit(no), logit(yes)] at the answer position,
P(yes): the engine gives the log-probabilities of the one-token continuations "yes" and "no"
(one engine step, full vocabulary), and a softmax over two log-probabilities equals the
softmax over the two logits (the shared normaliser cancels).

The prefix and suffix are the job's text (their control tokens are control tokens, as in the
card); the user turn holds the row's query and document and is tokenized as plain text, so a
control string inside them (<|im_end|>, <think>, ...) stays text and cannot end the turn.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field, field_validator

from pipeline.heads.base import Engine, Head, HeadOptions, RowError, require_text

SYSTEM_PROMPT = ('Judge whether the Document meets the requirements based on the Query and the Instruct '
                 'provided. Note that the answer can only be "yes" or "no".')
PREFIX = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
USER_TEMPLATE = "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


class RerankOptions(HeadOptions):
    query_column: str = Field("query", description="Column holding each row's query (unless `query` is set).")
    document_column: str = Field("document", description="Column holding each row's document.")
    query: str | None = Field(
        None, description="One query for every row of the job; the rows then need only a document.")
    instruction: str = Field(
        DEFAULT_INSTRUCTION, description="The task description in the prompt's <Instruct> line "
        "(the model card's default: web search).")

    @field_validator("query", "instruction")
    @classmethod
    def _not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must not be empty")
        return v


class RerankHead(Head):
    name = "rerank"
    Options = RerankOptions
    options: RerankOptions

    @classmethod
    def score_method(cls, options: dict[str, Any] | None) -> str | None:
        return "trie"  # engine.score's default: one step, the two tokens' log-probabilities

    def input_columns(self) -> list[str]:
        o = self.options
        return [o.document_column] if o.query is not None else [o.query_column, o.document_column]

    def required_all(self) -> list[str]:
        return self.input_columns()

    def prompt_ids(self, query: str, document: str, engine: Engine) -> list[int]:
        """The model card's prompt: prefix, the user turn as plain text, suffix."""
        user = USER_TEMPLATE.format(instruction=self.options.instruction, query=query, document=document)
        return engine.tokenize(PREFIX) + engine.tokenize_text(user) + engine.tokenize(SUFFIX)

    @staticmethod
    def answer_ids(engine: Engine) -> tuple[int, int]:
        """The single tokens "yes" and "no" (the card's convert_tokens_to_ids)."""
        yes, no = engine.tokenize("yes"), engine.tokenize("no")
        if len(yes) != 1 or len(no) != 1:
            raise RowError("internal_error", f"'yes' and 'no' are not single tokens for this tokenizer "
                                             f"({yes}, {no}); the reranker's formula needs them to be")
        return yes[0], no[0]

    async def run(self, row: dict[str, Any], engine: Engine) -> dict[str, Any]:
        o = self.options
        query = o.query if o.query is not None else require_text(row, o.query_column)
        document = require_text(row, o.document_column)
        await self.refuse_oversized(engine, [query, document], turns=2, columns=self.input_columns())
        prompt = self.prompt_ids(query, document, engine)
        if len(prompt) + 1 > engine.max_model_len:
            raise RowError("prompt_too_long", f"the prompt has {len(prompt)} tokens; with the answer token it "
                                              f"exceeds model.max_model_len {engine.max_model_len}; shorten the "
                                              f"query or document, or raise max_model_len")
        yes, no = self.answer_ids(engine)
        scored = await engine.score(prompt, [[yes], [no]])
        lp_yes, lp_no = scored.logprobs
        return {
            "score": p_yes(lp_yes, lp_no),
            "prompt_tokens": scored.prompt_tokens,
            "prompt_tokens_computed": getattr(scored, "computed_tokens", None),
            "completion_tokens": 0,
        }


def p_yes(lp_yes: float, lp_no: float) -> float:
    """softmax([no, yes])[1] from the two log-probabilities (or logits), stably."""
    if lp_yes == lp_no == -math.inf:
        raise RowError("output_parse_error", "the engine gave 'yes' and 'no' no probability at all")
    if lp_yes >= lp_no:
        return 1.0 / (1.0 + math.exp(lp_no - lp_yes))
    e = math.exp(lp_yes - lp_no)
    return e / (1.0 + e)
