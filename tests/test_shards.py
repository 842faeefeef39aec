"""Input discovery and checks: every bad input is named with its file and the fix."""

import pytest
from conftest import prompt_rows, write_shards

from pipeline.io.shards import list_shard_paths
from pipeline.runner import plan_job
from pipeline.spec import SpecError


def test_directory_glob_and_file_are_found_and_hidden_files_skipped(tmp_path):
    inp = tmp_path / "in"
    write_shards(inp, [prompt_rows(2), prompt_rows(2, 2)])
    (inp / "_SUCCESS").write_text("")
    (inp / ".part-00000.parquet.crc").write_text("x")
    _, paths = list_shard_paths(str(inp))
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["part-00000.parquet", "part-00001.parquet"]
    _, paths = list_shard_paths(str(inp / "*-00001.parquet"))
    assert len(paths) == 1
    _, paths = list_shard_paths(str(inp / "part-00000.parquet"))
    assert len(paths) == 1


def test_plan_counts_rows_and_shards(tmp_path, chat_job):
    write_shards(tmp_path / "in", [prompt_rows(3), prompt_rows(4, 3)])
    plan = plan_job(chat_job())
    assert [s.rows for s in plan.shards] == [3, 4]
    assert plan.columns == ["id", "prompt"]


def test_validate_cli_reports_plan_and_errors(tmp_path, chat_job):
    import yaml
    from conftest import run_cli

    write_shards(tmp_path / "in", [prompt_rows(3), prompt_rows(2, 3)])
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(chat_job().model_dump(mode="json")))
    ok = run_cli("validate", str(spec))
    assert ok.returncode == 0, ok.stderr
    assert "2 shard(s), 5 rows" in ok.stderr
    bad = run_cli("validate", str(spec), "--set", "model.max_model_lenn=5")
    assert bad.returncode == 2
    assert "Did you mean 'max_model_len'?" in bad.stderr and "Traceback" not in bad.stderr


def test_unknown_model_is_refused_before_anything_runs(tmp_path, chat_job):
    write_shards(tmp_path / "in", [prompt_rows(1)])
    spec = chat_job(model={"source": str(tmp_path / "no-such-model")})
    with pytest.raises(SpecError, match="cannot read the checkpoint's config.*local checkpoint directory"):
        plan_job(spec)


def test_dry_run_prints_the_plan_and_loads_no_model(tmp_path, tokenizer, chat_job):
    import yaml
    from conftest import run_cli

    write_shards(tmp_path / "in", [prompt_rows(3), prompt_rows(2, 3)])
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(chat_job().model_dump(mode="json")))
    out = run_cli("run", "--dry-run", str(spec), "--set", "resources.replicas=[1, 3]")
    assert out.returncode == 0, out.stderr
    assert "2 shard(s) and 5 rows to run (0 already committed" in out.stderr
    tokens = sum(len(tokenizer.encode(f"p{i}", add_special_tokens=False)) for i in range(5))
    assert f"about {tokens:,} input tokens of text (from 5 sampled rows)" in out.stderr
    assert "1-3 replica(s) x 1 device(s) (tensor 1 x pipeline 1, device auto)" in out.stderr
    assert not (tmp_path / "out").exists()
    assert not out.leftovers


def test_engine_arguments_are_checked_at_plan_time(tmp_path, chat_job):
    """validate and --dry-run refuse what run would: contradictory model keys fail before Ray."""
    write_shards(tmp_path / "in", [prompt_rows(1)])
    spec = chat_job(model={"source": chat_job().model.source, "max_model_len": 4096, "long_context": 2048})
    with pytest.raises(SpecError, match="model.max_model_len 4096 is above model.long_context 2048"):
        plan_job(spec)


def test_token_estimate_counts_as_the_tokenizer_does(tiny_model, tokenizer):
    """The plan counts tokens with the checkpoint's tokenizer.json through the tokenizers library
    (validate and --dry-run answer in about a second, not the five that importing transformers
    takes); its counts are transformers' own."""
    from pipeline.plan import token_counter

    count = token_counter(str(tiny_model))
    texts = ["plain words", "café naïve 北京 🙂", "<|im_start|>user<|im_end|> <think>x</think>",
             "  spaces\n\nand\ttabs  ", "a" * 3000, ""]
    assert [count(t) for t in texts] == [len(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
