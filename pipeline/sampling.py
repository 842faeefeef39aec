"""Sampling settings as vLLM takes them, with the bounds its SamplingParams enforces: the
job's (pipeline.spec.SamplingSpec) and each row's own overrides are checked against them."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from pipeline.strict_config import StrictSection

# Bounds on stop strings (spec and per-row): every generated token is checked against each.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
_FINITE = {"allow_inf_nan": False}
MAX_SAMPLES = 16  # sampling.n: completions a row; each costs a full generation


def samples_problem(sampling: dict) -> str | None:
    """Why these merged sampling settings cannot ask for n samples (None if they can): at
    temperature 0 every sample is the same greedy answer, paid for n times."""
    if (sampling.get("n") or 1) > 1 and sampling.get("temperature") == 0:
        return (f"n is {sampling['n']} but temperature is 0: greedy decoding gives the same answer "
                f"{sampling['n']} times; raise temperature (e.g. 0.7) or set n to 1")
    return None


class SamplingValues(StrictSection):
    """Sampling settings as vLLM takes them; a row's `sampling` overrides are checked
    against this model (strictly), with the bounds vLLM's SamplingParams enforces."""

    temperature: float | None = Field(None, ge=0.0, le=2.0, **_FINITE,
                                      description="0 means greedy; at most 2.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, **_FINITE, description="Nucleus sampling mass.")
    top_k: int | None = Field(None, ge=-1, description="Sample among the k likeliest tokens; 0 or -1: all.")
    min_p: float | None = Field(None, ge=0.0, le=1.0, **_FINITE, description="Minimum token probability.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate per row.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1,
                             description="Per-request seed, for reproducible sampling.")
    repetition_penalty: float | None = Field(None, gt=0.0, **_FINITE, description="1.0 means none.")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, **_FINITE,
                                           description="Penalty for tokens already used, in [-2, 2].")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, **_FINITE,
                                            description="Penalty growing with use count, in [-2, 2].")
    stop: list[str] | None = Field(
        None, description=f"Strings that end generation: at most {MAX_STOP_STRINGS}, each "
        f"1 to {MAX_STOP_CHARS} characters.")
    ignore_eos: bool | None = Field(None, description="Keep generating past end-of-sequence.")
    n: int | None = Field(
        None, ge=1, le=MAX_SAMPLES, description=f"Completions a row, 1 to {MAX_SAMPLES} (default 1): the "
        "chat head's `samples` column holds them all, `response` the first; every sample's tokens are "
        "counted. Refused with temperature 0 (every sample would be the same greedy answer) and by "
        "heads that give one answer a row.")

    @model_validator(mode="after")
    def _samples_differ(self):
        if problem := samples_problem(self.model_dump(exclude_none=True)):
            raise ValueError(problem)
        return self

    @field_validator("stop")
    @classmethod
    def _stop_is_bounded(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if len(v) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings (got {len(v)})")
        for i, s in enumerate(v):
            if not s:
                raise ValueError(f"stop[{i}] is empty; every stop string needs at least one character")
            if len(s) > MAX_STOP_CHARS:
                raise ValueError(f"stop[{i}] has {len(s)} characters; at most {MAX_STOP_CHARS}")
        return v
