"""Where a qwen-batch run spends its CPU: every process of one chat-mix run (driver, Ray,
the engine actor, vLLM's engine core and model worker), measured and sampled.

    python benchmarks/where_time_goes.py --prompts 512 --out profile-out
    python benchmarks/where_time_goes.py --fake-engine 1000000 --out profile-out  # the data path alone

Writes OUT/profile.txt (py-spy's raw stacks) and OUT/summary.md: CPU seconds per process
kind (driver, engine actor, vLLM engine core, Ray's own processes; from the OS, polled with
psutil) and, for each kind, the functions where py-spy's samples land and the qwen-batch
frames on its stacks.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
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
from pipeline.testing import fake_engine_factory
spec = load_spec(data=json.loads(sys.argv[1]))
factory = fake_engine_factory() if sys.argv[2:] == ["fake"] else None
report = run_job(spec, overwrite=True, progress=False, engine_factory=factory)
print("ROWS", report.totals.rows, "WALL", round(report.wall_seconds, 1))
"""


def kind_of(cmdline: str, frames: set[str]) -> str:
    """What a process is, from its command line and the frames py-spy saw in it."""
    text = " ".join(frames)
    if "profiled_driver.py" in cmdline:
        return DRIVER_KIND
    if "worker_main" in text or "model_runner" in text:
        return "vLLM model worker (forward passes)"
    if "engine/core.py" in text:
        return ENGINE_CORE
    if "ray/_private/workers/" in cmdline:
        return "other Ray workers (read, repartition tasks; idle pool)"
    if os.path.basename(cmdline.strip('"').split(" ")[0]) in ("gcs_server", "raylet"):
        return "Ray core (gcs, raylet)"
    return "Ray services (dashboard agent, log monitor, autoscaler, runtime env)"


DRIVER_KIND = "driver (plan, Ray Data's executor, shard assembly and writes)"
ENGINE_CORE = "vLLM engine core (scheduler)"
ENGINE_ACTOR = "engine actor (head, vLLM front end)"


def parse(raw: Path) -> dict[int, dict]:
    """py-spy's raw output per process: command line, samples, stacks."""
    procs: dict[int, dict] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        # with --subprocesses a stack starts with the process chain; the last one was sampled
        chain = [f for f in frames if f.startswith("process ")]
        if not chain:
            continue
        pid_part, _, cmdline = chain[-1].removeprefix("process ").partition(":")
        p = procs.setdefault(int(pid_part), {"cmdline": cmdline, "samples": 0, "stacks": collections.Counter()})
        p["samples"] += int(count)
        p["stacks"][tuple(frames[len(chain):])] += int(count)
    return procs


def summarize(raw: Path, cpu: dict[int, tuple[str, float, int]], top: int = 10) -> str:
    procs = parse(raw)
    # Ray renames its workers (ray::IDLE, ray::MapWorker...); py-spy has the original command
    names = {pid: procs[pid]["cmdline"] if pid in procs else cmdline for pid, (cmdline, _, _) in cpu.items()}
    kinds = {pid: kind_of(names[pid], {f for st in procs.get(pid, {"stacks": {}})["stacks"] for f in st})
             for pid in cpu}
    for pid, (_, _, parent) in cpu.items():
        # py-spy does not see the actor's asyncio thread; the actor is the engine core's parent
        if kinds[pid] == ENGINE_CORE and parent in kinds:
            kinds[parent] = ENGINE_ACTOR
    cpu_by_kind: collections.Counter = collections.Counter()
    count_by_kind: collections.Counter = collections.Counter()
    leaves: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    ours: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for pid, (_cmdline, seconds, _) in cpu.items():
        p = procs.get(pid, {"stacks": {}})
        kind = kinds[pid]
        cpu_by_kind[kind] += seconds
        count_by_kind[kind] += 1
        for stack, n in p["stacks"].items():
            leaves[kind][stack[-1] if stack else "(no Python frame)"] += n
            for f in set(stack):  # inclusive, for the frames we own
                if _ours(f):
                    ours[kind][f] += n
    total = sum(cpu_by_kind.values()) or 1
    out = ["# Where the CPU goes (all processes of one qwen-batch run)", "",
           f"CPU seconds from the OS (psutil), {total:,.1f} s in all. Functions from py-spy samples, which "
           "also count threads waiting inside C code (Ray's `Worker.main_loop`): read them for where a "
           "process is, the CPU column for how much it costs.", "",
           "| process kind | processes | CPU s | share of CPU |", "|---|---|---|---|"]
    out += [f"| {k} | {count_by_kind[k]} | {v:,.1f} | {v / total:.1%} |" for k, v in cpu_by_kind.most_common()]
    out += ["", "Busiest processes:", "", "| CPU s | kind | process (as the OS names it) |", "|---|---|---|"]
    out += [f"| {seconds:,.1f} | {kinds[pid]} | `{cmdline[:80]}` |"
            for pid, (cmdline, seconds, _) in sorted(cpu.items(), key=lambda kv: -kv[1][1])[:10]]
    for kind, _ in cpu_by_kind.most_common():
        samples = sum(leaves[kind].values())
        if not samples:
            continue
        out += ["", f"## {kind}: where its samples land (self)", "", "| share of its samples | function |",
                "|---|---|"]
        out += [f"| {v / samples:.1%} | `{f}` |" for f, v in leaves[kind].most_common(top)]
        if ours[kind]:
            out += ["", "qwen-batch frames on its stacks (inclusive):", ""]
            out += [f"- {v / samples:.1%} `{f}`" for f, v in ours[kind].most_common(6)]
    return "\n".join(out) + "\n"


