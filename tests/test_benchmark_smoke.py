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
