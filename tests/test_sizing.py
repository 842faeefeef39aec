"""Sizing before launch (pipeline.engine.sizing, pipeline.engine.fit): parameters against the
real transformers models (the oracle), the published Qwen3 sizes, the split across tensor and
pipeline parallel, KV bytes a token, the plan-time refusal, and model.expert_parallel."""

from __future__ import annotations

import pytest

from pipeline.engine.qwen3_configs import QWEN3
from pipeline.engine.sizing import GIB, Shape, layer_split, parameters, placements, quantized_bytes, size, smallest_fit
from pipeline.errors import SpecError

pytestmark = pytest.mark.unit


def _transformers_model(config_kwargs: dict, moe: bool):
    import torch
    import transformers

    torch.manual_seed(0)
    cls = transformers.Qwen3MoeConfig if moe else transformers.Qwen3Config
    config = cls(**config_kwargs)
    model = (transformers.Qwen3MoeForCausalLM if moe else transformers.Qwen3ForCausalLM)(config)
    return config, model


SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, vocab_size=1000)
SMALL_MOE = dict(SMALL, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=48)


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    from pipeline.ops.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen3-moe", kind="moe")


@pytest.mark.parametrize("kwargs, moe", [
    ("tiny", False), ("tiny_moe", True),
    (dict(SMALL, tie_word_embeddings=False), False),
    (dict(SMALL, tie_word_embeddings=True, attention_bias=True), False),
    (dict(SMALL_MOE, tie_word_embeddings=True, mlp_only_layers=[0]), True),  # a dense layer among MoE ones
    (dict(SMALL_MOE, tie_word_embeddings=False, decoder_sparse_step=2), True),
], ids=["tiny", "tiny-moe", "untied", "tied-bias", "moe-mlp-only-layer", "moe-sparse-step"])
def test_parameters_and_float32_bytes_equal_the_transformers_models(kwargs, moe):
    from pipeline.ops.tiny_model import TINY_MOE_SHAPE, TINY_SHAPE

    kwargs = {"tiny": TINY_SHAPE, "tiny_moe": TINY_MOE_SHAPE}.get(kwargs, kwargs) if isinstance(kwargs, str) else kwargs
    config, model = _transformers_model(kwargs, moe)
    shape = Shape.of(config)
    assert shape.moe == moe
    assert parameters(shape) == sum(p.numel() for p in model.parameters())
    assert size(shape, dtype="float32").weight_bytes == sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("architecture, kind", [
    ("Qwen3ForSequenceClassification", "sequence_classification"),
    ("Qwen3ForTokenClassification", "token_classification"),
    ("Qwen3ForQuestionAnswering", "question_answering"), ("Qwen3Model", "embedding")])
def test_the_other_heads_checkpoints_count_their_own_output_layer(architecture, kind):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen3Config(**SMALL, num_labels=3, tie_word_embeddings=False)
    model = getattr(transformers, architecture)(config)
    assert parameters(Shape.of(config, kind)) == sum(p.numel() for p in model.parameters())
    assert size(Shape.of(config, kind), dtype="float32").weight_bytes == 4 * sum(p.numel() for p in model.parameters())


def test_the_saved_tiny_checkpoints_configs_size_as_their_models(tiny_model, moe_model):
    """config.json as written (the MoE one says num_experts, as Qwen3-30B-A3B's does), read as
    the plan reads it."""
    import transformers

    from pipeline.checkpoint import checkpoint_kind, hf_config

    for path in (tiny_model, moe_model):
        config = hf_config(str(path))
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
        assert parameters(Shape.of(config, checkpoint_kind(config))) == sum(p.numel() for p in model.parameters())


def test_active_parameters_count_top_k_experts():
    config, model = _transformers_model(dict(SMALL_MOE, tie_word_embeddings=False), True)
    shape = Shape.of(config)
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n) // shape.experts // 3  # one expert
    assert parameters(shape) - parameters(shape, active=True) == 3 * (6 - 2) * expert  # 3 layers x 4 idle


