"""Where a qwen-batch run spends its CPU: py-spy samples the driver and every process it
starts (Ray, the engine actor, vLLM's engine core) during a chat-mix run.

    python benchmarks/where_time_goes.py --prompts 512 --out profile-out

Writes OUT/profile.txt (py-spy's collapsed stacks) and OUT/summary.md: the share of samples
per process kind (driver, engine actor, engine core, Ray's own processes) and, for each, the
functions where the most samples land (self time) and the frames they are spent under.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

DRIVER = """
import sys, json
from pipeline.runner import run_job
from pipeline.spec import load_spec
spec = load_spec(data=json.loads(sys.argv[1]))
report = run_job(spec, overwrite=True, progress=False)
print("ROWS", report.totals.rows, "WALL", round(report.wall_seconds, 1))
"""

KINDS = [  # process kind by a marker in the process line py-spy writes as the root frame
    ("engine core", ("EngineCore", "VLLM::")),
    ("engine actor", ("MapWorker", "InferenceWorker")),
    ("driver", ("pipeline.runner", "-c")),
]


def kind_of(process: str) -> str:
    for kind, marks in KINDS:
        if any(m in process for m in marks):
            return kind
    return "ray (raylet, gcs, read tasks, ...)"


def summarize(raw: Path, top: int = 12) -> str:
    per_kind: collections.Counter = collections.Counter()
    leaves: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    within: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        kind = kind_of(frames[0])
        n = int(count)
        per_kind[kind] += n
        leaves[kind][frames[-1]] += n
        for f in set(frames[1:]):  # inclusive time, for the frames we own
            if "pipeline/" in f:
                within[kind][f] += n
    total = sum(per_kind.values()) or 1
    out = ["# Where the CPU goes (py-spy samples, all processes of the run)", "",
           "| process kind | share of samples |", "|---|---|"]
    out += [f"| {k} | {v / total:.1%} |" for k, v in per_kind.most_common()]
    for kind, _ in per_kind.most_common():
        out += ["", f"## {kind}: top functions by self time", "", "| share of all samples | function |", "|---|---|"]
        out += [f"| {v / total:.1%} | `{f}` |" for f, v in leaves[kind].most_common(top)]
        if within[kind]:
            out += ["", f"qwen-batch frames on the stack ({kind}, inclusive):", ""]
            out += [f"- {v / total:.1%} `{f}`" for f, v in within[kind].most_common(8)]
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=512)
    p.add_argument("--rate", type=int, default=50, help="samples per second per process")
    p.add_argument("--out", default="profile-out")
    args = p.parse_args()
    from throughput import SAMPLING, write_input

    from pipeline.tiny_model import make_tiny_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = str(make_tiny_model(out / "model"))
    write_input(out / "input", args.prompts)
    spec = {"input": {"path": str(out / "input")}, "output": {"path": str(out / "output")},
            "model": {"source": model, "max_model_len": 1024, "engine_kwargs": {"enforce_eager": True}},
            "task": {"head": "chat"}, "sampling": SAMPLING}
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "ERROR", "RAY_AUTH_MODE": "disabled"}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(spec)], env=env,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    raw = out / "profile.txt"
    spy = subprocess.Popen(["py-spy", "record", "--pid", str(driver.pid), "--subprocesses", "--rate",
                            str(args.rate), "--format", "raw", "--nonblocking", "-o", str(raw)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    stdout, _ = driver.communicate()
    spy.wait(timeout=120)
    print(stdout.strip(), f"(profiled run: {time.time() - t0:.1f} s)")
    (out / "summary.md").write_text(summarize(raw))
    print((out / "summary.md").read_text())


if __name__ == "__main__":
    main()
