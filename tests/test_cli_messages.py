"""What the CLI says is true in the situation that produces it: an input it cannot reach is
an input error (exit 2, nothing ran), an unexpected error while checking a job does not claim
a crashed run or commits, a crash during a run does; and a run's console carries only our
lines, Ray's going to a log file (the end-to-end check of that is in test_chat_job.py)."""

import os
import time

import pytest
import yaml
from conftest import run_cli

from pipeline import cli


@pytest.fixture
def spec_file(tmp_path, tiny_model):
    def make(input_path):
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump({"input": {"path": str(input_path)}, "output": {"path": str(tmp_path / "out")},
                                        "model": {"source": str(tiny_model)}, "task": {"head": "chat"}}))
        return str(path)

    return make


@pytest.mark.parametrize("command", [("validate",), ("run", "--dry-run")])
def test_an_input_it_cannot_reach_is_an_input_error(command, spec_file, monkeypatch, tmp_path):
    # No S3 listens on port 1: pyarrow fails to connect at once (and retries a few times).
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    start = time.time()
    proc = run_cli(*command, spec_file("s3://nonexistent-bucket/x"), timeout=60)
    assert time.time() - start < 30
    assert proc.returncode == 2, proc.stderr
    err = " ".join(proc.stderr.split())
    assert "input.path s3://nonexistent-bucket/x cannot be read:" in err
    assert "Could not connect" in err or "connect" in err.lower()  # why
    for claim in ("crash", "Committed", "rerun the same command", "resume"):
        assert claim not in err
    assert not (tmp_path / "out").exists()


def test_unknown_scheme_is_an_input_error(spec_file, capsys):
    assert cli.main(["validate", spec_file("nosuchfs://bucket/x")]) == 2
    err = capsys.readouterr().err
    assert "input.path nosuchfs://bucket/x cannot be read" in err and "crash" not in err


def plan_job(*args, **kwargs):  # stands in for the real one: an unexpected error while checking
    raise RuntimeError("something unexpected")


def test_an_unexpected_error_while_checking_claims_no_crash_or_commits(spec_file, tmp_path, monkeypatch, capsys):
    import pipeline.plan
    import pipeline.runner

    monkeypatch.setattr(pipeline.runner, "plan_job", plan_job)
    monkeypatch.setattr(pipeline.plan, "plan_job", plan_job)
    monkeypatch.setenv("QWEN_BATCH_LOG_DIR", str(tmp_path / "logs"))
    spec = spec_file(tmp_path / "in")
    for argv in (["validate", spec], ["run", "--dry-run", spec], ["run", spec]):
        code = cli.main(argv)
        err = " ".join(capsys.readouterr().err.split())
        assert code == 3, argv
        assert "checking the job failed before anything ran (nothing was written): RuntimeError: " \
               "something unexpected" in err, argv
        for claim in ("crashed", "Committed", "resume"):
            assert claim not in err, argv


def _run_locked(*args, **kwargs):  # stands in for the runner's: the run had started writing
    raise RuntimeError("engine fell over")


def test_a_crash_during_a_run_says_committed_shards_are_kept(spec_file, tmp_path, monkeypatch, capsys):
    import pipeline.runner

    monkeypatch.setattr(pipeline.runner, "run_job", lambda *a, **k: _run_locked())
    monkeypatch.setenv("QWEN_BATCH_LOG_DIR", str(tmp_path / "logs"))
    assert cli.main(["run", spec_file(tmp_path / "in")]) == 3
    err = " ".join(capsys.readouterr().err.split())
    assert "the run crashed: RuntimeError: engine fell over" in err
    assert "Committed shards are kept; rerun the same command to resume" in err


