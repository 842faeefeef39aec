"""The write side of a run: workers write rows, the driver commits shards by metadata.

`write_parts` runs in Ray Data tasks after the engine actors: it writes each batch's result
and error rows to attempt-unique files and hands the driver one small summary per shard
(files, row counts, an id digest, token sums). `ShardCommitter`, on the driver, adds up the
summaries of each shard and commits the shard once its ids are exactly the input's, with a
metrics row and a commit record (pipeline.io.output). No result row passes through the driver,
so its memory and speed do not depend on how many rows a job has.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.io.output import OutputStore
from pipeline.io.output_lock import check_holder
from pipeline.io.schemas import arrow_schema
from pipeline.io.shard_column import SHARD_COLUMN, path_key  # noqa: F401 (SHARD_COLUMN: re-exported)
from pipeline.io.shards import NO_IDS, IdDigest, Shard, id_digest, read_columns
from pipeline.ops.metrics import RunTotals, merge_parts, part_summary

FAULT_AT = "QWEN_BATCH_FAULT_AT"  # tests: SIGKILL the driver at this commit step


def fault_point(step: str) -> None:
    """Kill this process at a named step of a commit, when a test asks for it."""
    if os.environ.get(FAULT_AT) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def split_stage(stage: pa.Table, head: str, id_type: pa.DataType,
                results_schema: pa.Schema | None = None) -> tuple[pa.Table, pa.Table]:
    """Stage rows -> (results, errors) in their schemas' columns and types; results_schema:
    the job's (Head.result_schema) when the head's columns follow its options."""
    results_schema = results_schema or arrow_schema(f"results_{head}", id_type=id_type)
    errors_schema = arrow_schema("errors", id_type=id_type)
    failed = pc.is_valid(stage.column("error_type"))
    results = stage.filter(pc.invert(failed)).select(results_schema.names).cast(results_schema)
    errors = stage.filter(failed).select(errors_schema.names).cast(errors_schema)
    return results, errors


PART_SCHEMA = pa.schema([
    ("shard", pa.string()), ("results_file", pa.string()), ("errors_file", pa.string()),
    ("results", pa.int64()), ("errors", pa.int64()), ("id_count", pa.int64()), ("id_hash", pa.uint64()),
    ("summary", pa.string()), ("results_bytes", pa.int64()), ("errors_bytes", pa.int64()),
])


class PartWriter:
    """Ray Data stage: stage rows -> data files; returns one summary row per shard touched."""

    def __init__(self, *, output: str, run_id: str, head: str, id_type: pa.DataType,
                 shard_names: dict[str, str], origin: float, results_schema: pa.Schema | None = None):
        self.store = OutputStore(output)
        self.run_id, self.head, self.id_type, self.origin = run_id, head, id_type, origin
        self.results_schema = results_schema
        self.names = {path_key(p): n for p, n in shard_names.items()}

    def __call__(self, stage: pa.Table) -> pa.Table:
        # The fencing check: a run that lost its lock writes nothing more.
        check_holder(self.store.fs, self.store.root, self.run_id)
        rows = []
        paths = stage.column(SHARD_COLUMN)
        for path in pc.unique(paths).to_pylist():
            part = stage.filter(pc.equal(paths, path))
            name = self.names[path_key(path)]
            results, errors = split_stage(part, self.head, self.id_type, self.results_schema)
            files = {}
            for kind, table in (("results", results), ("errors", errors)):
                if table.num_rows:
                    files[kind] = self.store.write_table(self.store.part_name(kind, name, self.run_id), table)
            digest = id_digest(part.column("id"))
            summary = part_summary(part, self.origin)
            summary["errors_by_type"] = {r["values"]: r["counts"] for r in
                                         pc.value_counts(errors.column("error_type")).to_pylist()}
            rows.append({"shard": name, "results_file": files.get("results"), "errors_file": files.get("errors"),
                         "results": results.num_rows, "errors": errors.num_rows,
                         "id_count": digest.count, "id_hash": digest.hash,
                         "summary": json.dumps(summary),
                         **{f"{kind}_bytes": self.store.sizes.get(rel) for kind, rel in files.items()}})
        return pa.Table.from_pylist(rows, schema=PART_SCHEMA)


def write_parts(stage: pa.Table, **options) -> pa.Table:
    """The write stage as a Ray Data task function (options: PartWriter's)."""
    return PartWriter(**options)(stage)


class ShardCommitter:
    """Driver side: adds up part summaries per shard and commits each shard exactly once."""

    def __init__(self, *, store: OutputStore, input_fs, id_column: str, shards: list[Shard], head: str,
                 id_type: pa.DataType, record: dict, context: dict, fence, totals: RunTotals,
                 redo: dict[str, tuple[pa.Array, dict]] | None = None, redo_where: str | None = None,
                 results_schema: pa.Schema | None = None):
        """record: what every commit record of this run says (run id, spec fingerprint);
        context: what every metrics row says; fence: raises if the run lost its lock;
        redo: committed shards of which only some rows run again (--retry-errors), with the
        ids to redo and the shard's commit record, which the new record replaces."""
        self.store, self.input_fs, self.id_column = store, input_fs, id_column
        self.head, self.id_type = head, id_type
        self.results_schema = results_schema or arrow_schema(f"results_{head}", id_type=id_type)
        self.record, self.context, self.fence, self.totals = record, context, fence, totals
        self.redo, self.redo_where = redo or {}, redo_where
        self.pending = {s.name: s for s in shards}
        self.expected = {s.name: id_digest(self.redo[s.name][0]) if s.name in self.redo else s.ids for s in shards}
        self.parts: dict[str, list[dict]] = {s.name: [] for s in shards}
        self.seen: dict[str, IdDigest] = {s.name: NO_IDS for s in shards}
        for s in shards:
            if self.expected[s.name] == NO_IDS:
                self._commit(s)

    def add(self, parts: pa.Table) -> None:
        """Take a batch of part summaries; commit the shards they complete."""
        for p in parts.to_pylist():
            name = p["shard"]
            if name not in self.pending:  # a late duplicate of a shard already committed
                continue
            self.parts[name].append(p)
            self.seen[name] += IdDigest(p["id_count"], p["id_hash"])
            if self.seen[name] == self.expected[name]:
                self._commit(self.pending[name])

    def finish(self) -> list[tuple[Shard, int, int]]:
        """After the last batch: shards whose ids do not add up (rows that never came back,
        or came back twice) are repaired from their files and committed. Returns
        (shard, missing, duplicated) for each repaired shard."""
        repaired = []
        for shard in list(self.pending.values()):
            results, errors, missing, dupes = self._repair(shard)
            self._commit(shard, results=results, errors=errors)
            repaired.append((shard, missing, dupes))
        return repaired

    def _repair(self, shard: Shard) -> tuple[pa.Table, pa.Table, int, int]:
        """Read a shard's parts, keep each id's first row, add an error row per missing id."""
        def read(kind):
            files = [p[f"{kind}_file"] for p in self.parts[shard.name] if p[f"{kind}_file"]]
            schema = self.results_schema if kind == "results" else arrow_schema("errors", id_type=self.id_type)
            return pa.concat_tables([schema.empty_table()] + [self.store.read_table(f).cast(schema) for f in files])

        results, errors = read("results"), read("errors")
        ids = pa.chunked_array([results.column("id"), errors.column("id")]).combine_chunks()
        index = pa.table({"id": ids, "i": pa.array(range(len(ids)), pa.int64())})
        keep = index.group_by("id").aggregate([("i", "min")]).column("i_min")
        dupes = len(ids) - len(keep)
        in_results = pc.less(keep, results.num_rows)
        results = results.take(pc.filter(keep, in_results))
        errors = errors.take(pc.subtract(pc.filter(keep, pc.invert(in_results)), results.num_rows)) \
            if dupes else errors
        if shard.name in self.redo:
            expected = self.redo[shard.name][0]
        else:
            # the input's ids, whatever its format (Parquet or JSON lines)
            expected = read_columns(self.input_fs, shard, [self.id_column]).column(0).cast(self.id_type)
        missing = pc.filter(expected, pc.invert(pc.is_in(expected, value_set=ids)))
        if len(missing):
            lost = pa.table({"id": missing.cast(self.id_type),
                             "error_type": pa.array(["engine_died"] * len(missing)),
                             "error_message": pa.array(["the row never came back from the engine actors; "
                                                        "rerun with --retry-errors to try it again"] * len(missing))})
            errors = pa.concat_tables([errors, lost.cast(errors.schema)])
        return results, errors, len(missing), dupes

    def _merge_with_committed(self, name: str, new: dict) -> dict:
        """The record of a shard some of whose rows were redone: its committed files, those
        holding redone rows rewritten without them, plus this run's files. One record names
        them all, so readers see the old rows or the new ones, never both or neither."""
        ids, old = self.redo[name]
        files = {kind: list(new["files"][kind]) for kind in ("results", "errors", "metrics")}
        files["metrics"] = old["files"]["metrics"] + files["metrics"]
        removed_errors: dict[str, int] = {}
        removed = {"results": 0, "errors": 0}
        for kind in ("results", "errors"):
            kept = []
            for rel in old["files"][kind]:
                table = self.store.read_table(rel)
                hit = pc.is_in(table.column("id"), value_set=ids)
                if not pc.any(hit).as_py():
                    kept.append(rel)
                    continue
                removed[kind] += int(pc.sum(hit).as_py())
                if kind == "errors":
                    for r in pc.value_counts(table.filter(hit).column("error_type")).to_pylist():
                        removed_errors[r["values"]] = removed_errors.get(r["values"], 0) + r["counts"]
                rest = table.filter(pc.invert(hit))
                if rest.num_rows:
                    kept.append(self.store.write_table(self.store.part_name(kind, name, self.record["run_id"]), rest))
            files[kind] = kept + files[kind]
        by_type = dict(old.get("errors_by_type") or {})
        for t, n in removed_errors.items():
            by_type[t] = by_type.get(t, 0) - n
        for t, n in new["errors_by_type"].items():
            by_type[t] = by_type.get(t, 0) + n
        errors = old["errors"] - removed["errors"] + new["errors"]
        return {**old, "files": files, "errors": errors, "results": old["rows"] - errors,
                "errors_by_type": {t: n for t, n in sorted(by_type.items()) if n},
                "redone": old.get("redone", []) + [{"run_id": self.record["run_id"], "rows": len(ids),
                                                     "spec_fingerprint": self.record["spec_fingerprint"],
                                                     "where": self.redo_where}],
                "committed_at": new["committed_at"]}

    def _commit(self, shard: Shard, *, results: pa.Table | None = None, errors: pa.Table | None = None) -> None:
        parts = self.parts.get(shard.name, [])
        run_id = self.record["run_id"]
        summaries = [json.loads(p["summary"]) for p in parts]
        if results is None:  # the normal path: the workers' files as they are
            files = {kind: [p[f"{kind}_file"] for p in parts if p[f"{kind}_file"]] for kind in ("results", "errors")}
            n_errors = sum(p["errors"] for p in parts)
            by_type: dict[str, int] = {}
            for summary in summaries:
                for t, n in summary.get("errors_by_type", {}).items():
                    by_type[t] = by_type.get(t, 0) + n
        else:  # repaired: one new file each
            files = {kind: [self.store.write_table(self.store.part_name(kind, shard.name, run_id), table)]
                     for kind, table in (("results", results), ("errors", errors)) if table.num_rows}
            files = {"results": files.get("results", []), "errors": files.get("errors", [])}
            n_errors = errors.num_rows
            by_type = {r["values"]: r["counts"] for r in pc.value_counts(errors.column("error_type")).to_pylist()}
        fault_point("before-metrics")
        ran = self.expected[shard.name].count  # rows this run computed: the shard, or its redone rows
        m = merge_parts(summaries, shard=shard.path, rows=ran, errors=n_errors, context=self.context)
        metrics = pa.Table.from_pylist([m], schema=arrow_schema("metrics"))
        files["metrics"] = [self.store.write_table(self.store.part_name("metrics", shard.name, run_id), metrics)]
        record = {**self.record, "name": shard.name, "input": shard.fingerprint(),
                  "rows": shard.rows, "results": shard.rows - n_errors, "errors": n_errors,
                  "errors_by_type": dict(sorted(by_type.items())),
                  "ids": {"count": shard.ids.count, "hash": shard.ids.hash} if shard.ids else None,
                  "files": files, "committed_at": time.time()}
        if shard.name in self.redo:
            record = self._merge_with_committed(shard.name, record)
        # Every file this run wrote for the record is checked against the size its writer saw.
        written = {p[f"{kind}_file"]: p.get(f"{kind}_bytes") for p in parts for kind in ("results", "errors")
                   if p[f"{kind}_file"]}
        named = [f for kind in ("results", "errors", "metrics") for f in record["files"][kind]]
        sizes = {f: n for f in named if (n := written.get(f, self.store.sizes.get(f))) is not None}
        fault_point("before-record")
        self.fence()
        self.store.commit(record, sizes)
        fault_point("after-record")
        self.pending.pop(shard.name, None)
        self.totals.add(m)

