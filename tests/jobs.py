"""Job specs and output ids for the tests: one way to build a spec, one way to read back
which ids an output committed."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.io.output import OutputStore
from pipeline.spec import JobSpec, load_spec


def merged(base: dict[str, Any], sections: dict[str, Any]) -> dict[str, Any]:
    """base with each section of sections merged over its own (key by key, one level deep);
    a model given as a path (or a model name) is the section {"source": that}."""
    def section(key, value):
        return {"source": str(value)} if key == "model" and isinstance(value, (str, os.PathLike)) else value

    out = dict(base)
    for key, value in sections.items():
        old, value = section(key, out.get(key)), section(key, value)
        out[key] = {**(old if isinstance(old, dict) else {}), **value} if isinstance(value, dict) else value
    return out


def job_spec(where: str | Path, out: str | Path | None = None, *, model: Any, head: str = "chat",
             **sections: Any) -> JobSpec:
    """The spec of a job reading WHERE/in and writing WHERE/out (reading WHERE and writing OUT
    when out is given) with this model (its folder or name, or a model section) and head;
    sections (output, sampling, resources, task, ...) merge over these key by key."""
    if out is None:
        where, out = Path(where) / "in", Path(where) / "out"
    data = {"input": {"path": str(where)}, "output": {"path": str(out)}, "task": {"head": head}}
    return load_spec(data=merged(data, {"model": model, **sections}))


def spec_maker(**defaults: Any) -> Callable[..., JobSpec]:
    """job_spec with these defaults (model and sections), which a call's sections merge over:
    one module's usual job. A dict given as model is read when a spec is made (a fixture may
    fill it in later)."""

    def make(where: str | Path, out: str | Path | None = None, **sections: Any) -> JobSpec:
        return job_spec(where, out, **merged(defaults, sections))

    return make


def ids_out(output: str | Path) -> list:
    """Ids of every committed result and error row of an output (what a reader sees, through
    the commit records), in no order."""
    store = OutputStore(str(output))
    records = store.records()
    ids = []
    for kind in ("results", "errors"):
        table = store.read_committed(kind, records)
        ids += table.column("id").to_pylist() if table is not None else []
    return ids
