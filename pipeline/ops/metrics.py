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


ECE_BINS = 10  # equal-width bins of the top label's probability, for the calibration error
GRADING = ("review", "graded", "correct", "gold_unknown", "confusion", "calibration")  # metrics columns


def calibration_bin(confidence: float) -> int:
    """The bin of a probability: [b/10, (b+1)/10), with 1.0 in the last."""
    return min(max(int(confidence * ECE_BINS), 0), ECE_BINS - 1)


def grading_counts(rows: list[dict]) -> dict:
    """Graded rows ({gold, label, confidence}, gold one of the labels) as the counts a
    metrics row keeps: exact sums, so that shards add up to the run (add_grading)."""
    confusion: dict[tuple[str, str], int] = {}
    bins = [{"bin": b, "rows": 0, "confidence_sum": 0.0, "correct": 0} for b in range(ECE_BINS)]
    for r in rows:
        key = (r["gold"], r["label"])
        confusion[key] = confusion.get(key, 0) + 1
        b = bins[calibration_bin(r["confidence"])]
        b["rows"] += 1
        b["confidence_sum"] += r["confidence"]
        b["correct"] += r["gold"] == r["label"]
    return {"graded": len(rows), "correct": sum(r["gold"] == r["label"] for r in rows),
            "confusion": [{"gold": g, "predicted": p, "count": n} for (g, p), n in sorted(confusion.items())],
            "calibration": bins}


def _grading_part(stage: pa.Table) -> dict:
    """A stage part's grading counts (classify with gold_column / abstain_below); None for
    the columns the job does not have."""
    out = dict.fromkeys(GRADING)
    names = stage.column_names
    ok = pc.is_null(stage.column("error_type")) if "error_type" in names else None
    if "review" in names:
        out["review"] = int(pc.sum(pc.cast(pc.fill_null(stage.column("review"), False), pa.int64())).as_py() or 0)
    if "correct" in names:
        results = stage.filter(ok) if ok is not None else stage
        graded = results.filter(pc.is_valid(results.column("correct")))
        out.update(grading_counts(graded.select(["gold", "label", "confidence"]).to_pylist()))
        unknown = pc.and_(pc.is_valid(results.column("gold")), pc.is_null(results.column("correct")))
        out["gold_unknown"] = int(pc.sum(pc.cast(unknown, pa.int64())).as_py() or 0)
    return out


def add_grading(parts: list[dict]) -> dict:
    """Grading counts of several parts, shards or runs, added up (None where none has them)."""
    out = dict.fromkeys(GRADING)
    for key in ("review", "graded", "correct", "gold_unknown"):
        values = [p[key] for p in parts if p.get(key) is not None]
        out[key] = sum(values) if values else None
    with_counts = [p for p in parts if p.get("confusion") is not None]
    if with_counts:
        confusion: dict[tuple[str, str], int] = {}
        bins = [{"bin": b, "rows": 0, "confidence_sum": 0.0, "correct": 0} for b in range(ECE_BINS)]
        for p in with_counts:
            for c in p["confusion"]:
                confusion[(c["gold"], c["predicted"])] = confusion.get((c["gold"], c["predicted"]), 0) + c["count"]
            for b in p["calibration"] or []:
                cur = bins[b["bin"]]
                for k in ("rows", "confidence_sum", "correct"):
                    cur[k] += b[k]
        out["confusion"] = [{"gold": g, "predicted": p, "count": n} for (g, p), n in sorted(confusion.items())]
        out["calibration"] = bins
    return out


def grading_scores(confusion: list[dict], calibration: list[dict]) -> dict:
    """accuracy, macro-F1 and expected calibration error from confusion counts and calibration
    bins (grading_counts, add_grading). Macro-F1 averages, over every label that is some row's
    gold label or prediction, F1 = 2 TP / (2 TP + FP + FN): 0 for a label never predicted
    right. ECE = sum over bins of |correct - confidence_sum| / graded rows. None without rows."""
    n = sum(c["count"] for c in confusion)
    if n == 0:
        return {"graded": 0, "accuracy": None, "macro_f1": None, "ece": None, "labels": []}
    classes = sorted({c["gold"] for c in confusion} | {c["predicted"] for c in confusion})
    tp = dict.fromkeys(classes, 0)
    gold = dict.fromkeys(classes, 0)
    pred = dict.fromkeys(classes, 0)
    for c in confusion:
        gold[c["gold"]] += c["count"]
        pred[c["predicted"]] += c["count"]
        if c["gold"] == c["predicted"]:
            tp[c["gold"]] += c["count"]
    f1 = {k: 2 * tp[k] / (gold[k] + pred[k]) for k in classes}  # 2TP + FP + FN = gold + predicted
    ece = sum(abs(b["correct"] - b["confidence_sum"]) for b in calibration) / n
    return {"graded": n, "accuracy": sum(tp.values()) / n, "macro_f1": sum(f1.values()) / len(classes),
            "ece": ece, "labels": classes, "f1": f1}


def run_grading(metrics: list[dict]) -> dict | None:
    """A run's grading from its metrics rows (summed, then scored); None when the job was
    neither graded nor routed for review."""
    total = add_grading(metrics)
    if all(total[k] is None for k in GRADING):
        return None
    out = {"review": total["review"], "gold_unknown": total["gold_unknown"]}
    if total["confusion"] is not None:
        out.update(grading_scores(total["confusion"], total["calibration"]))
        out.update(confusion=total["confusion"], calibration=total["calibration"], correct=total["correct"])
    return out


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
        **_grading_part(stage),
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
        **add_grading(parts),
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
