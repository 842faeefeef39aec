"""The chat head on a scripted engine handle: inputs, errors, thinking, sampling precedence."""

import asyncio

import pytest

from pipeline.heads.base import Completion, RowError
from pipeline.heads.chat import ChatHead, split_reasoning


class ScriptedEngine:
    """Records what the head asks for; answers with a fixed text."""

    max_model_len = 64

    def __init__(self, text="hello", finish="stop"):
        self.text, self.finish, self.calls, self.rendered = text, finish, [], []

    def render_chat(self, messages, *, enable_thinking):
        self.rendered.append((messages, enable_thinking))
        return list(range(sum(len(m["content"].split()) + 3 for m in messages)))

    def tokenize(self, text):
        return list(range(len(text.split())))

    def decode(self, ids):
        return " ".join(map(str, ids))

    async def generate(self, prompt_token_ids, sampling):
        self.calls.append(sampling)
        return Completion(self.text, [1, 2], self.finish, len(prompt_token_ids), 2)


def run(head, row, engine=None):
    engine = engine or ScriptedEngine()
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
    eng = ScriptedEngine()
    with pytest.raises(RowError) as e:
        run(ChatHead(), {"prompt": "word " * 100}, eng)
    assert e.value.error_type == "prompt_too_long"
    assert "model.max_model_len is 64" in e.value.message
    assert eng.calls == []


def test_template_failure_is_a_template_error():
    class Broken(ScriptedEngine):
        def render_chat(self, messages, *, enable_thinking):
            raise ValueError("no template")

    with pytest.raises(RowError) as e:
        run(ChatHead(), {"prompt": "hi"}, Broken())
    assert e.value.error_type == "template_error" and "no template" in e.value.message


def test_sampling_precedence_head_defaults_then_spec_then_row():
    head = ChatHead({"max_tokens": 100}, sampling={"temperature": 0.1, "max_tokens": 50})
    _, eng = run(head, {"prompt": "hi", "sampling": '{"max_tokens": 7}'})
    s = eng.calls[0]
    assert s["max_tokens"] == 7 and s["temperature"] == 0.1
    assert s["top_k"] == 20 and s["top_p"] == 0.8  # Qwen3's non-thinking defaults


def test_thinking_mode_uses_thinking_defaults_and_splits_reasoning():
    eng = ScriptedEngine(text="<think>\nstep one\n</think>\n\nThe answer.")
    out, _ = run(ChatHead({"enable_thinking": True}), {"prompt": "q"}, eng)
    assert eng.rendered[0][1] is True
    assert eng.calls[0]["temperature"] == 0.6 and eng.calls[0]["top_p"] == 0.95
    assert out["reasoning"] == "step one" and out["response"] == "The answer."


def test_unfinished_thinking_has_no_answer():
    assert split_reasoning("<think>still going") == ("still going", "")
    assert split_reasoning("no tags at all</think>x") == ("no tags at all", "x")
