"""Reference Markdown generated from the code: the job spec (pipeline.spec.JobSpec and its
sections), each head's options (Head.Options), the on-disk tables (schemas/*.json) and the
model.engine_kwargs allowlist. The docs site (docs/hooks.py) puts it where a page has a marker:

    <!-- generated: spec-reference -->            every JobSpec key: type, default, description
    <!-- generated: head-options chat -->         the options of task.head chat
    <!-- generated: contract results_chat -->     the columns of schemas/results_chat.json
    <!-- generated: engine-kwargs -->             model.engine_kwargs: allowed and refused keys
    <!-- generated: run-only -->                  the settings outside the spec's fingerprint

so no hand-kept copy of a key, a default or a description exists in the docs.
"""

from __future__ import annotations

import json
import re
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

MARKER = re.compile(r"<!--\s*generated:\s*([a-z-]+)(?:\s+([\w.-]+))?\s*-->")

# What a JobSpec section is for: the heading text above its table.
SECTION_INTROS = {
    "input": "Where the rows come from.",
    "output": "Where results, error rows and metrics go.",
    "model": "The checkpoint and how the engine runs it.",
    "task": "Which head turns each row into a result, and its options.",
    "sampling": "Sampling for every row; unset keys take the head's defaults (Qwen3's recommended settings).",
    "resources": "Replicas, placement, batching, timeouts and restarts.",
    "ray": "Which Ray cluster runs the job.",
}


# -- Markdown pieces ---------------------------------------------------------------------------

def md_text(text: str) -> str:
    """Text as Markdown shows it verbatim, on one line (a table cell): outside `code` spans,
    characters Markdown would read as HTML, emphasis or a cell's end (<think>,
    *ForQuestionAnswering, |) are escaped; a code span is kept as is (Python-Markdown's tables
    never split a cell inside one)."""
    parts = re.split(r"(`[^`]*`)", " ".join(text.split()))
    out = []
    for i, part in enumerate(parts):
        if i % 2:  # a code span: kept as is
            out.append(part)
        else:
            out.append(part.replace("<", "&lt;").replace(">", "&gt;").replace("*", "\\*").replace("|", "\\|"))
    return "".join(out)


def code(text: str) -> str:
    """text as one inline code span."""
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# -- types, defaults, bounds -------------------------------------------------------------------

def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def type_name(annotation: Any) -> str:
    """A type as a spec author reads it: int, str | None, list[str] | dict[str, str],
    "trie" | "per_label", list[{text, label}] (a model's keys)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "None"
    if annotation is Any:
        return "any"
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if _is_model(annotation):
        return "{" + ", ".join(f.alias or name for name, f in annotation.model_fields.items()) + "}"
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        if origin is tuple and len(args) == 2 and args[1] is not Ellipsis:
            return f"[{type_name(args[0])}, {type_name(args[1])}]"
        return f"{name}[{', '.join(type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def bounds(field: FieldInfo) -> str:
    """The field's numeric bounds, e.g. '>= 0, <= 2'."""
    out = []
    for item in field.metadata:
        for attr, sign in _BOUNDS.items():
            value = getattr(item, attr, None)
            if value is not None:
                out.append(f"{sign} {value:,}" if isinstance(value, int) and abs(value) < 2**32 else f"{sign} {value}")
    return ", ".join(out)


def default_text(field: FieldInfo) -> str:
    """The default as YAML would give it, or 'required' / 'unset'."""
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if value is PydanticUndefined:
        return "required"
    if value is None:
        return "unset"
    if isinstance(value, BaseModel):
        return "see below"
    return code(json.dumps(value, ensure_ascii=False))


def field_row(key: str, field: FieldInfo) -> list[str]:
    typ = code(type_name(field.annotation))
    if b := bounds(field):
        typ += f" ({md_text(b)})"
    return [code(key), typ, default_text(field), md_text(field.description or "")]


def sections(model: type[BaseModel], prefix: str = "") -> list[tuple[str, list[tuple[str, FieldInfo]]]]:
    """(section key, [(dotted key, field)]) for model and, recursively, every section
    (a field whose type is a model) under it; the top level's key is ''."""
    own, nested = [], []
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        if _is_model(field.annotation):
            nested += sections(field.annotation, key + ".")
        else:
            own.append((key, field))
    return [(prefix.rstrip("."), own)] + nested


