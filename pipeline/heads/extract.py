"""Extract head: a JSON answer constrained by a JSON Schema, written as typed columns.

The job gives a JSON Schema (`schema`, inline or a .json file) or the short form `fields`
({name: string | integer | number | boolean | enum[a,b] | list[T] | {nested} | [{nested}]},
`?` at the end for an optional field). Every top-level property of the schema becomes a Parquet column of
the matching Arrow type (object -> struct, array -> list, string enum -> dictionary string,
integer -> int64, number -> float64, boolean -> bool; optional fields are nullable), next to
`raw` (the answer's JSON text), `reasoning`, `finish_reason`, `prompt_tokens` and
`completion_tokens`.

The engine decodes under the schema (the sampling key `structured_json`: vLLM structured
outputs, xgrammar on the CPU build). With thinking on, the reasoning is free text and the
constraint starts after `</think>` (vLLM's qwen3 reasoning parser). Every answer is checked
again against the schema here before it becomes a row; an answer cut by max_tokens, or one
that does not parse, is an output_parse_error row keeping the start of the raw text.

Only a subset of JSON Schema is accepted (the keywords in ALLOWED), checked at `validate`
time with messages naming the field: what the typed columns can hold, and what the
constraint backend enforces.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.heads.base import Engine, Head, HeadOptions, RowError, require_placeholders, require_text
from pipeline.heads.chat import (
    ALWAYS,
    QWEN3_SAMPLING,
    ROLES,
    model_thinking_mode,
    row_sampling,
    split_reasoning,
    thinking_for,
)

FIXED_COLUMNS = ("raw", "reasoning", "finish_reason", "prompt_tokens", "completion_tokens")
# Columns of the stage and the output that a top-level field may not take.
RESERVED = frozenset({"id", "path", "error_type", "error_message", *FIXED_COLUMNS,
                      "_started", "_finished", "_engine_settings", "_worker"})
ANNOTATIONS = {"description", "title"}
ALLOWED = {  # keywords per JSON type; "type", "enum" and annotations go with every type
    "object": {"properties", "required", "additionalProperties"},
    "array": {"items", "minItems", "maxItems"},
    "string": {"minLength", "maxLength", "pattern"},
    "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
    "boolean": set(),
}
TOP_LEVEL_EXTRA = {"$schema", "$id"}
INT64 = (-(1 << 63), (1 << 63) - 1)
RAW_IN_MESSAGE = 300  # characters of a bad answer kept in its error message
SHORT_TYPES = {"string", "integer", "number", "boolean"}

DEFAULT_SYSTEM = ("Answer only with a JSON object that matches this JSON Schema:\n{schema}")
DEFAULT_INSTRUCTION = "Extract the information from the text below.\n\nText:\n{text}"


class SchemaError(ValueError):
    """A schema (or fields form) the head cannot use; the message names the field."""


class Example(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    output: dict[str, Any]


class ExtractOptions(HeadOptions):
    schema_: dict[str, Any] | None = Field(
        None, alias="schema",
        description="A JSON Schema of an object (inline, or the path of a .json file, read when "
        "the spec is loaded); its top-level properties become columns.")
    fields: dict[str, Any] | None = Field(
        None, description="Short form instead of schema: {name: string | integer | number | boolean | "
        "enum[a,b] | list[TYPE] | {nested fields} | [{fields of each item}]}; a trailing ? makes a field optional.")
    text_column: str = Field("text", description="Column with the text to extract from (put into instruction).")
    messages_column: str = Field("messages", description="Column with a list of {role, content} (used as is).")
    prompt_column: str = Field("prompt", description="Column with a whole user prompt (used as is).")
    sampling_column: str = Field("sampling", description="Column with per-row sampling overrides (JSON object or "
                                 "struct), as the chat head.")
    thinking_column: str = Field("enable_thinking", description="Boolean column turning thinking on or off for a row "
                                 "(null: the option).")
    instruction: str = Field(DEFAULT_INSTRUCTION, description="The user turn for text rows; {text} is the row's text, "
                             "{schema} the schema.")
    system_prompt: str = Field(DEFAULT_SYSTEM, description="System prompt; {schema} is the JSON Schema. "
                               "A conversation's own system turn gets it appended.")
    examples: list[Example] = Field(default_factory=list, description="Few-shot {text, output} pairs; outputs are "
                                    "checked against the schema.")
    enable_thinking: bool | None = Field(
        None, description="Qwen3 thinking: free reasoning, then the constrained answer; unset: off, unless the "
        "checkpoint always thinks (Thinking-2507).")
    thinking_budget: int | None = Field(
        None, ge=0, description="With thinking: at most this many reasoning tokens, then </think> is forced "
        "(vLLM thinking_token_budget); none: reasoning until the model ends it or max_tokens.")
    max_tokens: int = Field(512, ge=1, description="Default max_tokens when sampling sets none (reasoning included).")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("instruction")
    @classmethod
    def _instruction_has_text(cls, v: str) -> str:
        return require_placeholders(v, "text")


# ---------------------------------------------------------------- schema: short form, checks

def parse_short(text: str, where: str) -> dict[str, Any]:
    """JSON Schema of one short-form type."""
    text = text.strip()
    if text in SHORT_TYPES:
        return {"type": text}
    m = re.fullmatch(r"enum\[(.*)\]", text, re.S)
    if m:
        values = [v.strip() for v in m.group(1).split(",")]
        if not all(values) or len(set(values)) != len(values):
            raise SchemaError(f"field '{where}': enum[...] needs distinct, non-empty values (got {text!r})")
        return {"type": "string", "enum": values}
    m = re.fullmatch(r"list\[(.*)\]", text, re.S)
    if m:
        return {"type": "array", "items": parse_short(m.group(1), f"{where}[]")}
    raise SchemaError(f"field '{where}': unknown type {text!r}; use string, integer, number, boolean, "
                      f"enum[a,b,...], list[TYPE] or a mapping of fields")


def fields_schema(fields: dict[str, Any], where: str = "") -> dict[str, Any]:
    """JSON Schema of an object from the short form."""
    if not fields:
        raise SchemaError(f"field '{where}': an object needs at least one field" if where
                          else "fields: give at least one field")
    props, required = {}, []
    for name, typ in fields.items():
        path = f"{where}.{name}" if where else str(name)
        if isinstance(typ, dict):
            props[name] = fields_schema(typ, path)
            required.append(name)
        elif isinstance(typ, list) and len(typ) == 1 and isinstance(typ[0], dict):  # [{...}]: a list of objects
            props[name] = {"type": "array", "items": fields_schema(typ[0], f"{path}[]")}
            required.append(name)
        elif isinstance(typ, str):
            optional = typ.rstrip().endswith("?")
            props[name] = parse_short(typ.rstrip().removesuffix("?"), path)
            if not optional:
                required.append(name)
        else:
            raise SchemaError(f"field '{path}': give a type name (string, integer, ...), a mapping of fields "
                              f"or [a mapping] for a list of objects")
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def _types(node: dict[str, Any], where: str) -> tuple[str, bool]:
    """(JSON type, nullable) of a schema node."""
    typ = node.get("type")
    if typ is None and "enum" in node:
        typ = "string"
    if isinstance(typ, list):
        rest = [t for t in typ if t != "null"]
        if len(rest) != 1:
            raise SchemaError(f"field '{where}': type {typ} is not supported; one type (optionally with \"null\")")
        return rest[0], len(rest) < len(typ)
    if typ is None:
        raise SchemaError(f"field '{where}': give a type (object, array, string, integer, number, boolean)")
    if typ == "null":
        raise SchemaError(f"field '{where}': a field that is always null is not supported")
    return typ, False


def check_node(node: Any, where: str, *, top: bool = False) -> None:
    """Raise SchemaError for anything in a schema node the head does not support."""
    label = where or "(top level)"
    if not isinstance(node, dict):
        raise SchemaError(f"field '{label}': the schema must be a JSON object")
    known = set().union(*ALLOWED.values()) | ANNOTATIONS | {"type", "enum"} | (TOP_LEVEL_EXTRA if top else set())
    unknown = sorted(set(node) - known)
    if unknown:
        raise SchemaError(f"field '{label}': keyword {unknown[0]!r} is not supported (the typed columns need "
                          f"one type per field: no anyOf/oneOf/allOf/$ref/const/format/...)")
    typ, _ = _types(node, label)
    if typ not in ALLOWED:
        raise SchemaError(f"field '{label}': type {typ!r} is not supported "
                          "(object, array, string, integer, number, boolean)")
    allowed = ALLOWED[typ] | ANNOTATIONS | {"type", "enum"} | (TOP_LEVEL_EXTRA if top else set())
    for key in node:
        if key not in allowed:
            raise SchemaError(f"field '{label}': keyword {key!r} is not supported for a {typ} "
                              f"(supported: {', '.join(sorted(allowed - ANNOTATIONS - TOP_LEVEL_EXTRA))})")
    if "enum" in node:
        values = node["enum"]
        if typ != "string" or not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            raise SchemaError(f"field '{label}': enum must be a non-empty list of strings (a string field)")
        if len(set(values)) != len(values):
            raise SchemaError(f"field '{label}': enum values must be distinct")
    if typ == "object":
        props = node.get("properties")
        if not isinstance(props, dict) or not props:
            raise SchemaError(f"field '{label}': an object needs at least one property "
                              f"(an empty or free-form object has no typed column)")
        if node.get("additionalProperties", False) is not False:
            raise SchemaError(f"field '{label}': additionalProperties must be false or absent "
                              f"(extra keys would have no column)")
        required = node.get("required", [])
        if not isinstance(required, list) or any(r not in props for r in required):
            bad = [r for r in required if r not in props] if isinstance(required, list) else required
            raise SchemaError(f"field '{label}': required names {bad} that are not properties")
        for name, sub in props.items():
            if not name:
                raise SchemaError(f"field '{label}': a property has an empty name")
            if top and name in RESERVED:
                raise SchemaError(f"field '{name}': clashes with a column of the results "
                                  f"({', '.join(sorted(RESERVED))}); rename it")
            check_node(sub, f"{where}.{name}" if where else name)
    elif typ == "array":
        if not isinstance(node.get("items"), dict):
            raise SchemaError(f"field '{label}': an array needs 'items' (the schema of its elements)")
        check_node(node["items"], f"{label}[]")
    elif typ in ("integer", "number"):
        for key in ALLOWED[typ] & node.keys():
            if isinstance(node[key], bool) or not isinstance(node[key], (int, float)):
                raise SchemaError(f"field '{label}': {key} must be a number")
    for key in ("minLength", "maxLength", "minItems", "maxItems"):
        if key in node and (isinstance(node[key], bool) or not isinstance(node[key], int) or node[key] < 0):
            raise SchemaError(f"field '{label}': {key} must be a non-negative integer")


def check_schema(schema: Any) -> None:
    if not isinstance(schema, dict) or _types(schema, "(top level)")[0] != "object":
        raise SchemaError("the schema's top level must be an object ({\"type\": \"object\", \"properties\": ...})")
    check_node(schema, "", top=True)


def constraint(node: dict[str, Any], *, engine: bool = True) -> dict[str, Any]:
    """The schema sent to the engine: annotations dropped, objects closed (no extra keys);
    engine=False: as the prompt shows it (string lengths left as lengths)."""
    out = {k: v for k, v in node.items() if k not in ANNOTATIONS and k not in TOP_LEVEL_EXTRA}
    if "properties" in out:
        out["properties"] = {k: constraint(v, engine=engine) for k, v in out["properties"].items()}
        out["additionalProperties"] = False
    if isinstance(out.get("items"), dict):
        out["items"] = constraint(out["items"], engine=engine)
    if engine and ("minLength" in out or "maxLength" in out):
        # xgrammar (0.2.8) lets raw control characters (a tab, \x01) into a length-bounded
        # string, which no JSON parser reads back, and vLLM refuses lengths next to a pattern.
        # So the engine gets the bounds as a pattern, which xgrammar enforces as written
        # (escapes stay out, as in its own bounded strings); next to the user's own pattern
        # the lengths are checked on the answer only.
        low, high = out.pop("minLength", 0), out.pop("maxLength", "")
        out.setdefault("pattern", f'^[^\\x00-\\x1f"\\\\]{{{low},{high}}}$')
    return out


# ---------------------------------------------------------------- schema -> Arrow

def arrow_type(node: dict[str, Any]) -> pa.DataType:
    typ, _ = _types(node, "")
    if "enum" in node:
        return pa.dictionary(pa.int32(), pa.string())
    if typ == "object":
        required = set(node.get("required", []))
        return pa.struct([arrow_field(name, sub, name in required) for name, sub in node["properties"].items()])
    if typ == "array":
        return pa.list_(arrow_field("item", node["items"], True))
    return {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}[typ]


def arrow_field(name: str, node: dict[str, Any], required: bool) -> pa.Field:
    return pa.field(name, arrow_type(node), nullable=not required or _types(node, name)[1])


def typed_fields(schema: dict[str, Any]) -> list[pa.Field]:
    """The typed result columns of a (checked) schema, in property order."""
    required = set(schema.get("required", []))
    return [arrow_field(name, sub, name in required) for name, sub in schema["properties"].items()]


# ---------------------------------------------------------------- answer -> row values

def coerce(value: Any, node: dict[str, Any], where: str, *, required: bool = True) -> Any:
    """The answer's value as the column holds it; SchemaError naming the field if it does not fit."""
    typ, nullable = _types(node, where)
    if value is None:
        if nullable or not required:
            return None
        raise SchemaError(f"field '{where}' is null")
    if typ == "object":
        if not isinstance(value, dict):
            raise SchemaError(f"field '{where or '(top level)'}' is not an object")
        props, req = node["properties"], set(node.get("required", []))
        extra = [k for k in value if k not in props]
        if extra:
            raise SchemaError(f"field '{where or '(top level)'}' has unexpected keys {extra}")
        missing = [k for k in req if k not in value]
        if missing:
            raise SchemaError(f"field '{where or '(top level)'}' lacks required {missing}")
        return {k: coerce(value.get(k), sub, f"{where}.{k}" if where else k, required=k in req)
                for k, sub in props.items()}
    if typ == "array":
        if not isinstance(value, list):
            raise SchemaError(f"field '{where}' is not an array")
        if len(value) < node.get("minItems", 0) or len(value) > node.get("maxItems", len(value)):
            raise SchemaError(f"field '{where}' has {len(value)} items, outside minItems/maxItems")
        return [coerce(v, node["items"], f"{where}[{i}]") for i, v in enumerate(value)]
    if typ == "string":
        if not isinstance(value, str):
            raise SchemaError(f"field '{where}' is not a string")
        if "enum" in node and value not in node["enum"]:
            raise SchemaError(f"field '{where}' is {value!r}, not one of {node['enum']}")
        if len(value) < node.get("minLength", 0) or len(value) > node.get("maxLength", len(value)):
            raise SchemaError(f"field '{where}' has {len(value)} characters, outside minLength/maxLength")
        return value
    if typ == "boolean":
        if not isinstance(value, bool):
            raise SchemaError(f"field '{where}' is not a boolean")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SchemaError(f"field '{where}' is not a number")
    if typ == "integer":
        if isinstance(value, float):
            if not value.is_integer():
                raise SchemaError(f"field '{where}' is {value}, not an integer")
            value = int(value)
        if not INT64[0] <= value <= INT64[1]:
            raise SchemaError(f"field '{where}' is {value}, outside the 64-bit integer range")
    else:
        value = float(value)
    lo, hi = node.get("minimum"), node.get("maximum")
    xlo, xhi = node.get("exclusiveMinimum"), node.get("exclusiveMaximum")
    if (lo is not None and value < lo) or (hi is not None and value > hi) \
            or (xlo is not None and value <= xlo) or (xhi is not None and value >= xhi):
        raise SchemaError(f"field '{where}' is {value}, outside its bounds")
    return value


