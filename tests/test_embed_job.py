"""An embedding job on the real vLLM CPU engine (pooling runner) over a tiny checkpoint laid
out as Qwen3-Embedding ships (Qwen3Model weights, a Qwen3ForCausalLM config). Oracle: the
model card's transformers recipe on the same float32 weights (text + <|endoftext|>, the last
token's final hidden state, L2-normalised)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import read_dir, write_shards

from jobs import spec_maker
from pipeline.runner import run_job

TASK = "Given a web search query, retrieve relevant passages that answer the query"
TEXTS = [
    "What is the capital of China?",
    "Explain gravity",
    "Très bien 很好 🙂 " * 3,
    "stop<|endoftext|> here <|im_end|>\n<|im_start|>system",  # control strings stay text
    "word " * 100,
]
HIDDEN = 128  # the tiny model's hidden size: the embedding column's length

job = spec_maker(head="embed", model={"max_model_len": 256, "dtype": "float32",
                                      "engine_kwargs": {"enforce_eager": True}})


@pytest.fixture(scope="module")
def embed_model(tmp_path_factory):
    from pipeline.ops.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen3-embed", kind="embed")


@pytest.fixture(scope="module")
def embed_job(embed_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("embed")
    rows = [{"id": i, "text": t} for i, t in enumerate(TEXTS)]
    rows += [{"id": 100, "text": ""}, {"id": 101, "text": None}, {"id": 102, "text": "long " * 300}]
    write_shards(tmp / "in", [rows[:4], rows[4:]], pa.schema([("id", pa.int64()), ("text", pa.string())]))
    report = run_job(job(tmp, model=embed_model, task={"options": {"instruction": TASK}}), progress=False)
    return tmp, report


def test_checkpoint_is_laid_out_as_qwen3_embedding(embed_model):
    from safetensors import safe_open

    assert json.loads((embed_model / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    with safe_open(str(embed_model / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "embed_tokens.weight" in keys and "norm.weight" in keys
    assert not any(k.startswith(("model.", "lm_head")) for k in keys)


def test_every_row_has_a_unit_embedding_or_an_error(embed_job):
    tmp, report = embed_job
    assert report.exit_code == 0 and report.totals.results == len(TEXTS)
    results = {r["id"]: r for r in read_dir(tmp / "out" / "results").to_pylist()}
    errors = {r["id"]: r["error_type"] for r in read_dir(tmp / "out" / "errors").to_pylist()}
    assert set(results) == set(range(len(TEXTS)))
    assert errors == {100: "invalid_input", 101: "invalid_input", 102: "prompt_too_long"}
    for r in results.values():
        assert len(r["embedding"]) == HIDDEN
        assert sum(x * x for x in r["embedding"]) == pytest.approx(1.0, abs=1e-5)
        assert r["completion_tokens"] == 0 and r["prompt_tokens"] > 0


def test_readers_get_a_fixed_size_float32_list(embed_job):
    tmp, _ = embed_job
    files = sorted(p for p in (tmp / "out" / "results").rglob("*.parquet") if p.is_file())
    assert files and all(pq.read_schema(f).field("embedding").type == pa.list_(pa.float32(), HIDDEN)
                         for f in files)
    import pandas as pd

    frame = pd.read_parquet(tmp / "out" / "results")  # a finished output, read as is
    assert len(frame) == len(TEXTS)
    assert frame["embedding"].iloc[0].dtype.name == "float32" and frame["embedding"].iloc[0].shape == (HIDDEN,)


def test_embeddings_match_the_model_cards_transformers_recipe(embed_job, embed_model):
    from transformers import AutoModel, AutoTokenizer

    tmp, _ = embed_job
    results = {r["id"]: r for r in read_dir(tmp / "out" / "results").to_pylist()}
    tokenizer = AutoTokenizer.from_pretrained(embed_model)
    model = AutoModel.from_pretrained(embed_model, dtype=torch.float32).eval()
    eod = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    worst = 1.0
    for i, text in enumerate(TEXTS):
        # get_detailed_instruct, then the card's tokenize(): the text's ids and eod_id last.
        # Row text is plain text here (control strings stay text: split_special_tokens).
        ids = tokenizer.encode(f"Instruct: {TASK}\nQuery:{text}", add_special_tokens=False,
                               split_special_tokens=True) + [eod]
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        expected = torch.nn.functional.normalize(hidden, dim=-1)
        got = torch.tensor(results[i]["embedding"])
        cosine = torch.dot(expected, got).item()
        assert results[i]["prompt_tokens"] == len(ids)
        worst = min(worst, cosine)
    print(f"worst cosine similarity to transformers: {worst:.7f}")
    assert worst >= 0.999
