"""No row can hang a replica (issue 27, items 3 and 9): chunking is linear on any input, a
row's own CPU work is bounded by the row timeout, and every head refuses an over-long row as
one error row by the same rule (task.options.max_chars)."""

import asyncio
import contextlib
import signal
import time

import pyarrow as pa
import pytest

from jobs import job_spec
from pipeline import worker as worker_module
from pipeline.checkpoint import resolve
from pipeline.heads import head_class
from pipeline.heads.base import RowError
from pipeline.heads.summarize import SummarizeHead, split_text
from pipeline.io.shard_column import SHARD_COLUMN
from pipeline.testing import FakeEngine, FakeQaEngine
from pipeline.worker import InferenceWorker, worker_settings

pytestmark = pytest.mark.unit

FFFD = "\ufffd"


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail (TimeoutError) instead of hanging when the block runs longer than seconds."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


PATHOLOGICAL = {
    "replacement characters": FFFD * 200_000,
    "mixed with text": ("A normal sentence about rivers. " * 300 + FFFD * 150_000 + "\n\n") * 2
                       + "é🙂" + FFFD * 150_001 + " the end.",
}


@pytest.mark.parametrize("budget", [32_000, 1_000])  # a 32K context's chunks, and small ones
@pytest.mark.parametrize("kind", list(PATHOLOGICAL))
def test_chunking_a_long_run_of_replacement_characters_is_fast_and_loses_nothing(tokenizer, kind, budget):
    doc = PATHOLOGICAL[kind]
    eng = FakeEngine(tokenizer=tokenizer, max_model_len=32_768, record=False)

    def tokens(text):
        return len(eng.tokenize_text(text))

    started = time.monotonic()
    with deadline(30):
        chunks = split_text(doc, eng, budget, overlap=0, fits=lambda t: tokens(t) <= budget)
    assert time.monotonic() - started < 10
    assert "".join(chunks) == doc
    assert all(tokens(c) <= budget for c in chunks)
    assert len(chunks) >= -(-tokens(doc) // budget)


def test_summarizing_replacement_characters_at_a_32k_context_ends_with_every_call_fitting(tokenizer):
    eng = FakeEngine(tokenizer=tokenizer, max_model_len=32_768, answer_tokens=None)
    with deadline(60):
        out = asyncio.run(SummarizeHead({"max_tokens": 64}).run({"text": PATHOLOGICAL["mixed with text"]}, eng))
    assert out["n_chunks"] >= 2 and out["calls"] == len(eng.calls)
    assert all(p + s["max_tokens"] <= 32_768 for p, s in zip(eng.prompts, eng.calls))


def run_block(worker, rows):
    async def collect():
        return [t async for t in worker(pa.Table.from_pylist(rows))]

    return {r["id"]: r for t in asyncio.run(collect()) for r in t.to_pylist()}


def test_a_row_whose_own_cpu_work_outlasts_the_row_timeout_becomes_an_error_row(tmp_path, tiny_model, tokenizer,
                                                                             monkeypatch):
    """The worker's row timeout covers the head's own work (counting and cutting a long
    document), not only its engine calls: the row ends at the deadline and its batch goes on."""
    # outside a Ray actor (asking Ray would start one)
    monkeypatch.setattr(worker_module, "_reconstructed", lambda: False)
    monkeypatch.setattr(worker_module, "_node_id", lambda: "local")
    spec = job_spec(tmp_path, model=tiny_model, head="summarize", sampling={"max_tokens": 16},
                    resources={"row_timeout_s": 1, "batch_size": 2})
    worker = InferenceWorker(**worker_settings(spec, resolve(spec).head), id_type=pa.int64(), engine_args={},
                             device="cpu",
                             engine_factory=lambda args, device: FakeEngine(tokenizer=tokenizer, max_model_len=2048,
                                                                             record=False))
    # about 4M characters: several seconds of tokenizing and cutting on one core
    long_doc = "\n\n".join("The river carries silt from the mountains to the delta. " * 70 for _ in range(1000))
    rows = [{"id": 1, "text": long_doc, SHARD_COLUMN: "a.parquet"},
            {"id": 2, "text": "A short note about owls.", SHARD_COLUMN: "a.parquet"}]
    started = time.monotonic()
    with deadline(120):
        out = run_block(worker, rows)
    assert time.monotonic() - started < 3
    assert out[1]["error_type"] == "engine_timeout"
    assert "within 1 s (resources.row_timeout_s), or the row's own work" in out[1]["error_message"]
    assert out[2]["error_type"] is None and out[2]["summary"]


# One over-long row and one ordinary row for every head: (head, options, ordinary row, the
# over-long row's text column, engine)
def qa_engine():
    return FakeQaEngine()


HEADS = {
    "chat": ({}, {"prompt": "hello there"}, "prompt", FakeEngine),
    "summarize": ({}, {"text": "A short note about owls."}, "text", FakeEngine),
    "classify": ({"labels": ["a", "b"]}, {"text": "a fine text"}, "text", FakeEngine),
    "classify multi_label": ({"labels": ["a", "b"], "multi_label": True}, {"text": "a fine text"}, "text", FakeEngine),
    "extract": ({"fields": {"name": "string"}}, {"text": "Ada wrote it."}, "text", FakeEngine),
    "embed": ({}, {"text": "a fine text"}, "text", FakeEngine),
    "rerank": ({}, {"query": "owls", "document": "Owls hunt at night."}, "document", FakeEngine),
    "qa": ({}, {"question": "Who?", "context": "Ada wrote it."}, "context", qa_engine),
    "qa generate": ({"mode": "generate"}, {"question": "Who?", "context": "Ada wrote it."}, "context", FakeEngine),
}


def _head(name, options):
    return head_class(name.split()[0])(options)


@pytest.mark.parametrize("name", list(HEADS))
def test_every_head_refuses_a_row_over_max_chars_as_one_error_row(name):
    options, ordinary, column, make_engine = HEADS[name]
    head = _head(name, {**options, "max_chars": 5_000})
    engine = make_engine()
    engine.max_model_len = 1 << 20  # the context would hold it: max_chars is what refuses it
    engine.answer = '{"name": "Ada"}' if name == "extract" else None
    over = {**ordinary, column: "word " * 1_001}

    async def batch():
        return await asyncio.gather(*(head.run(r, engine) for r in (ordinary, over, ordinary)),
                                    return_exceptions=True)

    first, refused, last = asyncio.run(batch())
    assert isinstance(first, dict) and isinstance(last, dict), (first, last)
    assert isinstance(refused, RowError) and refused.error_type == "invalid_input"
    chars = sum(len(v) for v in over.values())  # all the row's texts together
    assert (f"'{column}'" in refused.message and f"has {chars:,} characters" in refused.message
            and "more than task.options.max_chars 5,000" in refused.message
            and "raise task.options.max_chars" in refused.message), refused.message


@pytest.mark.parametrize("name", list(HEADS))
def test_a_huge_row_is_refused_before_any_of_it_is_tokenized(name):
    """The default bound: a 50 MB row fails at once, whatever the head and the context."""
    options, ordinary, column, make_engine = HEADS[name]
    engine = make_engine()
    engine.max_model_len = 1 << 20
    started = time.monotonic()
    with pytest.raises(RowError) as e:
        asyncio.run(_head(name, options).run({**ordinary, column: "x" * 50_000_000}, engine))
    assert time.monotonic() - started < 1
    assert e.value.error_type == "invalid_input" and "task.options.max_chars 4,000,000" in e.value.message
    assert engine.tokenized == 0
