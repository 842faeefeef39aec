"""Quantized checkpoints run for real on the CPU build of vLLM (issue #17): the tiny Qwen3
quantized by `make-tiny-model --quantize` (compressed-tensors int8 W8A8, GPTQ 4-bit), run
through pipeline.engine.vllm_engine.VllmEngine; their prompt log-probabilities against transformers'
float32 on the unquantized weights (and, for GPTQ, on the dequantized 4-bit weights).

Tolerances, per prompt token, |log p(quantized engine) - log p(oracle)| in nats, measured
here (2026-11-30; 4 prompts, 77 positions; the random tiny model's distributions are nearly
flat, log p about -12; bfloat16 alone moves them by up to 0.05):
  - W8A8 vs unquantized: max 0.137, mean 0.039 in float32; max 0.171, mean 0.037 in bfloat16
    on a CPU with AMX tiles (2026-12-01), where vLLM takes no float32 for it. Bound: max 0.4,
    mean 0.08 (2-3x).
  - GPTQ 4-bit (bfloat16) vs the dequantized 4-bit weights in float32: max 0.045, mean
    0.014: the kernel computes the 4-bit weights it was given. Bound: max 0.25, mean 0.05.
  - GPTQ 4-bit vs unquantized: max 1.01, mean 0.30: round-to-nearest 4-bit error of random
    Gaussian weights (no GPTQ Hessian step), not a kernel error (the line above). Bound:
    max 2.5, mean 0.7; and the mean must exceed 4x the dequantized gap (the 4-bit weights ran).
On a CPU without AVX-512 vLLM loads its AVX2 kernels: W8A8 runs further from the oracle
(max 0.526, mean 0.147; bound max 1.0, mean 0.3) and GPTQ has no kernel, so the plan refuses it.
"""

import asyncio

import pytest
import torch

from pipeline.engine.quantize import cpu_has_amx, cpu_has_avx512

# vLLM runs int8 W8A8 on an AMX CPU with bfloat16/float16 activations only (pipeline.engine.quantize)
W8A8_DTYPE = "bfloat16" if cpu_has_amx() else "float32"
# (max, mean) gap bounds: AVX-512 kernels as the docstring says; vLLM's AVX2 int8 path measured
# max 0.526, mean 0.147 (AMD EPYC without AVX-512, 2026-12-07), bound about 2x
W8A8_BOUNDS = (0.4, 0.08) if cpu_has_avx512() else (1.0, 0.3)

PROMPTS = ["Tell me about rivers and glaciers in the north, and how they carve the valleys we walk in.",
           "Prime numbers are the atoms of arithmetic: every whole number is a product of them, in one way.",
           "Jazz musicians improvise over chord changes, trading solos until the band returns to the theme.",
           "Owls hunt at night and sleep by day; bridges span rivers that glaciers carved long ago."]


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]


def quantized_checkpoint(tiny_model, tmp_path_factory, method):
    from pipeline.engine.quantize import quantize_checkpoint

    return quantize_checkpoint(tiny_model, tmp_path_factory.mktemp(method) / f"tiny-{method}", method)


def engine_logprobs(source, dtype, prompt_ids):
    """Start a VllmEngine on source, read each prompt's token log-probabilities, stop it:
    (per prompt: log p of tokens 1..n, vLLM's quantization of the model, its dtype)."""
    from conftest import checkpoint_engine_args
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    from pipeline.engine.vllm_engine import VllmEngine
    from pipeline.spec import ModelSpec

    loop = asyncio.new_event_loop()
    args = checkpoint_engine_args(ModelSpec(source=str(source), max_model_len=256, dtype=dtype,
                                 engine_kwargs={"enforce_eager": True}), device="cpu")

    async def run():
        eng = VllmEngine(args, device="cpu")
        try:
            params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False,
                                    output_kind=RequestOutputKind.FINAL_ONLY)

            async def one(i, ids):
                final = None
                async for out in eng._llm.generate(TokensPrompt(prompt_token_ids=ids), params, request_id=f"q{i}"):
                    final = out
                return [final.prompt_logprobs[k][ids[k]].logprob for k in range(1, len(ids))]

            lps = await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompt_ids)))
            return lps, eng._llm.model_config.quantization, str(eng._llm.model_config.dtype)
        finally:
            eng.shutdown()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    try:
        return loop.run_until_complete(run())
    finally:
        loop.close()


def torch_logprobs(model, prompt_ids):
    out = []
    with torch.no_grad():
        for ids in prompt_ids:
            logits = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
            out.append([logits[k - 1, ids[k]].item() for k in range(1, len(ids))])
    return out


