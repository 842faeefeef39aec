"""Classify head on a scripted engine handle: the label is the likeliest of the set, the
probabilities come from scores (not sampled text), multi-label and bad input."""

import asyncio
import math

import pytest

from pipeline.heads.base import RowError
from pipeline.heads.classify import ClassifyHead
from pipeline.testing import FakeEngine, FakeQaEngine


def run(options, text, table):
    eng = FakeEngine(scores=table)  # each label's log-probability by its text (default -5)
    return asyncio.run(ClassifyHead(options).run({"text": text}, eng)), eng


def test_label_is_the_likeliest_and_probs_are_a_softmax():
    out, _ = run({"labels": ["positive", "negative", "neutral"]}, "Great!",
                 {"positive": -1.0, "negative": -2.0, "neutral": -3.0})
    z = sum(math.exp(x) for x in (-1.0, -2.0, -3.0))
    assert out["label"] == "positive"
    probs = {d["label"]: d["prob"] for d in out["label_probs"]}
    assert probs["positive"] == pytest.approx(math.exp(-1) / z)
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-9)
    assert out["confidence"] == probs["positive"] and out["completion_tokens"] == 0


def test_scoring_method_reaches_the_engine():
    _, eng = run({"labels": ["a", "b"]}, "text", {})
    assert eng.methods == ["trie"]
    _, eng = run({"labels": ["a", "b"], "scoring": "per_label"}, "text", {})
    assert eng.methods == ["per_label"]
    assert "scoring" in ClassifyHead.check_options({"labels": ["a"], "scoring": "fast"})


def test_descriptions_and_examples_are_in_the_prompt():
    options = {"labels": {"spam": "unsolicited ads", "ham": "anything else"},
               "examples": [{"text": "Buy now!!!", "label": "spam"}], "system_prompt": "Be careful."}
    _, eng = run(options, "hello friend", {"ham": -0.1})
    turns = eng.rendered[0][0]
    assert turns[0] == {"role": "system", "content": "Be careful."}
    assert "- spam: unsolicited ads" in turns[1]["content"] and "Buy now!!!" in turns[1]["content"]
    assert turns[2] == {"role": "assistant", "content": "spam"}
    assert turns[-1]["content"].endswith("hello friend")


def test_multi_label_keeps_labels_above_threshold():
    table = {"yes": -0.1, "no": -3.0}  # every label: yes is likelier
    out, _ = run({"labels": ["a", "b"], "multi_label": True}, "text", table)
    assert out["labels"] == ["a", "b"] and out["label"] is None
    assert all(d["prob"] > 0.9 for d in out["label_probs"])
    out, _ = run({"labels": ["a", "b"], "multi_label": True}, "text", {"yes": -3.0, "no": -0.1})
    assert out["labels"] == [] and out["confidence"] is None


def test_letters_list_lettered_options_and_read_one_distribution():
    options = {"labels": {"spam": "unsolicited ads", "ham": ""}, "scoring": "letters",
               "examples": [{"text": "Buy now!!!", "label": "spam"}]}
    out, eng = run(options, "hello friend", {"A": -2.0, "B": -0.5})
    turns = eng.rendered[0][0]
    assert "A. spam: unsolicited ads\nB. ham" in turns[0]["content"] and "letter" in turns[0]["content"]
    assert turns[1] == {"role": "assistant", "content": "A"}  # the example answers with its letter
    assert eng.methods == ["trie"]  # a one-node trie: the letters, no end-of-turn
    assert out["label"] == "ham"
    assert [d["prob"] for d in out["label_probs"]] == pytest.approx(
        [math.exp(-2.0) / (math.exp(-2.0) + math.exp(-0.5)), math.exp(-0.5) / (math.exp(-2.0) + math.exp(-0.5))])
    assert ClassifyHead.score_method({"labels": ["a"], "scoring": "letters"}) == "trie"


def test_letters_are_single_label_and_at_most_26():
    assert "26" in ClassifyHead.check_options({"labels": [f"l{i}" for i in range(27)], "scoring": "letters"})
    assert "multi_label" in ClassifyHead.check_options({"labels": ["a", "b"], "scoring": "letters",
                                                        "multi_label": True})


