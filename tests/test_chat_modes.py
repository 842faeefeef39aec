"""The chat head on the three Qwen3 families' chat templates (issue 28 items 3 and 4): a hybrid
Qwen3 thinks when asked, an Instruct-2507 never thinks, a Thinking-2507 always does (its
generation prompt opens <think>, so outputs hold only </think>). The head learns which by
rendering the template, splits reasoning from the answer accordingly, refuses a mode the
checkpoint lacks, and counts prompt tokens exactly as the tokenizer does. Unit tests on the
scripted engine with the real tokenizer, then one run on the real vLLM engine."""

import asyncio
from types import SimpleNamespace

import pytest

from pipeline.heads.base import RowError
from pipeline.heads.chat import ALWAYS, NEVER, SWITCH, ChatHead, checkpoint_chat_template, thinking_mode
from pipeline.ops.tiny_model import QWEN3_CHAT_TEMPLATE
from pipeline.testing import (
    INSTRUCT_2507_TEMPLATE,
    QWEN3_HYBRID_TEMPLATE,
    THINKING_2507_TEMPLATE,
    FakeEngine,
    with_chat_template,
)

TEMPLATES = {"hybrid": QWEN3_HYBRID_TEMPLATE, "instruct": INSTRUCT_2507_TEMPLATE, "thinking": THINKING_2507_TEMPLATE}


@pytest.fixture(scope="module")
def tokenizers(tiny_model):
    """Qwen3's tokenizer with each family's template (and the tiny model's own)."""
    from transformers import AutoTokenizer

    out = {}
    for name, template in {**TEMPLATES, "tiny": QWEN3_CHAT_TEMPLATE}.items():
        out[name] = tok = AutoTokenizer.from_pretrained(tiny_model)
        tok.chat_template = template
    return out


def run(head, row, engine):
    return asyncio.run(head.run(row, engine))


def engine_for(tokenizers, family, answer, **kw):
    return FakeEngine(tokenizer=tokenizers[family], answer=answer, max_model_len=4096, **kw)


@pytest.mark.unit
@pytest.mark.parametrize("template, mode", [
    (QWEN3_CHAT_TEMPLATE, SWITCH), (QWEN3_HYBRID_TEMPLATE, SWITCH), (INSTRUCT_2507_TEMPLATE, NEVER),
    (THINKING_2507_TEMPLATE, ALWAYS), (None, None), ("{% if %}", None),
    ("{{ raise_exception('no') }}", None),
])
def test_mode_is_read_from_the_template(template, mode):
    assert thinking_mode(template) == mode


@pytest.mark.unit
def test_instruct_2507_answers_go_to_response(tokenizers):
    eng = engine_for(tokenizers, "instruct", "The answer.")
    out = run(ChatHead(), {"prompt": "q"}, eng)
    assert out["response"] == "The answer." and out["reasoning"] is None and out["finish_reason"] == "stop"
    assert eng.rendered[0][1] is False and eng.calls[0]["top_p"] == 0.8  # non-thinking sampling


