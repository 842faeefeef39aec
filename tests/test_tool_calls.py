"""Tool calls in batch (issue 28 item 5): function definitions from task.options.tools or a
row's tools column rendered through the chat template, Qwen3's <tool_call> blocks parsed into
the typed tool_calls column, malformed calls as output_parse_error rows keeping the raw text.
Parsing on scripted completions with the real tokenizer; one job on the real engine."""

import asyncio
import json

import pyarrow as pa
import pytest

from pipeline.heads.base import RowError
from pipeline.heads.chat import ChatHead, ChatOptions, parse_tool_calls
from pipeline.testing import QWEN3_HYBRID_TEMPLATE, THINKING_2507_TEMPLATE, FakeEngine, with_chat_template

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"name": "get_time", "description": "The time in a zone.",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}  # the function object alone


def call(name, args):
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": args})}\n</tool_call>'


@pytest.mark.unit
@pytest.mark.parametrize("text, rest, calls", [
    (call("get_weather", {"city": "Paris"}), "", [("get_weather", {"city": "Paris"})]),
    (call("get_weather", {"city": "Paris"}) + "\n" + call("get_time", {"zone": "CET"}), "",
     [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]),
    ("Let me check.\n" + call("get_weather", {"city": "Oslo"}) + "\nDone.", "Let me check.\n\nDone.",
     [("get_weather", {"city": "Oslo"})]),
    ('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', "", [("f", {"a": 1})]),  # text args
    ('<tool_call>{"name": "f"}</tool_call>', "", [("f", {})]),
    ("No tools needed: 4.", "No tools needed: 4.", []),
    ('{"name": "f", "arguments": {}} without tags', '{"name": "f", "arguments": {}} without tags', []),
])
def test_parsing(text, rest, calls):
    outside, parsed = parse_tool_calls(text)
    assert outside == rest
    assert [(c["name"], json.loads(c["arguments"])) for c in parsed] == calls
    assert all(isinstance(c["arguments"], str) for c in parsed)


@pytest.mark.unit
@pytest.mark.parametrize("text, fragment", [
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>', "tool call 1 is not valid JSON"),
    (call("f", {}) + '<tool_call>{"name": "g", "arguments": {}}', "tool call 2 opens <tool_call> and never closes"),
    ('<tool_call>["f", {}]</tool_call>', "not an object with a name"),
    ('<tool_call>{"arguments": {}}</tool_call>', "not an object with a name"),
    ('<tool_call>{"name": "f", "arguments": [1]}</tool_call>', "arguments is not a JSON object"),
    ('<tool_call>{"name": "f", "arguments": "{oops"}</tool_call>', "arguments is not valid JSON"),
    ('answer</tool_call>', "closes no <tool_call>"),
])
def test_malformed_calls(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_tool_calls(text)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = QWEN3_HYBRID_TEMPLATE
    return tok


def run(head, row, engine):
    return asyncio.run(head.run(row, engine))


@pytest.mark.unit
def test_option_tools_are_rendered_and_counted_exactly(tokenizer):
    head = ChatHead({"tools": [WEATHER, TIME], "system_prompt": "Be brief."})
    eng = FakeEngine(tokenizer=tokenizer, answer=call("get_weather", {"city": "Paris"}), max_model_len=4096)
    out = run(head, {"prompt": "Weather in Paris?"}, eng)
    assert out["tool_calls"] == [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]
    assert out["response"] == "" and out["reasoning"] is None and out["finish_reason"] == "stop"
    tools = [WEATHER, {"type": "function", "function": TIME}]  # as the head normalises them
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
    ids = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, add_generation_prompt=True,
                                        enable_thinking=False, return_dict=True)["input_ids"]
    assert out["prompt_tokens"] == len(ids)
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=False)
    assert '"name": "get_weather"' in text and '"name": "get_time"' in text and "Be brief.\n\n# Tools" in text


@pytest.mark.unit
def test_row_tools_replace_the_jobs_and_control_strings_in_messages_stay_text(tokenizer):
    from pipeline.engine.prompt_tokens import plain_text_ids

    head = ChatHead({"tools": [WEATHER]})
    two = call("get_time", {"zone": "UTC"}) + call("get_time", {"zone": "CET"})
    eng = FakeEngine(tokenizer=tokenizer, answer=two, max_model_len=4096)
    prompt = "What time is it? <|im_start|>system"
    out = run(head, {"prompt": prompt, "tools": json.dumps([TIME])}, eng)
    assert [json.loads(c["arguments"])["zone"] for c in out["tool_calls"]] == ["UTC", "CET"]
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tools=[{"type": "function",
                                         "function": TIME}], tokenize=False, add_generation_prompt=True,
                                         enable_thinking=False)
    assert "get_weather" not in text
    before, _, after = text.partition(prompt)
    assert out["prompt_tokens"] == (len(tokenizer.encode(before, add_special_tokens=False))
                                    + len(plain_text_ids(tokenizer, prompt))
                                    + len(tokenizer.encode(after, add_special_tokens=False)))


@pytest.mark.unit
def test_no_tools_no_column_and_tool_text_is_left_alone(tokenizer):
    eng = FakeEngine(tokenizer=tokenizer, answer="use <tool_call> tags", max_model_len=4096)
    out = run(ChatHead(), {"prompt": "How do Qwen3 tool calls look?"}, eng)
    assert "tool_calls" not in out and out["response"] == "use <tool_call> tags"
    eng = FakeEngine(tokenizer=tokenizer, answer="Sunny, I think.", max_model_len=4096)
    assert run(ChatHead({"tools": [WEATHER]}), {"prompt": "Weather?"}, eng)["tool_calls"] == []


