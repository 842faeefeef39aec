"""The run's RowLedger actor killed mid-run (issue #12): the ledger is a Ray actor every
engine actor calls per batch (pipeline.io.ledger). Its process dying is recovered: Ray restarts
it (max_restarts=-1), the calls in flight are retried, the poison rows it condemned are read
back from OUTPUT/_poison, and the run finishes with every id once. A ledger ended for good
(ray.kill without restart) stops the run with exit 3 and a message saying so; the same command
again finishes with every id exactly once.

A real local Ray and the instant fake engine (pipeline.testing), as in tests/test_faults.py."""

from __future__ import annotations

import io
import json
import os
import threading
import time

import pytest
from conftest import local_ray, read_dir, write_shards
from rich.console import Console

from jobs import ids_out, spec_maker
from pipeline.dataflow import ledger_name
from pipeline.io.output import OutputStore
from pipeline.runner import EXIT_CRASHED, EXIT_OK, run_job
from pipeline.testing import fake_engine_factory

# 5 rows a batch and a file, 5 rows in flight: with the fake engine's delay a run takes seconds.
spec_for = spec_maker(output={"rows_per_file": 5}, sampling={"max_tokens": 4},
                      resources={"batch_size": 5, "rows_in_flight": 5})


@pytest.fixture(scope="module", autouse=True)
def _ray():
    """One local Ray for the module's runs."""
    yield from local_ray()


def committed(out) -> set[str]:
    return set(OutputStore(str(out)).records()) if (out / "_commits").exists() else set()


class LedgerKiller(threading.Thread):
    """Once the run has committed a shard, kill its ledger actor (ray.kill; no_restart as
    given) and note the ledger's process before and, if it is restarted, after."""

    def __init__(self, out, *, no_restart: bool):
        super().__init__(daemon=True)
        self.out, self.no_restart = out, no_restart
        self.pid = self.new_pid = self.committed_then = None
        self.error: BaseException | None = None

    def run(self):
        import ray

        try:
            deadline = time.time() + 120
            while time.time() < deadline and not committed(self.out):
                time.sleep(0.05)
            run_id = json.loads((self.out / "_manifest.json").read_text())["run_id"]
            ledger = ray.get_actor(ledger_name(run_id))
            self.pid = ray.get(ledger.__ray_call__.remote(lambda _self: os.getpid()), timeout=30)
            self.committed_then = len(committed(self.out))
            ray.kill(ledger, no_restart=self.no_restart)
            while not self.no_restart and time.time() < deadline:  # the restarted ledger answers, from a new process
                pid = ray.get(ledger.__ray_call__.remote(lambda _self: os.getpid()), timeout=60)
                if pid != self.pid:
                    self.new_pid = pid
                    break
                time.sleep(0.05)  # ray.kill is asynchronous: the old process may answer once more
        except BaseException as e:  # reported by the test
            self.error = e


def shards_of(n_shards: int, n_rows: int, poison: tuple[int, int] | None = None) -> list[list[dict]]:
    return [[{"id": s * 100 + i, "prompt": "POISON pill" if (s, i) == poison else f"row {i}"}
             for i in range(n_rows)] for s in range(n_shards)]


def test_ledger_killed_mid_run_is_restarted_and_the_run_finishes_exactly_once(tmp_path, tiny_model):
    """The ledger's process dies while batches are in flight (a poison row among them): Ray
    restarts it, the run goes on, every id lands once (the poison row as its one engine_died
    error row, whether it was condemned before the ledger died or after), exit 0."""
    shards = shards_of(8, 10, poison=(5, 3))
    write_shards(tmp_path / "in", shards)
    killer = LedgerKiller(tmp_path / "out", no_restart=False)
    killer.start()
    report = run_job(spec_for(tmp_path, model=tiny_model), progress=False,
                     engine_factory=fake_engine_factory(delay=0.3, poison_on="POISON"))
    killer.join(timeout=60)
    assert killer.error is None, repr(killer.error)
    assert killer.committed_then is not None and killer.committed_then < 8, "the ledger was not killed mid-run"
    assert killer.new_pid is not None and killer.new_pid != killer.pid, "the ledger was not restarted"
    assert report.exit_code == EXIT_OK, report.message
    ids = ids_out(tmp_path / "out")
    assert sorted(ids) == sorted(r["id"] for rows in shards for r in rows)  # each once: none lost, none twice
    errors = read_dir(tmp_path / "out" / "errors").to_pylist()
    assert [(e["id"], e["error_type"]) for e in errors] == [(503, "engine_died")]
    manifest = OutputStore(str(tmp_path / "out")).read_manifest()
    assert manifest["status"] == "complete" and manifest["totals"] == {"rows": 80, "results": 79, "errors": 1}


def test_ledger_ended_for_good_stops_the_run_and_a_rerun_finishes_exactly_once(tmp_path, tiny_model):
    """ray.kill(ledger) (no restart): the run stops with exit 3 saying why, its committed
    shards whole; the same command again runs the rest: every id exactly once."""
    shards = shards_of(8, 10)
    write_shards(tmp_path / "in", shards)
    spec = spec_for(tmp_path, model=tiny_model)
    killer = LedgerKiller(tmp_path / "out", no_restart=True)
    killer.start()
    console = Console(file=io.StringIO(), width=300)
    first = run_job(spec, progress=False, engine_factory=fake_engine_factory(delay=0.3), console=console)
    killer.join(timeout=60)
    assert killer.error is None, repr(killer.error)
    assert killer.committed_then is not None and killer.committed_then < 8, "the ledger was not killed mid-run"
    assert first.exit_code == EXIT_CRASHED, first.message
    assert "row ledger" in first.message and "gone for good" in first.message, first.message
    assert "rerun the same command" in first.message
    assert "row ledger" in console.file.getvalue()
    store = OutputStore(str(tmp_path / "out"))
    manifest = store.read_manifest()
    assert manifest["exit_code"] == EXIT_CRASHED and "row ledger" in manifest["stopped_because"]
    before = store.records()
    assert 0 < len(before) < 8
    ids = ids_out(tmp_path / "out")
    assert len(ids) == len(set(ids)) == sum(r["rows"] for r in before.values())  # what is committed is whole

    again = run_job(spec, progress=False, engine_factory=fake_engine_factory())
    assert again.exit_code == EXIT_OK, again.message
    assert again.skipped_shards == len(before)
    ids = ids_out(tmp_path / "out")
    assert sorted(ids) == sorted(r["id"] for rows in shards for r in rows) and len(ids) == len(set(ids)) == 80
    assert store.read_manifest()["status"] == "complete"
    assert store.garbage() == []
