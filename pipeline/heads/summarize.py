"""Summarize head: documents of any length, split on token boundaries and reduced level by level.

A document whose prompt fits the context takes one engine call. A longer one is cut into
chunks that prefer paragraph, then sentence breaks; the chunks are summarized concurrently
and their summaries combined in groups, level by level, until one summary remains. Every
prompt is counted with the model's own tokenizer before it is sent: no call exceeds
max_model_len (prompt + max_tokens). The document is counted and cut as plain text
(engine.tokenize_text), as render_chat tokenizes it inside the prompt: a control string in it
(<|im_end|>, <think>, ...) is counted as the text it is, and kept in the chunks.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from dataclasses import dataclass
from typing import Any

from pydantic import Field, field_validator

from pipeline.heads.base import (
    COUNT_PIECE_CHARS,
    Completion,
    Engine,
    Head,
    HeadOptions,
    RowError,
    require_placeholders,
    require_text,
    text_pieces,
)
from pipeline.heads.chat import model_thinking_mode, split_reasoning, thinking_for

PARAGRAPH = re.compile(r"\n\s*\n")
SENTENCE = re.compile(r"(?<=[.!?;。！？；])\s+|(?<=[。！？；])")


class SummarizeOptions(HeadOptions):
    text_column: str = Field("text", description="Column holding the document.")
    max_tokens: int = Field(256, ge=8, description="Longest summary, in tokens (each call).")
    instruction: str = Field(
        "Summarize the following document. Keep the key facts, names and numbers.\n\n{text}",
        description="Prompt for a document that fits in one call; {text} is the document.",
    )
    map_instruction: str = Field(
        "Summarize this part of a longer document. Keep the key facts, names and numbers.\n\n{text}",
        description="Prompt for one chunk of a long document.",
    )
    reduce_instruction: str = Field(
        "These are summaries of consecutive parts of one document. Combine them into one "
        "summary of the whole document, keeping the key facts, names and numbers.\n\n{text}",
        description="Prompt that merges summaries; {text} is the summaries, in order.",
    )
    chunk_overlap: int = Field(
        0, ge=0, description="Tokens of each chunk's end repeated at the start of the next."
    )
    system_prompt: str | None = Field(None, description="Optional system prompt for every call.")
    enable_thinking: bool | None = Field(
        None, description="Qwen3 thinking mode (off: faster, cheaper); unset: off, unless the checkpoint always "
        "thinks (Thinking-2507). The reasoning is never part of a summary.")
    temperature: float = Field(0.7, ge=0.0, le=2.0, description="Default temperature (sampling.* wins).")

    @field_validator("instruction", "map_instruction", "reduce_instruction")
    @classmethod
    def _has_text(cls, v: str) -> str:
        return require_placeholders(v, "text")


@dataclass
class _Tally:
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class SummarizeHead(Head):
    name = "summarize"
    Options = SummarizeOptions
    options: SummarizeOptions

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.thinking = bool(self.options.enable_thinking)

    def use_model(self, config: Any) -> None:
        """Think as the checkpoint's chat template allows (chat.thinking_for)."""
        self.thinking = thinking_for(model_thinking_mode(config), self.options.enable_thinking)

    def input_columns(self) -> list[str]:
        return [self.options.text_column]

    def _messages(self, instruction: str, text: str) -> list[dict[str, str]]:
        o = self.options
        user = {"role": "user", "content": instruction.replace("{text}", text)}
        return ([{"role": "system", "content": o.system_prompt}] if o.system_prompt else []) + [user]

    def _prompt(self, engine: Engine, instruction: str, text: str) -> list[int]:
        return engine.render_chat(self._messages(instruction, text), enable_thinking=self.thinking)

    def _budget(self, engine: Engine, instruction: str, max_tokens: int) -> int:
        """Tokens of text that fit in one call beside the instruction and the output."""
        return engine.max_model_len - len(self._prompt(engine, instruction, "")) - max_tokens

    async def _call(self, engine: Engine, instruction: str, text: str, sampling: dict,
                    tally: _Tally) -> Completion:
        prompt = self._prompt(engine, instruction, text)
        if len(prompt) + sampling["max_tokens"] > engine.max_model_len:
            raise AssertionError("chunk does not fit")  # _fit_chunk guarantees it; never sent
        done = await engine.generate(prompt, sampling)
        tally.calls += 1
        tally.prompt_tokens += done.prompt_tokens
        tally.completion_tokens += done.completion_tokens
        return done

    def _text(self, done: Completion) -> str:
        return split_reasoning(done.text)[1] if self.thinking else done.text.strip()

    async def run(self, row: dict[str, Any], engine: Engine) -> dict[str, Any]:
        o = self.options
        doc = require_text(row, o.text_column)
        # chunked, so a document of any length fits the context: only max_chars bounds it
        await self.refuse_oversized(engine, [doc], turns=None, columns=[o.text_column])
        sampling = {"temperature": o.temperature, "top_p": 0.8, "top_k": 20, "max_tokens": o.max_tokens}
        sampling.update(self.sampling)
        max_tokens = sampling["max_tokens"]
        tally = _Tally()
        reduce_budget = self._budget(engine, o.reduce_instruction, max_tokens)
        map_budget = self._budget(engine, o.map_instruction, max_tokens) - o.chunk_overlap
        if reduce_budget < 2 * max_tokens + 16 or map_budget < 16:
            raise RowError("prompt_too_long",
                           f"model.max_model_len {engine.max_model_len} leaves no room to summarize "
                           f"with max_tokens {max_tokens}; raise max_model_len or lower max_tokens")
        single_budget = self._budget(engine, o.instruction, max_tokens)
        input_tokens = await count_tokens(engine, doc)
        # Only a document near the budget needs its whole prompt counted exactly.
        whole = self._prompt(engine, o.instruction, doc) if input_tokens <= single_budget + 16 else None
        if whole is not None and len(whole) + max_tokens <= engine.max_model_len:
            done = await self._call(engine, o.instruction, doc, sampling, tally)
            summary, n_chunks, levels = self._text(done), 1, 1
        else:
            chunks = await split_text_paced(doc, engine, map_budget, overlap=o.chunk_overlap,
                                            fits=lambda t: len(self._prompt(engine, o.map_instruction, t))
                                            + max_tokens <= engine.max_model_len)
            outs = await asyncio.gather(*(self._call(engine, o.map_instruction, c, sampling, tally)
                                          for c in chunks))
            summaries, n_chunks, levels = [self._text(d) for d in outs], len(chunks), 1
            done = outs[-1]
            while len(summaries) > 1:
                groups = self._groups(engine, summaries, max_tokens)
                outs = await asyncio.gather(*(self._call(engine, o.reduce_instruction, g, sampling, tally)
                                              for g in groups))
                summaries, levels, done = [self._text(d) for d in outs], levels + 1, outs[-1]
            summary = summaries[0]
        return {
            "summary": summary,
            "input_tokens": input_tokens,
            "n_chunks": n_chunks,
            "levels": levels,
            "calls": tally.calls,
            "prompt_tokens": tally.prompt_tokens,
            "completion_tokens": tally.completion_tokens,
            "finish_reason": done.finish_reason,
        }

    def _groups(self, engine: Engine, summaries: list[str], max_tokens: int) -> list[str]:
        """Consecutive summaries joined into as few reduce prompts as fit; always progresses."""
        o = self.options

        def fits(text: str) -> bool:
            return len(self._prompt(engine, o.reduce_instruction, text)) + max_tokens <= engine.max_model_len

        groups: list[str] = []
        for s in summaries:
            if groups and fits(groups[-1] + "\n\n" + s):
                groups[-1] += "\n\n" + s
            else:
                groups.append(s)
        if len(groups) == len(summaries):  # no two fit together: keep the first half of each
            half = self._budget(engine, o.reduce_instruction, max_tokens) // 2 - 8
            trimmed = [_token_windows(s, engine, half)[0] if s else "" for s in summaries]
            groups = ["\n\n".join(trimmed[i:i + 2]) for i in range(0, len(trimmed), 2)]
        return groups


