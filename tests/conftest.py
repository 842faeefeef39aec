"""Shared fixtures: the tiny Qwen3 checkpoint (built once), prompt shards, process hygiene."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from s3_server import s3_bucket, s3_server  # noqa: F401  (local S3 server fixtures)

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail fast instead of retrying
# Marks every process this test session starts (Ray workers and vLLM's children inherit it),
# so the leftover check below never touches another session's processes.
SESSION_MARK = "QWEN_BATCH_TEST_SESSION"
os.environ[SESSION_MARK] = f"{os.getpid()}"
REPO = Path(__file__).resolve().parent.parent


# Test tiers (markers registered in pyproject.toml): `make test-fast` runs unit + datapath.
#   unit      no Ray, no engine          datapath  a real local Ray, the fake engine
#   faults    processes killed or paused (driver, actor, ledger) or a store failing: seconds of waiting
#   engine    the real vLLM engine       cluster   a multi-node Ray cluster on this machine
# A module's tests take its tier unless a test is marked itself; unlisted modules count as
# engine (never fast by accident).
MODULE_TIERS = {
    "test_spec": "unit", "test_redact": "unit", "test_chat_head": "unit", "test_classify_head": "unit",
    "test_summarize_head": "unit", "test_extract_head": "unit", "test_embed_head": "unit", "test_rerank_head": "unit",
    "test_output_lock": "unit", "test_tiny_model": "unit",
    "test_shards": "unit", "test_s3_server": "unit", "test_status": "datapath", "test_weights": "unit",
    "test_pipeline_fake_engine": "datapath", "test_faults": "faults", "test_ledger_faults": "faults",
    "test_bad_input": "datapath",
    "test_exactly_once": "datapath", "test_retry": "datapath", "test_s3_jobs": "datapath",
    "test_cli_messages": "engine",
    "test_cluster": "cluster", "test_cluster_config": "unit",
}
TIERS = ("unit", "datapath", "faults", "engine", "cluster")


def pytest_collection_modifyitems(items):
    for item in items:
        if not any(item.get_closest_marker(t) for t in TIERS):
            item.add_marker(MODULE_TIERS.get(item.module.__name__.rsplit(".", 1)[-1], "engine"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from pipeline.ops.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen3")


@pytest.fixture(scope="session")
def moe_model(tmp_path_factory) -> Path:
    """A tiny random Qwen3MoeForCausalLM laid out as Qwen3-30B-A3B ships (8 experts, top-2)."""
    from pipeline.ops.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen3-moe", kind="moe")


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def prompt_rows(n: int, start: int = 0, **cols) -> list[dict]:
    """Rows {id, prompt: "p<id>", **cols} for ids start .. start+n-1."""
    return [{"id": i, "prompt": f"p{i}", **cols} for i in range(start, start + n)]


@pytest.fixture
def chat_job(tmp_path, tiny_model):
    """Make a chat-head spec reading tmp_path/in and writing tmp_path/out; sections given merge over these."""
    from jobs import spec_maker

    return functools.partial(spec_maker(model=tiny_model), tmp_path)


def local_ray():
    """One local Ray for a module's in-process runs (run_job joins a Ray that is up, which
    saves starting one per run); for a module fixture to `yield from`. A Ray already up is
    left as it is."""
    import ray

    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()


def run_on_local_ray(data: dict):
    """pipeline.run(data) inside local_ray's Ray (started and ended around it unless one is up)."""
    import pipeline

    gen = local_ray()
    next(gen)
    try:
        return pipeline.run(data, progress=False)
    finally:
        next(gen, None)


def checkpoint_engine_args(model, *, device: str, **head) -> dict:
    """vLLM arguments for a model section's checkpoint (head: what a head asks, e.g. task)."""
    from pipeline.checkpoint import read_config
    from pipeline.engine.engine_args import engine_args

    return engine_args(model, device=device, config=read_config(model), **head)


def write_shards(folder: Path, shards: list[list[dict]], schema: pa.Schema | None = None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, rows in enumerate(shards):
        path = folder / f"part-{i:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
        paths.append(path)
    return paths


def read_dir(path: Path | str) -> pa.Table | None:
    """The committed rows of OUTPUT/KIND (results, errors or metrics), read as users are told
    to: through the commit records."""
    from pipeline.io.output import OutputStore

    parent, kind = str(path).rstrip("/").rsplit("/", 1)
    return OutputStore(parent).read_committed(kind)


def vllm_processes(*, session: int | None = None, run_id: str | None = None,
                   ours: bool = True) -> list[psutil.Process]:
    """vLLM engine-core and worker processes started by this test session; only those of
    one process session (a CLI run) or of one run (its RUN_MARK) when given."""
    from pipeline.engine.processes import RUN_MARK

    found = []
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            text = (p.info["name"] or "") + " " + " ".join(p.info["cmdline"] or [])
            if "VLLM::" not in text and "EngineCore" not in text:
                continue
            if session is not None and os.getsid(p.pid) != session:
                continue
            env = p.environ()
            if run_id is not None and env.get(RUN_MARK) != run_id:
                continue
            if ours and env.get(SESSION_MARK) != os.environ[SESSION_MARK]:
                continue
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
            continue
        found.append(p)
    return found


@pytest.fixture(scope="session", autouse=True)
def no_leftover_engines():
    """The whole session must leave no vLLM process running (they burn a core each)."""
    before = {p.pid for p in vllm_processes()}
    yield
    left = [p for p in vllm_processes() if p.pid not in before]
    for p in left:
        p.kill()
    assert not left, f"vLLM processes outlived the tests: {[p.pid for p in left]}"


def run_command(cmd: list[str], *, cwd: Path | None = None, env: dict | None = None,
                timeout: float = 600) -> subprocess.CompletedProcess:
    """Run CMD in its own process session; kill the session if it hangs. The result's
    leftovers: vLLM engines that outlived the command (killed here)."""
    proc = subprocess.Popen(cmd, cwd=cwd or REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(map(str, cmd))} timed out:\n{err[-3000:]}") from None
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    done.leftovers = vllm_processes(session=proc.pid)  # engines that outlived the command
    for p in done.leftovers:
        p.kill()
    done.session = proc.pid
    return done


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `qwen-batch ARGS` in its own process group; kill the group if it hangs."""
    return run_command([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, timeout=timeout)