@pytest.mark.unit
def test_thinking_output_calls_after_the_reasoning(tokenizer):
    answer = "<think>\nI could call <tool_call> here.\n</think>\n\n" + call("get_weather", {"city": "Rome"})
    eng = FakeEngine(tokenizer=tokenizer, answer=answer, max_model_len=4096)
    out = run(ChatHead({"tools": [WEATHER], "enable_thinking": True}), {"prompt": "Rome?"}, eng)
    assert out["reasoning"] == "I could call <tool_call> here." and out["tool_calls"][0]["name"] == "get_weather"


@pytest.mark.unit
def test_malformed_call_is_an_output_parse_error_keeping_the_raw_text(tokenizer):
    raw = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    eng = FakeEngine(tokenizer=tokenizer, answer=raw, max_model_len=4096, finish="length")
    with pytest.raises(RowError) as e:
        run(ChatHead({"tools": [WEATHER]}), {"prompt": "Paris?"}, eng)
    assert e.value.error_type == "output_parse_error"
    assert "never closes" in e.value.message and raw in e.value.message


@pytest.mark.unit
@pytest.mark.parametrize("tools, fragment", [
    ("[{bad", "not valid JSON"),
    ("[]", "non-empty list"),
    (json.dumps([{"type": "function", "function": {"description": "x"}}]), "no function name"),
    (json.dumps([{"type": "retrieval"}]), "must be a function definition"),
    (json.dumps([{"name": "f", "description": "<|im_end|>"}]), "control token"),
])
def test_bad_row_tools_are_invalid_input(tokenizer, tools, fragment):
    eng = FakeEngine(tokenizer=tokenizer, answer="x", max_model_len=4096)
    with pytest.raises(RowError) as e:
        run(ChatHead(), {"prompt": "q", "tools": tools}, eng)
    assert e.value.error_type == "invalid_input" and fragment in e.value.message


@pytest.mark.unit
def test_option_tools_are_checked_when_the_spec_loads(tiny_model, tmp_path):
    from types import SimpleNamespace

    from pipeline.ops.tiny_model import QWEN3_CHAT_TEMPLATE

    assert "no function name" in ChatHead.check_options({"tools": [{"description": "x"}]})
    assert "control token" in ChatHead.check_options({"tools": [{"name": "f", "description": "<think>"}]})
    assert ChatOptions.model_validate({"tools": [TIME]}).tools == [{"type": "function", "function": TIME}]
    # a template that ignores tools (the tiny model's reduced one) is refused at planning
    variant = with_chat_template(tiny_model, tmp_path / "no-tools", QWEN3_CHAT_TEMPLATE)
    with pytest.raises(ValueError, match="does not render tool definitions"):
        ChatHead({"tools": [TIME]}).use_model(SimpleNamespace(_name_or_path=str(variant)))


def test_a_job_with_tools_on_the_real_engine(tiny_model, tmp_path):
    """A job on vLLM with the tiny model under Thinking-2507's template (which renders tools):
    the results carry the typed tool_calls column; random weights call no tool and never end
    their thinking, so each row is all reasoning, an empty answer and no calls."""
    from conftest import write_shards

    from pipeline.api import run as run_job

    variant = with_chat_template(tiny_model, tmp_path / "thinking", THINKING_2507_TEMPLATE, in_tokenizer_config=True)
    schema = pa.schema([("id", pa.int64()), ("prompt", pa.string()), ("tools", pa.string())])
    write_shards(tmp_path / "in", [[{"id": 0, "prompt": "Weather in Paris?", "tools": None},
                                    {"id": 1, "prompt": "Time in Oslo?", "tools": json.dumps([TIME])}]], schema)
    report = run_job({"input": {"path": str(tmp_path / "in")}, "output": {"path": str(tmp_path / "out")},
                      "model": {"source": str(variant), "max_model_len": 1024, "dtype": "float32",
                                "engine_kwargs": {"enforce_eager": True}},
                      "task": {"head": "chat", "options": {"tools": [WEATHER], "max_tokens": 6}},
                      "sampling": {"temperature": 0}}, progress=False)
    assert report.exit_code == 0 and report.errors == 0
    from conftest import read_dir

    results = read_dir(tmp_path / "out" / "results")
    assert results.schema.field("tool_calls").type == pa.list_(pa.struct([("name", pa.string()),
                                                                          ("arguments", pa.string())]))
    for row in results.to_pylist():
        assert row["tool_calls"] == [] and row["response"] == "" and row["reasoning"]
        assert row["finish_reason"] == "length"


@pytest.mark.unit
def test_row_tools_as_a_list_of_structs(tokenizer):
    """A Parquet list<struct> tools column: absent fields come back null, and the parameters'
    JSON schema is held as text."""
    row_tools = [{"type": "function", "function": {"name": "get_time", "description": None,
                                                   "parameters": json.dumps(TIME["parameters"])}}]
    eng = FakeEngine(tokenizer=tokenizer, answer=call("get_time", {"zone": "UTC"}), max_model_len=4096)
    out = run(ChatHead(), {"prompt": "Time?", "tools": row_tools}, eng)
    assert out["tool_calls"] == [{"name": "get_time", "arguments": '{"zone": "UTC"}'}]
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": TIME["parameters"]}}]
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Time?"}], tools=tools, tokenize=True,
                                        add_generation_prompt=True, enable_thinking=False,
                                        return_dict=True)["input_ids"]
    assert out["prompt_tokens"] == len(ids)
