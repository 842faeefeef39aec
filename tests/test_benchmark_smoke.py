"""The throughput benchmark runs end to end on a tiny input and writes its files (no timing
is asserted: speed is measured by the benchmark itself, against baselines in the same run)."""

import subprocess
import sys

import pyarrow.parquet as pq
from conftest import REPO


def test_benchmark_writes_runs_summary_and_chart(tmp_path, tiny_model):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--model", str(tiny_model),
         "--prompts", "4", "--repeats", "1", "--systems", "vllm,qwen-batch",
         "--data-path", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900, start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = pq.read_table(tmp_path / "runs.parquet").to_pylist()
    assert {r["system"] for r in runs} == {"vllm", "qwen-batch", "data-path"}
    assert all(r["rows"] == 4 and 0 < r["gen_s"] < r["wall_s"] for r in runs)
    assert {r["output_tokens"] for r in runs if r["system"] != "data-path"} == {runs[0]["output_tokens"]}
    summary = {r["system"]: r for r in pq.read_table(tmp_path / "summary.parquet").to_pylist()}
    assert summary["qwen-batch"]["x_vllm"] > 0
    assert summary["data-path"]["x_vllm"] is None  # a fake engine is not compared with vLLM
    assert (tmp_path / "throughput.png").stat().st_size > 1000
    assert "vs vLLM" in proc.stdout and "gen rows/s" in proc.stdout


def test_labeling_benchmark_runs_on_the_bench_model(tmp_path):
    """benchmarks/labeling.py builds the bench model (Qwen3-0.6B's shape; one layer here, for
    time, without torch.compile), runs every phase on both systems and prints the ratios (no timing
    asserted)."""
    import json

    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "labeling.py"), "--layers", "1", "--rows", "3", "--warmup", "1",
         "--engine-kwargs", '{"enforce_eager": true}', "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=1200, start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"],
            config["head_dim"], config["intermediate_size"], config["num_hidden_layers"]) == (1024, 16, 8, 128, 3072, 1)
    found = json.loads((tmp_path / "labeling.json").read_text())
    assert {r["phase"] for r in found["runs"]} == {"choice/10", "choice/1tok", "choice-defaults/10", "trie/10",
                                                   "trie/1tok", "letters/10", "multi/10", "multi-text-last/10"}
    assert all(r["rows"] == 3 and r["tokens_computed_per_row"] > 0 for r in found["runs"])
    phases = found["phases"]
    assert phases["letters/10"]["distributions_per_row"] == 1  # one distribution a row, over the letters
    assert phases["trie/10"]["distributions_per_row"] > phases["trie/1tok"]["distributions_per_row"]
    # the text computed once for all labels: far fewer tokens than with the text after the label
    assert phases["multi/10"]["tokens_computed_per_row"] < phases["multi-text-last/10"]["tokens_computed_per_row"]
    assert set(found["ratios"]) >= {"trie_vs_choice_10", "trie_vs_choice_1tok", "letters_vs_choice_10",
                                    "multi_vs_single_10", "trie_vs_choice_defaults_10"}
    # trie's floor (partial KV blocks shared): fewer tokens than it computes today, never fewer than the prompt
    floor = found["trie_floor"]["trie/10"]["tokens_computed_per_row"]
    assert phases["choice/10"]["tokens_computed_per_row"] - phases["choice/10"]["distributions_per_row"] < floor
    assert floor < phases["trie/10"]["tokens_computed_per_row"]
    assert "letters_vs_choice_10" in proc.stdout and "tokens computed/row" in proc.stdout
    assert "if vLLM shared partial KV blocks" in proc.stdout
