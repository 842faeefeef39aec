"""Token and time accounting: per-shard metrics rows and the end-of-run summary."""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc


def _sum(table: pa.Table, column: str) -> int:
    if column not in table.column_names or table.num_rows == 0:
        return 0
    return int(pc.sum(table.column(column)).as_py() or 0)


TIMELINE_S = 10.0  # window of the per-replica output timeline


def timeline(stage: pa.Table, origin: float) -> list[dict]:
    """Rows finished and tokens generated per TIMELINE_S window and engine actor; windows
    start at origin (the run's start), so every shard of a run shares them."""
    if stage.num_rows == 0:
        return []
    since = pc.subtract(stage.column("_finished"), origin)
    window = pc.add(pc.multiply(pc.floor(pc.divide(since, TIMELINE_S)), TIMELINE_S), origin)
    tokens = stage.column("completion_tokens") if "completion_tokens" in stage.column_names \
        else pa.nulls(stage.num_rows, pa.int64())
    table = pa.table({"at": window, "worker": stage.column("_worker"), "tokens": pc.fill_null(tokens, 0)})
    grouped = table.group_by(["at", "worker"]).aggregate([("tokens", "sum"), ("tokens", "count")])
    return sorted(({"at": r["at"], "worker": r["worker"], "rows": r["tokens_count"],
                    "completion_tokens": r["tokens_sum"]} for r in grouped.to_pylist()),
                  key=lambda r: (r["at"], r["worker"] or ""))


TOKEN_COLUMNS = ("prompt_tokens", "completion_tokens", "prompt_tokens_computed")


def part_summary(stage: pa.Table, origin: float) -> dict:
    """What a shard's metrics need from some of its stage rows, in a few numbers: token sums,
    first start, last finish, engine actors, the timeline. Summaries of a shard's parts
    merge into its metrics row (merge_parts) without its rows."""
    has = stage.num_rows > 0
    settings = stage.column("_engine_settings").drop_null() if has else []
    return {
        **{c: _sum(stage, c) if c in stage.column_names else None for c in TOKEN_COLUMNS},
        "started": pc.min(stage.column("_started")).as_py() if has else None,
        "finished": pc.max(stage.column("_finished")).as_py() if has else None,
        "workers": sorted(pc.unique(stage.column("_worker").drop_null()).to_pylist()) if has else [],
        "engine_settings": settings[0].as_py() if len(settings) else None,
        "timeline": timeline(stage, origin),
    }


def merge_parts(parts: list[dict], *, shard: str, rows: int, errors: int, context: dict) -> dict:
    """A shard's metrics row from its parts' summaries (part_summary)."""
    def total(key):
        values = [p[key] for p in parts if p.get(key) is not None]
        return sum(values) if values else None

    starts = [p["started"] for p in parts if p["started"] is not None]
    ends = [p["finished"] for p in parts if p["finished"] is not None]
    started, finished = (min(starts), max(ends)) if starts else (None, None)
    windows: dict[tuple, dict] = {}
    for p in parts:
        for w in p["timeline"]:
            cur = windows.setdefault((w["at"], w["worker"]), {**w, "rows": 0, "completion_tokens": 0})
            cur["rows"] += w["rows"]
            cur["completion_tokens"] += w["completion_tokens"]
    prompt, completion = total("prompt_tokens") or 0, total("completion_tokens") or 0
    wall = (finished - started) if started is not None else 0.0
    def per_s(n):
        return n / wall if wall > 0 else None

    return {
        "shard": shard,
        "rows": rows,
        "results": rows - errors,
        "errors": errors,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "prompt_tokens_computed": total("prompt_tokens_computed"),
        "wall_seconds": wall,
        "rows_per_s": per_s(rows),
        "output_tokens_per_s": per_s(completion),
        "total_tokens_per_s": per_s(prompt + completion),
        "started_at": started,
        "finished_at": finished,
        **context,
        "engine_settings": next((p["engine_settings"] for p in parts if p["engine_settings"]), None),
        "workers": sorted({w for p in parts for w in p["workers"]}),
        "timeline": sorted(windows.values(), key=lambda w: (w["at"], w["worker"] or "")),
    }


@dataclass
class RunTotals:
    rows: int = 0
    results: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    shards: list[dict] = field(default_factory=list)

    def add(self, m: dict) -> None:
        self.shards.append(m)
        for k in ("rows", "results", "errors", "prompt_tokens", "completion_tokens"):
            setattr(self, k, getattr(self, k) + m[k])


def summary_table(totals: RunTotals, *, wall_seconds: float, title: str):
    """A rich Table: one line per shard (first 20) and the run's totals."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("shard", "rows", "ok", "errors", "in tok", "out tok", "rows/s", "out tok/s"):
        t.add_column(col, justify="left" if col == "shard" else "right", no_wrap=True,
                     min_width=14 if col == "shard" else None)

    def fmt(x):
        return "-" if x is None else f"{x:,.1f}"

    for m in totals.shards[:20]:
        t.add_row(m["shard"].rsplit("/", 1)[-1].removesuffix(".parquet"), f"{m['rows']:,}", f"{m['results']:,}",
                  f"{m['errors']:,}", f"{m['prompt_tokens']:,}", f"{m['completion_tokens']:,}", fmt(m["rows_per_s"]),
                  fmt(m["output_tokens_per_s"]))
    if len(totals.shards) > 20:
        t.add_row(f"... {len(totals.shards) - 20} more", "", "", "", "", "", "", "")
    def rate(n):
        return n / wall_seconds if wall_seconds > 0 else None

    t.add_section()
    t.add_row("total", f"{totals.rows:,}", f"{totals.results:,}", f"{totals.errors:,}",
              f"{totals.prompt_tokens:,}", f"{totals.completion_tokens:,}", fmt(rate(totals.rows)),
              fmt(rate(totals.completion_tokens)), style="bold")
    return t
