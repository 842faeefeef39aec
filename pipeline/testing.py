"""Stand-in engines for fault injection and for measuring the data path without a model.

Never the only test of a feature: the integration tests run the real vLLM engine.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.errors import EngineDead
from pipeline.heads.base import Completion, RowError, Scores
from pipeline.heads.classify import END_OF_TURN


class EngineDeadError(EngineDead, RuntimeError):
    """The fake engine's dead engine, as vLLM's EngineDeadError is the real one's."""


class FakeEngine:
    """The one stand-in engine: answers instantly, tokenizes by whitespace (or with a real
    tokenizer), scripts answers and scores, records what it was asked, and injects faults.

    Tokens: without a tokenizer, a token is a whitespace-separated word and a rendered
    message is "<|im_start|> role content... <|im_end|>" (its words + 3 tokens); with
    tokenizer (a Hugging Face tokenizer, e.g. Qwen3's), the real tokenizer and chat template.
    answer: None answers "ok ok ..." of min(max_tokens, answer_tokens) tokens (all of
    max_tokens when answer_tokens is None), finish "length"; a string, a list (answered in
    turn, cycling) or a callable (prompt text, sampling) -> str answers that text plus the
    end-of-turn token, finish "stop" (finish overrides either).
    scores: log-probability of each continuation for score(), keyed by its text without the
    end-of-turn token (a dict, default_score when missing) or a callable (text) -> float.
    record: keep what the engine was asked in calls (sampling dicts of generate), prompts
    (their prompt lengths), rendered ((messages, enable_thinking) of render_chat), methods
    (score's method), tokenized (characters tokenized, by tokenize or tokenize_text, or
    rendered) and log (the method names in call order). Off in fake_engine_factory's engines
    (the data path and benchmarks).

    Faults (matched against the decoded prompt of generate):
    fail_on: prompts containing any of these strings fail with an engine_error.
    die_on: a prompt containing this string kills the whole actor process (os._exit), once
    per marker file, so the restarted actor succeeds.
    dead_on: likewise, but the engine reports itself dead (vLLM's EngineDeadError), once.
    poison_on: a prompt containing this string kills the actor process every time.
    hang_on: a prompt containing this string never gets an answer (a hung request).
    stall: with marker, the first engine built (no marker file yet) answers nothing at all
    (a hung engine); it creates the marker, so the engine of a restarted actor answers.
    delay: seconds each generate call waits first.
    """

    max_model_len = 4096
    settings = '{"engine": "fake"}'

    def __init__(self, args: dict[str, Any] | None = None, *, device: str = "cpu",
                 fail_on: tuple[str, ...] = (), die_on: str | None = None, marker: str | None = None,
                 delay: float = 0.0, dead_on: str | None = None, poison_on: str | None = None,
                 hang_on: str | None = None, tokenizer: Any = None, max_model_len: int | None = None,
                 answer: str | Sequence[str] | Callable[[str, dict], str] | None = None,
                 answer_tokens: int | None = 16, finish: str | None = None,
                 scores: dict[str, float] | Callable[[str], float] | None = None,
                 default_score: float = -5.0, record: bool = True, stall: bool = False):
        self.fail_on, self.die_on, self.marker, self.delay = fail_on, die_on, marker, delay
        self.dead_on, self.poison_on, self.hang_on = dead_on, poison_on, hang_on
        self.stalled = bool(stall and marker and not os.path.exists(marker))
        if self.stalled:
            open(marker, "w").close()
        self.tokenizer, self.answer, self.answer_tokens, self.finish = tokenizer, answer, answer_tokens, finish
        self.scores, self.default_score, self.record = scores or {}, default_score, record
        if max_model_len is not None:
            self.max_model_len = max_model_len
        self.vocab: dict[str, int] = {"ok": 0}
        self.words: list[str] = ["ok"]
        self.answered = 0
        self.calls: list[dict[str, Any]] = []
        self.prompts: list[int] = []
        self.rendered: list[tuple[list[dict], bool]] = []
        self.methods: list[str] = []
        self.log: list[str] = []
        self.tokenized = 0
        self._needs_text = bool(fail_on or die_on or dead_on or poison_on or hang_on or callable(answer))

    def _note(self, name: str, chars: int = 0) -> None:
        if self.record:
            self.log.append(name)
            self.tokenized += chars

    def render_chat(self, messages, *, enable_thinking: bool, tools=None) -> list[int]:
        if self.record:
            self.rendered.append((messages, enable_thinking))
        self._note("render_chat", sum(len(m["content"]) for m in messages))
        if self.tokenizer is not None:
            from pipeline.engine.prompt_tokens import render_chat

            return render_chat(self.tokenizer, messages, enable_thinking=enable_thinking, tools=tools)
        return self._encode(" ".join(f"<|im_start|> {m['role']} {m['content']} {END_OF_TURN}" for m in messages))

    def tokenize(self, text: str) -> list[int]:
        self._note("tokenize", len(text))
        return self._encode(text)

    def tokenize_text(self, text: str) -> list[int]:
        """Untrusted text as plain text: with a tokenizer, by its vocabulary alone (control
        strings stay text, as VllmEngine.tokenize_text); without, whitespace words as tokenize."""
        self._note("tokenize_text", len(text))
        if self.tokenizer is not None:
            from pipeline.engine.prompt_tokens import plain_text_tokens

            return plain_text_tokens(self.tokenizer, text)
        return self._encode(text)

    def _encode(self, text: str) -> list[int]:
        if self.tokenizer is not None:
            return self.tokenizer.encode(text, add_special_tokens=False)
        ids = []
        for w in text.split():
            if w not in self.vocab:
                self.vocab[w] = len(self.words)
                self.words.append(w)
            ids.append(self.vocab[w])
        return ids

    def decode(self, token_ids: list[int]) -> str:
        if self.tokenizer is not None:
            return self.tokenizer.decode(token_ids, skip_special_tokens=True)
        return " ".join(self.words[t] for t in token_ids)

    def _text(self, prompt_token_ids: list[int]) -> str:
        if self.tokenizer is not None:
            return self.tokenizer.decode(prompt_token_ids)
        return self.decode(prompt_token_ids)

    async def generate(self, prompt_token_ids: list[int], sampling: dict[str, Any]) -> Completion:
        if self.record:
            self.log.append("generate")
            self.calls.append(sampling)
            self.prompts.append(len(prompt_token_ids))
        if self.delay:
            await asyncio.sleep(self.delay)
        # the prompt's text and the fault checks only when a fault or an answer needs them (the
        # benchmarks' fake engine does no more per row than a Ray Data UDF would)
        text = self._text(prompt_token_ids) if self._needs_text else ""
        if self._needs_text or self.stalled:
            await self._faults(text)
        if self.answer is None:
            n = sampling.get("max_tokens", 16)
            n = min(n, self.answer_tokens) if self.answer_tokens else n
            out = self._filler(n)
            return Completion(self.decode(out), out, self.finish or "length", len(prompt_token_ids), len(out))
        if callable(self.answer):
            answer = self.answer(text, sampling)
        elif isinstance(self.answer, str):
            answer = self.answer
        else:
            answer = self.answer[self.answered % len(self.answer)]
        self.answered += 1
        out = self._encode(answer) + self._encode(END_OF_TURN)
        return Completion(answer, out, self.finish or "stop", len(prompt_token_ids), len(out))

    async def _faults(self, text: str) -> None:
        """The faults this prompt's text asks for, if any."""
        if self.die_on and self.die_on in text and self.marker and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        if self.poison_on and self.poison_on in text:
            os._exit(1)
        if self.dead_on and self.dead_on in text and self.marker and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            raise EngineDeadError("the fake engine core died")
        if self.stalled or (self.hang_on and self.hang_on in text):
            await asyncio.Event().wait()
        if any(f in text for f in self.fail_on):
            raise RowError("engine_error", "the fake engine was told to fail this prompt")

    def _filler(self, n: int) -> list[int]:
        return [0] * n if self.tokenizer is None else self._encode(" ok" * n)[:n]

    async def score(self, prompt: list[int], continuations: list[list[int]], *, method: str = "trie") -> Scores:
        if self.record:
            self.log.append("score")
            self.methods.append(method)
        texts = [self._text(c).removesuffix(END_OF_TURN) for c in continuations]
        if callable(self.scores):
            logprobs = [self.scores(t) for t in texts]
        else:
            logprobs = [self.scores.get(t, self.default_score) for t in texts]
        return Scores(logprobs, sum(len(prompt) + len(c) for c in continuations))

    embed_size = 8  # floats in an embed() vector (a model's hidden size)

    async def embed(self, prompt_token_ids: list[int]) -> list[float]:
        """A unit vector of embed_size floats drawn from the prompt's text (the same prompt
        always gets the same vector), as the pooling runner's normalised last-token state."""
        import hashlib

        if self.record:
            self.log.append("embed")
            self.prompts.append(len(prompt_token_ids))
        digest = hashlib.sha256(self._text(prompt_token_ids).encode()).digest()
        raw = [digest[i % len(digest)] - 127.5 + i / self.embed_size for i in range(self.embed_size)]
        norm = sum(x * x for x in raw) ** 0.5
        return [x / norm for x in raw]