def _shown(text: str) -> str:
    cut = text[:RAW_IN_MESSAGE]
    return json.dumps(cut, ensure_ascii=False) + (f" ... ({len(text):,} characters)" if len(text) > len(cut) else "")


def read_schema(value: Any) -> Any:
    """options.schema as given: an object, JSON text, or the path of a .json file."""
    if not isinstance(value, str):
        return value
    if value.lstrip().startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"schema is not valid JSON ({e.msg})") from None
    try:
        return json.loads(Path(value).read_text())
    except OSError as e:
        raise ValueError(f"schema file '{value}' cannot be read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"schema file '{value}' is not valid JSON ({e.msg}, line {e.lineno})") from None


class ExtractHead(Head):
    name = "extract"
    Options = ExtractOptions
    options: ExtractOptions

    def __init__(self, options: dict[str, Any] | None = None, *, sampling: dict[str, Any] | None = None):
        super().__init__(self.resolve_options(options or {}), sampling=sampling)
        self.schema = self.build_schema(self.options)
        self.thinking, self.thinking_mode = bool(self.options.enable_thinking), None
        self.constraint = constraint(self.schema)
        self.schema_text = json.dumps(constraint(self.schema, engine=False), ensure_ascii=False, separators=(",", ":"))

    def use_model(self, config: Any) -> None:
        """Think as the checkpoint's chat template allows (chat.thinking_for)."""
        self.thinking_mode = model_thinking_mode(config)
        self.thinking = thinking_for(self.thinking_mode, self.options.enable_thinking)

    # ---- options

    @classmethod
    def resolve_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        if isinstance(options, dict) and isinstance(options.get("schema"), str):
            return {**options, "schema": read_schema(options["schema"])}
        return options

    @staticmethod
    def build_schema(o: ExtractOptions) -> dict[str, Any]:
        if (o.schema_ is None) == (o.fields is None):
            raise SchemaError("give either schema (a JSON Schema) or fields (the short form), not both or neither")
        schema = fields_schema(o.fields) if o.fields is not None else o.schema_
        check_schema(schema)
        return schema

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> str | None:
        where = f"task.options for head '{cls.name}'"
        try:
            options = cls.resolve_options(options or {})
        except ValueError as e:
            return f"{where}: {e}"
        problem = super().check_options(options)
        if problem:
            return problem
        o = cls.Options.model_validate(options)
        fields_in = "fields" if o.fields is not None else "schema"
        try:
            schema = cls.build_schema(o)
        except SchemaError as e:
            return f"{where}: {fields_in}: {e}"
        for i, ex in enumerate(o.examples):
            try:
                coerce(ex.output, schema, "")
            except SchemaError as e:
                return f"{where}: examples[{i}].output does not match the {fields_in}: {e}"
        return None

    def input_columns(self) -> list[str]:
        o = self.options
        return [o.text_column, o.messages_column, o.prompt_column, o.sampling_column, o.thinking_column]

    def required_any(self) -> list[str]:
        o = self.options
        return [o.text_column, o.messages_column, o.prompt_column]

    def result_schema(self, id_type: pa.DataType) -> pa.Schema:
        fixed = super().result_schema(id_type)
        return pa.schema([fixed.field("id")] + typed_fields(self.schema)
                         + [fixed.field(n) for n in FIXED_COLUMNS])

    # ---- prompt

    def _system(self) -> str:
        return self.options.system_prompt.replace("{schema}", self.schema_text)

    def _user(self, text: str) -> str:
        return self.options.instruction.replace("{schema}", self.schema_text).replace("{text}", text)

    def messages(self, row: dict[str, Any]) -> list[dict[str, str]]:
        o = self.options
        shots = []
        for ex in o.examples:
            shots += [{"role": "user", "content": self._user(ex.text)},
                      {"role": "assistant",
                       "content": json.dumps(ex.output, ensure_ascii=False, separators=(",", ":"))}]
        raw = row.get(o.messages_column)
        if raw is not None:
            if not isinstance(raw, list) or not raw:
                raise RowError("invalid_input", f"'{o.messages_column}' must be a non-empty list of {{role, content}}")
            conv = []
            for i, m in enumerate(raw):
                if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                    raise RowError("invalid_input",
                                   f"'{o.messages_column}'[{i}] must be "
                                   f"{{role: one of {', '.join(ROLES)}, content: text}}")
                conv.append({"role": m["role"], "content": m["content"]})
            if conv[-1]["role"] != "user":
                raise RowError("invalid_input", f"'{o.messages_column}' must end with a user turn")
            if conv[0]["role"] == "system":
                return [{"role": "system", "content": conv[0]["content"] + "\n\n" + self._system()}] + shots + conv[1:]
            return [{"role": "system", "content": self._system()}] + shots + conv
        if row.get(o.prompt_column) is not None:
            user = require_text(row, o.prompt_column)
        elif row.get(o.text_column) is not None:
            user = self._user(require_text(row, o.text_column))
        else:
            raise RowError("invalid_input", f"the row has none of '{o.text_column}', '{o.prompt_column}', "
                                            f"'{o.messages_column}'; give it one of them")
        return [{"role": "system", "content": self._system()}] + shots + [{"role": "user", "content": user}]

    # ---- run

    async def run(self, row: dict[str, Any], engine: Engine) -> dict[str, Any]:
        o = self.options
        messages = self.messages(row)
        thinking = row.get(o.thinking_column)
        if thinking is None:
            thinking = self.thinking
        elif not isinstance(thinking, bool):
            raise RowError("invalid_input", f"'{o.thinking_column}' must be true, false or null")
        else:
            try:
                thinking = thinking_for(self.thinking_mode, thinking)
            except ValueError as e:
                raise RowError("invalid_input", f"'{o.thinking_column}': {e}") from None
        sampling = {"max_tokens": o.max_tokens, **QWEN3_SAMPLING[thinking]}
        sampling.update(self.sampling)
        sampling.update(row_sampling(row.get(o.sampling_column),
                                     max_tokens_ceiling=self.row_max_tokens or sampling["max_tokens"],
                                     head=self.name))
        sampling["structured_json"] = self.constraint
        if thinking and o.thinking_budget is not None:
            sampling["thinking_token_budget"] = o.thinking_budget
        column = next(c for c in (o.messages_column, o.prompt_column, o.text_column) if row.get(c) is not None)
        own = [m["content"] for m in row[column]] if column == o.messages_column else [row[column]]
        await self.refuse_oversized(engine, own, turns=len(messages), columns=[column])
        try:
            prompt = engine.render_chat(messages, enable_thinking=thinking)
        except Exception as e:  # a template is user code: any failure is this row's
            raise RowError("template_error", f"the chat template failed: {e}") from None
        if thinking and self.thinking_mode != ALWAYS:
            # Qwen3 opens its reasoning with <think>; in the prompt, the engine's reasoning
            # parser and thinking budget know the answer is not started yet (a template that
            # always thinks has opened it already).
            prompt = prompt + engine.tokenize("<think>\n")
        if len(prompt) >= engine.max_model_len:
            raise RowError("prompt_too_long", f"the prompt has {len(prompt)} tokens but model.max_model_len is "
                                              f"{engine.max_model_len}; shorten it or raise model.max_model_len")
        done = await engine.generate(prompt, sampling)
        if thinking:
            reasoning, answer = split_reasoning(done.text)
            if "</think>" not in done.text:
                raise RowError("output_parse_error",
                               f"the reasoning did not end within max_tokens {sampling['max_tokens']} "
                               f"(no answer; raise max_tokens or set thinking_budget): {_shown(done.text)}")
        else:
            reasoning, answer = None, done.text.strip()
        if done.finish_reason == "length":
            raise RowError("output_parse_error",
                           f"the answer was cut by max_tokens {sampling['max_tokens']} before the JSON ended "
                           f"(raise max_tokens or simplify the schema): {_shown(answer)}")
        try:
            value = json.loads(answer)
        except (json.JSONDecodeError, RecursionError) as e:
            raise RowError("output_parse_error",
                           f"the answer is not valid JSON ({getattr(e, 'msg', e)}): {_shown(answer)}") from None
        try:
            typed = coerce(value, self.schema, "")
        except SchemaError as e:
            raise RowError("output_parse_error",
                           f"the answer does not match the schema: {e}: {_shown(answer)}") from None
        return {**typed, "raw": answer, "reasoning": reasoning, "finish_reason": done.finish_reason,
                "prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens}

