"""--retry-errors / --retry-where: committed rows computed again replace their old rows in
their shards, exactly once, also when the retry is killed half-way."""

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import local_ray, read_dir, write_shards

from jobs import spec_maker
from pipeline.io.output import OutputStore
from pipeline.plan import RetrySelection
from pipeline.runner import run_job
from pipeline.testing import fake_engine_factory

ROWS = [[{"id": s * 100 + i, "prompt": f"FAIL {i}" if i % 4 == 0 else f"row {i}"} for i in range(12)]
        for s in range(3)]
ALL_IDS = sorted(r["id"] for shard in ROWS for r in shard)
FAILED = sorted(r["id"] for shard in ROWS for r in shard if r["prompt"].startswith("FAIL"))


spec_for = spec_maker(output={"rows_per_file": 6}, sampling={"max_tokens": 4}, resources={"batch_size": 4})


@pytest.fixture(scope="module", autouse=True)
def _ray():
    """One Ray for this module's in-process runs (run_job joins a Ray that is up)."""
    yield from local_ray()


@pytest.fixture
def failed_run(tmp_path, tiny_model):
    write_shards(tmp_path / "in", ROWS)
    report = run_job(spec_for(tmp_path, model=tiny_model), progress=False,
                     engine_factory=fake_engine_factory(fail_on=("FAIL",)))
    assert report.exit_code == 0 and report.totals.errors == len(FAILED)
    return tmp_path


def rows_out(out):
    results, errors = read_dir(out / "results"), read_dir(out / "errors")
    return results, errors


def test_retry_errors_with_a_changed_spec_replaces_exactly_the_error_rows(failed_run, tiny_model):
    tmp = failed_run
    before = {r["id"]: r for r in read_dir(tmp / "out" / "results").to_pylist()}
    spec = spec_for(tmp, model=tiny_model, sampling={"max_tokens": 6})  # the fix: a bigger max_tokens, say
    report = run_job(spec, progress=False, retry=RetrySelection.parse([], all_errors=True),
                     engine_factory=fake_engine_factory())
    assert report.exit_code == 0, report.message
    assert report.totals.rows == len(FAILED)  # only the error rows ran
    results, errors = rows_out(tmp / "out")
    assert errors is None or errors.num_rows == 0
    ids = results.column("id").to_pylist()
    assert sorted(ids) == ALL_IDS  # every id once
    after = {r["id"]: r for r in results.to_pylist()}
    assert all(after[i]["completion_tokens"] == 6 for i in FAILED)  # redone with the new spec
    assert all(after[i] == before[i] for i in before)  # the others untouched
    records = OutputStore(str(tmp / "out")).records()
    assert all(r["errors"] == 0 and r["results"] == 12 and r["errors_by_type"] == {} for r in records.values())
    assert all(r["redone"][0]["rows"] == 3 for r in records.values())
    manifest = json.loads((tmp / "out" / "_manifest.json").read_text())
    assert manifest["retried"]["rows"] == len(FAILED) and manifest["status"] == "complete"
    assert OutputStore(str(tmp / "out")).garbage() == []
    # the same spec afterwards is at home in this output: nothing to do
    again = run_job(spec, progress=False, engine_factory=fake_engine_factory())
    assert again.message == "nothing to do"


def test_retry_where_selects_by_column_and_nothing_selected_is_a_noop(failed_run, tiny_model):
    tmp = failed_run
    none = run_job(spec_for(tmp, model=tiny_model), progress=False,
                   retry=RetrySelection.parse(["error_type=engine_timeout"]), engine_factory=fake_engine_factory())
    assert none.exit_code == 0 and none.message == "nothing to do"
    some = run_job(spec_for(tmp, model=tiny_model), progress=False,
                   retry=RetrySelection.parse(["error_type=engine_error"]), engine_factory=fake_engine_factory())
    assert some.exit_code == 0 and some.totals.rows == len(FAILED)
    results, errors = rows_out(tmp / "out")
    assert sorted(results.column("id").to_pylist()) == ALL_IDS


RETRY_DRIVER = """
import sys
from pipeline.plan import RetrySelection
from pipeline.runner import run_job
from pipeline.spec import load_spec
from pipeline.testing import fake_engine_factory
report = run_job(load_spec(sys.argv[1]), progress=False, retry=RetrySelection.parse([], all_errors=True),
                 engine_factory=fake_engine_factory())
sys.exit(report.exit_code)
"""


@pytest.mark.faults
@pytest.mark.parametrize("step", ["before-record", "after-record"])
def test_a_retry_killed_at_a_commit_then_rerun_leaves_every_id_once(failed_run, tiny_model, step):
    import yaml

    tmp = failed_run
    spec_file = tmp / "job.yaml"
    spec_file.write_text(yaml.safe_dump(spec_for(tmp, model=tiny_model).model_dump(mode="json")))
    proc = subprocess.Popen([sys.executable, "-c", RETRY_DRIVER, str(spec_file)], start_new_session=True,
                            env={**os.environ, "QWEN_BATCH_FAULT_AT": step},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    results, errors = rows_out(tmp / "out")  # what readers trust is whole: every id once
    ids = results.column("id").to_pylist() + (errors.column("id").to_pylist() if errors else [])
    assert sorted(ids) == ALL_IDS
    again = subprocess.run([sys.executable, "-c", RETRY_DRIVER, str(spec_file)], capture_output=True, text=True,
                           timeout=300, start_new_session=True)
    assert again.returncode == 0, again.stderr[-2000:]
    results, errors = rows_out(tmp / "out")
    assert sorted(results.column("id").to_pylist()) == ALL_IDS and (errors is None or errors.num_rows == 0)
    assert OutputStore(str(tmp / "out")).garbage() == []
