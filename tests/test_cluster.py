"""Scale-out on a real multi-node Ray cluster started on this machine (`ray start --head`
plus a second `ray start --address` node, each its own raylet), with the real vLLM engine:
replicas by address on different nodes, `ray job submit`, tensor-parallel placement; and
the cluster launcher config checked by Ray's own validation."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import REPO, read_dir, run_cli, vllm_processes, write_shards

from jobs import ids_out, job_spec, merged
from pipeline.engine.processes import RUN_MARK

RAY = str(Path(sys.executable).with_name("ray"))
SLOT = "engine_slot"  # a custom resource: one per node, one per replica -> one replica a node


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_nodes(address: str, count: int, timeout: float = 120) -> None:
    probe = ("import ray, time, sys\n"
             f"ray.init(address='{address}', logging_level='ERROR', log_to_driver=False)\n"
             f"deadline = time.time() + {timeout}\n"
             f"while sum(n['Alive'] for n in ray.nodes()) < {count} and time.time() < deadline:\n"
             "    time.sleep(0.5)\n"
             f"sys.exit(0 if sum(n['Alive'] for n in ray.nodes()) >= {count} else 1)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=timeout + 60)
    assert done.returncode == 0, f"the cluster did not come up with {count} nodes:\n{done.stderr[-2000:]}"


class LocalCluster:
    """Two Ray nodes on this machine, each in its own process session so that teardown kills
    exactly what they started (never another Ray on the machine, as `ray stop` would)."""

    def __init__(self, tmp: Path):
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.logs = tmp
        self.nodes: list[subprocess.Popen] = []

    def _start(self, name: str, *args: str) -> None:
        log = open(self.logs / f"{name}.log", "w")
        # As on a real node, where the project is installed: its commands are on PATH.
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("RAY_ADDRESS", None)
        self.nodes.append(subprocess.Popen([RAY, "start", "--block", "--num-cpus=2",
                                            f"--resources={json.dumps({SLOT: 1})}", *args],
                                           stdout=log, stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True))

    def start(self) -> LocalCluster:
        self._start("head", "--head", f"--port={self.port}", "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}")
        time.sleep(3)
        self._start("worker", f"--address={self.address}")
        wait_for_nodes(self.address, 2)
        return self

    def raylets(self) -> dict[int, int]:
        """pid of each node's raylet -> index of the node (0 head, 1 worker)."""
        out = {}
        for i, node in enumerate(self.nodes):
            for p in psutil.Process(node.pid).children(recursive=True):
                if p.name() == "raylet":
                    out[p.pid] = i
        return out

    def stop(self) -> None:
        sessions = {n.pid for n in self.nodes}
        for n in self.nodes:
            try:
                os.killpg(n.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        time.sleep(2)
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) in sessions:
                    p.kill()
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
        for n in self.nodes:
            n.wait(timeout=30)
        # `ray start` leaves its address for later `ray.init()` calls to join; ours is gone
        current = Path("/tmp/ray/ray_current_cluster")
        if current.exists() and current.read_text().strip().endswith(f":{self.port}"):
            current.unlink()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("ray-cluster"))
    try:
        yield c.start()
    finally:
        c.stop()


def job_file(tmp: Path, tiny_model, **sections) -> Path:
    data = {
        "name": "cluster-test",
        "input": {"path": str(tmp / "in")}, "output": {"path": str(tmp / "out")},
        "model": {"source": str(tiny_model), "max_model_len": 256, "dtype": "float32",
                  "engine_kwargs": {"enforce_eager": True}},
        "task": {"head": "chat"}, "sampling": {"temperature": 0, "max_tokens": 8},
    }
    data = merged(data, sections)
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def node_of(worker: str) -> str:
    return worker.rsplit("@", 1)[1]


