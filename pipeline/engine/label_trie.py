"""The labels' token trie, and the requests that read it (engine.score's "trie" method).

Each label's tokens (ending in end-of-turn) are a path from the prompt; a node is a prefix of
a path that has children, and a label's score needs each node on its path to give the
log-probability of the next token. Every node is read once, for all its children.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from itertools import count

WALK = "label_walk"  # SamplingParams.extra_args key of a walk: {"tokens": [...], "spare": id}


@dataclass(frozen=True)
class Read:
    """One request: after the prompt plus `start`, read the node at each step; between steps
    take `tokens` (a walk down one branch; empty when it reads one node)."""

    start: tuple[int, ...]
    steps: tuple[tuple[int, ...], ...]  # the trie nodes read, one per engine step
    tokens: tuple[int, ...]  # the token taken at each step of a walk
    want: tuple[int, ...]  # token ids asked for: the children of every node read
    spare: int | None = None  # a walk's id outside `want` that keeps the taken token's value


def children(continuations: list[list[int]]) -> dict[tuple[int, ...], set[int]]:
    """Each node of the trie -> the tokens that follow it."""
    kids: dict[tuple[int, ...], set[int]] = {}
    for cont in continuations:
        for i, token in enumerate(cont):
            kids.setdefault(tuple(cont[:i]), set()).add(token)
    return kids


def node_reads(continuations: list[list[int]], cap: int) -> list[Read]:
    """One single-step request per node (and per `cap` of its children), shallowest first."""
    kids = children(continuations)
    return [r for node in sorted(kids, key=len) for r in _read(node, kids[node], cap)]


def _read(node: tuple[int, ...], tokens: set[int], cap: int) -> list[Read]:
    ordered = sorted(tokens)
    return [Read(node, (node,), (), tuple(ordered[i:i + cap])) for i in range(0, len(ordered), cap)]


def walks(continuations: list[list[int]], cap: int) -> list[Read]:
    """One request per label at most: each walks its label's branch from the first node no
    earlier request reads, so a label that shares a prefix starts where it branches off."""
    kids = children(continuations)
    done: set[tuple[int, ...]] = set()
    out: list[Read] = []
    for cont in continuations:
        ks = [k for k in range(len(cont)) if tuple(cont[:k]) not in done]
        if not ks:
            continue  # every node on its path is read by earlier requests
        assert ks == list(range(ks[0], len(cont))), "unread nodes are the end of a branch"
        steps = tuple(tuple(cont[:k]) for k in ks)
        done.update(steps)
        want = set().union(*(kids[s] for s in steps))
        if len(steps) == 1 or len(want) >= cap:  # one node, or too many ids for one request
            out += [r for s in steps for r in _read(s, kids[s], cap)]
            continue
        spare = next(i for i in count() if i not in want)
        out.append(Read(steps[0], steps, tuple(cont[k] for k in ks), tuple(sorted(want | {spare})), spare))
    return out


@functools.lru_cache(maxsize=256)  # a job's rows share one label set (multi-label: one per label)
def plan(continuations: tuple[tuple[int, ...], ...], *, walk: bool, cap: int):
    """(children, reads) for engine.score: walks (one request per label at most), or without
    walk one request per node."""
    conts = [list(c) for c in continuations]
    return children(conts), tuple((walks if walk else node_reads)(conts, cap))


def edges(reads: list[Read], logprobs: list[list[dict[int, float]]],
          kids: dict[tuple[int, ...], set[int]]) -> dict[tuple[tuple[int, ...], int], float]:
    """(node, next token) -> log-probability, from each request's per-step log-probabilities."""
    out: dict[tuple[tuple[int, ...], int], float] = {}
    for read, per_step in zip(reads, logprobs):
        want = set(read.want)
        for j, node in enumerate(read.steps):
            taken = read.tokens[j] if read.tokens else None
            for token in kids[node] & want:
                out[node, token] = per_step[j][read.spare if token == taken else token]
    return out
