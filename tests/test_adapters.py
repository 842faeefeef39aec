"""LoRA adapters (issue 28 item 6): model.adapters {name: path} served by every replica, a row
picking one by name in model.adapter_column. Spec and engine arguments as units; one job on the
real vLLM CPU engine mixing two adapters, base rows and an unknown name. Oracle: transformers'
greedy generation on the base weights, and on the base weights merged with each adapter."""

import pyarrow as pa
import pytest
from conftest import checkpoint_engine_args, read_dir, run_on_local_ray, write_shards

from pipeline.engine.adapters import ENGINE_KEY, row_adapter
from pipeline.spec import ModelSpec, SpecError
from pipeline.testing import make_tiny_lora, merge_lora

MAX_TOKENS = 10
SCHEMA = pa.schema([("id", pa.int64()), ("prompt", pa.string()), ("adapter", pa.string())])


@pytest.fixture(scope="module")
def loras(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loras")
    return {"support": make_tiny_lora(tiny_model, tmp / "support", rank=8, seed=1),
            "legal": make_tiny_lora(tiny_model, tmp / "legal", rank=12, seed=2)}


@pytest.mark.unit
def test_engine_args_serve_every_adapter(tiny_model, loras):
    adapters = {k: str(v) for k, v in loras.items()}
    args = checkpoint_engine_args(ModelSpec(source=str(tiny_model), adapters=adapters), device="cpu")
    assert args["enable_lora"] is True and args["max_lora_rank"] == 16  # rank 12 needs vLLM's 16
    assert (args["max_loras"], args["max_cpu_loras"], args[ENGINE_KEY]) == (3, 3, adapters)  # 2 + the zero one
    gpu = checkpoint_engine_args(ModelSpec(source=str(tiny_model), adapters=adapters), device="cuda")
    assert (gpu["max_loras"], gpu["max_cpu_loras"]) == (2, 2)  # GPUs need no zero adapter for base rows
    plain = checkpoint_engine_args(ModelSpec(source=str(tiny_model)), device="cpu")
    assert "enable_lora" not in plain and ENGINE_KEY not in plain


@pytest.mark.unit
def test_a_missing_or_foreign_adapter_is_refused_at_validate(tiny_model, tmp_path):
    with pytest.raises(SpecError, match=r"model.adapters.x: .* is neither a local adapter directory"):
        checkpoint_engine_args(ModelSpec(source=str(tiny_model), adapters={"x": str(tmp_path / "nope/nope")}),
                               device="cpu")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    with pytest.raises(SpecError, match="model.adapters.y: .* is not a LoRA adapter's config"):
        checkpoint_engine_args(ModelSpec(source=str(tiny_model), adapters={"y": str(tmp_path / "odd")}),
                               device="cpu")
    with pytest.raises(Exception, match="non-empty name and path"):
        ModelSpec(source="m", adapters={"": "p"})


@pytest.mark.unit
def test_a_rows_adapter_name():
    names = ("support", "legal")
    assert row_adapter({"adapter": "legal"}, "adapter", names) == "legal"
    assert row_adapter({"adapter": None}, "adapter", names) is None
    assert row_adapter({"adapter": ""}, "adapter", names) is None and row_adapter({}, "adapter", names) is None
    with pytest.raises(ValueError, match=r"names adapter 'sales', which is not one of model.adapters "
                                         r"\(legal, support\); use one of those names"):
        row_adapter({"adapter": "sales"}, "adapter", names)


PROMPTS = ["Tell me about owls.", "Name a river.", "What is tea?", "Jazz?"]
# every prompt under each adapter and the base, one row each, and a name that is not served
ROWS = [{"id": i * 3 + j, "prompt": p, "adapter": a}
        for i, p in enumerate(PROMPTS) for j, a in enumerate(["support", None, "legal"])]
ROWS.append({"id": 99, "prompt": "Hi", "adapter": "sales"})


@pytest.fixture(scope="module")
def job(tiny_model, loras, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapter-job")
    write_shards(tmp / "in", [ROWS[:7], ROWS[7:]], SCHEMA)
    data = {"input": {"path": str(tmp / "in")}, "output": {"path": str(tmp / "out")},
            "model": {"source": str(tiny_model), "max_model_len": 256, "dtype": "float32",
                      "engine_kwargs": {"enforce_eager": True},
                      "adapters": {k: str(v) for k, v in loras.items()}},
            "task": {"head": "chat"}, "sampling": {"temperature": 0, "max_tokens": MAX_TOKENS}}
    return tmp, run_on_local_ray(data)


def test_each_row_runs_on_its_adapter_as_transformers_does_on_the_merged_weights(job, tiny_model, loras, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    tmp, report = job
    assert report.exit_code == 0 and (report.rows, report.results, report.errors) == (len(ROWS), len(ROWS) - 1, 1)
    [error] = read_dir(tmp / "out" / "errors").to_pylist()
    assert error["id"] == 99 and error["error_type"] == "invalid_input"
    assert "names adapter 'sales', which is not one of model.adapters (legal, support)" in error["error_message"]
    results = {r["id"]: r for r in read_dir(tmp / "out" / "results").to_pylist()}
    models = {None: AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()}
    for name, path in loras.items():
        models[name] = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
        merge_lora(models[name], path)
    texts = {}
    for row in ROWS[:-1]:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True,
                                            enable_thinking=False, return_tensors="pt", return_dict=True)["input_ids"]
        out = models[row["adapter"]].generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)[0, ids.shape[1]:]
        got = results[row["id"]]
        assert got["completion_tokens"] == len(out), row
        assert got["response"] == tokenizer.decode(out, skip_special_tokens=True), row
        texts[row["prompt"], row["adapter"]] = got["response"]
    for p in PROMPTS:  # the adapters change the answers: the oracle is not the base model thrice
        assert len({texts[p, None], texts[p, "support"], texts[p, "legal"]}) == 3, p


@pytest.mark.unit
def test_the_cpu_builds_lora_kernel_still_gives_adapterless_rows_the_last_slot():
    """Why base rows run on a zero adapter on CPU (pipeline.engine.adapters.zero_adapter): vLLM's
    torch kernel reads slot -1 (the last adapter) for a token without an adapter. When this
    fails, vLLM fixed it: drop the zero adapter."""
    import torch
    from vllm.lora.ops.torch_ops import bgmv_shrink

    x = torch.ones(2, 4)
    slots = torch.stack([torch.full((1, 2, 4), 1.0), torch.full((1, 2, 4), 2.0)])  # two adapters' lora_A
    out = torch.zeros(2, 2)
    bgmv_shrink(x, slots, out, torch.tensor([0, -1]))  # token 1 has no adapter (-1)
    assert out.tolist() == [[4.0, 4.0], [8.0, 8.0]]  # yet it got the last slot's update, not zero


def test_an_openai_batch_picks_adapters_by_body_model(job, tiny_model, loras, tmp_path):
    """run-batch --lora-modules: body.model names an adapter or the served model; each answer is
    the one the chat job above gave the same prompt on the same weights (checked against
    transformers there), and names the model it ran on. A model not served is a 404 line."""
    import json

    from conftest import run_cli

    from pipeline.ops.openai_format import CHAT_URL

    tmp, _ = job
    answers = {x["id"]: x["response"] for x in read_dir(tmp / "out" / "results").to_pylist()}
    expected = {(r["prompt"], r["adapter"]): answers[r["id"]] for r in ROWS[:-1]}
    names = {"support": "support", None: "tiny-qwen3", "legal": "legal"}
    requests = [{"custom_id": f"{i}-{a}", "method": "POST", "url": CHAT_URL,
                 "body": {"model": names[a], "messages": [{"role": "user", "content": p}], "temperature": 0,
                          "max_tokens": MAX_TOKENS}}
                for i, p in enumerate(PROMPTS) for a in names]
    requests.append({"custom_id": "sales", "method": "POST", "url": CHAT_URL,
                     "body": {"model": "sales", "messages": [{"role": "user", "content": "Hi"}]}})
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    done = run_cli("run-batch", "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"),
                   "--model", str(tiny_model), "--served-model-name", "tiny-qwen3", "--max-model-len", "256",
                   "--dtype", "float32", "--lora-modules", *(f"{k}={v}" for k, v in loras.items()),
                   "--set", "model.engine_kwargs.enforce_eager=true", "--no-progress")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = {x["custom_id"]: x for x in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    assert len(lines) == len(requests)
    for i, p in enumerate(PROMPTS):
        for adapter, model in names.items():
            body = lines[f"{i}-{adapter}"]["response"]["body"]
            assert body["model"] == model and body["choices"][0]["message"]["content"] == expected[p, adapter]
    sales = lines["sales"]
    assert sales["response"]["status_code"] == 404 and sales["error"]["code"] == "model_not_found"
    assert "body.model 'sales' is not served by this batch: use 'tiny-qwen3' (the base model) or an adapter: " \
           "legal, support" in sales["error"]["message"]
