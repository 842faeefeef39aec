"""The embedded model: Qwen3's exact token ids and a chat template that behaves like Qwen3's."""

import json


def test_token_ids_are_qwen3s(tokenizer):
    assert tokenizer("Hello world")["input_ids"] == [9707, 1879]
    ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"])
    assert ids == [151643, 151644, 151645, 151667, 151668]


def test_special_strings_in_text_are_single_tokens_and_round_trip(tokenizer):
    text = "a <|im_start|> b 你好 🙂"
    ids = tokenizer(text)["input_ids"]
    assert 151644 in ids
    assert tokenizer.decode(ids) == text


def test_chat_template_thinking_switch(tokenizer):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    off = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    on = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert on == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    assert off == on + "<think>\n\n</think>\n\n"


def test_earlier_reasoning_is_stripped(tokenizer):
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>\nx\n</think>\n\nA"},
            {"role": "user", "content": "Q2"}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert "<|im_start|>assistant\nA<|im_end|>" in text and "<think>" not in text


def test_checkpoint_is_deterministic_qwen3(tiny_model, tmp_path):
    import hashlib

    from pipeline.ops.tiny_model import make_tiny_model

    cfg = json.loads((tiny_model / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["model_type"] == "qwen3"
    assert cfg["vocab_size"] == 151936 and cfg["head_dim"] == 64
    again = make_tiny_model(tmp_path / "again")
    def digest(p):
        return hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest()

    assert digest(again) == digest(tiny_model)
