"""What every head gets and gives: a narrow engine handle in, one output row out.

Heads are plain Python: they never import vLLM or Ray. A head turns one input row into one
result row, and may call the engine as often as it needs (a long document takes several
calls); it raises RowError for a row it cannot turn into a result.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# The fixed vocabulary of error_type values in errors/*.parquet (documented in the README).
ERROR_TYPES = {
    "invalid_input": "the row's value is missing, empty, too large or of the wrong type",
    "prompt_too_long": "the prompt does not fit model.max_model_len",
    "template_error": "the chat template could not render the row",
    "engine_error": "the engine rejected or failed this one request",
    "output_parse_error": "the model's output could not be turned into a result",
    "engine_died": "the engine died on every retry while this row was in flight",
    "internal_error": "a bug in qwen-batch; please report it with the message",
}


class RowError(Exception):
    """This row becomes an error row: error_type from ERROR_TYPES, and a message for people."""

    def __init__(self, error_type: str, message: str):
        assert error_type in ERROR_TYPES, error_type
        super().__init__(message)
        self.error_type = error_type
        self.message = message


@dataclass
class Completion:
    """One finished engine call: its first (or only) sample's text, tokens and finish."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int  # of every sample
    logprobs: list[dict[int, float]] | None = field(default=None, repr=False)
    # sampling n > 1: all n samples in index order (each with its own completion_tokens)
    samples: list[Completion] | None = None


@dataclass
class Scores:
    """Log-probabilities of continuations of one prompt."""

    logprobs: list[float]
    prompt_tokens: int  # tokens the engine read, over all continuations


class TextEngine(Protocol):
    """What every engine handle has: its context and plain-text tokenization."""

    max_model_len: int

    def tokenize_text(self, text: str) -> list[int]:
        """Token ids of untrusted text (a row's, a document's) as plain text, by the vocabulary
        alone: every control string in it (<|im_start|>, <|im_end|>, <|endoftext|>, <think>,
        <tool_call>, <|fim_*|>, ... all of the tokenizer's added tokens) stays text, as inside
        a rendered chat message. The count of a text's tokens in render_chat's prompt."""


class GenerativeEngine(TextEngine, Protocol):
    """A generative Qwen3 (vLLM's generate runner), as chat, summarize, classify (label
    scoring), extract, rerank and qa's generate mode see it."""

    def render_chat(self, messages: list[dict[str, str]], *, enable_thinking: bool,
                    tools: list[dict] | None = None) -> list[int]:
        """Token ids of the chat-templated prompt, ready for generation (tools: function
        definitions the template renders, OpenAI style)."""

    def tokenize(self, text: str) -> list[int]:
        """Token ids of text the pipeline itself writes (no special tokens added): control
        strings in it become control tokens, e.g. label + "<|im_end|>". Never for row text."""

    def decode(self, token_ids: list[int]) -> str:
        """Text of token ids."""

    async def generate(self, prompt_token_ids: list[int], sampling: dict[str, Any]) -> Completion:
        """Generate from a prompt; sampling uses SamplingSpec's keys."""

    async def score(self, prompt_token_ids: list[int], continuations: list[list[int]]) -> Scores:
        """Log-probability of each continuation (all its tokens) after the prompt."""


class PoolingEngine(TextEngine, Protocol):
    """A checkpoint read, not generated from: vLLM's pooling runner (embeddings, a
    classification checkpoint) or a question-answering model run by transformers. pooling_task
    says which; each has the methods of its task."""

    pooling_task: str  # "embed", "classify", "token_classify" or "question_answering"
    id2label: dict[int, str] | None  # the classes of a classification checkpoint

    def token_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The ids of tokenize_text(text), with each token's character span in text as given
        (before any normalization)."""

    async def embed(self, prompt_token_ids: list[int]) -> list[float]:
        """"embed": the L2-normalised final hidden state of the prompt's last token."""

    async def classify(self, prompt_token_ids: list[int]) -> list[float]:
        """"classify": the probability of each class (id2label's order)."""

    async def classify_tokens(self, prompt_token_ids: list[int]) -> list[list[float]]:
        """"token_classify": per token, the probability of each class."""

    async def qa_logits(self, token_ids: list[int]) -> tuple[list[float], list[float]]:
        """"question_answering": start and end logits, one of each per input token."""


