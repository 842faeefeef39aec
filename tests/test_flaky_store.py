"""A flaky object store is ridden through (issue #27, item 6): every store call of the driver
and the workers retries transient errors (pipeline.io.store_retry); a lock is lost only on
evidence of another holder; a store that keeps failing exits 3, never 2.

The store is the session's moto server behind tests/s3_fault_proxy.py, which answers chosen
requests with 503 SlowDown or 500 InternalError, drops connections, or answers late: bursts
of 4 answers beat the three tries the pipeline gives its S3 client; bursts of 10 s beat the
30-odd tries over ~6 s of the client the code before these retries used (FileSystem.from_uri's
default), so these tests fail on it. AWS_ENDPOINT_URL points at the proxy for this
module (Ray is started after it, so its workers use it too); setup and checks that must not
meet faults go to moto directly (s3_server's helpers)."""

from __future__ import annotations

import json
import os
import time

import pyarrow.fs as pafs
import pytest
import yaml
from conftest import local_ray, run_cli, write_shards
from s3_fault_proxy import fault_proxy

from jobs import ids_out
from pipeline.io.output import OutputStore
from pipeline.io.output_lock import LOCK, LostLockError, OutputLock, check_holder
from pipeline.io.store_retry import StoreUnavailableError
from pipeline.runner import EXIT_CRASHED, EXIT_OK, run_job
from pipeline.spec import load_spec
from pipeline.testing import fake_engine_factory

pytestmark = pytest.mark.faults  # faults injected into the store, with retry backoffs to wait out


@pytest.fixture(scope="module")
def proxy(s3_server):
    """The fault proxy, AWS_ENDPOINT_URL pointing at it for the module, and one Ray started
    after that."""
    with fault_proxy(s3_server) as p:
        saved = os.environ["AWS_ENDPOINT_URL"]
        os.environ["AWS_ENDPOINT_URL"] = p.endpoint
        try:
            yield from _with_ray(p)
        finally:
            os.environ["AWS_ENDPOINT_URL"] = saved


def _with_ray(p):
    for _ in local_ray():
        yield p


@pytest.fixture
def faults(proxy):
    proxy.clear()
    yield proxy
    proxy.clear()


@pytest.fixture
def few_attempts(monkeypatch):
    """Retries that give up soon (the CLI run as a subprocess inherits them)."""
    monkeypatch.setenv("QWEN_BATCH_STORE_RETRY_S", "5")
    monkeypatch.setenv("QWEN_BATCH_STORE_BACKOFF_S", "0.05")


def rows(n_shards=3, n_rows=6):
    return [[{"id": s * 100 + i, "prompt": f"shard {s} row {i}"} for i in range(n_rows)] for s in range(n_shards)]


def spec_data(bucket: str, model) -> dict:
    return {"name": "flaky", "input": {"path": f"{bucket}/in"}, "output": {"path": f"{bucket}/out"},
            "model": {"source": str(model)}, "task": {"head": "chat"}, "sampling": {"max_tokens": 4},
            "resources": {"batch_size": 2}}


def put_input(s3_server, bucket, tmp_path, shards):
    write_shards(tmp_path / "in", shards)
    s3_server.upload(tmp_path / "in", f"{bucket}/in")


def test_a_job_through_a_flaky_store_ends_exact(faults, s3_server, s3_bucket, tiny_model, tmp_path):
    shards = rows()
    put_input(s3_server, s3_bucket, tmp_path, shards)
    # 4 faults in a row beat the S3 client's 3 tries: each burst fails one call of ours.
    bursts = [("503", "PUT", r"/out/results/"), ("503", "PUT", r"/out/_commits/"),
              ("503", "PUT", r"/out/_manifest\.json"), ("503", "GET", r"list-type=2.*prefix=out"),
              ("500", "HEAD", r"/out/"), ("drop", "GET", r"/out/_lock\.json"), ("drop", "PUT", r"/out/_lock\.json"),
              ("500", "GET", r"/out/_commits/"), ("503", "GET", r"/in/part-00001")]
    for kind, method, path in bursts:
        faults.inject(kind, 4, method=method, path=path)
    faults.inject("503", seconds=10, method="PUT", path=r"/out/_commits/")  # the first record's write
    faults.inject("slow", 10, delay=0.3)
    report = run_job(load_spec(data=spec_data(s3_bucket, tiny_model)), progress=False,
                     engine_factory=fake_engine_factory())
    assert report.exit_code == EXIT_OK, report.message
    spent = [f for f in faults.faults if f.kind != "slow"]
    assert all((f.count > 5) if f.seconds else (f.count == 0) for f in spent), \
        [(f.kind, f.method, f.path, f.count) for f in spent]  # every burst was met
    faults.clear()
    want = sorted(r["id"] for shard in shards for r in shard)
    assert sorted(ids_out(f"{s3_bucket}/out")) == want  # every row once
    # read directly, as the README says: each id once, no stray file
    got = s3_server.download(f"{s3_bucket}/out/results", tmp_path / "results")
    import pyarrow.parquet as pq
    direct = [i for rel in got for i in pq.read_table(tmp_path / "results" / rel).column("id").to_pylist()]
    assert sorted(direct) == want
    store = OutputStore(f"{s3_bucket}/out")
    assert store.garbage() == []
    manifest = store.read_manifest()
    assert manifest["status"] == "complete" and manifest["totals"] == {"rows": 18, "results": 18, "errors": 0}
    assert not s3_server.exists(f"{s3_bucket}/out/{LOCK}")


