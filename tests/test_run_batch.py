"""`qwen-batch run-batch`: OpenAI Batch files in, OpenAI's output lines out (issue 30 item 1).
The conversion is unit-tested; one end-to-end CLI run on the tiny model (two engine runs: the
batch, then the same command again, which resumes and computes nothing)."""

import json

import pytest
from conftest import run_cli

from pipeline.ops.openai_batch import job_spec, shard_bytes
from pipeline.ops.openai_format import CHAT_URL, EMBED_URL, parse_batch

MAX_LEN = 256


def line(custom_id, body=None, url=CHAT_URL, **extra):
    body = body if body is not None else {"model": "m", "messages": [{"role": "user", "content": f"hi {custom_id}"}]}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body, **extra})


def batch_of(*lines, options=None):
    return parse_batch(("\n".join(lines) + "\n").encode(), options=options)


def chat(custom_id, **body):
    return line(custom_id, {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body})


def error_of(batch, custom_id=None, number=None):
    req = next(r for r in batch.requests if (custom_id is None or r.custom_id == custom_id)
               and (number is None or r.line == number))
    assert req.error is not None and req.row is None
    return req.error


@pytest.mark.unit
def test_a_chat_request_becomes_messages_and_sampling():
    b = batch_of(chat("a", max_completion_tokens=7, temperature=0, top_p=0.5, stop="\n", seed=3, n=1,
                      logprobs=False, response_format={"type": "text"},
                      messages=[{"role": "developer", "content": "Be brief."},
                                {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                             {"type": "text", "text": "there"}]}]))
    assert b.url == CHAT_URL and b.max_tokens == 7
    [row] = b.rows
    assert row["id"] == 1 and row["custom_id"] == "a"
    assert row["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert json.loads(row["sampling"]) == {"max_tokens": 7, "temperature": 0, "top_p": 0.5, "stop": ["\n"],
                                           "seed": 3}
    spec = job_spec(b, model="/m", work="/w")
    assert spec["task"]["head"] == "chat" and spec["sampling"] == {"row_max_tokens": 7}
    assert spec["input"]["path"] == "/w/input/requests.jsonl" and spec["output"]["path"] == "/w/job"


@pytest.mark.unit
def test_bad_lines_become_errors_naming_their_line():
    b = batch_of(chat("ok"), "{not json", json.dumps({"method": "POST", "url": CHAT_URL, "body": {}}),
                 line("u", url="/v1/completions"), chat("k", logprobs=True), chat("t", temperature=5),
                 chat("f", response_format={"type": "json_object"}),
                 chat("n", n=17), chat("x", tools=[]), line("m", {"messages": []}), "[1]",
                 line("g", method="GET"))
    assert [r["custom_id"] for r in b.rows] == ["ok"]
    assert error_of(b, number=2).code == "invalid_json" and "line 2 is not valid JSON" in error_of(b, number=2).message
    assert "line 3 has no custom_id" in error_of(b, number=3).message
    assert "url '/v1/completions' is not supported" in error_of(b, "u").message
    assert error_of(b, "k").message == "line 5: logprobs is not supported yet"
    assert "body.temperature" in error_of(b, "t").message
    assert "response_format is not supported yet" in error_of(b, "f").message
    assert "body.n: Input should be less than or equal to 16" in error_of(b, "n").message
    assert "body.tools is not supported" in error_of(b, "x").message
    assert "messages must be a non-empty list" in error_of(b, "m").message
    assert "line 11 is not a JSON object" in error_of(b, number=11).message
    assert "method 'GET'" in error_of(b, "g").message


@pytest.mark.unit
def test_a_duplicate_custom_id_fails_once_naming_every_line():
    b = batch_of(chat("a"), chat("dup"), chat("b"), chat("dup"))
    assert [r["custom_id"] for r in b.rows] == ["a", "b"]
    first, second = [r for r in b.requests if r.custom_id == "dup"]
    assert first.error.code == "duplicate_custom_id" and "lines 2, 4" in first.error.message
    assert second.dropped
    from pipeline.ops.openai_format import output_line

    lines = [output_line(b, r, result=None, error=None, model="m", created=0) for r in b.requests]
    assert [x["custom_id"] for x in lines if x] == ["a", "dup", "b"]