Engine = GenerativeEngine  # the handle most heads get; pooling heads annotate PoolingEngine


# Bounds that let a huge row fail fast instead of holding the engine's event loop (and so
# every other row in flight on the replica) while it is tokenized. Qwen3's template spends at
# least 4 tokens on a turn (<|im_start|>, the role, a newline, <|im_end|>) and no token of its
# vocabulary is longer than 128 characters, so a row past either bound cannot fit.
MIN_TOKENS_PER_TURN = 4
MAX_CHARS_PER_TOKEN = 128
COUNT_PIECE_CHARS = 1 << 16  # texts longer than this are counted piece by piece
_CUT_SLACK = 8  # tokens a cut between pieces may add to the count


class HeadOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_chars: int = Field(
        4_000_000, ge=1, description="Longest row, in characters of the text the head reads from it (all its "
        "columns together); a longer row becomes an invalid_input error row before it is tokenized (row text "
        "is tokenized on the engine's event loop, about 0.7 s per million characters on one core).")


class Head:
    """Base of the task heads. Subclasses set name, Options and output columns, write run()."""

    name: ClassVar[str]
    Options: ClassVar[type[HeadOptions]] = HeadOptions
    # What the head needs of the engine, declared (the engine knows no head by name): None
    # runs the checkpoint as it is (a generative Qwen3, or a classification checkpoint's own
    # pooling runner); "embed" asks for vLLM's pooling runner with last-token, normalised
    # embeddings (engine.embed). pipeline.engine.engine_args.engine_args merges it, at plan time too, so
    # `validate` refuses a checkpoint that cannot serve it.
    engine_task: ClassVar[str | None] = None
    # True when the head sends many requests that extend one prompt (label scoring): the
    # engine is then set up to share prompts through its prefix cache in small blocks.
    shares_prefixes: ClassVar[bool] = False
    # True when the head returns all sampling.n completions of a row (the chat head's
    # `samples`); a job asking n > 1 of any other head is refused when the spec loads.
    many_samples: ClassVar[bool] = False

    @classmethod
    def score_method(cls, options: dict[str, Any] | None) -> str | None:
        """The engine.score method this head's rows use with these options (None: it scores
        nothing). An engine for "trie" computes only the asked-for tokens' log-probabilities."""
        return None

    def __init__(self, options: dict[str, Any] | None = None, *, sampling: dict[str, Any] | None = None):
        self.options = self.Options.model_validate(options or {})
        self.sampling = dict(sampling or {})
        # a bound on rows' own overrides (SamplingSpec.row_max_tokens), not a sampling setting
        self.row_max_tokens: int | None = self.sampling.pop("row_max_tokens", None)

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> str | None:
        """None if the options are valid, else a message naming the bad keys."""
        try:
            cls.Options.model_validate(options or {})
        except ValidationError as e:
            from pipeline.strict_config import explain_validation_error

            return explain_validation_error(cls.Options, e, f"task.options for head '{cls.name}'")
        return None

    @classmethod
    def resolve_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The options as the job runs them, when the spec is loaded (e.g. a file they name,
        read in, so workers and the manifest see its content). Raise ValueError if it fails."""
        return options

    def result_schema(self, id_type: Any) -> Any:
        """The Arrow schema of this job's results: schemas/results_<head>.json unless the
        head's columns depend on its options."""
        from pipeline.io.schemas import arrow_schema

        return arrow_schema(f"results_{self.name}", id_type=id_type)

    def use_model(self, config: Any) -> None:
        """Learn what the head needs of the checkpoint's config (pipeline.checkpoint.hf_config:
        hidden_size, architectures, ...) before result_schema or run; called wherever a job's
        head is built (plan, workers, results schema) for heads that override it. Raise
        ValueError, naming the option, if the head cannot run on this checkpoint."""

    def input_columns(self) -> list[str]:
        """Columns this head reads (besides the id) when a shard has them."""
        raise NotImplementedError

    def required_all(self) -> list[str]:
        """Columns every shard must have (checked at plan time); none unless a head says."""
        return []

    def required_any(self) -> list[str]:
        """Columns of which every shard must have at least one."""
        return self.input_columns()

    async def run(self, row: dict[str, Any], engine: Engine) -> dict[str, Any]:
        """Turn one input row into one result row (without the id), or raise RowError."""
        raise NotImplementedError

    async def refuse_oversized(self, engine: TextEngine, texts: list[str], *, turns: int | None,
                               columns: list[str]) -> None:
        """Every head's size rule, applied to a row's texts (columns names them for people)
        before they are rendered or tokenized. A prompt that must fit engine.max_model_len
        (turns given: its turn count) and cannot is prompt_too_long: by its turn count, then
        its length in characters, then by counting tokens piece by piece, stopping as soon as
        the count is past the context and yielding to the event loop between pieces. Any row
        (turns None: a head that reads text of any length in pieces, as summarize) with more
        than task.options.max_chars characters is invalid_input. Rows that pass are counted
        exactly when rendered; a row that fails tokenized at most about max_model_len tokens."""
        max_chars = self.options.max_chars
        limit = engine.max_model_len
        fix = "shorten it or raise model.max_model_len"
        chars = sum(len(t) for t in texts)
        if turns is not None:
            if turns * MIN_TOKENS_PER_TURN >= limit:
                raise RowError("prompt_too_long",
                               f"the conversation has {turns:,} turns; each takes at least {MIN_TOKENS_PER_TURN} "
                               f"tokens, so it cannot fit model.max_model_len {limit}; {fix}")
            if chars > limit * MAX_CHARS_PER_TOKEN:
                raise RowError("prompt_too_long",
                               f"the prompt has {chars:,} characters, more than model.max_model_len {limit} "
                               f"tokens can hold (a token is at most {MAX_CHARS_PER_TOKEN} characters); {fix}")
        if chars > max_chars:
            named = ", ".join(f"'{c}'" for c in columns)
            raise RowError("invalid_input",
                           f"the row's text ({named}) has {chars:,} characters, more than task.options.max_chars "
                           f"{max_chars:,}; shorten or split it, or raise task.options.max_chars")
        if turns is None or chars <= COUNT_PIECE_CHARS:
            return
        count, cuts, seen = turns * MIN_TOKENS_PER_TURN, 0, 0
        for text in texts:
            for start in range(0, len(text), COUNT_PIECE_CHARS):
                piece = text[start:start + COUNT_PIECE_CHARS]
                count, cuts, seen = count + len(engine.tokenize_text(piece)), cuts + 1, seen + len(piece)
                if count - cuts * _CUT_SLACK >= limit:
                    raise RowError("prompt_too_long",
                                   f"the prompt has more than {limit} tokens (counted {count:,} in its first "
                                   f"{seen:,} of {chars:,} characters) but model.max_model_len is {limit}; {fix}")
                await asyncio.sleep(0)  # let the other rows' requests through


