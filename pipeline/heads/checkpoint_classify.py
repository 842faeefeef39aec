"""Classification checkpoints' own heads, on the pooling engine: a *ForSequenceClassification
checkpoint gives class probabilities, a *ForTokenClassification checkpoint a label per token.
`task.head: classify` runs them on such checkpoints (pipeline.heads.VARIANTS).

The row's text is the whole prompt, tokenized as plain text (engine.tokenize_text /
token_offsets): a control string in it (<|im_end|>, <think>, <|fim_prefix|>, ...) stays text,
as in a chat-templated prompt. The label names are the checkpoint's (engine.id2label).
"""

from __future__ import annotations

from typing import Any

from pipeline.heads.base import PoolingEngine, RowError, require_text
from pipeline.heads.classify import ClassifyHead, label_probs


def _fits(n: int, engine: PoolingEngine) -> None:
    if n > engine.max_model_len:
        raise RowError("prompt_too_long", f"the text has {n} tokens but model.max_model_len "
                                          f"is {engine.max_model_len}; shorten it or raise max_model_len")


class SequenceClassifyHead(ClassifyHead):
    """A label for the whole text, with every class's probability (engine.classify)."""

    async def run(self, row: dict[str, Any], engine: PoolingEngine) -> dict[str, Any]:
        text = require_text(row, self.options.text_column)
        await self.refuse_oversized(engine, [text], turns=0, columns=[self.options.text_column])
        prompt = engine.tokenize_text(text)  # untrusted: control strings stay text
        _fits(len(prompt), engine)
        probs = await engine.classify(prompt)
        names = [engine.id2label[i] for i in range(len(probs))]
        best = max(range(len(probs)), key=probs.__getitem__)
        return self.graded(row, {
            "label": names[best],
            "labels": None,
            "confidence": probs[best],
            "label_probs": label_probs(names, probs),
            "prompt_tokens": len(prompt),
            "completion_tokens": 0,
        })


class TokenClassifyHead(ClassifyHead):
    """A label per token and the entities they spell (engine.classify_tokens)."""

    async def run(self, row: dict[str, Any], engine: PoolingEngine) -> dict[str, Any]:
        text = require_text(row, self.options.text_column)
        await self.refuse_oversized(engine, [text], turns=0, columns=[self.options.text_column])
        ids, offsets = engine.token_offsets(text)  # as tokenize_text, spans in text as given
        _fits(len(ids), engine)
        per_token = await engine.classify_tokens(ids)
        labels = [engine.id2label[max(range(len(p)), key=p.__getitem__)] for p in per_token]
        return {
            "label": None, "labels": None, "confidence": None, "label_probs": None,
            "token_labels": labels,
            "entities": entities(text, labels, offsets),
            "prompt_tokens": len(ids),
            "completion_tokens": 0,
        }


def entities(text: str, labels: list[str], offsets: list[tuple[int, int]]) -> list[dict]:
    """Spans of consecutive tokens with the same entity label; BIO prefixes (B-, I-) are read,
    and O (or "outside") tokens end a span."""
    spans: list[dict] = []
    for label, (start, end) in zip(labels, offsets):
        kind = label[2:] if label[:2] in ("B-", "I-") else label
        if kind in ("O", "outside") or end <= start:
            continue
        prev = spans[-1] if spans else None
        if prev and prev["label"] == kind and not label.startswith("B-") and text[prev["end"]:start].strip() == "":
            prev["end"] = end
        else:
            spans.append({"label": kind, "start": start, "end": end})
    for sp in spans:
        # Byte-level tokens carry their leading space: trim it from the span.
        while sp["start"] < sp["end"] and text[sp["start"]].isspace():
            sp["start"] += 1
        sp["text"] = text[sp["start"]:sp["end"]]
    return spans
