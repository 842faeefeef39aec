"""Token ids of prompts: Qwen3's chat template rendered with every control string inside
content kept as text, and untrusted text tokenized by the vocabulary alone."""

from __future__ import annotations

import functools
import re
import unicodedata
import uuid


@functools.lru_cache(maxsize=4)
def _special_texts(tokenizer) -> tuple[str, ...]:
    """Texts of every control token: those marked special (<|im_start|>, <|im_end|>,
    <|endoftext|>, ...) and the other added ones (<think>, </think>, <tool_call>, <|fim_*|>,
    ...), which the tokenizer matches in text whatever split_special_tokens says."""
    return tuple(t.content for t in tokenizer.added_tokens_decoder.values())


def plain_text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of text by the vocabulary alone (normalizer, pre-tokenizer, BPE), without
    matching added tokens: every control string in it stays text."""
    backend = tokenizer.backend_tokenizer
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    pieces = backend.pre_tokenizer.pre_tokenize_str(text) if backend.pre_tokenizer else [(text, None)]
    return [t.id for piece, _ in pieces for t in backend.model.tokenize(piece)]


@functools.lru_cache(maxsize=4)
def _plain_tokenizer(tokenizer):
    """The tokenizer's own pipeline (normalizer, pre-tokenizer, BPE model) without its added
    tokens: the ids plain_text_ids computes. Built once per tokenizer and never changed after
    (safe to share between threads)."""
    from tokenizers import Tokenizer

    backend = tokenizer.backend_tokenizer
    plain = Tokenizer(backend.model)
    for part in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        if getattr(backend, part) is not None:
            setattr(plain, part, getattr(backend, part))
    return plain


def plain_text_tokens(tokenizer, text: str) -> list[int]:
    """plain_text_ids, computed in one call of the tokenizer's Rust pipeline (no Python loop
    over pre-tokens): for long untrusted text (a document to count or cut)."""
    return list(_plain_tokenizer(tokenizer).encode(text, add_special_tokens=False).ids)


def _normalized_spans(normalizer, text: str) -> tuple[str, list[tuple[int, int]]]:
    """The normalized text and, for each of its characters, the span of text it comes from.

    The tokenizers library's own offsets are wrong here (tokenizers 0.23 gives "caf" of
    "café" the span (0, 2)), so the alignment is computed: text is cut before each character
    that does not compose with what precedes it, and each piece is normalized alone; a piece
    whose normalization changes it maps all its normalized characters to the whole piece."""
    norm = normalizer.normalize_str if normalizer is not None else None
    if norm is None or norm(text) == text:  # already normalized (most text): one to one
        return text, [(i, i + 1) for i in range(len(text))]
    pieces: list[tuple[int, int]] = []
    for i, ch in enumerate(text):
        if pieces and (unicodedata.combining(ch) or norm(text[pieces[-1][0]:i + 1])
                       != norm(text[pieces[-1][0]:i]) + norm(ch)):
            pieces[-1] = (pieces[-1][0], i + 1)
        else:
            pieces.append((i, i + 1))
    out, spans = [], []
    for a, b in pieces:
        piece = norm(text[a:b])
        out.append(piece)
        spans += [(a + k, a + k + 1) for k in range(b - a)] if piece == text[a:b] else [(a, b)] * len(piece)
    normalized = "".join(out)
    if normalized != norm(text):  # not normalizable piece by piece: every character spans all
        normalized = norm(text)
        spans = [(0, len(text))] * len(normalized)
    return normalized, spans


def plain_text_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of text by the vocabulary alone (plain_text_ids: every control string in it
    stays text), with each token's (start, end) character span in the ORIGINAL text, before
    the normalizer's NFC ("e\u0301" is one token spanning both characters). A token holding
    part of a character's bytes spans that whole character (its neighbour shares it).

    The whole text goes through the pipeline as if the added tokens did not exist, as in a
    chat message (render_chat): cutting it at control strings first would give other ids
    (the pre-tokenizer joins ".</" or " <|" into one piece), so that is not the definition."""
    backend = tokenizer.backend_tokenizer
    normalized, spans = _normalized_spans(backend.normalizer, text)
    pieces = (backend.pre_tokenizer.pre_tokenize_str(normalized) if backend.pre_tokenizer
              else [(normalized, (0, len(normalized)))])
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    for piece, (start, end) in pieces:
        # Byte-level pieces: one piece character per byte of the normalized text; the model's
        # offsets count the piece's own UTF-8 bytes (its characters take one or two).
        char_of_byte = [start + k for k, ch in enumerate(normalized[start:end])
                        for _ in range(len(ch.encode()))]
        assert len(char_of_byte) == len(piece), "not a byte-level tokenizer"
        char_of = [char_of_byte[k] for k, ch in enumerate(piece) for _ in range(len(ch.encode()))]
        for t in backend.model.tokenize(piece):
            first, last = char_of[t.offsets[0]], char_of[t.offsets[1] - 1]
            ids.append(t.id)
            offsets.append((spans[first][0], spans[last][1]))
    return ids, offsets


def render_chat(tokenizer, messages: list[dict[str, str]], *, enable_thinking: bool,
                tools: list[dict] | None = None) -> list[int]:
    """Prompt token ids of a conversation, with control tokens inside messages kept as text.

    A scraped page that contains "<|im_start|>system" (or "</think>") must not open a new turn:
    contents that hold any control token's text are tokenized apart by the vocabulary alone
    (plain_text_ids), and the template is rendered around placeholders for them.
    """
    specials = _special_texts(tokenizer)
    escaped = {i: m["content"] for i, m in enumerate(messages)
               if any(t in m["content"] for t in specials)}
    nonce = uuid.uuid4().hex
    shown = [{**m, "content": f"<{nonce}:{i}>"} if i in escaped else m for i, m in enumerate(messages)]
    text = tokenizer.apply_chat_template(shown, tools=tools or None, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=enable_thinking)
    if not escaped:
        return tokenizer.encode(text, add_special_tokens=False)
    ids: list[int] = []
    for n, piece in enumerate(re.split(f"<{nonce}:(\\d+)>", text)):  # odd pieces are placeholder numbers
        if n % 2:
            ids += plain_text_ids(tokenizer, escaped[int(piece)])
        elif piece:
            ids += tokenizer.encode(piece, add_special_tokens=False)
    return ids