# Characters of tokenizer work between two turns of the event loop: a document's counting and
# cutting never holds the loop (the other rows on the replica, the row timeout) for long.
PACE_CHARS = COUNT_PIECE_CHARS


async def count_tokens(engine: Engine, text: str) -> int:
    """Tokens of text as plain text, counted PACE_CHARS characters at a time (cut before a
    space, where a byte-level tokenizer starts a new word anyway, so the count is the whole
    text's), letting the event loop run between pieces."""
    total = 0
    for i, piece in enumerate(text_pieces(text, PACE_CHARS)):
        if i:
            await asyncio.sleep(0)
        total += len(engine.tokenize_text(piece))
    return total


def split_text(text: str, engine: Engine, budget: int, *, overlap: int, fits) -> list[str]:
    """Cut text into chunks of at most `budget` tokens, preferring paragraph, then sentence,
    then token boundaries; `fits(chunk)` has the last word (it counts the real prompt).
    Linear in the text's length, in one go (the head uses split_text_paced)."""
    steps = _splitting(text, engine, budget, overlap=overlap, fits=fits)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


async def split_text_paced(text: str, engine: Engine, budget: int, *, overlap: int, fits) -> list[str]:
    """split_text, letting the event loop run after every PACE_CHARS characters of work: a
    long document holds back neither the other rows nor its own row timeout."""
    steps, work = _splitting(text, engine, budget, overlap=overlap, fits=fits), 0
    while True:
        try:
            work += next(steps)
        except StopIteration as done:
            return done.value
        if work >= PACE_CHARS:
            work = 0
            await asyncio.sleep(0)


