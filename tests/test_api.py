"""The Python API a notebook or a Ray Data user calls: pipeline.run and pipeline.process, on a
local Ray and the real vLLM engine (tiny Qwen3)."""

from __future__ import annotations

import pytest
import yaml
from conftest import local_ray, prompt_rows, read_dir, vllm_processes, write_shards

import pipeline
from pipeline.errors import InputError, SpecError


@pytest.fixture(scope="module", autouse=True)
def ray_up():
    yield from local_ray()


def job(tmp_path, tiny_model, **sections) -> dict:
    return {"input": {"path": str(tmp_path / "in")}, "output": {"path": str(tmp_path / "out")},
            "model": {"source": str(tiny_model), "max_model_len": 512, "engine_kwargs": {"enforce_eager": True}},
            "task": {"head": "chat"}, "sampling": {"max_tokens": 4, "temperature": 0}, **sections}


@pytest.mark.unit
def test_a_wrong_key_raises_a_spec_error_that_suggests_the_right_one(tmp_path, tiny_model):
    with pytest.raises(SpecError, match="Did you mean 'max_tokens'"):
        pipeline.run(job(tmp_path, tiny_model, sampling={"max_tokenz": 4}))
    with pytest.raises(SpecError, match="sampling.max_tokens"):  # overrides as --set takes them
        pipeline.load(job(tmp_path, tiny_model), overrides=["sampling.max_tokens=-1"])
    assert not (tmp_path / "out").exists()


def test_run_takes_a_dict_and_reports_exit_code_output_and_row_counts(tmp_path, tiny_model):
    write_shards(tmp_path / "in", [prompt_rows(5), prompt_rows(3, start=5) + [{"id": 8, "prompt": ""}]])
    report = pipeline.run(job(tmp_path, tiny_model), progress=False)
    assert report.exit_code == 0
    assert report.output == str(tmp_path / "out")
    assert (report.rows, report.results, report.errors) == (9, 8, 1)  # the empty prompt is an error row
    results, errors = read_dir(tmp_path / "out" / "results"), read_dir(tmp_path / "out" / "errors")
    assert sorted(results.column("id").to_pylist()) == list(range(8))
    assert errors.column("id").to_pylist() == [8]
    path = tmp_path / "job.yaml"  # the same job as a YAML file: resumed, nothing left to run
    path.write_text(yaml.safe_dump(job(tmp_path, tiny_model)))
    again = pipeline.run(path, progress=False)
    assert again.exit_code == 0 and again.rows == 0 and again.skipped_shards == 2


def test_process_runs_a_head_over_a_ray_dataset_with_errors_as_rows(tiny_model):
    import ray

    rows = [{"doc": f"d{i}", "prompt": f"Say {i}."} for i in range(6)] + [{"doc": "d6", "prompt": ""}]
    ds = ray.data.from_items(rows)
    spec = {"model": {"source": str(tiny_model), "max_model_len": 512, "engine_kwargs": {"enforce_eager": True}},
            "task": {"head": "chat"}, "sampling": {"max_tokens": 3, "temperature": 0}, "input": {"id_column": "doc"}}
    out = pipeline.process(ds, spec)
    table = out.to_pandas()
    assert sorted(table["doc"]) == [f"d{i}" for i in range(7)]  # one row per input row
    ok = table[table["error_type"].isna()]
    assert len(ok) == 6 and all(isinstance(t, str) for t in ok["response"])
    assert (ok["completion_tokens"] <= 3).all()
    bad = table[table["doc"] == "d6"].iloc[0]
    assert bad["error_type"] == "invalid_input" and bad["error_message"]
    assert {"_worker", "_started", "path"}.isdisjoint(table.columns)
    assert not vllm_processes(), "engines outlived the Dataset's execution"


def test_process_refuses_a_dataset_without_the_columns_the_head_reads(tiny_model):
    import ray

    spec = {"model": {"source": str(tiny_model)}, "task": {"head": "chat"}}
    with pytest.raises(InputError, match="no column 'id'.*set input.id_column"):
        pipeline.process(ray.data.from_items([{"prompt": "hi"}]), spec)
    with pytest.raises(InputError, match="none of the columns.*prompt"):
        pipeline.process(ray.data.from_items([{"id": 1, "body": "hi"}]), spec)