def test_other_commands_do_not_talk_about_runs(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2  # no committed shards there
    err = capsys.readouterr().err
    assert "no committed shards" in err and "crash" not in err and "resume" not in err


def test_quiet_stderr_sends_fd_2_and_warnings_to_the_log(tmp_path, monkeypatch, capfd):
    import warnings

    monkeypatch.setenv("QWEN_BATCH_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.delenv("QWEN_BATCH_WORKER_LOGS", raising=False)
    with cli.quiet_stderr("job") as path:
        os.write(2, b"[E core_worker.cc] written to the descriptor directly\n")
        warnings.warn("a RayDeprecationWarning-like warning", stacklevel=1)
        cli.console.print("our own line")
    err = capfd.readouterr().err.splitlines()
    assert err == ["our own line", f"Ray and vLLM messages of this run: {path}"]
    log = path.read_text()
    assert "core_worker.cc" in log and "RayDeprecationWarning-like" in log
    os.write(2, b"after\n")  # the descriptor is back
    assert capfd.readouterr().err == "after\n"


def test_quiet_stderr_sends_the_raylets_warnings_to_the_log(tmp_path, monkeypatch, capfd):
    """Ray's driver prints the raylet's warnings (too many workers started, ...) with print()
    to sys.stdout, whatever log_to_driver says: they belong in the run's log, not the console."""
    from ray._private.worker import print_to_stdstream

    monkeypatch.setenv("QWEN_BATCH_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.delenv("QWEN_BATCH_WORKER_LOGS", raising=False)
    with cli.quiet_stderr("job") as path:
        print_to_stdstream({"lines": ["WARNING: 8 PYTHON worker processes have been started"], "pid": "raylet",
                            "is_err": False}, ignore_prefix=False)
    out = capfd.readouterr()
    assert out.out == "" and out.err == f"Ray and vLLM messages of this run: {path}\n"
    assert "8 PYTHON worker processes" in path.read_text()
    print("after")  # sys.stdout is back
    assert capfd.readouterr().out == "after\n"


def test_quiet_stderr_removes_an_empty_log_and_honours_worker_logs(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("QWEN_BATCH_LOG_DIR", str(tmp_path / "logs"))
    with cli.quiet_stderr("job") as path:
        cli.console.print("only ours")
    assert capfd.readouterr().err == "only ours\n" and not path.exists()
    monkeypatch.setenv("QWEN_BATCH_WORKER_LOGS", "1")  # the user asked to see everything live
    with cli.quiet_stderr("job") as path:
        os.write(2, b"engine line\n")
    assert path is None and capfd.readouterr().err == "engine line\n"


SCHEDULE = cli.Path(__file__).resolve().parent.parent / "jobs" / "schedule"


def test_airflow_example_compiles_without_airflow():
    import py_compile

    py_compile.compile(str(SCHEDULE / "airflow_dag.py"), doraise=True)


@pytest.mark.parametrize("codes, tries, mailed", [
    ("0", 1, None), ("3 3 0", 3, None), ("3 3 3", 3, "stopped (exit 3) after 3 tries"),
    ("1", 1, "too many error rows (exit 1)"), ("2", 1, "invalid job or output busy (exit 2)"),
    ("3 2", 2, "invalid job or output busy (exit 2)")])
def test_crontab_example_retries_on_3_and_mails_on_1_and_2(tmp_path, codes, tries, mailed):
    """The crontab line itself, under /bin/sh, with qwen-batch, sleep and mail replaced by stubs."""
    import subprocess

    line = next(x for x in (SCHEDULE / "crontab.example").read_text().splitlines()
                if x.strip() and not x.startswith("#"))
    command = line.split(None, 5)[5].replace("/srv/qwen-batch", str(tmp_path))
    (tmp_path / "logs").mkdir()
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / "codes").write_text(codes)
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for path, body in ((tmp_path / ".venv" / "bin" / "qwen-batch",  # exits with the next code
                        'set -- $(cat codes); echo "$*" >> calls; echo "run $1"; c=$1; shift; echo "$*" > codes; '
                        'exit $c'),
                       (stubs / "sleep", "exit 0"),
                       (stubs / "mail", 'echo "$2" > mailed; cat > /dev/null')):
        path.write_text("#!/bin/sh\n" + body + "\n")
        path.chmod(0o755)
    proc = subprocess.run(["/bin/sh", "-c", command], cwd=tmp_path, timeout=30,
                          env={"PATH": f"{stubs}:/usr/bin:/bin"}, capture_output=True, text=True)
    assert len((tmp_path / "calls").read_text().splitlines()) == tries, proc.stderr
    assert "run" in (tmp_path / "logs" / "chat-cron.log").read_text()
    if mailed is None:
        assert not (tmp_path / "mailed").exists()
    else:
        assert (tmp_path / "mailed").read_text().strip().endswith(mailed)


def test_uint64_ids_above_int64_are_an_input_error_naming_the_file(spec_file, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "in").mkdir()
    ids = pa.array([1, 2**63 + 5, 2**64 - 1], pa.uint64())
    pq.write_table(pa.table({"id": ids, "prompt": ["a", "b", "c"]}), tmp_path / "in" / "part-0.parquet")
    pq.write_table(pa.table({"id": pa.array([7, 8], pa.uint64()), "prompt": ["d", "e"]}),
                   tmp_path / "in" / "part-1.parquet")
    spec = spec_file(tmp_path / "in")
    for argv in (["validate", spec], ["run", "--dry-run", spec]):
        code = cli.main(argv)
        err = " ".join(capsys.readouterr().err.split())
        assert code == 2, err
        assert f"{tmp_path / 'in' / 'part-0.parquet'}: id column 'id' holds unsigned 64-bit ids up to " \
               f"{2**64 - 1}" in err and "write the ids as strings" in err
        assert "part-1.parquet" not in err  # small uint64 ids are fine
