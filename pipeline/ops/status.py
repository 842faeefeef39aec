"""`qwen-batch status OUTPUT`: how the last run ended and what a rerun would do.

Reads only small things, so that it is fast on an object store: the manifest, the commit
records, the listing of the data folders (for files qwen-batch did not write), the committed
metrics rows (one per shard), the `error_type` column of the committed errors files (only
shards with error rows have one), and the lock. Never the input, never the results. What a
rerun would do assumes the same spec and unchanged input files (the run itself re-checks
both).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq

from pipeline.io.ledger import poison_rows
from pipeline.io.manifest import EXIT_CRASHED, EXIT_INVALID, EXIT_OK, EXIT_TOO_MANY_ERRORS, outcome_recorded
from pipeline.io.output import OutputStore
from pipeline.io.output_lock import OutputLock, read_holder
from pipeline.io.shards import InputError
from pipeline.ops.metrics import run_grading
from pipeline.redact import redact_text

OUTCOMES = {  # (manifest status, exit code) -> outcome
    EXIT_OK: "complete",
    EXIT_TOO_MANY_ERRORS: "failed",
    EXIT_INVALID: "invalid",
    EXIT_CRASHED: "stopped",
}


def _error_types(store: OutputStore, records: list[dict]) -> dict[str, int]:
    """Error rows by error_type: from the commit records, or (records written before they
    carried the counts) that one column of the committed errors files."""
    counts: dict[str, int] = {}
    for r in records:
        for t, n in (r.get("errors_by_type") or {}).items():
            counts[t] = counts.get(t, 0) + n
    files = [f for r in records if "errors_by_type" not in r for f in r["files"].get("errors", [])]

    def read(rel: str) -> list:
        with store.fs.open_input_file(store.abs(rel)) as f:
            return pq.read_table(f, columns=["error_type"]).column(0).to_pylist()

    with ThreadPoolExecutor(8) as pool:
        for types in pool.map(read, files):
            for t in types:
                counts[t or "unknown"] = counts.get(t or "unknown", 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _throughput(metrics: list[dict]) -> list[dict]:
    """Per run that committed shards: rows, tokens and its generation span (first row started
    to last row finished, over its shards), oldest run first."""
    runs: dict[str, dict] = {}
    for m in metrics:
        r = runs.setdefault(m.get("run_id") or "?", {"run_id": m.get("run_id"), "shards": 0, "rows": 0,
                                                      "prompt_tokens": 0, "completion_tokens": 0,
                                                      "started_at": None, "finished_at": None})
        r["shards"] += 1
        for k in ("rows", "prompt_tokens", "completion_tokens"):
            r[k] += m.get(k) or 0
        if m.get("started_at") is not None:
            r["started_at"] = min(filter(None, (r["started_at"], m["started_at"])))
        if m.get("finished_at") is not None:
            r["finished_at"] = max(filter(None, (r["finished_at"], m["finished_at"])))
    out = []
    for r in runs.values():
        span = (r["finished_at"] - r["started_at"]) if r["started_at"] is not None else 0.0
        r["generation_seconds"] = span
        r["rows_per_s"] = r["rows"] / span if span > 0 else None
        r["output_tokens_per_s"] = r["completion_tokens"] / span if span > 0 else None
        out.append(r)
    return sorted(out, key=lambda r: r["started_at"] or 0)


def _lock(store: OutputStore, holder: dict | None) -> dict | None:
    """Who holds the lock, how fresh, and whether a run would take it over (None: free)."""
    if holder is None:
        return None
    stale = OutputLock(store.fs, store.root, "status").stale_reason(holder)
    beat = holder.get("heartbeat_at")
    return {"run_id": holder.get("run_id"), "host": holder.get("host"), "pid": holder.get("pid"),
            "heartbeat_at": beat, "age_seconds": (time.time() - float(beat)) if beat else None,
            "readable": bool(holder), "stale": stale}


def _outcome(manifest: dict, lock: dict | None) -> str:
    """The last run's outcome (OUTCOMES, running, interrupted, partial, unknown)."""
    status, code = manifest.get("status"), manifest.get("exit_code")
    if not manifest:
        return "unknown"
    if status == "running":
        live = lock is not None and lock["stale"] is None
        return "running" if live and lock["run_id"] == manifest.get("run_id") else "interrupted"
    if code == EXIT_OK:
        return "partial" if (manifest.get("totals") or {}).get("errors") else "complete"
    return OUTCOMES.get(code, status or "unknown")


