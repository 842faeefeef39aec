"""Exactly once, where users keep their data (issue #12, items 2-6): every input row ends as
exactly one committed result or error row, on local disk and on S3 (the local moto server),
through a driver killed at every step of a commit, a paused driver whose lock was taken over,
inputs added, renamed, removed and rewritten, and an --overwrite cut short.

The engine is the instant fake (pipeline.testing): these tests are about the output, not the
model. What a reader is told to trust is checked the way readers read: through the commit
records (jobs.ids_out, OutputStore.read_committed)."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import local_ray, run_cli, write_shards
from rich.console import Console

from jobs import ids_out, spec_maker
from pipeline.io.output import KINDS, OutputStore
from pipeline.io.output_lock import LOCK, OutputBusyError
from pipeline.io.shards import InputError
from pipeline.io.sink import FAULT_AT
from pipeline.plan import plan_job
from pipeline.runner import EXIT_CRASHED, EXIT_OK, EXIT_TOO_MANY_ERRORS, run_job
from pipeline.testing import fake_engine_factory

FAULT_POINTS = ("before-metrics", "before-record", "after-record", "before-manifest")
MODEL: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _model(tiny_model, s3_server):
    """The model's config (the engine is the fake), and one Ray for this module's in-process
    runs: run_job joins a Ray that is up and leaves it running, which saves starting one per
    run. Started after the S3 variables are set, so that its workers reach the S3 server.
    Drivers run as subprocesses start their own, as users' runs do."""
    MODEL["source"] = str(tiny_model)
    yield from local_ray()


make_spec = spec_maker(model=MODEL, output={"rows_per_file": 2}, sampling={"max_tokens": 3},
                       resources={"batch_size": 2})


def rows_of(n_shards: int, n_rows: int) -> list[list[dict]]:
    return [[{"id": f"s{s}-{i}", "prompt": f"shard {s} row {i}"} for i in range(n_rows)] for s in range(n_shards)]


def expected_by_name(shards: list[list[dict]]) -> dict[str, list]:
    """Shard name (as conftest.write_shards names the files) -> its ids, sorted."""
    return {f"part-{s:05d}.parquet": sorted(r["id"] for r in rows) for s, rows in enumerate(shards)}


class Place:
    """Where a test keeps its input and output: a local folder or a fresh S3 bucket."""

    def __init__(self, kind: str, tmp: Path, server=None):
        self.kind, self.tmp, self.server = kind, tmp, server
        self.base = server.bucket() if server else str(tmp)

    def uri(self, rel: str) -> str:
        return f"{self.base}/{rel}"

    def put_shards(self, rel: str, shards: list[list[dict]]) -> str:
        local = self.tmp / "src" / rel if self.server else self.tmp / rel
        write_shards(local, shards)
        if self.server:
            self.server.upload(local, self.uri(rel))
        return self.uri(rel)

    def write(self, uri: str, data: bytes) -> None:
        store = OutputStore(uri.rsplit("/", 1)[0])
        if store.local:
            store.fs.create_dir(store.root, recursive=True)
        with store.fs.open_output_stream(store.abs(uri.rsplit("/", 1)[1])) as f:
            f.write(data)


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path):
    server = request.getfixturevalue("s3_server") if request.param == "s3" else None
    return Place(request.param, tmp_path, server)


def assert_trusted_is_whole(out: str, expected: dict[str, list]) -> dict[str, dict]:
    """Every commit record's files exist and hold exactly the ids of its shard (once each),
    with one metrics row; returns the records."""
    store = OutputStore(out)
    records = store.records()
    for name, record in records.items():
        ids = [i for kind in ("results", "errors") for f in record["files"][kind]
               for i in store.read_table(f).column("id").to_pylist()]
        assert sorted(ids) == expected[name], f"record {name} does not hold exactly its shard's ids"
        assert record["rows"] == len(ids) == record["results"] + record["errors"]
        assert [store.read_table(f).num_rows for f in record["files"]["metrics"]] == [1]
        assert set(record["files"]) == set(KINDS)
    return records


def assert_exact(out: str, shards: list[list[dict]]) -> None:
    ids = ids_out(out)
    assert sorted(ids) == sorted(r["id"] for rows in shards for r in rows), "an id is missing or duplicated"


# -- the driver in its own process -----------------------------------------------------------

DRIVER = """
import sys
from pipeline.runner import run_job
from pipeline.spec import load_spec
from pipeline.testing import fake_engine_factory
report = run_job(load_spec(sys.argv[1]), progress=False, engine_factory=fake_engine_factory(delay=float(sys.argv[2])))
sys.exit(report.exit_code)
"""