@pytest.mark.unit
def test_mixed_endpoints_are_refused_and_blank_lines_skipped():
    with pytest.raises(ValueError, match="mixes endpoints"):
        batch_of(chat("a"), line("e", {"input": "x"}, url=EMBED_URL))
    b = parse_batch(b"\n" + chat("a").encode() + b"\n\n")
    assert [r.line for r in b.requests] == [2]


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name"]}


def schema_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": schema}}


@pytest.mark.unit
def test_a_json_schema_batch_runs_on_the_extract_head(tmp_path):
    from pipeline.api import load
    from pipeline.ops.openai_format import output_line

    other = {"type": "object", "properties": {"x": {"type": "number"}}}
    b = batch_of(chat("a", response_format=schema_format(SCHEMA)), chat("b", response_format=schema_format(SCHEMA)),
                 chat("plain"), chat("other", response_format=schema_format(other)),
                 chat("bad", response_format=schema_format({"type": "array"})))
    assert b.schema == SCHEMA and [r["custom_id"] for r in b.rows] == ["a", "b"]
    assert "differs from line 1's" in error_of(b, "plain").message
    assert "differs from line 1's" in error_of(b, "other").message
    assert "response_format.json_schema.schema" in error_of(b, "bad").message
    spec = load(job_spec(b, model=str(tmp_path), work=str(tmp_path / "w")))
    assert spec.task.head == "extract" and spec.task.options["schema"] == SCHEMA
    done = output_line(b, b.requests[0], result={"raw": '{"name": "Ada"}', "name": "Ada", "reasoning": None,
                                                 "finish_reason": "stop", "prompt_tokens": 5, "completion_tokens": 6},
                       error=None, model="m", created=0)
    assert done["response"]["body"]["choices"][0]["message"]["content"] == '{"name": "Ada"}'


@pytest.mark.unit
def test_an_unreadable_or_mixed_file_is_invalid_before_anything_runs(tmp_path):
    from pipeline.errors import InputError
    from pipeline.ops.openai_batch import run_batch

    with pytest.raises(InputError, match="cannot be read"):
        run_batch(str(tmp_path / "missing.jsonl"), str(tmp_path / "out.jsonl"), model=str(tmp_path))
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(chat("a") + "\n" + line("b", {"input": "x"}, url=EMBED_URL) + "\n")
    with pytest.raises(InputError, match="mixes endpoints"):
        run_batch(str(mixed), str(tmp_path / "out.jsonl"), model=str(tmp_path))
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "out.jsonl.work").exists()


@pytest.mark.unit
def test_the_conversion_is_deterministic():
    lines = [chat("a", max_tokens=3, stop=["x", "y"]), chat("b", seed=1), "oops"]
    assert shard_bytes(batch_of(*lines)) == shard_bytes(batch_of(*lines))
    assert shard_bytes(batch_of(*lines)).count(b"\n") == 2


@pytest.mark.unit
def test_thinking_must_agree_with_the_job():
    kw = {"chat_template_kwargs": {"enable_thinking": True}}
    assert "enable_thinking" in error_of(batch_of(chat("a", **kw)), "a").message
    assert batch_of(chat("a", **kw), options={"enable_thinking": True}).rows


@pytest.mark.unit
def test_body_model_picks_a_lora_adapter_when_the_batch_serves_some():
    import openai.types as openai_types

    from pipeline.ops.openai_format import Served, output_line

    data = ("\n".join([chat("sql", model="sql"), chat("base", model="tiny"), chat("path", model="/ckpt"),
                        line("none", {"messages": [{"role": "user", "content": "hi"}]}),
                        chat("typo", model="sqll"), chat("odd", model=7)]) + "\n").encode()
    served = Served(base=("tiny", "/ckpt"), adapters=("sql", "legal"), column="lora")
    b = parse_batch(data, served=served)
    rows = {r.custom_id: r.row for r in b.requests if r.row is not None}
    assert rows["sql"]["lora"] == "sql"
    assert all("lora" not in rows[k] for k in ("base", "path", "none"))  # the base model
    for cid, shown in (("typo", "'sqll'"), ("odd", "7")):
        err = error_of(b, cid)
        assert err.code == "model_not_found"
        assert err.message == (f"line {5 if cid == 'typo' else 6}: body.model {shown} is not served by this batch: "
                               f"use 'tiny' (the base model) or an adapter: legal, sql")
    # an adapter's answer names the adapter; a model that is not served is OpenAI's 404
    done = {"response": "ok", "finish_reason": "stop", "prompt_tokens": 3, "completion_tokens": 1}
    ok = output_line(b, b.requests[0], result=done, error=None, model="tiny", created=0)
    assert openai_types.chat.ChatCompletion.model_validate(ok["response"]["body"]).model == "sql"
    assert output_line(b, b.requests[1], result=done, error=None, model="tiny", created=0)[
        "response"]["body"]["model"] == "tiny"
    missing = output_line(b, b.requests[4], result=None, error=None, model="tiny", created=0)
    assert missing["response"]["status_code"] == 404 and missing["error"]["code"] == "model_not_found"
    assert missing["response"]["body"]["error"]["type"] == "invalid_request_error"
    # without adapters body.model is not looked at: every request runs on the base model
    plain = parse_batch(data)
    assert len(plain.rows) == 6 and all("lora" not in r and "adapter" not in r for r in plain.rows)


