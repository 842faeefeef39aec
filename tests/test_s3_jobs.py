"""Jobs with input and output on s3:// (issue #12, item 1), against the local S3-compatible
server of tests/s3_server.py (moto_server; the standard AWS_* variables point at it, and the
CLI and Ray's workers inherit them): a chat job end to end with the fake engine and with the
real tiny model through `qwen-batch run`, `validate` and `--dry-run`, and `qwen-batch report`.
Resume after a driver killed mid-commit on S3 is in test_exactly_once.py."""

from __future__ import annotations

import pytest
import yaml
from conftest import local_ray, run_cli, write_shards

from jobs import ids_out
from pipeline.io.output import OutputStore
from pipeline.runner import EXIT_OK, run_job
from pipeline.spec import load_spec
from pipeline.testing import fake_engine_factory


def shards(n_shards=2, n_rows=4):
    return [[{"id": s * 100 + i, "prompt": f"Shard {s} row {i}: say something"} for i in range(n_rows)]
            for s in range(n_shards)]


def all_ids(rows):
    return sorted(r["id"] for shard in rows for r in shard)


def spec_data(bucket: str, model: str, **extra) -> dict:
    return {"name": "s3-chat", "input": {"path": f"{bucket}/in"}, "output": {"path": f"{bucket}/out"},
            "model": {"source": model}, "task": {"head": "chat"}, "sampling": {"max_tokens": 4},
            "resources": {"batch_size": 2}, **extra}


@pytest.fixture(scope="module", autouse=True)
def _ray(s3_server):
    """One Ray for this module's in-process runs (run_job joins a Ray that is up), started
    after the S3 variables are set, so that its workers reach the S3 server."""
    yield from local_ray()


@pytest.fixture(scope="module")
def fake_s3_run(s3_server, tiny_model, tmp_path_factory):
    """A chat job (fake engine, in-process) from s3://BUCKET/in to s3://BUCKET/out."""
    tmp = tmp_path_factory.mktemp("s3job")
    bucket = s3_server.bucket()
    rows = shards()
    write_shards(tmp / "in", rows)
    s3_server.upload(tmp / "in", f"{bucket}/in")
    data = spec_data(bucket, str(tiny_model))
    report = run_job(load_spec(data=data), progress=False, engine_factory=fake_engine_factory())
    spec_file = tmp / "job.yaml"
    spec_file.write_text(yaml.safe_dump(data))
    return bucket, rows, report, spec_file


def test_chat_job_on_s3_commits_every_id_once(fake_s3_run, s3_server):
    bucket, rows, report, _ = fake_s3_run
    assert report.exit_code == EXIT_OK, report.message
    assert sorted(ids_out(f"{bucket}/out")) == all_ids(rows)
    keys = s3_server.list(f"{bucket}/out")
    assert {"_manifest.json", "_commits/part-00000.parquet.json", "_commits/part-00001.parquet.json"} <= set(keys)
    assert not any(k.startswith("_lock") for k in keys)  # released
    store = OutputStore(f"{bucket}/out")
    assert store.garbage() == []
    manifest = store.read_manifest()
    assert manifest["status"] == "complete" and manifest["totals"] == {"rows": 8, "results": 8, "errors": 0}
    # the same job again: nothing to do, nothing written
    again = run_job(load_spec(data=spec_data(bucket, manifest["spec"]["model"]["source"])), progress=False,
                    engine_factory=fake_engine_factory())
    assert again.message == "nothing to do" and again.skipped_shards == 2
    assert s3_server.list(f"{bucket}/out") == keys


def test_validate_and_dry_run_on_s3(fake_s3_run):
    bucket, _, _, spec_file = fake_s3_run
    done = run_cli("validate", str(spec_file))
    assert done.returncode == 0, done.stderr
    assert "OK: 2 shard(s), 8 rows" in done.stderr
    dry = run_cli("run", "--dry-run", str(spec_file))
    assert dry.returncode == 0, dry.stderr
    assert f"Plan: 0 shard(s) and 0 rows to run (2 already committed in {bucket}/out)" in dry.stderr


def test_report_on_an_s3_output(fake_s3_run, s3_server):
    bucket = fake_s3_run[0]
    done = run_cli("report", f"{bucket}/out")
    assert done.returncode == 0, done.stderr
    assert f"{bucket}/out/report/index.html" in done.stderr.replace("\n", "")
    keys = s3_server.list(f"{bucket}/out/report")
    assert {"index.html", "shard_throughput.png", "replicas_timeline.png", "errors.png"} <= set(keys)
    page = s3_server.read(f"{bucket}/out/report/index.html").decode()
    assert "2 shards, 8 rows, 0 errors" in page and "status <b>complete</b>" in page
    assert len(s3_server.read(f"{bucket}/out/report/shard_throughput.png")) > 1000
    assert OutputStore(f"{bucket}/out").garbage() == []  # the report is no stray data file


@pytest.mark.engine  # the real vLLM engine: not in the fast tier with the rest of this module
def test_real_engine_chat_job_on_s3_through_the_cli(s3_server, s3_bucket, tiny_model, tmp_path):
    """`qwen-batch run` with the real vLLM engine (tiny model), input and output on S3."""
    rows = shards()
    write_shards(tmp_path / "in", rows)
    s3_server.upload(tmp_path / "in", f"{s3_bucket}/in")
    data = spec_data(s3_bucket, str(tiny_model), sampling={"max_tokens": 8, "temperature": 0})
    data["model"].update(max_model_len=256, engine_kwargs={"enforce_eager": True})
    data["resources"] = {"batch_size": 4}
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(data))
    done = run_cli("run", str(spec_file), "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.leftovers == []
    out = f"{s3_bucket}/out"
    assert sorted(ids_out(out)) == all_ids(rows)
    store = OutputStore(out)
    results = store.read_committed("results")
    assert set(results.column("finish_reason").to_pylist()) <= {"length", "stop"}
    assert all(0 < n <= 8 for n in results.column("completion_tokens").to_pylist())
    manifest = store.read_manifest()
    assert manifest["status"] == "complete" and manifest["totals"]["rows"] == 8
    assert store.garbage() == []
