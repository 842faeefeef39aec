"""An engine's shutdown ends the processes the engine started and nothing else of its caller's
(a test session's S3 server, a user's own subprocesses)."""

import subprocess

import psutil
import pytest

from pipeline.processes import descendants, kill_started_since

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
