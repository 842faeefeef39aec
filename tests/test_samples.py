"""Several samples a row (issue 28 item 7): sampling.n > 1, the job's or a row's, gives the
chat head's row every completion in its `samples` column, the first also in `response`, and
counts every sample's tokens. Spec checks as units; one job on the real vLLM CPU engine with
the tiny Qwen3 (oracles: each sample's tokens as the tokenizer counts them, the metrics' sum)."""

import json

import pyarrow as pa
import pytest
from conftest import read_dir, run_on_local_ray, write_shards

from pipeline.spec import SpecError, load_spec

MAX_TOKENS = 6
SCHEMA = pa.schema([("id", pa.int64()), ("prompt", pa.string()), ("sampling", pa.string())])


def spec_data(head="chat", **sampling):
    return {"input": {"path": "in"}, "output": {"path": "out"}, "model": {"source": "m"},
            "task": {"head": head}, "sampling": sampling}


@pytest.mark.unit
@pytest.mark.parametrize("head, sampling, fragment", [
    ("chat", {"n": 17}, "sampling.n: .*less than or equal to 16"),
    ("chat", {"n": 0}, "sampling.n: .*greater than or equal to 1"),
    ("chat", {"n": 3, "temperature": 0}, "greedy decoding gives the same answer 3 times; raise temperature"),
    ("summarize", {"n": 2}, "head 'summarize' gives one answer a row; set sampling.n to 1"),
    ("qa", {"n": 2, "temperature": 1}, "head 'qa' gives one answer a row"),
])
def test_invalid_n_is_refused_when_the_spec_loads(head, sampling, fragment):
    with pytest.raises(SpecError, match=fragment):
        load_spec(data=spec_data(head, **sampling))


@pytest.mark.unit
def test_n_is_accepted_and_changes_the_fingerprint():
    one, three = load_spec(data=spec_data()), load_spec(data=spec_data(n=3, temperature=1))
    assert three.sampling.n == 3 and one.fingerprint() != three.fingerprint()


@pytest.mark.unit
def test_an_extract_row_asking_several_samples_is_its_own_error():
    from pipeline.heads.base import RowError
    from pipeline.heads.chat import row_sampling

    with pytest.raises(RowError, match="head 'extract' gives one answer a row"):
        row_sampling('{"n": 2}', head="extract")
    assert row_sampling('{"n": 2}', many=True) == {"n": 2}


ROWS = [
    {"id": 0, "prompt": "Tell me about owls.", "sampling": None},                          # the job's n: 3
    {"id": 1, "prompt": "Name a river.", "sampling": None},
    {"id": 2, "prompt": "Tell me about tea.", "sampling": json.dumps({"n": 2})},          # a row's own n
    {"id": 3, "prompt": "Tell me about jazz.", "sampling": json.dumps({"n": 1})},         # one sample
    {"id": 4, "prompt": "A glacier?", "sampling": json.dumps({"n": 2, "temperature": 0})},  # greedy: refused
    {"id": 5, "prompt": "A bridge?", "sampling": json.dumps({"n": 99})},                  # out of bounds
]


