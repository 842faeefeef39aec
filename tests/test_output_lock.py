"""One run at a time per output folder; a lock whose run is gone is taken over."""

import json
import socket
import subprocess
import time

import pyarrow.fs as pafs
import pytest

from pipeline import output_lock
from pipeline.output_lock import LOCK, OutputBusyError, OutputLock


def lock(tmp_path, run_id):
    return OutputLock(pafs.LocalFileSystem(), str(tmp_path), run_id)


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


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


@pytest.mark.parametrize("holder, reason", [
    ({"host": socket.gethostname(), "pid": "DEAD", "heartbeat_at": "NOW"}, "is no longer running"),
    ({"host": "another-machine", "pid": 1, "heartbeat_at": "HOUR_AGO"}, "has not been seen for 60 min"),
])
def test_stale_lock_is_taken_over_with_a_note(tmp_path, holder, reason):
    values = {"DEAD": dead_pid(), "NOW": time.time(), "HOUR_AGO": time.time() - 3600}
    holder = {"run_id": "crashed", **{k: values.get(v, v) for k, v in holder.items()}}
    (tmp_path / LOCK).write_text(json.dumps(holder))
    mine = lock(tmp_path, "run-new")
    assert reason in mine.acquire()
    assert json.loads((tmp_path / LOCK).read_text())["run_id"] == "run-new"
    mine.release()


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
