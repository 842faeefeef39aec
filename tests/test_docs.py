"""The docs: the generated job spec reference and head options cover every key of the code, every
generated block of every page expands, the README stays a front page, and every relative link in
the README and docs/ resolves. (`make docs` builds the site itself with mkdocs --strict.)"""

from __future__ import annotations

import importlib.util
import re
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from pipeline.heads import HEADS, head_class
from pipeline.ops import spec_reference
from pipeline.ops.spec_reference import md_text
from pipeline.spec import JobSpec, load_spec

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
PAGES = sorted(DOCS.rglob("*.md"))


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _leaf_fields(model: type[BaseModel], prefix: str = ""):
    """(dotted key, field) for every key of model, sections walked recursively."""
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _leaf_fields(field.annotation, key + ".")
        else:
            yield key, field


def _row(markdown: str, key: str) -> str:
    """The table row of `key` in generated Markdown."""
    rows = [line for line in markdown.splitlines() if line.startswith(f"| `{key}` |")]
    assert len(rows) == 1, f"{key}: {len(rows)} rows in the generated reference"
    return rows[0]


def test_every_job_spec_key_is_in_the_reference_with_its_description_and_default():
    reference = spec_reference.spec_reference()
    keys = list(_leaf_fields(JobSpec))
    assert len(keys) > 30  # the walk went into every section
    for key, field in keys:
        assert field.description, f"{key} has no description in pipeline/spec.py"
        row = _row(reference, key)
        assert md_text(field.description) in row, key
        if field.is_required():
            assert "| required |" in row, key
    assert "| `resources.batch_size` | `int` (>= 1) | `64` |" in reference.replace("&gt;", ">")
    assert "| `resources.device` | `\"auto\" | \"cuda\" | \"cpu\"` | `\"auto\"` |" in reference
    assert "| `model.max_model_len` | `int | None` (>= 16) | unset |" in reference.replace("&gt;", ">")
    assert "| `input.path` | `str` | required |" in reference


def test_every_head_has_a_page_listing_each_option_with_its_description():
    hooks = _hooks()
    nav = (REPO / "mkdocs.yml").read_text()
    for name in HEADS:
        page = DOCS / "heads" / f"{name}.md"
        assert page.is_file(), f"no page for the {name} head"
        assert f"heads/{name}.md" in nav, f"the {name} head's page is not in mkdocs.yml's nav"
        source = page.read_text()
        assert f"<!-- generated: head-options {name} -->" in source
        assert f"<!-- generated: contract results_{name} -->" in source
        block = spec_reference.head_options(name)
        assert block in hooks.expand_page(source, f"heads/{name}.md")
        options = head_class(name).Options
        for field_name, field in options.model_fields.items():
            key = field.alias or field_name
            assert field.description, f"{name}: option {key} has no description"
            assert md_text(field.description) in _row(block, key), f"{name}: option {key}"
            for arg in typing.get_args(field.annotation):  # few-shot examples: their keys are listed
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    assert all(f"`{k}`" in block for k in arg.model_fields), f"{name}: {key} items"


def test_an_alias_is_the_key_a_spec_writes():
    rendered = spec_reference.head_options("extract")
    assert "| `schema` |" in rendered and "`schema_`" not in rendered


def test_markdown_escaping_keeps_code_spans_and_escapes_html_outside_them():
    assert md_text("the text inside <think> and `<think>`") == "the text inside &lt;think&gt; and `<think>`"
    assert md_text("a *ForQuestionAnswering checkpoint | x") == "a \\*ForQuestionAnswering checkpoint \\| x"
    assert md_text("two\n   lines") == "two lines"


