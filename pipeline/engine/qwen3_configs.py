"""The config.json fields that size the published Qwen3 checkpoints (written from their
Hugging Face configs, no download): the docs' sizing table and the sizing tests use them."""

from __future__ import annotations

_COMMON = {"vocab_size": 151936, "head_dim": 128, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
           "max_position_embeddings": 40960, "attention_bias": False}

QWEN3 = {
    "Qwen/Qwen3-8B": {**_COMMON, "architectures": ["Qwen3ForCausalLM"], "hidden_size": 4096,
                      "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
                      "intermediate_size": 12288},
    "Qwen/Qwen3-32B": {**_COMMON, "architectures": ["Qwen3ForCausalLM"], "hidden_size": 5120,
                       "num_hidden_layers": 64, "num_attention_heads": 64, "num_key_value_heads": 8,
                       "intermediate_size": 25600},
    "Qwen/Qwen3-30B-A3B": {**_COMMON, "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 2048,
                           "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
                           "intermediate_size": 6144, "num_experts": 128, "num_experts_per_tok": 8,
                           "moe_intermediate_size": 768, "decoder_sparse_step": 1, "mlp_only_layers": []},
    "Qwen/Qwen3-235B-A22B": {**_COMMON, "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 4096,
                             "num_hidden_layers": 94, "num_attention_heads": 64, "num_key_value_heads": 4,
                             "intermediate_size": 12288, "num_experts": 128, "num_experts_per_tok": 8,
                             "moe_intermediate_size": 1536, "decoder_sparse_step": 1, "mlp_only_layers": []},
}
