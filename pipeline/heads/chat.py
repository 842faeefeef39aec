"""Chat head: one generate call on the row's conversation (or system + prompt).

What the checkpoint's chat template does decides how an output splits: a hybrid Qwen3
(Qwen3-8B, Qwen3-30B-A3B, ...) thinks when asked (enable_thinking), an Instruct-2507 never
thinks, a Thinking-2507 always does (its generation prompt opens <think>, so its outputs hold
only </think>). The head learns which by rendering the template (thinking_mode), at planning
from the checkpoint's files and otherwise from the engine's tokenizer, never by the name.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from pydantic import Field, ValidationError, field_validator

from pipeline.heads.base import Completion, Engine, Head, HeadOptions, RowError, require_text
from pipeline.sampling import samples_problem

ROLES = ("system", "user", "assistant")

# Qwen3's recommended sampling for each mode (the model card's "Best Practices").
QWEN3_SAMPLING = {
    True: {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0},
    False: {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0},
}


class ChatOptions(HeadOptions):
    enable_thinking: bool | None = Field(
        None, description="Qwen3 thinking mode; reasoning goes to the `reasoning` column. Unset: the checkpoint's "
        "own (off on hybrid Qwen3 models, on for a Thinking-2507, off for an Instruct-2507, as their chat templates "
        "say). Asking a checkpoint for a mode its template lacks (true on an Instruct-2507, false on a "
        "Thinking-2507) is refused at validate."
    )
    system_prompt: str | None = Field(None, description="System prompt for rows without one.")
    messages_column: str = Field("messages", description="Column with a list of {role, content}.")
    prompt_column: str = Field("prompt", description="Column with a single user prompt.")
    system_column: str = Field("system", description="Column with a per-row system prompt.")
    sampling_column: str = Field(
        "sampling", description="Column with per-row sampling overrides (JSON object or struct)."
    )
    max_tokens: int = Field(256, ge=1, description="Default max_tokens when sampling sets none.")
    tools: list[dict[str, Any]] | None = Field(
        None, description="Function definitions offered to the model on every row, rendered through the chat "
        "template: OpenAI style (`{type: function, function: {name, description, parameters}}`) or the function "
        "object alone. The model's `<tool_call>` blocks come back in the `tool_calls` column.")
    tools_column: str = Field(
        "tools", description="Column with a row's own function definitions (a JSON list, or a list of structs), "
        "used instead of `tools` for that row.")

    @field_validator("tools")
    @classmethod
    def _check_tools(cls, value: Any) -> Any:
        if value is None:
            return None
        tools = normalize_tools(value)
        found = [t for t in _qwen3_control_texts() if t in json.dumps(tools, ensure_ascii=False)]
        if found:
            raise ValueError(f"the tool definitions hold {found[0]!r}, a control token of Qwen3's vocabulary; "
                             f"the rendered prompt would carry it as that token; remove it")
        return tools


def _qwen3_control_texts() -> list[str]:
    from pipeline.ops.tiny_model import QWEN3_ADDED_TOKENS  # a constant; no torch

    return [t for t, _ in QWEN3_ADDED_TOKENS]


def _control_texts(engine: Any) -> tuple[str, ...] | list[str]:
    """The texts of the engine's tokenizer's added tokens, else Qwen3's."""
    tokenizer = getattr(engine, "tokenizer", None)
    if tokenizer is None:
        return _qwen3_control_texts()
    from pipeline.engine.prompt_tokens import _special_texts

    return _special_texts(tokenizer)


def normalize_tools(value: Any) -> list[dict[str, Any]]:
    """Function definitions in OpenAI's form ({type: function, function: {name, description?,
    parameters?}}), from that form, the function object alone or JSON text of either; ValueError
    saying what is wrong."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"the tools are not valid JSON ({getattr(e, 'msg', 'nested too deep')})") from None
    if not isinstance(value, list) or not value:
        raise ValueError("tools must be a non-empty list of function definitions")
    out = []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise ValueError(f"tools[{i}] must be an object such as {{type: function, function: {{name: ...}}}}")
        fn = tool.get("function") if "function" in tool else tool
        if tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise ValueError(f"tools[{i}] must be a function definition ({{type: function, function: {{...}}}})")
        fn = {k: v for k, v in fn.items() if v is not None}  # a struct's absent fields
        if not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise ValueError(f"tools[{i}] has no function name")
        params = fn.get("parameters")
        if isinstance(params, str):  # a struct column holding the JSON schema as text
            try:
                fn["parameters"] = params = json.loads(params)
            except json.JSONDecodeError:
                raise ValueError(f"tools[{i}] ({fn['name']}): parameters is not valid JSON") from None
        if params is not None and not isinstance(params, dict):
            raise ValueError(f"tools[{i}] ({fn['name']}): parameters must be a JSON schema object")
        out.append({"type": "function", "function": fn})
    return out


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a thinking-mode output; unfinished thinking has no answer."""
    head, sep, answer = text.partition("</think>")
    if not sep:
        return head.replace("<think>", "", 1).strip(), ""
    return head.replace("<think>", "", 1).strip(), answer.strip()