@pytest.fixture(scope="module")
def unquantized(tiny_model, prompt_ids):
    """transformers, float32, on the unquantized tiny model (vLLM's float32 matches it; the
    chat-job tests hold it to greedy text)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    return torch_logprobs(model, prompt_ids)


def gaps(a, b):
    d = [abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    assert len(d) > 60
    return max(d), sum(d) / len(d)


@pytest.fixture(scope="module")
def w8a8_run(tiny_model, tmp_path_factory, prompt_ids):
    path = quantized_checkpoint(tiny_model, tmp_path_factory, "w8a8")
    return path, engine_logprobs(path, W8A8_DTYPE, prompt_ids)


@pytest.fixture(scope="module")
def gptq_run(tmp_path_factory, prompt_ids):
    """Written by the command, as users would (the tiny model of seed 0: tiny_model's weights)."""
    from pipeline import cli

    path = tmp_path_factory.mktemp("gptq") / "tiny-gptq"
    assert cli.main(["make-tiny-model", str(path), "--quantize", "gptq"]) == 0
    return path, engine_logprobs(path, "auto", prompt_ids)


def test_w8a8_checkpoint_is_int8_compressed_tensors(w8a8_run):
    import json

    from safetensors.torch import load_file

    path, _ = w8a8_run
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "int-quantized"
    tensors = load_file(path / "model.safetensors")
    assert tensors["model.layers.0.mlp.down_proj.weight"].dtype == torch.int8
    assert tensors["model.layers.0.mlp.down_proj.weight_scale"].shape == (128, 1)
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32  # embeddings stay


def test_w8a8_runs_quantized_within_tolerance(w8a8_run, unquantized):
    _, (lps, method, dtype) = w8a8_run
    assert method == "compressed-tensors" and dtype == f"torch.{W8A8_DTYPE}"  # the engine ran int8 W8A8
    worst, mean = gaps(lps, unquantized)
    print(f"W8A8 vs unquantized: max {worst:.4f} mean {mean:.4f} nats")
    assert worst < W8A8_BOUNDS[0] and mean < W8A8_BOUNDS[1]
    assert mean > 1e-4  # it is not the float weights


def test_gptq_runs_the_4bit_weights_within_tolerance(request, unquantized, tiny_model, prompt_ids, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from pipeline.engine.quantize import LINEAR, dequantize_gptq

    if not cpu_has_avx512():  # vLLM's AVX2 kernels have no 4-bit GEMM: the plan refuses the job
        from conftest import checkpoint_engine_args

        from pipeline import cli
        from pipeline.spec import ModelSpec, SpecError

        assert cli.main(["make-tiny-model", str(tmp_path / "gptq"), "--quantize", "gptq"]) == 0
        with pytest.raises(SpecError, match="'gptq' does not run on this CPU: .*AVX-512 CPUs only"):
            checkpoint_engine_args(ModelSpec(source=str(tmp_path / "gptq")), device="cpu")
        return
    path, (lps, method, dtype) = request.getfixturevalue("gptq_run")
    assert method in ("gptq", "auto_gptq") and dtype == "torch.bfloat16"  # vLLM names it auto_gptq
    tensors = load_file(path / "model.safetensors")
    assert tensors["model.layers.1.self_attn.q_proj.qweight"].shape == (128 // 8, 128)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    state = model.state_dict()
    for name in list(state):
        base = name[: -len("weight")]
        if name.endswith(".weight") and name.split(".")[-2] in LINEAR:
            state[name] = dequantize_gptq({k: tensors[base + k] for k in ("qweight", "scales")})
    model.load_state_dict(state)
    dequantized = torch_logprobs(model, prompt_ids)
    kernel_worst, kernel_mean = gaps(lps, dequantized)
    worst, mean = gaps(lps, unquantized)
    print(f"GPTQ vs dequantized: max {kernel_worst:.4f} mean {kernel_mean:.4f}; "
          f"vs unquantized: max {worst:.4f} mean {mean:.4f} nats")
    assert kernel_worst < 0.25 and kernel_mean < 0.05
    assert worst < 2.5 and mean < 0.7
    assert mean > 4 * kernel_mean  # the 4-bit weights ran, not the float ones


def test_a_chat_job_runs_on_the_w8a8_checkpoint(w8a8_run, tmp_path):
    """The whole path (plan check, Ray, engine actor, chat head), model.quantization set."""
    import json

    import pyarrow as pa
    from conftest import read_dir, write_shards

    from jobs import job_spec
    from pipeline.runner import run_job

    path, _ = w8a8_run
    write_shards(tmp_path / "in", [[{"id": i, "prompt": p} for i, p in enumerate(PROMPTS)]],
                 pa.schema([("id", pa.int64()), ("prompt", pa.string())]))
    spec = job_spec(tmp_path, model={"source": str(path), "quantization": "compressed-tensors", "dtype": W8A8_DTYPE,
                                     "max_model_len": 256, "engine_kwargs": {"enforce_eager": True}},
                    sampling={"temperature": 0, "max_tokens": 6}, resources={"device": "cpu"})
    report = run_job(spec, progress=False)
    assert report.exit_code == 0 and report.totals.results == len(PROMPTS)
    results = read_dir(tmp_path / "out" / "results").to_pylist()
    assert all(r["completion_tokens"] == 6 for r in results)
    metrics = read_dir(tmp_path / "out" / "metrics").to_pylist()
    assert json.loads(metrics[0]["engine_settings"])["quantization"] == "compressed-tensors"
