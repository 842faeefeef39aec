"""`qwen-batch status OUTPUT` on the output of a real run (real Ray, the instant fake engine):
every count against what the run is known to have done, in the human lines and in --json;
then the same output with a shard's commit undone, an orphaned shard, a live lock and a
stale one."""

import json
import os
import shutil
import socket
import time

import pytest
from conftest import local_ray, read_dir, run_cli, write_shards
from rich.console import Console

from pipeline.cli import main
from pipeline.engine.processes import process_identity
from pipeline.runner import EXIT_OK, run_job
from pipeline.spec import load_spec
from pipeline.testing import fake_engine_factory


@pytest.fixture(scope="module", autouse=True)
def _ray():
    """One Ray for this module's in-process runs (run_job joins a Ray that is up)."""
    yield from local_ray()


@pytest.fixture(scope="module")
def done(tmp_path_factory, tiny_model):
    """3 shards x 10 rows; one empty prompt (invalid_input), two engine_error rows."""
    tmp = tmp_path_factory.mktemp("status")
    shards = [[{"id": s * 100 + i, "prompt": f"q {s} {i}"} for i in range(10)] for s in range(3)]
    shards[0][4]["prompt"] = ""
    shards[1][2]["prompt"] = "please FAIL"
    shards[2][7]["prompt"] = "FAIL too"
    write_shards(tmp / "in", shards)
    spec = load_spec(data={"name": "status-test", "input": {"path": str(tmp / "in")},
                           "output": {"path": str(tmp / "out")}, "model": {"source": str(tiny_model)},
                           "task": {"head": "chat"}, "sampling": {"max_tokens": 5}})
    report = run_job(spec, progress=False, engine_factory=fake_engine_factory(fail_on=("FAIL",)),
                     console=Console(file=open(os.devnull, "w")))
    assert report.exit_code == EXIT_OK
    return tmp / "out", report


def status(out, capsys, *flags):
    capsys.readouterr()
    assert main(["status", str(out), *flags]) == 0
    text = capsys.readouterr().out
    return json.loads(text) if "--json" in flags else text


def test_status_of_a_finished_run(done, capsys):
    out, report = done
    metrics = read_dir(out / "metrics").to_pylist()
    prompt, completion = sum(m["prompt_tokens"] for m in metrics), sum(m["completion_tokens"] for m in metrics)
    assert completion == 27 * 5  # 27 answered rows x max_tokens

    s = status(out, capsys, "--json")
    assert s["last_run"]["run_id"] == report.run_id and s["last_run"]["exit_code"] == 0
    assert s["last_run"]["outcome"] == "partial" and s["last_run"]["status"] == "complete"
    assert {k: s["shards"][k] for k in ("total", "committed", "pending", "orphaned")} == \
        {"total": 3, "committed": 3, "pending": 0, "orphaned": 0}
    assert s["rows"] == {"rows": 30, "results": 27, "errors": 3, "pending": 0}
    assert s["errors_by_type"] == {"engine_error": 2, "invalid_input": 1}
    assert s["tokens"] == {"prompt": prompt, "completion": completion}
    last = s["throughput"]["last_run"]
    assert last["run_id"] == report.run_id and last["completion_tokens"] == completion and last["shards"] == 3
    span = max(m["finished_at"] for m in metrics) - min(m["started_at"] for m in metrics)
    assert last["output_tokens_per_s"] == pytest.approx(completion / span)
    assert s["lock"] is None
    assert s["rerun"]["action"] == "nothing" and s["rerun"]["exit_code"] == 0

    text = status(out, capsys)
    assert f"Last run: {report.run_id} (status-test)" in text
    assert "Outcome: partial: 3 error row(s), within output.max_error_rate; exit code 0" in text
    assert "Shards: 3 committed, 0 pending, 0 orphaned (of 3 in the last run's plan)" in text
    assert "Rows: 30 committed: 27 results, 3 errors" in text
    assert "Errors by type: engine_error 2, invalid_input 1" in text
    assert f"Tokens: {prompt:,} in, {completion:,} out" in text
    assert f"Throughput of run {report.run_id}: {completion / span:,.1f} out tok/s" in text
    assert "Lock: free" in text
    assert "A rerun would: nothing to do" in text and "it exits 0" in text

    proc = run_cli("status", str(out), "--json")  # the command itself, as a script calls it
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["rows"] == s["rows"]


def test_status_of_a_damaged_output(done, capsys, tmp_path):
    src, report = done
    out = tmp_path / "out"
    shutil.copytree(src, out)
    commits = out / "_commits"
    (commits / "part-00001.parquet.json").unlink()  # as if that shard never committed
    record = json.loads((commits / "part-00002.parquet.json").read_text())
    (commits / "gone.parquet.json").write_text(json.dumps({**record, "name": "gone.parquet"}))  # input gone

    s = status(out, capsys, "--json")
    assert {k: s["shards"][k] for k in ("committed", "pending", "orphaned")} == \
        {"committed": 2, "pending": 1, "orphaned": 1}
    assert s["shards"]["pending_names"] == ["part-00001.parquet"]
    assert s["shards"]["orphaned_names"] == ["gone.parquet"]
    assert s["rows"] == {"rows": 20, "results": 18, "errors": 2, "pending": 10}  # orphans not counted
    assert s["errors_by_type"] == {"engine_error": 1, "invalid_input": 1}
    assert s["rerun"]["action"] == "run" and s["rerun"]["shards"] == 1 and s["rerun"]["rows"] == 10
    text = status(out, capsys)
    assert "Shards: 2 committed, 1 pending, 1 orphaned" in text
    assert "pending: part-00001.parquet" in text and "orphaned (input file gone, not counted): gone.parquet" in text
    assert "A rerun would: run 1 pending shard(s), 10 rows" in text

    # A live run holds the lock (this process, refreshed now): a rerun is refused.
    lock = {"run_id": "20990101T000000-abcdef", **process_identity(), "heartbeat_at": time.time() - 30}
    (out / "_lock.json").write_text(json.dumps(lock))
    s = status(out, capsys, "--json")
    assert s["lock"]["run_id"] == lock["run_id"] and s["lock"]["pid"] == os.getpid()
    assert s["lock"]["stale"] is None and 29 < s["lock"]["age_seconds"] < 120
    assert s["rerun"]["action"] == "refused" and s["rerun"]["exit_code"] == 2
    text = status(out, capsys)
    assert f"Lock: held by run {lock['run_id']} (pid {os.getpid()} on {socket.gethostname()}), last refreshed" in text
    assert "A rerun would: refused (exit 2)" in text

    # Its process is gone: stale, and the last run (manifest still 'running') never finished.
    manifest = json.loads((out / "_manifest.json").read_text())
    (out / "_manifest.json").write_text(json.dumps({**manifest, "status": "running", "exit_code": None}))
    (out / "_lock.json").write_text(
        json.dumps({**lock, "started": lock["started"] - 100, "run_id": manifest["run_id"]}))
    s = status(out, capsys, "--json")
    assert "no longer running" in s["lock"]["stale"]
    assert s["last_run"]["outcome"] == "interrupted" and s["last_run"]["exit_code"] is None
    assert s["rerun"]["action"] == "run" and "takes over the stale lock" in s["rerun"]["text"]
    text = status(out, capsys)
    assert "Outcome: did not finish" in text and "stale: run" in text


def test_status_of_a_folder_without_output(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    assert "no qwen-batch output here" in capsys.readouterr().err