class FakeQaEngine(FakeEngine):
    """FakeEngine with a question-answering head: qa_logits gives start and end logits from
    qa(tokens) -> (start, end), tokens the texts of the input's tokens (default: all zeros);
    token_offsets as VllmEngine's (with a tokenizer) or whitespace words with their spans.
    Records every qa_logits input in qa_inputs."""

    def __init__(self, *args, qa: Callable[[list[str]], tuple[list[float], list[float]]] | None = None, **kw):
        super().__init__(*args, **kw)
        self.qa, self.qa_inputs = qa, []
        self.pooling_task = "question_answering"

    def token_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        self._note("token_offsets", len(text))
        if self.tokenizer is not None:
            from pipeline.engine.prompt_tokens import plain_text_offsets

            return plain_text_offsets(self.tokenizer, text)
        import re

        words = list(re.finditer(r"\S+", text))
        return self._encode(" ".join(m.group() for m in words)), [m.span() for m in words]

    def _token_texts(self, ids: list[int]) -> list[str]:
        if self.tokenizer is not None:
            return [self.tokenizer.decode([i]) for i in ids]
        return [self.words[i] for i in ids]

    async def qa_logits(self, token_ids: list[int]) -> tuple[list[float], list[float]]:
        if self.record:
            self.log.append("qa_logits")
            self.qa_inputs.append(list(token_ids))
        if self.qa is None:
            return [0.0] * len(token_ids), [0.0] * len(token_ids)
        start, end = self.qa(self._token_texts(token_ids))
        return list(start), list(end)