@pytest.mark.parametrize("name, total, active", [
    ("Qwen/Qwen3-8B", 8.2e9, 8.2e9), ("Qwen/Qwen3-32B", 32.8e9, 32.8e9),
    ("Qwen/Qwen3-30B-A3B", 30.5e9, 3.3e9), ("Qwen/Qwen3-235B-A22B", 235e9, 22e9),
])
def test_published_sizes(name, total, active):
    shape = Shape.of(QWEN3[name])
    assert parameters(shape) == pytest.approx(total, rel=0.01)
    assert parameters(shape, active=True) == pytest.approx(active, rel=0.03)


def test_kv_bytes_a_token_split_across_tensor_parallel_and_replicated_past_the_kv_heads():
    s8 = Shape.of(QWEN3["Qwen/Qwen3-8B"])  # 36 layers, 8 KV heads of 128
    assert size(s8).kv_bytes_per_token == 2 * 36 * 8 * 128 * 2 == 144 * 1024
    assert size(s8, tp=2).device_kv_bytes_per_token == 2 * 36 * 4 * 128 * 2
    assert size(s8, kv_cache_dtype="fp8").kv_bytes_per_token == 2 * 36 * 8 * 128
    assert size(s8, dtype="float32").kv_bytes_per_token == 2 * 36 * 8 * 128 * 4
    moe = Shape.of(QWEN3["Qwen/Qwen3-30B-A3B"])  # 4 KV heads: at tp 8 each rank keeps one (replicated twice)
    at8 = size(moe, tp=8)
    assert at8.device_kv_bytes_per_token == 2 * 48 * 1 * 128 * 2
    assert at8.kv_bytes_per_token == 8 * at8.device_kv_bytes_per_token
    assert size(s8, pp=4).device_kv_bytes_per_token == 2 * 9 * 8 * 128 * 2  # 9 of 36 layers a stage


def test_tensor_parallel_shards_all_but_norms_router_and_replicated_kv():
    shape = Shape.of(QWEN3["Qwen/Qwen3-8B"])
    one, two = size(shape), size(shape, tp=2)
    norms = (36 * (2 * 128 + 2 * 4096) + 4096) * 2  # q/k norms, layer norms, final norm: bf16, on every rank
    assert two.device_weight_bytes == pytest.approx((one.weight_bytes - norms) / 2 + norms)
    moe = Shape.of(QWEN3["Qwen/Qwen3-30B-A3B"])
    at8 = size(moe, tp=8)  # k/v projections: one of the 4 KV heads on each of 8 ranks
    kv_proj = 48 * 2 * 2048 * 128 * 2
    full_kv_proj = 48 * 2 * 2048 * 4 * 128 * 2
    router = 48 * 2048 * 128 * 2
    norms = (48 * (2 * 128 + 2 * 2048) + 2048) * 2
    rest = size(moe).weight_bytes - full_kv_proj - router - norms
    assert at8.device_weight_bytes == pytest.approx(rest / 8 + kv_proj + router + norms)


def test_pipeline_stages_split_layers_as_vllm_and_the_heaviest_is_reported():
    assert layer_split(36, 2) == [18, 18]
    assert layer_split(94, 4) == [23, 24, 24, 23]  # the remainder goes to the middle stages (get_pp_indices)
    assert layer_split(95, 4) == [24, 24, 24, 23]
    shape = Shape.of(QWEN3["Qwen/Qwen3-8B"])
    layer = (4096 * 4096 * 2 + 2 * 4096 * 1024 + 3 * 4096 * 12288 + 2 * 128 + 2 * 4096) * 2
    embed = 151936 * 4096 * 2
    assert size(shape, pp=2).device_weight_bytes == 18 * layer + embed + 4096 * 2  # the last: lm_head + norm
    assert size(shape, tp=2, pp=2).device_weight_bytes < size(shape, pp=2).device_weight_bytes


