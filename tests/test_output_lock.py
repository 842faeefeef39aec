"""One run at a time per output folder; a lock whose run is gone is taken over."""

import json
import socket
import subprocess
import time

import psutil
import pyarrow.fs as pafs
import pytest

from pipeline.engine.processes import process_identity
from pipeline.io import output_lock
from pipeline.io.output_lock import LOCK, OutputBusyError, OutputLock


def lock(tmp_path, run_id):
    return OutputLock(pafs.LocalFileSystem(), str(tmp_path), run_id)


def test_second_run_is_refused_while_the_first_holds_the_output(tmp_path):
    first = lock(tmp_path, "run-a")
    assert first.acquire() is None
    assert json.loads((tmp_path / LOCK).read_text())["run_id"] == "run-a"
    with pytest.raises(OutputBusyError, match=r"being written by another run \(run-a, pid \d+ on .*Wait for it"):
        lock(tmp_path, "run-b").acquire()
    first.release()
    assert not (tmp_path / LOCK).exists()
    second = lock(tmp_path, "run-b")
    assert second.acquire() is None
    second.release()


def dead_identity() -> dict:
    """The identity of a process of this machine that has ended."""
    proc = subprocess.Popen(["sleep", "30"])
    ident = process_identity(proc.pid)
    proc.kill()
    proc.wait()
    return ident


@pytest.mark.parametrize("holder, reason", [
    ({"DEAD": True, "heartbeat_at": "NOW"}, "is no longer running"),
    ({"host": "another-machine", "pid": 1, "heartbeat_at": "HOUR_AGO"}, "has not been seen for 60 min"),
])
def test_stale_lock_is_taken_over_with_a_note(tmp_path, holder, reason):
    values = {"NOW": time.time(), "HOUR_AGO": time.time() - 3600}
    holder = {"run_id": "crashed", **(dead_identity() if holder.pop("DEAD", False) else {}),
              **{k: values.get(v, v) for k, v in holder.items()}}
    note, holder_after = take_over(tmp_path, holder)
    assert reason in note and holder_after == "run-new"


def take_over(tmp_path, holder: dict) -> tuple[str, str]:
    """Write holder's lock, then acquire and release it as run-new: the note acquire gave, and
    the lock's run_id while run-new held it."""
    (tmp_path / LOCK).write_text(json.dumps(holder))
    mine = lock(tmp_path, "run-new")
    try:
        return mine.acquire(), json.loads((tmp_path / LOCK).read_text())["run_id"]
    finally:
        mine.release()


def test_a_killed_run_not_yet_reaped_does_not_keep_its_lock(tmp_path):
    """A holder killed with its parent (a server's job, say) is a zombie until something reaps
    it: still in the process table with its start time, but no longer running."""
    proc = subprocess.Popen(["sleep", "30"])
    try:
        holder = {"run_id": "killed", **process_identity(proc.pid), "heartbeat_at": time.time()}
        proc.kill()
        deadline = time.time() + 10
        while psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE:  # not reaped: no wait() yet
            assert time.time() < deadline
            time.sleep(0.05)
        assert "is no longer running" in take_over(tmp_path, holder)[0]
    finally:
        proc.kill()
        proc.wait()


def test_a_reused_pid_does_not_keep_a_dead_runs_lock(tmp_path):
    """The holder's pid now belongs to another process (started later): the run is dead."""
    reused = subprocess.Popen(["sleep", "30"])
    try:
        holder = {**process_identity(reused.pid), "started": process_identity(reused.pid)["started"] - 100}
        holder = {"run_id": "crashed", **holder, "heartbeat_at": time.time()}
        assert "is no longer running" in take_over(tmp_path, holder)[0]
    finally:
        reused.kill()
        reused.wait()


def test_a_live_run_in_a_container_with_the_same_host_name_keeps_its_lock(tmp_path):
    """Host networking: same host name, another pid namespace, where our pid table says nothing
    of its pid (here: a dead one). Its fresh heartbeat is what counts."""
    holder = {**dead_identity(), "pidns": "4026531999"}
    assert holder["host"] == socket.gethostname()
    (tmp_path / LOCK).write_text(json.dumps({"run_id": "neighbour", **holder, "heartbeat_at": time.time() - 60}))
    with pytest.raises(OutputBusyError, match="neighbour"):
        lock(tmp_path, "run-new").acquire()


def test_live_lock_from_another_machine_is_respected(tmp_path):
    (tmp_path / LOCK).write_text(json.dumps(
        {"run_id": "elsewhere", "host": "another-machine", "pid": 1, "heartbeat_at": time.time() - 60}))
    with pytest.raises(OutputBusyError, match="elsewhere.*another-machine.*delete .*_lock.json"):
        lock(tmp_path, "run-new").acquire()


def test_the_holder_refreshes_its_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(output_lock, "HEARTBEAT_S", 0.05)
    mine = lock(tmp_path, "run-a")
    mine.acquire()
    first = json.loads((tmp_path / LOCK).read_text())["heartbeat_at"]
    time.sleep(0.3)
    assert json.loads((tmp_path / LOCK).read_text())["heartbeat_at"] > first
    mine.release()
    assert not (tmp_path / LOCK).exists()
