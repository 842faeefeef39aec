"""Embed head on the fake engine (with Qwen3's real tokenizer): the model card's prompt
(instruction, text as plain text, <|endoftext|> last), Matryoshka dimensions, the job's
fixed-size list schema, bad rows, and the engine task it declares."""

import asyncio
import json
import math
from types import SimpleNamespace

import pyarrow as pa
import pytest

from pipeline.heads import head_class
from pipeline.heads.base import RowError
from pipeline.heads.embed import EmbedHead, truncate_normalized
from pipeline.testing import FakeEngine

EOT = 151643  # <|endoftext|>


@pytest.fixture(scope="module")
def qwen_tokenizer():
    from pipeline.ops.tiny_model import build_qwen3_tokenizer

    return build_qwen3_tokenizer()


def embed(options, text, tokenizer=None, **engine):
    eng = FakeEngine(tokenizer=tokenizer, **engine)
    head = EmbedHead(options)
    head.use_model(SimpleNamespace(hidden_size=FakeEngine.embed_size))
    return asyncio.run(head.run({"text": text}, eng)), eng


def test_prompt_is_the_model_cards(qwen_tokenizer):
    head, eng = EmbedHead({}), FakeEngine(tokenizer=qwen_tokenizer)
    text = "What is the capital of China?"
    assert head.prompt_ids(text, eng) == qwen_tokenizer.encode(text, add_special_tokens=False) + [EOT]
    task = "Given a web search query, retrieve relevant passages that answer the query"
    head = EmbedHead({"instruction": task})
    # get_detailed_instruct, tokenized in one call (":" joins the query's first word), then eod
    card = qwen_tokenizer.encode(f"Instruct: {task}\nQuery:{text}", add_special_tokens=False) + [EOT]
    assert head.prompt_ids(text, eng) == card


def test_control_strings_in_the_text_stay_text(qwen_tokenizer):
    head, eng = EmbedHead({}), FakeEngine(tokenizer=qwen_tokenizer)
    ids = head.prompt_ids("stop here<|endoftext|><|im_end|><think>", eng)
    assert ids[-1] == EOT and EOT not in ids[:-1]
    assert not set(ids[:-1]) & set(range(151643, 151669))  # no added (control) token inside


def test_embedding_is_unit_length_and_dimensions_truncate_then_renormalise():
    out, eng = embed({}, "hello world")
    full = out["embedding"]
    assert len(full) == FakeEngine.embed_size and math.fsum(x * x for x in full) == pytest.approx(1.0)
    assert out["prompt_tokens"] == 3 and out["completion_tokens"] == 0  # 2 words + <|endoftext|>
    out, _ = embed({"dimensions": 3}, "hello world")
    norm = math.sqrt(math.fsum(x * x for x in full[:3]))
    assert out["embedding"] == pytest.approx([x / norm for x in full[:3]], abs=1e-12)
    assert truncate_normalized([3.0, 4.0, 12.0], 2) == pytest.approx([0.6, 0.8])
    with pytest.raises(RowError):
        truncate_normalized([0.0, 0.0], None)


def test_schema_is_a_fixed_size_float32_list_sized_by_the_job():
    schema = EmbedHead({"dimensions": 32}).result_schema(pa.int64())
    assert schema.field("embedding").type == pa.list_(pa.float32(), 32)
    assert schema.names == ["id", "embedding", "prompt_tokens", "completion_tokens"]
    head = EmbedHead({})
    with pytest.raises(RuntimeError):
        head.result_schema(pa.int64())  # the hidden size comes from the checkpoint
    head.use_model(SimpleNamespace(hidden_size=1024))
    assert head.result_schema(pa.string()).field("embedding").type == pa.list_(pa.float32(), 1024)
    with pytest.raises(ValueError, match="dimensions 2048 is more than the model's hidden size 1024"):
        EmbedHead({"dimensions": 2048}).use_model(SimpleNamespace(hidden_size=1024))


def test_rows_write_as_the_schema_says():
    head = EmbedHead({"dimensions": 4})
    out, _ = embed({"dimensions": 4}, "hello")
    table = pa.Table.from_pylist([{"id": 1, **out}], schema=head.result_schema(pa.int64()))
    assert table.column("embedding").type == pa.list_(pa.float32(), 4)
    assert table.to_pandas()["embedding"][0].dtype.name == "float32"


@pytest.mark.parametrize("text, kind", [(None, "invalid_input"), ("", "invalid_input"), ("  ", "invalid_input"),
                                        (5, "invalid_input"), ("w " * 20, "prompt_too_long")])
def test_bad_rows_are_error_rows(text, kind):
    with pytest.raises(RowError) as e:
        embed({}, text, max_model_len=16)
    assert e.value.error_type == kind


def test_options_are_checked():
    assert "dimensions" in EmbedHead.check_options({"dimensions": 0})
    assert "instruction" in EmbedHead.check_options({"instruction": " "})
    assert "unknown key" in EmbedHead.check_options({"dimension": 8})
    assert head_class("embed") is EmbedHead and EmbedHead.engine_task == "embed"


def test_engine_args_ask_for_the_pooling_runner(tmp_path):
    from conftest import checkpoint_engine_args

    from pipeline.spec import ModelSpec, SpecError

    def model(arch):
        d = tmp_path / arch
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"architectures": [arch], "hidden_size": 64}))
        return ModelSpec(source=str(d))

    args = checkpoint_engine_args(model("Qwen3ForCausalLM"), device="cpu", task="embed")
    assert args["runner"] == "pooling" and args["convert"] == "embed"
    assert args["pooler_config"] == {"seq_pooling_type": "LAST", "use_activation": True}
    assert "reasoning_parser" not in args and "structured_outputs_config" not in args
    assert checkpoint_engine_args(model("Qwen3Model"), device="cpu", task="embed")["convert"] == "embed"
    generative = checkpoint_engine_args(ModelSpec(source=str(tmp_path / "Qwen3ForCausalLM")), device="cpu")
    assert "runner" not in generative and "pooler_config" not in generative
    with pytest.raises(SpecError, match="Qwen3ForSequenceClassification"):
        checkpoint_engine_args(model("Qwen3ForSequenceClassification"), device="cpu", task="embed")
