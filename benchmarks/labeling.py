"""Labeling speed at real proportions: the classify head's scorings against bare vLLM's
structured `choice` decoding, side by side in one run, steady state.

    python benchmarks/labeling.py --rows 48 --out bench-out/labeling            # the bench model
    python benchmarks/labeling.py --model DIR --rows 8 --warmup 2 --repeats 1   # any checkpoint

The model is `qwen-batch make-tiny-model --kind bench` (Qwen3-0.6B's exact shape, random
weights; built in OUT/model unless --model; --layers makes a shallower one). Two processes,
one engine each, with the same engine arguments (the classify head's: 32-token KV blocks on
the CPU build, prefix caching): bare vLLM (`LLM.generate` with `structured_outputs.choice`,
greedy: one label a row, no probabilities) and qwen-batch (the classify head on its engine
handle, every row in flight at once). Each phase first runs `--warmup` rows of its own, then
times `--rows` others; the processes alternate order over `--repeats`.

Phases (label sets: 10 labels of one to four tokens as in benchmarks/throughput.py, and 10
labels of one token each):
  choice/10, choice/1tok   vLLM choice decoding
  choice-defaults/10       the same at vLLM's own defaults (no block size set: 128-token KV
                           blocks on the CPU build), as a bare-vLLM user runs it
  trie/10, trie/1tok       scoring: trie (the default: every label's exact probability)
  letters/10               scoring: letters (one distribution over A..J)
  multi/10                 multi_label over the 10 labels (text first: one prefill a row)
  multi-text-last/10       the same with the text after the label, as before (the old layout)

Printed per phase: rows/s, tokens computed a row (prompt tokens not read from the prefix
cache, plus tokens generated) and distributions read a row (full-vocabulary ones for choice
decoding; for qwen-batch the trie nodes read, each a handful of named tokens); then the ratios:
trie vs choice (10 labels, one-token labels), letters vs choice, and multi-label's seconds a
row over single-label's; and trie's floor: the tokens a row and rows/s it would reach if vLLM
shared a prompt's partial last KV block between requests (estimated at its measured tokens/s).
Writes OUT/labeling.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from throughput import LABELS_10, reviews  # noqa: E402

LABELS_1TOK = ["positive", "negative", "neutral", "mixed", "question", "spam", "other", "urgent", "refund", "funny"]
LABEL_SETS = {"10": LABELS_10, "1tok": LABELS_1TOK}
OLD_MULTI = ("Does the label '{label}'{description} apply to the text below? Answer yes or no.\n\n"
             "Text:\n{text}")  # the multi-label prompt before the text moved first
PHASES = {"vllm": ["choice/10", "choice/1tok"], "vllm-defaults": ["choice-defaults/10"],
          "qwen-batch": ["trie/10", "trie/1tok", "letters/10", "multi/10", "multi-text-last/10"]}


def engine_arguments(model: str) -> dict:
    """The classify head's engine arguments on this machine (pipeline.engine.engine_args)."""
    from pipeline.checkpoint import read_config
    from pipeline.engine.engine_args import engine_args
    from pipeline.heads.classify import ClassifyHead
    from pipeline.spec import ModelSpec

    device = "cpu" if not _has_gpu() else "cuda"
    spec = ModelSpec(source=model, max_model_len=2048)
    return engine_args(spec, device=device, config=read_config(spec), shares_prefixes=ClassifyHead.shares_prefixes,
                       score_method="trie")


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def options(phase: str) -> dict:
    scoring, _, labels = phase.partition("/")
    out = {"labels": LABEL_SETS[labels]}
    if scoring == "letters":
        out["scoring"] = "letters"
    elif scoring.startswith("multi"):
        out["multi_label"] = True
        if scoring == "multi-text-last":
            out["multi_label_instruction"] = OLD_MULTI
    return out


def rows_for(phase_index: int, warmup: int, n: int) -> tuple[list[dict], list[dict]]:
    """Warm-up rows and timed rows, distinct from every other phase's (no prefix-cache help)."""
    every = reviews((phase_index + 1) * (warmup + n) + 1000)
    start = phase_index * (warmup + n)
    chunk = every[start:start + warmup + n]
    return chunk[:warmup], chunk[warmup:]


# --- bare vLLM: choice decoding ------------------------------------------------------------

