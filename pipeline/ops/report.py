"""`qwen-batch report OUTPUT`: a run's metrics as PNG charts and a small HTML page.

It reads what readers are told to trust, the committed shards (pipeline.io.output), from a
local folder or an object store alike, and writes OUTPUT/report/ through the same
filesystem (so on S3 the report lands next to the output, as s3://.../OUTPUT/report/)."""

from __future__ import annotations

import html
import io
from collections import Counter

from pipeline.io.output import OutputStore
from pipeline.ops.metrics import ECE_BINS, run_grading
from pipeline.redact import redact_text

REPORT = "report"


def render_report(output: str) -> str:
    """Write OUTPUT/report/{index.html, *.png}; returns the HTML page's path or URI."""
    out = str(output)
    store = OutputStore(out)
    records = store.records()
    metrics = store.read_committed("metrics", records)
    if metrics is None:
        raise FileNotFoundError(f"{out} has no committed shards: run the job first")
    results, errors = store.read_committed("results", records), store.read_committed("errors", records)
    m = metrics.to_pylist()
    grading = run_grading(m)
    charts = [c for c in (_shard_throughput(m), _replicas_timeline(m), _tokens_over_time(m), _errors(errors),
                          _token_lengths(results), _reliability(grading), _confusion(grading)) if c is not None]
    headline = _headline(m) + _grading_headline(grading)
    pages = {name: png for name, _, png in charts}
    pages["index.html"] = _page(out, headline, m, (store.read_manifest() or {}).get("status", "unknown"), charts)
    if store.local:
        store.fs.create_dir(store.abs(REPORT), recursive=True)
    for name, data in pages.items():
        with store.fs.open_output_stream(store.abs(f"{REPORT}/{name}")) as f:
            f.write(data)
    print(headline)
    index = f"{REPORT}/index.html"
    return store.abs(index) if store.local else f"{out.rstrip('/')}/{index}"


def _figure(size=(8, 3.5)):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size)


def _png(fig, name: str, caption: str) -> tuple[str, str, bytes]:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return name, caption, buf.getvalue()


