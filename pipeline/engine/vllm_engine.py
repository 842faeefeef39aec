"""The vLLM engine behind the narrow handle heads use (the adapter); knows no head by name.
Its arguments come from pipeline.engine.engine_args, its prompts from pipeline.engine.prompt_tokens."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from dataclasses import dataclass
from typing import Any

from pipeline.engine import adapters, label_trie, start_failure
from pipeline.engine.engine_args import IN_PROCESS_WORKER, POOLING_TASKS, QA_RUNNER, TRIE_SCORING
from pipeline.engine.processes import descendants, environment, kill_started_since
from pipeline.engine.prompt_tokens import plain_text_offsets, plain_text_tokens, render_chat
from pipeline.errors import EngineStartError
from pipeline.heads.base import Completion, RowError, Scores

# Label scoring: "trie" (one engine step per node of the labels' token trie, reading the
# prefix cache) or "per_label" (prompt log-probabilities of prompt + label, one full prefill
# per label); see VllmEngine.score.
SCORING_METHODS = ("trie", "per_label")
MAX_LOGPROB_IDS = 128  # vLLM's cap on SamplingParams.logprob_token_ids per request
QA_BATCH_TOKENS = 8192  # padded tokens per forward pass of the question-answering model


@dataclass
class EngineScores(Scores):
    """Scores with the prompt tokens the engine computed (read minus prefix-cache hits)."""

    computed_tokens: int | None = None


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


def in_process_worker_env(args: dict[str, Any]) -> dict[str, str]:
    """What the environment needs while vLLM makes an engine whose model runs in the
    engine-core process (engine_args.IN_PROCESS_WORKER), which inherits it when it starts:
    VLLM_ENABLE_V1_MULTIPROCESSING=0, without which the CPU build starts a worker process
    anyway; OMP_NUM_THREADS the cores this process may use (Ray sets 1 in its actors; vLLM's
    worker process sized its threads to the machine); and a spawned, not forked, engine-core
    process (vLLM forks outside Ray), since OpenMP hangs in a child forked after the parent
    ran parallel torch code, and a forked child keeps the parent's thread count. {} for
    other engines."""
    if args.get("distributed_executor_backend") != IN_PROCESS_WORKER:
        return {}
    return {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": str(len(os.sched_getaffinity(0))),
            "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}


def vllm_engine_args(args: dict[str, Any]):
    """engine_args' plain data as vLLM's AsyncEngineArgs (nested configs become their classes)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    if isinstance(args.get("structured_outputs_config"), dict):  # engine args stay plain data
        from vllm.config import StructuredOutputsConfig

        args = {**args, "structured_outputs_config": StructuredOutputsConfig(**args["structured_outputs_config"])}
    if isinstance(args.get("pooler_config"), dict):
        from vllm.config import PoolerConfig

        args = {**args, "pooler_config": PoolerConfig(**args["pooler_config"])}
    return AsyncEngineArgs(**{k: v for k, v in args.items() if k != adapters.ENGINE_KEY})


BASE_LORA = "qwen-batch-base"  # the zero adapter's name


