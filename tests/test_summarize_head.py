"""Summarize head's split/reduce logic on a scripted engine handle with the real Qwen3
tokenizer and chat template (no vLLM): every call fits, nothing of the document is lost."""

import asyncio
import math

import pytest

from pipeline.heads.base import RowError
from pipeline.heads.summarize import SummarizeHead, split_text
from pipeline.testing import FakeEngine


def real_engine(tokenizer, max_model_len=512):
    """The fake engine with the real tokenizer and template; a summary is all of max_tokens."""
    return FakeEngine(tokenizer=tokenizer, max_model_len=max_model_len, answer_tokens=None)


def summarize(engine, doc, **options):
    head = SummarizeHead({"max_tokens": 32, **options})
    return asyncio.run(head.run({"text": doc}, engine))


def paragraphs(n_tokens_total, tokenizer):
    """Paragraphs of sentences, about n_tokens_total tokens long."""
    sent = "The river carries silt from the mountains to the delta. "
    paras, total = [], 0
    while total < n_tokens_total:
        p = sent * 5
        paras.append(p.strip())
        total += len(tokenizer.encode(p + "\n\n", add_special_tokens=False))
    return "\n\n".join(paras)


def assert_all_calls_fit(engine):
    assert engine.calls
    for prompt, sampling in zip(engine.prompts, engine.calls):
        assert prompt + sampling["max_tokens"] <= engine.max_model_len


def test_short_document_takes_one_call(tokenizer):
    eng = real_engine(tokenizer)
    out = summarize(eng, "A short note about owls.")
    assert (out["n_chunks"], out["levels"], out["calls"]) == (1, 1, 1) and len(eng.calls) == 1
    assert out["input_tokens"] == len(tokenizer.encode("A short note about owls.", add_special_tokens=False))
    assert out["prompt_tokens"] == eng.prompts[0] and out["completion_tokens"] == 32
    assert out["finish_reason"] == "length"


def test_exactly_the_budget_fits_and_one_more_token_splits(tokenizer):
    doc = paragraphs(300, tokenizer)
    probe = real_engine(tokenizer, max_model_len=10_000)
    summarize(probe, doc)
    exact = probe.prompts[0] + 32
    eng = real_engine(tokenizer, max_model_len=exact)
    assert summarize(eng, doc)["calls"] == 1
    eng = real_engine(tokenizer, max_model_len=exact - 1)
    out = summarize(eng, doc)
    assert out["n_chunks"] >= 2 and out["levels"] >= 2
    assert_all_calls_fit(eng)


@pytest.mark.parametrize("factor", [0.5, 2, 5, 20])
def test_documents_of_any_length_fit_every_call(tokenizer, factor):
    eng = real_engine(tokenizer, max_model_len=512)
    doc = paragraphs(int(512 * factor), tokenizer)
    out = summarize(eng, doc)
    assert_all_calls_fit(eng)
    map_budget = 512 - 32 - len(eng.render_chat(
        [{"role": "user", "content": SummarizeHead.Options().map_instruction.replace("{text}", "")}],
        enable_thinking=False))
    if out["n_chunks"] > 1:
        assert out["n_chunks"] >= math.ceil(out["input_tokens"] / map_budget)
        assert out["n_chunks"] <= 2 * math.ceil(out["input_tokens"] / map_budget) + 1
    assert out["calls"] == len(eng.calls)
    assert out["prompt_tokens"] == sum(eng.prompts)
    if factor >= 20:
        assert out["levels"] >= 3


def test_one_paragraph_longer_than_a_chunk_is_cut_on_tokens_and_kept_whole(tokenizer):
    doc = "word" + " and more" * 800  # no paragraph or sentence break
    eng = real_engine(tokenizer, max_model_len=256)
    chunks = split_text(doc, eng, 100, overlap=0, fits=lambda t: len(eng.tokenize(t)) <= 100)
    assert len(chunks) > 10 and "".join(chunks) == doc
    assert all(len(eng.tokenize(c)) <= 100 for c in chunks)


def test_sentences_are_preferred_over_token_cuts(tokenizer):
    doc = " ".join(f"Sentence number {i} ends here." for i in range(200))
    eng = real_engine(tokenizer)
    chunks = split_text(doc, eng, 80, overlap=0, fits=lambda t: len(eng.tokenize(t)) <= 80)
    assert "".join(chunks) == doc
    assert all(c.rstrip().endswith("here.") for c in chunks[:-1])


def test_cjk_and_emoji_are_never_split_inside_a_character(tokenizer):
    doc = "长文档摘要测试。" * 300 + "🙂🚀" * 200 + "日本語のテキスト" * 100
    eng = real_engine(tokenizer, max_model_len=256)
    chunks = split_text(doc, eng, 50, overlap=0, fits=lambda t: len(eng.tokenize(t)) <= 50)
    assert "".join(chunks) == doc
    assert not any("\ufffd" in c for c in chunks)
    out = summarize(eng, doc)
    assert out["n_chunks"] > 1
    assert_all_calls_fit(eng)


def test_overlap_repeats_the_end_of_the_previous_chunk(tokenizer):
    doc = paragraphs(2000, tokenizer)
    eng = real_engine(tokenizer)
    plain = split_text(doc, eng, 200, overlap=0, fits=lambda t: True)
    overlapped = split_text(doc, eng, 200, overlap=20, fits=lambda t: True)
    assert len(overlapped) == len(plain)
    for prev, cur in zip(plain, overlapped[1:]):
        tail = eng.decode(eng.tokenize(prev)[-20:])
        assert cur.startswith(tail)


@pytest.mark.parametrize("doc, fragment", [(None, "is null"), ("  \n\t ", "empty or whitespace"),
                                           (42, "holds int")])
def test_bad_documents_are_invalid_input(tokenizer, doc, fragment):
    with pytest.raises(RowError) as e:
        summarize(real_engine(tokenizer), doc)
    assert e.value.error_type == "invalid_input" and fragment in e.value.message


def test_summary_length_too_big_for_the_context_is_explained(tokenizer):
    with pytest.raises(RowError) as e:
        summarize(real_engine(tokenizer, max_model_len=128), "x " * 500, max_tokens=64)
    assert e.value.error_type == "prompt_too_long" and "lower max_tokens" in e.value.message


def test_a_long_document_is_counted_in_pieces_as_in_one_go(tokenizer):
    """input_tokens of a document longer than one counting piece (64K characters) is the
    tokenizer's count of the whole document."""
    doc = paragraphs(70_000, tokenizer) + " Ünïcödé 🙂 e\u0301 and   spaces." * 2_000
    assert len(doc) > 4 * (1 << 16)
    out = summarize(real_engine(tokenizer, max_model_len=4096), doc)
    assert out["input_tokens"] == len(tokenizer.encode(doc, add_special_tokens=False))