def test_two_moe_replicas_by_address_run_on_different_nodes(cluster, moe_model, tmp_path):
    """Replicas of a mixture-of-experts checkpoint (laid out as Qwen3-30B-A3B), one a node."""
    shards = [[{"id": s * 100 + i, "prompt": f"Shard {s} row {i}"} for i in range(12)] for s in range(4)]
    write_shards(tmp_path / "in", shards)
    spec = job_file(tmp_path, moe_model, resources={
        "replicas": 2, "replica_resources": {SLOT: 1}, "batch_size": 4, "rows_in_flight": 8})
    proc = run_cli("run", str(spec), "--address", cluster.address, "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = ids_out(tmp_path / "out")
    assert sorted(ids) == sorted(r["id"] for s in shards for r in s)
    metrics = read_dir(tmp_path / "out" / "metrics").to_pylist()
    workers = {w for m in metrics for w in m["workers"]}
    assert len({node_of(w) for w in workers}) == 2, workers
    assert all(m["completion_tokens"] > 0 for m in metrics)
    run_id = json.loads((tmp_path / "out" / "_manifest.json").read_text())["run_id"]
    assert vllm_processes(run_id=run_id) == []


def test_ray_job_submit(cluster, tiny_model, tmp_path):
    write_shards(tmp_path / "in", [[{"id": i, "prompt": f"Row {i}"} for i in range(6)]])
    spec = job_file(tmp_path, tiny_model, sampling={"max_tokens": 4})
    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([RAY, "job", "submit", "--address", cluster.dashboard, "--working-dir", str(REPO),
                           "--", "qwen-batch", "run", str(spec), "--no-progress"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "succeeded" in done.stdout
    assert sorted(ids_out(tmp_path / "out")) == list(range(6))
    run_id = json.loads((tmp_path / "out" / "_manifest.json").read_text())["run_id"]
    assert vllm_processes(run_id=run_id) == []


def test_tensor_parallel_2_replica_ranks_share_a_node(cluster, tiny_model, tokenizer, tmp_path):
    """TP=2 on the CPU build: the replica's placement group puts both ranks on one node (the
    rank processes descend from the same raylet as the engine actor), and thinking output
    is split from the answer."""
    rows = [{"id": f"t{i}", "prompt": f"Why is the sky blue? ({i})"} for i in range(4)]
    write_shards(tmp_path / "in", [rows[:2], rows[2:]])
    spec = job_file(tmp_path, tiny_model, model={"tensor_parallel_size": 2},
                    task={"head": "chat", "options": {"enable_thinking": True}})
    raylets = cluster.raylets()
    seen: dict[str, set] = {}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            for p in vllm_processes():
                try:
                    if RUN_MARK not in p.environ() or "Worker" not in " ".join(p.cmdline()):
                        continue
                    node = next((raylets[a.pid] for a in p.parents() if a.pid in raylets), None)
                    if node is not None:  # None: the actor already exited (end of run)
                        seen.setdefault(p.environ()[RUN_MARK], set()).add((p.pid, node))
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        proc = run_cli("run", str(spec), "--address", cluster.address, "--no-progress")
    finally:
        stop.set()
        watcher.join(timeout=5)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = json.loads((tmp_path / "out" / "_manifest.json").read_text())["run_id"]
    ranks = seen.get(run_id, set())
    assert len({pid for pid, _ in ranks}) == 2, ranks  # two tensor-parallel rank processes
    assert len({node for _, node in ranks}) == 1, ranks
    results = read_dir(tmp_path / "out" / "results").to_pylist()
    assert len(results) == 4
    for r in results:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": next(x["prompt"] for x in rows if x["id"] == r["id"])}],
            tokenize=False, add_generation_prompt=True, enable_thinking=True)
        assert r["prompt_tokens"] == len(tokenizer(text, add_special_tokens=False)["input_ids"])
        # Random weights never close </think>: all output is reasoning, and no answer is invented.
        assert r["reasoning"] is not None and r["response"] == ""
    assert {m["tensor_parallel_size"] for m in read_dir(tmp_path / "out" / "metrics").to_pylist()} == {2}
    assert vllm_processes(run_id=run_id) == []


def test_a_replica_bigger_than_any_node_fails_fast(cluster, tiny_model, tmp_path):
    write_shards(tmp_path / "in", [[{"id": 1, "prompt": "hi"}]])
    spec = job_file(tmp_path, tiny_model, model={"tensor_parallel_size": 4})
    started = time.time()
    proc = run_cli("run", str(spec), "--address", cluster.address, "--no-progress")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert ("a replica needs {CPU: 4} on one node, but the largest node has {CPU: 2}" in proc.stderr
            and "lower model.tensor_parallel_size" in proc.stderr), proc.stderr[-3000:]
    assert time.time() - started < 60


def test_cluster_launcher_config_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    types = config["available_node_types"]
    assert "GPU" not in types[config["head_node_type"]]["resources"]
    gpus = {name: t["resources"].get("GPU", 0) for name, t in types.items()}
    assert max(gpus.values()) >= 8
    # every shipped job's replica fits one node type of the cluster
    for job in (REPO / "jobs").glob("*.yaml"):
        model = yaml.safe_load(job.read_text()).get("model", {})
        need = model.get("tensor_parallel_size", 1) * model.get("pipeline_parallel_size", 1)
        assert need <= max(gpus.values()), job
    broken = copy.deepcopy(config)
    broken["available_node_types"]["head"]["resourcez"] = {}
    with pytest.raises(Exception, match="resourcez"):
        validate_config(prepare_config(broken))


def _spec(**model):
    return job_spec(".", model={"source": "Qwen/Qwen3-32B", **model},
                    resources={"replica_resources": {"accelerator_type:H100": 0.001}})


def test_where_each_engine_runs_its_model(tmp_path):
    """One CPU device: the model runs in vLLM's engine-core process (no worker process that its
    scheduler spin-waits on); tensor- or pipeline-parallel ranks: worker processes; GPU pipeline
    stages, which may span nodes: Ray; one GPU: vLLM's default (in-process as well)."""
    from conftest import checkpoint_engine_args

    from pipeline.spec import ModelSpec

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}))

    def backend(device, **model):
        args = checkpoint_engine_args(ModelSpec(source=str(tmp_path), **model), device=device)
        return args.get("distributed_executor_backend")

    assert backend("cpu") == "uni"
    assert backend("cpu", tensor_parallel_size=2) == "mp"
    assert backend("cuda") is None
    assert backend("cuda", tensor_parallel_size=2) == "mp"
    assert backend("cuda", pipeline_parallel_size=2) == "ray"