def spec_file(tmp: Path, spec, name="job.yaml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    return path


def start_driver(path: Path, *, delay: float = 0.0, fault: str | None = None, **extra_env) -> subprocess.Popen:
    """run_job with the fake engine in its own process group; stdout and stderr to files."""
    env = {**{k: v for k, v in os.environ.items() if k != FAULT_AT}, **extra_env}
    if fault:
        env[FAULT_AT] = fault
    log = path.parent / f"driver-{time.monotonic_ns()}"
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(path), str(delay)], env=env,
                            start_new_session=True, stdout=open(f"{log}.out", "w"),
                            stderr=open(f"{log}.err", "w"))
    proc.log = log
    return proc


def stderr_of(proc) -> str:
    return Path(f"{proc.log}.err").read_text(errors="replace")


def kill_leftovers(proc: subprocess.Popen) -> None:
    """The driver's process group and every process of its session (Ray's, the engines')."""
    for sig_target in (lambda: os.killpg(proc.pid, signal.SIGKILL),):
        try:
            sig_target()
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == proc.pid:
                p.kill()
        except (psutil.NoSuchProcess, ProcessLookupError, PermissionError):
            pass


def signal_run(proc: subprocess.Popen, sig: int) -> None:
    """Send sig to the driver and every process of its session (its Ray and engines)."""
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == proc.pid:
                p.send_signal(sig)
        except (psutil.NoSuchProcess, ProcessLookupError, PermissionError):
            pass