@pytest.mark.unit
def test_lora_modules_become_model_adapters_and_a_bad_one_says_the_form():
    from argparse import Namespace

    from pipeline.cli import batch_overrides
    from pipeline.spec import SpecError

    assert batch_overrides(Namespace(set=["sampling.max_tokens=4"], lora_modules=["sql=./lora/sql", "b=org/b"])) == [
        "sampling.max_tokens=4", "model.adapters.sql=./lora/sql", "model.adapters.b=org/b"]
    with pytest.raises(SpecError, match=r"--lora-modules 'sql': give NAME=PATH"):
        batch_overrides(Namespace(set=None, lora_modules=["sql"]))


@pytest.mark.unit
def test_output_lines_parse_as_the_openai_clients_types():
    import openai.types as openai_types

    from pipeline.ops.openai_format import output_line

    b = batch_of(chat("a"), chat("b"), "bad")
    ok = output_line(b, b.requests[0], result={"response": "Hello", "reasoning": "hmm", "finish_reason": "length",
                                               "prompt_tokens": 9, "completion_tokens": 4},
                     error=None, model="qwen", created=123)
    assert ok["error"] is None and ok["response"]["status_code"] == 200 and ok["id"].startswith("batch_req_")
    done = openai_types.chat.ChatCompletion.model_validate(ok["response"]["body"])
    assert done.choices[0].message.content == "Hello" and done.choices[0].finish_reason == "length"
    assert done.usage.total_tokens == 13 and done.model == "qwen"
    assert ok["response"]["body"]["choices"][0]["message"]["reasoning_content"] == "hmm"
    failed = output_line(b, b.requests[1], result=None, error={"error_type": "engine_timeout", "error_message": "slow"},
                         model="qwen", created=123)
    assert failed["error"] == {"code": "engine_timeout", "message": "line 2: slow"}
    assert failed["response"]["status_code"] == 500
    bad = output_line(b, b.requests[2], result=None, error=None, model="qwen", created=123)
    samples = [{"index": i, "response": f"s{i}", "reasoning": None, "finish_reason": "stop", "completion_tokens": 2}
               for i in range(3)]
    many = output_line(b, b.requests[0], result={"response": "s0", "finish_reason": "stop", "prompt_tokens": 9,
                                                 "completion_tokens": 6, "samples": samples},
                       error=None, model="qwen", created=123)
    done = openai_types.chat.ChatCompletion.model_validate(many["response"]["body"])
    assert [(c.index, c.message.content) for c in done.choices] == [(0, "s0"), (1, "s1"), (2, "s2")]
    assert done.usage.completion_tokens == 6
    assert bad["custom_id"] is None and bad["response"]["status_code"] == 400 and "line 3" in bad["error"]["message"]


