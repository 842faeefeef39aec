"""Processes of a run that outlive it (vLLM's engine core and workers; Ray's services and
workers when the driver is killed): marked by environment variables, found and ended on
every node."""

from __future__ import annotations

import os
from contextlib import contextmanager

# Environment variables that mark every process of a run (the driver's Ray services and
# workers, vLLM's processes), so leftovers can be found: the run, and the output it writes.
RUN_MARK = "QWEN_BATCH_RUN_ID"
OUTPUT_MARK = "QWEN_BATCH_OUTPUT"


@contextmanager
def environment(env: dict[str, str]):
    """os.environ with env set for the block (processes started in it inherit it), then as before."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.update({k: v})


def _kill(procs: list) -> int:
    import psutil

    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=5)
    return len(procs)


def descendants() -> list:
    """This process's children and their children, now (psutil.Process objects)."""
    import psutil

    return psutil.Process().children(recursive=True)


def kill_started_since(before: list) -> int:
    """Kill this process's descendants that were not among before (descendants() taken
    earlier): the processes a library call started (vLLM's engine core and workers), and not
    the caller's own children. Returns how many were killed."""
    known = {(p.pid, p.create_time()) for p in before}
    started = []
    for p in descendants():
        try:
            if (p.pid, p.create_time()) not in known:
                started.append(p)
        except Exception:  # gone meanwhile
            continue
    return _kill(started)


def reap_orphans(run_id: str) -> int:
    """Kill processes of this run (marked by RUN_MARK) still alive after Ray shut down.

    A killed engine actor leaves vLLM's engine core and workers running, reparented to init,
    each burning a core. Returns how many were killed.
    """
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get(RUN_MARK) == run_id:
                found.append(p)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return _kill(found)


def reap_dead_runs(output: str, run_id: str, *, spare: tuple[str, ...] = ()) -> int:
    """Kill processes left by earlier runs on the same output (their driver was killed: Ray's
    agents and vLLM processes outlive it). The caller holds the output's lock; spare names a
    run whose driver is alive but lost the lock (paused): it stops itself, with its message,
    when it wakes. Returns how many were killed."""
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            env = p.environ()
            if (p.pid != os.getpid() and env.get(OUTPUT_MARK) == output
                    and env.get(RUN_MARK) not in (None, run_id, *spare)):
                found.append(p)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return _kill(found)


def reap_on_every_node(run_id: str) -> int:
    """reap_orphans(run_id) on every node of the connected Ray cluster; how many were killed."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    reap = ray.remote(num_cpus=0, max_retries=0)(reap_orphans)
    refs = [reap.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(run_id)
            for n in ray.nodes() if n.get("Alive")]
    try:
        return sum(ray.get(refs, timeout=60))
    except Exception:  # a node went away: nothing of ours is left running there
        return 0
