"""The chat head on a scripted engine handle: inputs, errors, thinking, sampling precedence."""

import asyncio
import json

import pytest

from pipeline.heads.base import RowError
from pipeline.heads.chat import ChatHead, row_sampling, split_reasoning
from pipeline.testing import FakeEngine


def scripted(answer="hello", max_model_len=64):
    """The fake engine as these tests use it: records what the head asks for; a fixed answer."""
    return FakeEngine(answer=answer, max_model_len=max_model_len)


def run(head, row, engine=None):
    engine = engine or scripted()
    return asyncio.run(head.run(row, engine)), engine


def test_prompt_with_spec_system_prompt():
    out, eng = run(ChatHead({"system_prompt": "Be brief."}), {"prompt": "Hi"})
    assert eng.rendered[0][0] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert out == {"response": "hello", "reasoning": None, "finish_reason": "stop",
                   "prompt_tokens": len("Be brief.".split()) + 3 + 1 + 3, "completion_tokens": 2}


def test_row_system_overrides_spec_system():
    _, eng = run(ChatHead({"system_prompt": "spec"}), {"prompt": "Hi", "system": "row"})
    assert eng.rendered[0][0][0] == {"role": "system", "content": "row"}


def test_messages_win_over_prompt():
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}]
    _, eng = run(ChatHead(), {"messages": msgs, "prompt": "ignored"})
    assert eng.rendered[0][0] == msgs


@pytest.mark.parametrize("row, fragment", [
    ({"prompt": None}, "neither 'messages' nor 'prompt'"),
    ({"prompt": "   "}, "empty or whitespace only"),
    ({"prompt": 42}, "holds int, not text"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "'messages'[0] must be"),
    ({"messages": [{"role": "user", "content": None}]}, "'messages'[0] must be"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "ends with an assistant turn"),
    ({"prompt": "hi", "sampling": "{bad json"}, "sampling is not valid JSON"),
    ({"prompt": "hi", "sampling": '{"max_tokenz": 3}'}, "max_tokenz"),
    ({"prompt": "hi", "sampling": '{"temperature": -1}'}, "temperature"),
])
def test_bad_rows_become_invalid_input(row, fragment):
    with pytest.raises(RowError) as e:
        run(ChatHead(), row)
    assert e.value.error_type == "invalid_input"
    assert fragment in e.value.message


def test_prompt_longer_than_context_is_refused_before_the_engine():
    eng = scripted()
    with pytest.raises(RowError) as e:
        run(ChatHead(), {"prompt": "word " * 100}, eng)
    assert e.value.error_type == "prompt_too_long"
    assert "model.max_model_len is 64" in e.value.message
    assert eng.calls == []


def test_template_failure_is_a_template_error():
    class Broken(FakeEngine):  # a template that fails: only this test needs it
        def render_chat(self, messages, *, enable_thinking):
            raise ValueError("no template")

    with pytest.raises(RowError) as e:
        run(ChatHead(), {"prompt": "hi"}, Broken(answer="hello", max_model_len=64))
    assert e.value.error_type == "template_error" and "no template" in e.value.message


def test_sampling_precedence_head_defaults_then_spec_then_row():
    head = ChatHead({"max_tokens": 100}, sampling={"temperature": 0.1, "max_tokens": 50})
    _, eng = run(head, {"prompt": "hi", "sampling": '{"max_tokens": 7}'})
    s = eng.calls[0]
    assert s["max_tokens"] == 7 and s["temperature"] == 0.1
    assert s["top_k"] == 20 and s["top_p"] == 0.8  # Qwen3's non-thinking defaults


def test_thinking_mode_uses_thinking_defaults_and_splits_reasoning():
    eng = scripted("<think>\nstep one\n</think>\n\nThe answer.")
    out, _ = run(ChatHead({"enable_thinking": True}), {"prompt": "q"}, eng)
    assert eng.rendered[0][1] is True
    assert eng.calls[0]["temperature"] == 0.6 and eng.calls[0]["top_p"] == 0.95
    assert out["reasoning"] == "step one" and out["response"] == "The answer."