@pytest.mark.unit
def test_embedding_requests_and_bodies():
    import base64
    import struct

    import openai.types as openai_types

    from pipeline.ops.openai_format import output_line

    b = batch_of(line("a", {"model": "e", "input": "hello"}, url=EMBED_URL),
                 line("b", {"input": ["one"], "encoding_format": "base64"}, url=EMBED_URL),
                 line("c", {"input": ["one", "two"]}, url=EMBED_URL),
                 line("d", {"input": "x", "dimensions": 8}, url=EMBED_URL))
    assert b.url == EMBED_URL and [r["text"] for r in b.rows] == ["hello", "one"]
    assert job_spec(b, model="/m", work="/w")["task"]["head"] == "embed"
    assert "several texts" in error_of(b, "c").message and "dimensions 8" in error_of(b, "d").message
    result = {"embedding": [0.6, 0.8], "prompt_tokens": 3, "completion_tokens": 0}
    a = output_line(b, b.requests[0], result=result, error=None, model="e", created=0)["response"]["body"]
    parsed = openai_types.CreateEmbeddingResponse.model_validate(a)
    assert parsed.data[0].embedding == pytest.approx([0.6, 0.8]) and parsed.usage.prompt_tokens == 3
    encoded = output_line(b, b.requests[1], result=result, error=None, model="e", created=0)
    raw = base64.b64decode(encoded["response"]["body"]["data"][0]["embedding"])
    assert struct.unpack("<2f", raw) == pytest.approx((0.6, 0.8))


# -- on s3://, the fake engine, in process -----------------------------------------------------------

@pytest.fixture
def ray_after_s3(s3_server):
    """A Ray started after the S3 variables are set, so that its workers reach the S3 server."""
    from conftest import local_ray

    yield from local_ray()


@pytest.mark.datapath
def test_run_batch_reads_and_writes_s3(s3_server, ray_after_s3, tiny_model):
    from pipeline.io.output import OutputStore
    from pipeline.ops.openai_batch import run_batch
    from pipeline.testing import fake_engine_factory

    bucket = s3_server.bucket()
    s3_server.write(f"{bucket}/in/batch.jsonl",
                    ("\n".join([chat("a", max_tokens=3), chat("b"), "nope", chat("c", n=17)]) + "\n").encode())
    kwargs = {"model": str(tiny_model), "overrides": ["sampling.max_tokens=4"], "progress": False,
              "engine_factory": fake_engine_factory()}
    report = run_batch(f"{bucket}/in/batch.jsonl", f"{bucket}/out/result.jsonl", **kwargs)
    assert (report.exit_code, report.requests, report.succeeded, report.failed, report.computed) == (0, 4, 2, 2, 2)
    lines = [json.loads(x) for x in s3_server.read(f"{bucket}/out/result.jsonl").decode().splitlines()]
    assert [x["custom_id"] for x in lines] == ["a", "b", None, "c"]
    assert [x["response"]["body"]["usage"]["completion_tokens"] for x in lines[:2]] == [3, 4]
    assert "line 4: body.n: Input should be less than or equal to 16" in lines[3]["error"]["message"]
    assert OutputStore(f"{bucket}/out/result.jsonl.work/job").read_manifest()["status"] == "complete"
    again = run_batch(f"{bucket}/in/batch.jsonl", f"{bucket}/out/result.jsonl", **kwargs)
    assert (again.exit_code, again.computed, again.succeeded) == (0, 0, 2)
    assert [json.loads(x)["custom_id"] for x in s3_server.read(f"{bucket}/out/result.jsonl").decode().splitlines()] \
        == ["a", "b", None, "c"]

    # embeddings: the embed head, one vector per request
    import openai.types as openai_types
    s3_server.write(f"{bucket}/in/embed.jsonl", ("\n".join(
        [line("x", {"input": "hello world"}, url=EMBED_URL), line("y", {"input": ["a", "b"]}, url=EMBED_URL),
         line("z", {"input": ["one more"], "encoding_format": "float"}, url=EMBED_URL)]) + "\n").encode())
    from pipeline.testing import FakeEngine

    dims = [f"task.options.dimensions={FakeEngine.embed_size}"]  # the fake engine's vectors are that long
    report = run_batch(f"{bucket}/in/embed.jsonl", f"{bucket}/out/embed.jsonl", **{**kwargs, "overrides": dims})
    assert (report.exit_code, report.succeeded, report.failed) == (0, 2, 1)
    lines = [json.loads(x) for x in s3_server.read(f"{bucket}/out/embed.jsonl").decode().splitlines()]
    assert [x["custom_id"] for x in lines] == ["x", "y", "z"] and "several texts" in lines[1]["error"]["message"]
    for x in (lines[0], lines[2]):
        body = openai_types.CreateEmbeddingResponse.model_validate(x["response"]["body"])
        assert sum(v * v for v in body.data[0].embedding) == pytest.approx(1.0, abs=1e-4)
        assert body.usage.prompt_tokens > 0