def _rerun(manifest: dict, lock: dict | None, *, pending: int, pending_rows: int, committed: int) -> dict:
    """What `qwen-batch run` with the same spec would do now."""
    live = lock is not None and lock["stale"] is None
    if live:
        who = f"run {lock['run_id']} (pid {lock['pid']} on {lock['host']})" if lock["readable"] else "another run"
        return {"action": "refused", "shards": 0, "rows": 0, "exit_code": EXIT_INVALID,
                "text": f"refused (exit {EXIT_INVALID}): {who} holds the lock; nothing would be touched"}
    if not manifest:
        return {"action": "unknown", "shards": None, "rows": None, "exit_code": None,
                "text": "unknown: there is no manifest (no run has started here with this qwen-batch)"}
    if pending:
        rerun = {"action": "run", "shards": pending, "rows": pending_rows, "exit_code": None,
                 "text": f"run {pending} pending shard(s), {pending_rows:,} rows; the "
                         f"{committed} committed shard(s) are kept"}
    elif outcome_recorded(manifest):
        code = manifest.get("exit_code")
        return {"action": "nothing", "shards": 0, "rows": 0, "exit_code": code,
                "text": f"nothing to do (no model loads): every shard is committed; it exits {code} "
                        f"as the last run did"}
    else:  # every shard committed, but the last run did not record its end
        rerun = {"action": "finish", "shards": 0, "rows": 0, "exit_code": None,
                 "text": "run no shard: every shard is committed, but the last run did not record its "
                         "end; a rerun records the outcome in the manifest"}
    if lock is not None:
        rerun["text"] += " (it takes over the stale lock)"
    return rerun


def collect(output: str) -> dict:
    """Everything `status` shows, as plain data (what --json prints)."""
    store = OutputStore(output)
    try:
        manifest = store.read_manifest()
        records = store.records()
        holder = read_holder(store.fs, store.root)
        foreign = store.foreign(records)
        poison = poison_rows(output)
    except OSError as e:
        raise InputError(f"output {output} cannot be read: {e}") from None
    if manifest is None and not records and holder is None:
        raise InputError(f"{output}: no qwen-batch output here (no _manifest.json, no _commits/, no "
                         f"_lock.json); give a job's output.path")
    manifest = manifest or {}
    entries = manifest.get("shards") or []
    listed = [e["name"] for e in entries]
    in_manifest = set(listed)
    committed = [n for n in listed if n in records] if entries else sorted(records)
    pending = [e for e in entries if e["name"] not in records]
    orphaned = sorted(n for n in records if entries and n not in in_manifest)
    counted = [records[n] for n in committed]

    lock = _lock(store, holder)
    status, code = manifest.get("status"), manifest.get("exit_code")
    errors = sum(r["errors"] for r in counted)
    outcome = _outcome(manifest, lock)

    metrics_table = store.read_committed("metrics", {n: records[n] for n in committed})
    metrics = metrics_table.to_pylist() if metrics_table is not None else []
    runs = _throughput(metrics)
    last = next((r for r in reversed(runs) if r["run_id"] == manifest.get("run_id")), runs[-1] if runs else None)

    pending_rows = sum((e.get("input") or {}).get("rows", 0) for e in pending)
    rerun = _rerun(manifest, lock, pending=len(pending), pending_rows=pending_rows, committed=len(committed))

    totals = {k: sum(r[k] for r in counted) for k in ("rows", "results")}
    return {
        "output": redact_text(output),
        "last_run": {
            "run_id": manifest.get("run_id"), "name": (manifest.get("spec") or {}).get("name"),
            "status": status, "outcome": outcome, "exit_code": code,
            "message": redact_text(manifest.get("message") or "") or None,
            "stopped_because": manifest.get("stopped_because"),
            "started_at": manifest.get("started_at"), "finished_at": manifest.get("finished_at"),
            "wall_seconds": manifest.get("wall_seconds"), "resumed_anyway": manifest.get("resumed_anyway"),
            "settings_changed": manifest.get("settings_changed") or [],
        },
        "shards": {"total": len(listed) if entries else len(records), "committed": len(committed),
                   "pending": len(pending), "orphaned": len(orphaned),
                   "kept": len(manifest.get("kept") or []),
                   "pending_names": [e["name"] for e in pending], "orphaned_names": orphaned},
        "rows": {"rows": totals["rows"], "results": totals["results"], "errors": errors,
                 "pending": pending_rows},
        "errors_by_type": _error_types(store, counted),
        "tokens": {"prompt": sum(m.get("prompt_tokens") or 0 for m in metrics),
                   "completion": sum(m.get("completion_tokens") or 0 for m in metrics)},
        "throughput": {"last_run": last, "runs": runs},
        "grading": _grading(metrics, manifest),
        "lock": lock,
        "rerun": rerun,
        "foreign_files": foreign,
        "poison_rows": poison,
    }


