"""The vLLM engine behind the narrow handle heads use; knows no head by name."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import unicodedata
import uuid
from dataclasses import dataclass
from typing import Any

from pipeline.heads.base import Completion, RowError, Scores
from pipeline.quantize import bitsandbytes_args
from pipeline.spec import ModelSpec

# On the CPU build vLLM's KV cache takes this share of host memory unless engine_kwargs say
# otherwise; vLLM's GPU default (0.92) does not fit next to the OS and Ray.
CPU_KV_CACHE_SHARE = 0.25
# Environment variables that mark every process of a run (the driver's Ray services and
# workers, vLLM's processes), so leftovers can be found: the run, and the output it writes.
RUN_MARK = "QWEN_BATCH_RUN_ID"
OUTPUT_MARK = "QWEN_BATCH_OUTPUT"
# Label scoring: "trie" (one engine step per node of the labels' token trie, reading the
# prefix cache) or "per_label" (prompt log-probabilities of prompt + label, one full prefill
# per label); see VllmEngine.score.
SCORING_METHODS = ("trie", "per_label")
MAX_LOGPROB_IDS = 128  # vLLM's cap on SamplingParams.logprob_token_ids per request
STRUCTURED_OUTPUTS = {"backend": "xgrammar", "disable_any_whitespace": True}


@dataclass
class EngineScores(Scores):
    """Scores with the prompt tokens the engine computed (read minus prefix-cache hits)."""

    computed_tokens: int | None = None


# What a head may ask of the engine (Head.engine_task) -> vLLM arguments. "embed": the pooling
# runner over a *ForCausalLM or *Model checkpoint (Qwen3-Embedding ships Qwen3Model weights
# under a Qwen3ForCausalLM config), pooling the last token's final hidden state, L2-normalised
# (use_activation: vLLM's embedding activation is the normalisation).
ENGINE_TASKS = {
    "embed": {"runner": "pooling", "convert": "embed",
              "pooler_config": {"seq_pooling_type": "LAST", "use_activation": True}},
}


def engine_args(model: ModelSpec, *, device: str, task: str | None = None) -> dict[str, Any]:
    """vLLM engine arguments for a model section (engine_kwargs win); task: what the job's
    head needs of the engine (Head.engine_task), None for the checkpoint as it is."""
    args: dict[str, Any] = {
        "model": model.source,
        "tensor_parallel_size": model.tensor_parallel_size,
        "pipeline_parallel_size": model.pipeline_parallel_size,
        "dtype": model.dtype,
        "trust_remote_code": model.trust_remote_code,
    }
    if model.max_model_len:
        args["max_model_len"] = model.max_model_len
    if model.long_context:
        args.update(long_context_args(model))
    if task is not None:
        args.update(engine_task_args(model, task))
    elif question_answering(model):
        return qa_engine_args(model, args, device=device)
    elif pooling_task(model) is not None:
        args["runner"] = "pooling"
    else:
        # Structured outputs (the sampling key structured_json): xgrammar, compact JSON (no
        # free whitespace, which random or weak models can emit forever); Qwen3's reasoning
        # parser so that in thinking mode the constraint starts after </think> (and
        # thinking_token_budget works). Neither changes unconstrained requests.
        args["reasoning_parser"] = "qwen3"
        args["structured_outputs_config"] = dict(STRUCTURED_OUTPUTS)
    check_quantization(model, device)
    if model.quantization:
        args["quantization"] = model.quantization
        args.update(bitsandbytes_args(model.quantization))
    if device == "cpu":
        args["gpu_memory_utilization"] = CPU_KV_CACHE_SHARE
    if model.tensor_parallel_size * model.pipeline_parallel_size > 1:
        # Matches pipeline.placement: one node per replica, ranks as this actor's children;
        # GPU pipeline stages may span nodes, one Ray worker per GPU bundle.
        cross_node = device == "cuda" and model.pipeline_parallel_size > 1
        args["distributed_executor_backend"] = "ray" if cross_node else "mp"
    args.update(model.engine_kwargs)
    return args


def check_quantization(model: ModelSpec, device: str) -> None:
    """SpecError unless the device (cpu, cuda; auto at plan time: either) runs the job's
    quantization: model.quantization, else the one the checkpoint's config declares."""
    from pipeline.quantize import checkpoint_quantization, quantization_problem
    from pipeline.spec import SpecError

    method, where = model.quantization, "model.quantization"
    if not method:
        method = checkpoint_quantization(hf_config(model.source, model.trust_remote_code))
        where = f"model.source {model.source} is quantized: its quant_method"
    problem = quantization_problem(method, device, dtype=model.dtype, where=where)
    if problem:
        raise SpecError(problem)


