"""mkdocs hooks (mkdocs.yml `hooks:`): generated blocks and benchmark charts, at build time.

- `<!-- generated: KIND [ARG] -->` markers in a page are replaced by pipeline.ops.spec_reference
  (the job spec reference, a head's options, a table contract, the engine_kwargs allowlist), and
  `<!-- generated: benchmark NAME -->` by the table of benchmarks/results.json's NAME and its
  chart, drawn here with matplotlib into assets/benchmarks/NAME.png of the site.
- `<!-- generated: api-module NAME -->` documents module NAME (mkdocstrings) if it exists.
- `<!-- generated: sizing-table -->` is the sizing of the published Qwen3 checkpoints
  (pipeline.ops.sizing_table).
- A marker of an unknown kind, or a benchmark that is not in the results, fails the build.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results.json"
CHART_DIR = "assets/benchmarks"


def load_results(path: Path = RESULTS) -> dict[str, Any]:
    return json.loads(path.read_text())


# -- tables --------------------------------------------------------------------------------------

def cell(fmt: str | list[str], row: dict[str, Any]) -> str:
    """fmt filled from the row ('{wall_s:.1f} ({wall_min:.1f}-{wall_max:.1f})'); a list of
    formats: the first whose values the row has; '-' when none fits (a value it names is
    missing or null: a system without that measure). Our own rows ("ours") in bold."""
    for f in [fmt] if isinstance(fmt, str) else fmt:
        if all(row.get(n) is not None for n in re.findall(r"{(\w+)", f)):
            text = f.format_map(row)
            return f"**{text}**" if row.get("ours") and text else text
    return "-"


def benchmark_table(bench: dict[str, Any]) -> str:
    cols = bench["columns"]
    lines = ["| " + " | ".join(c["title"] for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in bench["rows"]:
        lines.append("| " + " | ".join(cell(c["format"], row) for c in cols) + " |")
    return "\n".join(lines)


# -- charts --------------------------------------------------------------------------------------

def chart_png(bench: dict[str, Any]) -> bytes:
    """A horizontal bar chart of bench's plot: one bar per row and series (values from the
    row's keys), labelled by the plot's label format; PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot = bench["plot"]
    rows = [r for r in bench["rows"] if any(r.get(k) is not None for k in plot["series"].values())]
    labels = [plot["label"].format_map(r).replace("`", "") for r in rows]
    series = list(plot["series"].items())
    height = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(8, 0.9 + 0.45 * len(rows) * max(1, len(series) * 0.8)), dpi=110)
    for i, (name, key) in enumerate(series):
        ys = [j + (i - (len(series) - 1) / 2) * height for j in range(len(rows))]
        values = [r.get(key) or 0 for r in rows]
        if len(series) == 1:  # our rows stand out
            colors = ["#d9480f" if r.get("ours") else "#868e96" for r in rows]
        else:  # the first series is ours
            colors = "#d9480f" if i == 0 else "#868e96"
        bars = ax.barh(ys, values, height=height * 0.95, label=name, color=colors)
        ax.bar_label(bars, labels=[f"{v:,.1f}" if v < 100 else f"{v:,.0f}" for v in values],
                     padding=3, fontsize=8)
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    ax.set_xlabel(plot["xlabel"])
    ax.set_title(bench["title"], fontsize=10)
    ax.margins(x=0.15)
    if len(series) > 1:
        ax.legend(fontsize=8, loc="upper right")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def benchmark_block(name: str, results: dict[str, Any], page_uri: str) -> str:
    """The table of benchmark NAME and a link to its chart, relative to the page."""
    benches = results["benchmarks"]
    if name not in benches:
        raise KeyError(f"benchmark {name!r} is not in benchmarks/results.json ({', '.join(benches)})")
    bench = benches[name]
    if "plot" not in bench:
        return benchmark_table(bench)
    chart = posixpath.relpath(f"{CHART_DIR}/{name}.png", posixpath.dirname(page_uri) or ".")
    return f"{benchmark_table(bench)}\n\n![{bench['title']}]({chart})"


def machine_block(results: dict[str, Any]) -> str:
    return "\n".join(f"- **{k}**: {v}" for k, v in results["machine"].items())


def api_module(name: str) -> str:
    """A mkdocstrings entry for module NAME if its source exists in this checkout (found without
    importing it), else nothing: the Python API page documents what the package has."""
    path = ROOT.joinpath(*name.split(".")).with_suffix(".py")
    if not path.is_file():
        return ""
    return f"## `{name}`\n\n::: {name}\n    options:\n      show_root_heading: false\n"


# -- the page pass ---------------------------------------------------------------------------------

def expand_page(markdown: str, page_uri: str, results: dict[str, Any] | None = None) -> str:
    """Every generated block of a page filled in; an unknown marker raises ValueError."""
    from pipeline.ops import spec_reference

    def bench(arg: str) -> str:
        return benchmark_block(arg, results if results is not None else load_results(), page_uri)

    def machine(_: str | None) -> str:
        return machine_block(results if results is not None else load_results())

    def sizing(_: str | None) -> str:
        from pipeline.ops.sizing_table import sizing_table

        return sizing_table()

    extra = {"benchmark": bench, "machine": machine, "api-module": api_module, "sizing-table": sizing}
    out = spec_reference.expand(markdown, {**spec_reference.GENERATORS, **extra})
    if left := spec_reference.MARKER.search(out):
        raise ValueError(f"{page_uri}: unknown generated block {left.group(0)!r}")
    return out


# -- mkdocs events ---------------------------------------------------------------------------------

def on_files(files, config):
    """Adds each benchmark's chart, drawn from benchmarks/results.json, to the site."""
    from mkdocs.structure.files import File

    for name, bench in load_results()["benchmarks"].items():
        if "plot" in bench:
            files.append(File.generated(config, f"{CHART_DIR}/{name}.png", content=chart_png(bench)))
    return files


def on_page_markdown(markdown, page, config, files):
    from mkdocs.exceptions import PluginError

    try:
        return expand_page(markdown, page.file.src_uri)
    except (KeyError, ValueError) as e:
        raise PluginError(f"{page.file.src_uri}: {e}") from e


def on_serve(server, config, builder):
    """`mkdocs serve` rebuilds when the models, the heads or the results change."""
    for path in (ROOT / "pipeline", RESULTS, ROOT / "schemas"):
        if path.exists():
            server.watch(str(path))
    return server