# How a checkpoint's chat template handles thinking (thinking_mode).
NEVER, ALWAYS, SWITCH = "never", "always", "switch"
_PROBE = [{"role": "user", "content": "Hi"}]
_PROBE_TOOL = "qwen_batch_probe_tool"


def render_template(template: str, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    """The template's text for messages, rendered as transformers' apply_chat_template renders
    it (a sandbox, trimmed blocks, tojson without HTML escaping, raise_exception), without
    importing transformers."""
    return _compile(template).render(messages=messages, **kwargs)


def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        from datetime import datetime

        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


def thinking_mode(template: str | None) -> str | None:
    """NEVER (the template has no thinking: enable_thinking changes nothing and the generation
    prompt opens no <think>, as Instruct-2507's), ALWAYS (the generation prompt opens <think>
    whatever enable_thinking says, as Thinking-2507's), SWITCH (enable_thinking changes the
    prompt, as the hybrid Qwen3's), or None when there is no template or it cannot be rendered."""
    if not template:
        return None
    try:
        on, off = (render_template(template, _PROBE, add_generation_prompt=True, enable_thinking=flag)
                   for flag in (True, False))
    except Exception:
        return None
    if on.rstrip().endswith("<think>") and off.rstrip().endswith("<think>"):
        return ALWAYS
    return SWITCH if on != off else NEVER


def thinking_for(mode: str | None, asked: bool | None) -> bool:
    """Whether a head thinks under a template's thinking_mode when enable_thinking is asked
    (None: unset): always under ALWAYS, never under NEVER, as asked otherwise; ValueError,
    naming enable_thinking, when it asks for a mode the checkpoint lacks."""
    if mode == NEVER and asked:
        raise ValueError("enable_thinking is true, but the checkpoint's chat template has no thinking mode "
                         "(it never thinks, as Qwen3's Instruct-2507 models); remove enable_thinking, or run "
                         "a checkpoint that thinks (a hybrid Qwen3 or a Thinking-2507)")
    if mode == ALWAYS and asked is False:
        raise ValueError("enable_thinking is false, but the checkpoint's chat template always thinks (its "
                         "generation prompt opens <think>, as Qwen3's Thinking-2507 models); remove "
                         "enable_thinking, or run a checkpoint that can answer without thinking (a hybrid "
                         "Qwen3 or an Instruct-2507)")
    return {NEVER: False, ALWAYS: True}.get(mode, bool(asked))


def model_thinking_mode(config: Any) -> str | None:
    """thinking_mode of the checkpoint's chat template, when the config names where the
    checkpoint is (_name_or_path: transformers' configs, and ours when the reader records it)."""
    source = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    return thinking_mode(checkpoint_chat_template(source)) if isinstance(source, str) and source else None


def renders_tools(template: str | None) -> bool | None:
    """Whether the template puts the tools it is given into the prompt (None: unknown)."""
    if not template:
        return None
    tool = {"type": "function", "function": {"name": _PROBE_TOOL, "parameters": {"type": "object", "properties": {}}}}
    try:
        return _PROBE_TOOL in render_template(template, _PROBE, tools=[tool], add_generation_prompt=True,
                                              enable_thinking=False)
    except Exception:
        return False


def drops_reasoning(template: str | None) -> bool:
    """Whether the template drops the reasoning of an assistant turn before the last user turn
    (Qwen3's and Thinking-2507's keep only the text after </think>)."""
    if not template:
        return False
    turns = [{"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "<think>\nqwen_batch_r\n</think>\n\nA"},
             {"role": "user", "content": "Hi"}]
    try:
        text = render_template(template, turns, add_generation_prompt=True, enable_thinking=True)
    except Exception:
        return False
    return "qwen_batch_r" not in text and "A<|im_end|>" in text


def without_reasoning(content: str) -> str:
    """An earlier assistant turn as Qwen3's template renders it: the text after </think>."""
    return content.split("</think>")[-1].lstrip("\n") if "</think>" in content else content


def template_text(value: Any) -> str | None:
    """The default chat template of a tokenizer_config.json's chat_template (text, or a list or
    dict of named templates)."""
    if isinstance(value, list):
        value = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
    if isinstance(value, dict):
        value = value.get("default")
    return value if isinstance(value, str) and value else None


def checkpoint_chat_template(source: str) -> str | None:
    """The chat template a checkpoint ships (chat_template.jinja, else tokenizer_config.json's
    chat_template), from a local directory or the hub (its cache first); None if none is found."""
    def read(name: str) -> str | None:
        path = os.path.join(source, name)
        if not os.path.isdir(source):
            try:
                from huggingface_hub import hf_hub_download, try_to_load_from_cache

                found = try_to_load_from_cache(source, name)
                path = found if isinstance(found, str) else hf_hub_download(source, name)
            except Exception:
                return None
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except OSError:
            return None

    text = read("chat_template.jinja")
    if text:
        return text
    config = read("tokenizer_config.json")
    try:
        return template_text(json.loads(config).get("chat_template")) if config else None
    except (json.JSONDecodeError, AttributeError):
        return None


def engine_chat_template(engine: Any) -> str | None:
    """The chat template of the engine's tokenizer, when the handle has one."""
    return template_text(getattr(getattr(engine, "tokenizer", None), "chat_template", None))


TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, str]]]:
    """(the text outside the <tool_call> blocks, stripped; each block's call as {name,
    arguments: JSON text}) of an answer in Qwen3's tool-call format:
    <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>. ValueError saying what is
    malformed: a block that is not a JSON object with a name, or one that is never closed."""
    calls, rest, pos = [], [], 0
    for m in TOOL_CALL.finditer(text):
        rest.append(text[pos:m.start()])
        pos = m.end()
        calls.append(_tool_call(m.group(1), len(calls) + 1))
    rest.append(text[pos:])
    outside = "".join(rest)
    if "<tool_call>" in outside:
        raise ValueError(f"tool call {len(calls) + 1} opens <tool_call> and never closes it")
    if "</tool_call>" in outside:
        raise ValueError("a </tool_call> closes no <tool_call>")
    return outside.strip(), calls


