"""Where replicas run, and whether the cluster can hold one at all.

A replica's tensor-parallel group is one bundle on one node (STRICT_PACK): the actor reserves
all its devices and vLLM's multiprocessing executor starts the ranks as the actor's children.
With pipeline parallelism on GPUs the stages may span nodes: a placement group of one bundle
per GPU (PACK), and vLLM's Ray executor starts a worker in each.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from pipeline.spec import JobSpec, SpecError


class UnplaceableError(SpecError):
    """No node of the cluster (or node type its autoscaler can start) can host a replica."""


@dataclass(frozen=True)
class ReplicaShape:
    bundles: list[dict[str, float]]
    strategy: str  # STRICT_PACK or PACK
    actor: dict[str, Any]  # num_cpus / num_gpus / resources of the engine actor (bundle 0)

    def describe(self) -> str:
        shown = " + ".join(_fmt(b) for b in self.bundles)
        where = "on one node" if self.strategy == "STRICT_PACK" else "packed on as few nodes as possible"
        return f"{shown} {where}"


def _fmt(bundle: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in bundle.items()) + "}"


def replica_shape(spec: JobSpec, device: str) -> ReplicaShape:
    pp = spec.model.pipeline_parallel_size
    extra = dict(spec.resources.replica_resources)
    devices = spec.model.devices_per_replica
    if device == "cuda" and pp > 1:
        bundles = [{"CPU": 1, **extra}] + [{"GPU": 1} for _ in range(devices)]
        actor = {"num_cpus": 1, "num_gpus": 0}
        return ReplicaShape(bundles, "PACK", _with(actor, extra))
    if device == "cuda":
        bundle, actor = {"CPU": 1, "GPU": devices, **extra}, {"num_cpus": 1, "num_gpus": devices}
    else:
        bundle, actor = {"CPU": devices, **extra}, {"num_cpus": devices}
    return ReplicaShape([bundle], "STRICT_PACK", _with(actor, extra))


def _with(actor: dict[str, Any], extra: dict[str, float]) -> dict[str, Any]:
    return {**actor, "resources": extra} if extra else actor


def _fits(bundle: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(k, 0) >= v for k, v in bundle.items() if v)


def unplaceable(shape: ReplicaShape, nodes: list[dict[str, float]]) -> str | None:
    """Why no replica could ever be placed on these nodes' total resources, or None."""
    if shape.strategy == "STRICT_PACK":
        need = shape.bundles[0]
        if any(_fits(need, n) for n in nodes):
            return None
    else:  # the bundles may land on different nodes: compare with the whole cluster
        need = dict(sum((Counter(b) for b in shape.bundles), Counter()))
        if _fits(need, sum((Counter(n) for n in nodes), Counter())):
            return None
    biggest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
    keys = [k for k in need if k in ("CPU", "GPU")] + [k for k in need if k not in ("CPU", "GPU")]
    largest = ", ".join(f"{k}: {biggest.get(k, 0):g}" for k in keys)
    return (f"a replica needs {shape.describe()}, but the largest node has {{{largest}}}; lower "
            f"model.tensor_parallel_size / resources.replica_resources, or add a node type that big")


class ReplicaPlacer:
    """Checks that a replica fits the cluster, and gives each engine actor its placement.

    A one-bundle replica (all its devices on one node) is simply an actor that reserves the
    bundle: Ray never splits an actor across nodes, and vLLM's ranks are the actor's child
    processes, so this is a STRICT_PACK placement without a second reservation. A replica of
    several bundles (GPU pipeline parallelism) gets its own placement group per actor.
    """

    def __init__(self, shape: ReplicaShape):
        self.shape = shape
        self.created: list = []

    def check(self) -> None:
        """Fail fast if no node, nor node type the autoscaler can start, can hold a replica."""
        problem = unplaceable(self.shape, node_shapes())
        if problem:
            raise UnplaceableError(problem)

    @property
    def remote_args_fn(self):
        """For map_batches(ray_remote_args_fn=...), None when the actor's own resources do."""
        return self._remote_args if len(self.shape.bundles) > 1 else None

    def _remote_args(self) -> dict[str, Any]:
        import sys

        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        # Ray Data also calls this to peek at remote args (its memory issue detector); only an
        # actor being created gets a placement group, or an idle one would hold GPUs.
        if sys._getframe(1).f_code.co_name != "_merge_ray_remote_args":
            return {}
        pg = placement_group(self.shape.bundles, strategy=self.shape.strategy)
        self.created.append(pg)
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)}

    def release(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for pg in self.created:
            try:
                remove_placement_group(pg)
            except Exception:  # the cluster may already be gone
                pass
        self.created = []


def node_shapes() -> list[dict[str, float]]:
    """Resources of every node the cluster has or its autoscaler may start (node types)."""
    import ray
    from ray._private.state import state

    nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    try:
        config = state.get_cluster_config()  # written by the autoscaler, None without one
    except Exception:
        config = None
    for group in getattr(config, "node_group_configs", None) or []:
        if group.max_count != 0:
            nodes.append(dict(group.resources))
    return nodes