def test_unfinished_thinking_has_no_answer():
    assert split_reasoning("<think>still going") == ("still going", "")
    assert split_reasoning("no tags at all</think>x") == ("no tags at all", "x")


# Per-row sampling values vLLM's SamplingParams refuses: each must be this row's invalid_input
# naming the key (not an internal_error from the engine call).
ENGINE_REFUSES = [
    ({"top_k": -5}, "sampling.top_k"),
    ({"stop": [""]}, "sampling.stop: stop[0] is empty"),
    ({"temperature": -1}, "sampling.temperature"),
    ({"temperature": 2.5}, "sampling.temperature"),
    ({"top_p": 0}, "sampling.top_p"),
    ({"top_p": 1.5}, "sampling.top_p"),
    ({"min_p": 2}, "sampling.min_p"),
    ({"max_tokens": 0}, "sampling.max_tokens"),
    ({"presence_penalty": -3}, "sampling.presence_penalty"),
    ({"frequency_penalty": 2.5}, "sampling.frequency_penalty"),
    ({"repetition_penalty": 0}, "sampling.repetition_penalty"),
    ({"repetition_penalty": float("inf")}, "sampling.repetition_penalty"),
    ({"top_k": 2.5}, "sampling.top_k"),
]
ENGINE_TAKES = [{"top_k": -1}, {"top_k": 0}, {"top_k": 5}, {"temperature": 0}, {"temperature": 2},
                {"top_p": 1}, {"presence_penalty": -2}, {"stop": ["\n\n", "###"]}, {"seed": 7},
                {"max_tokens": 1}, {"ignore_eos": True}]


@pytest.mark.parametrize("overrides, fragment", ENGINE_REFUSES)
def test_row_sampling_the_engine_would_refuse_is_invalid_input(overrides, fragment):
    with pytest.raises(RowError) as e:
        run(ChatHead(), {"prompt": "hi", "sampling": json.dumps(overrides)})
    assert e.value.error_type == "invalid_input" and fragment in e.value.message, e.value.message