def _splitting(text: str, engine: Engine, budget: int, *, overlap: int, fits):
    """split_text's work, step by step: yields the characters each step tokenized, returns the
    chunks. Each piece is tokenized on its own, at most PACE_CHARS characters at once, and
    chunks are packed by adding counts (the real prompt of every chunk is counted once more by
    `fits` below), so the work stays linear."""
    budget -= 4  # slack for tokens that merge across the joins
    units: list[tuple[str, int]] = []
    for para in _keep_split(PARAGRAPH, text):
        if len(para) <= PACE_CHARS:
            n = len(engine.tokenize_text(para))
            yield len(para)
            if n <= budget:
                units.append((para, n))
                continue
        for sent in _keep_split(SENTENCE, para):
            for piece in text_pieces(sent, PACE_CHARS):
                n = len(engine.tokenize_text(piece))
                yield len(piece)
                if n <= budget:
                    units.append((piece, n))
                    continue
                for window in _token_windows(piece, engine, budget):
                    units.append((window, len(engine.tokenize_text(window))))
                    yield len(window)
    chunks: list[str] = []
    cur: list[str] = []
    cur_n = 0
    for unit, n in units:
        if cur and cur_n + n > budget:
            chunks.append("".join(cur))
            cur, cur_n = [], 0
        cur.append(unit)
        cur_n += n
    if cur:
        chunks.append("".join(cur))
    if overlap:
        overlapped = chunks[:1]
        for prev, chunk in zip(chunks, chunks[1:]):
            overlapped.append(_tail(prev, engine, overlap) + chunk)
            yield len(prev)
        chunks = overlapped
    # Joined text can tokenize a token or two longer than its parts: a chunk that does not
    # fit the real prompt is halved, never truncated.
    out: list[str] = []
    pending = deque(c for c in chunks if c.strip())
    while pending:
        chunk = pending.popleft()
        fit = fits(chunk)
        yield len(chunk)
        if fit:
            out.append(chunk)
        else:
            n = len(engine.tokenize_text(chunk))
            pending.extendleft(reversed(_token_windows(chunk, engine, max(4, n // 2 + 1))))
            yield len(chunk)
    return out or [text]


def _keep_split(pattern: re.Pattern, text: str) -> list[str]:
    """Split after each match, keeping the separators with the piece before them."""
    pieces, last = [], 0
    for m in pattern.finditer(text):
        if m.end() > last:
            pieces.append(text[last:m.end()])
            last = m.end()
    if last < len(text):
        pieces.append(text[last:])
    return [p for p in pieces if p]


def _clean_cut(engine: Engine, ids: list[int], cut: int) -> bool:
    """Whether cutting ids before index cut keeps every character whole. Cut inside a
    character, the tokens before it decode to a replacement character at the end and those
    after it to one at the start, and the two decoded apart differ from the text decoded
    together; a real U+FFFD in the text reads the same both ways. A character is at most 4
    bytes, so 4 tokens each side decide."""
    if cut >= len(ids):
        return True
    before, after = engine.decode(ids[max(0, cut - 4):cut]), engine.decode(ids[cut:cut + 4])
    if not (before.endswith("\ufffd") and after.startswith("\ufffd")):
        return True
    return engine.decode(ids[max(0, cut - 4):cut + 4]) == before + after


def _token_windows(text: str, engine: Engine, budget: int) -> list[str]:
    """Consecutive windows of at most `budget` tokens that never split a character (unless
    no token boundary in a whole window falls between characters: then one is cut). Each
    window is decoded once and each cut checked on a few tokens, so the work is linear."""
    ids = engine.tokenize_text(text)
    out, start = [], 0
    while start < len(ids):
        end = min(start + budget, len(ids))
        cut = next((c for c in range(end, start, -1) if _clean_cut(engine, ids, c)), end)
        out.append(engine.decode(ids[start:cut]))
        start = cut
    return out


def _tail(text: str, engine: Engine, n: int) -> str:
    ids = engine.tokenize_text(text)
    tail = engine.decode(ids[-n:])
    return tail.lstrip("\ufffd")