MAX_YARN_FACTOR = 4.0
POOLING_TASKS = {"ForSequenceClassification": "classify", "ForTokenClassification": "token_classify"}


@functools.cache  # the driver asks for it several times per run (checks, pooling, YaRN)
def hf_config(source: str, trust_remote_code: bool = False):
    """The checkpoint's config. A local config.json is read as JSON (importing transformers
    costs seconds on the driver); hub ids go through AutoConfig."""
    from types import SimpleNamespace

    local = os.path.join(source, "config.json")
    if os.path.isfile(local):
        with open(local) as f:
            data = json.load(f)
        data.setdefault("architectures", [])
        data.setdefault("id2label", {})
        return SimpleNamespace(**data)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)


def pooling_task(model: ModelSpec) -> str | None:
    """vLLM's pooling task for a classification checkpoint, None for a generative model."""
    archs = getattr(hf_config(model.source, model.trust_remote_code), "architectures", None) or []
    for suffix, task in POOLING_TASKS.items():
        if any(a.endswith(suffix) for a in archs):
            return task
    return None


QA_RUNNER = "transformers-qa"  # engine_args' runner for *ForQuestionAnswering: not a vLLM runner
QA_BATCH_TOKENS = 8192  # padded tokens per forward pass of the question-answering model


def question_answering(model: ModelSpec) -> bool:
    """A *ForQuestionAnswering checkpoint (start/end logits per token)? vLLM has no runner for
    it: VllmEngine runs it in transformers inside the actor (README, the qa head)."""
    archs = getattr(hf_config(model.source, model.trust_remote_code), "architectures", None) or []
    return any(a.endswith("ForQuestionAnswering") for a in archs)


def qa_engine_args(model: ModelSpec, args: dict[str, Any], *, device: str) -> dict[str, Any]:
    """Engine arguments of a *ForQuestionAnswering checkpoint (transformers in the actor), or a
    SpecError for model keys only vLLM could honour."""
    from pipeline.spec import SpecError

    if model.tensor_parallel_size * model.pipeline_parallel_size > 1:
        raise SpecError(f"model.source {model.source} is a question-answering checkpoint, run by transformers "
                        f"on one device per replica; drop model.tensor_parallel_size/pipeline_parallel_size")
    if model.quantization:
        raise SpecError(f"model.quantization: vLLM's quantization does not apply to question-answering "
                        f"checkpoints (run by transformers); drop it")
    return {**args, "runner": QA_RUNNER}


def engine_task_args(model: ModelSpec, task: str) -> dict[str, Any]:
    """The vLLM arguments of an engine task (ENGINE_TASKS), or a SpecError when the
    checkpoint cannot serve it (a classification checkpoint has its own head)."""
    from pipeline.spec import SpecError

    if task not in ENGINE_TASKS:
        raise ValueError(f"unknown engine task {task!r}; known: {', '.join(ENGINE_TASKS)}")
    archs = getattr(hf_config(model.source, model.trust_remote_code), "architectures", None) or []
    if not any(a.endswith(("ForCausalLM", "Model")) for a in archs):
        raise SpecError(f"model.source {model.source} is a {', '.join(archs) or 'checkpoint without architectures'}; "
                        f"task.head needs vLLM's pooling runner ({task}) over a language model's hidden states "
                        f"(a *ForCausalLM or *Model checkpoint, as Qwen3-Embedding ships)")
    return json.loads(json.dumps(ENGINE_TASKS[task]))  # a copy: engine args stay plain data