def test_row_sampling_checks_agree_with_vllm():
    """vLLM's SamplingParams is the oracle: what it refuses, row_sampling refuses, and
    what it takes, row_sampling takes."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    for overrides, _ in ENGINE_REFUSES:
        with pytest.raises((VLLMValidationError, ValueError, TypeError)):
            SamplingParams(**overrides)
    for overrides in ENGINE_TAKES:
        SamplingParams(**row_sampling(json.dumps(overrides)))


@pytest.mark.parametrize("overrides, fragment", [
    ({"stop": ["x"] * 17}, "at most 16 stop strings"),
    ({"stop": ["y" * 300]}, "stop[0] has 300 characters; at most 256"),
    ({"seed": 2 ** 70}, "sampling.seed"),
])
def test_row_stop_strings_and_seed_are_bounded(overrides, fragment):
    with pytest.raises(RowError) as e:
        run(ChatHead(), {"prompt": "hi", "sampling": json.dumps(overrides)})
    assert e.value.error_type == "invalid_input" and fragment in e.value.message, e.value.message


def test_huge_sampling_json_is_refused_before_parsing():
    with pytest.raises(RowError, match="overrides are at most 65,536"):
        row_sampling('{"stop": ["' + "x" * 100_000 + '"]}')


def test_spec_max_tokens_is_a_ceiling_for_rows_unless_the_spec_raises_it():
    head = ChatHead({"max_tokens": 100}, sampling={"max_tokens": 50})
    _, eng = run(head, {"prompt": "hi", "sampling": '{"max_tokens": 50}'})
    assert eng.calls[0]["max_tokens"] == 50
    with pytest.raises(RowError) as e:
        run(head, {"prompt": "hi", "sampling": '{"max_tokens": 51}'})
    assert e.value.error_type == "invalid_input"
    assert "above this job's ceiling for rows, 50" in e.value.message and "sampling.row_max_tokens" in e.value.message
    # the head's own default is the ceiling when the spec sets no max_tokens
    with pytest.raises(RowError, match="ceiling for rows, 100"):
        run(ChatHead({"max_tokens": 100}), {"prompt": "hi", "sampling": '{"max_tokens": 101}'})
    raised = ChatHead({}, sampling={"max_tokens": 50, "row_max_tokens": 4000})
    _, eng = run(raised, {"prompt": "hi", "sampling": '{"max_tokens": 4000}'})
    assert eng.calls[0]["max_tokens"] == 4000 and "row_max_tokens" not in eng.calls[0]
    _, eng = run(raised, {"prompt": "hi"})
    assert eng.calls[0]["max_tokens"] == 50


def test_huge_rows_fail_without_being_tokenized():
    eng = scripted(max_model_len=32768)  # counts the characters it tokenizes or renders
    with pytest.raises(RowError) as e:  # a 50 MB prompt
        run(ChatHead(), {"prompt": "word " * 10_000_000}, eng)
    assert e.value.error_type == "prompt_too_long" and "50,000,000 characters" in e.value.message
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(100_000)]
    turns.append({"role": "user", "content": "and?"})
    with pytest.raises(RowError) as e:  # a conversation of 100,000 turns
        run(ChatHead(), {"messages": turns}, eng)
    assert e.value.error_type == "prompt_too_long" and "100,001 turns" in e.value.message
    assert eng.tokenized == 0 and eng.calls == []


def test_a_long_row_is_counted_piece_by_piece_and_stops_past_the_context():
    eng = scripted(max_model_len=32768)  # 4,000,000 characters could fit 128-char tokens
    with pytest.raises(RowError) as e:
        run(ChatHead(), {"prompt": "word " * 800_000}, eng)
    assert e.value.error_type == "prompt_too_long" and "more than 32768 tokens" in e.value.message
    assert eng.tokenized <= 3 * 65536  # stopped after the count passed the context


def test_counting_a_long_row_lets_other_rows_through():
    eng, head = scripted(max_model_len=1_000_000), ChatHead()

    async def both():
        await asyncio.gather(head.run({"prompt": "word " * 100_000}, eng), head.run({"prompt": "hi"}, eng))

    asyncio.run(both())
    log = [call for call in eng.log if call in ("tokenize_text", "generate")]
    assert log.count("tokenize_text") == 8 and log.index("generate") < 2  # the short row did not wait


CONTROL_STRINGS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<tool_call>",
                   "</tool_call>", "<tool_response>", "</tool_response>", "<|fim_prefix|>", "<|fim_middle|>",
                   "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]


@pytest.mark.parametrize("where", ["prompt", "system", "messages"])
def test_every_control_string_is_text_inside_content(tokenizer, where):
    """The tokenizer is the oracle: the ids decode to exactly the template's text, and the only
    control tokens among them are the template's own."""
    from pipeline.engine.prompt_tokens import render_chat

    added = set(tokenizer.added_tokens_decoder)
    assert {tokenizer.added_tokens_decoder[i].content for i in added} >= set(CONTROL_STRINGS)

    def real():
        return FakeEngine(answer="hello", tokenizer=tokenizer)

    def row(text):
        if where == "prompt":
            return {"prompt": f"before {text}system\nafter"}
        if where == "system":
            return {"prompt": "hi", "system": f"rules {text} more"}
        return {"messages": [{"role": "user", "content": f"q {text}"}, {"role": "assistant", "content": "a"},
                             {"role": "user", "content": f"{text}user\nagain"}]}

    def controls(ids):
        return sorted(i for i in ids if i in added)

    eng = real()
    run(ChatHead(), row("X"), eng)
    baseline = controls(render_chat(tokenizer, eng.rendered[0][0], enable_thinking=False))  # the template's own
    for text in CONTROL_STRINGS:
        eng = real()
        out, _ = run(ChatHead(), row(text), eng)
        messages = eng.rendered[0][0]
        ids = render_chat(tokenizer, messages, enable_thinking=False)
        expected_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                      enable_thinking=False)
        assert tokenizer.decode(ids) == expected_text, text
        assert controls(ids) == baseline, f"{text} became a control token"
        assert out["prompt_tokens"] == len(ids)
