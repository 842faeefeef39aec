"""Chat jobs end to end on a real local Ray cluster and the real vLLM CPU engine, with the
tiny Qwen3 (random weights, real tokenizer). Oracles: transformers' greedy generation on
the same float32 weights, and the tokenizer's own token counts."""

import json

import pyarrow as pa
import pytest
import yaml
from conftest import read_dir, run_cli, write_shards

MAX_LEN = 256
TOPICS = ["rivers", "prime numbers", "jazz", "glaciers", "compilers", "tea", "owls", "bridges"]
SCHEMA = pa.schema([("id", pa.int64()), ("prompt", pa.string()), ("system", pa.string()),
                    ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
                    ("sampling", pa.string())])


def chat_shards():
    shards, i = [], 0
    for _ in range(3):
        rows = []
        for _ in range(8):
            rows.append({"id": i, "prompt": f"Tell me about {TOPICS[(i * 3) % 8]} and {TOPICS[i % 8]}.",
                         "system": None, "messages": None, "sampling": None})
            i += 1
        shards.append(rows)
    shards[0][1]["prompt"] = "  \n "                                     # empty
    shards[0][2]["prompt"] = "overflow " * (MAX_LEN + 10)                # longer than the context
    shards[1][0].update(prompt=None, messages=[{"role": "system", "content": "Be terse."},
                                               {"role": "user", "content": "Name a color."}])
    shards[1][1]["system"] = "You answer in French."
    shards[2][0]["sampling"] = json.dumps({"max_tokens": 3})
    return shards


def expected_messages(row, system_prompt):
    if row["messages"]:
        return row["messages"]
    system = row["system"] or system_prompt
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": row["prompt"]}]


def job_data(tiny_model, inp, out, **sections):
    data = {
        "name": "test-chat",
        "input": {"path": str(inp)},
        "output": {"path": str(out)},
        "model": {"source": str(tiny_model), "max_model_len": MAX_LEN, "dtype": "float32",
                  "engine_kwargs": {"enforce_eager": True}},
        "task": {"head": "chat", "options": {"system_prompt": "You are helpful."}},
        "sampling": {"temperature": 0, "max_tokens": 12},
    }
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v}
    return data


@pytest.fixture(scope="module")
def cli_job(tiny_model, tmp_path_factory):
    """The main job, run the way users run it: `qwen-batch run SPEC` in its own process."""
    tmp = tmp_path_factory.mktemp("chat")
    shards = chat_shards()
    write_shards(tmp / "in", shards, SCHEMA)
    spec = tmp / "job.yaml"
    spec.write_text(yaml.safe_dump(job_data(tiny_model, tmp / "in", tmp / "out")))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("QWEN_BATCH_LOG_DIR", str(tmp / "logs"))  # where Ray's lines go
        env.delenv("QWEN_BATCH_WORKER_LOGS", raising=False)
        env.delenv("RAY_AUTH_MODE")  # so that Ray prints its token-authentication warning too
        proc = run_cli("run", str(spec), "--no-progress")
    return tmp, shards, proc, proc.leftovers


OURS = ("qwen-batch test-chat (", "Results in ", "Ray and vLLM messages of this run: ")


def test_console_shows_only_our_lines_and_ray_goes_to_the_log(cli_job):
    tmp, _, proc, _ = cli_job
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    for line in lines:  # the summary table (title and box rows) and our messages, nothing else
        assert line.lstrip().startswith(OURS) or line[0] in "┏┃┡│├└", f"not ours: {line!r}"
        for ray in ("core_worker", "RayDeprecationWarning", "streaming_executor", "INFO", "WARNING", "Token"):
            assert ray not in line
    logs = [line for line in lines if line.startswith(OURS[2])]
    assert len(logs) == 1 and proc.stdout == ""
    log = (tmp / "logs" / logs[0].split(": ", 1)[1].split("/logs/", 1)[1]).read_text()
    assert "streaming_executor" in log  # Ray's lines are there instead