# -- end to end -----------------------------------------------------------------------------------

CHAT_LINES = [
    line("greet", {"model": "tiny", "messages": [{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "Say hello."}], "temperature": 0,
                   "max_tokens": 5}),
    line("river", {"model": "tiny", "messages": [{"role": "user", "content": "Name a river."}], "max_tokens": 3,
                   "seed": 7, "n": 2}),
    '{"custom_id": "broken", "method": "POST", "url": ',
    line("twice", {"model": "tiny", "messages": [{"role": "user", "content": "One?"}]}),
    line("colour", {"model": "tiny", "messages": [{"role": "user", "content": "A colour."}], "stop": ["."],
                    "max_completion_tokens": 4}),
    line("twice", {"model": "tiny", "messages": [{"role": "user", "content": "Two?"}]}),
]


def prompt_tokens(tokenizer, messages) -> int:
    """The tokenizer's count of the chat-templated prompt (thinking off), as usage.prompt_tokens must be."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def run_batch_cli(tiny_model, inp, out):
    return run_cli("run-batch", "-i", str(inp), "-o", str(out), "--model", str(tiny_model),
                   "--max-model-len", str(MAX_LEN), "--dtype", "float32", "--served-model-name", "tiny-qwen3",
                   "--set", "model.engine_kwargs.enforce_eager=true", "--set", "sampling.max_tokens=6",
                   "--no-progress")


@pytest.mark.engine
def test_run_batch_end_to_end_and_resume(tiny_model, tokenizer, tmp_path):
    from openai.types.chat import ChatCompletion  # the client's own type

    from pipeline.io.output import OutputStore

    inp, out = tmp_path / "batch.jsonl", tmp_path / "out" / "results.jsonl"
    inp.write_text("\n".join(CHAT_LINES) + "\n")
    proc = run_batch_cli(tiny_model, inp, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not proc.leftovers
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    ids = [x["custom_id"] for x in lines]
    assert ids == ["greet", "river", None, "twice", "colour"]  # input order; each custom_id once
    by_id = {x["custom_id"]: x for x in lines}
    assert "line 3 is not valid JSON" in by_id[None]["error"]["message"]
    assert by_id["twice"]["error"]["code"] == "duplicate_custom_id"
    assert "lines 4, 6" in by_id["twice"]["error"]["message"]
    inputs = {json.loads(x)["custom_id"]: json.loads(x)["body"] for x in CHAT_LINES if x.endswith("}")}
    for cid in ("greet", "river", "colour"):
        x = by_id[cid]
        assert x["error"] is None and x["response"]["status_code"] == 200
        done = ChatCompletion.model_validate(x["response"]["body"])
        assert done.model == "tiny-qwen3" and done.object == "chat.completion"
        assert done.usage.prompt_tokens == prompt_tokens(tokenizer, inputs[cid]["messages"])
        limit = inputs[cid].get("max_tokens") or inputs[cid].get("max_completion_tokens")
        assert 1 <= done.usage.completion_tokens <= limit * len(done.choices)
        assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    river = ChatCompletion.model_validate(by_id["river"]["response"]["body"])  # n: 2, one choice each
    assert [c.index for c in river.choices] == [0, 1]
    assert river.choices[0].message.content != river.choices[1].message.content
    assert river.usage.completion_tokens == 2 * 3  # both samples counted; random weights: no early stop
    first = out.read_text()
    manifest = OutputStore(str(out) + ".work/job").read_manifest()

    # the same command again: everything is committed, nothing is computed, the same answers come out
    proc = run_batch_cli(tiny_model, inp, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "0 computed by this run" in proc.stderr and "Nothing to do" in proc.stderr
    assert OutputStore(str(out) + ".work/job").read_manifest()["run_id"] == manifest["run_id"]

    def answers(text):
        return [(x["custom_id"], x["error"], x["response"]["body"].get("choices"), x["response"]["body"].get("usage"))
                for x in map(json.loads, text.splitlines())]

    assert answers(out.read_text()) == answers(first)