def test_multi_label_prompts_start_with_the_text():
    """Every label's prompt starts with the same text (the prefix cache computes it once)."""
    _, eng = run({"labels": ["a", "b"], "multi_label": True}, "the text", {})
    first, second = (turns[-1]["content"] for turns, _ in eng.rendered)
    assert first.startswith("Text:\nthe text\n") and second.startswith("Text:\nthe text\n") and first != second


@pytest.mark.parametrize("text, fragment", [(None, "is null"), ("", "empty"), (3.5, "holds float")])
def test_bad_text_is_invalid_input(text, fragment):
    with pytest.raises(RowError) as e:
        run({"labels": ["x", "y"]}, text, {})
    assert e.value.error_type == "invalid_input" and fragment in e.value.message


def test_labels_must_be_unique_and_present():
    assert "unique" in ClassifyHead.check_options({"labels": ["a", "a"]})
    with pytest.raises(RowError, match="labels is empty"):
        run({}, "text", {})


def test_over_long_text_is_prompt_too_long(tokenizer):  # counted by the real tokenizer
    with pytest.raises(RowError) as e:
        asyncio.run(ClassifyHead({"labels": ["a", "b"]}).run({"text": "x" * 400},
                                                             FakeEngine(tokenizer=tokenizer, max_model_len=50)))
    assert e.value.error_type == "prompt_too_long"


def classify_batch(head, texts, engine):
    """The head on a batch of rows at once, as the worker runs them: a result or a RowError each."""
    async def batch():
        return await asyncio.gather(*(head.run({"text": t}, engine) for t in texts), return_exceptions=True)
    return asyncio.run(batch())


def test_an_over_long_row_is_one_error_row_and_the_others_are_labeled(tokenizer):
    """A row over task.options.max_chars (default 4,000,000) is refused before it is rendered
    or tokenized, with the limit and the fix; a row that cannot fit the context is refused
    without tokenizing it; the other rows of the batch get their labels."""
    eng = FakeEngine(tokenizer=tokenizer, max_model_len=131_072, scores={"pos": -0.1})
    head = ClassifyHead({"labels": ["pos", "neg"]})
    first, huge, last = classify_batch(head, ["Great product!", "word " * 1_000_000, "Works well."], eng)
    assert first["label"] == last["label"] == "pos"
    assert isinstance(huge, RowError) and huge.error_type == "invalid_input"
    assert huge.message == ("the row's text ('text') has 5,000,000 characters, more than task.options.max_chars "
                            "4,000,000; shorten or split it, or raise task.options.max_chars")
    assert eng.tokenized < 1_000  # the huge row was never rendered nor tokenized

    small = ClassifyHead({"labels": ["pos", "neg"], "max_chars": 100, "multi_label": True})
    ok, over = classify_batch(small, ["fine", "x" * 101], eng)
    assert len(ok["label_probs"]) == 2 and isinstance(over, RowError) and "max_chars 100" in over.message

    eng = FakeEngine(tokenizer=tokenizer, max_model_len=1_024)
    ok, too_long = classify_batch(head, ["fine", "word " * 200_000], eng)
    assert ok["label"] in ("pos", "neg") and too_long.error_type == "prompt_too_long"
    assert "more than model.max_model_len 1024 tokens can hold" in too_long.message
    assert eng.tokenized < 1_000


class CheckpointEngine(FakeQaEngine):
    """A classification checkpoint's pooling engine: two classes, the same answer for every row."""

    id2label = {0: "neg", 1: "pos"}

    async def classify(self, prompt_token_ids):
        return [0.2, 0.8]

    async def classify_tokens(self, prompt_token_ids):
        return [[0.9, 0.1]] * len(prompt_token_ids)


@pytest.mark.parametrize("kind", ["SequenceClassifyHead", "TokenClassifyHead"])
def test_a_classification_checkpoint_refuses_an_over_long_row_alone(tokenizer, kind):
    from pipeline.heads import checkpoint_classify

    head = getattr(checkpoint_classify, kind)({"max_chars": 1_000})
    eng = CheckpointEngine(tokenizer=tokenizer, max_model_len=32_768)
    ok, over = classify_batch(head, ["A fine text.", "word " * 201], eng)
    assert ok["prompt_tokens"] == len(tokenizer.encode("A fine text."))
    assert isinstance(over, RowError) and over.error_type == "invalid_input"
    assert "('text') has 1,005 characters, more than task.options.max_chars 1,000" in over.message
    assert eng.tokenized == len("A fine text.")


