"""`qwen-batch serve` (issue 30 items 2 and 3): the official openai client against a live server
on 127.0.0.1, started as `qwen-batch serve` in its own process session. One server (module
fixture) answers the API and error tests and runs one batch on the tiny model; the restart test
kills a second server (SIGKILL to its whole process group) mid-batch and starts it again."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
from conftest import REPO, run_cli, vllm_processes
from test_run_batch import CHAT_LINES, MAX_LEN, line, prompt_tokens

KEY = "sk-test-serve"
FINAL = ("completed", "failed", "cancelled", "expired")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`qwen-batch serve` as a subprocess in its own session (its batch jobs inherit it)."""

    def __init__(self, tiny_model, state, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log = open(f"{state}.server-{self.port}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "serve", "--port", str(self.port), "--model", str(tiny_model),
             "--state", str(state), "--max-model-len", str(MAX_LEN), "--dtype", "float32",
             "--served-model-name", "tiny-qwen3", "--set", "model.engine_kwargs.enforce_eager=true",
             "--set", "sampling.max_tokens=6", *args],
            cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            assert self.proc.poll() is None, f"serve exited {self.proc.returncode}: {self.output()}"
            try:
                httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.kill()
        raise AssertionError(f"serve did not answer within 60 s: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()[-3000:]

    def kill(self) -> None:
        """SIGKILL the whole process group: the server, its batch job, what they started there."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)

    def stop(self) -> list:
        """Interrupt the server as Ctrl-C does; returns the vLLM processes that outlived it (killed)."""
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(90)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"serve did not stop on SIGINT within 90 s: {self.output()}") from None
        left = vllm_processes(session=self.proc.pid)
        for p in left:
            p.kill()
        self.log.close()
        return left


def upload(client, lines) -> str:
    return client.files.create(file=("batch.jsonl", io.BytesIO(("\n".join(lines) + "\n").encode())),
                               purpose="batch").id


def wait_for(client, batch_id, statuses=FINAL, timeout=420):
    seen = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        batch = client.batches.retrieve(batch_id)
        if not seen or seen[-1] != batch.status:
            seen.append(batch.status)
        if batch.status in statuses:
            return batch, seen
        time.sleep(1)
    raise AssertionError(f"batch {batch_id} still {seen[-1]} after {timeout} s")


def lines_of(client, file_id) -> list[dict]:
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()] if file_id else []


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    state = tmp_path_factory.mktemp("serve") / "state"
    srv = Server(tiny_model, state, "--api-key", KEY, "--max-upload-mb", "0.05")
    try:
        yield srv
    finally:
        left = srv.stop()
        assert not left, f"vLLM processes outlived serve: {[p.pid for p in left]}"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0)


@pytest.mark.unit
def test_no_api_key_refuses_a_public_host(tmp_path):
    proc = run_cli("serve", "--host", "0.0.0.0", "--model", str(tmp_path), "--state", str(tmp_path / "s"),
                   timeout=60)
    assert proc.returncode == 2
    assert "--host 0.0.0.0 is reachable from other machines" in proc.stderr and "--api-key" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "s").exists()


@pytest.mark.unit
def test_the_state_may_live_on_s3(s3_server):
    from pipeline.ops.batch_store import PRIVATE, BatchStore, public

    root = f"{s3_server.bucket()}/serve-state"
    store = BatchStore(root)
    obj = store.add_file(b'{"custom_id": "a"}\n', filename="in.jsonl", purpose="batch")
    assert store.file(obj["id"]) == obj and store.content(obj["id"]) == b'{"custom_id": "a"}\n'
    assert s3_server.read(store.content_uri(obj["id"])) == b'{"custom_id": "a"}\n'
    assert store.content_uri(obj["id"]).startswith(root + "/files/")
    for i, name in enumerate(["batch_b", "batch_a"]):
        store.save_batch({"id": name, "created_at": 5, "status": "validating", PRIVATE: {"created_ns": i}})
    store.update_batch("batch_a", lambda r: r.update(status="in_progress"))
    again = BatchStore(root)  # a restarted server reads the same records
    assert [(r["id"], r["status"]) for r in again.batches()] == [("batch_a", "in_progress"), ("batch_b", "validating")]
    assert PRIVATE not in public(again.batch("batch_a"))
    assert again.file("../files/x") is None and again.batch("batch_nope") is None


def test_the_api_refuses_bad_requests_in_openais_shape(server, client):
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=server.url, api_key="sk-wrong", max_retries=0).batches.list()
    assert e.value.body["code"] == "invalid_api_key"
    bare = httpx.get(f"{server.url}/batches")  # no Authorization header at all
    assert bare.status_code == 401 and set(bare.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError, match="No such Batch object: batch_nope"):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError, match="No such File object"):
        client.files.retrieve("file-nope")
    with pytest.raises(openai.NotFoundError):
        client.files.content("../../etc/passwd")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="purpose 'fine-tune' is not supported") as e:
        client.files.create(file=("x.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
    assert e.value.body["param"] == "purpose"
    file_id = upload(client, CHAT_LINES[:1])
    with pytest.raises(openai.BadRequestError, match="endpoint '/v1/completions' is not supported") as e:
        client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
    assert e.value.body["param"] == "endpoint"
    with pytest.raises(openai.BadRequestError, match="completion_window '1h' is not supported"):
        client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="1h")
    with pytest.raises(openai.BadRequestError, match="limit must be between 1 and 100"):
        client.batches.list(limit=0)
    with pytest.raises(openai.APIStatusError, match="over the upload limit") as e:  # --max-upload-mb 0.05
        client.files.create(file=("big.jsonl", io.BytesIO(b"x" * 200_000)), purpose="batch")
    assert e.value.status_code == 413
    for response in (httpx.post(f"{server.url}/batches", content=b"{not json",
                                headers={"Authorization": f"Bearer {KEY}"}),
                     httpx.get(f"{server.url}/nothing-here", headers={"Authorization": f"Bearer {KEY}"})):
        assert response.status_code in (400, 404) and "Traceback" not in response.text
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert client.files.retrieve(file_id).purpose == "batch"


def test_a_batch_runs_end_to_end_with_the_openai_client(client, tokenizer):
    from openai.types.chat import ChatCompletion  # the client's own type

    file_id = upload(client, CHAT_LINES)
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h",
                                  metadata={"team": "tests"})
    assert batch.status == "validating" and batch.metadata == {"team": "tests"} and batch.object == "batch"
    # a second batch, cancelled while it waits behind the first: it never runs
    queued = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    assert client.batches.cancel(queued.id).status == "cancelling"

    batch, seen = wait_for(client, batch.id)
    assert batch.status == "completed", (seen, batch.errors)
    assert set(seen) <= {"validating", "in_progress", "finalizing", "completed"}
    assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (5, 3, 2)
    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"
    output, errors = lines_of(client, batch.output_file_id), lines_of(client, batch.error_file_id)
    ids = [x["custom_id"] for x in output + errors]
    assert sorted(ids, key=str) == sorted(["greet", "river", None, "twice", "colour"], key=str)  # each once
    assert {x["custom_id"]: x["error"]["code"] for x in errors} == {None: "invalid_json",
                                                                    "twice": "duplicate_custom_id"}
    inputs = {json.loads(x)["custom_id"]: json.loads(x)["body"] for x in CHAT_LINES if x.endswith("}")}
    for x in output:
        assert x["error"] is None and x["response"]["status_code"] == 200
        done = ChatCompletion.model_validate(x["response"]["body"])
        assert done.model == "tiny-qwen3"
        assert done.usage.prompt_tokens == prompt_tokens(tokenizer, inputs[x["custom_id"]]["messages"])
        body = inputs[x["custom_id"]]
        limit = body.get("max_tokens") or body.get("max_completion_tokens") or 6
        assert 1 <= done.usage.completion_tokens <= limit * len(done.choices)  # "river" asks for n=2

    queued, _ = wait_for(client, queued.id, timeout=60)
    assert queued.status == "cancelled" and queued.cancelled_at >= queued.cancelling_at
    assert queued.in_progress_at is None and queued.output_file_id is None
    with pytest.raises(openai.BadRequestError, match="is completed"):
        client.batches.cancel(batch.id)

    listed = client.batches.list(limit=1)
    assert [b.id for b in listed.data] == [queued.id] and listed.has_more
    assert batch.id in [b.id for b in client.batches.list(limit=1, after=queued.id).data]


def test_a_running_batch_is_cancelled_with_what_it_committed(server, client):
    lines = [line(f"r{i}", {"messages": [{"role": "user", "content": f"Say {i}."}], "max_tokens": 3})
             for i in range(8)]
    batch = client.batches.create(input_file_id=upload(client, lines), endpoint="/v1/chat/completions",
                                  completion_window="24h")
    deadline = time.time() + 300
    while not vllm_processes(session=server.proc.pid):  # its engine is up: the job is running
        assert time.time() < deadline, server.output()
        time.sleep(0.5)
    assert client.batches.cancel(batch.id).status == "cancelling"
    batch, seen = wait_for(client, batch.id, timeout=120)
    assert batch.status == "cancelled" and seen[-2:] == ["cancelling", "cancelled"], seen
    output, errors = lines_of(client, batch.output_file_id), lines_of(client, batch.error_file_id)
    assert sorted(x["custom_id"] for x in output + errors) == sorted(f"r{i}" for i in range(8))  # each once
    assert all(x["error"]["code"] == "batch_cancelled" for x in errors)
    assert (batch.request_counts.completed, batch.request_counts.failed) == (len(output), len(errors))
    deadline = time.time() + 60
    while vllm_processes(session=server.proc.pid):  # the interrupted job ends its engines
        assert time.time() < deadline, "the cancelled batch's engines are still running after 60 s"
        time.sleep(1)


def test_a_server_killed_mid_batch_resumes_after_a_restart(tiny_model, tmp_path):
    state = tmp_path / "state"
    lines = [line(f"q{i}", {"messages": [{"role": "user", "content": f"Question {i}?"}], "max_tokens": 4})
             for i in range(12)]
    first = Server(tiny_model, state)  # no --api-key: loopback only
    try:
        client = openai.OpenAI(base_url=first.url, api_key="unused", max_retries=0)
        batch = client.batches.create(input_file_id=upload(client, lines), endpoint="/v1/chat/completions",
                                      completion_window="24h")
        deadline = time.time() + 300
        while not vllm_processes(session=first.proc.pid):  # the batch's engine is up: the job is running
            assert time.time() < deadline, first.output()
            time.sleep(0.5)
        time.sleep(3)
        assert client.batches.retrieve(batch.id).status == "in_progress"
    finally:
        first.kill()
    second = Server(tiny_model, state)
    try:
        client = openai.OpenAI(base_url=second.url, api_key="unused", max_retries=0)
        done, seen = wait_for(client, batch.id)
        assert done.status == "completed", (seen, done.errors, second.output())
        output = lines_of(client, done.output_file_id)
        assert sorted(x["custom_id"] for x in output) == sorted(f"q{i}" for i in range(12))  # each once
        assert done.error_file_id is None and done.request_counts.completed == 12
    finally:
        left = second.stop()
    left += vllm_processes(session=first.proc.pid)  # the killed run's engines: the resumed run ends them
    for p in left:
        p.kill()
    assert not left, f"vLLM processes outlived the servers: {[p.pid for p in left]}"