def all_fields(model: type[BaseModel]) -> dict[str, FieldInfo]:
    """Every leaf key of model, dotted (input.path, resources.replicas, ...)."""
    return {key: field for _, fields in sections(model) for key, field in fields}


def options_table(model: type[BaseModel], prefix: str = "") -> str:
    header = ["key", "type", "default", "description"]
    return table(header, [field_row(prefix + (f.alias or n), f) for n, f in model.model_fields.items()])


# -- the generated blocks ----------------------------------------------------------------------

def spec_reference() -> str:
    """Every key of a job spec, one table per section, from pipeline.spec.JobSpec."""
    from pipeline.spec import JobSpec

    out = []
    for section, fields in sections(JobSpec):
        if not fields:
            continue
        top = section.split(".")[0]
        out.append(f"### `{section}`" if section else "### Top level")
        intro = SECTION_INTROS.get(top, "") if section else (JobSpec.__doc__ or "").strip()
        if intro:
            out.append(md_text(intro))
        rows = [field_row(key, field) for key, field in fields]
        out.append(table(["key", "type", "default", "description"], rows))
    return "\n\n".join(out)


def head_options(name: str) -> str:
    """The options table of task.head NAME (its Options model), and the keys of list items
    that are models (few-shot examples)."""
    from pipeline.heads import head_class

    options = head_class(name).Options
    out = [options_table(options, prefix="")]
    for field_name, field in options.model_fields.items():
        for arg in typing.get_args(field.annotation):
            if _is_model(arg):
                keys = ", ".join(code(f.alias or n) + f" ({code(type_name(f.annotation))})"
                                 for n, f in arg.model_fields.items())
                out.append(f"Each item of `{field.alias or field_name}` has the keys {keys}.")
    return "\n\n".join(out)


def contract(name: str) -> str:
    """The columns of schemas/NAME.json: name, Arrow type, nullable, description."""
    from pipeline.io.schemas import load_contract

    doc = load_contract(name)
    rows = []
    for col in doc["columns"]:
        typ = "the input's id type" if col["type"] == "input" else code(col["type"])
        rows.append([code(col["name"]), typ, "yes" if col.get("nullable", True) else "no",
                     md_text(col.get("description", ""))])
    head = md_text(doc.get("description", ""))
    return f"{head}\n\n" + table(["column", "type", "nullable", "description"], rows)


def engine_kwargs() -> str:
    """model.engine_kwargs: the allowlist and the refused keys with their reasons."""
    from pipeline.spec import ENGINE_KWARGS_ALLOWED, ENGINE_KWARGS_REFUSED

    allowed = ", ".join(code(k) for k in sorted(ENGINE_KWARGS_ALLOWED))
    refused = table(["key", "why, and what to use instead"],
                    [[code(k), md_text(v)] for k, v in sorted(ENGINE_KWARGS_REFUSED.items())])
    return (f"Allowed (each with a plain value: a number, text, true/false or a list of numbers): {allowed}.\n\n"
            f"Refused with a reason (any other key is refused too, with the closest allowed one):\n\n{refused}")


def run_only() -> str:
    """The settings outside a spec's fingerprint (pipeline.spec.RUN_ONLY): changing them never
    blocks resuming an output."""
    from pipeline.spec import RUN_ONLY, RUN_ONLY_ENGINE_KWARGS

    keys = []
    for key, sub in RUN_ONLY.items():
        keys += [f"{key}.*" if key != "name" else key] if sub is True else [f"{key}.{k}" for k in sorted(sub)]
    kwargs = ", ".join(code(k) for k in sorted(RUN_ONLY_ENGINE_KWARGS))
    return (f"Not in the fingerprint: {', '.join(code(k) for k in keys)}, and these `model.engine_kwargs`: "
            f"{kwargs}.")


GENERATORS = {
    "spec-reference": lambda arg: spec_reference(),
    "head-options": head_options,
    "contract": contract,
    "engine-kwargs": lambda arg: engine_kwargs(),
    "run-only": lambda arg: run_only(),
}


def expand(markdown: str, generators: dict[str, Any] | None = None) -> str:
    """markdown with every `<!-- generated: KIND [ARG] -->` marker of a known kind replaced by
    its block; markers of other kinds are left (the caller may know them)."""
    gens = GENERATORS if generators is None else generators

    def sub(m: re.Match) -> str:
        kind, arg = m.group(1), m.group(2)
        return gens[kind](arg) if kind in gens else m.group(0)

    return MARKER.sub(sub, markdown)
