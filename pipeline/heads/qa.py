"""QA head: the answer to a row's question found in the row's context.

mode "extract" (default), on a *ForQuestionAnswering checkpoint (Qwen3ForQuestionAnswering:
a linear `qa_outputs` giving a start and an end logit per token): the model reads the
question followed by the context, both tokenized as plain text (control strings in them
stay text), and the answer is the context span with the highest start probability x end
probability, at most max_answer_tokens long. This is transformers' question-answering
pipeline, step for step: a context longer than a window (max_seq_len tokens with the
question) is read in overlapping windows (doc_stride tokens shared by neighbours, as its
tokenizer's overflowing windows), each window's logits are softmaxed over its context tokens
only, and the best span of any window wins. The score is that product (in [0, 1]); below
no_answer_threshold the row is answered "no answer".

mode "generate", on a generative Qwen3: the model answers in words from the context through
the chat template (render_chat + generate, as the chat head), and `quoted` says whether the
answer occurs verbatim in the context (with its offsets when it does).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.heads.base import (
    COUNT_PIECE_CHARS,
    Engine,
    Head,
    HeadOptions,
    PoolingEngine,
    RowError,
    require_placeholders,
    require_text,
    text_pieces,
)

QA_SUFFIX = "ForQuestionAnswering"
MASKED = -10000.0  # transformers' pipeline gives non-context tokens this logit before the softmax


class QaOptions(HeadOptions):
    question_column: str = Field("question", description="Column holding each row's question.")
    context_column: str = Field("context", description="Column holding the text to find the answer in.")
    mode: Literal["extract", "generate"] = Field(
        "extract", description="'extract': a span of the context, from a *ForQuestionAnswering checkpoint's "
        "start/end logits; 'generate': a generative Qwen3 answers from the context via the chat template.")
    max_answer_tokens: int = Field(15, ge=1, description="extract: the longest answer span, in tokens "
                                                          "(transformers' max_answer_len).")
    no_answer_threshold: float = Field(
        0.0, ge=0.0, le=1.0, description="extract: a best span scoring below this is reported as no_answer "
        "(answer, start and end null).")
    max_seq_len: int = Field(384, ge=8, description="extract: tokens per window, question + context "
                                                     "(capped by model.max_model_len).")
    doc_stride: int = Field(128, ge=0, description="extract: context tokens two neighbouring windows share.")
    instruction: str = Field(
        "Answer the question using only the context. Quote the answer from the context, as briefly as "
        "possible.\n\nContext:\n{context}\n\nQuestion: {question}",
        description="generate: the user turn; {context} and {question} are the row's texts.")
    system_prompt: str | None = Field(None, description="generate: optional system prompt.")
    max_tokens: int = Field(64, ge=1, description="generate: default max_tokens when sampling sets none.")

    @field_validator("instruction")
    @classmethod
    def _instruction_has_context_and_question(cls, v: str) -> str:
        return require_placeholders(v, "context", "question")

    @model_validator(mode="after")
    def _stride_fits(self):
        if self.doc_stride >= self.max_seq_len:
            raise ValueError(f"doc_stride {self.doc_stride} must be below max_seq_len {self.max_seq_len}")
        return self


def span_probs(logits: list[float], lo: int, hi: int) -> list[float]:
    """Softmax of a window's logits with every token outside [lo, hi) (the question) masked."""
    masked = [x if lo <= i < hi else MASKED for i, x in enumerate(logits)]
    top = max(masked)
    exps = [math.exp(x - top) for x in masked]
    total = sum(exps)
    return [e / total for e in exps]


def best_span(start: list[float], end: list[float], lo: int, hi: int, max_tokens: int) -> tuple[int, int, float]:
    """(s, e, p_start[s] * p_end[e]) of the best span lo <= s <= e < hi with e - s < max_tokens,
    from a window's start and end logits (transformers' select_starts_ends + decode_spans)."""
    ps, pe = span_probs(start, lo, hi), span_probs(end, lo, hi)
    best = (lo, lo, -1.0)
    # for each end, the best start in its reach: O(n * max_tokens) at worst, fine for a window
    for e in range(lo, hi):
        for s in range(max(lo, e - max_tokens + 1), e + 1):
            score = ps[s] * pe[e]
            if score > best[2]:
                best = (s, e, score)
    return best


def windows(n: int, room: int, stride: int) -> list[tuple[int, int]]:
    """[start, end) of each context window: room tokens each, neighbours sharing stride tokens,
    until the context's end is covered (the tokenizer's overflowing-token windows)."""
    out, start = [], 0
    while True:
        out.append((start, min(start + room, n)))
        if start + room >= n:
            return out
        start += room - stride


WINDOWS_PER_PAUSE = 16  # windows whose best span is found between two turns of the event loop


async def context_tokens(engine: PoolingEngine, context: str) -> tuple[list[int], list[tuple[int, int]]]:
    """engine.token_offsets of the context, COUNT_PIECE_CHARS characters at a time (text_pieces),
    letting the event loop run between pieces: a long context holds back neither the other rows
    nor its own row timeout."""
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    start = 0
    for i, piece in enumerate(text_pieces(context, COUNT_PIECE_CHARS)):
        if i:
            await asyncio.sleep(0)
        piece_ids, piece_offsets = engine.token_offsets(piece)
        ids += piece_ids
        offsets += [(a + start, b + start) for a, b in piece_offsets]
        start += len(piece)
    return ids, offsets