def test_cli_job_succeeds_and_leaves_no_engine_running(cli_job):
    _, _, proc, left = cli_job
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "total" in proc.stderr and "Results in" in proc.stderr
    assert left == [], "vLLM processes outlived `qwen-batch run`"


def test_rows_in_equal_results_plus_errors(cli_job):
    tmp, shards, _, _ = cli_job
    results, errors = read_dir(tmp / "out" / "results"), read_dir(tmp / "out" / "errors")
    ids = sorted(results.column("id").to_pylist() + errors.column("id").to_pylist())
    assert ids == sorted(r["id"] for s in shards for r in s)
    errs = {r["id"]: r for r in errors.to_pylist()}
    assert set(errs) == {1, 2}
    assert errs[1]["error_type"] == "invalid_input"
    assert errs[2]["error_type"] == "prompt_too_long"
    assert f"model.max_model_len is {MAX_LEN}" in errs[2]["error_message"]


def test_prompt_tokens_equal_the_tokenizers_count(cli_job, tokenizer):
    tmp, shards, _, _ = cli_job
    rows = {r["id"]: r for s in shards for r in s}
    for res in read_dir(tmp / "out" / "results").to_pylist():
        msgs = expected_messages(rows[res["id"]], "You are helpful.")
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=False)
        assert res["prompt_tokens"] == len(tokenizer(text, add_special_tokens=False)["input_ids"])
        assert res["reasoning"] is None


def test_greedy_output_matches_transformers(cli_job, tokenizer, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    tmp, shards, _, _ = cli_job
    rows = {r["id"]: r for s in shards for r in s}
    results = {r["id"]: r for r in read_dir(tmp / "out" / "results").to_pylist()}
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    for rid, max_tokens in ((0, 12), (8, 12), (9, 12), (16, 3)):
        msgs = expected_messages(rows[rid], "You are helpful.")
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)[0, ids.shape[1]:]
        assert results[rid]["completion_tokens"] == len(out)
        assert results[rid]["response"] == tokenizer.decode(out, skip_special_tokens=True), rid
    assert results[16]["finish_reason"] == "length"  # per-row max_tokens 3 applied


def test_metrics_and_manifest(cli_job):
    tmp = cli_job[0]
    metrics = read_dir(tmp / "out" / "metrics").to_pylist()
    assert len(metrics) == 3
    for m in metrics:
        assert m["output_tokens_per_s"] > 0 and m["completion_tokens"] > 0
        assert m["model"].endswith("tiny-qwen3") and m["tensor_parallel_size"] == 1
        assert json.loads(m["engine_settings"])["max_num_seqs"] > 0
        assert json.loads(m["engine_settings"])["nice"] == 0  # engines at normal CPU priority
    manifest = json.loads((tmp / "out" / "_manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["totals"]["results"] + manifest["totals"]["errors"] == 24


def test_an_engine_that_cannot_start_says_why_and_leaves_nothing_running(tiny_model, tmp_path):
    """vLLM's engine core prints its reason to a stderr that, in a Ray actor, is a log file;
    the job must end on that reason, not on vLLM's "See root cause above"."""
    write_shards(tmp_path / "in", [chat_shards()[2]], SCHEMA)
    data = job_data(tiny_model, tmp_path / "in", tmp_path / "out",
                    model={"engine_kwargs": {"enforce_eager": True, "kv_cache_memory_bytes": 1024}})
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(data))
    proc = run_cli("run", str(spec), "--no-progress")
    assert proc.returncode == 3, proc.stderr[-4000:]
    assert "The run stopped: the engine could not start: ValueError: No available memory for the cache blocks" \
        in proc.stderr, proc.stderr[-4000:]
    assert "See root cause above" not in proc.stderr
    assert "1 shard(s) were not committed" in proc.stderr  # nothing written as if it ran
    assert proc.leftovers == [], "vLLM processes outlived `qwen-batch run`"
