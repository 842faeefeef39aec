"""The Ray session of a run: connect (or start a private Ray), pick the device, and leave
nothing running at the end, on this machine or on any node of a cluster."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

from pipeline.engine.processes import (
    DRIVER_MARK,
    OUTPUT_MARK,
    RUN_MARK,
    driver_mark,
    environment,
    output_id,
    reap_dead_runs,
    reap_on_every_node,
    reap_orphans,
)
from pipeline.spec import JobSpec


def _quiet_ray_data() -> None:
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def connect(spec: JobSpec, devices_per_replica: int) -> str | None:
    """Join spec.ray.address / RAY_ADDRESS, or start a local Ray. Returns "local" or "cluster"
    when this call connected (the run then disconnects), None when Ray was already up."""
    import ray

    if ray.is_initialized():
        return None
    worker_logs = bool(os.environ.get("QWEN_BATCH_WORKER_LOGS"))
    address = spec.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=worker_logs, logging_level="WARNING")
        _quiet_ray_data()
        return "cluster"
    cores = os.cpu_count() or 1
    # The CPU build's engines pin their own threads; Ray's CPU count is only for scheduling,
    # sized so that every replica and the read and write tasks can be placed at once.
    # address="local": a new private Ray, even when a `ray start` cluster runs on this machine
    # (plain ray.init() would join it, or fail on the stale address a killed one left behind).
    # Ray starts its workers at nice 15, below the driver and Ray's own services; on a small
    # machine those then preempt the engine. A run owns this Ray: engines at normal priority.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(address="local", num_cpus=max(cores, spec.resources.replica_range[1] * devices_per_replica + 2),
             include_dashboard=False, log_to_driver=worker_logs, logging_level="WARNING")
    _quiet_ray_data()
    return "local"


def device(spec: JobSpec) -> str:
    if spec.resources.device != "auto":
        return spec.resources.device
    import ray

    return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


def actor_env(spec: JobSpec, device: str, run_id: str) -> dict[str, str]:
    """Environment of the engine actors: the run mark (to find leftovers), quiet vLLM, and on
    the CPU build one core per tensor-parallel rank."""
    devices = spec.model.devices_per_replica
    env = {**run_marks(spec, run_id), "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR"),
           "TOKENIZERS_PARALLELISM": "false"}
    if device == "cpu" and devices > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        cores = os.cpu_count() or 1
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % cores) for i in range(devices))
    return env


def run_marks(spec: JobSpec, run_id: str) -> dict[str, str]:
    """The environment marks of a run's processes (pipeline.engine.processes): run, output, driver."""
    return {RUN_MARK: run_id, OUTPUT_MARK: output_id(spec.output.path), DRIVER_MARK: driver_mark()}


@contextmanager
def ray_session(spec: JobSpec, run_id: str):
    """Connected to Ray for the block; afterwards engines of this run are gone everywhere."""
    import ray

    devices = spec.model.devices_per_replica
    # A local Ray's services and workers inherit the marks: if this driver is killed, the next
    # run on the same output finds what it left (pipeline.engine.processes.reap_dead_runs).
    with environment(run_marks(spec, run_id)):
        connected = connect(spec, devices)
    try:
        yield connected
    finally:
        if connected:
            if connected == "cluster":  # engines orphaned on other nodes, while we can reach them
                reap_on_every_node(run_id)
            ray.shutdown()
            reap_orphans(run_id)


def _reap_dead_runs_on_node(output: str, run_id: str, dead: tuple[str, ...]) -> tuple[str, int]:
    """reap_dead_runs on the node this task runs on: (the node's id, how many it killed)."""
    import ray

    from pipeline.engine import processes

    return ray.get_runtime_context().get_node_id(), processes.reap_dead_runs(output, run_id, dead=dead)


def reap_dead_runs_on_every_node(output: str, run_id: str, *, dead: tuple[str, ...] = (),
                                 timeout: float = 60) -> dict[str, int]:
    """reap_dead_runs (output: an output_id) on every alive node of the connected Ray cluster
    (a zero-CPU task pinned to each): node id -> processes killed there. A node that goes
    away meanwhile is left out (nothing of the dead run is left running there)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    reap = ray.remote(num_cpus=0, max_retries=0)(_reap_dead_runs_on_node)
    refs = [reap.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(output, run_id, tuple(dead)) for n in ray.nodes() if n.get("Alive")]
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    killed: dict[str, int] = {}
    for ref in done:
        try:
            node, count = ray.get(ref)
        except Exception:  # the node died under the task
            continue
        killed[node] = killed.get(node, 0) + count
    return killed


def reap_dead_runs_everywhere(spec: JobSpec, run_id: str, *, dead: tuple[str, ...] = ()) -> int:
    """End what earlier runs on this output left running when their driver was killed (Ray's
    agents and workers, vLLM's processes, marked by pipeline.engine.processes): on this machine,
    those whose driver is gone; and when an earlier run is known dead (dead: its stale lock
    was taken over, or its manifest still says running with no lock), on every node of the
    cluster. That is the Ray this process is connected to, or else spec.ray.address /
    RAY_ADDRESS, joined for the moment (a private Ray ran on this machine only). Returns how
    many processes were killed."""
    import ray

    output = output_id(spec.output.path)
    killed = reap_dead_runs(output, run_id, dead=dead)
    if not dead:
        return killed
    joined = False
    try:
        if not ray.is_initialized():
            address = spec.ray.address or os.environ.get("RAY_ADDRESS")
            if not address:
                return killed
            ray.init(address=address, log_to_driver=False, logging_level="WARNING")
            joined = True
        return killed + sum(reap_dead_runs_on_every_node(output, run_id, dead=dead).values())
    except Exception as e:  # the cluster cannot be reached: the run itself will say so
        logging.getLogger(__name__).warning("could not end an earlier run's processes on the cluster: %s", e)
        return killed
    finally:
        if joined:
            ray.shutdown()