def _tool_call(body: str, n: int) -> dict[str, str]:
    try:
        call = json.loads(body)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"tool call {n} is not valid JSON ({getattr(e, 'msg', 'nested too deep')})") from None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        raise ValueError(f"tool call {n} is not an object with a name")
    args = call.get("arguments", {})
    if isinstance(args, str):  # arguments given as JSON text
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            raise ValueError(f"tool call {n} ({call['name']}): arguments is not valid JSON") from None
    if not isinstance(args, dict):
        raise ValueError(f"tool call {n} ({call['name']}): arguments is not a JSON object")
    return {"name": call["name"], "arguments": json.dumps(args, ensure_ascii=False)}


MAX_SAMPLING_CHARS = 1 << 16  # a row's sampling JSON; the largest valid one is far smaller


def row_sampling(value: Any, *, max_tokens_ceiling: int | None = None, head: str = "chat",
                 many: bool = False) -> dict[str, Any]:
    """Per-row sampling overrides from a JSON string or a struct, checked against the bounds
    vLLM enforces (SamplingValues) and, for max_tokens, against the job's ceiling: any value
    the engine would refuse becomes this row's invalid_input, naming the key. n > 1 only
    where the head keeps many samples a row (many)."""
    if value is None:
        return {}
    from pipeline.sampling import SamplingValues  # plain pydantic, no engine

    if isinstance(value, str):
        if len(value) > MAX_SAMPLING_CHARS:
            raise RowError("invalid_input", f"sampling has {len(value):,} characters; overrides are "
                                            f"at most {MAX_SAMPLING_CHARS:,}")
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError) as e:
            raise RowError("invalid_input",
                           f"sampling is not valid JSON ({getattr(e, 'msg', 'nested too deep')})") from None
    if not isinstance(value, dict):
        raise RowError("invalid_input", "sampling must be a JSON object such as {\"max_tokens\": 32}")
    try:
        out = SamplingValues.model_validate(value).model_dump(exclude_none=True)
    except ValidationError as e:
        bad = "; ".join(f"{'.'.join(map(str, ('sampling', *x['loc'])))}: {x['msg'].removeprefix('Value error, ')}"
                        + (f" (got {_short(x['input'])})" if x["type"] != "value_error" else "")
                        for x in e.errors())
        raise RowError("invalid_input", f"sampling overrides are not valid: {bad}") from None
    if max_tokens_ceiling is not None and out.get("max_tokens", 0) > max_tokens_ceiling:
        raise RowError("invalid_input",
                       f"sampling.max_tokens {out['max_tokens']} is above this job's ceiling for rows, "
                       f"{max_tokens_ceiling}; ask for less, or raise sampling.row_max_tokens in the spec")
    if out.get("n", 1) > 1 and not many:
        raise RowError("invalid_input", f"sampling.n is {out['n']}, but head '{head}' gives one answer a row; "
                                        f"leave n out (n > 1 is for the chat head)")
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class ChatHead(Head):
    name = "chat"
    Options = ChatOptions
    many_samples = True
    options: ChatOptions
    mode: str | None = None  # the checkpoint's thinking_mode, once learned
    tools_render: bool | None = None  # whether its template renders tools, once learned
    strips_reasoning = False  # whether its template drops earlier assistant turns' reasoning

    def input_columns(self) -> list[str]:
        o = self.options
        return [o.messages_column, o.prompt_column, o.system_column, o.sampling_column, o.tools_column]

    def required_any(self) -> list[str]:
        return [self.options.messages_column, self.options.prompt_column]

    def messages(self, row: dict[str, Any]) -> list[dict[str, str]]:
        o = self.options
        raw = row.get(o.messages_column)
        if raw is not None:
            if not isinstance(raw, list) or not raw:
                raise RowError("invalid_input", f"'{o.messages_column}' must be a non-empty list of {{role, content}}")
            out = []
            for i, m in enumerate(raw):
                if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                    raise RowError(
                        "invalid_input",
                        f"'{o.messages_column}'[{i}] must be {{role: one of {', '.join(ROLES)}, content: text}}",
                    )
                out.append({"role": m["role"], "content": m["content"]})
            if out[-1]["role"] == "assistant":
                raise RowError("invalid_input",
                               f"'{o.messages_column}' ends with an assistant turn; end with a user turn")
            return out
        if row.get(o.prompt_column) is None:
            raise RowError("invalid_input", f"the row has neither '{o.messages_column}' nor "
                                            f"'{o.prompt_column}'; give it one of them")
        prompt = require_text(row, o.prompt_column)
        system = row.get(o.system_column) or o.system_prompt
        if system is not None and not isinstance(system, str):
            raise RowError("invalid_input", f"'{o.system_column}' must be text")
        return ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._set_thinking(bool(self.options.enable_thinking))

    def _set_thinking(self, thinking: bool) -> None:
        self.thinking = thinking
        # the job's sampling, made once: rows without overrides use it as it is
        self.job_sampling = {"max_tokens": self.options.max_tokens, **QWEN3_SAMPLING[thinking], **self.sampling}

    def use_model(self, config: Any) -> None:
        """Learn the checkpoint's thinking mode from its chat template, when the config names
        where the checkpoint is (_name_or_path: transformers' configs, and ours when the
        checkpoint's reader records it); ValueError for a mode or tools it lacks."""
        source = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
        if isinstance(source, str) and source:
            self.use_template(checkpoint_chat_template(source))

    def use_template(self, template: str | None) -> None:
        """Learn from the checkpoint's chat template whether it never, always or optionally
        thinks and whether it renders tools; ValueError, naming the option, for what it lacks."""
        mode = thinking_mode(template)
        if mode is None:
            return
        thinking = thinking_for(mode, self.options.enable_thinking)
        tools = renders_tools(template)
        if self.options.tools and tools is False:
            raise ValueError("tools are given, but the checkpoint's chat template does not render tool "
                             "definitions, so the model would never see them; use a checkpoint whose template "
                             "handles tools (Qwen3's do)")
        self.mode, self.tools_render, self.strips_reasoning = mode, tools, drops_reasoning(template)
        self._set_thinking(thinking)

    def _learn_from(self, engine: Engine) -> None:
        """The engine's tokenizer's template, when planning could not read the checkpoint's."""
        if self.mode is None and not getattr(self, "_asked_engine", False):
            self._asked_engine = True
            try:
                self.use_template(engine_chat_template(engine))
            except ValueError as e:
                self._refusal = f"task.options for head 'chat': {e}"

    def row_tools(self, row: dict[str, Any], engine: Engine) -> list[dict[str, Any]] | None:
        """The row's tools (its column, else task.options.tools), or None."""
        o = self.options
        raw = row.get(o.tools_column)
        if raw is None:
            return o.tools
        try:
            tools = normalize_tools(raw)
        except ValueError as e:
            raise RowError("invalid_input", f"'{o.tools_column}': {e}") from None
        found = [t for t in _control_texts(engine) if t in json.dumps(tools, ensure_ascii=False)]
        if found:
            raise RowError("invalid_input", f"'{o.tools_column}' holds {found[0]!r}, a control token of the "
                                            f"model's vocabulary; the prompt would carry it as that token")
        if self.tools_render is False:
            raise RowError("template_error", "the row gives tools, but the checkpoint's chat template does not "
                                             "render tool definitions, so the model would never see them")
        return tools

    def render(self, messages: list[dict[str, str]], tools: list[dict[str, Any]] | None, engine: Engine) -> list[int]:
        if not tools:  # a handle that renders no tools still serves every row without them
            return engine.render_chat(messages, enable_thinking=self.thinking)
        return engine.render_chat(messages, enable_thinking=self.thinking, tools=tools)

    async def run(self, row: dict[str, Any], engine: Engine) -> dict[str, Any]:
        o = self.options
        self._learn_from(engine)
        if getattr(self, "_refusal", None):
            raise RowError("template_error", self._refusal)
        messages = self.messages(row)
        if self.strips_reasoning:  # as the template would: the <think> block, a control string, is not kept
            messages = [{**m, "content": without_reasoning(m["content"])} if m["role"] == "assistant" else m
                        for m in messages]  # as text (every assistant turn precedes the last user turn)
        tools = self.row_tools(row, engine)
        sampling = self.job_sampling
        overrides = row_sampling(row.get(o.sampling_column),
                                 max_tokens_ceiling=self.row_max_tokens or sampling["max_tokens"], many=True)
        if overrides:
            sampling = {**sampling, **overrides}
            if problem := samples_problem(sampling):
                raise RowError("invalid_input", f"sampling: {problem}")
        await self.refuse_oversized(engine, [m["content"] for m in messages], turns=len(messages),
                                    columns=[c for c in (o.messages_column, o.prompt_column, o.system_column)
                                             if row.get(c) is not None])
        try:
            prompt = self.render(messages, tools, engine)
        except RowError:
            raise
        except Exception as e:  # a template is user code: any failure is this row's
            raise RowError("template_error", f"the chat template failed: {e}") from None
        if len(prompt) >= engine.max_model_len:
            raise RowError(
                "prompt_too_long",
                f"the prompt has {len(prompt)} tokens but model.max_model_len is "
                f"{engine.max_model_len}; shorten it or raise model.max_model_len",
            )
        done = await engine.generate(prompt, sampling)
        many = done.samples or [done]
        answers = [self.answer(d, tools, i, len(many)) for i, d in enumerate(many)]
        out = {**answers[0], "prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens}
        out.pop("index")
        if len(many) > 1:
            out["samples"] = answers
        return out

    def answer(self, done: Completion, tools: list[dict[str, Any]] | None, index: int, n: int) -> dict[str, Any]:
        """One sample's columns: response, reasoning, tool_calls when tools were offered."""
        # thinking on (asked, or a template that always thinks): the text before </think> is
        # reasoning, all of it when max_tokens cut the thinking short
        reasoning, response = split_reasoning(done.text) if self.thinking else (None, done.text)
        out = {"index": index, "response": response, "reasoning": reasoning, "finish_reason": done.finish_reason,
               "completion_tokens": done.completion_tokens}
        if tools:
            try:
                out["response"], out["tool_calls"] = parse_tool_calls(response)
            except ValueError as e:
                which = f"sample {index} (of {n})'s" if n > 1 else "the model's"
                raise RowError("output_parse_error", f"{which} tool call is malformed: {e}; "
                                                     f"its output was: {done.text}") from None
        return out