def long_context_args(model: ModelSpec) -> dict[str, Any]:
    """max_model_len and, past the native context, YaRN rope scaling via vLLM's hf_overrides.

    vLLM expects a YaRN model's max_position_embeddings to be already scaled (as
    transformers does), so both the rope parameters and that length are overridden.
    """
    from pipeline.spec import SpecError

    config = hf_config(model.source, model.trust_remote_code)
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in rope and getattr(config, "rope_theta", None):
        rope["rope_theta"] = config.rope_theta  # configs written before transformers 5
    native = int(rope.get("original_max_position_embeddings") or config.max_position_embeddings)
    wanted = model.long_context
    if model.max_model_len and model.max_model_len > wanted:
        raise SpecError(f"model.max_model_len {model.max_model_len} is above model.long_context "
                        f"{wanted}; drop one of them")
    out: dict[str, Any] = {"max_model_len": model.max_model_len or wanted}
    if wanted <= native:
        return out
    factor = wanted / native
    if factor > MAX_YARN_FACTOR:
        raise SpecError(f"model.long_context {wanted} needs YaRN factor {factor:.2f}; Qwen3 supports "
                        f"at most {MAX_YARN_FACTOR} ({int(native * MAX_YARN_FACTOR):,} tokens)")
    rope.update(rope_type="yarn", factor=factor, original_max_position_embeddings=native)
    out["hf_overrides"] = {"rope_parameters": rope, "max_position_embeddings": int(native * factor)}
    return out


def throughput_settings(args: dict[str, Any], vllm_config: Any | None = None) -> str:
    """JSON of the engine settings that change throughput, for metrics rows."""
    keys = ("max_num_seqs", "max_num_batched_tokens", "enable_prefix_caching", "dtype",
            "enforce_eager", "gpu_memory_utilization", "quantization")
    out = {k: args.get(k) for k in keys if k in args}
    if vllm_config is not None:
        sched, cache = vllm_config.scheduler_config, vllm_config.cache_config
        out.update(max_num_seqs=sched.max_num_seqs,
                   max_num_batched_tokens=sched.max_num_batched_tokens,
                   enable_prefix_caching=cache.enable_prefix_caching)
    out["nice"] = os.nice(0)  # the engine's CPU priority: Ray starts workers at 15 unless told
    return json.dumps(out, sort_keys=True, default=str)


@functools.lru_cache(maxsize=4)
def _special_texts(tokenizer) -> tuple[str, ...]:
    """Texts of every control token: those marked special (<|im_start|>, <|im_end|>,
    <|endoftext|>, ...) and the other added ones (<think>, </think>, <tool_call>, <|fim_*|>,
    ...), which the tokenizer matches in text whatever split_special_tokens says."""
    return tuple(t.content for t in tokenizer.added_tokens_decoder.values())