def test_entities_follow_bio_labels_and_character_offsets():
    from pipeline.heads.checkpoint_classify import entities

    text = "Ada Lovelace met Charles in London"
    offsets = [(0, 3), (3, 12), (12, 16), (16, 24), (24, 27), (27, 34)]
    labels = ["B-PER", "I-PER", "O", "B-PER", "O", "B-LOC"]
    assert entities(text, labels, offsets) == [
        {"label": "PER", "start": 0, "end": 12, "text": "Ada Lovelace"},
        {"label": "PER", "start": 17, "end": 24, "text": "Charles"},
        {"label": "LOC", "start": 28, "end": 34, "text": "London"},
    ]
    assert entities(text, ["O"] * 6, offsets) == []


def test_classify_runs_the_checkpoints_own_head_on_a_classification_checkpoint(tmp_path):
    """task.head classify on a *ForSequenceClassification / *ForTokenClassification checkpoint
    is that checkpoint's own head (pooling engine); on a causal Qwen3, label scoring."""
    import json

    from jobs import job_spec
    from pipeline.checkpoint import resolve
    from pipeline.heads.checkpoint_classify import SequenceClassifyHead, TokenClassifyHead

    kinds = {"Qwen3ForSequenceClassification": SequenceClassifyHead,
             "Qwen3ForTokenClassification": TokenClassifyHead, "Qwen3ForCausalLM": ClassifyHead}
    for arch, expected in kinds.items():
        model = tmp_path / arch
        model.mkdir()
        (model / "config.json").write_text(json.dumps({"architectures": [arch], "model_type": "qwen3"}))
        spec = job_spec(tmp_path, model=str(model), head="classify", task={"options": {"labels": ["a", "b"]}})
        assert type(resolve(spec).head) is expected, arch


def test_label_scoring_engine_shares_prompts_in_small_blocks_on_cpu(tmp_path):
    """The classify head's requests extend one prompt: on the CPU build (128-token blocks unless
    set) its engine gets 32-token blocks; the user's block_size wins; chat and a classification
    checkpoint's pooling engine keep vLLM's default; GPUs keep theirs (16)."""
    import json

    from jobs import job_spec
    from pipeline.checkpoint import resolve

    for arch in ("Qwen3ForCausalLM", "Qwen3ForSequenceClassification"):
        (tmp_path / arch).mkdir()
        (tmp_path / arch / "config.json").write_text(json.dumps({"architectures": [arch], "model_type": "qwen3"}))
    labels = {"options": {"labels": ["a", "b"]}}

    def block(arch, head="classify", device="cpu", **model):
        spec = job_spec(tmp_path, model={"source": str(tmp_path / arch), **model}, head=head,
                        task=labels if head == "classify" else {})
        return resolve(spec).engine_args(device).get("block_size")

    assert block("Qwen3ForCausalLM") == 32
    assert block("Qwen3ForCausalLM", engine_kwargs={"block_size": 64}) == 64
    assert block("Qwen3ForCausalLM", device="cuda") is None
    assert block("Qwen3ForCausalLM", head="chat") is None
    assert block("Qwen3ForSequenceClassification") is None


def test_trie_scoring_engine_normalizes_only_the_asked_for_tokens(tmp_path):
    """Label scoring by the trie (classify's default, rerank) gets the engine that computes the
    asked-for tokens' log-probabilities itself; per_label (prompt log-probabilities) and chat
    keep vLLM's own log-softmax."""
    import json

    from jobs import job_spec
    from pipeline.checkpoint import resolve
    from pipeline.engine.engine_args import TRIE_SCORING

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(
        json.dumps({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}))

    def args(head, **options):
        spec = job_spec(tmp_path, model={"source": str(tmp_path / "m")}, head=head,
                        task={"options": options} if options else {})
        return resolve(spec).engine_args("cpu")

    for trie in (args("classify", labels=["a", "b"]), args("rerank", query="q")):
        assert {k: trie[k] for k in TRIE_SCORING} == TRIE_SCORING
    for other in (args("classify", labels=["a", "b"], scoring="per_label"), args("chat")):
        assert not set(TRIE_SCORING) & set(other)