def _grading(metrics: list[dict], manifest: dict) -> dict | None:
    """classify's graded-run scores and review count over the committed shards (metrics rows
    summed: pipeline.ops.metrics.run_grading), with the options that asked for them; None
    when the job asked for neither."""
    g = run_grading(metrics)
    if g is None:
        return None
    options = ((manifest.get("spec") or {}).get("task") or {}).get("options") or {}
    return {"gold_column": options.get("gold_column"), "abstain_below": options.get("abstain_below"), **g}


def _grading_lines(g: dict | None) -> list[str]:
    if g is None:
        return []
    out = []
    if g.get("graded") is not None:
        unknown = f"; {g['gold_unknown']:,} with a gold label not among the labels (not graded)" \
            if g.get("gold_unknown") else ""
        if g["graded"]:
            out.append(f"Graded: {g['graded']:,} rows with a gold label{unknown}: accuracy {g['accuracy']:.3f}, "
                       f"macro-F1 {g['macro_f1']:.3f}, ECE {g['ece']:.3f} (10 bins)")
            labels = g["labels"]
            if len(labels) <= 12:
                counts = {(c["gold"], c["predicted"]): c["count"] for c in g["confusion"]}
                width = max(6, *(len(x) for x in labels))
                out.append("  confusion (rows: gold, columns: predicted):")
                out.append("  " + " " * width + " " + " ".join(f"{x:>{width}}" for x in labels))
                out += ["  " + f"{gold:>{width}} " + " ".join(f"{counts.get((gold, p), 0):>{width},}" for p in labels)
                        for gold in labels]
        else:
            out.append(f"Graded: no row with a gold label among the labels yet{unknown}")
    if g.get("review") is not None:
        below = f" (confidence under {g['abstain_below']})" if g.get("abstain_below") is not None else ""
        out.append(f"Review: {g['review']:,} rows flagged for review{below}")
    return out


def _when(t: float | None) -> str:
    if not t:
        return "-"
    age = time.time() - t
    ago = f"{age:.0f} s" if age < 120 else f"{age / 60:.0f} min" if age < 7200 else f"{age / 3600:.1f} h"
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t))} ({ago} ago)"


def _rate(x: float | None, unit: str) -> str:
    return "-" if x is None else f"{x:,.1f} {unit}"