def test_a_commit_record_write_that_gets_503s_is_retried_and_lands(faults, s3_server, s3_bucket):
    store = OutputStore(f"{s3_bucket}/out")
    faults.inject("503", seconds=10, method="PUT", path=r"/_commits/")
    record = {"name": "a.parquet", "files": {"results": [], "errors": [], "metrics": []}}
    store.commit(record)
    assert faults.injected("503") > 5
    assert json.loads(s3_server.read(f"{s3_bucket}/out/_commits/a.parquet.json")) == record


def test_a_lock_read_that_fails_a_few_times_does_not_lose_the_lock(faults, s3_bucket):
    store = OutputStore(f"{s3_bucket}/out")
    lock = OutputLock(store.fs, store.root, "run-1")
    lock.acquire()
    try:
        faults.inject("500", 4, method="HEAD", path=r"/_lock\.json")
        faults.inject("drop", 4, method="GET", path=r"/_lock\.json")
        faults.inject("503", seconds=10, method="HEAD", path=r"/_lock\.json")
        check_holder(store.fs, store.root, "run-1")  # the fencing check of workers and the driver
        lock.verify()
        assert faults.injected("500") == 4 and faults.injected("drop") == 4 and faults.injected("503") > 5
    finally:
        lock.release()


def test_a_lock_read_that_keeps_failing_is_a_store_failure_not_a_lost_lock(faults, s3_bucket, few_attempts):
    store = OutputStore(f"{s3_bucket}/out")
    lock = OutputLock(store.fs, store.root, "run-1")
    lock.acquire()
    try:
        faults.inject("503", 1000, method="HEAD", path=r"/_lock\.json")
        with pytest.raises(StoreUnavailableError, match="kept failing") as e:
            check_holder(store.fs, store.root, "run-1")
        assert not isinstance(e.value, LostLockError) and "lost the lock" not in str(e.value)
    finally:
        faults.clear()
        lock.release()


def test_a_lock_that_names_another_run_or_is_gone_is_lost(faults, s3_server, s3_bucket):
    store = OutputStore(f"{s3_bucket}/out")
    s3_server.write(f"{s3_bucket}/out/{LOCK}", json.dumps({"run_id": "run-2"}).encode())
    with pytest.raises(LostLockError, match="now held by run-2"):
        check_holder(store.fs, store.root, "run-1")
    s3_server.delete(f"{s3_bucket}/out/{LOCK}")
    with pytest.raises(LostLockError, match="lost the lock"):
        check_holder(store.fs, store.root, "run-1")


def test_missing_objects_and_buckets_are_not_retried(faults, s3_bucket):
    store = OutputStore(f"{s3_bucket}/out")
    start = time.monotonic()
    with pytest.raises(FileNotFoundError):
        store.fs.open_input_stream(store.abs("nothing.json"))
    gone = OutputStore("s3://no-such-bucket-flaky/out")
    with pytest.raises(OSError, match="NO_SUCH_BUCKET") as e:
        gone.fs.get_file_info(pafs.FileSelector(gone.root, recursive=True))
    assert not isinstance(e.value, StoreUnavailableError)
    assert time.monotonic() - start < 5
    assert len(faults.log) <= 4  # one try each (the client's own included)


@pytest.mark.parametrize("failing", ["input", "output"])
def test_a_planning_read_that_keeps_failing_exits_3_not_2(failing, faults, s3_server, s3_bucket, tiny_model,
                                                          tmp_path, few_attempts):
    put_input(s3_server, s3_bucket, tmp_path, rows(1, 2))
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(spec_data(s3_bucket, tiny_model)))
    prefix = "in" if failing == "input" else r"out%2F_commits"
    faults.inject("503", 100_000, method="GET", path=rf"list-type=2.*prefix={prefix}")
    done = run_cli("run", str(spec), "--no-progress", timeout=120)
    err = " ".join(done.stderr.split())
    assert done.returncode == EXIT_CRASHED, err[-2000:]
    assert "the object store kept failing" in err and "rerun the same command to resume" in err
    assert "SLOW_DOWN" in err and "cannot be read:" not in err
    assert faults.injected("503") > 3  # more than one attempt of the client's 3 tries