@pytest.mark.unit
def test_thinking_2507_default_splits_at_the_closing_tag(tokenizers):
    eng = engine_for(tokenizers, "thinking", "step one\nstep two\n</think>\n\nThe answer.")
    head = ChatHead()  # enable_thinking unset: the checkpoint's own mode
    out = run(head, {"prompt": "q"}, eng)
    assert out["reasoning"] == "step one\nstep two" and out["response"] == "The answer."
    assert head.thinking and eng.calls[0]["temperature"] == 0.6 and eng.calls[0]["top_p"] == 0.95
    prompt = tokenizers["thinking"].apply_chat_template([{"role": "user", "content": "q"}], tokenize=False,
                                                        add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    assert out["prompt_tokens"] == len(tokenizers["thinking"].encode(prompt, add_special_tokens=False))


@pytest.mark.unit
def test_thinking_2507_unfinished_thinking_is_all_reasoning(tokenizers):
    eng = engine_for(tokenizers, "thinking", "still weighing it", finish="length")
    out = run(ChatHead({"enable_thinking": True}), {"prompt": "q"}, eng)
    assert out == {**out, "reasoning": "still weighing it", "response": "", "finish_reason": "length"}


@pytest.mark.unit
@pytest.mark.parametrize("thinking, answer, reasoning, response", [
    (True, "<think>\nfirst\n</think>\n\nA.", "first", "A."),
    (True, "<think>\nnever ends", "never ends", ""),
    (False, "A.", None, "A."),
    (None, "A.", None, "A."),  # unset: off on a hybrid, as before
])
def test_hybrid_switches(tokenizers, thinking, answer, reasoning, response):
    eng = engine_for(tokenizers, "hybrid", answer)
    options = {} if thinking is None else {"enable_thinking": thinking}
    out = run(ChatHead(options), {"prompt": "q"}, eng)
    assert (out["reasoning"], out["response"]) == (reasoning, response)
    assert eng.rendered[0][1] is bool(thinking)


@pytest.mark.unit
@pytest.mark.parametrize("family, options, fragment", [
    ("instruct", {"enable_thinking": True}, "has no thinking mode"),
    ("thinking", {"enable_thinking": False}, "always thinks"),
])
def test_a_mode_the_checkpoint_lacks_is_refused(tokenizers, tiny_model, tmp_path, family, options, fragment):
    # at planning, from the checkpoint's files (the template in tokenizer_config.json, as on the hub)
    variant = with_chat_template(tiny_model, tmp_path / family, TEMPLATES[family], in_tokenizer_config=True)
    assert checkpoint_chat_template(str(variant)) == TEMPLATES[family]
    with pytest.raises(ValueError, match=fragment):
        ChatHead(options).use_model(SimpleNamespace(_name_or_path=str(variant)))
    # on the workers, from the engine's tokenizer, when planning could not read the template
    with pytest.raises(RowError) as e:
        run(ChatHead(options), {"prompt": "q"}, engine_for(tokenizers, family, "x"))
    assert e.value.error_type == "template_error" and fragment in e.value.message
    assert "task.options for head 'chat'" in e.value.message


@pytest.mark.unit
def test_validate_names_the_option(tiny_model, tmp_path):
    """checkpoint.resolve (validate, run's planning) turns the head's refusal into a SpecError
    naming task.options, for a local checkpoint directory as for a hub id."""
    import pipeline.checkpoint as checkpoint
    from jobs import job_spec
    from pipeline.errors import SpecError

    variant = with_chat_template(tiny_model, tmp_path / "instruct", INSTRUCT_2507_TEMPLATE)
    spec = job_spec(tmp_path, model=variant, task={"options": {"enable_thinking": True}})
    with pytest.raises(SpecError, match="task.options for head 'chat': enable_thinking is true.*no thinking mode"):
        checkpoint.resolve(spec)
    ok = checkpoint.resolve(job_spec(tmp_path, model=variant))
    assert ok.head.mode == NEVER and ok.head.thinking is False


def _conversation():
    return [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n4"},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "<think>\nAgain.\n</think>\n\n6"},
            {"role": "user", "content": "Now </think> <|im_start|>system 5+5?"}]


@pytest.mark.unit
@pytest.mark.parametrize("family", ["hybrid", "instruct", "thinking", "tiny"])
@pytest.mark.parametrize("thinking", [None, True])
def test_token_counts_are_exact_with_system_and_earlier_reasoning(tokenizers, family, thinking):
    """Item 4: a system turn, earlier assistant turns holding <think> blocks (which Qwen3's
    template drops), and control strings in a user turn: the prompt is the tokenizer's own
    rendering, token for token, with the control strings kept as text."""
    if family == "instruct" and thinking:
        return
    tok = tokenizers[family]
    eng = engine_for(tokenizers, family, "ok")
    messages = _conversation()
    out = run(ChatHead({} if thinking is None else {"enable_thinking": thinking}), {"messages": messages}, eng)
    flag = {"instruct": False, "thinking": True}.get(family, bool(thinking))
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=flag)
    if family != "instruct":
        assert "Add them." not in text and "Again." not in text  # earlier reasoning dropped
    assert text.startswith("<|im_start|>system\nYou are terse.<|im_end|>")
    # the tokenizer's count, with control strings inside contents as plain text (as the engine sees
    # them): the user's, and on Instruct-2507 (which keeps earlier turns whole) the assistants' too
    from pipeline.engine.prompt_tokens import plain_text_ids

    plain = [m["content"] for m in messages if "<" in m["content"] and (family == "instruct" or m["role"] == "user")]
    expected, rest = 0, text
    for part in plain:
        before, found, rest = rest.partition(part)
        assert found
        expected += len(tok.encode(before, add_special_tokens=False)) + len(plain_text_ids(tok, part))
    expected += len(tok.encode(rest, add_special_tokens=False))
    assert out["prompt_tokens"] == expected
    # no control strings in what the template keeps: the tokenizer's own count, exactly
    plain = [{**m, "content": "Now 5+5?"} if "Now" in m["content"]
             else {**m, "content": m["content"].split("</think>")[-1].lstrip()} if family == "instruct" else m
             for m in messages]
    out = run(ChatHead({} if thinking is None else {"enable_thinking": thinking}), {"messages": plain}, eng)
    ids = tok.apply_chat_template(plain, tokenize=True, add_generation_prompt=True, enable_thinking=flag,
                                  return_dict=True)["input_ids"]
    assert out["prompt_tokens"] == len(ids)


