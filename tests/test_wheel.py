"""A wheel that works anywhere: built from the checkout and installed in a fresh virtualenv
outside it, the installed `qwen-batch` builds the tiny model and runs a job from another folder,
and the demo finds its job specs, all read from the package (pipeline/_data/, put there by
setup.py), never from the checkout.

The new virtualenv gets its dependencies (ray, vllm, torch, ...) from this interpreter's
site-packages through a .pth file: paths only, so the checkout's editable install (a finder
that a .pth file in that site-packages would run) is not active there. The wheel goes in with
--no-deps; nothing touches the network."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import read_dir, run_command

REPO = Path(__file__).resolve().parent.parent
ROWS = 4


def run(cmd: list[str], *, cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run cmd in its own process session; kill what it leaves (vLLM engines, Ray) or a hang."""
    done = run_command(cmd, cwd=cwd, env=env, timeout=timeout)
    try:
        os.killpg(done.session, 9)  # anything else still in its process group
    except ProcessLookupError:
        pass
    assert not done.leftovers, f"vLLM processes outlived {' '.join(cmd)}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel` of the checkout; setuptools' build and egg-info folders go to tmp, not the
    checkout (DIST_EXTRA_CONFIG names an extra setup.cfg), so no stale build/lib can leak in."""
    tmp = tmp_path_factory.mktemp("wheel")
    cfg = tmp / "dist.cfg"
    cfg.write_text(f"[build]\nbuild_base = {tmp / 'build'}\n[egg_info]\negg_base = {tmp}\n")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp / "dist"), str(REPO)],
                          env={**os.environ, "DIST_EXTRA_CONFIG": str(cfg)}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (found,) = (tmp / "dist").glob("qwen_batch-*.whl")
    return found


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> SimpleNamespace:
    """A fresh virtualenv outside the checkout with the wheel installed, and a clean folder to
    work in; env is what its commands run with."""
    tmp = tmp_path_factory.mktemp("installed")
    assert not tmp.resolve().is_relative_to(REPO)
    home = tmp / "venv"
    venv.create(home, with_pip=False, symlinks=True)
    python = home / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(VIRTUAL_ENV=str(home), PATH=f"{home / 'bin'}{os.pathsep}{env.get('PATH', '')}",
               QWEN_BATCH_LOG_DIR=str(tmp / "logs"))
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                  env=env, capture_output=True, text=True, check=True).stdout.strip())
    ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib"), *site.getsitepackages()}
    (purelib / "_qwen_batch_test_deps.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))
    work = tmp / "work"
    work.mkdir()
    done = run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
                str(wheel)], cwd=work, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return SimpleNamespace(home=home, python=python, cli=home / "bin" / "qwen-batch", purelib=purelib.resolve(),
                           work=work, env=env)


@pytest.fixture(scope="module")
def tiny_model_installed(installed) -> Path:
    """`qwen-batch make-tiny-model` of the installed package, in the clean folder."""
    done = run([str(installed.cli), "make-tiny-model", "demo/tiny-qwen3"], cwd=installed.work, env=installed.env)
    assert done.returncode == 0, done.stderr[-3000:]
    model = installed.work / "demo" / "tiny-qwen3"
    assert (model / "config.json").is_file() and (model / "tokenizer.json").is_file()
    return model


@pytest.mark.unit
def test_the_wheel_carries_the_job_specs_and_schemas(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    schemas = sorted(p.name for p in (REPO / "schemas").glob("*.json"))
    jobs = sorted(p.name for p in (REPO / "jobs").glob("*.yaml"))
    assert schemas and jobs
    assert {f"pipeline/_data/schemas/{n}" for n in schemas} <= names
    assert {f"pipeline/_data/jobs/{n}" for n in jobs} <= names
    assert "pipeline/resources.py" in names and "pipeline/cli.py" in names
    assert not any(n.startswith(("jobs/", "schemas/")) or "__pycache__" in n for n in names)


def test_the_installed_package_is_the_wheels_not_the_checkouts(installed):
    probe = ("import json, pipeline, pipeline.cli; from pipeline.resources import CHECKOUT, data_path; "
             "print(json.dumps({'file': pipeline.__file__, 'path': list(pipeline.__path__), "
             "'cli': pipeline.cli.__file__, 'checkout': CHECKOUT and str(CHECKOUT), "
             "'jobs': str(data_path('jobs')), 'schema': str(data_path('schemas', 'results_chat.json'))}))")
    done = run([str(installed.python), "-c", probe], cwd=installed.work, env=installed.env)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout)
    assert found["checkout"] is None
    where = [found["file"], *found["path"], found["cli"], found["jobs"], found["schema"]]
    for path in filter(None, where):  # pipeline.__file__ is None while pipeline is a namespace package
        assert Path(path).resolve().is_relative_to(installed.purelib), path
    assert Path(found["jobs"]) == installed.purelib / "pipeline" / "_data" / "jobs"


def test_make_tiny_model_and_a_job_run_from_another_folder(installed, tiny_model_installed):
    work = installed.work
    (work / "in").mkdir()
    pq.write_table(pa.table({"id": list(range(ROWS)), "prompt": [f"Say something about {t}." for t in
                                                                   ("owls", "tea", "rivers", "jazz")][:ROWS]}),
                   work / "in" / "part-00000.parquet")
    spec = {"name": "wheel-chat", "input": {"path": "in"}, "output": {"path": "out"},  # relative to the cwd
            "model": {"source": "demo/tiny-qwen3", "max_model_len": 256, "dtype": "float32",
                      "engine_kwargs": {"enforce_eager": True}},
            "task": {"head": "chat"}, "sampling": {"temperature": 0, "max_tokens": 4},
            "resources": {"replicas": 1}}
    (work / "job.yaml").write_text(yaml.safe_dump(spec))
    done = run([str(installed.cli), "run", "job.yaml", "--no-progress"], cwd=work, env=installed.env, timeout=420)
    assert done.returncode == 0, done.stderr[-4000:]
    results = read_dir(work / "out" / "results")
    assert results is not None and results.num_rows == ROWS
    assert sorted(results.column("id").to_pylist()) == list(range(ROWS))
    from pipeline.io.schemas import load_contract

    assert {c["name"] for c in load_contract("results_chat")["columns"]} <= set(results.column_names)


DEMO_PROBE = """
import json
from types import SimpleNamespace

import pipeline.ops.demo as demo
import pipeline.runner

used, load_spec = [], demo.load_spec
def recording(path, **kwargs):
    used.append(str(path))
    return load_spec(path, **kwargs)
demo.load_spec = recording
pipeline.runner.run_job = lambda spec, **kwargs: SimpleNamespace(exit_code=0)  # run no job
print(json.dumps({"code": demo.run_demo("demo"), "used": used, "jobs": list(demo.DEMO_JOBS)}))
"""


def test_the_demo_reads_the_packaged_job_specs(installed, tiny_model_installed):
    """`qwen-batch demo`'s own code, with run_job stubbed: every spec it loads is the package's."""
    done = run([str(installed.python), "-c", DEMO_PROBE], cwd=installed.work, env=installed.env)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    packaged = installed.purelib / "pipeline" / "_data" / "jobs"
    assert found["code"] == 0 and found["jobs"]
    assert found["used"] == [str(packaged / job) for job in found["jobs"]]
    assert all((packaged / job).is_file() for job in found["jobs"])
