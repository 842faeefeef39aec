"""The data path on a real local Ray cluster with an instant fake engine: counts, errors,
output layout, manifest, resume. (The real vLLM engine runs in test_chat_job.py.)"""

import io
import json

import pyarrow.parquet as pq
import pytest
from conftest import local_ray, read_dir, write_shards
from rich.console import Console

from jobs import spec_maker
from pipeline.io.shards import InputError
from pipeline.runner import EXIT_OK, EXIT_TOO_MANY_ERRORS, run_job
from pipeline.testing import fake_engine_factory


def shards():
    out = []
    for s in range(3):
        rows = [{"id": f"r{s}-{i}", "prompt": f"question {s} {i}", "sampling": None} for i in range(40)]
        out.append(rows)
    out[0][3]["prompt"] = ""                       # invalid_input
    out[1][5]["prompt"] = "please FAIL here"       # engine_error from the fake engine
    out[2][7]["sampling"] = '{"max_tokens": 2}'    # per-row override
    return out


MODEL = {}


@pytest.fixture(scope="module", autouse=True)
def _model(tiny_model):
    """The model's config (the engine is the fake), and one Ray for this module's runs
    (run_job joins a Ray that is up and leaves it running)."""
    MODEL["source"] = str(tiny_model)
    yield from local_ray()


make_spec = spec_maker(model=MODEL, sampling={"max_tokens": 5}, resources={"batch_size": 16})


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, _model):
    tmp = tmp_path_factory.mktemp("fake")
    write_shards(tmp / "in", shards())
    spec = make_spec(tmp, model={"engine_kwargs": {"hf_token": SECRET}})
    log = io.StringIO()
    report = run_job(spec, progress=False, engine_factory=fake_engine_factory(fail_on=("FAIL",)),
                     console=Console(file=log, width=200))
    report.log = log.getvalue()
    return tmp, spec, report


SECRET = "hf_SeCrEt123"


def test_secrets_stay_out_of_the_manifest_and_the_log(first_run):
    tmp, _, report = first_run
    manifest = (tmp / "out" / "_manifest.json").read_text()
    assert "hf_token" in manifest and SECRET not in manifest and SECRET not in report.log
    assert "qwen-batch" in report.log  # the summary was printed


def test_every_row_is_one_result_or_one_error(first_run):
    tmp, _, report = first_run
    results, errors = read_dir(tmp / "out" / "results"), read_dir(tmp / "out" / "errors")
    ids_in = {f"r{s}-{i}" for s in range(3) for i in range(40)}
    out_ids = results.column("id").to_pylist() + errors.column("id").to_pylist()
    assert sorted(out_ids) == sorted(ids_in)
    assert report.totals.rows == 120 and report.totals.errors == 2 and report.exit_code == EXIT_OK


def test_error_rows_say_why(first_run):
    tmp = first_run[0]
    errors = {r["id"]: r for r in read_dir(tmp / "out" / "errors").to_pylist()}
    assert errors["r0-3"]["error_type"] == "invalid_input"
    assert "empty or whitespace" in errors["r0-3"]["error_message"]
    assert errors["r1-5"]["error_type"] == "engine_error"


def test_a_folder_per_shard_holding_exactly_the_committed_files(first_run):
    from pipeline.io.output import OutputStore

    tmp = first_run[0]
    records = OutputStore(str(tmp / "out")).records()
    assert sorted(records) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    for kind in ("results", "errors", "metrics"):
        on_disk = {str(p.relative_to(tmp / "out")) for p in (tmp / "out" / kind).rglob("*") if p.is_file()}
        assert on_disk == {f for r in records.values() for f in r["files"][kind]}
    assert [len(records[n]["files"]["errors"]) for n in sorted(records)] == [1, 1, 0]  # shard 2 had no error
    # a plain folder read (pandas, DuckDB) of a finished output sees the same rows
    assert pq.read_table(tmp / "out" / "results").num_rows == read_dir(tmp / "out" / "results").num_rows == 118
    r2 = {r["id"]: r for f in records["part-00002.parquet"]["files"]["results"]
          for r in pq.read_table(tmp / "out" / f).to_pylist()}
    assert r2["r2-7"]["completion_tokens"] == 2 and r2["r2-8"]["completion_tokens"] == 5