class QaHead(Head):
    name = "qa"
    Options = QaOptions
    options: QaOptions

    def input_columns(self) -> list[str]:
        return [self.options.question_column, self.options.context_column]

    def required_all(self) -> list[str]:
        return self.input_columns()

    def use_model(self, config: Any) -> None:
        archs = list(getattr(config, "architectures", None) or [])
        qa = any(a.endswith(QA_SUFFIX) for a in archs)
        if self.options.mode == "extract" and not qa:
            raise ValueError(f"mode 'extract' needs a *{QA_SUFFIX} checkpoint (start/end logits per token); "
                             f"this one is {', '.join(archs) or 'without architectures'}. Use mode: generate "
                             f"for a generative Qwen3")
        if self.options.mode == "generate" and qa:
            raise ValueError(f"mode 'generate' needs a generative checkpoint (*ForCausalLM); this one is "
                             f"{', '.join(archs)}: use mode: extract")

    async def run(self, row: dict[str, Any], engine: Engine | PoolingEngine) -> dict[str, Any]:
        question = require_text(row, self.options.question_column)
        context = require_text(row, self.options.context_column)
        generate = self.options.mode == "generate"
        # generate's prompt must fit the context (a turn at least); extract reads windows of any length
        await self.refuse_oversized(engine, [question, context], turns=1 if generate else None,
                                    columns=self.input_columns())
        if generate:
            return await self._generate(question, context, engine)
        return await self._extract(question, context, engine)

    async def _extract(self, question: str, context: str, engine: PoolingEngine) -> dict[str, Any]:
        o = self.options
        if not hasattr(engine, "qa_logits"):
            raise RowError("internal_error", "mode 'extract' runs on a *ForQuestionAnswering checkpoint; "
                                             "this engine has no question-answering head")
        q_ids = engine.tokenize_text(question)  # untrusted: control strings stay text
        c_ids, offsets = await context_tokens(engine, context)
        window = min(o.max_seq_len, engine.max_model_len)
        room = window - len(q_ids)
        if room <= o.doc_stride:
            raise RowError("prompt_too_long", f"the question has {len(q_ids)} tokens; with windows of {window} "
                                              f"tokens (task.options.max_seq_len, model.max_model_len) and "
                                              f"doc_stride {o.doc_stride} no context fits; shorten it")
        spans = windows(len(c_ids), room, o.doc_stride)
        logits = await asyncio.gather(*(engine.qa_logits(q_ids + c_ids[a:b]) for a, b in spans))
        best = None
        for i, ((a, b), (start, end)) in enumerate(zip(spans, logits)):
            if i % WINDOWS_PER_PAUSE == WINDOWS_PER_PAUSE - 1:
                await asyncio.sleep(0)  # a long context's spans must not hold the event loop
            s, e, score = best_span(list(start), list(end), len(q_ids), len(q_ids) + b - a, o.max_answer_tokens)
            if best is None or score > best[2]:  # the first window wins a tie, as a stable sort
                best = (a + s - len(q_ids), a + e - len(q_ids), score)
        read = sum(len(q_ids) + b - a for a, b in spans)
        s, e, score = best
        if score < o.no_answer_threshold:
            answer, start, end = None, None, None
        else:
            start, end = offsets[s][0], offsets[e][1]
            while start < end and context[start].isspace():  # byte-level tokens carry their leading space
                start += 1
            while end > start and context[end - 1].isspace():
                end -= 1
            answer = context[start:end]
        return {"answer": answer, "start": start, "end": end, "score": score, "no_answer": answer is None,
                "quoted": None, "windows": len(spans), "prompt_tokens": read, "completion_tokens": 0}

    async def _generate(self, question: str, context: str, engine: Engine) -> dict[str, Any]:
        o = self.options
        user = o.instruction.replace("{context}", context).replace("{question}", question)
        turns = ([{"role": "system", "content": o.system_prompt}] if o.system_prompt else []) + [
            {"role": "user", "content": user}]
        prompt = engine.render_chat(turns, enable_thinking=False)
        if len(prompt) >= engine.max_model_len:
            raise RowError("prompt_too_long", f"the prompt has {len(prompt)} tokens but model.max_model_len is "
                                              f"{engine.max_model_len}; shorten the context or raise max_model_len")
        sampling = {"max_tokens": o.max_tokens, "temperature": 0.0, **self.sampling}
        done = await engine.generate(prompt, sampling)
        answer = done.text.strip()
        start = context.find(answer) if answer else -1
        quoted = start >= 0
        return {"answer": answer, "start": start if quoted else None,
                "end": start + len(answer) if quoted else None, "score": None, "no_answer": not answer,
                "quoted": quoted, "windows": None, "prompt_tokens": done.prompt_tokens,
                "completion_tokens": done.completion_tokens}
