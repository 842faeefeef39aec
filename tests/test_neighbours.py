"""Output folders and inputs as users really have them (issue 27, items 2, 4, 5, 7): files of
their own next to ours, inputs renamed or re-exported under new part names, Hive and Spark
exports whose files have no .parquet extension, a job whose run settings change between runs.
The engine is the instant fake (these tests are about the data, not the model); one local Ray
for the module."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import local_ray, write_shards

from jobs import ids_out, spec_maker
from pipeline.cli import main
from pipeline.io.output import OutputStore
from pipeline.io.shards import InputError
from pipeline.runner import EXIT_OK, run_job
from pipeline.testing import fake_engine_factory

pytestmark = pytest.mark.datapath
MODEL: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _ray(tiny_model):
    MODEL["source"] = str(tiny_model)
    yield from local_ray()


make_spec = spec_maker(model=MODEL, output={"rows_per_file": 4}, sampling={"max_tokens": 3},
                       resources={"batch_size": 4})


def run(spec, **flags):
    report = run_job(spec, progress=False, engine_factory=fake_engine_factory(), **flags)
    assert report.exit_code == EXIT_OK, report.message
    return report


def rows(prefix: str, n: int) -> list[dict]:
    return [{"id": f"{prefix}-{i}", "prompt": f"{prefix} row {i}"} for i in range(n)]


def ids_read_directly(out) -> list:
    """The ids a reader gets by reading OUTPUT/results and OUTPUT/errors as plain Parquet
    folders (what the README allows), not through the commit records."""
    return [i for kind in ("results", "errors") if (out / kind).exists()
            for i in pq.read_table(out / kind, columns=["id"]).column("id").to_pylist()]


def test_files_we_did_not_write_are_never_deleted_and_status_lists_them(tmp_path, capsys):
    write_shards(tmp_path / "in", [rows("a", 6)])
    spec = make_spec(tmp_path)
    run(spec)
    out = tmp_path / "out"
    notes = out / "results" / "notes" / "keep.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("mine")
    beside = out / "results" / "part-00000.parquet" / "summary.parquet"  # in a shard folder of ours
    pq.write_table(pa.table({"x": [1]}), beside)
    killed = out / "errors" / "part-00000.parquet" / "20260101T000000-abcdef-0123456789ab.parquet"
    killed.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ["a-0"]}), killed)  # what a killed attempt leaves

    write_shards(tmp_path / "in2", [rows("a", 6), rows("b", 3)])  # a new shard: a run that cleans up
    shutil.copy(tmp_path / "in2" / "part-00001.parquet", tmp_path / "in" / "part-00001.parquet")
    run(spec)
    assert notes.read_text() == "mine" and beside.exists()
    assert not killed.exists(), "a killed attempt's file was left"
    run(spec, overwrite=True)
    assert notes.read_text() == "mine" and beside.exists(), "--overwrite deleted a user's file"
    assert sorted(ids_out(out)) == sorted(r["id"] for r in rows("a", 6) + rows("b", 3))

    capsys.readouterr()
    assert main(["status", str(out), "--json"]) == 0
    foreign = json.loads(capsys.readouterr().out)["foreign_files"]
    assert sorted(foreign) == ["results/notes/keep.txt", "results/part-00000.parquet/summary.parquet"]
    assert main(["status", str(out)]) == 0
    assert "Foreign files (not written by qwen-batch" in capsys.readouterr().out


def test_a_renamed_input_is_not_run_again_and_its_ids_are_in_the_output_once(tmp_path):
    write_shards(tmp_path / "in", [rows("a", 5), rows("b", 4)])
    spec = make_spec(tmp_path)
    run(spec)
    (tmp_path / "in" / "d").mkdir()
    (tmp_path / "in" / "part-00000.parquet").rename(tmp_path / "in" / "d" / "a.parquet")
    again = run(spec)
    assert again.totals.rows == 0, "the renamed file's rows were computed again"
    out = tmp_path / "out"
    expected = sorted(r["id"] for r in rows("a", 5) + rows("b", 4))
    assert sorted(ids_read_directly(out)) == expected
    assert sorted(ids_out(out)) == expected
    manifest = OutputStore(str(out)).read_manifest()
    assert manifest["orphaned"] == [] and manifest["totals"]["rows"] == 9
    assert {e["name"]: e["status"] for e in manifest["shards"]} == \
        {"d/a.parquet": "committed", "part-00001.parquet": "committed"}
    third = run_job(spec, progress=False, engine_factory=fake_engine_factory())
    assert third.message == "nothing to do"


def test_a_reexport_under_new_part_names_is_refused_naming_both(tmp_path):
    write_shards(tmp_path / "in", [rows("a", 5), rows("b", 4)])
    spec = make_spec(tmp_path)
    run(spec)
    for f in (tmp_path / "in").glob("*.parquet"):
        f.unlink()
    pq.write_table(pa.Table.from_pylist(rows("a", 5) + rows("b", 4)), tmp_path / "in" / "export-2.parquet")
    with pytest.raises(InputError, match=r"export-2.parquet holds \d+ id\(s\).*already committed.*under shard "
                                         r"part-0000[01].parquet.*old name back.*--overwrite"):
        run_job(spec, progress=False, engine_factory=fake_engine_factory())
    assert sorted(ids_read_directly(tmp_path / "out")) == sorted(r["id"] for r in rows("a", 5) + rows("b", 4))
    run(spec, overwrite=True)
    assert sorted(ids_read_directly(tmp_path / "out")) == sorted(r["id"] for r in rows("a", 5) + rows("b", 4))


def test_every_file_of_a_hive_export_is_read_with_or_without_an_extension(tmp_path):
    part = tmp_path / "in" / "date=2026-12-01"
    part.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows("spark", 6)), part / "part-00000")  # Spark: no extension
    pq.write_table(pa.Table.from_pylist(rows("hive", 4)), part / "part-00001.parquet")
    (part / "_SUCCESS").write_text("")
    report = run(make_spec(tmp_path))
    assert report.totals.rows == 10 and report.totals.errors == 0
    results = OutputStore(str(tmp_path / "out")).read_committed("results")
    assert sorted(results.column("id").to_pylist()) == sorted(r["id"] for r in rows("spark", 6) + rows("hive", 4))


def test_changing_how_a_job_runs_never_blocks_resuming_it(tmp_path, capsys):
    write_shards(tmp_path / "in", [rows("a", 4)])
    run(make_spec(tmp_path))
    write_shards(tmp_path / "more", [rows("b", 3)])
    shutil.copy(tmp_path / "more" / "part-00000.parquet", tmp_path / "in" / "b.parquet")
    # what our own exit-3 message advises (more restarts), and other settings of how it runs
    changed = make_spec(tmp_path, name="nightly", resources={"max_engine_restarts": 10, "row_timeout_s": 60,
                                                             "batch_size": 2, "rows_in_flight": 8},
                        output={"max_error_rate": 0.5, "rows_per_file": 2},
                        model={"engine_kwargs": {"gpu_memory_utilization": 0.25, "hf_token": "hf_secret"}})
    again = run(changed)
    assert again.totals.rows == 3 and again.skipped_shards == 1
    capsys.readouterr()
    assert main(["status", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "Settings changed since the run before it:" in text and "resources.max_engine_restarts: 3 -> 10" in text
    assert "hf_secret" not in text

    # a setting that changes result rows still refuses, and says which one changed
    write_shards(tmp_path / "more2", [rows("c", 2)])
    shutil.copy(tmp_path / "more2" / "part-00000.parquet", tmp_path / "in" / "c.parquet")
    with pytest.raises(InputError, match=r"different job spec \(changed since the last run: sampling.temperature"):
        run_job(make_spec(tmp_path, sampling={"max_tokens": 3, "temperature": 0.1}), progress=False,
                engine_factory=fake_engine_factory())