def plain_text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of text by the vocabulary alone (normalizer, pre-tokenizer, BPE), without
    matching added tokens: every control string in it stays text."""
    backend = tokenizer.backend_tokenizer
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    pieces = backend.pre_tokenizer.pre_tokenize_str(text) if backend.pre_tokenizer else [(text, None)]
    return [t.id for piece, _ in pieces for t in backend.model.tokenize(piece)]


@functools.lru_cache(maxsize=4)
def _plain_tokenizer(tokenizer):
    """The tokenizer's own pipeline (normalizer, pre-tokenizer, BPE model) without its added
    tokens: the ids plain_text_ids computes. Built once per tokenizer and never changed after
    (safe to share between threads)."""
    from tokenizers import Tokenizer

    backend = tokenizer.backend_tokenizer
    plain = Tokenizer(backend.model)
    for part in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        if getattr(backend, part) is not None:
            setattr(plain, part, getattr(backend, part))
    return plain


def plain_text_tokens(tokenizer, text: str) -> list[int]:
    """plain_text_ids, computed in one call of the tokenizer's Rust pipeline (no Python loop
    over pre-tokens): for long untrusted text (a document to count or cut)."""
    return list(_plain_tokenizer(tokenizer).encode(text, add_special_tokens=False).ids)


def _normalized_spans(normalizer, text: str) -> tuple[str, list[tuple[int, int]]]:
    """The normalized text and, for each of its characters, the span of text it comes from.

    The tokenizers library's own offsets are wrong here (tokenizers 0.23 gives "caf" of
    "café" the span (0, 2)), so the alignment is computed: text is cut before each character
    that does not compose with what precedes it, and each piece is normalized alone; a piece
    whose normalization changes it maps all its normalized characters to the whole piece."""
    norm = normalizer.normalize_str if normalizer is not None else None
    if norm is None or norm(text) == text:  # already normalized (most text): one to one
        return text, [(i, i + 1) for i in range(len(text))]
    pieces: list[tuple[int, int]] = []
    for i, ch in enumerate(text):
        if pieces and (unicodedata.combining(ch) or norm(text[pieces[-1][0]:i + 1])
                       != norm(text[pieces[-1][0]:i]) + norm(ch)):
            pieces[-1] = (pieces[-1][0], i + 1)
        else:
            pieces.append((i, i + 1))
    out, spans = [], []
    for a, b in pieces:
        piece = norm(text[a:b])
        out.append(piece)
        spans += [(a + k, a + k + 1) for k in range(b - a)] if piece == text[a:b] else [(a, b)] * len(piece)
    normalized = "".join(out)
    if normalized != norm(text):  # not normalizable piece by piece: every character spans all
        normalized = norm(text)
        spans = [(0, len(text))] * len(normalized)
    return normalized, spans


def plain_text_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of text by the vocabulary alone (plain_text_ids: every control string in it
    stays text), with each token's (start, end) character span in the ORIGINAL text, before
    the normalizer's NFC ("e\u0301" is one token spanning both characters). A token holding
    part of a character's bytes spans that whole character (its neighbour shares it).

    The whole text goes through the pipeline as if the added tokens did not exist, as in a
    chat message (render_chat): cutting it at control strings first would give other ids
    (the pre-tokenizer joins ".</" or " <|" into one piece), so that is not the definition."""
    backend = tokenizer.backend_tokenizer
    normalized, spans = _normalized_spans(backend.normalizer, text)
    pieces = (backend.pre_tokenizer.pre_tokenize_str(normalized) if backend.pre_tokenizer
              else [(normalized, (0, len(normalized)))])
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    for piece, (start, end) in pieces:
        # Byte-level pieces: one piece character per byte of the normalized text; the model's
        # offsets count the piece's own UTF-8 bytes (its characters take one or two).
        char_of_byte = [start + k for k, ch in enumerate(normalized[start:end])
                        for _ in range(len(ch.encode()))]
        assert len(char_of_byte) == len(piece), "not a byte-level tokenizer"
        char_of = [char_of_byte[k] for k, ch in enumerate(piece) for _ in range(len(ch.encode()))]
        for t in backend.model.tokenize(piece):
            first, last = char_of[t.offsets[0]], char_of[t.offsets[1] - 1]
            ids.append(t.id)
            offsets.append((spans[first][0], spans[last][1]))
    return ids, offsets


def render_chat(tokenizer, messages: list[dict[str, str]], *, enable_thinking: bool) -> list[int]:
    """Prompt token ids of a conversation, with control tokens inside messages kept as text.

    A scraped page that contains "<|im_start|>system" (or "</think>") must not open a new turn:
    contents that hold any control token's text are tokenized apart by the vocabulary alone
    (plain_text_ids), and the template is rendered around placeholders for them.
    """
    specials = _special_texts(tokenizer)
    escaped = {i: m["content"] for i, m in enumerate(messages)
               if any(t in m["content"] for t in specials)}
    nonce = uuid.uuid4().hex
    shown = [{**m, "content": f"<{nonce}:{i}>"} if i in escaped else m for i, m in enumerate(messages)]
    text = tokenizer.apply_chat_template(shown, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=enable_thinking)
    if not escaped:
        return tokenizer.encode(text, add_special_tokens=False)
    ids: list[int] = []
    for n, piece in enumerate(re.split(f"<{nonce}:(\\d+)>", text)):  # odd pieces are placeholder numbers
        if n % 2:
            ids += plain_text_ids(tokenizer, escaped[int(piece)])
        elif piece:
            ids += tokenizer.encode(piece, add_special_tokens=False)
    return ids


