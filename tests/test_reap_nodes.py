"""A killed driver's processes on other nodes (issue #12): the next run on the same output ends
what the dead run left running on every alive node of the cluster, not only on the driver's
machine, and spares a paused run that lost the lock and other outputs' runs.

Two Ray nodes on this machine (ray.cluster_utils.Cluster: a head and a second raylet). Both
see every process of the machine, so the driver's own local sweep is switched off here: only
the per-node tasks can end the marked process started on the second node."""

from __future__ import annotations

import json
import os
import subprocess
import time

import psutil
import pytest
from conftest import write_shards

from jobs import ids_out, spec_maker
from pipeline.engine import session
from pipeline.engine.processes import DRIVER_MARK, OUTPUT_MARK, RUN_MARK, output_id, process_identity
from pipeline.io.output_lock import LOCK
from pipeline.runner import EXIT_OK, run_job
from pipeline.testing import fake_engine_factory

pytestmark = pytest.mark.cluster

spec_for = spec_maker(output={"rows_per_file": 4}, sampling={"max_tokens": 3}, resources={"batch_size": 4})


@pytest.fixture(scope="module")
def two_nodes():
    """A head and a second node, this process connected; (cluster, second node's id)."""
    import ray
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()
    os.environ.setdefault("RAY_worker_niceness", "0")
    cluster = Cluster(initialize_head=True, connect=True,
                      head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        second = cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        yield cluster, second.node_id
    finally:
        ray.shutdown()
        cluster.shutdown()


def spawn_marked_on(node_id: str, output: str, run_id: str, driver: str) -> int:
    """A sleeping process started by a task pinned to node_id, carrying a run's marks (as the
    engine processes of that run would); its pid."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def spawn(env):
        import os
        import subprocess

        import ray

        proc = subprocess.Popen(["sleep", "600"], env={**os.environ, **env}, start_new_session=True)
        return proc.pid, ray.get_runtime_context().get_node_id()

    pid, node = ray.get(spawn.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
                        .remote({OUTPUT_MARK: output_id(output), RUN_MARK: run_id, DRIVER_MARK: driver}))
    assert node == node_id
    return pid


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_dead_runs_processes_on_another_node_are_ended_by_the_next_run(two_nodes, tmp_path, tiny_model,
                                                                       monkeypatch):
    import ray

    cluster, second = two_nodes
    write_shards(tmp_path / "in", [[{"id": i, "prompt": f"row {i}"} for i in range(8)]])
    out = tmp_path / "out"
    out.mkdir()
    # The lock of a run whose driver ran on another machine, not seen for 10 minutes: the next
    # run takes it over and ends that run's processes on every node; a paused run whose
    # driver lives (another run's leftovers on this output) and another output's are spared.
    paused_driver = subprocess.Popen(["sleep", "600"])
    ident = process_identity(paused_driver.pid)
    alive_mark = f"{ident['boot']}:{ident['pidns']}:{ident['pid']}:{ident['started']}"
    elsewhere = "another-boot:1:4242:1.0"
    (out / LOCK).write_text(json.dumps({"run_id": "dead-run", "host": "another-machine", "boot": "another-boot",
                                        "pidns": "1", "pid": 4242, "started": 1.0,
                                        "heartbeat_at": time.time() - 600}))
    dead = spawn_marked_on(second, str(out), "dead-run", elsewhere)  # left by the killed driver
    paused = spawn_marked_on(second, str(out), "paused-run", alive_mark)  # a run whose driver lives
    other = spawn_marked_on(second, str(tmp_path / "elsewhere"), "dead-run", elsewhere)  # another output
    swept_here = []
    monkeypatch.setattr(session, "reap_dead_runs", lambda *a, **k: swept_here.append(a) or 0)
    try:
        report = run_job(spec_for(tmp_path, model=tiny_model), progress=False, engine_factory=fake_engine_factory())
        assert report.exit_code == EXIT_OK, report.message
        assert swept_here, "the driver's local sweep was not called"
        deadline = time.time() + 10
        while alive(dead) and time.time() < deadline:
            time.sleep(0.1)
        assert not alive(dead), "the dead run's process on the second node was left running"
        assert alive(paused), "the paused run's process was killed"
        assert alive(other), "another output's process was killed"
        assert sorted(ids_out(out)) == list(range(8))

        # one task per alive node, each on its node
        killed = session.reap_dead_runs_on_every_node(output_id(str(out)), "x", dead=("dead-run",))
        assert set(killed) == {n["NodeID"] for n in ray.nodes() if n["Alive"]} and len(killed) == 2
        assert alive(paused) and alive(other)
    finally:
        for pid in (dead, paused, other):
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
        paused_driver.kill()
        paused_driver.wait()
