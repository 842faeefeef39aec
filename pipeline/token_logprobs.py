"""A vLLM logits processor that turns the logits of the tokens a request names in
`SamplingParams.logprob_token_ids` into their log-probabilities, and nothing else.

vLLM computes `logprob_token_ids` by a log-softmax over the whole vocabulary of every such
request (151,936 floats a row for Qwen3, written out), then a greedy pick and that pick's rank.
Label scoring (engine.score, method "trie") wants a handful of tokens a row: one logsumexp
pass over the row gives the same numbers. With the engine's `logprobs_mode` set to
"processed_logits" (pipeline.engine_args.TRIE_SCORING) vLLM skips its own log-softmax and
returns the values this processor leaves in the logits. Only for engines that serve label
scoring: in that mode every other log-probability vLLM returns (prompt log-probabilities,
top-k) is a raw logit.
"""

from __future__ import annotations

import logging

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

logger = logging.getLogger(__name__)


def _logsumexp(logits: torch.Tensor) -> torch.Tensor:
    top = logits.amax(dim=-1, keepdim=True)
    return (logits - top).exp().sum(dim=-1).log() + top.squeeze(-1)


# One fused pass over each row (torch.logsumexp on CPU is several, and slower than vLLM's
# log-softmax); compiled on first use in the engine's worker, a few seconds once per process.
_fused_logsumexp = torch.compile(_logsumexp, dynamic=True)


def row_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp of each row; uncompiled where this process cannot compile."""
    global _fused_logsumexp
    if _fused_logsumexp is not None:
        try:
            return _fused_logsumexp(logits)
        except Exception as e:  # e.g. no C++ compiler: the same numbers, more slowly
            logger.warning("label scoring: torch.compile failed (%s); using torch.logsumexp", e)
            _fused_logsumexp = None
    return torch.logsumexp(logits, dim=-1)


class TokenLogprobs(LogitsProcessor):
    """For each request with logprob_token_ids: those tokens' logits minus the row's logsumexp."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.device = device
        self.wanted: dict[int, list[int]] = {}  # batch row -> token ids
        self.rows = self.cols = self.picks = torch.tensor((), dtype=torch.long)
        self.all_rows: list[int] = []

    def is_argmax_invariant(self) -> bool:
        return False  # it changes the named tokens' values (the greedy pick is never read)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if process_dict_updates(self.wanted, batch_update,
                                lambda params, _, __: list(params.logprob_token_ids or ()) or None):
            self.all_rows = sorted(self.wanted)
            position = {row: i for i, row in enumerate(self.all_rows)}
            rows = [row for row in self.all_rows for _ in self.wanted[row]]
            self.rows = torch.tensor(rows, dtype=torch.long, device=self.device)
            self.picks = torch.tensor([position[r] for r in rows], dtype=torch.long, device=self.device)
            self.cols = torch.tensor([t for row in self.all_rows for t in self.wanted[row]],
                                     dtype=torch.long, device=self.device)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.wanted:
            return logits
        every_row = len(self.all_rows) == logits.shape[0]
        scored = logits if every_row else logits[torch.tensor(self.all_rows, device=logits.device)]
        logits[self.rows, self.cols] -= row_logsumexp(scored)[self.picks]
        return logits
