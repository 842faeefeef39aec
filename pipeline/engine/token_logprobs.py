"""A vLLM logits processor for label scoring: the tokens a request names in
`SamplingParams.logprob_token_ids` get their log-probabilities, and a request may walk a path
of given tokens (a branch of the labels' token trie) while it reads them.

vLLM computes `logprob_token_ids` by a log-softmax over the whole vocabulary of every such
request (151,936 floats a row for Qwen3, written out), then a greedy pick and that pick's rank.
Label scoring wants a handful of tokens a row: one logsumexp pass over the row gives the same
numbers. With the engine's `logprobs_mode` set to "processed_logits"
(pipeline.engine.engine_args.TRIE_SCORING) vLLM skips its own log-softmax and returns the values this
processor leaves in the logits. Only for engines that serve label scoring: in that mode every
other log-probability vLLM returns (prompt log-probabilities, top-k) is a raw logit.

A walk (SamplingParams.extra_args WALK: the token to take at each step, and a spare token id
the request does not ask about) makes the greedy pick that token, so one request reads the
next-token distributions along a whole branch, each new position computed once as a decode
step. The taken token's own log-probability moves to the spare id's slot first (the taken
token's slot then holds the forcing value).
"""

from __future__ import annotations

import logging

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from pipeline.engine.label_trie import WALK

logger = logging.getLogger(__name__)

TAKEN = 1e9  # above any log-probability, so the greedy pick is the walk's token


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


def _state(params, _prompt, output_ids):
    wanted = list(params.logprob_token_ids or ())
    if not wanted:
        return None
    walk = (params.extra_args or {}).get(WALK)
    return wanted, walk, output_ids  # output_ids: vLLM's live list of the request's tokens


class TokenLogprobs(LogitsProcessor):
    """For each request with logprob_token_ids: those tokens' logits minus the row's
    logsumexp; for a walk, the step's token taken (its value kept in the spare slot)."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.device = device
        self.state: dict[int, tuple] = {}  # batch row -> (wanted ids, walk or None, output ids)
        self.rows = self.cols = self.picks = torch.tensor((), dtype=torch.long)
        self.all_rows: list[int] = []
        self.walking: list[int] = []

    @classmethod
    def validate_params(cls, params) -> None:
        walk = (params.extra_args or {}).get(WALK)
        if walk is not None:
            asked, tokens = set(params.logprob_token_ids or ()), set(walk["tokens"])
            if walk["spare"] in tokens or not tokens | {walk["spare"]} <= asked:
                raise ValueError(f"{WALK}: logprob_token_ids must hold the walk's tokens and its spare "
                                 "id, and the spare id must not be one of the tokens")

    def is_argmax_invariant(self) -> bool:
        return False  # it changes the named tokens' values, and a walk sets the greedy pick

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if process_dict_updates(self.state, batch_update, _state):
            self.all_rows = sorted(self.state)
            self.walking = [row for row in self.all_rows if self.state[row][1] is not None]
            position = {row: i for i, row in enumerate(self.all_rows)}
            rows = [row for row in self.all_rows for _ in self.state[row][0]]
            self.rows = torch.tensor(rows, dtype=torch.long, device=self.device)
            self.picks = torch.tensor([position[r] for r in rows], dtype=torch.long, device=self.device)
            self.cols = torch.tensor([t for row in self.all_rows for t in self.state[row][0]],
                                     dtype=torch.long, device=self.device)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.state:
            return logits
        every_row = len(self.all_rows) == logits.shape[0]
        scored = logits if every_row else logits[torch.tensor(self.all_rows, device=logits.device)]
        logits[self.rows, self.cols] -= row_logsumexp(scored)[self.picks]
        if self.walking:
            rows, taken, spare = [], [], []
            for row in self.walking:
                _, walk, output_ids = self.state[row]
                step = len(output_ids)
                if step < len(walk["tokens"]):
                    rows.append(row)
                    taken.append(walk["tokens"][step])
                    spare.append(walk["spare"])
            if rows:
                rows_t = torch.tensor(rows, dtype=torch.long, device=logits.device)
                taken_t = torch.tensor(taken, dtype=torch.long, device=logits.device)
                logits[rows_t, torch.tensor(spare, dtype=torch.long, device=logits.device)] = logits[rows_t, taken_t]
                logits[rows_t, taken_t] = TAKEN
        return logits
