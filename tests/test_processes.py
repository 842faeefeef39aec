"""An engine's shutdown ends the processes the engine started and nothing else of its caller's
(a test session's S3 server, a user's own subprocesses)."""

import os
import subprocess

import psutil
import pytest

from pipeline.engine.processes import (
    DRIVER_MARK,
    OUTPUT_MARK,
    RUN_MARK,
    descendants,
    driver_mark,
    kill_started_since,
    output_id,
    process_identity,
    reap_dead_runs,
)

pytestmark = pytest.mark.unit


def test_only_processes_started_since_are_killed():
    mine = subprocess.Popen(["sleep", "60"], start_new_session=True)  # the caller's own child
    try:
        before = descendants()
        started = subprocess.Popen(["sleep", "60"])  # what "the engine" started
        assert kill_started_since(before) == 1
        started.wait(timeout=10)  # ends at once (killed, then reaped by psutil), not in 60 s
        assert not psutil.pid_exists(started.pid)
        assert psutil.Process(mine.pid).status() != psutil.STATUS_ZOMBIE and mine.poll() is None
    finally:
        mine.kill()
        mine.wait()


def _marked_sleeper(output: str, run_id: str, driver: str) -> subprocess.Popen:
    """A process carrying a run's marks, as that run's Ray workers and vLLM processes do."""
    env = {**os.environ, OUTPUT_MARK: output_id(output), RUN_MARK: run_id, DRIVER_MARK: driver}
    return subprocess.Popen(["sleep", "60"], env=env, start_new_session=True)


def _dead_driver_mark() -> str:
    """The DRIVER_MARK of a driver that has since been killed."""
    driver = subprocess.Popen(["sleep", "60"])
    ident = process_identity(driver.pid)
    driver.kill()
    driver.wait()
    return f"{ident['boot']}:{ident['pidns']}:{ident['pid']}:{ident['started']}"


def test_the_same_relative_output_in_two_folders_is_two_outputs(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    in_a = output_id("out")
    assert in_a == output_id(str(tmp_path / "a" / "out")) == output_id(str(tmp_path / "a" / "out") + "/")
    monkeypatch.chdir(tmp_path / "b")
    assert output_id("out") != in_a
    # credentials are not part of an output's identity, and never appear in it
    assert output_id("s3://KEY:SECRET@bucket/out") == output_id("s3://bucket/out/")
    assert "SECRET" not in output_id("s3://KEY:SECRET@bucket/out")


def test_a_run_reaps_only_processes_of_its_own_output_whose_driver_is_dead(tmp_path):
    out, other = str(tmp_path / "a" / "out"), str(tmp_path / "b" / "out")
    neighbour = _marked_sleeper(other, "neighbour", _dead_driver_mark())  # another folder's job
    live = _marked_sleeper(out, "live-run", driver_mark())  # same output, its driver alive (paused)
    dead = _marked_sleeper(out, "dead-run", _dead_driver_mark())  # left by a killed driver
    remote = _marked_sleeper(out, "remote-run", "another-boot:1:1:1.0")  # its driver on another node
    try:
        assert reap_dead_runs(output_id(out), "this-run") == 1
        dead.wait(timeout=10)
        assert neighbour.poll() is None, "another output's process was killed"
        assert live.poll() is None, "a process whose driver is alive was killed"
        assert remote.poll() is None, "a run whose driver cannot be checked here was killed"
        # ... it is reaped once known dead (its stale lock was taken over)
        assert reap_dead_runs(output_id(out), "this-run", dead=("remote-run",)) == 1
        remote.wait(timeout=10)
    finally:
        for p in (neighbour, live, dead, remote):
            p.kill()
            p.wait()
