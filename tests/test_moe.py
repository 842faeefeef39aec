"""Qwen3's mixture-of-experts checkpoints (Qwen3-30B-A3B, Qwen3-235B-A22B) through the pipeline:
a tiny random Qwen3MoeForCausalLM laid out as Qwen3-30B-A3B ships (8 experts, top-2), on a local
Ray and the real vLLM CPU engine. Oracle: transformers' greedy generation on the same float32
weights and the same prompt token ids."""

from __future__ import annotations

import json

import pytest
from conftest import local_ray, read_dir, vllm_processes, write_shards

import pipeline

TOPICS = ["rivers", "prime numbers", "jazz", "glaciers", "compilers", "tea", "owls", "bridges"]
LABELS = ["positive", "negative", "neutral"]
MODEL = {"max_model_len": 512, "dtype": "float32", "engine_kwargs": {"enforce_eager": True}}


@pytest.fixture(scope="module")
def tokenizer(moe_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(moe_model)


@pytest.fixture(scope="module")
def ray_up():
    yield from local_ray()


def job(tmp, model, head, **sections) -> dict:
    data = {"input": {"path": str(tmp / "in")}, "output": {"path": str(tmp / "out")},
            "model": {"source": str(model), **MODEL}, "task": {"head": head}}
    return {**data, **sections}


@pytest.mark.unit
def test_the_tiny_moe_is_laid_out_as_qwen3_30b_a3b(moe_model, tokenizer):
    from safetensors import safe_open

    from pipeline.ops.tiny_model import QWEN3_CHAT_TEMPLATE

    cfg = json.loads((moe_model / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"] and cfg["model_type"] == "qwen3_moe"
    assert {k: cfg[k] for k in ("num_experts", "num_experts_per_tok", "decoder_sparse_step", "mlp_only_layers",
                                "norm_topk_prob", "output_router_logits", "tie_word_embeddings")} == {
        "num_experts": 8, "num_experts_per_tok": 2, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "norm_topk_prob": True, "output_router_logits": False, "tie_word_embeddings": False}
    assert cfg["moe_intermediate_size"] > 0 and cfg["router_aux_loss_coef"] > 0 and cfg["num_hidden_layers"] == 2
    assert "num_local_experts" not in cfg  # the name Qwen3-30B-A3B's config.json uses
    with safe_open(moe_model / "model.safetensors", "pt") as f:
        names = set(f.keys())
    experts = {f"model.layers.{n}.mlp.experts.{e}.{p}_proj.weight"
               for n in range(2) for e in range(8) for p in ("gate", "up", "down")}
    assert experts <= names and {"model.layers.1.mlp.gate.weight", "lm_head.weight"} <= names
    assert not any("shared_expert" in n or n.endswith("mlp.gate_proj.weight") for n in names)  # no dense MLP
    # the same tokenizer and chat template as the dense tiny model: Qwen3's
    assert (moe_model / "chat_template.jinja").read_text() == QWEN3_CHAT_TEMPLATE
    assert tokenizer("Hello world")["input_ids"] == [9707, 1879] and tokenizer.eos_token_id == 151645
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<think>", "</think>"]) == [151643, 151667, 151668]


@pytest.mark.unit
def test_every_generative_head_resolves_on_a_moe_checkpoint(moe_model, tmp_path):
    from jobs import job_spec
    from pipeline.checkpoint import resolve
    from pipeline.heads.chat import ChatHead
    from pipeline.heads.classify import ClassifyHead
    from pipeline.heads.extract import ExtractHead
    from pipeline.heads.summarize import SummarizeHead

    heads = {"chat": ({}, ChatHead), "summarize": ({}, SummarizeHead),
             "classify": ({"labels": LABELS}, ClassifyHead), "extract": ({"fields": {"topic": "string"}}, ExtractHead)}
    for head, (options, cls) in heads.items():
        checkpoint = resolve(job_spec(tmp_path, model=str(moe_model), head=head, task={"options": options}))
        assert checkpoint.kind == "moe" and type(checkpoint.head) is cls, head
        assert "task" not in checkpoint.engine_args("cpu") or checkpoint.engine_args("cpu")["task"] == "generate"


def chat_rows():
    rows = [{"id": i, "prompt": f"Tell me about {TOPICS[(i * 3) % 8]} and {TOPICS[i % 8]}."} for i in range(12)]
    rows[5]["prompt"] = " "  # an error row: one row out per row in all the same
    return rows


@pytest.fixture(scope="module")
def chat_job(moe_model, ray_up, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moe-chat")
    rows = chat_rows()
    write_shards(tmp / "in", [rows[:7], rows[7:]])
    report = pipeline.run(job(tmp, moe_model, "chat", sampling={"temperature": 0, "max_tokens": 12}), progress=False)
    return tmp, rows, report, vllm_processes()


def test_chat_job_on_moe_gives_one_row_per_input_row_and_leaves_no_engine(chat_job):
    tmp, rows, report, left = chat_job
    assert report.exit_code == 0 and (report.rows, report.results, report.errors) == (12, 11, 1)
    results, errors = read_dir(tmp / "out" / "results"), read_dir(tmp / "out" / "errors")
    assert sorted(results.column("id").to_pylist() + errors.column("id").to_pylist()) == [r["id"] for r in rows]
    assert errors.column("error_type").to_pylist() == ["invalid_input"]
    assert len(set(results.column("response").to_pylist())) > 5  # random weights, yet not one text repeated
    assert left == [], "vLLM processes outlived the MoE chat job"


def test_moe_greedy_output_matches_transformers(chat_job, moe_model, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    tmp, rows, _, _ = chat_job
    results = {r["id"]: r for r in read_dir(tmp / "out" / "results").to_pylist()}
    model = AutoModelForCausalLM.from_pretrained(moe_model, dtype=torch.float32).eval()
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    for rid in (0, 3, 8, 11):
        msgs = [{"role": "user", "content": rows[rid]["prompt"]}]
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        assert results[rid]["prompt_tokens"] == ids.shape[1]
        out = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
        assert results[rid]["completion_tokens"] == len(out), rid
        assert results[rid]["response"] == tokenizer.decode(out, skip_special_tokens=True), rid


def test_classify_job_on_moe(moe_model, ray_up, tmp_path):
    texts = ["I loved every minute of this film.", "Terrible service, never again.", "It arrived on Tuesday.",
             "Très bien 很好 🙂", ""]
    write_shards(tmp_path / "in", [[{"id": i, "text": t} for i, t in enumerate(texts)]])
    spec = job(tmp_path, moe_model, "classify", task={"head": "classify", "options": {"labels": LABELS}})
    report = pipeline.run(spec, progress=False)
    assert report.exit_code == 0 and (report.rows, report.results, report.errors) == (5, 4, 1)
    results = read_dir(tmp_path / "out" / "results").to_pylist()
    assert sorted(r["id"] for r in results) == [0, 1, 2, 3]
    for r in results:
        assert r["label"] in LABELS and abs(sum(d["prob"] for d in r["label_probs"]) - 1) < 1e-6
    assert read_dir(tmp_path / "out" / "errors").column("id").to_pylist() == [4]
    assert vllm_processes() == [], "vLLM processes outlived the MoE classify job"