def run_choice(model: str, args: dict, phases: list[str], warmup: int, n: int) -> list[dict]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import StructuredOutputsParams

    from pipeline.engine.vllm_engine import in_process_worker_env
    from pipeline.heads.classify import ClassifyHead

    bare = {k: v for k, v in args.items() if k not in ("logits_processors", "logprobs_mode", "reasoning_parser")}
    os.environ.update(in_process_worker_env(bare))
    llm = LLM(**bare)
    tok = llm.get_tokenizer()
    out = []
    for phase in phases:
        labels = LABEL_SETS[phase.partition("/")[2]]
        head = ClassifyHead({"labels": labels})  # its prompt wording: both systems read the same prompts

        def prompts(rows, head=head):
            return [TokensPrompt(prompt_token_ids=tok.encode(tok.apply_chat_template(
                head._turns(r["text"]), tokenize=False, add_generation_prompt=True, enable_thinking=False),
                add_special_tokens=False)) for r in rows]
        params = SamplingParams(temperature=0.0, max_tokens=16,
                                structured_outputs=StructuredOutputsParams(choice=labels))
        warm, timed = rows_for(len(out) + 10, warmup, n)
        llm.generate(prompts(warm), params, use_tqdm=False)
        llm.reset_prefix_cache()
        batch = prompts(timed)
        t0 = time.perf_counter()
        outs = llm.generate(batch, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        assert all(o.outputs[0].text in labels for o in outs), "choice decoding answered outside the labels"
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        computed = sum(len(o.prompt_token_ids) - (o.num_cached_tokens or 0) for o in outs) + generated
        out.append({"phase": phase, "rows": len(outs), "seconds": seconds,
                    "tokens_computed_per_row": computed / len(outs),
                    "distributions_per_row": generated / len(outs),
                    "prompt_tokens_per_row": sum(len(o.prompt_token_ids) for o in outs) / len(outs)})
    llm.llm_engine.engine_core.shutdown()
    return out


# --- qwen-batch: the classify head on its engine handle ---------------------------------------

def run_heads(model: str, args: dict, phases: list[str], warmup: int, n: int) -> list[dict]:
    return asyncio.run(_run_heads(args, phases, warmup, n))  # one loop: the engine binds to it


async def _run_heads(args: dict, phases: list[str], warmup: int, n: int) -> list[dict]:
    from pipeline.engine import label_trie
    from pipeline.engine.vllm_engine import VllmEngine
    from pipeline.heads.classify import LETTERS, ClassifyHead

    engine = VllmEngine(args, device="cuda" if _has_gpu() else "cpu")
    out = []
    try:
        for phase in phases:
            head = ClassifyHead(options(phase))
            warm, timed = rows_for(len(out), warmup, n)
            await asyncio.gather(*(head.run(r, engine) for r in warm))
            await engine._llm.reset_prefix_cache()
            t0 = time.perf_counter()
            results = await asyncio.gather(*(head.run(r, engine) for r in timed))
            seconds = time.perf_counter() - t0
            o = head.options
            answers = (head._answers(engine, ["yes", "no"], end="") if o.multi_label
                       else head._answers(engine, list(LETTERS[:len(head.labels)]), end="") if o.scoring == "letters"
                       else head._answers(engine, head.labels))
            nodes = len(label_trie.children(answers)) * (len(head.labels) if o.multi_label else 1)
            out.append({"phase": phase, "rows": len(results), "seconds": seconds,
                        "tokens_computed_per_row": sum(r["prompt_tokens_computed"] for r in results) / len(results),
                        "distributions_per_row": nodes,
                        "prompt_tokens_per_row": sum(r["prompt_tokens"] for r in results) / len(results)})
    finally:
        engine.shutdown()
    return out


def child(system: str, model: str, warmup: int, n: int, engine_kwargs: dict) -> None:
    args = {**engine_arguments(model), **engine_kwargs}
    if system == "vllm-defaults":
        args.pop("block_size", None)
    run = run_choice if system.startswith("vllm") else run_heads
    print("RESULT " + json.dumps(run(model, args, PHASES[system], warmup, n)), flush=True)


# --- the driver ---------------------------------------------------------------------------

def measure(system: str, a) -> list[dict]:
    cmd = [sys.executable, __file__, "--child", system, "--model", a.model, "--rows", str(a.rows),
           "--warmup", str(a.warmup), "--engine-kwargs", a.engine_kwargs]
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "ERROR", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, start_new_session=True, timeout=a.timeout)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{system} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[7:])


