"""The data path at scale: qwen-batch with an instant fake engine against the same job written
directly in Ray Data, on the same rows. Prints rows/s and the driver's peak RSS.

    python benchmarks/datapath.py --rows 200000,2000000 --replicas 1,2 --repeats 1

Each run is its own process (peak RSS is the driver's own, from getrusage), systems
alternate within a repeat, and the ratio is qwen-batch's rows/s over Ray Data's in the same
repeat. The Ray Data job does the per-row work qwen-batch's chat head does with the fake
engine (render the chat, tokenize, answer, build the result columns) in one actor-pool UDF
per replica, and writes Parquet with `write_parquet`: the floor a batch job on Ray Data pays.
Writes OUT/datapath.parquet.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SYSTEMS = ("qwen-batch", "ray-data")

PEAK = """
import sys, types
def peak_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
sys.modules["benchmarks_peak"] = types.SimpleNamespace(peak_mb=peak_mb)
"""

QWEN_BATCH = """
import json, sys, time
from benchmarks_peak import peak_mb
from pipeline.runner import run_job
from pipeline.spec import load_spec
from pipeline.testing import fake_engine_factory
inp, out, model, replicas = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
spec = load_spec(data={"input": {"path": inp}, "output": {"path": out}, "model": {"source": model},
                       "task": {"head": "chat"}, "sampling": {"max_tokens": 8},
                       "resources": {"replicas": replicas, "batch_size": int(sys.argv[5])}})
t = time.time()
report = run_job(spec, progress=False, engine_factory=fake_engine_factory())
wall = time.time() - t
assert report.exit_code == 0 and report.totals.rows == report.totals.results, report.message
print(json.dumps({"wall_s": wall, "rows": report.totals.rows,
                  "peak_rss_mb": peak_mb()}))
"""

RAY_DATA = """
import json, os, sys, time
from benchmarks_peak import peak_mb
import pyarrow as pa
import ray
inp, out, replicas, batch = sys.argv[1], sys.argv[2], int(sys.argv[4]), int(sys.argv[5])

class Answer:
    def __init__(self):
        from pipeline.testing import FakeEngine
        self.engine = FakeEngine(record=False)
    def __call__(self, batch):
        rows = []
        for r in batch.to_pylist():
            ids = self.engine.render_chat([{"role": "user", "content": r["prompt"]}], enable_thinking=False)
            out = [0] * 8
            rows.append({"id": r["id"], "text": self.engine.decode(out), "reasoning": None,
                         "prompt_tokens": len(ids), "completion_tokens": len(out), "finish_reason": "length"})
        return pa.Table.from_pylist(rows)

t = time.time()
os.environ.setdefault("RAY_worker_niceness", "0")
ray.init(address="local", num_cpus=max(os.cpu_count(), replicas + 2), include_dashboard=False,
         log_to_driver=False, logging_level="WARNING")
ctx = ray.data.DataContext.get_current()
ctx.enable_progress_bars = False
ds = ray.data.read_parquet(inp).map_batches(Answer, batch_size=batch, batch_format="pyarrow",
                                            compute=ray.data.ActorPoolStrategy(size=replicas), num_cpus=1)
ds.write_parquet(out)
ray.shutdown()  # in the wall time, as qwen-batch's run_job ends its Ray: the job is over when it is down
wall = time.time() - t
import pyarrow.dataset
rows = pyarrow.dataset.dataset(out).count_rows()
print(json.dumps({"wall_s": wall, "rows": rows, "peak_rss_mb": peak_mb()}))
"""


def write_input(folder: Path, rows: int, shards: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    per = -(-rows // shards)
    for s in range(shards):
        ids = list(range(s * per, min(rows, (s + 1) * per)))
        pq.write_table(pa.table({"id": ids, "prompt": [f"Question {i}: say something short." for i in ids]}),
                       folder / f"part-{s:05d}.parquet")


def measure(system: str, inp: Path, out: Path, model: str, replicas: int, batch: int) -> dict:
    # The driver's peak RSS is VmHWM: getrusage's ru_maxrss survives exec, so a child would
    # report this (bigger) process's peak.
    script = PEAK + (QWEN_BATCH if system == "qwen-batch" else RAY_DATA)
    proc = subprocess.run([sys.executable, "-c", script, str(inp), str(out), model, str(replicas), str(batch)],
                          capture_output=True, text=True, cwd=REPO, start_new_session=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        raise SystemExit(f"{system} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="200000", help="comma-separated row counts")
    p.add_argument("--replicas", default="1", help="comma-separated replica counts")
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=256, help="rows per batch, both systems")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--model", help="model folder (only its config is read); default: the tiny model, built")
    p.add_argument("--out", default="bench-out")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model = args.model
        if not model:
            from pipeline.ops.tiny_model import make_tiny_model

            model = str(make_tiny_model(scratch / "tiny-qwen3"))
        runs = []
        for rows in [int(x) for x in args.rows.split(",")]:
            inp = scratch / f"in-{rows}"
            write_input(inp, rows, args.shards)
            for replicas in [int(x) for x in args.replicas.split(",")]:
                for rep in range(args.repeats):
                    for system in args.systems.split(","):
                        target = scratch / f"out-{system}-{rows}-{replicas}-{rep}"
                        r = measure(system, inp, target, model, replicas, args.batch_size)
                        assert r["rows"] == rows, f"{system}: {r['rows']} rows out of {rows}"
                        runs.append({"system": system, "rows": rows, "replicas": replicas, "repeat": rep,
                                     "wall_s": r["wall_s"], "rows_per_s": rows / r["wall_s"],
                                     "peak_rss_mb": r["peak_rss_mb"]})
                        print(f"{system:>10} rows={rows:>9,} replicas={replicas} repeat={rep + 1}: "
                              f"{r['wall_s']:7.1f} s {rows / r['wall_s']:10,.0f} rows/s "
                              f"driver peak {r['peak_rss_mb']:6.0f} MB", flush=True)
                        subprocess.run(["rm", "-rf", str(target)])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(runs), out / "datapath.parquet")
    print("\n| rows | replicas | qwen-batch rows/s | Ray Data rows/s | ratio (median, range) | "
          "qwen-batch driver peak MB | Ray Data driver peak MB |")
    print("|---|---|---|---|---|---|---|")
    keys = sorted({(r["rows"], r["replicas"]) for r in runs})
    for rows, replicas in keys:
        mine = [r for r in runs if (r["rows"], r["replicas"], r["system"]) == (rows, replicas, "qwen-batch")]
        base = [r for r in runs if (r["rows"], r["replicas"], r["system"]) == (rows, replicas, "ray-data")]
        ratios = [a["rows_per_s"] / b["rows_per_s"] for a, b in zip(mine, base)]
        def med(rs, k):
            return statistics.median(r[k] for r in rs) if rs else float("nan")

        ratio = (f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})" if ratios else "-")
        print(f"| {rows:,} | {replicas} | {med(mine, 'rows_per_s'):,.0f} | {med(base, 'rows_per_s'):,.0f} | {ratio} | "
              f"{med(mine, 'peak_rss_mb'):,.0f} | {med(base, 'peak_rss_mb'):,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
