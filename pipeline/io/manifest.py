"""The run manifest (OUTPUT/_manifest.json) and the exit-code policy of `qwen-batch run`."""

from __future__ import annotations

import time
from dataclasses import dataclass

from pipeline.errors import EXIT_CRASHED, EXIT_INVALID, EXIT_OK, EXIT_TOO_MANY_ERRORS  # noqa: F401 (re-exported)
from pipeline.ops.metrics import RunTotals
from pipeline.redact import redact
from pipeline.spec import spec_changes


@dataclass
class RunReport:
    """What a run did: its exit code (0 ok, 1 too many error rows, 2 invalid, 3 crashed), where
    its output is, and its row counts (this run's; shards committed before are skipped)."""

    output: str
    run_id: str
    totals: RunTotals
    wall_seconds: float
    skipped_shards: int = 0
    exit_code: int = EXIT_OK
    message: str = ""

    @property
    def rows(self) -> int:
        """Input rows this run computed."""
        return self.totals.rows

    @property
    def results(self) -> int:
        """Of them, rows that ended as a result row."""
        return self.totals.results

    @property
    def errors(self) -> int:
        """Of them, rows that ended as an error row (with its reason)."""
        return self.totals.errors


def start(spec, plan, run_id: str, *, started: float) -> dict:
    """The manifest of a run that is starting (started: when run_job was called; metrics
    timelines count their windows from it)."""
    retried = {} if plan.retry is None else {"retried": {
        "where": plan.retry.describe(), "spec_fingerprint": spec.fingerprint(),
        "rows": sum(len(v) for v in plan.redo.values()), "shards": sorted(plan.redo)}}
    dumped = redact(spec.model_dump(mode="json"))
    before = (plan.last_run or {}).get("spec")
    return {
        "run_id": run_id,
        "status": "running",
        "spec_fingerprint": spec.fingerprint(),
        "spec": dumped,
        "weights": plan.weights,
        "settings_changed": spec_changes(before, dumped) if before else [],
        "started_at": started,
        "resumed_anyway": bool(plan.kept),
        "kept": plan.kept,
        "orphaned": plan.orphaned,
        "shards": shard_entries(plan, {}),
        **retried,
    }


def outcome_recorded(manifest: dict | None) -> bool:
    """The run a manifest describes ended and recorded its outcome, and is no crash to resume
    (the rule both `run`'s nothing-to-do and `status` apply)."""
    return bool(manifest) and manifest.get("status") in ("complete", "failed") \
        and manifest.get("exit_code") != EXIT_CRASHED


def shard_entries(plan, records: dict[str, dict]) -> list[dict]:
    """One entry per input shard: committed (by which run, with how many rows) or pending."""
    entries = []
    for s in plan.shards:
        entry = {"name": s.name, "path": s.path, "input": s.fingerprint(), "status": "pending"}
        r = records.get(s.name)
        if r is not None:
            entry.update(status="committed", run_id=r["run_id"], rows=r["rows"], results=r["results"],
                         errors=r["errors"])
        entries.append(entry)
    return entries


def outcome(spec, manifest: dict, *, stopped: str | None, invalid: bool) -> tuple[int, str]:
    """(exit code, message) from the shard entries and why the run stopped, if it did."""
    shards = manifest["shards"]
    whole = {k: sum(e.get(k, 0) for e in shards) for k in ("rows", "results", "errors")}
    manifest["totals"] = whole
    pending = [e["path"] for e in shards if e["status"] != "committed"]
    if invalid:
        return EXIT_INVALID, stopped or ""
    if pending:
        return EXIT_CRASHED, (f"{len(pending)} shard(s) were not committed: {', '.join(pending[:5])}"
                              + (f"\nThe run stopped: {stopped}" if stopped else "")
                              + f"\n{len(shards) - len(pending)} committed shard(s) are kept; "
                                f"rerun the same command to resume.")
    rate = whole["errors"] / whole["rows"] if whole["rows"] else 0.0
    if rate > spec.output.max_error_rate:
        return EXIT_TOO_MANY_ERRORS, (f"{whole['errors']} of {whole['rows']} rows failed ({rate:.1%}), above "
                                      f"output.max_error_rate {spec.output.max_error_rate:.1%}")
    return EXIT_OK, ""


def finish(manifest: dict, *, code: int, message: str, stopped: str | None, wall: float,
           totals: RunTotals) -> dict:
    manifest.update(status="failed" if code else "complete", exit_code=code, message=message,
                    finished_at=time.time(), wall_seconds=wall, stopped_because=stopped,
                    this_run={k: getattr(totals, k) for k in
                              ("rows", "results", "errors", "prompt_tokens", "completion_tokens")})
    return manifest

