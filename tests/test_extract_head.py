"""Extract head without an engine: schema -> Arrow, option checks, answers -> rows (FakeEngine)."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pyarrow as pa
import pytest

from pipeline.heads import RowError, head_class
from pipeline.heads.extract import ExtractHead, SchemaError, coerce, fields_schema
from pipeline.io.sink import split_stage
from pipeline.spec import SpecError, load_spec
from pipeline.testing import FakeEngine
from pipeline.worker import stage_schema

FIELDS = {"brand": "string", "rating": "integer", "mood": "enum[pos,neg,mixed]", "tags": "list[string]",
          "price": "number?", "in_stock": "boolean", "dims": {"w": "number", "unit": "enum[cm,in]?"}}


def as_json(value):
    """A typed row's value as the JSON it came from: optional fields' nulls are absent keys."""
    if isinstance(value, dict):
        return {k: as_json(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [as_json(v) for v in value]
    return value


def schema_of(fields):
    return ExtractHead({"fields": fields}).schema


def test_registered_and_in_the_spec():
    assert head_class("extract") is ExtractHead
    spec = load_spec(data={"input": {"path": "/in"}, "output": {"path": "/out"}, "model": {"source": "m"},
                           "task": {"head": "extract", "options": {"fields": {"a": "string"}}}})
    assert spec.task.head == "extract"


def test_short_form_is_a_closed_json_schema():
    s = fields_schema(FIELDS)
    assert s["required"] == ["brand", "rating", "mood", "tags", "in_stock", "dims"]
    assert s["properties"]["mood"] == {"type": "string", "enum": ["pos", "neg", "mixed"]}
    assert s["properties"]["tags"] == {"type": "array", "items": {"type": "string"}}
    assert s["properties"]["dims"]["required"] == ["w"] and s["additionalProperties"] is False
    assert fields_schema({"xs": "list[enum[a, b]]"})["properties"]["xs"]["items"]["enum"] == ["a", "b"]
    objs = fields_schema({"xs": [{"k": "string", "v": "number?"}]})["properties"]["xs"]
    assert objs["type"] == "array" and objs["items"]["required"] == ["k"]
    jsonschema.Draft202012Validator.check_schema(s)


def test_schema_to_arrow_types():
    schema = ExtractHead({"fields": FIELDS}).result_schema(pa.string())
    assert schema.names == ["id", "brand", "rating", "mood", "tags", "price", "in_stock", "dims",
                            "raw", "reasoning", "finish_reason", "prompt_tokens", "completion_tokens"]
    t = {f.name: f for f in schema}
    assert t["id"].type == pa.string() and not t["id"].nullable
    assert t["brand"].type == pa.string() and not t["brand"].nullable
    assert t["rating"].type == pa.int64()
    assert t["mood"].type == pa.dictionary(pa.int32(), pa.string())
    assert t["tags"].type == pa.list_(pa.field("item", pa.string(), nullable=False))
    assert t["price"].type == pa.float64() and t["price"].nullable
    assert t["in_stock"].type == pa.bool_()
    dims = t["dims"].type
    assert isinstance(dims, pa.StructType) and dims.field("w").type == pa.float64() and not dims.field("w").nullable
    assert dims.field("unit").nullable and dims.field("unit").type == pa.dictionary(pa.int32(), pa.string())


def test_inline_schema_nullable_type_and_annotations():
    head = ExtractHead({"schema": {
        "$schema": "https://json-schema.org/draft/2020-12/schema", "title": "t", "type": "object",
        "properties": {"name": {"type": ["string", "null"], "description": "d", "maxLength": 5},
                       "n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["name", "n"]}})
    t = head.result_schema(pa.int64())
    assert t.field("name").nullable and not t.field("n").nullable
    # the constraint drops annotations and closes objects
    assert head.constraint == {"type": "object", "required": ["name", "n"], "additionalProperties": False,
                               "properties": {"name": {"type": ["string", "null"],
                                                       "pattern": '^[^\\x00-\\x1f"\\\\]{0,5}$'},
                                              "n": {"type": "integer", "minimum": 0, "maximum": 9}}}
    # the prompt shows the lengths as the user wrote them
    assert '"name":{"type":["string","null"],"maxLength":5}' in head.schema_text


def test_the_engine_constraint_keeps_control_characters_out_of_bounded_strings():
    """xgrammar's own bounded-string rule admits a raw tab (an answer json.loads refuses); the
    constraint the engine gets, compiled as vLLM compiles it, refuses it and keeps the bounds."""
    import xgrammar as xgr
    from xgrammar.testing import _is_grammar_accept_string as accepts

    head = ExtractHead({"schema": {"type": "object", "required": ["p", "q", "tags"], "properties": {
        "p": {"type": ["string", "null"], "maxLength": 4}, "q": {"type": "string", "minLength": 2},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 2}},
        "code": {"type": "string", "pattern": "^[A-Z]+$", "maxLength": 3}}}})

    def grammar(schema):
        return xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))

    bare, ours = grammar({**head.schema, "additionalProperties": False}), grammar(head.constraint)
    assert accepts(bare, '{"p":"a\tb","q":"xy","tags":[]}')  # the gap being closed
    for text, ok in [('{"p":"ab","q":"xyzzzzzz","tags":["a"]}', True), ('{"p":null,"q":"xy","tags":[]}', True),
                     ('{"p":"a\tb","q":"xy","tags":[]}', False), ('{"p":"ab","q":"xy","tags":["\u0001"]}', False),
                     ('{"p":"abcde","q":"xy","tags":[]}', False), ('{"p":"ab","q":"x","tags":[]}', False),
                     ('{"p":"ab","q":"xy","tags":["abc"]}', False), ('{"p":"ab","q":"xy","tags":[],"code":"AB"}', True),
                     ('{"p":"ab","q":"xy","tags":[],"code":"ab"}', False)]:
        assert accepts(ours, text) is ok, text
        assert ok is False or json.loads(text)
    # vLLM refuses a pattern next to lengths: the user's pattern stays, its lengths are checked on the answer
    assert head.constraint["properties"]["code"] == {"type": "string", "pattern": "^[A-Z]+$"}
    with pytest.raises(SchemaError, match="outside minLength/maxLength"):
        coerce({"p": "ab", "q": "xy", "tags": [], "code": "ABCD"}, head.schema, "")


@pytest.mark.parametrize("options, words", [
    ({"schema": {"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}]}}}}, ["'a'", "anyOf"]),
    ({"schema": {"type": "object", "properties": {"a": {"type": "string", "format": "date"}}}}, ["'a'", "format"]),
    ({"schema": {"type": "object", "properties": {"a": {"type": "object",
                                                        "properties": {"b": {"type": "integer", "multipleOf": 2}}}}}},
     ["'a.b'", "multipleOf"]),
    ({"schema": {"type": "object", "properties": {"a": {"type": "object", "properties": {}}}}},
     ["'a'", "at least one property"]),
    ({"schema": {"type": "object", "properties": {}}}, ["at least one property"]),
    ({"schema": {"type": "array", "items": {"type": "string"}}}, ["top level must be an object"]),
    ({"schema": {"type": "object", "properties": {"a": {"type": "object", "properties": {"x": {"type": "string"}},
                                                        "additionalProperties": True}}}},
     ["'a'", "additionalProperties"]),
    ({"schema": {"type": "object", "properties": {"raw": {"type": "string"}}}}, ["'raw'", "clashes"]),
    ({"fields": {"reasoning": "string"}}, ["'reasoning'", "clashes"]),
    ({"fields": {"id": "integer"}}, ["'id'", "clashes"]),
    ({"fields": {"a": {"b": "strng"}}}, ["'a.b'", "unknown type"]),
    ({"fields": {"a": {}}}, ["'a'", "at least one field"]),
    ({"fields": {"a": "enum[x,x]"}}, ["'a'", "distinct"]),
    ({"schema": {"type": "object", "properties": {"a": {"enum": [1, 2]}}}}, ["'a'", "strings"]),
    ({"schema": {"type": "object", "properties": {"a": {"type": "array"}}}}, ["'a'", "items"]),
    ({"schema": {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}}, ["required", "'b'"]),
    ({}, ["either schema", "or fields"]),
    ({"fields": {"a": "string"}, "schema": {"type": "object", "properties": {"b": {"type": "string"}}}}, ["not both"]),
    ({"fields": {"a": "integer"}, "examples": [{"text": "t", "output": {"a": "x"}}]}, ["examples[0]", "'a'"]),
    ({"fields": {"a": "integer"}, "max_token": 8}, ["max_token"]),
])
def test_bad_options_are_refused_naming_the_field(options, words):
    problem = ExtractHead.check_options(options)
    assert problem is not None
    for w in words:
        assert w in problem, (w, problem)


def test_good_options_pass_and_schema_file_is_read(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}))
    assert ExtractHead.check_options({"schema": str(path), "examples": [{"text": "t", "output": {"a": "x"}}]}) is None
    spec = load_spec(data={"input": {"path": "/in"}, "output": {"path": "/out"}, "model": {"source": "m"},
                           "task": {"head": "extract", "options": {"schema": str(path)}}})
    assert spec.task.options["schema"]["properties"] == {"a": {"type": "string"}}  # content, not the path
    with pytest.raises(SpecError, match="cannot be read"):
        load_spec(data={"input": {"path": "/in"}, "output": {"path": "/out"}, "model": {"source": "m"},
                        "task": {"head": "extract", "options": {"schema": str(tmp_path / "none.json")}}})
    assert "not valid JSON" in ExtractHead.check_options({"schema": "{nope"})


def test_coerce_checks_what_the_columns_hold():
    s = schema_of({"n": "integer", "x": "number?", "e": "enum[a,b]", "sub": {"k": "boolean"}})
    assert coerce({"n": 3.0, "e": "a", "sub": {"k": True}}, s, "") == {"n": 3, "x": None, "e": "a", "sub": {"k": True}}
    for bad, where in [({"n": 2 ** 63, "e": "a", "sub": {"k": True}}, "'n'"),
                       ({"n": 1.5, "e": "a", "sub": {"k": True}}, "'n'"),
                       ({"n": 1, "e": "c", "sub": {"k": True}}, "'e'"),
                       ({"n": 1, "e": "a", "sub": {"k": 1}}, "'sub.k'"),
                       ({"n": 1, "e": "a"}, "lacks required"),
                       ({"n": 1, "e": "a", "sub": {"k": True}, "zz": 1}, "unexpected")]:
        with pytest.raises(SchemaError, match=where):
            coerce(bad, s, "")
    bounded = ExtractHead({"schema": {"type": "object",
                                      "properties": {"v": {"type": "number", "exclusiveMaximum": 1}}}}).schema
    with pytest.raises(SchemaError, match="bounds"):
        coerce({"v": 1}, bounded, "")


def run(head, row, engine):
    return asyncio.run(head.run(row, engine))


def test_answer_becomes_a_typed_row_and_round_trips_the_stage():
    head = ExtractHead({"fields": FIELDS, "examples": [{"text": "ex", "output": {
        "brand": "B", "rating": 1, "mood": "neg", "tags": [], "in_stock": False, "dims": {"w": 1}}}]})
    answer = {"brand": "Acmé 東京", "rating": 4, "mood": "pos", "tags": ["a", "b"], "in_stock": True,
              "dims": {"w": 2.5}}
    engine = FakeEngine(answer=json.dumps(answer, ensure_ascii=False))
    out = run(head, {"text": "a review"}, engine)
    assert out["brand"] == "Acmé 東京" and out["price"] is None and out["dims"] == {"w": 2.5, "unit": None}
    assert json.loads(out["raw"]) == answer and out["reasoning"] is None and out["finish_reason"] == "stop"
    sampling = engine.calls[0]
    assert sampling["structured_json"] == head.constraint and "thinking_token_budget" not in sampling
    messages, thinking = engine.rendered[0]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"] and not thinking
    assert '"enum":["pos","neg","mixed"]' in messages[0]["content"] and "a review" in messages[-1]["content"]
    # stage -> results keeps the types
    schema = head.result_schema(pa.int64())
    stage = pa.Table.from_pylist([{**out, "id": 7, "path": "p"},
                                  {"id": 8, "path": "p", "error_type": "output_parse_error", "error_message": "m"}],
                                 schema=stage_schema(head, pa.int64()))
    results, errors = split_stage(stage, "extract", pa.int64(), schema)
    assert results.schema == schema and errors.num_rows == 1
    row = results.to_pylist()[0]
    jsonschema.validate(json.loads(row["raw"]), head.schema)
    assert as_json({k: v for k, v in row.items() if k in head.schema["properties"]}) == as_json(answer)


def test_thinking_keeps_reasoning_and_budget():
    head = ExtractHead({"fields": {"a": "integer"}, "enable_thinking": True, "thinking_budget": 32})
    engine = FakeEngine(answer="let me see</think>\n\n{\"a\":1}")
    out = run(head, {"prompt": "give a"}, engine)
    assert out["a"] == 1 and out["reasoning"] == "let me see" and out["raw"] == '{"a":1}'
    assert engine.calls[0]["thinking_token_budget"] == 32 and engine.rendered[0][1] is True
    assert engine.calls[0]["temperature"] == 0.6  # Qwen3's thinking sampling


@pytest.mark.parametrize("answer, finish, words", [
    ('{"a":1', "length", ["cut by max_tokens", '{\\"a\\":1']),
    ("x" * 1000, "length", ["cut by max_tokens", "1,000 characters"]),
    ("not json", "stop", ["not valid JSON", "not json"]),
    ('{"a":"one"}', "stop", ["does not match", "'a'"]),
])
def test_bad_answers_are_output_parse_errors_with_the_raw_text(answer, finish, words):
    head = ExtractHead({"fields": {"a": "integer"}})
    with pytest.raises(RowError) as e:
        run(head, {"text": "t"}, FakeEngine(answer=answer, finish=finish))
    assert e.value.error_type == "output_parse_error"
    for w in words:
        assert w in e.value.message
    assert len(e.value.message) < 600


def test_row_columns_switch_thinking_and_lower_max_tokens():
    head = ExtractHead({"fields": {"a": "integer"}, "thinking_budget": 8, "max_tokens": 64})
    engine = FakeEngine(answer='{"a":1}')
    run(head, {"text": "t", "enable_thinking": False, "sampling": '{"max_tokens": 5}'}, engine)
    assert engine.calls[-1]["max_tokens"] == 5 and "thinking_token_budget" not in engine.calls[-1]
    engine = FakeEngine(answer='r</think>{"a":1}')
    assert run(head, {"text": "t", "enable_thinking": True}, engine)["reasoning"] == "r"
    assert engine.calls[-1]["thinking_token_budget"] == 8 and engine.rendered[-1][1] is True
    for row in ({"text": "t", "sampling": '{"max_tokens": 65}'}, {"text": "t", "enable_thinking": "yes"}):
        with pytest.raises(RowError) as e:
            run(head, row, FakeEngine(answer='{"a":1}'))
        assert e.value.error_type == "invalid_input"


def test_unfinished_thinking_is_an_output_parse_error():
    head = ExtractHead({"fields": {"a": "integer"}, "enable_thinking": True})
    with pytest.raises(RowError, match="reasoning did not end"):
        run(head, {"text": "t"}, FakeEngine(answer="thinking forever", finish="length"))


def test_rows_take_text_prompt_or_messages():
    head = ExtractHead({"fields": {"a": "integer"}, "instruction": "Read: {text}"})
    assert head.messages({"text": "hello"})[-1] == {"role": "user", "content": "Read: hello"}
    assert head.messages({"prompt": "whole prompt", "text": "x"})[-1]["content"] == "whole prompt"
    conv = head.messages({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]})
    assert conv[0]["role"] == "system" and conv[0]["content"].startswith("S\n\n") and conv[-1]["content"] == "U"
    for row in ({}, {"text": " "}, {"messages": [{"role": "assistant", "content": "a"}]}):
        with pytest.raises(RowError) as e:
            head.messages(row)
        assert e.value.error_type == "invalid_input"
