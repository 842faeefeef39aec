"""Stand-in engines for fault injection and for measuring the data path without a model.

Never the only test of a feature: the integration tests run the real vLLM engine.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from pipeline.heads.base import Completion, RowError


class EngineDeadError(RuntimeError):
    """Named like vLLM's: the worker recognizes a dead engine by this name."""


class FakeEngine:
    """Answers instantly with "ok ok ..."; its tokens are whitespace-separated words.

    fail_on: prompts containing any of these strings fail with an engine_error.
    die_on: a prompt containing this string kills the whole actor process (os._exit), once
    per marker file, so the restarted actor succeeds.
    dead_on: likewise, but the engine reports itself dead (vLLM's EngineDeadError), once.
    poison_on: a prompt containing this string kills the actor process every time.
    hang_on: a prompt containing this string never gets an answer (a hung request).
    """

    max_model_len = 4096
    settings = '{"engine": "fake"}'

    def __init__(self, args: dict[str, Any] | None = None, *, device: str = "cpu",
                 fail_on: tuple[str, ...] = (), die_on: str | None = None, marker: str | None = None,
                 delay: float = 0.0, dead_on: str | None = None, poison_on: str | None = None,
                 hang_on: str | None = None):
        self.fail_on, self.die_on, self.marker, self.delay = fail_on, die_on, marker, delay
        self.dead_on, self.poison_on, self.hang_on = dead_on, poison_on, hang_on
        self.vocab: dict[str, int] = {"ok": 0}
        self.words: list[str] = ["ok"]

    def render_chat(self, messages, *, enable_thinking: bool) -> list[int]:
        text = " ".join(f"{m['role']}: {m['content']}" for m in messages)
        return self.tokenize(text)

    def tokenize(self, text: str) -> list[int]:
        ids = []
        for w in text.split():
            if w not in self.vocab:
                self.vocab[w] = len(self.words)
                self.words.append(w)
            ids.append(self.vocab[w])
        return ids

    def decode(self, token_ids: list[int]) -> str:
        return " ".join(self.words[t] for t in token_ids)

    async def generate(self, prompt_token_ids: list[int], sampling: dict[str, Any]) -> Completion:
        if self.delay:
            await asyncio.sleep(self.delay)
        text = self.decode(prompt_token_ids)
        if self.die_on and self.die_on in text and self.marker and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        if self.poison_on and self.poison_on in text:
            os._exit(1)
        if self.dead_on and self.dead_on in text and self.marker and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            raise EngineDeadError("the fake engine core died")
        if self.hang_on and self.hang_on in text:
            await asyncio.Event().wait()
        if any(f in text for f in self.fail_on):
            raise RowError("engine_error", "the fake engine was told to fail this prompt")
        n = min(sampling.get("max_tokens", 16), 16)
        out = [0] * n
        return Completion(self.decode(out), out, "length", len(prompt_token_ids), n)


def fake_engine_factory(**kwargs):
    """An engine_factory for run_job that builds FakeEngine with these options."""

    def build(args, *, device):
        return FakeEngine(args, device=device, **kwargs)

    return build


def recording_engine_factory(log_path: str):
    """An engine_factory for run_job: the real vLLM engine, with every call's prompt length
    and max_tokens appended to log_path (JSON lines), so tests can check what was sent."""

    def build(args, *, device):
        import json

        from pipeline.engine import VllmEngine

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
