"""Classify head: a label from a fixed set, with a probability for every label.

On a generative Qwen3, every label is scored exactly: the log-probability the model gives to
the assistant answering with that label (all its tokens, then end-of-turn). The probabilities
are those scores normalized over the label set, so they sum to 1, and the label is the
likeliest one: by construction it is always in the set, whatever the text says. Multi-label
asks one yes/no question per label, each after the text, so the engine's prefix cache computes
the text once a row for all of them; a label's probability is "yes" against "no" at the
answer's first token (as Qwen3-Reranker scores), one request a label.

`scoring: trie` (the default) has the engine read the log-probabilities at each node of the
labels' token trie once (one request per label at most, walking its branch), sharing the
prompt's prefill through the prefix cache; `scoring: per_label` is the older way (prompt
log-probabilities of prompt + label, a full prefill per label). Both give the same numbers;
the second costs K prefills a row. `scoring: letters` lists the labels as lettered options
(A, B, ...) and reads one distribution, over the letters, at the answer's first token: one
request a row, no walk; its probabilities are the model's for the letters, not for the labels'
text, so they differ from the other two.

On a *ForSequenceClassification or *ForTokenClassification checkpoint `task.head: classify`
runs the heads of pipeline.heads.checkpoint_classify instead (pipeline.heads.VARIANTS).

Graded runs (`gold_column`): a result row carries the row's gold label as text (`gold`) and
whether the label is it (`correct`; null when the row has no gold label, or one that is not
among the labels: a gold_unknown row, counted apart, never graded). `abstain_below: P` flags
rows whose top probability is under P (`review`). pipeline.ops.metrics adds them up per shard.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.heads.base import Engine, Head, HeadOptions, RowError, require_placeholders, require_text

END_OF_TURN = "<|im_end|>"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # scoring: letters names the options with these, in order


class Example(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    label: str | list[str]


class ClassifyOptions(HeadOptions):
    text_column: str = Field("text", description="Column holding the text to label.")
    labels: list[str] | dict[str, str] = Field(
        default_factory=list,
        description="The label set: a list, or a mapping label -> one-line description. "
        "Not needed for a *ForSequenceClassification checkpoint (its id2label is used).",
    )
    instruction: str = Field(
        "Classify the text below. Answer with exactly one of these labels:\n{labels}\n\n"
        "Text:\n{text}",
        description="The prompt; {labels} lists the labels (with descriptions), {text} is the row's text.",
    )
    letters_instruction: str = Field(
        "Classify the text below. Answer with the letter of exactly one of these options:\n{labels}\n\n"
        "Text:\n{text}",
        description="The prompt for scoring: letters; {labels} lists the options as 'A. label' lines (with "
        "descriptions), {text} is the row's text.",
    )
    multi_label_instruction: str = Field(
        "Text:\n{text}\n\nDoes the label '{label}'{description} apply to the text above? Answer yes or no.",
        description="The per-label yes/no prompt for multi_label. With {text} before {label} every label's "
        "prompt starts with the same text, which the engine's prefix cache then computes once a row.",
    )
    examples: list[Example] = Field(default_factory=list, description="Few-shot examples.")

    @field_validator("instruction", "letters_instruction")
    @classmethod
    def _instruction_has_text(cls, v: str) -> str:
        return require_placeholders(v, "text")

    @field_validator("multi_label_instruction")
    @classmethod
    def _multi_label_instruction_has_text_and_label(cls, v: str) -> str:
        return require_placeholders(v, "text", "label")

    multi_label: bool = Field(False, description="Any subset of the labels may apply.")
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="multi_label: keep labels at or above this probability.")
    system_prompt: str | None = Field(None, description="Optional system prompt.")
    scoring: Literal["trie", "per_label", "letters"] = Field(
        "trie", description="How labels are scored. 'trie' computes the prompt once and reads each node of the "
        "labels' token trie once (one request per label at most, a decode step a node); 'per_label' runs one "
        "full prompt with prompt log-probabilities per label (K prefills a row; the same probabilities). "
        "'letters' (single-label, at most 26 labels) shows the labels as lettered options (A, B, ...; see "
        "letters_instruction) and reads one distribution over the letters: one request a row, the fastest; "
        "prefer the text scorings when the label's own words are the answer the model should give.")
    gold_column: str | None = Field(
        None, description="Graded runs: a column of the input holding each row's gold (true) label, compared as "
        "text with surrounding whitespace ignored; null or blank: the row is not graded. Results get `gold` and "
        "`correct`; metrics/ and `status` get accuracy, macro-F1, the confusion matrix and the expected "
        "calibration error, `report` a reliability diagram and the confusion matrix. A gold value that is not one "
        "of the labels is kept in `gold` with `correct` null and counted as gold_unknown, not graded. Every "
        "input shard must have the column. Single-label only.")
    abstain_below: float | None = Field(
        None, gt=0.0, lt=1.0, description="Routing for review: rows whose top label's probability (`confidence`) "
        "is under this get `review: true` (false otherwise), counted in metrics/ and `status`; unset: no "
        "`review` column. Single-label only.")

    @field_validator("labels")
    @classmethod
    def _unique(cls, v):
        names = list(v)
        if len(set(names)) != len(names):
            raise ValueError("labels must be unique")
        if any(not str(n).strip() for n in names):
            raise ValueError("labels must be non-empty text")
        return v

    @model_validator(mode="after")
    def _single_label_only(self):
        for name in ("gold_column", "abstain_below"):
            if self.multi_label and getattr(self, name) is not None:
                raise ValueError(f"{name} works with single-label classification only; drop it or multi_label")
        if self.scoring == "letters":
            if self.multi_label:
                raise ValueError("scoring: letters is for single-label classification; use 'trie' with multi_label")
            if len(self.labels) > len(LETTERS):
                raise ValueError(f"scoring: letters takes at most {len(LETTERS)} labels (got {len(self.labels)}); "
                                 f"use scoring: trie")
        return self


def softmax(logprobs: list[float]) -> list[float]:
    top = max(logprobs)
    exps = [math.exp(x - top) for x in logprobs]
    total = sum(exps)
    return [e / total for e in exps]


def computed(scored) -> int | None:
    """Prompt tokens the engine computed (not read from its prefix cache), if it says."""
    return getattr(scored, "computed_tokens", None)


GOLD_COLUMNS = ("gold", "correct")  # results columns of a graded run (gold_column)
REVIEW_COLUMN = "review"  # results column of abstain_below


def gold_text(value: Any) -> str | None:
    """A gold label as the results hold it: text, surrounding whitespace dropped; None for a
    null or blank value (the row is not graded)."""
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def label_probs(labels: list[str], probs: list[float]) -> list[dict]:
    return [{"label": label, "prob": p} for label, p in zip(labels, probs)]


class ClassifyHead(Head):
    """Labels scored on a generative Qwen3 (GenerativeEngine)."""

    name = "classify"
    Options = ClassifyOptions
    options: ClassifyOptions
    shares_prefixes = True  # every label's score extends the row's prompt

    @classmethod
    def score_method(cls, options: dict[str, Any] | None) -> str | None:
        scoring = cls.Options.model_validate(options or {}).scoring
        return "trie" if scoring == "letters" else scoring  # letters: a one-node trie

    def input_columns(self) -> list[str]:
        o = self.options
        return [o.text_column] + ([o.gold_column] if o.gold_column and o.gold_column != o.text_column else [])

    def required_any(self) -> list[str]:
        return [self.options.text_column]

    def required_all(self) -> list[str]:
        """The gold column, when graded: a misspelt name would grade nothing."""
        return [self.options.gold_column] if self.options.gold_column else []

    def result_schema(self, id_type: Any) -> Any:
        """schemas/results_classify.json; gold and correct only with gold_column, review only
        with abstain_below."""
        import pyarrow as pa

        fixed = super().result_schema(id_type)
        drop = set(GOLD_COLUMNS if self.options.gold_column is None else ()) | \
            ({REVIEW_COLUMN} if self.options.abstain_below is None else set())
        return pa.schema([f for f in fixed if f.name not in drop])

    def graded(self, row: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
        """result with the grading columns the options ask for: gold and correct (gold_column),
        review (abstain_below). The labels are those of result's label_probs."""
        o = self.options
        if o.gold_column is not None:
            gold = gold_text(row.get(o.gold_column))
            names = {d["label"] for d in result.get("label_probs") or []}
            known = gold is not None and gold in names and result.get("label") is not None
            result["gold"] = gold
            result["correct"] = (result["label"] == gold) if known else None
        if o.abstain_below is not None:
            conf = result.get("confidence")
            result["review"] = None if conf is None else conf < o.abstain_below
        return result

    @property
    def labels(self) -> list[str]:
        return list(self.options.labels)

    def _describe(self, label: str) -> str:
        desc = self.options.labels.get(label) if isinstance(self.options.labels, dict) else None
        return f": {desc}" if desc else ""

    def _turns(self, text: str) -> list[dict[str, str]]:
        o = self.options
        lettered = o.scoring == "letters"
        bullets = [f"{letter}." for letter in LETTERS] if lettered else ["-"] * len(self.labels)
        listing = "\n".join(f"{b} {label}{self._describe(label)}" for b, label in zip(bullets, self.labels))
        instruction = (o.letters_instruction if lettered else o.instruction).replace("{labels}", listing)
        turns = [{"role": "system", "content": o.system_prompt}] if o.system_prompt else []
        for ex in o.examples:
            picked = [ex.label] if isinstance(ex.label, str) else ex.label
            if lettered:
                picked = [LETTERS[self.labels.index(p)] if p in self.labels else p for p in picked]
            turns += [{"role": "user", "content": instruction.replace("{text}", ex.text)},
                      {"role": "assistant", "content": ", ".join(picked)}]
        return turns + [{"role": "user", "content": instruction.replace("{text}", text)}]

    def _answers(self, engine: Engine, answers: list[str], *, end: str = END_OF_TURN) -> list[list[int]]:
        """The answers' token ids, each ending in `end` (end-of-turn); tokenized once per engine."""
        cached_for, cache = getattr(self, "_answer_ids", (None, {}))
        if cached_for is not engine:
            cache = {}
            self._answer_ids = (engine, cache)
        key = (tuple(answers), end)
        if key not in cache:
            cache[key] = [engine.tokenize(a + end) for a in answers]
            if not end and any(len(ids) != 1 for ids in cache[key]):
                raise RowError("invalid_input", f"{', '.join(answers)}: each must be one token of this model's "
                                                f"vocabulary to be read at the answer's first token")
        return cache[key]

    def _check_fits(self, prompt: list[int], engine: Engine, longest: int) -> None:
        if len(prompt) + longest > engine.max_model_len:
            raise RowError("prompt_too_long",
                           f"the prompt has {len(prompt)} tokens; with the longest label it exceeds "
                           f"model.max_model_len {engine.max_model_len}; shorten the text or raise max_model_len")

    async def run(self, row: dict[str, Any], engine: Engine) -> dict[str, Any]:
        text = require_text(row, self.options.text_column)
        if not self.labels:
            raise RowError("invalid_input", "task.options.labels is empty; list the labels to choose from")
        # every prompt holds the text in one turn at least
        await self.refuse_oversized(engine, [text], turns=1, columns=[self.options.text_column])
        if self.options.multi_label:
            return await self._run_multi(text, engine)
        prompt = engine.render_chat(self._turns(text), enable_thinking=False)
        letters = self.options.scoring == "letters"
        # letters: one distribution, over the options' letters, at the answer's first token
        answers = (self._answers(engine, list(LETTERS[:len(self.labels)]), end="") if letters
                   else self._answers(engine, self.labels))
        self._check_fits(prompt, engine, max(map(len, answers)))
        scored = await engine.score(prompt, answers, method="trie" if letters else self.options.scoring)
        probs = softmax(scored.logprobs)
        best = max(range(len(probs)), key=probs.__getitem__)
        return self.graded(row, {
            "label": self.labels[best],
            "labels": None,
            "confidence": probs[best],
            "label_probs": label_probs(self.labels, probs),
            "prompt_tokens": scored.prompt_tokens,
            "prompt_tokens_computed": computed(scored),
            "completion_tokens": 0,
        })

    async def _run_multi(self, text: str, engine: Engine) -> dict[str, Any]:
        o = self.options
        yes, no = self._answers(engine, ["yes", "no"], end="")  # the answer's first token: one read

        async def one(label: str):
            question = (o.multi_label_instruction.replace("{label}", label)
                        .replace("{description}", self._describe(label)).replace("{text}", text))
            turns = ([{"role": "system", "content": o.system_prompt}] if o.system_prompt else []) + [
                {"role": "user", "content": question}]
            prompt = engine.render_chat(turns, enable_thinking=False)
            self._check_fits(prompt, engine, max(len(yes), len(no)))
            scored = await engine.score(prompt, [yes, no], method=o.scoring)
            return softmax(scored.logprobs)[0], scored.prompt_tokens, computed(scored)

        scored = await asyncio.gather(*(one(label) for label in self.labels))
        probs = [p for p, _, _ in scored]
        done = [c for _, _, c in scored]
        chosen = [label for label, p in zip(self.labels, probs) if p >= o.threshold]
        return {
            "label": None,
            "labels": chosen,
            "confidence": min((p for p in probs if p >= o.threshold), default=None),
            "label_probs": label_probs(self.labels, probs),
            "prompt_tokens": sum(t for _, t, _ in scored),
            "prompt_tokens_computed": None if None in done else sum(done),
            "completion_tokens": 0,
        }