def _shard_throughput(m: list[dict]):
    names = [r["shard"].rsplit("/", 1)[-1].removesuffix(".parquet") for r in m]
    fig, ax = _figure()
    ax.bar(range(len(m)), [r["output_tokens_per_s"] or 0 for r in m], color="#4c78a8")
    ax.set_xticks(range(len(m)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("output tokens/s")
    return _png(fig, "shard_throughput.png", "Output tokens/s per shard (first row started to last row finished).")


def _replicas_timeline(m: list[dict]):
    fig, ax = _figure()
    t0 = min(r["started_at"] for r in m if r["started_at"])
    workers = sorted({w for r in m for w in (r["workers"] or [])})
    for i, w in enumerate(workers):
        spans = [(r["started_at"] - t0, r["finished_at"] - r["started_at"], r["output_tokens_per_s"] or 0)
                 for r in m if w in (r["workers"] or [])]
        for start, width, rate in spans:
            ax.broken_barh([(start, max(width, 0.01))], (i - 0.4, 0.8), color="#72b7b2")
            ax.text(start, i, f"{rate:,.0f}", va="center", fontsize=7)
    ax.set_yticks(range(len(workers)), workers, fontsize=7)
    ax.set_xlabel("seconds since the first row started")
    return _png(fig, "replicas_timeline.png", "Shards over time per engine replica, labeled with output tokens/s.")


def _tokens_over_time(m: list[dict]):
    from pipeline.ops.metrics import TIMELINE_S

    windows: dict[str, dict[float, int]] = {}  # worker -> window start -> tokens
    for r in m:
        for w in r.get("timeline") or []:
            per = windows.setdefault(w["worker"] or "?", {})
            per[w["at"]] = per.get(w["at"], 0) + w["completion_tokens"]
    if not windows:
        return None
    fig, ax = _figure()
    start = min(at for per in windows.values() for at in per)
    total: dict[float, int] = {}
    for worker, per in sorted(windows.items()):
        xs = sorted(per)
        ax.step([x - start for x in xs], [per[x] / TIMELINE_S for x in xs], where="post", marker=".",
                label=worker)
        for x in xs:
            total[x] = total.get(x, 0) + per[x]
    if len(windows) > 1:
        xs = sorted(total)
        ax.step([x - start for x in xs], [total[x] / TIMELINE_S for x in xs], where="post", color="black",
                label="all replicas")
    ax.set_xlim(left=0)
    ax.set_xlabel("seconds since the first window with finished rows")
    ax.set_ylabel("output tokens/s")
    ax.legend(fontsize=7)
    return _png(fig, "tokens_over_time.png",
                f"Output tokens/s over time per engine replica: tokens of the rows finished in each "
                f"{TIMELINE_S:.0f}-second window since the run started (the last window may be partial).")


def _errors(errors):
    kinds = Counter(errors.column("error_type").to_pylist()) if errors is not None else Counter()
    fig, ax = _figure((6, 3))
    ax.bar(list(kinds) or ["none"], list(kinds.values()) or [0], color="#e45756")
    ax.set_ylabel("error rows")
    return _png(fig, "errors.png", "Error rows by error_type.")


def _token_lengths(results):
    if results is None or "prompt_tokens" not in results.column_names:
        return None
    fig, ax = _figure((6, 3))
    for col, color in (("prompt_tokens", "#4c78a8"), ("completion_tokens", "#f58518")):
        values = [v for v in results.column(col).to_pylist() if v is not None]
        if values:
            ax.hist(values, bins=30, alpha=0.6, label=col, color=color)
    ax.set_xlabel("tokens per row")
    ax.legend()
    return _png(fig, "token_lengths.png", "Prompt and completion tokens per result row.")


def _graded(grading: dict | None) -> bool:
    return bool(grading and grading.get("graded"))


def _reliability(grading: dict | None):
    """Reliability diagram of a graded classify run: accuracy against mean confidence per bin."""
    if not _graded(grading):
        return None
    fig, ax = _figure((5, 4.5))
    width = 1 / ECE_BINS
    bins = [b for b in grading["calibration"] if b["rows"]]
    lefts = [b["bin"] * width for b in grading["calibration"]]
    accuracy = [b["correct"] / b["rows"] if b["rows"] else 0 for b in grading["calibration"]]
    ax.bar(lefts, accuracy, width=width, align="edge", color="#4c78a8", edgecolor="white", label="accuracy")
    ax.plot([b["confidence_sum"] / b["rows"] for b in bins], [b["correct"] / b["rows"] for b in bins], "o",
            color="#f58518", label="mean confidence, accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    for b, left, acc in zip(grading["calibration"], lefts, accuracy):
        if b["rows"]:
            ax.text(left + width / 2, acc + 0.01, str(b["rows"]), ha="center", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("confidence (top label's probability)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7, loc="upper left")
    return _png(fig, "reliability.png",
                f"Reliability diagram: accuracy of the graded rows per {ECE_BINS} equal-width confidence bins "
                f"(row counts above the bars); ECE {grading['ece']:.3f}.")


def _confusion(grading: dict | None):
    """Confusion matrix of a graded classify run: gold labels by row, predictions by column."""
    if not _graded(grading):
        return None
    labels = grading["labels"]
    counts = {(c["gold"], c["predicted"]): c["count"] for c in grading["confusion"]}
    grid = [[counts.get((g, p), 0) for p in labels] for g in labels]
    size = min(2.5 + 0.45 * len(labels), 12)
    fig, ax = _figure((size + 1, size))
    image = ax.imshow(grid, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    if len(labels) <= 20:
        top = max(max(row) for row in grid) or 1
        for i, row in enumerate(grid):
            for j, n in enumerate(row):
                ax.text(j, i, f"{n:,}", ha="center", va="center", fontsize=7,
                        color="white" if n > top / 2 else "black")
    return _png(fig, "confusion.png",
                f"Confusion matrix of the {grading['graded']:,} graded rows: accuracy {grading['accuracy']:.3f}, "
                f"macro-F1 {grading['macro_f1']:.3f}.")


def _grading_headline(grading: dict | None) -> str:
    if grading is None:
        return ""
    out = ""
    if _graded(grading):
        out += (f"; graded {grading['graded']:,} rows: accuracy {grading['accuracy']:.3f}, "
                f"macro-F1 {grading['macro_f1']:.3f}, ECE {grading['ece']:.3f}")
    if grading.get("gold_unknown"):
        out += f"; {grading['gold_unknown']:,} gold labels not among the labels"
    if grading.get("review") is not None:
        out += f"; {grading['review']:,} rows flagged for review"
    return out


def _headline(m: list[dict]) -> str:
    rows = sum(r["rows"] for r in m)
    errs = sum(r["errors"] for r in m)
    out_tok = sum(r["completion_tokens"] for r in m)
    t0 = min(r["started_at"] for r in m if r["started_at"])
    wall = max(r["finished_at"] for r in m if r["finished_at"]) - t0
    return (f"{len(m)} shards, {rows:,} rows, {errs:,} errors, {out_tok:,} output tokens; "
            f"{out_tok / wall if wall > 0 else 0:,.0f} output tokens/s over {wall:,.1f} s of inference")


def _page(out: str, headline: str, m: list[dict], status: str, charts) -> bytes:
    settings = next((r["engine_settings"] for r in m if r.get("engine_settings")), None)
    body = "".join(f'<figure><img src="{n}"><figcaption>{html.escape(c)}</figcaption></figure>'
                   for n, c, _ in charts)
    return (f"<!doctype html><meta charset=utf-8><title>qwen-batch report</title>"
            f"<style>body{{font-family:sans-serif;max-width:900px;margin:2em auto}}img{{max-width:100%}}</style>"
            f"<h1>qwen-batch report</h1><p>{html.escape(redact_text(out))} &mdash; "
            f"status <b>{html.escape(str(status))}</b></p>"
            f"<p>{html.escape(headline)}</p><p>Engine settings: <code>{html.escape(str(settings))}</code></p>"
            f"{body}").encode()
