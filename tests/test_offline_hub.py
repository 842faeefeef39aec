"""A hub id on a machine that cannot reach the hub (issue 31 item 5), through the real CLI:
`qwen-batch validate` fails in seconds with one line saying the hub cannot be reached and how
to run offline, without the hub library's retry lines; a cached checkpoint is used as it is.
The hub is made unreachable without the internet: HF_ENDPOINT names a local port nothing
listens on, and HF_HOME is a fresh folder (nothing cached unless a test puts it there)."""

from __future__ import annotations

import shutil
import socket
import sys
import time

import pytest
from conftest import prompt_rows, run_cli, run_command, write_shards

pytestmark = pytest.mark.unit  # subprocesses of the CLI, no Ray, no engine

HUB_ID = "Qwen/Qwen3-8B"
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"
NOISE = ("Traceback", "Retrying", "retry", "Retry", "thrown while requesting", "Connection", "urllib3",
         "huggingface_hub", "Could not reach the Hub")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    """The CLI's environment: an unreachable hub, an empty HF_HOME, no proxy, not offline
    (conftest sets HF_HUB_OFFLINE=1 for the session; a test sets it again where it wants it).
    Returns the HF_HOME folder."""
    home = tmp_path / "hf-home"
    home.mkdir()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("HF_HOME", str(home))
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
                "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    return home


def validate(tmp_path, source: str) -> tuple[int, str, float]:
    """Run `qwen-batch validate` on a chat job over 3 prompts with this model.source:
    (exit code, stderr, seconds it took)."""
    write_shards(tmp_path / "in", [prompt_rows(3)])
    spec = tmp_path / "job.yaml"
    spec.write_text(f"input: {{path: '{tmp_path / 'in'}'}}\noutput: {{path: '{tmp_path / 'out'}'}}\n"
                    f"model: {{source: '{source}'}}\ntask: {{head: chat}}\n")
    start = time.monotonic()
    done = run_cli("validate", str(spec), timeout=300)
    took = time.monotonic() - start
    assert not done.stdout.strip(), done.stdout
    return done.returncode, done.stderr, took


def lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def test_a_hub_id_without_network_fails_in_seconds_saying_how_to_run_offline(tmp_path, no_hub):
    code, err, took = validate(tmp_path, HUB_ID)
    assert code == 2, err
    assert took < 15, f"{took:.1f} s (the hub library's retries took 27 s)"  # a bound, not a benchmark
    assert len(lines(err)) == 1, err  # our line and nothing else: no retry lines, no traceback
    line = lines(err)[0]
    assert line.startswith("error: model.source Qwen/Qwen3-8B:"), line
    assert "hub (127.0.0.1) cannot be reached" in line, line
    assert "HF_HUB_OFFLINE=1" in line and "local checkpoint directory" in line and "download" in line, line
    assert "not in the local cache" in line, line
    assert not any(word in err for word in NOISE), err
    assert "such as Qwen/Qwen3-8B" not in err  # the id that failed is no example of a good one


def test_offline_and_not_cached_fails_in_seconds_naming_the_cache(tmp_path, no_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err, took = validate(tmp_path, HUB_ID)
    assert code == 2, err
    assert took < 15, f"{took:.1f} s"
    assert len(lines(err)) == 1, err
    line = lines(err)[0]
    assert "not in the local Hugging Face cache" in line and str(no_hub / "hub") in line, line
    assert "HF_HUB_OFFLINE is set" in line and "download" in line and "local checkpoint directory" in line, line
    assert "couldn't connect" not in line.lower(), line  # offline: nothing was to connect
    assert not any(word in err for word in NOISE), err


def fake_hub_cache(home, model_dir, files=("config.json", "tokenizer.json", "tokenizer_config.json")):
    """HOME/hub holding HUB_ID at one snapshot (refs/main naming it) with the tiny model's
    FILES: what `huggingface-cli download` leaves, minus the weights validate never reads."""
    repo = home / "hub" / f"models--{HUB_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / SNAPSHOT
    snapshot.mkdir(parents=True)
    for name in files:
        shutil.copy(model_dir / name, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)


@pytest.mark.parametrize("offline", [False, True], ids=["hub-unreachable", "HF_HUB_OFFLINE"])
def test_a_cached_hub_id_validates_without_the_hub(tmp_path, no_hub, tiny_model, monkeypatch, offline):
    """The config and the tokenizer come from the cache; the hub is not asked once per file
    (that took 4.5 minutes of retries for the tokenizer's files)."""
    fake_hub_cache(no_hub, tiny_model)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err, took = validate(tmp_path, HUB_ID)
    assert code == 0, err
    assert "OK: 1 shard(s), 3 rows, head 'chat', model Qwen/Qwen3-8B (causal checkpoint)" in err, err
    assert "tokenizer not available" not in err and "about 0 input tokens" not in err, err
    assert "cannot be reached" not in err and not any(word in err for word in NOISE), err
    assert took < 120, f"{took:.1f} s"  # transformers imports on a loaded machine; the retries took minutes


def test_a_cached_config_without_tokenizer_files_says_so_not_zero_tokens(tmp_path, no_hub, tiny_model):
    """transformers builds an empty tokenizer from config.json alone (every text: 0 tokens);
    the plan says the tokenizer files are missing instead of estimating 0 input tokens."""
    fake_hub_cache(no_hub, tiny_model, files=("config.json",))
    code, err, _ = validate(tmp_path, HUB_ID)
    assert code == 0, err  # the plan stands: the engine host may have the files
    assert "about 0 input tokens" not in err, err
    assert f"input tokens unknown (tokenizer not available: OSError: no tokenizer files for {HUB_ID}" in err, err


def test_a_local_directory_that_does_not_exist_is_named(tmp_path, no_hub):
    missing = tmp_path / "models" / "no-such-model"
    code, err, took = validate(tmp_path, str(missing))
    assert code == 2, err
    assert len(lines(err)) == 1, err
    line = lines(err)[0]
    assert f"model.source {missing}" in line and "no such directory" in line, line
    assert "cannot be reached" not in line and not any(word in err for word in NOISE), err


def test_the_offline_switch_ends_when_the_hub_is_back(tmp_path, no_hub, tiny_model):
    """A long-lived process (the Python API) that went offline because the hub was out of reach
    is online again once a later plan finds the hub reachable; HF_HUB_OFFLINE set by the user stays."""
    fake_hub_cache(no_hub, tiny_model)
    script = (
        "import os, socket, sys\n"
        "import huggingface_hub.constants as c\n"
        "from pipeline.checkpoint import read_config\n"
        "from pipeline.spec import ModelSpec\n"
        f"model = ModelSpec(source={HUB_ID!r})\n"
        "def state():\n"
        "    read_config(model)\n"
        "    print(os.environ.get('HF_HUB_OFFLINE'), c.HF_HUB_OFFLINE)\n"
        "state()\n"
        "hub = socket.socket(); hub.bind(('127.0.0.1', 0)); hub.listen()\n"
        "os.environ['HF_ENDPOINT'] = f'http://127.0.0.1:{hub.getsockname()[1]}'\n"
        "state()\n"
        "os.environ['HF_HUB_OFFLINE'] = '1'; c.HF_HUB_OFFLINE = True\n"  # as if set before the import
        "state()\n")
    done = run_command([sys.executable, "-c", script], timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:3] == [
        "1 True",  # the hub out of reach, the model cached: offline
        "None False",  # the hub reachable again: online, as before the switch
        "1 True",  # the user's own HF_HUB_OFFLINE, hub reachable or not
    ]