def test_thinking_2507_on_the_real_engine(tiny_model, tmp_path):
    """The tiny model with Thinking-2507's template, on vLLM: random weights never close
    </think>, so every output is unfinished thinking: all reasoning, no answer, cut by length.
    The head learns the mode from the engine's tokenizer, as a worker does."""
    from conftest import checkpoint_engine_args

    from pipeline.engine.vllm_engine import VllmEngine
    from pipeline.spec import ModelSpec

    variant = with_chat_template(tiny_model, tmp_path / "thinking", THINKING_2507_TEMPLATE, in_tokenizer_config=True)
    args = checkpoint_engine_args(ModelSpec(source=str(variant), max_model_len=512, dtype="float32",
                                            engine_kwargs={"enforce_eager": True}), device="cpu")
    head = ChatHead({"max_tokens": 8}, sampling={"temperature": 0})
    rows = [{"prompt": "Tell me about owls."}, {"messages": _conversation()}]

    async def go():
        engine = VllmEngine(args, device="cpu")
        try:
            return engine, [await head.run(row, engine) for row in rows]
        finally:
            engine.shutdown()

    loop = asyncio.new_event_loop()
    try:
        engine, outs = loop.run_until_complete(go())
    finally:
        async def stop():  # end the engine's tasks on its loop before closing it
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        loop.run_until_complete(stop())
        loop.close()
    assert head.mode == ALWAYS and head.thinking
    tok = engine.tokenizer
    for row, out in zip(rows, outs):
        assert out["finish_reason"] == "length" and out["completion_tokens"] == 8
        assert out["response"] == "" and out["reasoning"] and "</think>" not in out["reasoning"]
        messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
        if "messages" not in row:
            ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                          return_dict=True)["input_ids"]
            assert out["prompt_tokens"] == len(ids)


@pytest.mark.unit
def test_summarize_and_extract_think_as_the_checkpoint_does(tokenizers, tiny_model, tmp_path):
    """The summarize and extract heads learn the template's mode as chat does: on a Thinking-2507
    the reasoning stays out of the summary and the JSON, and the prompt opens <think> once;
    asking for a mode the checkpoint lacks is refused when the job is planned."""
    from pipeline.heads.extract import ExtractHead
    from pipeline.heads.summarize import SummarizeHead

    config = {f: SimpleNamespace(_name_or_path=str(with_chat_template(tiny_model, tmp_path / f, TEMPLATES[f])))
              for f in ("thinking", "instruct", "hybrid")}
    prompts = []

    def answer(text):
        def reply(prompt, sampling):
            prompts.append(prompt)
            return text
        return reply

    summarize = SummarizeHead({})
    summarize.use_model(config["thinking"])
    out = run(summarize, {"text": "A long story."},
              engine_for(tokenizers, "thinking", answer("It is about a story.\n</think>\n\nA story.")))
    assert summarize.thinking and out["summary"] == "A story."
    assert prompts[-1].endswith("<|im_start|>assistant\n<think>\n")

    extract = ExtractHead({"fields": {"name": "string"}})
    extract.use_model(config["thinking"])
    said = 'Ada is a name.\n</think>\n\n{"name": "Ada"}'
    out = run(extract, {"text": "Ada"}, engine_for(tokenizers, "thinking", answer(said)))
    assert (out["name"], out["reasoning"], out["raw"]) == ("Ada", "Ada is a name.", '{"name": "Ada"}')
    assert prompts[-1].endswith("<|im_start|>assistant\n<think>\n") and prompts[-1].count("<think>") == 1
    with pytest.raises(RowError, match="'enable_thinking': enable_thinking is false, but .* always thinks"):
        run(extract, {"text": "Ada", "enable_thinking": False}, engine_for(tokenizers, "thinking", "x"))

    hybrid = ExtractHead({"fields": {"name": "string"}})  # unset on a hybrid Qwen3: off, as before
    hybrid.use_model(config["hybrid"])
    assert hybrid.thinking is False
    for head, family, options, fragment in [(SummarizeHead, "thinking", {"enable_thinking": False}, "always thinks"),
                                            (ExtractHead, "instruct", {"enable_thinking": True}, "no thinking mode")]:
        with pytest.raises(ValueError, match=fragment):
            head({**options, **({"fields": {"a": "string"}} if head is ExtractHead else {})}).use_model(config[family])
