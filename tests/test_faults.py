"""Nothing lost through faults: an engine actor that dies mid-shard, a driver killed mid-run
and rerun. Fake engines fail on cue; the invariant is checked on the real output files."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import read_dir, write_shards
from rich.console import Console

from jobs import ids_out, job_spec, spec_maker
from pipeline.io.output import OutputStore
from pipeline.io.output_lock import OutputBusyError
from pipeline.runner import run_job
from pipeline.testing import fake_engine_factory


def committed(out) -> set[str]:
    """Names of the shards committed in an output folder (their commit records)."""
    return set(OutputStore(str(out)).records()) if out.exists() else set()


# The usual job here: 5 rows a file and a batch, 4 tokens an answer.
spec_for = spec_maker(output={"rows_per_file": 5}, sampling={"max_tokens": 4}, resources={"batch_size": 5})


@pytest.mark.parametrize("fault", ["die_on", "dead_on"], ids=["actor process exits", "engine reports itself dead"])
def test_engine_actor_that_dies_mid_shard_is_restarted_and_its_rows_retried(tmp_path, tiny_model, fault):
    """The actor's process exits, or vLLM raises EngineDeadError: Ray gives the actor a fresh
    engine and its unfinished rows run again; every id lands once, none as an error."""
    rows = [[{"id": s * 100 + i, "prompt": "FAULT now" if (s, i) == (1, 3) else f"row {i}"}
             for i in range(20)] for s in range(3)]
    write_shards(tmp_path / "in", rows)
    factory = fake_engine_factory(**{fault: "FAULT"}, marker=str(tmp_path / "fault"))
    report = run_job(spec_for(tmp_path, model=tiny_model), progress=False, engine_factory=factory)
    assert (tmp_path / "fault").exists(), "the fault was not injected"
    assert report.exit_code == 0 and report.totals.errors == 0
    assert sorted(ids_out(tmp_path / "out")) == sorted(r["id"] for shard in rows for r in shard)


DRIVER = """
import sys
from pipeline.runner import run_job
from pipeline.spec import load_spec
from pipeline.testing import fake_engine_factory
report = run_job(load_spec(sys.argv[1]), progress=False, engine_factory=fake_engine_factory(delay=float(sys.argv[2])))
sys.exit(report.exit_code)
"""


def start_slow_run(tmp_path, tiny_model):
    """A run of the fake engine (0.5 s a row) in its own process, once it committed a shard."""
    import yaml

    spec = spec_for(tmp_path, model=tiny_model, resources={"rows_in_flight": 5})
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(spec_file), "0.5"],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not committed(tmp_path / "out"):
        time.sleep(0.2)
    assert proc.poll() is None, "the first run ended before it could be killed"
    return spec, proc


def test_driver_killed_mid_run_then_rerun_resumes_without_duplicates(tmp_path, tiny_model):
    rows = [[{"id": f"s{s}-{i}", "prompt": f"row {i}"} for i in range(10)] for s in range(8)]
    write_shards(tmp_path / "in", rows)
    spec, proc = start_slow_run(tmp_path, tiny_model)
    # a second run of the same job while the first one writes is refused, touching nothing
    with pytest.raises(OutputBusyError, match=f"being written by another run .*pid {proc.pid} on"):
        run_job(spec, progress=False, engine_factory=fake_engine_factory())
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for p in psutil.process_iter():  # Ray's processes of the killed run
        try:
            if os.getsid(p.pid) == proc.pid:
                p.kill()
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    committed_before = committed(tmp_path / "out")
    assert 0 < len(committed_before) < 8
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["status"] == "running"

    console = Console(file=io.StringIO(), width=200)
    report = run_job(spec, progress=False, engine_factory=fake_engine_factory(), console=console)
    assert f"took over a stale lock on {tmp_path / 'out'}: run " in console.file.getvalue()
    assert "is no longer running" in console.file.getvalue()
    assert not (tmp_path / "out" / "_lock.json").exists()
    assert report.skipped_shards >= len(committed_before)
    ids = ids_out(tmp_path / "out")
    assert len(ids) == len(set(ids)) == 80
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["totals"]["rows"] == 80
    assert all(e["status"] == "committed" for e in manifest["shards"])
    assert OutputStore(str(tmp_path / "out")).garbage() == []  # the killed run's files are gone


@pytest.mark.engine
def test_real_engine_actor_sigkilled_mid_run(tmp_path, tiny_model):
    """SIGKILL the engine actor (real vLLM) once it has committed a shard: Ray restarts it,
    its unfinished rows run again, every id lands once, and no engine process is left."""
    import threading

    from conftest import SESSION_MARK, vllm_processes

    from pipeline.engine.processes import RUN_MARK

    rows = [[{"id": s * 100 + i, "prompt": f"Shard {s} row {i}"} for i in range(12)] for s in range(5)]
    write_shards(tmp_path / "in", rows)
    spec = job_spec(tmp_path, model={"source": str(tiny_model), "max_model_len": 256,
                                     "engine_kwargs": {"enforce_eager": True}},
                    sampling={"max_tokens": 48, "temperature": 0}, resources={"batch_size": 4, "rows_in_flight": 4})
    killed = []

    def killer():
        deadline = time.time() + 400
        while time.time() < deadline and not killed:
            if committed(tmp_path / "out"):
                for p in psutil.process_iter(["cmdline"]):
                    try:
                        cmd = " ".join(p.info["cmdline"] or [])
                        env = p.environ()
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        continue
                    if ("MapWorker" in cmd and RUN_MARK in env
                            and env.get(SESSION_MARK) == os.environ[SESSION_MARK]):
                        p.send_signal(signal.SIGKILL)
                        killed.append(p.pid)
                        return
            time.sleep(0.2)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    report = run_job(spec, progress=False)
    thread.join(timeout=5)
    assert killed, "the engine actor was not found to kill"
    assert report.exit_code == 0
    ids = ids_out(tmp_path / "out")
    assert sorted(ids) == sorted(r["id"] for shard in rows for r in shard)
    assert vllm_processes(run_id=report.run_id) == []


def test_poison_row_that_kills_every_engine_ends_as_one_error_row(tmp_path, tiny_model):
    """A row that kills the engine each time it runs: its batch is retried with rows one at a
    time, the row that was alone when the engine died becomes an engine_died error row, and
    every other row, including its batch mates, gets a result."""
    rows = [[{"id": s * 100 + i, "prompt": "POISON pill" if (s, i) == (1, 2) else f"row {i}"}
             for i in range(12)] for s in range(3)]
    write_shards(tmp_path / "in", rows)
    factory = fake_engine_factory(poison_on="POISON")
    report = run_job(spec_for(tmp_path, model=tiny_model), progress=False, engine_factory=factory)
    assert report.exit_code == 0, report.message
    errors = read_dir(tmp_path / "out" / "errors")
    assert errors.column("id").to_pylist() == [102]
    assert errors.column("error_type").to_pylist() == ["engine_died"]
    assert "died 1 time(s) while running this row alone" in errors.column("error_message")[0].as_py()
    results = read_dir(tmp_path / "out" / "results")
    assert sorted(results.column("id").to_pylist()) == sorted(
        r["id"] for shard in rows for r in shard if r["id"] != 102)
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["totals"] == {"rows": 36, "results": 35, "errors": 1}


def test_two_poison_rows_on_one_replica_fit_the_default_budget_and_are_remembered(tmp_path, tiny_model):
    """The restart budget counts per poison row, not per actor; a rerun after a crash does not
    run a condemned row again (max_engine_restarts 0 there: one more death would stop it)."""
    rows = [[{"id": s * 100 + i, "prompt": "POISON pill" if (s, i) in ((0, 2), (1, 4)) else f"row {i}"}
             for i in range(10)] for s in range(2)]
    write_shards(tmp_path / "in", rows)
    report = run_job(spec_for(tmp_path, model=tiny_model), progress=False,
                     engine_factory=fake_engine_factory(poison_on="POISON"))
    assert report.exit_code == 0, report.message
    errors = read_dir(tmp_path / "out" / "errors").to_pylist()
    assert sorted((e["id"], e["error_type"]) for e in errors) == [(2, "engine_died"), (104, "engine_died")]
    assert len(list((tmp_path / "out" / "_poison").glob("*.json"))) == 2

    # as if the run had crashed before committing: the rerun must not run the poison rows again
    for record in (tmp_path / "out" / "_commits").glob("*.json"):
        record.unlink()
    again = run_job(spec_for(tmp_path, model=tiny_model, resources={"max_engine_restarts": 0}), progress=False,
                    engine_factory=fake_engine_factory(poison_on="POISON"))
    assert again.exit_code == 0, again.message
    errors = read_dir(tmp_path / "out" / "errors").to_pylist()
    assert sorted((e["id"], e["error_type"]) for e in errors) == [(2, "engine_died"), (104, "engine_died")]
    assert sorted(ids_out(tmp_path / "out")) == sorted(r["id"] for shard in rows for r in shard)


def test_poison_row_in_a_block_of_several_batches_is_found_in_steps(tmp_path, tiny_model):
    """An engine actor takes blocks of several batches (one ledger record a block): a poison
    row there is found in three steps (its block, its batch, itself alone), and the three
    deaths are its own allowance: max_engine_restarts 1 (the first death, before anything
    is found, is the run's) finishes the run with one error row."""
    rows = [[{"id": s * 100 + i, "prompt": "POISON pill" if (s, i) == (1, 37) else f"row {i}"}
             for i in range(80)] for s in range(2)]
    write_shards(tmp_path / "in", rows)
    spec = spec_for(tmp_path, model=tiny_model, resources={"batch_size": 5, "max_engine_restarts": 1})
    from pipeline.dataflow import rows_per_block

    assert rows_per_block(spec, 160) == 20  # four batches a block
    report = run_job(spec, progress=False, engine_factory=fake_engine_factory(poison_on="POISON"))
    assert report.exit_code == 0, report.message
    errors = read_dir(tmp_path / "out" / "errors").to_pylist()
    assert [(e["id"], e["error_type"]) for e in errors] == [(137, "engine_died")]
    assert sorted(read_dir(tmp_path / "out" / "results").column("id").to_pylist()) == sorted(
        r["id"] for shard in rows for r in shard if r["id"] != 137)


def test_ledger_counts_a_retried_block_that_dies_again_as_a_poison_row():
    """The budget: a block's first death is the run's; once retried, further deaths are the
    poison row's (up to three), and what ends is no longer counted."""
    from pipeline.io.ledger import PER_POISON_ROW, RowLedger

    ledger = RowLedger(restart_budget=0)
    assert ledger.begin("block") == 0
    assert ledger.restarted() is not None  # a death with nothing found: over a budget of 0
    ledger = RowLedger(restart_budget=0)
    ledger.begin("block")
    assert ledger.begin("block") == 1  # the retry
    assert ledger.begin("batch", block=False) == 0
    for _ in range(PER_POISON_ROW):  # block, batch, and the row alone
        assert ledger.restarted() is None
    assert ledger.begin("other", ended=["block", "batch"]) == 0
    assert ledger.restarted() is not None  # the retried block ended: its allowance went with it


@pytest.fixture
def small_disk(tmp_path):
    """A 112 KiB tmpfs: room for the lock, the manifest and about four of the six shards' files
    (each ~24 KiB in 4 KiB pages: results, metrics with their grading columns, commit record),
    with some shards written at once."""
    mount = tmp_path / "out"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=112k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    # Not a skip: without a real full disk this fault would go untested (CI runs as root).
    assert done.returncode == 0, f"the full-disk test mounts a small tmpfs and needs root: {done.stderr.strip()}"
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_stops_the_run_keeps_whole_shards_and_rerun_finishes(tmp_path, tiny_model, small_disk):
    """The run in its own process (as users run it), into an output that fills up."""
    import yaml

    rows = [[{"id": s * 100 + i, "prompt": f"row {i} " + "word " * 50} for i in range(40)] for s in range(6)]
    write_shards(tmp_path / "in", rows)
    spec = job_spec(tmp_path / "in", small_disk, model=tiny_model, output={"rows_per_file": 40},
                    sampling={"max_tokens": 16}, resources={"batch_size": 10})
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    first = run_driver(spec_file)
    assert first.returncode == 3, first.stderr[-3000:]
    assert "No space left on device" in first.stderr and "rerun the same command" in first.stderr
    store = OutputStore(str(small_disk))
    records = store.records()
    files = sorted((str(f.relative_to(small_disk)), f.stat().st_size) for f in small_disk.rglob("*") if f.is_file())
    # how many shards commit before the disk fills depends on how many were in flight (none, on a
    # loaded machine); what must hold: not all, nothing half-written, whole shards kept, a rerun finishes
    assert len(records) < 6, files
    # nothing half-written is left: every data file belongs to a committed shard
    assert store.garbage(records) == []
    for name, record in records.items():
        s = int(name.split("-")[1].split(".")[0])
        ids = [i for f in record["files"]["results"] for i in read_dir_file(small_disk / f)]
        assert sorted(ids) == [s * 100 + i for i in range(40)]
    assert json.loads((small_disk / "_manifest.json").read_text())["stopped_because"].startswith("cannot write")

    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    again = run_driver(spec_file)
    assert again.returncode == 0, again.stderr[-3000:]
    ids = ids_out(small_disk)
    assert sorted(ids) == sorted(r["id"] for shard in rows for r in shard)
    manifest = json.loads((small_disk / "_manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["totals"]["rows"] == 240


def run_driver(spec_file):
    """run_job with the fake engine in its own process (and process group)."""
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(spec_file), "0"], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def read_dir_file(path):
    import pyarrow.parquet as pq

    return pq.read_table(path).column("id").to_pylist()


def test_a_hung_request_becomes_an_engine_timeout_row(tmp_path, tiny_model):
    """A request the engine never answers must not hang a scheduled job."""
    rows = [[{"id": s * 100 + i, "prompt": "HANG here" if (s, i) == (0, 1) else f"row {i}"} for i in range(6)]
            for s in range(2)]
    write_shards(tmp_path / "in", rows)
    spec = spec_for(tmp_path, model=tiny_model, resources={"row_timeout_s": 2})
    report = run_job(spec, progress=False, engine_factory=fake_engine_factory(hang_on="HANG"))
    assert report.exit_code == 0, report.message
    errors = read_dir(tmp_path / "out" / "errors").to_pylist()
    assert [(e["id"], e["error_type"]) for e in errors] == [(1, "engine_timeout")]
    assert "did not answer within 2 s (resources.row_timeout_s)" in errors[0]["error_message"]
    assert sorted(ids_out(tmp_path / "out")) == sorted(r["id"] for shard in rows for r in shard)


def test_processes_of_a_killed_driver_are_ended_by_the_next_run(tmp_path, tiny_model):
    """Kill only the driver's PID (as a scheduler's timeout would), count what it left
    running, and check that the next run on the same output ends all of it."""
    from pipeline.engine.processes import RUN_MARK

    write_shards(tmp_path / "in", [[{"id": s * 100 + i, "prompt": f"row {i}"} for i in range(10)] for s in range(6)])
    spec, proc = start_slow_run(tmp_path, tiny_model)
    first = json.loads((tmp_path / "out" / "_manifest.json").read_text())["run_id"]

    def left_by(run_id):
        found = []
        for p in psutil.process_iter():
            try:
                if p.environ().get(RUN_MARK) == run_id:
                    found.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        return found

    # counted before the kill: Ray's own reaper may end some of them soon after (on a loaded
    # machine, all of them within the 2 s below), which the next run must not depend on
    marked = left_by(first)
    os.kill(proc.pid, signal.SIGKILL)  # the driver only, not its process group
    proc.wait()
    time.sleep(2)
    assert marked, "the killed driver left nothing running (the test would prove nothing)"
    console = Console(file=io.StringIO(), width=200)
    report = run_job(spec, progress=False, engine_factory=fake_engine_factory(), console=console)
    assert report.exit_code == 0
    leftovers = left_by(first)
    for p in leftovers:  # never leave them to burn the machine, but fail the test
        p.kill()
    assert not leftovers
    assert sorted(ids_out(tmp_path / "out")) == sorted(s * 100 + i for s in range(6) for i in range(10))


def test_a_hung_engine_is_restarted_not_turned_into_timeout_rows(tmp_path, tiny_model):
    """The first engine answers nothing at all: when a batch's deadline passes with no row
    finished on that engine, the actor is restarted with a fresh engine and the rows run
    again; every row gets a result."""
    rows = [[{"id": s * 100 + i, "prompt": f"row {i}"} for i in range(6)] for s in range(2)]
    write_shards(tmp_path / "in", rows)
    spec = spec_for(tmp_path, model=tiny_model, resources={"row_timeout_s": 2})
    report = run_job(spec, progress=False, engine_factory=fake_engine_factory(stall=True, marker=str(tmp_path / "m")))
    assert (tmp_path / "m").exists(), "the hung engine was never built"
    assert report.exit_code == 0 and report.totals.errors == 0, report.message
    assert sorted(ids_out(tmp_path / "out")) == sorted(r["id"] for shard in rows for r in shard)


def test_poison_rows_are_listed_and_retried_by_retry_errors(tmp_path, tiny_model, capsys):
    """A condemned row is listed by `status`; --retry-errors runs it again (the engine bug was
    fixed: it gets a result) and, where it still kills every engine, condemns it again."""
    from pipeline.cli import main
    from pipeline.plan import RetrySelection

    rows = [[{"id": i, "prompt": "POISON pill" if i == 3 else f"row {i}"} for i in range(10)]]
    write_shards(tmp_path / "in", rows)
    spec = spec_for(tmp_path, model=tiny_model)
    assert run_job(spec, progress=False, engine_factory=fake_engine_factory(poison_on="POISON")).exit_code == 0
    capsys.readouterr()
    assert main(["status", str(tmp_path / "out"), "--json"]) == 0
    poison = json.loads(capsys.readouterr().out)["poison_rows"]
    assert [(p["id"], p["deaths"]) for p in poison] == [(3, 1)]

    # still poison: searched for again, one error row again, condemned again
    again = run_job(spec, progress=False, retry=RetrySelection.parse([], all_errors=True),
                    engine_factory=fake_engine_factory(poison_on="POISON"))
    assert again.exit_code == 0, again.message
    assert again.totals.rows == 1 and again.totals.errors == 1
    assert len(list((tmp_path / "out" / "_poison").glob("*.json"))) == 1

    # the engine no longer dies on it: a result, no error row, no poison marker
    fixed = run_job(spec, progress=False, retry=RetrySelection.parse([], all_errors=True),
                    engine_factory=fake_engine_factory(poison_on="NEVER SEEN"))
    assert fixed.exit_code == 0, fixed.message
    assert fixed.totals.rows == 1 and fixed.totals.errors == 0
    assert read_dir(tmp_path / "out" / "errors") is None or read_dir(tmp_path / "out" / "errors").num_rows == 0
    assert sorted(read_dir(tmp_path / "out" / "results").column("id").to_pylist()) == list(range(10))
    assert list((tmp_path / "out" / "_poison").glob("*.json")) == []
    assert main(["status", str(tmp_path / "out")]) == 0
    assert "Poison rows" not in capsys.readouterr().out
