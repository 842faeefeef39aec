"""Summarize jobs on the real vLLM CPU engine with the tiny Qwen3 and a 512-token context:
documents from half to twenty times the context, every call recorded and checked."""

import json
import math

import pyarrow as pa
import pytest
from conftest import read_dir, write_shards

from pipeline.runner import run_job
from pipeline.spec import load_spec
from pipeline.testing import recording_engine_factory

MAX_LEN, SUMMARY = 512, 32


def document(n_tokens, tokenizer, seed):
    sentences = [f"Clause {seed}.{i} says the tenant pays {i * 7} euros by day {i % 28 + 1}. "
                 for i in range(4000)]
    out, total, i = [], 0, 0
    while total < n_tokens:
        para = "".join(sentences[i:i + 4])
        i += 4
        out.append(para)
        total += len(tokenizer.encode(para + "\n\n", add_special_tokens=False))
    return "\n\n".join(out)


@pytest.fixture(scope="module")
def summarize_job(tiny_model, tokenizer, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("summarize")
    factors = {"half": 0.5, "x2": 2, "x5": 5, "x20": 20}
    docs = {k: document(int(MAX_LEN * f), tokenizer, i) for i, (k, f) in enumerate(factors.items())}
    rows = [{"id": k, "text": v} for k, v in docs.items()]
    rows += [{"id": "empty", "text": ""}, {"id": "blank", "text": " \n\t"}, {"id": "null", "text": None}]
    write_shards(tmp / "in", [rows[:4], rows[4:]], pa.schema([("id", pa.string()), ("text", pa.string())]))
    spec = load_spec(data={
        "input": {"path": str(tmp / "in")}, "output": {"path": str(tmp / "out")},
        "model": {"source": str(tiny_model), "max_model_len": MAX_LEN, "dtype": "float32",
                  "engine_kwargs": {"enforce_eager": True}},
        "task": {"head": "summarize", "options": {"max_tokens": SUMMARY}},
        "sampling": {"temperature": 0},
    })
    log = tmp / "calls.jsonl"
    report = run_job(spec, progress=False, engine_factory=recording_engine_factory(str(log)))
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    return tmp, docs, report, calls


def test_every_document_is_summarized_or_explained(summarize_job):
    tmp, docs, report, _ = summarize_job
    results = {r["id"]: r for r in read_dir(tmp / "out" / "results").to_pylist()}
    errors = {r["id"]: r for r in read_dir(tmp / "out" / "errors").to_pylist()}
    assert set(results) == set(docs)
    assert set(errors) == {"empty", "blank", "null"}
    assert {e["error_type"] for e in errors.values()} == {"invalid_input"}
    assert all(r["summary"] for r in results.values())


def test_no_engine_call_exceeds_the_context(summarize_job):
    _, _, report, calls = summarize_job
    assert calls and all(c["max_model_len"] == MAX_LEN for c in calls)
    assert all(c["prompt"] + c["max_tokens"] <= MAX_LEN for c in calls)
    results = read_dir(summarize_job[0] / "out" / "results").to_pylist()
    assert sum(r["calls"] for r in results) == len(calls)


def test_chunks_and_levels_follow_the_token_counts(summarize_job, tokenizer):
    tmp, docs, _, _ = summarize_job
    results = {r["id"]: r for r in read_dir(tmp / "out" / "results").to_pylist()}
    short = results["half"]
    assert (short["n_chunks"], short["levels"], short["calls"]) == (1, 1, 1)
    for key in ("x2", "x5", "x20"):
        r = results[key]
        assert r["input_tokens"] == len(tokenizer.encode(docs[key], add_special_tokens=False))
        room = MAX_LEN - SUMMARY
        assert math.ceil(r["input_tokens"] / room) <= r["n_chunks"] <= 2 * math.ceil(r["input_tokens"] / (room - 100))
        assert r["levels"] >= 2 and r["calls"] >= r["n_chunks"] + 1
        assert r["completion_tokens"] > 0 and r["prompt_tokens"] > r["input_tokens"]
    assert results["x20"]["levels"] > results["x2"]["levels"]
