"""A commit survives power loss (issue #27, item 8): on a local disk every data file, the
commit record and the folders naming them are fsynced before the shard counts; on an object
store the commit refuses to name a file that is missing or not the size its writer wrote,
and a data file that cannot be written leaves nothing behind.

A shard is committed here the way a run does it, in this process: PartWriter (the write
stage) writes its rows, ShardCommitter (the driver) commits it."""

from __future__ import annotations

import os
import posixpath

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.io.sink as sink
from pipeline.io.output import OutputStore, new_run_id
from pipeline.io.schemas import arrow_schema
from pipeline.io.shards import check_shards, open_shards
from pipeline.ops.metrics import RunTotals

pytestmark = pytest.mark.unit  # no Ray: the write stage and the driver run in this process

SHARD = "d/part-0.parquet"  # a nested name: its folders are made on first write
IDS = [1, 2, 3, 4]


@pytest.fixture(autouse=True)
def _holder(monkeypatch):
    monkeypatch.setattr(sink, "check_holder", lambda *a: None)  # no lock file in these tests


def _input(tmp_path):
    (tmp_path / "in" / "d").mkdir(parents=True)
    pq.write_table(pa.table({"id": IDS, "prompt": [f"p{i}" for i in IDS]}), tmp_path / "in" / SHARD)
    fs, shards = open_shards(str(tmp_path / "in"))
    check_shards(fs, shards, id_column="id", any_of=["prompt"], reads=["prompt"])
    return fs, shards[0]


def _stage(shard) -> pa.Table:
    """What the engine actors hand the write stage: rows 1, 2 and 4 answered, 3 an error row."""
    n = len(IDS)
    return pa.table({
        "path": [shard.path] * n, "id": IDS,
        "response": ["ok", "ok", None, "ok"], "reasoning": [None] * n, "finish_reason": ["stop", "stop", None, "stop"],
        "prompt_tokens": [3] * n, "completion_tokens": [2, 2, None, 2],
        "error_type": [None, None, "invalid_input", None], "error_message": [None, None, "bad row", None],
        "_started": [1.0] * n, "_finished": [2.0] * n, "_worker": ["w0"] * n, "_engine_settings": [None] * n,
        "tool_calls": [None] * n,  # the rows offered no tools
        "samples": [None] * n,  # nor asked for several samples
    }, schema=pa.schema([("path", pa.string()), ("id", pa.int64()), ("response", pa.string()),
                         ("reasoning", pa.string()), ("finish_reason", pa.string()), ("prompt_tokens", pa.int64()),
                         ("completion_tokens", pa.int64()), ("error_type", pa.string()),
                         ("error_message", pa.string()), ("_started", pa.float64()), ("_finished", pa.float64()),
                         ("_worker", pa.string()), ("_engine_settings", pa.string()),
                         arrow_schema("results_chat", id_type=pa.int64()).field("tool_calls"),
                         arrow_schema("results_chat", id_type=pa.int64()).field("samples")]))


def _commit(output: str, input_fs, shard, *, before_commit=lambda store, parts: None) -> OutputStore:
    """Write the shard's rows as the write stage does, then commit it as the driver does."""
    run_id = new_run_id()
    parts = sink.PartWriter(output=output, run_id=run_id, head="chat", id_type=pa.int64(),
                            shard_names={shard.path: shard.name}, origin=0.0)(_stage(shard))
    store = OutputStore(output)
    before_commit(store, parts)
    committer = sink.ShardCommitter(
        store=store, input_fs=input_fs, id_column="id", shards=[shard], head="chat", id_type=pa.int64(),
        record={"run_id": run_id, "spec_fingerprint": "f"}, context={"run_id": run_id, "head": "chat"},
        fence=lambda: None, totals=RunTotals())
    committer.add(parts)
    return store


def test_a_local_commit_fsyncs_files_record_and_folders_before_it_counts(tmp_path, monkeypatch):
    input_fs, shard = _input(tmp_path)
    out = tmp_path / "out"
    record = out / "_commits" / f"{SHARD}.json"
    synced: list[tuple[str, bool]] = []  # (path, whether the record was visible then)
    real_fsync = os.fsync

    def spy(fd):
        real_fsync(fd)
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), record.exists()))

    monkeypatch.setattr(os, "fsync", spy)
    store = _commit(str(out), input_fs, shard)

    committed = store.records()[SHARD]
    assert committed["results"] == 3 and committed["errors"] == 1
    before = {p for p, visible in synced if not visible}
    after = {p for p, visible in synced if visible}
    files = [str(out / f) for kind in ("results", "errors", "metrics") for f in committed["files"][kind]]
    assert len(files) == 3
    for f in files:  # each data file, and every folder above it up to the output, before the record
        assert f in before, f
        folder = posixpath.dirname(f)
        while folder != str(out):
            assert folder in before, folder
            folder = posixpath.dirname(folder)
    assert str(out) in before
    temps = [p for p in before if posixpath.basename(p).startswith(f".{posixpath.basename(SHARD)}.json.")]
    assert temps and posixpath.dirname(temps[0]) == str(record.parent)  # the record, before its rename
    assert {str(record.parent), str(out / "_commits"), str(out)} <= after  # its folders, after the rename


@pytest.mark.parametrize("damage", ["missing", "short"])
def test_an_object_store_commit_refuses_a_missing_or_short_file(tmp_path, s3_server, s3_bucket, damage):
    input_fs, shard = _input(tmp_path)
    out = f"{s3_bucket}/out"

    def damage_a_file(store, parts):
        rel = parts.column("results_file")[0].as_py()
        if damage == "missing":
            s3_server.delete(f"{out}/{rel}")
        else:
            s3_server.write(f"{out}/{rel}", s3_server.read(f"{out}/{rel}")[:-100])

    with pytest.raises(RuntimeError, match=r"shard d/part-0\.parquet was not committed: .*results/d/part-0\.parquet/"
                                           + ("[^ ]+ is missing" if damage == "missing" else r"[^ ]+ has \d+ bytes")):
        _commit(out, input_fs, shard, before_commit=damage_a_file)
    assert OutputStore(out).records() == {}
    assert not any(k.startswith("_commits/") for k in s3_server.list(out))


def test_an_object_store_commit_names_whole_files(tmp_path, s3_server, s3_bucket):
    input_fs, shard = _input(tmp_path)
    store = _commit(f"{s3_bucket}/out", input_fs, shard)
    results = store.read_committed("results")
    assert sorted(results.column("id").to_pylist()) == [1, 2, 4]


def test_a_data_file_that_cannot_be_written_leaves_nothing_on_the_store(s3_server, s3_bucket):
    store = OutputStore(f"{s3_bucket}/out")
    unwritable = pa.table({"id": [1], "x": pa.array([(1, 2, 3)], pa.month_day_nano_interval())})
    with pytest.raises(pa.ArrowNotImplementedError):
        store.write_table(store.part_name("results", SHARD, new_run_id()), unwritable)
    assert s3_server.list(f"{s3_bucket}/out") == []