def fake_engine_factory(**kwargs):
    """An engine_factory for run_job that builds FakeEngine with these options (recording
    off unless record=True: an actor answers many rows)."""
    kwargs.setdefault("record", False)

    def build(args, *, device):
        return FakeEngine(args, device=device, **kwargs)

    return build


def recording_engine_factory(log_path: str):
    """An engine_factory for run_job: the real vLLM engine, with every call's prompt length
    and max_tokens appended to log_path (JSON lines), so tests can check what was sent."""

    def build(args, *, device):
        import json

        from pipeline.engine.vllm_engine import VllmEngine

        engine = VllmEngine(args, device=device)
        generate = engine.generate

        async def recorded(prompt_token_ids, sampling):
            with open(log_path, "a") as f:
                f.write(json.dumps({"prompt": len(prompt_token_ids), "max_tokens": sampling.get("max_tokens"),
                                    "max_model_len": engine.max_model_len}) + "\n")
            return await generate(prompt_token_ids, sampling)

        engine.generate = recorded
        return engine

    return build


# Chat templates that behave as the real Qwen3 ones do in what batch jobs touch (a system turn,
# tool definitions, reasoning dropped from earlier assistant turns, the generation prompt), for
# tiny checkpoints laid out as each family ships (with_chat_template). QWEN3_HYBRID_TEMPLATE is
# Qwen3's (Qwen3-8B, Qwen3-30B-A3B, ...: enable_thinking switches), without the tool-response
# turns batch rows do not carry; INSTRUCT_2507_TEMPLATE never thinks (no <think> handling at
# all); THINKING_2507_TEMPLATE always thinks (its generation prompt opens <think>).
_QWEN3_TOOLS_HEADER = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0].role == 'system' %}\n"
    "        {{- messages[0].content + '\\n\\n' }}\n"
    "    {%- endif %}\n"
    "    {{- \"# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0].role == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
)
_QWEN3_LAST_QUERY = (
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n"
    "{%- for message in messages[::-1] %}\n"
    "    {%- set index = (messages|length - 1) - loop.index0 %}\n"
    "    {%- if ns.multi_step_tool and message.role == 'user' %}\n"
    "        {%- set ns.multi_step_tool = false %}\n"
    "        {%- set ns.last_query_index = index %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)
# the turns: earlier assistant turns keep only the text after </think>; one after the last
# user turn keeps its reasoning in a <think> block (as Qwen3's and Thinking-2507's do)
_QWEN3_TURNS = (
    "{%- for message in messages %}\n"
    "    {%- set content = message.content if message.content is string else '' %}\n"
    "    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == 'assistant' %}\n"
    "        {%- set reasoning_content = '' %}\n"
    "        {%- if '</think>' in content %}\n"
    "            {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1]"
    ".lstrip('\\n') %}\n"
    "            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}\n"
    "        {%- endif %}\n"
    "        {%- if loop.index0 > ns.last_query_index and reasoning_content %}\n"
    "            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n'"
    " + content.lstrip('\\n') }}\n"
    "        {%- else %}\n"
    "            {{- '<|im_start|>assistant\\n' + content }}\n"
    "        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)
QWEN3_HYBRID_TEMPLATE = _QWEN3_TOOLS_HEADER + _QWEN3_LAST_QUERY + _QWEN3_TURNS + (
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
)
THINKING_2507_TEMPLATE = _QWEN3_TOOLS_HEADER + _QWEN3_LAST_QUERY + _QWEN3_TURNS + (
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n<think>\\n' }}\n"
    "{%- endif %}\n"
)
INSTRUCT_2507_TEMPLATE = _QWEN3_TOOLS_HEADER + (
    "{%- for message in messages %}\n"
    "    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) "
    "or message.role == 'assistant' %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)


def with_chat_template(model_dir, out_dir, template: str, *, in_tokenizer_config: bool = False):
    """A copy of a tiny checkpoint (its weights linked, not copied) whose tokenizer ships this
    chat template: as chat_template.jinja (how transformers saves it), or in
    tokenizer_config.json's chat_template (how the Qwen3 checkpoints on the hub ship it)."""
    import json
    import shutil
    from pathlib import Path

    src, out = Path(model_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name == "chat_template.jinja":
            continue
        if f.suffix == ".safetensors":
            (out / f.name).symlink_to(f.resolve())
        else:
            shutil.copy(f, out / f.name)
    if in_tokenizer_config:
        config = json.loads((out / "tokenizer_config.json").read_text())
        config["chat_template"] = template
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    else:
        (out / "chat_template.jinja").write_text(template)
    return out


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_tiny_lora(model_dir, out_dir, *, rank: int = 8, alpha: int = 16, seed: int = 0, std: float = 0.2):
    """A random LoRA adapter for a tiny checkpoint, in PEFT's layout (adapter_config.json and
    adapter_model.safetensors, tensors base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight
    [rank, in] and ...lora_B.weight [out, rank]) over every attention and MLP projection. PEFT
    starts lora_B at zero (no change); here both are random (std), so the adapter changes the output."""
    import json
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    config = json.loads((Path(model_dir) / "config.json").read_text())
    hidden, inter, heads = config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]
    head_dim, kv = config.get("head_dim") or hidden // heads, config["num_key_value_heads"]
    shapes = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv * head_dim),
              "v_proj": (hidden, kv * head_dim), "o_proj": (heads * head_dim, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for name in LORA_TARGETS:
            fan_in, fan_out = shapes[name]
            block = "self_attn" if name in LORA_TARGETS[:4] else "mlp"
            key = f"base_model.model.model.layers.{layer}.{block}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) * std
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * std
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(model_dir),
        "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": list(LORA_TARGETS), "modules_to_save": None, "use_rslora": False, "use_dora": False,
    }, indent=2))
    return out


def merge_lora(model, adapter_dir) -> None:
    """Add a PEFT LoRA adapter's update (alpha / r * B @ A) to a transformers model's weights in
    place: the oracle of what the engine computes with the adapter."""
    import json
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, a in tensors.items():
            if key.endswith(".lora_A.weight"):
                b = tensors[key.replace("lora_A", "lora_B")]
                name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
                params[name] += scale * (b.float() @ a.float()).to(params[name].dtype)