OUR_FILES = {p.name for p in (REPO / "pipeline").rglob("*.py")}


def _ours(frame: str) -> bool:
    """A qwen-batch frame: py-spy names our files without their folder, others with it."""
    where = frame.rpartition(" (")[2].split(":")[0]
    return "pipeline/" in where or ("/" not in where and where in OUR_FILES)


def cpu_seconds(root: int, seen: dict[int, tuple[str, float, int]]) -> None:
    """Update pid -> (command line, user+system CPU seconds, parent) for root and its descendants."""
    import psutil

    try:
        tree = [psutil.Process(root)]
        tree += tree[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for proc in tree:
        try:
            with proc.oneshot():
                t = proc.cpu_times()
                seen[proc.pid] = (" ".join(proc.cmdline()), t.user + t.system, proc.ppid())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=512)
    p.add_argument("--rate", type=int, default=50, help="samples per second per process")
    p.add_argument("--out", default="profile-out")
    p.add_argument("--fake-engine", type=int, metavar="ROWS",
                   help="the data path alone: ROWS short chat rows (benchmarks/datapath.py's) through the "
                        "instant fake engine instead of --prompts through vLLM")
    args = p.parse_args()
    from throughput import SAMPLING, write_input

    from pipeline.ops.tiny_model import make_tiny_model

    # py-spy is installed next to this interpreter (ray[default]); the venv need not be on PATH
    spy_bin = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy_bin is None:
        sys.exit("py-spy is not installed: pip install py-spy (it comes with ray[default])")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = str(make_tiny_model(out / "model"))
    if args.fake_engine:
        from datapath import write_input as write_short_rows

        write_short_rows(out / "input", args.fake_engine, shards=16)
        spec = {"input": {"path": str(out / "input")}, "output": {"path": str(out / "output")},
                "model": {"source": model}, "task": {"head": "chat"}, "sampling": {"max_tokens": 8}}
    else:
        write_input(out / "input", args.prompts)
        spec = {"input": {"path": str(out / "input")}, "output": {"path": str(out / "output")},
                "model": {"source": model, "max_model_len": 1024, "engine_kwargs": {"enforce_eager": True}},
                "task": {"head": "chat"}, "sampling": SAMPLING}
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "ERROR", "RAY_AUTH_MODE": "disabled"}
    (out / "profiled_driver.py").write_text(DRIVER)  # a file, so its process line is one line
    driver = subprocess.Popen([sys.executable, str(out / "profiled_driver.py"), json.dumps(spec)]
                              + (["fake"] if args.fake_engine else []), env=env,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    raw = out / "profile.txt"
    spy = subprocess.Popen([spy_bin, "record", "--pid", str(driver.pid), "--subprocesses", "--rate",
                            str(args.rate), "--format", "raw", "--nonblocking", "-o", str(raw)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    cpu: dict[int, tuple[str, float, int]] = {}
    try:
        while driver.poll() is None:  # processes come and go: poll their CPU time until the end
            cpu_seconds(driver.pid, cpu)
            time.sleep(0.5)
        stdout = driver.stdout.read()
        spy.wait(timeout=120)
    finally:  # never leave the run (and its engine) behind
        for proc in (driver, spy):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL) if proc is driver else proc.kill()
    print(stdout.strip(), f"(profiled run: {time.time() - t0:.1f} s)")
    (out / "summary.md").write_text(summarize(raw, cpu))
    print((out / "summary.md").read_text())


if __name__ == "__main__":
    main()