def lora_requests(paths: dict[str, str]) -> dict[str, Any]:
    """vLLM's LoRARequest for each adapter, by name (ids 1, 2, ... in the spec's order)."""
    if not paths:
        return {}
    from vllm.lora.request import LoRARequest

    return {name: LoRARequest(name, i, path) for i, (name, path) in enumerate(paths.items(), start=1)}


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
        self._before = descendants()  # shutdown ends what the engine starts, not the caller's children
        mark = start_failure.stderr_mark()
        try:
            with environment(in_process_worker_env(args)):
                self._llm = AsyncLLM.from_engine_args(vllm_engine_args(args))
        except Exception as e:
            cause = start_failure.root_cause(e, mark)
            if cause is None:
                raise
            raise EngineStartError(f"the engine could not start: {cause}") from e
        self.max_model_len: int = self._llm.model_config.max_model_len
        self.settings = throughput_settings(args, self._llm.vllm_config)
        # label scoring walks the labels' branches only where pipeline.engine.token_logprobs runs
        self.walks = TRIE_SCORING["logits_processors"][0] in (args.get("logits_processors") or ())
        self.tokenizer = AutoTokenizer.from_pretrained(
            args["model"], trust_remote_code=args.get("trust_remote_code", False)
        )
        self.loras = lora_requests(args.get(adapters.ENGINE_KEY) or {})
        self.base_lora = None  # the CPU build's base rows run on a zero adapter (adapters.zero_adapter)
        if self.loras and device == "cpu":
            from vllm.lora.request import LoRARequest

            first = next(iter(self.loras.values())).lora_path
            self.base_lora = LoRARequest(BASE_LORA, len(self.loras) + 1, adapters.zero_adapter(first))
        self.id2label: dict[int, str] | None = None
        self.pooling_task: str | None = None
        if args.get("convert") == "embed":
            self.pooling_task = "embed"
        elif args.get("runner") == "pooling":
            config = self._llm.model_config.hf_config  # the checkpoint's, as vLLM read it
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

    def render_chat(self, messages, *, enable_thinking: bool, tools=None) -> list[int]:
        return render_chat(self.tokenizer, messages, enable_thinking=enable_thinking, tools=tools)

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
                TokensPrompt(prompt_token_ids=prompt_token_ids), params, request_id=uuid.uuid4().hex,
                lora_request=self._lora(),
            ):
                final = out
        except VLLMValidationError as e:
            kind = "prompt_too_long" if "context length" in str(e) else "engine_error"
            raise RowError(kind, f"the engine refused the request: {e}") from None
        prompt_tokens = len(final.prompt_token_ids or prompt_token_ids)
        done = [Completion(text=c.text, token_ids=list(c.token_ids), finish_reason=c.finish_reason or "stop",
                           prompt_tokens=prompt_tokens, completion_tokens=len(c.token_ids), logprobs=c.logprobs)
                for c in sorted(final.outputs, key=lambda c: c.index)]
        if len(done) == 1:
            return done[0]
        first = done[0]
        return Completion(first.text, first.token_ids, first.finish_reason, prompt_tokens,
                          sum(d.completion_tokens for d in done), first.logprobs, samples=done)

    def _lora(self):
        """vLLM's LoRARequest of the current row's adapter (adapters.ROW_ADAPTER), None for the base."""
        name = adapters.ROW_ADAPTER.get()
        if name is None:
            return self.base_lora
        if name not in self.loras:
            raise RowError("invalid_input", f"adapter {name!r} is not one this engine serves "
                                            f"({', '.join(sorted(self.loras)) or 'none'}); add it to model.adapters")
        return self.loras[name]

    async def score(self, prompt_token_ids: list[int], continuations: list[list[int]], *,
                    method: str = "trie") -> EngineScores:
        """Log-probability of each continuation (all its tokens) after the prompt.

        method "trie" (default): every node of the continuations' token trie (the prompt, then
        the prompt plus each prefix that has children) gives the log-probabilities of exactly
        its children (`logprob_token_ids`, normalized over the full vocabulary), each node read
        once. On an engine started with TRIE_SCORING (pipeline.engine.token_logprobs: one logsumexp
        pass a row instead of vLLM's log-softmax) one request per label at most walks its
        branch from where it leaves earlier ones, a decode step a node (label_trie.walks);
        otherwise one single-step request per node. The requests read the prefix cache, so
        the prompt is computed once and each further request recomputes only its last,
        partly filled KV block. "per_label": one request per continuation with prompt
        log-probabilities (vLLM then skips reading the prefix cache: each one computes the
        whole prompt again).
        """
        if method == "per_label":
            if self.args.get("logprobs_mode") == "processed_logits":
                raise ValueError("this engine was started for scoring 'trie' (its prompt log-probabilities "
                                 "are raw logits); start one without pipeline.engine.engine_args.TRIE_SCORING "
                                 "for 'per_label'")
            return await self._score_per_label(prompt_token_ids, continuations)
        if method != "trie":
            raise ValueError(f"unknown scoring method {method!r}; use one of {SCORING_METHODS}")
        # Walks need pipeline.engine.token_logprobs in the engine; without it, one request per node.
        # The root first: requests queued in one engine step read the blocks its predecessors
        # in that step write, so every other request finds the prompt cached.
        kids, reads = label_trie.plan(tuple(map(tuple, continuations)), walk=self.walks, cap=MAX_LOGPROB_IDS)
        prompt = list(prompt_token_ids)
        answers = await asyncio.gather(*(self._read(prompt, r) for r in reads))
        edge = label_trie.edges(reads, [steps for steps, _ in answers], kids)
        scores = [sum(edge[tuple(c[:i]), t] for i, t in enumerate(c)) for c in continuations]
        # positions each request reads: its prompt, then one per step taken
        read = sum(len(prompt) + len(r.start) + len(r.steps) - 1 for r in reads)
        return EngineScores(scores, read, computed_tokens=read - sum(cached for _, cached in answers))

    async def _read(self, prompt: list[int], read: label_trie.Read):
        """One request of label scoring: the log-probabilities of `read.want` at each of its
        steps (normalized over the full vocabulary), and how many prompt tokens came from
        the prefix cache."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        walk = {label_trie.WALK: {"tokens": list(read.tokens), "spare": read.spare}} if read.tokens else None
        params = SamplingParams(max_tokens=len(read.steps), temperature=0.0, ignore_eos=True,
                                logprob_token_ids=list(read.want), detokenize=False, extra_args=walk,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        final = None
        async for out in self._llm.generate(TokensPrompt(prompt_token_ids=prompt + list(read.start)), params,
                                            request_id=uuid.uuid4().hex, lora_request=self._lora()):
            final = out
        steps = [{t: lp.logprob for t, lp in step.items()} for step in final.outputs[0].logprobs]
        return steps, final.num_cached_tokens or 0

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
                                                request_id=uuid.uuid4().hex, lora_request=self._lora()):
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
        if hasattr(self, "_before"):
            kill_started_since(self._before)
