"""JSON lines input (issue 31, item 3): .jsonl, .json and .ndjson files are read by their
extension with the checks, ids, fingerprints and resume of Parquet; a folder mixing the two
formats is refused by name. Planning checks are unit tests (no Ray, no engine); one job runs
end to end on a local Ray and the real vLLM engine on the tiny Qwen3."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import local_ray, prompt_rows, read_dir

from jobs import job_spec
from pipeline.io import shards as shards_module
from pipeline.io.shards import (
    JSON_LINES,
    PARQUET,
    InputError,
    check_shards,
    input_format,
    json_lines_read_schema,
    open_shards,
)
from pipeline.runner import EXIT_OK, plan_job, run_job

READS = ["messages", "prompt", "system", "sampling"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_lines(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def planned(where: Path | str):
    fs, found = open_shards(str(where))
    check_shards(fs, found, id_column="id", any_of=["messages", "prompt"], reads=READS)
    return found


@pytest.mark.unit
def test_format_is_told_by_the_extension():
    assert [input_format(p) for p in ("a.jsonl", "b.JSON", "c.ndjson", "d.parquet", "part-00000", "000000_0",
                                      "e.jsonl.gz", "f.txt")] == [JSON_LINES] * 3 + [PARQUET] * 5


@pytest.mark.unit
def test_jsonl_and_json_files_plan_like_parquet_shards(tmp_path, chat_job):
    write_jsonl(tmp_path / "in" / "a.jsonl", prompt_rows(3))
    write_lines(tmp_path / "in" / "b.json", json.dumps({"id": 3, "prompt": "p3"}) + "\n\n"  # a blank line
                + json.dumps({"id": 4, "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    plan = plan_job(chat_job())
    assert [(s.name, s.format, s.rows) for s in plan.shards] == [("a.jsonl", JSON_LINES, 3), ("b.json", JSON_LINES, 2)]
    assert plan.columns == ["id", "messages", "prompt"] and plan.id_type == pa.int64()
    assert [s.ids.count for s in plan.shards] == [3, 2]
    # a fingerprint of size, rows and a hash of the content, as a Parquet shard's
    a = plan.shards[0].fingerprint()
    assert set(a) == {"path", "size", "rows", "footer"} and a["size"] == (tmp_path / "in" / "a.jsonl").stat().st_size
    assert plan_job(chat_job()).shards[0].fingerprint() == a  # unchanged file: same fingerprint
    text = (tmp_path / "in" / "a.jsonl").read_text()
    (tmp_path / "in" / "a.jsonl").write_text(text.replace('"p1"', '"q1"'))  # same size, same rows
    b = plan_job(chat_job()).shards[0].fingerprint()
    assert b["size"] == a["size"] and b["rows"] == a["rows"] and b["footer"] != a["footer"]


@pytest.mark.unit
def test_each_file_is_parsed_once_at_planning(tmp_path, monkeypatch):
    """Rows, columns and the id checks come from one parse per file (JSON has no footer)."""
    write_jsonl(tmp_path / "in" / "a.jsonl", prompt_rows(50))
    write_jsonl(tmp_path / "in" / "b.jsonl", prompt_rows(50, 50))
    parses = []
    real = shards_module._parse_json_lines
    monkeypatch.setattr(shards_module, "_parse_json_lines", lambda *a, **k: parses.append(a[1]) or real(*a, **k))
    found = planned(tmp_path / "in")
    assert len(parses) == 2 and [s.ids.count for s in found] == [50, 50]
    assert all(not s.parsed for s in found)  # the kept columns are let go once checked


@pytest.mark.unit
def test_types_are_settled_once_across_files(tmp_path):
    """Each file's JSON infers its own types; the job reads each column at one type that holds
    them all: a key null in one file, objects with other keys in another, dates kept as text."""
    write_lines(tmp_path / "in" / "a.jsonl", '{"id": "2024-01-01", "prompt": null, "sampling": {"max_tokens": 2}}\n')
    write_lines(tmp_path / "in" / "b.jsonl", '{"id": "2024-01-02", "prompt": "hi", "sampling": {"temperature": 0.5}}\n'
                                             '{"id": "2024-01-03", "prompt": "yo", "extra": [1, 2]}\n')
    write_lines(tmp_path / "in" / "c.jsonl", "")  # empty: no rows, the columns of the others
    found = planned(tmp_path / "in")
    assert [s.rows for s in found] == [1, 2, 0]
    schema = json_lines_read_schema(found, ["id", "prompt", "sampling"])
    assert schema == pa.schema([("id", pa.string()), ("prompt", pa.string()), ("sampling", pa.struct(
        [("max_tokens", pa.int64()), ("temperature", pa.float64())]))])
    assert all(s.schema.field("sampling").type == schema.field("sampling").type for s in found)


@pytest.mark.unit
def test_jsonl_on_an_object_store_is_planned_through_the_retrying_filesystem(tmp_path, s3_server, s3_bucket):
    write_jsonl(tmp_path / "local" / "a.jsonl", prompt_rows(3))
    write_jsonl(tmp_path / "local" / "b.jsonl", prompt_rows(2, 3))
    s3_server.upload(tmp_path / "local", f"{s3_bucket}/in")
    found = planned(f"{s3_bucket}/in")
    assert [(s.name, s.rows, s.ids.count) for s in found] == [("a.jsonl", 3, 3), ("b.jsonl", 2, 2)]
    assert found[0].footer == planned(tmp_path / "local")[0].footer  # the same content, wherever it is


def _files(**named):
    """A maker of input folders: file name -> text (str) or rows (list)."""
    def make(d: Path):
        d.mkdir(parents=True, exist_ok=True)
        for name, content in named.items():
            name = name.replace("__", ".")
            if isinstance(content, list):
                write_jsonl(d / name, content)
            elif name.endswith(".parquet") or "." not in name:
                pq.write_table(pa.Table.from_pylist(prompt_rows(1, 99)), d / name)
            else:
                write_lines(d / name, content)
    return make


BAD = {
    "missing id column": (_files(a__jsonl=[{"key": 1, "prompt": "x"}]),
                          "a.jsonl: no id column 'id' (columns: key, prompt); add it or set input.id_column"),
    "missing text column": (_files(a__jsonl=[{"id": 1, "text": "x"}]),
                            "a.jsonl: none of the columns messages, prompt; add one or set the head's column option"),
    "duplicate ids in a file": (_files(a__jsonl=[{"id": 1, "prompt": "a"}, {"id": 1, "prompt": "b"}]),
                                "a.jsonl: 1 duplicate id(s): 1; ids must be unique across the input"),
    "duplicate ids across files": (_files(a__jsonl=prompt_rows(2), b__jsonl=prompt_rows(2, 1)),
                                   "b.jsonl: 1 duplicate id(s): 1 (also in"),
    "null id": (_files(a__jsonl=[{"id": 1, "prompt": "a"}, {"prompt": "b"}]),
                "a.jsonl: 1 row(s) with a null id; give every row an id"),
    "mixed id types": (_files(a__jsonl=prompt_rows(1), b__jsonl=[{"id": "x", "prompt": "y"}]),
                       "id column 'id' has different types across shards"),
    "fractional ids": (_files(a__jsonl=[{"id": 1.5, "prompt": "x"}]), "must hold integers or strings"),
    "malformed line": (_files(a__jsonl='{"id": 1, "prompt": "a"}\n\n{"id": 2, "prompt": "b"\n'),
                       "a.jsonl: line 3 is not valid JSON (Expecting ',' delimiter); fix or remove that line"),
    "a key's type changes within a file": (
        _files(a__jsonl='{"id": 1, "prompt": "a"}\n{"id": 2, "prompt": 5}\n'),
        "a.jsonl: line 2: 'prompt' is number here but string in the lines before; give it one type on every line"),
    "a nested type changes": (
        _files(a__jsonl='{"id": 1, "messages": [{"role": "user", "content": "x"}]}\n'
                        '{"id": 2, "messages": [{"role": "user", "content": 7}]}\n'),
        "a.jsonl: line 2: 'messages.[].content' is number here but string in the lines before"),
    "a key's type differs between files": (_files(a__jsonl=prompt_rows(1), b__jsonl=[{"id": 5, "prompt": 3}]),
                                           "b.jsonl: key 'prompt' holds numbers but strings in "),
    "a JSON array": (_files(a__json='[{"id": 1, "prompt": "a"}]\n'),
                     "a.json: holds a JSON array; qwen-batch reads JSON lines, one object per line "
                     "(convert it with: jq -c '.[]' a.json > a.jsonl)"),
    "a line that is not an object": (_files(a__jsonl='{"id": 1, "prompt": "a"}\n"b"\n'),
                                     "a.jsonl: line 2 is a string, not a JSON object; write one object per line"),
    "invalid UTF-8 id": (_files(a__jsonl=b'{"id": "a\xff", "prompt": "x"}\n'),
                         "id column 'id' holds text that is not valid UTF-8"),
    "every file empty": (_files(a__jsonl="", b__jsonl="\n  \n"),
                         "the input has no rows: every file is empty"),
    "mixed folder": (_files(a__jsonl=prompt_rows(1), b__parquet=None),
                     "holds both JSON lines files (e.g. {d}/a.jsonl) and Parquet files (e.g. {d}/b.parquet: a name "
                     "not ending in .jsonl, .json, .ndjson is read as Parquet); one job reads one format"),
    "mixed folder, Parquet without an extension": (_files(a__json=prompt_rows(1), part_00000=None),
                                                   "and Parquet files (e.g. {d}/part_00000: "),
    "compressed JSON lines": (_files(a__jsonl__gz="x"),
                              "compressed JSON lines are not read: decompress it"),
}


@pytest.mark.unit
@pytest.mark.parametrize("kind", BAD)
def test_bad_jsonl_input_is_refused_naming_the_file_and_the_fix(tmp_path, kind, chat_job):
    make, message = BAD[kind]
    make(tmp_path / "in")
    with pytest.raises(InputError) as e:
        plan_job(chat_job())
    assert e.value.exit_code == 2
    assert message.format(d=tmp_path / "in") in str(e.value)


# -- the driver's own reads of the input: repair, refusals, estimates -----------------------------

@pytest.mark.datapath
def test_rows_lost_from_a_jsonl_shard_become_one_engine_died_error_row_each(tmp_path, chat_job, monkeypatch):
    """Rows that never come back (here: a part summary the driver never receives) are found when
    the run ends by reading the shard's ids from its JSON lines file: one engine_died error row
    each, every other row as it was, every id once."""
    from jobs import ids_out
    from pipeline.io import sink
    from pipeline.io.output import OutputStore
    from pipeline.testing import fake_engine_factory

    rows_a = [{"id": f"a{i}", "prompt": f"Row {i}."} for i in range(6)]
    write_jsonl(tmp_path / "in" / "a.jsonl", rows_a)
    write_jsonl(tmp_path / "in" / "b.jsonl", [{"id": "b0", "prompt": "Other."}])
    lost: list[str] = []  # the ids of the part dropped (its files are swept at the run's end)
    add = sink.ShardCommitter.add

    def lose_a_part(self, parts):  # the first part of a.jsonl never reaches the driver
        keep = []
        for i, p in enumerate(parts.to_pylist()):
            if p["shard"] == "a.jsonl" and not lost:
                lost.extend(row_id for kind in ("results", "errors") if p[f"{kind}_file"]
                            for row_id in self.store.read_table(p[f"{kind}_file"]).column("id").to_pylist())
            else:
                keep.append(i)
        add(self, parts.take(pa.array(keep, pa.int64())))

    monkeypatch.setattr(sink.ShardCommitter, "add", lose_a_part)
    spec = chat_job(output={"rows_per_file": 2}, resources={"batch_size": 2}, sampling={"max_tokens": 2})
    report = run_job(spec, progress=False, engine_factory=fake_engine_factory())
    assert report.exit_code == EXIT_OK, report.message
    assert 0 < len(lost) < len(rows_a)
    errors = read_dir(tmp_path / "out" / "errors").to_pylist()
    assert sorted(e["id"] for e in errors) == sorted(lost)
    assert {e["error_type"] for e in errors} == {"engine_died"}
    assert all("never came back" in e["error_message"] for e in errors)
    assert sorted(ids_out(tmp_path / "out")) == sorted(r["id"] for r in rows_a) + ["b0"]  # each once
    record = OutputStore(str(tmp_path / "out")).records()["a.jsonl"]
    assert record["errors"] == len(lost) and record["errors_by_type"] == {"engine_died": len(lost)}
    assert report.totals.errors == len(lost)


@pytest.mark.datapath
def test_a_jsonl_reexport_under_new_names_is_refused_naming_both(tmp_path, chat_job):
    """Ids already committed under JSON lines files that are gone are found in the new file
    that holds them (its ids read from the JSON lines): running it would give them twice."""
    from pipeline.testing import fake_engine_factory

    write_jsonl(tmp_path / "in" / "a.jsonl", prompt_rows(3))
    write_jsonl(tmp_path / "in" / "b.jsonl", prompt_rows(2, 3))
    spec = chat_job(sampling={"max_tokens": 2})
    report = run_job(spec, progress=False, engine_factory=fake_engine_factory())
    assert report.exit_code == EXIT_OK, report.message
    for f in (tmp_path / "in").glob("*.jsonl"):
        f.unlink()
    write_jsonl(tmp_path / "in" / "export-2.jsonl", prompt_rows(5))
    with pytest.raises(InputError, match=r"export-2.jsonl holds \d+ id\(s\).*already committed.*under shard "
                                         r"[ab].jsonl.*old name back.*--overwrite") as e:
        plan_job(spec)
    assert e.value.exit_code == 2
    assert [s.name for s in plan_job(spec, overwrite=True).todo] == ["export-2.jsonl"]


@pytest.mark.unit
def test_validate_estimates_the_input_tokens_of_jsonl_files(tmp_path, chat_job, tokenizer, capsys):
    """validate samples rows of JSON lines files as of Parquet ones for its token estimate; a
    file without one of the text keys (messages only, no prompt) is sampled on what it has."""
    import yaml

    from pipeline.cli import main

    write_jsonl(tmp_path / "in" / "a.jsonl", prompt_rows(3))
    messages = [{"role": "user", "content": "Name a color."}]
    write_jsonl(tmp_path / "in" / "b.json", [{"id": 3, "messages": messages}, {"id": 4, "messages": messages}])
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(chat_job().model_dump(mode="json")))
    capsys.readouterr()
    assert main(["validate", str(spec)]) == 0
    err = capsys.readouterr().err
    tokens = sum(len(tokenizer.encode(text, add_special_tokens=False))
                 for text in [f"p{i}" for i in range(3)] + [json.dumps(messages)] * 2)
    assert f"about {tokens:,} input tokens of text (from 5 sampled rows)" in err, err
    assert "tokens unknown" not in err


# -- end to end: the real engine ---------------------------------------------------------------

ROWS_A = [{"id": "a0", "prompt": "Name a river."},
          {"id": "a1", "prompt": "   "},  # empty: one invalid_input error row, the run goes on
          {"id": "a2", "messages": [{"role": "user", "content": "Name a color."}]},
          {"id": "a3", "prompt": "Say hi.", "sampling": {"max_tokens": 1}}]
ROWS_B = [{"id": f"b{i}", "prompt": f"Count to {i}."} for i in range(3)]


@pytest.fixture(scope="module")
def jsonl_job(tiny_model, tmp_path_factory):
    """One JSON lines job on the real engine, in this process (one local Ray for the module)."""
    tmp = tmp_path_factory.mktemp("jsonl")
    write_jsonl(tmp / "in" / "a.jsonl", ROWS_A)
    write_jsonl(tmp / "in" / "b.json", ROWS_B)
    spec = job_spec(tmp, model={"source": str(tiny_model), "max_model_len": 256, "dtype": "float32",
                                "engine_kwargs": {"enforce_eager": True}},
                    sampling={"max_tokens": 2, "temperature": 0}, resources={"batch_size": 4})
    for _ in local_ray():
        report = run_job(spec, progress=False)
        yield tmp, spec, report


@pytest.mark.engine
def test_a_jsonl_job_gives_one_row_per_input_row(jsonl_job):
    tmp, _, report = jsonl_job
    assert report.exit_code == EXIT_OK, report.message
    results, errors = read_dir(tmp / "out" / "results"), read_dir(tmp / "out" / "errors")
    ids = results.column("id").to_pylist() + errors.column("id").to_pylist()
    assert sorted(ids) == sorted(r["id"] for r in ROWS_A + ROWS_B)
    assert errors.to_pylist()[0]["id"] == "a1" and errors.to_pylist()[0]["error_type"] == "invalid_input"
    by_id = {r["id"]: r for r in results.to_pylist()}
    assert by_id["a3"]["completion_tokens"] == 1  # the row's own sampling, read as a JSON object
    assert report.totals.rows == 7 and report.totals.errors == 1


@pytest.mark.engine
def test_resume_skips_unchanged_jsonl_files_and_refuses_an_edited_one(jsonl_job):
    tmp, spec, _ = jsonl_job
    assert plan_job(spec).todo == []  # both files committed: nothing to do
    # an edited file is found changed (same size and rows, other content), as a Parquet shard is
    edited = tmp / "in" / "b.json"
    before = edited.read_text()
    edited.write_text(before.replace("Count to 1.", "Count to 9."))
    try:
        with pytest.raises(InputError, match=r"shard b\.json was input shard .*b\.json changed since it was "
                                             r"processed; .*--overwrite.*--resume-anyway") as e:
            plan_job(spec)
        assert "a.jsonl" not in str(e.value)
        overwrite = plan_job(spec, overwrite=True)  # runs every file again
        assert sorted(s.name for s in overwrite.todo) == ["a.jsonl", "b.json"]
        kept = plan_job(spec, resume_anyway=True)
        assert [k["name"] for k in kept.kept] == ["b.json"] and kept.todo == []
    finally:
        edited.write_text(before)
    # a file added next to the committed ones runs alone (the fake engine: this is about the data)
    from pipeline.testing import fake_engine_factory

    write_jsonl(tmp / "in" / "c.jsonl", [{"id": "c0", "prompt": "More."}, {"id": "c1", "prompt": "Again."}])
    assert [s.name for s in plan_job(spec).todo] == ["c.jsonl"]
    again = run_job(spec, progress=False, engine_factory=fake_engine_factory())
    assert again.exit_code == EXIT_OK, again.message
    assert again.totals.rows == 2 and again.skipped_shards == 2
    ids = read_dir(tmp / "out" / "results").column("id").to_pylist() + read_dir(tmp / "out" / "errors").column(
        "id").to_pylist()
    assert sorted(ids) == sorted(r["id"] for r in ROWS_A + ROWS_B) + ["c0", "c1"]