def test_quantized_weight_bytes():
    assert quantized_bytes(None, None, 2) == 2
    assert quantized_bytes("fp8", {"quant_method": "fp8"}, 2) == 1
    assert quantized_bytes("gptq", {"bits": 4, "group_size": 128}, 2) == 0.5 + (2 + 0.5) / 128
    assert quantized_bytes("awq", {"bits": 4, "group_size": -1}, 2) == 0.5
    w8a8 = {"config_groups": {"group_0": {"weights": {"num_bits": 8, "strategy": "channel"}}}}
    assert quantized_bytes("compressed-tensors", w8a8, 2) == 1
    shape = Shape.of(QWEN3["Qwen/Qwen3-8B"])
    bf16, fp8 = size(shape), size(shape, quantization="fp8")
    unquantized = (2 * 151936 * 4096 + 36 * (2 * 128 + 2 * 4096) + 4096) * 2  # embeddings, lm_head, norms
    assert fp8.weight_bytes == pytest.approx(unquantized + (bf16.weight_bytes - unquantized) / 2)
    moe = Shape.of(QWEN3["Qwen/Qwen3-30B-A3B"])  # experts_int8: experts only
    experts = 48 * 128 * 3 * 2048 * 768
    assert size(moe, quantization="experts_int8").weight_bytes == size(moe).weight_bytes - experts