def vllm_engine_args(args: dict[str, Any]):
    """engine_args' plain data as vLLM's AsyncEngineArgs (nested configs become their classes)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    if isinstance(args.get("structured_outputs_config"), dict):  # engine args stay plain data
        from vllm.config import StructuredOutputsConfig

        args = {**args, "structured_outputs_config": StructuredOutputsConfig(**args["structured_outputs_config"])}
    if isinstance(args.get("pooler_config"), dict):
        from vllm.config import PoolerConfig

        args = {**args, "pooler_config": PoolerConfig(**args["pooler_config"])}
    return AsyncEngineArgs(**args)


class VllmEngine:
    """One async vLLM engine; every generate() call is one request, batched continuously."""

    def __init__(self, args: dict[str, Any], *, device: str = "cuda"):
        from transformers import AutoTokenizer
        from vllm.v1.engine.async_llm import AsyncLLM

        self.args = dict(args)
        if args.get("runner") == QA_RUNNER:
            self._init_qa(args, device)
            return
        # vLLM's CPU build crashes its engine when a seeded request is prefilled in chunks
        # ("CPU Generator does not use offset"), taking every row in flight with it.
        self.per_request_seed = device != "cpu"
        self._llm = AsyncLLM.from_engine_args(vllm_engine_args(args))
        self.max_model_len: int = self._llm.model_config.max_model_len
        self.settings = throughput_settings(args, self._llm.vllm_config)
        self.tokenizer = AutoTokenizer.from_pretrained(
            args["model"], trust_remote_code=args.get("trust_remote_code", False)
        )
        self.id2label: dict[int, str] | None = None
        self.pooling_task: str | None = None
        if args.get("convert") == "embed":
            self.pooling_task = "embed"
        elif args.get("runner") == "pooling":
            config = hf_config(args["model"], args.get("trust_remote_code", False))
            self.id2label = {int(k): v for k, v in config.id2label.items()}
            self.pooling_task = next(t for suffix, t in POOLING_TASKS.items()
                                     if any(a.endswith(suffix) for a in config.architectures))

    def _init_qa(self, args: dict[str, Any], device: str) -> None:
        """A *ForQuestionAnswering checkpoint in transformers (vLLM has no runner for it; see
        the README's qa head): qa_logits batches the windows in flight into padded forwards."""
        import torch
        from transformers import AutoModelForQuestionAnswering, AutoTokenizer

        remote = args.get("trust_remote_code", False)
        dtype = args.get("dtype", "auto")
        self._llm = None
        self.per_request_seed = False
        self.tokenizer = AutoTokenizer.from_pretrained(args["model"], trust_remote_code=remote)
        self._qa_device = "cuda" if device == "cuda" else "cpu"
        self._qa_model = AutoModelForQuestionAnswering.from_pretrained(
            args["model"], dtype=dtype if dtype == "auto" else getattr(torch, dtype),
            trust_remote_code=remote).to(self._qa_device).eval()
        config = self._qa_model.config
        self.max_model_len = int(args.get("max_model_len") or config.max_position_embeddings)
        self.settings = throughput_settings({"dtype": dtype})
        self.id2label, self.pooling_task = None, "question_answering"
        self._qa_queue: list[tuple[list[int], asyncio.Future]] = []
        self._qa_busy = False

    async def qa_logits(self, token_ids: list[int]) -> tuple[list[float], list[float]]:
        """Start and end logits of every token of a question-answering checkpoint's input (the
        question's and the context window's ids). Calls in flight are run together, padded."""
        fut = asyncio.get_running_loop().create_future()
        self._qa_queue.append((list(token_ids), fut))
        if not self._qa_busy:
            self._qa_busy = True
            self._qa_task = asyncio.ensure_future(self._qa_drain())  # held: the loop keeps weak references
        return await fut

    async def _qa_drain(self) -> None:
        try:
            while self._qa_queue:
                batch, longest = [], 0
                while self._qa_queue:
                    ids = self._qa_queue[0][0]
                    if batch and max(longest, len(ids)) * (len(batch) + 1) > QA_BATCH_TOKENS:
                        break
                    batch.append(self._qa_queue.pop(0))
                    longest = max(longest, len(ids))
                try:
                    outs = await asyncio.to_thread(self._qa_forward, [ids for ids, _ in batch])
                except Exception as e:  # this batch's rows fail; the engine goes on
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(RowError("engine_error", f"the question-answering model failed: {e}"))
                    continue
                for (_, fut), out in zip(batch, outs):
                    if not fut.done():
                        fut.set_result(out)
        finally:
            self._qa_busy = False

    def _qa_forward(self, batch: list[list[int]]) -> list[tuple[list[float], list[float]]]:
        import torch

        longest = max(map(len, batch))
        ids = torch.zeros((len(batch), longest), dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for i, row in enumerate(batch):  # right padding: a causal model's real tokens never see it
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        with torch.inference_mode():
            out = self._qa_model(input_ids=ids.to(self._qa_device), attention_mask=mask.to(self._qa_device))
        start, end = out.start_logits.float().cpu(), out.end_logits.float().cpu()
        return [(start[i, :len(row)].tolist(), end[i, :len(row)].tolist()) for i, row in enumerate(batch)]

    def render_chat(self, messages, *, enable_thinking: bool) -> list[int]:
        return render_chat(self.tokenizer, messages, enable_thinking=enable_thinking)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def tokenize_text(self, text: str) -> list[int]:
        return plain_text_tokens(self.tokenizer, text)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    async def generate(self, prompt_token_ids: list[int], sampling: dict[str, Any]) -> Completion:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMValidationError
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        if not self.per_request_seed:
            sampling = {k: v for k, v in sampling.items() if k != "seed"}
        if "structured_json" in sampling:  # a JSON Schema the answer must follow
            from vllm.sampling_params import StructuredOutputsParams

            sampling = dict(sampling)
            sampling["structured_outputs"] = StructuredOutputsParams(json=sampling.pop("structured_json"))
        params = SamplingParams(**sampling, output_kind=RequestOutputKind.FINAL_ONLY)
        final = None
        try:
            async for out in self._llm.generate(
                TokensPrompt(prompt_token_ids=prompt_token_ids), params, request_id=uuid.uuid4().hex
            ):
                final = out
        except VLLMValidationError as e:
            kind = "prompt_too_long" if "context length" in str(e) else "engine_error"
            raise RowError(kind, f"the engine refused the request: {e}") from None
        choice = final.outputs[0]
        return Completion(
            text=choice.text,
            token_ids=list(choice.token_ids),
            finish_reason=choice.finish_reason or "stop",
            prompt_tokens=len(final.prompt_token_ids or prompt_token_ids),
            completion_tokens=len(choice.token_ids),
            logprobs=choice.logprobs,
        )

    async def score(self, prompt_token_ids: list[int], continuations: list[list[int]], *,
                    method: str = "trie") -> "EngineScores":
        """Log-probability of each continuation (all its tokens) after the prompt.

        method "trie" (default): one single-step request per node of the continuations' token
        trie (the prompt, then the prompt plus each shared prefix that has children), asking
        vLLM for the log-probabilities of exactly that node's children (`logprob_token_ids`,
        over the full vocabulary, as prompt log-probabilities are). The requests read the
        prefix cache, so the prompt is computed once and every further node recomputes only
        its last, partly filled KV block. "per_label": one request per continuation with
        prompt log-probabilities (vLLM then skips reading the prefix cache: each one computes
        the whole prompt again).
        """
        if method == "per_label":
            return await self._score_per_label(prompt_token_ids, continuations)
        if method != "trie":
            raise ValueError(f"unknown scoring method {method!r}; use one of {SCORING_METHODS}")
        children: dict[tuple[int, ...], set[int]] = {}
        for cont in continuations:
            for i, token in enumerate(cont):
                children.setdefault(tuple(cont[:i]), set()).add(token)
        # The root first: requests queued in one engine step read the blocks its predecessors
        # in that step write, so every other node finds the prompt cached.
        asks = [(prefix, sorted(tokens)[i:i + MAX_LOGPROB_IDS])
                for prefix, tokens in sorted(children.items(), key=lambda kv: len(kv[0]))
                for i in range(0, len(tokens), MAX_LOGPROB_IDS)]
        prompt = list(prompt_token_ids)
        answers = await asyncio.gather(*(self._next_logprobs(prompt + list(prefix), want)
                                         for prefix, want in asks))
        edge: dict[tuple[tuple[int, ...], int], float] = {}
        for (prefix, want), (logprobs, _) in zip(asks, answers):
            for token in want:
                edge[prefix, token] = logprobs[token].logprob
        scores = [sum(edge[tuple(c[:i]), t] for i, t in enumerate(c)) for c in continuations]
        read = sum(len(prompt) + len(prefix) for prefix, _ in asks)
        return EngineScores(scores, read, computed_tokens=read - sum(cached for _, cached in answers))

    async def _next_logprobs(self, ids: list[int], want: list[int]):
        """Full-vocabulary log-probabilities of the tokens `want` right after `ids` (one
        engine step), and how many of `ids` came from the prefix cache."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=want, detokenize=False,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        final = None
        async for out in self._llm.generate(TokensPrompt(prompt_token_ids=ids), params,
                                            request_id=uuid.uuid4().hex):
            final = out
        return final.outputs[0].logprobs[0], final.num_cached_tokens or 0

    async def _score_per_label(self, prompt_token_ids: list[int], continuations: list[list[int]]):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        # detokenize=False: only the numbers are read; decoding every prompt position's
        # token would cost the front end (on the engine's cores) more than the scoring itself
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False,
                                output_kind=RequestOutputKind.FINAL_ONLY)

        async def one(cont: list[int]) -> tuple[float, int]:
            ids = list(prompt_token_ids) + list(cont)
            final = None
            async for out in self._llm.generate(TokensPrompt(prompt_token_ids=ids), params,
                                                request_id=uuid.uuid4().hex):
                final = out
            lps = final.prompt_logprobs
            return (sum(lps[i][ids[i]].logprob for i in range(len(prompt_token_ids), len(ids))),
                    final.num_cached_tokens or 0)

        scored = await asyncio.gather(*(one(c) for c in continuations))
        total = sum(len(prompt_token_ids) + len(c) for c in continuations)
        return EngineScores([lp for lp, _ in scored], total,
                            computed_tokens=total - sum(cached for _, cached in scored))

    async def _pool(self, prompt_token_ids: list[int], task: str):
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt

        final = None
        async for out in self._llm.encode(TokensPrompt(prompt_token_ids=prompt_token_ids),
                                          PoolingParams(task=task), request_id=uuid.uuid4().hex):
            final = out
        return final.outputs.data

    async def embed(self, prompt_token_ids: list[int]) -> list[float]:
        """The prompt's embedding (engine task "embed"): its last token's final hidden state,
        L2-normalised, in float32 (hidden_size floats)."""
        return self._pool_probs(await self._pool(prompt_token_ids, "embed"))

    async def classify(self, prompt_token_ids: list[int]) -> list[float]:
        """Class probabilities of a sequence-classification checkpoint."""
        return self._pool_probs(await self._pool(prompt_token_ids, "classify"))

    async def classify_tokens(self, prompt_token_ids: list[int]) -> list[list[float]]:
        """Per-token class probabilities of a token-classification checkpoint."""
        return self._pool_probs(await self._pool(prompt_token_ids, "token_classify"))

    @staticmethod
    def _pool_probs(data) -> list:
        return data.float().tolist() if hasattr(data, "float") else list(data)

    def token_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of untrusted text as plain text (control strings stay text), with each
        token's (start, end) character span in text."""
        return plain_text_offsets(self.tokenizer, text)

    def shutdown(self) -> None:
        """Stop the engine and its worker processes."""
        llm, self._llm = getattr(self, "_llm", None), None
        if llm is not None:
            llm.shutdown(timeout=5)
        kill_children()


def _kill(procs: list) -> int:
    import psutil

    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=5)
    return len(procs)


def kill_children() -> None:
    """Kill what is left of this process's children (vLLM's engine core and workers)."""
    import psutil

    _kill(psutil.Process().children(recursive=True))


def reap_orphans(run_id: str) -> int:
    """Kill processes of this run (marked by RUN_MARK) still alive after Ray shut down.

    A killed engine actor leaves vLLM's engine core and workers running, reparented to init,
    each burning a core. Returns how many were killed.
    """
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get(RUN_MARK) == run_id:
                found.append(p)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return _kill(found)


def reap_dead_runs(output: str, run_id: str, *, spare: tuple[str, ...] = ()) -> int:
    """Kill processes left by earlier runs on the same output (their driver was killed: Ray's
    agents and vLLM processes outlive it). The caller holds the output's lock; spare names a
    run whose driver is alive but lost the lock (paused): it stops itself, with its message,
    when it wakes. Returns how many were killed."""
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            env = p.environ()
            if (p.pid != os.getpid() and env.get(OUTPUT_MARK) == output
                    and env.get(RUN_MARK) not in (None, run_id, *spare)):
                found.append(p)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return _kill(found)


def reap_on_every_node(run_id: str) -> int:
    """reap_orphans(run_id) on every node of the connected Ray cluster; how many were killed."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    reap = ray.remote(num_cpus=0, max_retries=0)(reap_orphans)
    refs = [reap.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(run_id)
            for n in ray.nodes() if n.get("Alive")]
    try:
        return sum(ray.get(refs, timeout=60))
    except Exception:  # a node went away: nothing of ours is left running there
        return 0