@pytest.fixture(scope="module")
def job(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("samples")
    write_shards(tmp / "in", [ROWS[:3], ROWS[3:]], SCHEMA)
    data = {"input": {"path": str(tmp / "in")}, "output": {"path": str(tmp / "out")},
            "model": {"source": str(tiny_model), "max_model_len": 256, "dtype": "float32",
                      "engine_kwargs": {"enforce_eager": True}},
            "task": {"head": "chat"},
            "sampling": {"n": 3, "temperature": 1.0, "seed": 7, "max_tokens": MAX_TOKENS}}
    return tmp, run_on_local_ray(data)


def test_rows_in_equal_rows_out_and_each_row_has_its_samples(job, tokenizer):
    tmp, report = job
    assert report.exit_code == 0 and (report.rows, report.results, report.errors) == (6, 4, 2)
    results = {r["id"]: r for r in read_dir(tmp / "out" / "results").to_pylist()}
    errors = {r["id"]: r for r in read_dir(tmp / "out" / "errors").to_pylist()}
    assert sorted(results) == [0, 1, 2, 3] and sorted(errors) == [4, 5]
    assert errors[4]["error_type"] == "invalid_input" and "greedy decoding" in errors[4]["error_message"]
    assert errors[5]["error_type"] == "invalid_input" and "sampling.n" in errors[5]["error_message"]
    assert results[3]["samples"] is None  # n 1: the plain columns only
    for rid, n in ((0, 3), (1, 3), (2, 2)):
        row, samples = results[rid], results[rid]["samples"]
        assert [s["index"] for s in samples] == list(range(n)), rid
        assert (row["response"], row["finish_reason"]) == (samples[0]["response"], samples[0]["finish_reason"])
        assert row["completion_tokens"] == sum(s["completion_tokens"] for s in samples), rid
        assert len({s["response"] for s in samples}) == n, rid  # temperature 1 on random weights: all differ
        for s in samples:
            # each sample ran to max_tokens (random weights rarely end a turn), or ended earlier
            # on <|im_end|> (counted, not in the text)
            if s["finish_reason"] == "length":
                assert s["completion_tokens"] == MAX_TOKENS, (rid, s)
            else:
                assert s["finish_reason"] == "stop" and 1 <= s["completion_tokens"] <= MAX_TOKENS, (rid, s)
                assert len(tokenizer.encode(s["response"], add_special_tokens=False)) <= 4 * MAX_TOKENS
            assert s["reasoning"] is None and s["tool_calls"] is None


def test_output_tokens_count_every_sample(job):
    tmp, report = job
    results = read_dir(tmp / "out" / "results").to_pylist()
    metrics = read_dir(tmp / "out" / "metrics").to_pylist()
    total = sum(r["completion_tokens"] for r in results)
    ended = sum(s["finish_reason"] == "stop" for r in results for s in r["samples"] or [r])
    assert ended or total == (3 + 3 + 2 + 1) * MAX_TOKENS  # all cut at max_tokens, unless one ended
    assert sum(m["completion_tokens"] for m in metrics) == total


@pytest.mark.unit
def test_each_sample_keeps_its_own_tool_calls_and_a_malformed_one_names_its_sample():
    import asyncio

    from pipeline.heads.base import Completion, RowError
    from pipeline.heads.chat import ChatHead
    from pipeline.testing import FakeEngine

    call = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'

    class Sampled(FakeEngine):  # the engine's answer to n: 2, scripted
        texts = ["Sure.", call]

        async def generate(self, prompt_token_ids, sampling):
            assert sampling["n"] == 2
            done = [Completion(t, [1] * (i + 2), "stop", len(prompt_token_ids), i + 2)
                    for i, t in enumerate(self.texts)]
            return Completion("Sure.", [1, 1], "stop", len(prompt_token_ids), 5, samples=done)

    head = ChatHead({"tools": [{"name": "f"}]}, sampling={"n": 2})
    out = asyncio.run(head.run({"prompt": "hi"}, Sampled(max_model_len=64)))
    assert (out["response"], out["tool_calls"], out["completion_tokens"]) == ("Sure.", [], 5)
    assert [(s["index"], s["response"], s["tool_calls"], s["completion_tokens"]) for s in out["samples"]] == [
        (0, "Sure.", [], 2), (1, "", [{"name": "f", "arguments": '{"a": 1}'}], 3)]
    Sampled.texts = ["Sure.", "<tool_call>{oops</tool_call>"]
    with pytest.raises(RowError, match=r"sample 1 \(of 2\)'s tool call is malformed: .*its output was: <tool_call>"):
        asyncio.run(head.run({"prompt": "hi"}, Sampled(max_model_len=64)))
