"""Secrets stay secret (issue 27, item 11): credentials in output.path (s3://KEY:SECRET@...) and
model.engine_kwargs.hf_token never reach what Ray shows everyone who can reach the dashboard
(the state API's tasks, actors, jobs and workers: runtime_env, names, environment), nor the
environment of any process of the run; the run's log is readable by its owner only.

A job on the local S3 server (tests/s3_server.py) with the fake engine, on a Ray started
with its dashboard, which serves the state API."""

from __future__ import annotations

import json
import os
import stat

import psutil
import pytest
from conftest import write_shards

from jobs import ids_out
from pipeline.runner import EXIT_OK, run_job
from pipeline.spec import load_spec
from pipeline.testing import fake_engine_factory

pytestmark = pytest.mark.datapath

KEY, SECRET, HF_TOKEN = "AKIAQWENBATCHTEST", "wJalrQwenBatchSecretKey0123", "hf_QwenBatchSecretToken4567"


@pytest.fixture(scope="module")
def ray_with_dashboard(s3_server):
    import ray

    assert not ray.is_initialized()
    os.environ.setdefault("RAY_worker_niceness", "0")
    context = ray.init(address="local", num_cpus=4, include_dashboard=True, log_to_driver=False,
                       logging_level="WARNING")
    try:
        yield f"http://{context.dashboard_url}"
    finally:
        ray.shutdown()


def _shown_by_ray(api: str) -> str:
    """Everything the state API at api lists about this Ray, as text."""
    from ray.util import state

    listed = {kind: getattr(state, f"list_{kind}")(address=api, detail=True, limit=10_000,
                                                   raise_on_missing_output=False)
              for kind in ("tasks", "actors", "workers", "placement_groups")}
    listed["jobs"] = state.list_jobs(address=api, detail=True, raise_on_missing_output=False)
    return json.dumps(listed, default=str)


def _environments() -> str:
    out = []
    for p in psutil.process_iter():
        try:
            out.append(json.dumps(p.environ()))
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return "\n".join(out)


def test_credentials_and_tokens_are_not_shown_by_ray(ray_with_dashboard, s3_server, tiny_model, tmp_path):
    bucket = s3_server.bucket()
    rows = [{"id": i, "prompt": f"row {i}"} for i in range(6)]
    write_shards(tmp_path / "in", [rows])
    s3_server.upload(tmp_path / "in", f"{bucket}/in")
    secret_out = f"s3://{KEY}:{SECRET}@{bucket.removeprefix('s3://')}/out"
    spec = load_spec(data={"input": {"path": f"{bucket}/in"}, "output": {"path": secret_out},
                           "model": {"source": str(tiny_model), "engine_kwargs": {"hf_token": HF_TOKEN}},
                           "task": {"head": "chat"}, "sampling": {"max_tokens": 3}, "resources": {"batch_size": 2}})
    report = run_job(spec, progress=False, engine_factory=fake_engine_factory())
    assert report.exit_code == EXIT_OK, report.message
    assert sorted(ids_out(f"{bucket}/out")) == list(range(6))
    shown = _shown_by_ray(ray_with_dashboard)
    assert "runtime_env" in shown and "MapBatches(InferenceWorker)" in shown  # the listing is real
    for secret in (SECRET, HF_TOKEN):
        assert secret not in shown, "a secret is listed by Ray's state API"
        assert secret not in _environments(), "a secret is in a process's environment"


def test_the_runs_log_is_readable_by_its_owner_only(tmp_path, monkeypatch):
    from pipeline import cli

    monkeypatch.setenv("QWEN_BATCH_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.delenv("QWEN_BATCH_WORKER_LOGS", raising=False)
    with cli.quiet_stderr("job") as path:
        os.write(2, b"a line a library wrote\n")
    assert path is not None and path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