def test_kv_tokens_are_what_the_budget_leaves_after_the_weights():
    s = size(Shape.of(QWEN3["Qwen/Qwen3-8B"]), memory_gib=79.6, utilization=0.9)
    assert s.memory_known and s.fits
    assert s.kv_tokens == int((79.6 * GIB * 0.9 - s.device_weight_bytes) // (144 * 1024))
    assert not size(Shape.of(QWEN3["Qwen/Qwen3-235B-A22B"]), memory_gib=79.6).fits


def test_smallest_fit_names_the_fewest_devices_tensor_parallel_first():
    big = Shape.of(QWEN3["Qwen/Qwen3-235B-A22B"])  # ~438 GiB in bf16
    fit = smallest_fit(big, memory_gib=79.6)
    assert fit.fits and fit.tp * fit.pp == 7  # 6 devices would need > 73 GiB each
    assert not any(size(big, tp=tp, pp=pp, memory_gib=79.6).fits for tp, pp in placements(big) if tp * pp < 7)
    assert smallest_fit(big, memory_gib=79.6, pipeline=False).tp == 8
    assert (smallest_fit(big, memory_gib=140.4).tp, smallest_fit(big, memory_gib=140.4).pp) == (4, 1)
    assert all(big.heads % tp == 0 for tp, _ in placements(big))
    assert (smallest_fit(Shape.of(QWEN3["Qwen/Qwen3-32B"]), memory_gib=79.6).tp) == 1


def _spec(source, **sections):
    from pipeline.spec import load_spec

    data = {"input": {"path": "in"}, "output": {"path": "out"}, "model": {"source": str(source)},
            "task": {"head": "chat"}}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return load_spec(data=data)


def test_planning_refuses_a_placement_that_cannot_hold_the_weights(moe_model):
    from pipeline.checkpoint import resolve

    # The tiny MoE holds ~150 MiB of float32 weights: 0.1 GiB at 0.92 cannot hold them.
    with pytest.raises(SpecError) as e:
        resolve(_spec(moe_model, resources={"gpu_memory_gib": 0.1, "device": "cuda"}))
    msg = str(e.value)
    assert "tensor 1 x pipeline 1 would hold 150.3 MiB of weights" in msg
    assert "resources.gpu_memory_gib 0.1" in msg and "gpu_memory_utilization 0.92" in msg
    fit = smallest_fit(resolve(_spec(moe_model)).sizing.shape, dtype="float32", memory_gib=0.1)
    assert f"model.tensor_parallel_size {fit.tp}, model.pipeline_parallel_size {fit.pp}" in msg
    assert (fit.tp, fit.pp) == (2, 1)
    ok = resolve(_spec(moe_model, model={"tensor_parallel_size": 2}, resources={"gpu_memory_gib": 0.1}))
    assert ok.sizing.fits and ok.sizing.memory_known
    # On CPU, and with no GPU memory known, nothing is refused: the sizing assumes 80 GiB.
    assert resolve(_spec(moe_model, resources={"gpu_memory_gib": 0.1, "device": "cpu"})).sizing is not None
    unknown = resolve(_spec(moe_model)).sizing
    assert not unknown.memory_known and unknown.device_memory_bytes == 80 * GIB


def test_engine_kwargs_raise_the_budget_and_set_the_kv_dtype(moe_model):
    from pipeline.checkpoint import resolve

    sizing = resolve(_spec(moe_model, model={"engine_kwargs": {"gpu_memory_utilization": 0.5,
                                                               "kv_cache_dtype": "fp8"}})).sizing
    assert sizing.utilization == 0.5 and sizing.kv_dtype_bytes == 1


def test_expert_parallel_reaches_the_engine_args_of_a_moe_checkpoint(moe_model, tiny_model):
    from pipeline.checkpoint import resolve

    spec = _spec(moe_model, model={"expert_parallel": True, "tensor_parallel_size": 2}, resources={"replicas": 2})
    args = resolve(spec).engine_args("cuda")  # device auto plans; the run's device is cuda
    assert args["enable_expert_parallel"] is True and args["tensor_parallel_size"] == 2
    assert args["distributed_executor_backend"] == "mp"  # the replica's ranks on its node, as without experts
    with pytest.raises(SpecError, match="does not run on the CPU build of vLLM"):
        resolve(spec).engine_args("cpu")  # a run that finds no GPU stops before any engine starts
    with pytest.raises(SpecError, match="does not run on the CPU build of vLLM"):
        resolve(_spec(moe_model, model={"expert_parallel": True, "tensor_parallel_size": 2},
                      resources={"device": "cpu"}))
    pp = resolve(_spec(moe_model, model={"expert_parallel": True, "tensor_parallel_size": 2,
                                         "pipeline_parallel_size": 2})).engine_args("cuda")
    assert pp["enable_expert_parallel"] is True and pp["distributed_executor_backend"] == "ray"
    assert "enable_expert_parallel" not in resolve(_spec(moe_model)).engine_args("cpu")
    assert spec.fingerprint() == _spec(moe_model).fingerprint()  # placement, not results
    with pytest.raises(SpecError, match="is a dense checkpoint .*drop model.expert_parallel"):
        resolve(_spec(tiny_model, model={"expert_parallel": True, "tensor_parallel_size": 2}))
    with pytest.raises(SpecError, match="set model.tensor_parallel_size to 2 or more"):
        resolve(_spec(moe_model, model={"expert_parallel": True}))
    with pytest.raises(SpecError, match="use model.expert_parallel instead"):
        _spec(moe_model, model={"engine_kwargs": {"enable_expert_parallel": True}})


def test_validate_prints_the_sizing_and_every_command_refuses_the_same(tiny_model, tmp_path, capsys, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from pipeline import cli

    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": [1], "prompt": ["hello"]}), tmp_path / "in" / "a.parquet")
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"input": {"path": str(tmp_path / "in")}, "output": {"path": str(tmp_path / "out")},
                                    "model": {"source": str(tiny_model)}, "task": {"head": "chat"},
                                    "resources": {"device": "cpu"}}))
    assert cli.main(["validate", str(spec)]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert ("Sizing: Weights: 75.3 MiB (19.74M parameters, float32); per device at tensor 1 x pipeline 1: "
            "75.3 MiB.") in err
    assert "Sizing: KV cache: 1 KiB a token (2 layers x 1 KV heads x 64 x 2 (K and V) x 4 bytes)" in err
    assert "At gpu_memory_utilization 0.92 of 80 GiB (assumed: set resources.gpu_memory_gib) a device: about" in err

    monkeypatch.setenv("QWEN_BATCH_LOG_DIR", str(tmp_path / "logs"))
    small = ["--set", "resources.device=cuda", "--set", "resources.gpu_memory_gib=0.05"]  # 47 MiB at 0.92
    for argv in (["validate", str(spec)], ["run", "--dry-run", str(spec)], ["run", str(spec)]):
        assert cli.main(argv + small) == 2, argv
        err = " ".join(capsys.readouterr().err.split())
        assert "a device at tensor 1 x pipeline 1 would hold 75.3 MiB of weights" in err, argv
        assert "model.tensor_parallel_size 2, model.pipeline_parallel_size 1" in err, argv
    assert not (tmp_path / "out").exists()


def test_the_docs_table_is_computed_by_the_sizing_code():
    import importlib.util
    from pathlib import Path

    from pipeline.ops.sizing_table import sizing_table

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("docs_hooks", root / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    page = hooks.expand_page((root / "docs" / "sizing.md").read_text(), "sizing.md", results={})
    table = sizing_table()
    assert table in page and "<!-- generated" not in page
    big = smallest_fit(Shape.of(QWEN3["Qwen/Qwen3-235B-A22B"]), quantization="fp8", memory_gib=79.6)
    row = next(line for line in table.splitlines() if "Qwen3-235B-A22B" in line and "fp8" in line)
    assert f"tensor {big.tp}: {big.device_weight_bytes / GIB:.1f} GiB a device, {big.kv_tokens:,} KV tokens" in row
    assert len([line for line in table.splitlines() if line.startswith("| `Qwen/")]) == 8  # 4 checkpoints x bf16, fp8


def test_a_checkpoints_own_quantization_is_sized_and_a_config_without_qwen3_sizes_is_not():
    from types import SimpleNamespace

    from pipeline.engine.fit import job_sizing

    spec = _spec("unused")
    gptq = SimpleNamespace(**QWEN3["Qwen/Qwen3-8B"],
                           quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 128})
    sizing = job_sizing(spec, gptq, "causal")
    assert sizing.quantization == "gptq"
    assert sizing.weight_bytes == size(Shape.of(QWEN3["Qwen/Qwen3-8B"]), quantization="gptq",
                                       quantization_config=gptq.quantization_config).weight_bytes
    assert sizing.weight_bytes < size(Shape.of(QWEN3["Qwen/Qwen3-8B"]), quantization="fp8").weight_bytes
    assert job_sizing(spec, SimpleNamespace(architectures=["OtherForCausalLM"]), "causal") is None
    assert job_sizing(spec, gptq, "question_answering") is None


def test_a_cpu_engine_reserves_only_the_kv_cache_its_sequences_can_fill(tiny_model):
    """The CPU build reserves (and touches) CPU_KV_CACHE_SHARE of host memory an engine unless
    told a size; a short max_model_len gets what max_num_seqs sequences of it can fill."""
    from conftest import checkpoint_engine_args

    from pipeline.checkpoint import read_config
    from pipeline.spec import ModelSpec

    s = Shape.of(read_config(ModelSpec(source=str(tiny_model))))
    per_token = s.layers * s.kv_heads * s.head_dim * 2 * 4  # K and V, float32

    def kv(device="cpu", **model):
        return checkpoint_engine_args(ModelSpec(source=str(tiny_model), **model), device=device).get(
            "kv_cache_memory_bytes")

    assert kv(max_model_len=200) == 256 * 256 * per_token  # vLLM's 256 sequences, 200 tokens in 2 blocks of 128
    assert kv(max_model_len=200, engine_kwargs={"max_num_seqs": 4, "block_size": 32}) == 4 * 224 * per_token
    assert kv(max_model_len=200, engine_kwargs={"gpu_memory_utilization": 0.1}) is None  # the user's choice stands
    assert kv(max_model_len=200, engine_kwargs={"kv_cache_memory_bytes": 5}) == 5
    assert kv() is None  # 40,960 tokens x 256 sequences: more than the share, which stays
    assert kv("cuda", max_model_len=200) is None  # GPUs size their cache after loading the weights