def wait(proc: subprocess.Popen, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_leftovers(proc)
        raise AssertionError(f"the driver did not end in {timeout} s:\n{stderr_of(proc)[-3000:]}") from None


# -- 2. a driver killed at every step of a shard's commit ------------------------------------

@pytest.mark.faults
@pytest.mark.parametrize("step", FAULT_POINTS)
def test_driver_killed_at_each_commit_step_then_rerun_is_exact(place, step):
    shards = rows_of(3, 4)
    inp, out = place.put_shards("in", shards), place.uri("out")
    path = spec_file(place.tmp, make_spec(inp, out))
    proc = start_driver(path, fault=step)
    try:
        code = wait(proc)
    finally:
        kill_leftovers(proc)
    assert code == -signal.SIGKILL, f"the driver was not killed at {step} ({code}):\n{stderr_of(proc)[-3000:]}"

    # what a reader trusts is whole: the first shard's commit was cut at `step`
    records = assert_trusted_is_whole(out, expected_by_name(shards))
    assert len(records) == {"before-metrics": 0, "before-record": 0, "after-record": 1, "before-manifest": 3}[step]
    first_run = {name: r["run_id"] for name, r in records.items()}
    assert OutputStore(out).read_manifest()["status"] == "running"

    again = run_job(make_spec(inp, out), progress=False, engine_factory=fake_engine_factory())
    assert again.exit_code == EXIT_OK, again.message
    assert again.skipped_shards == len(first_run)
    assert_exact(out, shards)
    store = OutputStore(out)
    records = assert_trusted_is_whole(out, expected_by_name(shards))
    assert {n: records[n]["run_id"] for n in first_run} == first_run  # committed shards were not redone
    assert store.garbage() == []
    manifest = store.read_manifest()
    assert manifest["status"] == "complete" and manifest["totals"] == {"rows": 12, "results": 12, "errors": 0}
    assert all(e["status"] == "committed" for e in manifest["shards"]) and len(manifest["shards"]) == 3


# -- 3. split brain: a paused driver whose lock was taken over -------------------------------

@pytest.mark.faults
def test_paused_run_that_lost_its_lock_writes_nothing_more(place):
    shards = rows_of(6, 4)
    inp, out = place.put_shards("in", shards), place.uri("out")
    spec = make_spec(inp, out, resources={"rows_in_flight": 2})
    a = start_driver(spec_file(place.tmp, spec), delay=2.0)
    store = OutputStore(out)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and a.poll() is None and not store.records():
            time.sleep(0.2)
        assert a.poll() is None, f"run A ended before it could be paused:\n{stderr_of(a)[-3000:]}"
        assert store.records(), "run A committed nothing in time"
        # A paused (a machine suspended, a VM migrated): the driver and its Ray all stop.
        # (A driver paused alone loses its Ray GCS connection after 60 s and Ray ends it
        # with exit 1 when it resumes, before any of our code runs.)
        signal_run(a, signal.SIGSTOP)
        holder = json.loads(store.fs.open_input_stream(store.abs(LOCK)).read())
        # A's lock, as a machine paused for 10 minutes leaves it
        place.write(place.uri(f"out/{LOCK}"), json.dumps({**holder, "heartbeat_at": time.time() - 600}).encode())

        console = Console(file=io.StringIO(), width=300)
        b = run_job(spec, progress=False, engine_factory=fake_engine_factory(), console=console)
        log = console.file.getvalue()
        assert b.exit_code == EXIT_OK, b.message
        assert f"run {holder['run_id']} on " in log and "has not been seen for 10 min" in log
        manifest = store.read_manifest()
        assert manifest["run_id"] == b.run_id and manifest["status"] == "complete"
        assert_exact(out, shards)

        signal_run(a, signal.SIGCONT)
        code = wait(a, timeout=150)
    finally:
        signal_run(a, signal.SIGCONT)
        kill_leftovers(a)
    err = stderr_of(a)
    assert code != 0, f"run A ended with {code}:\n{err[-3000:]}"
    # B's outcome stands, the output is exact, and A left at most files no record names
    manifest = store.read_manifest()
    assert manifest["run_id"] == b.run_id and manifest["status"] == "complete"
    assert manifest["totals"] == {"rows": 24, "results": 24, "errors": 0}
    assert_exact(out, shards)
    assert_trusted_is_whole(out, expected_by_name(shards))
    assert all(f.rsplit("/", 1)[1].startswith(holder["run_id"]) for f in store.garbage())
    assert not store.fs.get_file_info(store.abs(LOCK)).is_file  # nobody holds it now
    assert code == EXIT_CRASHED, f"run A ended with {code}:\n{err[-3000:]}"
    assert f"run {holder['run_id']} lost the lock" in err and "the other run's output stands" in err


def test_unreadable_lock_is_busy_not_stale(place):
    inp, out = place.put_shards("in", rows_of(1, 2)), place.uri("out")
    place.write(place.uri(f"out/{LOCK}"), b"\x00{\"run_id\": \"half-wri")  # fresh and garbled
    with pytest.raises(OutputBusyError, match="cannot be read"):
        run_job(make_spec(inp, out), progress=False, engine_factory=fake_engine_factory())
    store = OutputStore(out)
    assert store.fs.open_input_stream(store.abs(LOCK)).read().startswith(b"\x00{")  # left alone
    assert store.records() == {} and store.read_manifest() is None


# -- 4. stable, collision-free names; orphaned outputs ---------------------------------------

def test_adding_a_same_named_file_elsewhere_renames_nothing(tmp_path):
    d1 = [{"id": f"d1-{i}", "prompt": f"one {i}"} for i in range(4)]
    d2 = [{"id": f"d2-{i}", "prompt": f"two {i}"} for i in range(4)]
    d3 = [{"id": f"d3-{i}", "prompt": f"three {i}"} for i in range(4)]

    def put(folder, rows):
        (tmp_path / "in" / folder).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in" / folder / "part-0.parquet")

    put("d1", d1)
    spec = make_spec(str(tmp_path / "in"), str(tmp_path / "out"))
    first = run_job(spec, progress=False, engine_factory=fake_engine_factory())
    assert first.exit_code == EXIT_OK
    put("d2", d2)
    again = run_job(spec, progress=False, engine_factory=fake_engine_factory())
    assert again.exit_code == EXIT_OK and again.skipped_shards == 1 and again.totals.rows == 4
    assert sorted(ids_out(str(tmp_path / "out"))) == sorted(r["id"] for r in d1 + d2)
    assert set(OutputStore(str(tmp_path / "out")).records()) == {"d1/part-0.parquet", "d2/part-0.parquet"}

    # d1's input goes, d3 comes: d1's output is orphaned, reported, and not counted
    (tmp_path / "in" / "d1" / "part-0.parquet").unlink()
    put("d3", d3)
    path = spec_file(tmp_path, spec)
    dry = run_cli("run", "--dry-run", str(path))
    assert dry.returncode == 0, dry.stderr
    assert "Orphaned: 1 committed shard(s)" in dry.stderr and "d1/part-0.parquet" in dry.stderr
    assert "Plan: 1 shard(s) and 4 rows to run (1 already committed" in dry.stderr
    third = run_job(spec, progress=False, engine_factory=fake_engine_factory())
    assert third.exit_code == EXIT_OK and third.totals.rows == 4
    manifest = OutputStore(str(tmp_path / "out")).read_manifest()
    assert manifest["orphaned"] == ["d1/part-0.parquet"]
    assert manifest["totals"] == {"rows": 8, "results": 8, "errors": 0}
    assert [e["name"] for e in manifest["shards"]] == ["d2/part-0.parquet", "d3/part-0.parquet"]

    # only an input removed (nothing new to run): the manifest still stops counting it
    (tmp_path / "in" / "d2" / "part-0.parquet").unlink()
    fourth = run_job(spec, progress=False, engine_factory=fake_engine_factory())
    assert fourth.exit_code == EXIT_OK
    manifest = OutputStore(str(tmp_path / "out")).read_manifest()
    assert manifest["orphaned"] == ["d1/part-0.parquet", "d2/part-0.parquet"]
    assert manifest["totals"] == {"rows": 4, "results": 4, "errors": 0}


def test_names_that_used_to_collide_are_committed_apart(tmp_path):
    one = [{"id": f"one-{i}", "prompt": f"one {i}"} for i in range(3)]
    two = [{"id": f"two-{i}", "prompt": f"two {i}"} for i in range(3)]
    for rel, rows in (("a/b__x.parquet", one), ("a__b/x.parquet", two)):
        (tmp_path / "in" / rel).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in" / rel)
    out = str(tmp_path / "out")
    report = run_job(make_spec(str(tmp_path / "in"), out), progress=False, engine_factory=fake_engine_factory())
    assert report.exit_code == EXIT_OK and report.totals.rows == 6
    records = assert_trusted_is_whole(out, {"a/b__x.parquet": sorted(r["id"] for r in one),
                                            "a__b/x.parquet": sorted(r["id"] for r in two)})
    assert set(records) == {"a/b__x.parquet", "a__b/x.parquet"}
    assert sorted(ids_out(out)) == sorted(r["id"] for r in one + two)


# -- 5. a rewritten input is noticed; 6. resumed_anyway stays visible ------------------------

def test_rewritten_input_with_same_size_and_rows_is_refused_unless_resume_anyway(tmp_path):
    def write(name, rows):
        (tmp_path / "in").mkdir(exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in" / name, compression="none")

    rows = [{"id": i, "prompt": f"question number {i}"} for i in range(4)]
    write("a.parquet", rows)
    spec = make_spec(str(tmp_path / "in"), str(tmp_path / "out"))
    assert run_job(spec, progress=False, engine_factory=fake_engine_factory()).exit_code == EXIT_OK
    size = (tmp_path / "in" / "a.parquet").stat().st_size
    rows[2]["prompt"] = "question numbex 2"  # one character, same length
    write("a.parquet", rows)
    assert (tmp_path / "in" / "a.parquet").stat().st_size == size  # same size, same rows
    with pytest.raises(InputError, match="input shard .*a.parquet changed since it was processed.*--resume-anyway"):
        run_job(spec, progress=False, engine_factory=fake_engine_factory())
    with pytest.raises(InputError, match="changed since it was processed"):
        plan_job(spec)  # validate and --dry-run refuse it the same way

    kept = run_job(spec, resume_anyway=True, progress=False, engine_factory=fake_engine_factory())
    assert kept.exit_code == EXIT_OK and kept.skipped_shards == 1
    manifest = OutputStore(str(tmp_path / "out")).read_manifest()
    assert manifest["resumed_anyway"] and [k["name"] for k in manifest["kept"]] == ["a.parquet"]

    # later runs of the same spec, without the flag: the kept shard stays accepted and visible
    write("b.parquet", [{"id": 10 + i, "prompt": f"more {i}"} for i in range(2)])
    later = run_job(spec, progress=False, engine_factory=fake_engine_factory())
    assert later.exit_code == EXIT_OK and later.skipped_shards == 1 and later.totals.rows == 2
    manifest = OutputStore(str(tmp_path / "out")).read_manifest()
    assert manifest["run_id"] == later.run_id and manifest["resumed_anyway"]
    assert [k["name"] for k in manifest["kept"]] == ["a.parquet"]
    assert sorted(ids_out(str(tmp_path / "out"))) == [0, 1, 2, 3, 10, 11]
    nothing = run_job(spec, progress=False, engine_factory=fake_engine_factory())
    assert nothing.message == "nothing to do"
    assert OutputStore(str(tmp_path / "out")).read_manifest()["resumed_anyway"]


def test_new_weights_at_the_same_path_are_refused_unless_resume_anyway(tmp_path, tiny_model):
    """A checkpoint re-exported in place (same path, same spec): resuming would mix two models'
    rows in one output, so the run refuses and names what changed."""
    from test_weights import retrain

    model = shutil.copytree(tiny_model, tmp_path / "model")
    write_shards(tmp_path / "in", [[{"id": i, "prompt": f"q {i}"} for i in range(3)]])
    spec = spec_maker(model={"source": str(model)}, sampling={"max_tokens": 3})(
        str(tmp_path / "in"), str(tmp_path / "out"))
    assert run_job(spec, progress=False, engine_factory=fake_engine_factory()).exit_code == EXIT_OK
    retrain(model)
    pq.write_table(pa.Table.from_pylist([{"id": 10, "prompt": "more"}]), tmp_path / "in" / "part-00001.parquet")
    with pytest.raises(InputError, match=r"shard part-00000.parquet was committed with other weights: model.source "
                                         r"changed since .*--resume-anyway"):
        run_job(spec, progress=False, engine_factory=fake_engine_factory())
    with pytest.raises(InputError, match="committed with other weights"):
        plan_job(spec)  # validate and --dry-run say it too

    kept = run_job(spec, resume_anyway=True, progress=False, engine_factory=fake_engine_factory())
    assert kept.exit_code == EXIT_OK and kept.skipped_shards == 1 and kept.totals.rows == 1
    store = OutputStore(str(tmp_path / "out"))
    assert [k["name"] for k in store.read_manifest()["kept"]] == ["part-00000.parquet"]
    records = store.records()
    assert records["part-00000.parquet"]["weights"] != records["part-00001.parquet"]["weights"]
    assert run_job(spec, progress=False, engine_factory=fake_engine_factory()).message == "nothing to do"


# -- 6. edge cases ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory, _model):
    """A finished local run over 3 shards: (tmp, shards); tests copy its output."""
    tmp = tmp_path_factory.mktemp("finished")
    shards = rows_of(3, 4)
    write_shards(tmp / "in", shards)
    report = run_job(make_spec(str(tmp / "in"), str(tmp / "out")), progress=False,
                     engine_factory=fake_engine_factory())
    assert report.exit_code == EXIT_OK
    return tmp, shards


class _Fs:
    """A filesystem that delegates to a real one, with some calls replaced."""

    def __init__(self, real, **replaced):
        self._real, self._replaced = real, replaced

    def __getattr__(self, name):
        return self._replaced.get(name) or getattr(self._real, name)


def test_overwrite_cut_short_never_leaves_records_without_files(finished, tmp_path):
    src, shards = finished
    shutil.copytree(src / "out", tmp_path / "out")
    spec = make_spec(str(src / "in"), str(tmp_path / "out"))
    store = OutputStore(str(tmp_path / "out"))
    real, calls = store.fs, []

    def delete_dir_contents(path, **kw):
        calls.append(path)
        if len(calls) > 1:
            raise OSError("the driver died here")
        real.delete_dir_contents(path, **kw)

    store.fs = _Fs(real, delete_dir_contents=delete_dir_contents)
    with pytest.raises(OSError, match="died here"):
        store.clear()
    assert calls[0] == store.abs("_commits")  # the records go first
    store.fs = real
    assert store.records() == {} and len(store.garbage()) == len(store.files()) > 0
    plan = plan_job(spec)
    assert plan.done == [] and [s.name for s in plan.todo] == sorted(expected_by_name(shards))


def test_nothing_to_do_after_a_failed_run_fails_again(tmp_path):
    write_shards(tmp_path / "in", [[{"id": i, "prompt": "FAIL" if i % 2 else "ok"} for i in range(6)]])
    spec = make_spec(str(tmp_path / "in"), str(tmp_path / "out"), output={"max_error_rate": 0.2})
    first = run_job(spec, progress=False, engine_factory=fake_engine_factory(fail_on=("FAIL",)))
    assert first.exit_code == EXIT_TOO_MANY_ERRORS
    console = Console(file=io.StringIO(), width=300)
    again = run_job(spec, progress=False, engine_factory=fake_engine_factory(), console=console)
    assert again.exit_code == EXIT_TOO_MANY_ERRORS and again.skipped_shards == 1
    assert "3 of 6 rows failed" in again.message
    log = console.file.getvalue()
    assert "Nothing to do" in log and f"the last run ({first.run_id}) ended failed" in log
    assert OutputStore(str(tmp_path / "out")).read_manifest()["run_id"] == first.run_id  # unchanged
    assert sorted(ids_out(str(tmp_path / "out"))) == list(range(6))


def test_manifest_is_never_left_half_written_on_a_full_disk(finished, tmp_path):
    shutil.copytree(finished[0] / "out", tmp_path / "out")
    store = OutputStore(str(tmp_path / "out"))
    before = store.read_manifest()
    assert before["status"] == "complete"

    class Full:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    real = store.fs
    store.fs = _Fs(real, open_output_stream=lambda path, **kw: Full())
    with pytest.raises(OSError, match="No space left"):
        store.write_manifest({**before, "run_id": "next", "status": "running"})
    store.fs = real
    assert store.read_manifest() == before  # the old manifest, whole
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")] == []
