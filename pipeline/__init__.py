"""qwen-batch: batch inference with Qwen3 on Ray Data and vLLM.

The Python API (pipeline.api): run(spec, ...) runs a job spec as `qwen-batch run` does;
process(ds, spec) runs a head over a Ray Dataset; load(spec) checks a spec.
"""

from __future__ import annotations

__all__ = ["JobSpec", "RunReport", "load", "process", "run"]


def __getattr__(name: str):
    # Imported when first asked for: `import pipeline.cli` stays light.
    if name in ("load", "process", "run", "RunReport"):
        from pipeline import api

        return getattr(api, name)
    if name == "JobSpec":
        from pipeline.spec import JobSpec

        return JobSpec
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