def test_every_generated_block_of_every_page_expands():
    hooks = _hooks()
    results = hooks.load_results()
    seen = set()
    for page in PAGES:
        source = page.read_text()
        seen |= {m.group(1) for m in spec_reference.MARKER.finditer(source)}
        out = hooks.expand_page(source, page.relative_to(DOCS).as_posix(), results)
        assert "<!-- generated:" not in out, page
    assert {"spec-reference", "head-options", "contract", "engine-kwargs", "benchmark", "machine"} <= seen
    with pytest.raises(ValueError, match="unknown generated block"):
        hooks.expand_page("<!-- generated: no-such-thing -->", "x.md", results)
    with pytest.raises(KeyError, match="not in benchmarks/results.json"):
        hooks.expand_page("<!-- generated: benchmark no-such-mix -->", "x.md", results)


def test_every_benchmark_figure_is_on_the_page_with_a_chart():
    hooks = _hooks()
    results = hooks.load_results()
    page = (DOCS / "benchmarks.md").read_text()
    assert {"CPU", "memory", "GPU", "software"} <= set(results["machine"])
    for name, bench in results["benchmarks"].items():
        assert f"<!-- generated: benchmark {name} -->" in page, name
        block = hooks.benchmark_block(name, results, "benchmarks.md")
        assert f"(assets/benchmarks/{name}.png)" in block
        assert block.count("\n|") == len(bench["rows"]) + 1  # the separator and one line per row
    assert hooks.chart_png(results["benchmarks"]["datapath"]).startswith(b"\x89PNG")
    # no dated diaries and no commit hashes on the benchmark page
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b|\bcommit [0-9a-f]{7}", page)


def test_a_benchmark_cell_takes_the_first_format_its_row_fills():
    hooks = _hooks()
    fmt = ["{wall_s:.1f} ({wall_min:.1f}-{wall_max:.1f})", "{wall_s:.1f}"]
    assert hooks.cell(fmt, {"wall_s": 1.0, "wall_min": 0.5, "wall_max": 2.0}) == "1.0 (0.5-2.0)"
    assert hooks.cell(fmt, {"wall_s": 1.0}) == "1.0"
    assert hooks.cell("{vs_bare:.2f}x", {"ours": True}) == "-"
    assert hooks.cell("{vs_bare:.2f}x", {"ours": True, "vs_bare": 1.191}) == "**1.19x**"


def test_the_kuberay_example_is_a_rayjob_running_a_valid_spec():
    docs = list(yaml.safe_load_all((DOCS / "kuberay" / "rayjob.yaml").read_text()))
    config_map, rayjob = docs
    assert (config_map["kind"], rayjob["kind"]) == ("ConfigMap", "RayJob")
    assert rayjob["apiVersion"] == "ray.io/v1"
    spec = load_spec(data=yaml.safe_load(config_map["data"]["chat.yaml"]))
    assert spec.task.head == "chat"
    assert "qwen-batch run /specs/chat.yaml" in rayjob["spec"]["entrypoint"]
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["volumes"][0]["configMap"]["name"] == config_map["metadata"]["name"]


def test_the_readme_is_a_front_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme) <= 15_000, f"README.md has {len(readme)} characters; the limit is 15,000"
    for name in HEADS:  # one example per head
        assert f"head: {name}" in readme, name


_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_SNIPPET = re.compile(r'^--8<-- "([^"]+)"', re.M)


def _without_code(markdown: str) -> str:
    """Markdown without fenced code blocks and inline code (links there are not links)."""
    markdown = re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", markdown)


@pytest.mark.parametrize("doc", [REPO / "README.md", *PAGES], ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_resolves(doc):
    text = doc.read_text()
    for target in _LINK.findall(_without_code(text)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL, or an anchor on the same page
        path = target.split("#", 1)[0]
        if path.startswith("assets/benchmarks/"):
            continue  # drawn at build time (docs/hooks.py)
        assert (doc.parent / path).exists(), f"{doc.relative_to(REPO)}: the link target {target} does not exist"
    for included in _SNIPPET.findall(text):  # pymdownx.snippets, relative to the repository
        assert (REPO / included).is_file(), f"{doc.relative_to(REPO)}: the included file {included} does not exist"
