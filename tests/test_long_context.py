"""YaRN long context: the overrides vLLM needs, and vLLM's own config accepting them."""

import pytest
from conftest import checkpoint_engine_args

from pipeline.spec import ModelSpec, SpecError


def test_native_length_needs_no_rope_scaling(tiny_model):
    args = checkpoint_engine_args(ModelSpec(source=str(tiny_model), long_context=16384), device="cpu")
    assert args["max_model_len"] == 16384 and "hf_overrides" not in args


@pytest.mark.parametrize("wanted, factor", [(65536, 2.0), (131072, 4.0), (40000, 40000 / 32768)])
def test_yarn_factor_follows_the_wanted_length(tiny_model, wanted, factor):
    args = checkpoint_engine_args(ModelSpec(source=str(tiny_model), long_context=wanted), device="cpu")
    rope = args["hf_overrides"]["rope_parameters"]
    assert rope["rope_type"] == "yarn" and rope["factor"] == pytest.approx(factor)
    assert rope["original_max_position_embeddings"] == 32768 and rope["rope_theta"] == 1e6
    assert args["max_model_len"] == wanted
    assert args["hf_overrides"]["max_position_embeddings"] == int(32768 * factor)


def test_beyond_4x_is_refused():
    with pytest.raises(ValueError, match="less than or equal to 131072"):
        ModelSpec(source="x", long_context=200000)


def test_max_model_len_above_long_context_is_refused(tiny_model):
    with pytest.raises(SpecError, match="drop one of them"):
        checkpoint_engine_args(ModelSpec(source=str(tiny_model), long_context=40000, max_model_len=50000), device="cpu")


def test_vllm_accepts_the_yarn_config(tiny_model):
    from pipeline.engine.vllm_engine import vllm_engine_args

    args = checkpoint_engine_args(ModelSpec(source=str(tiny_model), long_context=131072), device="cpu")
    config = vllm_engine_args(args).create_engine_config()
    assert config.model_config.max_model_len == 131072
    assert config.model_config.hf_config.rope_parameters["rope_type"] == "yarn"