def ratios(by_phase: dict[str, dict]) -> dict[str, float]:
    """The labeling ratios from median rows/s: above 1 means qwen-batch is faster, except
    multi_vs_single (seconds a row, multi-label over single-label, lower is better)."""
    def rate(p):
        return by_phase[p]["rows_per_s"]
    out = {"trie_vs_choice_10": rate("trie/10") / rate("choice/10"),
           "trie_vs_choice_1tok": rate("trie/1tok") / rate("choice/1tok"),
           "letters_vs_choice_10": rate("letters/10") / rate("choice/10"),
           "multi_vs_single_10": rate("trie/10") / rate("multi/10")}
    if "choice-defaults/10" in by_phase:
        out["trie_vs_choice_defaults_10"] = rate("trie/10") / rate("choice-defaults/10")
        out["letters_vs_choice_defaults_10"] = rate("letters/10") / rate("choice-defaults/10")
    if "multi-text-last/10" in by_phase:
        out["multi_text_last_vs_single_10"] = rate("trie/10") / rate("multi-text-last/10")
    return out


def floors(by_phase: dict[str, dict]) -> dict[str, dict]:
    """What `trie` would reach if vLLM shared a prompt's partial last KV block between requests:
    the row's own prompt tokens (as choice decoding computes them) plus one token a trie node
    below the root, at the tokens/s `trie` measured (rows/s times tokens computed a row, which
    is flat across phases when the machine is compute-bound)."""
    out = {}
    for labels in ("10", "1tok"):
        choice, trie = by_phase.get(f"choice/{labels}"), by_phase.get(f"trie/{labels}")
        if not (choice and trie):
            continue
        prompt = choice["tokens_computed_per_row"] - choice["distributions_per_row"]
        tokens = prompt + trie["distributions_per_row"] - 1
        rows_per_s = trie["rows_per_s"] * trie["tokens_computed_per_row"] / tokens
        out[f"trie/{labels}"] = {"tokens_computed_per_row": tokens, "rows_per_s": rows_per_s,
                                 "vs_choice": rows_per_s / choice["rows_per_s"]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint (default: the bench model, built in OUT/model)")
    p.add_argument("--layers", type=int, default=None, help="the built bench model's layers (default 28)")
    p.add_argument("--rows", type=int, default=48, help="timed rows a phase")
    p.add_argument("--warmup", type=int, default=8, help="untimed rows a phase, first")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default="bench-out/labeling")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--engine-kwargs", default="{}",
                   help="JSON over both systems' engine arguments, e.g. '{\"enforce_eager\": true}' (no torch.compile)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child, a.model, a.warmup, a.rows, json.loads(a.engine_kwargs))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if not a.model:
        from pipeline.ops.tiny_model import make_tiny_model

        a.model = str(make_tiny_model(out / "model", kind="bench", layers=a.layers))
    runs = []
    for rep in range(a.repeats):
        for system in (["vllm", "vllm-defaults", "qwen-batch"] if rep % 2 == 0
                       else ["qwen-batch", "vllm-defaults", "vllm"]):
            for r in measure(system, a):
                r.update(system=system, repeat=rep, rows_per_s=r["rows"] / r["seconds"])
                runs.append(r)
                print(f"  {r['phase']:20s} run {rep + 1}: {r['rows_per_s']:7.2f} rows/s  "
                      f"{r['tokens_computed_per_row']:7.1f} tokens computed/row  "
                      f"{r['distributions_per_row']:5.1f} distributions/row", flush=True)
    by_phase = {}
    for phase in {r["phase"] for r in runs}:
        mine = [r for r in runs if r["phase"] == phase]
        by_phase[phase] = {k: statistics.median(r[k] for r in mine)
                           for k in ("rows_per_s", "tokens_computed_per_row", "distributions_per_row",
                                     "prompt_tokens_per_row")}
    found = ratios(by_phase)
    print("\nphase                 rows/s  tokens computed/row  distributions read/row  tokens/s")
    for phase in PHASES["vllm"] + PHASES["vllm-defaults"] + PHASES["qwen-batch"]:
        r = by_phase[phase]
        print(f"{phase:20s} {r['rows_per_s']:7.2f}  {r['tokens_computed_per_row']:19.1f}  "
              f"{r['distributions_per_row']:22.1f}  {r['rows_per_s'] * r['tokens_computed_per_row']:8.1f}")
    print()
    for k, v in found.items():
        print(f"{k:30s} {v:.2f}x")
    floor = floors(by_phase)
    print("\ntrie if vLLM shared partial KV blocks (the row's prompt once, one token a trie node):")
    for phase, f in floor.items():
        print(f"  {phase:12s} {f['tokens_computed_per_row']:6.1f} tokens computed/row  "
              f"~{f['rows_per_s']:.2f} rows/s  ~{f['vs_choice']:.2f}x choice")
    (out / "labeling.json").write_text(json.dumps({"model": a.model, "rows": a.rows, "warmup": a.warmup,
                                                   "runs": runs, "phases": by_phase, "ratios": found,
                                                   "trie_floor": floor}, indent=1))


if __name__ == "__main__":
    main()
