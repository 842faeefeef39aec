"""Chat head: one generate call on the row's conversation (or system + prompt)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import Field, ValidationError

from pipeline.heads.base import Engine, Head, HeadOptions, RowError, require_text

ROLES = ("system", "user", "assistant")

# Qwen3's recommended sampling for each mode (the model card's "Best Practices").
QWEN3_SAMPLING = {
    True: {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0},
    False: {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0},
}


class ChatOptions(HeadOptions):
    enable_thinking: bool = Field(
        False, description="Qwen3 thinking mode; reasoning goes to the `reasoning` column."
    )
    system_prompt: str | None = Field(None, description="System prompt for rows without one.")
    messages_column: str = Field("messages", description="Column with a list of {role, content}.")
    prompt_column: str = Field("prompt", description="Column with a single user prompt.")
    system_column: str = Field("system", description="Column with a per-row system prompt.")
    sampling_column: str = Field(
        "sampling", description="Column with per-row sampling overrides (JSON object or struct)."
    )
    max_tokens: int = Field(256, ge=1, description="Default max_tokens when sampling sets none.")


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a thinking-mode output; unfinished thinking has no answer."""
    head, sep, answer = text.partition("</think>")
    if not sep:
        return head.replace("<think>", "", 1).strip(), ""
    return head.replace("<think>", "", 1).strip(), answer.strip()


MAX_SAMPLING_CHARS = 1 << 16  # a row's sampling JSON; the largest valid one is far smaller


def row_sampling(value: Any, *, max_tokens_ceiling: int | None = None) -> dict[str, Any]:
    """Per-row sampling overrides from a JSON string or a struct, checked against the bounds
    vLLM enforces (SamplingValues) and, for max_tokens, against the job's ceiling: any value
    the engine would refuse becomes this row's invalid_input, naming the key."""
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
        bad = "; ".join(f"sampling.{'.'.join(map(str, x['loc']))}: {x['msg'].removeprefix('Value error, ')}"
                        + (f" (got {_short(x['input'])})" if x["type"] != "value_error" else "")
                        for x in e.errors())
        raise RowError("invalid_input", f"sampling overrides are not valid: {bad}") from None
    if max_tokens_ceiling is not None and out.get("max_tokens", 0) > max_tokens_ceiling:
        raise RowError("invalid_input",
                       f"sampling.max_tokens {out['max_tokens']} is above this job's ceiling for rows, "
                       f"{max_tokens_ceiling}; ask for less, or raise sampling.row_max_tokens in the spec")
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class ChatHead(Head):
    name = "chat"
    Options = ChatOptions
    options: ChatOptions

    def input_columns(self) -> list[str]:
        o = self.options
        return [o.messages_column, o.prompt_column, o.system_column, o.sampling_column]

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
        # the job's sampling, made once: rows without overrides use it as it is
        self.job_sampling = {"max_tokens": self.options.max_tokens, **QWEN3_SAMPLING[self.options.enable_thinking],
                             **self.sampling}

    async def run(self, row: dict[str, Any], engine: Engine) -> dict[str, Any]:
        o = self.options
        messages = self.messages(row)
        sampling = self.job_sampling
        overrides = row_sampling(row.get(o.sampling_column),
                                 max_tokens_ceiling=self.row_max_tokens or sampling["max_tokens"])
        if overrides:
            sampling = {**sampling, **overrides}
        await self.refuse_oversized(engine, [m["content"] for m in messages], turns=len(messages),
                                    columns=[c for c in (o.messages_column, o.prompt_column, o.system_column)
                                             if row.get(c) is not None])
        try:
            prompt = engine.render_chat(messages, enable_thinking=o.enable_thinking)
        except Exception as e:  # a template is user code: any failure is this row's
            raise RowError("template_error", f"the chat template failed: {e}") from None
        if len(prompt) >= engine.max_model_len:
            raise RowError(
                "prompt_too_long",
                f"the prompt has {len(prompt)} tokens but model.max_model_len is "
                f"{engine.max_model_len}; shorten it or raise model.max_model_len",
            )
        done = await engine.generate(prompt, sampling)
        reasoning, response = (
            split_reasoning(done.text) if o.enable_thinking else (None, done.text)
        )
        return {
            "response": response,
            "reasoning": reasoning,
            "finish_reason": done.finish_reason,
            "prompt_tokens": done.prompt_tokens,
            "completion_tokens": done.completion_tokens,
        }