def test_metrics_and_manifest(first_run):
    tmp, spec, report = first_run
    m = read_dir(tmp / "out" / "metrics").to_pylist()
    assert [x["rows"] for x in m] == [40, 40, 40]
    assert sum(x["errors"] for x in m) == 2
    assert all(x["completion_tokens"] > 0 and x["output_tokens_per_s"] > 0 for x in m)
    manifest = json.loads((tmp / "out" / "_manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["totals"]["rows"] == 120 and manifest["totals"]["errors"] == 2
    assert {s["status"] for s in manifest["shards"]} == {"committed"}
    assert manifest["spec_fingerprint"] == spec.fingerprint()


def test_rerun_is_a_noop_and_changed_spec_is_refused(first_run):
    tmp, spec, _ = first_run
    again = run_job(spec, progress=False, engine_factory=fake_engine_factory())
    assert again.message == "nothing to do" and again.skipped_shards == 3
    with pytest.raises(InputError, match="different job spec.*--overwrite"):
        run_job(make_spec(tmp, sampling={"max_tokens": 9}), progress=False,
                engine_factory=fake_engine_factory())


def test_error_rate_above_threshold_fails_the_run(tmp_path):
    write_shards(tmp_path / "in", [[{"id": i, "prompt": "FAIL" if i % 2 else "ok"} for i in range(10)]])
    spec = make_spec(tmp_path, output={"max_error_rate": 0.2})
    report = run_job(spec, progress=False, engine_factory=fake_engine_factory(fail_on=("FAIL",)))
    assert report.exit_code == EXIT_TOO_MANY_ERRORS
    assert "5 of 10 rows failed" in report.message
    assert json.loads((tmp_path / "out" / "_manifest.json").read_text())["status"] == "failed"


def test_report_renders_charts_and_html(first_run):
    from conftest import run_cli

    tmp = first_run[0]
    proc = run_cli("report", str(tmp / "out"))
    assert proc.returncode == 0, proc.stderr
    page = (tmp / "out" / "report" / "index.html").read_text()
    assert "3 shards, 120 rows, 2 errors" in page
    for png in ("shard_throughput.png", "replicas_timeline.png", "tokens_over_time.png", "errors.png",
                "token_lengths.png"):
        assert png in page and (tmp / "out" / "report" / png).stat().st_size > 1000
    # the timeline adds up to each shard's totals, in windows from the run's start on
    started = json.loads((tmp / "out" / "_manifest.json").read_text())["started_at"]
    for m in read_dir(tmp / "out" / "metrics").to_pylist():
        assert all(started <= w["at"] <= m["finished_at"] for w in m["timeline"])
        assert sum(w["rows"] for w in m["timeline"]) == m["rows"]
        assert sum(w["completion_tokens"] for w in m["timeline"]) == m["completion_tokens"]
        assert {w["worker"] for w in m["timeline"]} == set(m["workers"])


def test_resume_anyway_keeps_committed_shards_of_another_spec(tmp_path):
    write_shards(tmp_path / "in", [[{"id": s * 10 + i, "prompt": f"q {i}"} for i in range(6)] for s in range(3)])
    first = run_job(make_spec(tmp_path), progress=False, engine_factory=fake_engine_factory())
    assert first.exit_code == EXIT_OK
    (tmp_path / "out" / "_commits" / "part-00001.parquet.json").unlink()  # as if that shard never committed
    changed = make_spec(tmp_path, sampling={"max_tokens": 2})
    with pytest.raises(InputError, match="different job spec.*--resume-anyway"):
        run_job(changed, progress=False, engine_factory=fake_engine_factory())
    again = run_job(changed, resume_anyway=True, progress=False, engine_factory=fake_engine_factory())
    assert again.exit_code == EXIT_OK and again.skipped_shards == 2 and again.totals.rows == 6
    tokens = {r["id"]: r["completion_tokens"] for r in read_dir(tmp_path / "out" / "results").to_pylist()}
    assert sorted(tokens) == sorted(s * 10 + i for s in range(3) for i in range(6))
    assert {tokens[10], tokens[0]} == {2, 5}  # shard 1 ran with the new spec, shard 0 kept
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["resumed_anyway"] and manifest["status"] == "complete"


def test_replicas_range_runs_and_records_the_max(tmp_path):
    write_shards(tmp_path / "in", [[{"id": s * 10 + i, "prompt": f"q {i}"} for i in range(8)] for s in range(4)])
    report = run_job(make_spec(tmp_path, resources={"replicas": [1, 2], "batch_size": 4}), progress=False,
                     engine_factory=fake_engine_factory(delay=0.05))
    assert report.exit_code == EXIT_OK and report.totals.results == 32
    assert {m["replicas"] for m in read_dir(tmp_path / "out" / "metrics").to_pylist()} == {2}