def test_replica_shapes_and_what_the_cluster_can_hold():
    from pipeline.engine.placement import replica_shape, unplaceable

    h100_node = {"CPU": 192, "GPU": 8, "accelerator_type:H100": 1}
    tp4 = replica_shape(_spec(tensor_parallel_size=4), "cuda")
    assert tp4.strategy == "STRICT_PACK" and tp4.bundles == [{"CPU": 1, "GPU": 4, "accelerator_type:H100": 0.001}]
    assert tp4.actor == {"num_cpus": 1, "num_gpus": 4, "resources": {"accelerator_type:H100": 0.001}}
    assert unplaceable(tp4, [h100_node]) is None
    # two 4-GPU nodes hold 8 GPUs, but not a tensor-parallel group of 8
    tp8 = replica_shape(_spec(tensor_parallel_size=8), "cuda")
    small = [{"CPU": 48, "GPU": 4, "accelerator_type:H100": 1}] * 2
    assert "needs {CPU: 1, GPU: 8, accelerator_type:H100: 0.001} on one node, but the largest node has " \
           "{CPU: 48, GPU: 4, accelerator_type:H100: 1}" in unplaceable(tp8, small)
    # pipeline stages may span nodes: 4 x 2 GPUs fit on those two nodes
    pp2 = replica_shape(_spec(tensor_parallel_size=4, pipeline_parallel_size=2), "cuda")
    assert pp2.strategy == "PACK" and len(pp2.bundles) == 9 and pp2.actor["num_gpus"] == 0
    assert unplaceable(pp2, small) is None
    # a replica that asks for an accelerator no node has is refused
    assert unplaceable(tp4, [{"CPU": 192, "GPU": 8}]) is not None