def require_placeholders(template: str, *names: str) -> str:
    """template, or ValueError naming a {placeholder} it lacks: without it, what the row holds
    would never reach the model (an option's validator calls this)."""
    for name in names:
        if "{" + name + "}" not in template:
            raise ValueError(f"it has no {{{name}}}, so the {name} would never reach the model; "
                             f"put {{{name}}} where it goes")
    return template


def require_text(row: dict[str, Any], column: str) -> str:
    """The row's text in a column, or a RowError saying what is wrong with it."""
    value = row.get(column)
    if value is None:
        raise RowError("invalid_input", f"column '{column}' is null; give each row a text")
    if not isinstance(value, str):
        raise RowError("invalid_input", f"column '{column}' holds {type(value).__name__}, not text")
    if not value.strip():
        raise RowError("invalid_input", f"column '{column}' is empty or whitespace only")
    return value


def text_pieces(text: str, size: int) -> list[str]:
    """text in consecutive pieces of at most size characters, each cut before a space when the
    piece's second half has one: where a byte-level tokenizer starts a new word anyway, so the
    pieces tokenized apart give the whole text's tokens."""
    out, start = [], 0
    while len(text) - start > size:
        cut = text.rfind(" ", start + size // 2, start + size)
        cut = cut if cut > start else start + size
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out