def render(s: dict) -> list[str]:
    """The human lines of `status`."""
    run, sh, rows = s["last_run"], s["shards"], s["rows"]
    out = [f"Output: {s['output']}"]
    if run["run_id"]:
        code = "-" if run["exit_code"] is None else run["exit_code"]
        what = {"complete": "complete: every row has a result",
                "partial": f"partial: {rows['errors']:,} error row(s), within output.max_error_rate",
                "failed": "failed: more error rows than output.max_error_rate",
                "invalid": "invalid: refused before any shard ran",
                "stopped": "stopped before every shard was committed",
                "running": "running now",
                "interrupted": "did not finish: its driver was killed or its machine stopped "
                               "(no outcome recorded)"}.get(run["outcome"], run["outcome"])
        out.append(f"Last run: {run['run_id']}" + (f" ({run['name']})" if run["name"] else "")
                   + f", started {_when(run['started_at'])}")
        out.append(f"Outcome: {what}; exit code {code}"
                   + (f", after {run['wall_seconds']:,.0f} s" if run["wall_seconds"] else ""))
        if run["message"]:
            out += [f"  {line}" for line in run["message"].splitlines()]
        if run["settings_changed"]:
            out.append("Settings changed since the run before it: " + "; ".join(run["settings_changed"][:8]))
    else:
        out.append("Last run: unknown (no _manifest.json)")
    out.append(f"Shards: {sh['committed']} committed, {sh['pending']} pending, {sh['orphaned']} orphaned"
               + (f" (of {sh['total']} in the last run's plan)" if run["run_id"] else "")
               + (f"; {sh['kept']} kept by --resume-anyway" if sh["kept"] else ""))
    if sh["pending_names"]:
        out.append("  pending: " + ", ".join(sh["pending_names"][:5]) + (" ..." if sh["pending"] > 5 else ""))
    if sh["orphaned_names"]:
        out.append("  orphaned (input file gone, not counted): " + ", ".join(sh["orphaned_names"][:5])
                   + (" ..." if sh["orphaned"] > 5 else ""))
    out.append(f"Rows: {rows['rows']:,} committed: {rows['results']:,} results, {rows['errors']:,} errors"
               + (f"; {rows['pending']:,} rows pending" if rows["pending"] else ""))
    if s["errors_by_type"]:
        out.append("Errors by type: " + ", ".join(f"{t} {n:,}" for t, n in s["errors_by_type"].items()))
    tok, last = s["tokens"], s["throughput"]["last_run"]
    out.append(f"Tokens: {tok['prompt']:,} in, {tok['completion']:,} out")
    for r in s["throughput"]["runs"]:
        out.append(f"Throughput of run {r['run_id']}: {_rate(r['output_tokens_per_s'], 'out tok/s')}, "
                   f"{_rate(r['rows_per_s'], 'rows/s')} ({r['shards']} shard(s), {r['rows']:,} rows, "
                   f"{r['generation_seconds']:,.1f} s from first row started to last finished)")
    if last is None:
        out.append("Throughput: - (no committed metrics)")
    out += _grading_lines(s.get("grading"))
    lock = s["lock"]
    if lock is None:
        out.append("Lock: free")
    elif not lock["readable"]:
        out.append("Lock: _lock.json cannot be read" + (f"; stale: {lock['stale']}" if lock["stale"] else
                                                        " (a run may be writing it now)"))
    else:
        out.append(f"Lock: held by run {lock['run_id']} (pid {lock['pid']} on {lock['host']}), last refreshed "
                   f"{_when(lock['heartbeat_at'])}" + (f"; stale: {lock['stale']}" if lock["stale"] else ""))
    out.append(f"A rerun would: {s['rerun']['text']} (if the spec and input are unchanged)")
    if s["poison_rows"]:
        ids = ", ".join(repr(p["id"]) for p in s["poison_rows"][:5]) + (" ..." if len(s["poison_rows"]) > 5 else "")
        out.append(f"Poison rows: {len(s['poison_rows'])} (each killed an engine running it alone; an engine_died "
                   f"error row, not run again): {ids}; `qwen-batch run --retry-errors` tries them again")
    if s["foreign_files"]:
        out.append("Foreign files (not written by qwen-batch, never deleted, not part of the output): "
                   + ", ".join(s["foreign_files"][:5]) + (" ..." if len(s["foreign_files"]) > 5 else ""))
    return out
