"""Side-by-side throughput: bare vLLM `LLM.generate`, Ray Data LLM, and qwen-batch.

Same model, same engine arguments, same prompts (chat-templated by each system), same
sampling with ignore_eos so output lengths match. Each system runs in its own process, in
alternating order, `--repeats` times; the table reports the median and the spread.

    python benchmarks/throughput.py --prompts 1024 --repeats 3 --out bench-out

Writes OUT/runs.parquet (one row per run), OUT/summary.parquet and OUT/throughput.png.
`--data-path` also measures qwen-batch's read -> head -> write path with an instant fake
engine (rows/s, our per-row overhead alone).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SYSTEMS = ("vllm", "ray-data-llm", "qwen-batch")
# Baselines the ratios are computed against, with their names in the table.
REFERENCES = {"vllm": "vLLM", "ray-data-llm": "Ray Data LLM", "vllm-map-reduce": "vLLM map-reduce",
              "vllm-score": "vLLM scoring", "qwen-batch-per-label": "per_label head",
              "ray-data-llm-choice": "Ray Data LLM choice", "vllm-json": "vLLM JSON",
              "ray-data-llm-json": "Ray Data LLM JSON"}
# The classify mix runs every system once per label set: "SYSTEM/K" labels with K labels, and
# ratios compare systems on the same label set.
CLASSIFY_SYSTEMS = ("qwen-batch-classify", "qwen-batch-per-label", "ray-data-llm-choice")
OUTPUT_LENGTHS = (16, 32, 64, 128)  # the chat mix: varied output lengths


def prompts(n: int) -> list[dict]:
    topics = ["rivers", "compilers", "jazz", "glaciers", "tea", "owls", "bridges", "primes"]
    return [{"id": i, "prompt": f"Question {i}: explain {topics[i % 8]} to a {['child', 'student', 'expert'][i % 3]}.",
             "max_tokens": OUTPUT_LENGTHS[i % len(OUTPUT_LENGTHS)]} for i in range(n)]


def documents(n: int) -> list[dict]:
    """Long documents, 0.5x to 8x a 1,024-token context, for the summarize mix."""
    sizes = [60, 250, 500, 1000]  # sentences, ~13 tokens each
    docs = []
    for i in range(n):
        sents = [f"Record {i}.{j}: shipment {j * 7} reached port {j % 13} on day {j % 28 + 1}. "
                 for j in range(sizes[i % len(sizes)])]
        docs.append({"id": i, "text": "\n\n".join("".join(sents[k:k + 5]) for k in range(0, len(sents), 5))})
    return docs


SUMMARY_TOKENS = 64
LABELS = ["positive", "negative", "neutral", "mixed"]
# The 10-label variant: labels of one to four tokens, some sharing their first token.
LABELS_10 = LABELS + ["sarcastic", "off-topic", "question", "complaint about delivery",
                      "complaint about quality", "praise for support"]
LABEL_SETS = {"4": LABELS, "10": LABELS_10}


def reviews(n: int) -> list[dict]:
    """Product reviews of 1 to 12 sentences, for the classify mix."""
    parts = ["The blender {} my smoothies.", "Delivery took {} days.", "Support answered {}.",
             "The lid {} after a week.", "I would {} buy it again."]
    words = ["ruined", "perfected", "three", "twelve", "quickly", "never", "cracked", "held", "gladly", "not"]
    return [{"id": i, "text": " ".join(parts[(i + k) % 5].format(words[(i * 7 + k) % 10])
                                       for k in range(1 + i % 12))} for i in range(n)]


def write_rows(folder: Path, rows: list[dict], shards: int = 8) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(rows) // shards)
    for s in range(shards):
        if rows[s * per:(s + 1) * per]:
            pq.write_table(pa.Table.from_pylist(rows[s * per:(s + 1) * per]), folder / f"part-{s:05d}.parquet")


def write_input(folder: Path, n: int) -> None:
    write_rows(folder, [{"id": r["id"], "prompt": r["prompt"], "sampling": json.dumps({"max_tokens": r["max_tokens"]})}
                        for r in prompts(n)])


# --- one system per process -------------------------------------------------------------

SAMPLING = {"temperature": 0.0, "ignore_eos": True}  # greedy: the engine at its fastest, so overhead shows


def run_vllm(model: str, engine: dict, n: int) -> dict:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    t0 = time.time()
    llm = LLM(model=model, **engine)
    t1 = time.time()
    tok = AutoTokenizer.from_pretrained(model)
    rows = prompts(n)
    texts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                     add_generation_prompt=True, enable_thinking=False) for r in rows]
    params = [SamplingParams(max_tokens=r["max_tokens"], **SAMPLING) for r in rows]
    outs = llm.generate(texts, params, use_tqdm=False)
    t2 = time.time()
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    in_tokens = sum(len(o.prompt_token_ids) for o in outs)
    llm.llm_engine.engine_core.shutdown()
    return {"wall_s": t2 - t0, "gen_s": t2 - t1, "rows": len(outs), "output_tokens": out_tokens,
            "input_tokens": in_tokens}


def run_ray_data_llm(model: str, engine: dict, n: int, input_dir: str) -> dict:
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    t0 = time.time()
    # Its CPU stages (chat template, tokenize, detokenize) each hold an actor: give Ray enough
    # logical CPUs to place all of them beside the engine, or the pipeline waits forever.
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    config = vLLMEngineProcessorConfig(
        model_source=model, engine_kwargs=engine, concurrency=1, batch_size=64,
        placement_group_config={"bundles": [{"CPU": 1}]}, log_engine_metrics=False)
    processor = build_processor(
        config,
        preprocess=lambda row: dict(
            messages=[{"role": "user", "content": row["prompt"]}],
            chat_template_kwargs={"enable_thinking": False},
            sampling_params=dict(max_tokens=json.loads(row["sampling"])["max_tokens"], **SAMPLING)),
        # each row's answer time and how long its request took: the span of generation
        postprocess=lambda row: dict(id=row["id"], response=row["generated_text"],
                                     num_generated_tokens=row["num_generated_tokens"],
                                     num_input_tokens=row["num_input_tokens"], done=time.time(),
                                     took=row["time_taken_llm"]),
    )
    ds = processor(ray.data.read_parquet(input_dir))
    out = ds.to_pandas()
    t2 = time.time()
    ray.shutdown()
    return {"wall_s": t2 - t0, "gen_s": float(out["done"].max() - (out["done"] - out["took"]).min()),
            "rows": len(out),
            "output_tokens": int(out["num_generated_tokens"].sum()),
            "input_tokens": int(out["num_input_tokens"].sum())}


def run_ray_data_llm_choice(model: str, engine: dict, input_dir: str, labels: list[str]) -> dict:
    """Ray Data LLM labeling the same rows with the same prompt, the label decoded under a
    structured-output `choice` grammar (greedy): one label a row, no probabilities."""
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from pipeline.heads.classify import ClassifyHead

    t0 = time.time()
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    config = vLLMEngineProcessorConfig(
        model_source=model, engine_kwargs=engine, concurrency=1, batch_size=64,
        placement_group_config={"bundles": [{"CPU": 1}]}, log_engine_metrics=False)
    head = ClassifyHead({"labels": labels})  # the classify head's prompt wording
    processor = build_processor(
        config,
        preprocess=lambda row: dict(
            messages=head._turns(row["text"]), chat_template_kwargs={"enable_thinking": False},
            sampling_params=dict(temperature=0.0, max_tokens=16, structured_outputs={"choice": labels})),
        postprocess=lambda row: dict(id=row["id"], label=row["generated_text"], done=time.time(),
                                     took=row["time_taken_llm"], num_input_tokens=row["num_input_tokens"],
                                     num_generated_tokens=row["num_generated_tokens"]),
    )
    out = processor(ray.data.read_parquet(input_dir)).to_pandas()
    t2 = time.time()
    ray.shutdown()
    return {"wall_s": t2 - t0, "gen_s": float(out["done"].max() - (out["done"] - out["took"]).min()),
            "rows": len(out), "output_tokens": int(out["num_generated_tokens"].sum()),
            "input_tokens": int(out["num_input_tokens"].sum()),
            "in_set": float(out["label"].isin(labels).mean())}


# --- the extract mix: the same rows, prompt and JSON Schema for every system ----------------

EXTRACT_SYSTEMS = ("qwen-batch-extract", "vllm-json", "ray-data-llm-json")
EXTRACT_MAX_TOKENS = 192
# Bounded strings: a random-weight model closes a string only at maxLength.
EXTRACT_SCHEMA = {
    "type": "object",
    "properties": {
        "product": {"type": "string", "maxLength": 16},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "sentiment": {"enum": ["positive", "negative", "neutral", "mixed"]},
        "aspects": {"type": "array", "maxItems": 3, "items": {
            "type": "object", "properties": {"aspect": {"enum": ["quality", "price", "delivery", "service"]},
                                             "positive": {"type": "boolean"}},
            "required": ["aspect", "positive"]}},
        "would_recommend": {"type": "boolean"},
    },
    "required": ["product", "rating", "sentiment", "aspects", "would_recommend"],
}


def _extract_head():
    from pipeline.heads.extract import ExtractHead

    return ExtractHead({"schema": EXTRACT_SCHEMA})


def _structured_engine(engine: dict) -> dict:
    """The engine settings qwen-batch gives every generative engine (pipeline.engine.vllm_engine):
    xgrammar with compact JSON and Qwen3's reasoning parser, so all systems decode alike."""
    from vllm.config import StructuredOutputsConfig

    from pipeline.engine.engine_args import STRUCTURED_OUTPUTS

    return {**engine, "reasoning_parser": "qwen3",
            "structured_outputs_config": StructuredOutputsConfig(**STRUCTURED_OUTPUTS)}


def _extract_result(rows: int, outs_ok: int, t0: float, t1: float, t2: float, out_tokens: int, in_tokens: int) -> dict:
    return {"wall_s": t2 - t0, "gen_s": t2 - t1, "rows": rows, "output_tokens": out_tokens,
            "input_tokens": in_tokens, "valid": outs_ok / max(rows, 1)}


def _valid(text: str) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), EXTRACT_SCHEMA)
        return True
    except Exception:
        return False


def run_vllm_json(model: str, engine: dict, n: int) -> dict:
    """Bare vLLM: LLM.generate over the rows, each decoded under the JSON Schema."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    t0 = time.time()
    llm = LLM(model=model, **_structured_engine(engine))
    t1 = time.time()
    tok = AutoTokenizer.from_pretrained(model)
    head = _extract_head()
    texts = [tok.apply_chat_template(head.messages({"text": r["text"]}), tokenize=False,
                                     add_generation_prompt=True, enable_thinking=False) for r in reviews(n)]
    params = SamplingParams(max_tokens=EXTRACT_MAX_TOKENS, temperature=0.0,
                            structured_outputs=StructuredOutputsParams(json=head.constraint))
    outs = llm.generate(texts, params, use_tqdm=False)
    t2 = time.time()
    llm.llm_engine.engine_core.shutdown()
    return _extract_result(len(outs), sum(_valid(o.outputs[0].text) for o in outs), t0, t1, t2,
                           sum(len(o.outputs[0].token_ids) for o in outs), sum(len(o.prompt_token_ids) for o in outs))


def run_ray_data_llm_json(model: str, engine: dict, input_dir: str) -> dict:
    """Ray Data LLM on the same rows: guided JSON decoding (structured_outputs json)."""
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    t0 = time.time()
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # Ray 2.60 takes the template's arguments per stage: a row's chat_template_kwargs are not
    # read, and the prompt would be rendered in thinking mode (the JSON constraint then waits
    # for a </think> that never comes).
    config = vLLMEngineProcessorConfig(
        model_source=model, engine_kwargs=_structured_engine(engine), concurrency=1, batch_size=64,
        placement_group_config={"bundles": [{"CPU": 1}]}, log_engine_metrics=False,
        chat_template_stage={"chat_template_kwargs": {"enable_thinking": False}})
    head = _extract_head()
    constraint = head.constraint
    processor = build_processor(
        config,
        preprocess=lambda row: dict(
            messages=head.messages({"text": row["text"]}), chat_template_kwargs={"enable_thinking": False},
            sampling_params=dict(temperature=0.0, max_tokens=EXTRACT_MAX_TOKENS,
                                 structured_outputs={"json": constraint})),
        postprocess=lambda row: dict(id=row["id"], raw=row["generated_text"], done=time.time(),
                                     took=row["time_taken_llm"], num_input_tokens=row["num_input_tokens"],
                                     num_generated_tokens=row["num_generated_tokens"]),
    )
    out = processor(ray.data.read_parquet(input_dir)).to_pandas()
    t2 = time.time()
    ray.shutdown()
    gen_start = float((out["done"] - out["took"]).min())
    return {**_extract_result(len(out), int(sum(_valid(t) for t in out["raw"])), t0, gen_start,
                              float(out["done"].max()), int(out["num_generated_tokens"].sum()),
                              int(out["num_input_tokens"].sum())), "wall_s": t2 - t0}


def run_qwen_batch_extract(model: str, engine: dict, input_dir: str, out_dir: str) -> dict:
    result = run_qwen_batch(model, engine, input_dir, out_dir, sampling={"temperature": 0.0},
                            task={"head": "extract", "options": {"schema": EXTRACT_SCHEMA,
                                                                 "max_tokens": EXTRACT_MAX_TOKENS}})
    from pipeline.io.output import OutputStore

    results = OutputStore(out_dir).read_committed("results")
    rows = results.num_rows if results is not None else 0
    return {**result, "valid": rows / max(result["rows"], 1)}


def run_qwen_batch(model: str, engine: dict, input_dir: str, out_dir: str, *, task: dict,
                   sampling: dict | None = None, engine_factory=None) -> dict:
    """A qwen-batch job as a user runs it; the generation span comes from its own metrics."""
    from pipeline.runner import run_job
    from pipeline.spec import load_spec

    t0 = time.time()
    spec = load_spec(data={
        "input": {"path": input_dir}, "output": {"path": out_dir},
        "model": {"source": model, "max_model_len": engine["max_model_len"],
                  "engine_kwargs": {k: v for k, v in engine.items() if k != "max_model_len"}},
        "task": task, "sampling": sampling or {},
    })
    report = run_job(spec, overwrite=True, progress=False, engine_factory=engine_factory)
    wall = time.time() - t0
    shards = report.totals.shards
    first = min(m["started_at"] for m in shards if m["started_at"])
    last = max(m["finished_at"] for m in shards if m["finished_at"])
    computed = [m.get("prompt_tokens_computed") for m in shards]
    return {"wall_s": wall, "gen_s": last - first, "rows": report.totals.rows,
            "output_tokens": report.totals.completion_tokens, "input_tokens": report.totals.prompt_tokens,
            "input_tokens_computed": None if None in computed else sum(computed)}


def run_vllm_map_reduce(model: str, engine: dict, n: int) -> dict:
    """The straightforward map-reduce over bare vLLM: all chunks in one generate call, then
    each reduce level in one call."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from pipeline.heads.summarize import SummarizeOptions, split_text
    from pipeline.testing import FakeEngine

    t0 = time.time()
    llm = LLM(model=model, **engine)
    t1 = time.time()
    tok = AutoTokenizer.from_pretrained(model)
    opts = SummarizeOptions()
    limit = engine["max_model_len"]

    def prompt(instruction, text):
        return tok.apply_chat_template([{"role": "user", "content": instruction.replace("{text}", text)}],
                                       tokenize=False, add_generation_prompt=True, enable_thinking=False)

    def fits(instruction):
        return lambda t: len(tok.encode(prompt(instruction, t), add_special_tokens=False)) + SUMMARY_TOKENS <= limit

    budget = limit - SUMMARY_TOKENS - len(tok.encode(prompt(opts.map_instruction, ""), add_special_tokens=False))
    params = SamplingParams(max_tokens=SUMMARY_TOKENS, **SAMPLING)
    splitter = FakeEngine(tokenizer=tok, record=False)  # the tokenize/decode split_text needs
    work = {d["id"]: split_text(d["text"], splitter, budget, overlap=0, fits=fits(opts.map_instruction))
            for d in documents(n)}
    out_tokens = in_tokens = 0
    instruction = opts.map_instruction
    while work:  # one generate call per level, over every document still in progress
        keys = [(doc, i) for doc, parts in work.items() for i in range(len(parts))]
        outs = llm.generate([prompt(instruction, work[d][i]) for d, i in keys], params, use_tqdm=False)
        out_tokens += sum(len(o.outputs[0].token_ids) for o in outs)
        in_tokens += sum(len(o.prompt_token_ids) for o in outs)
        summaries: dict = {}
        for (d, _), o in zip(keys, outs):
            summaries.setdefault(d, []).append(o.outputs[0].text)
        instruction = opts.reduce_instruction
        work = {}
        for d, parts in summaries.items():
            if len(parts) == 1:
                continue  # this document is done
            groups: list[str] = []
            for part in parts:
                if groups and fits(instruction)(groups[-1] + "\n\n" + part):
                    groups[-1] += "\n\n" + part
                else:
                    groups.append(part)
            work[d] = groups
    t2 = time.time()
    llm.llm_engine.engine_core.shutdown()
    return {"wall_s": t2 - t0, "gen_s": t2 - t1, "rows": n, "output_tokens": out_tokens, "input_tokens": in_tokens}


def run_vllm_score(model: str, engine: dict, n: int, labels: list[str] = LABELS) -> dict:
    """Label scoring over bare vLLM, the way the classify head does it: every (prompt, label)
    sequence in one generate call with prompt log-probabilities."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from pipeline.heads.classify import END_OF_TURN, ClassifyHead

    t0 = time.time()
    llm = LLM(model=model, **engine)
    t1 = time.time()
    tok = AutoTokenizer.from_pretrained(model)
    head = ClassifyHead({"labels": labels})  # its prompt wording, so both systems read the same
    answers = [tok.encode(label + END_OF_TURN, add_special_tokens=False) for label in labels]
    seqs, starts = [], []
    for r in reviews(n):
        text = tok.apply_chat_template(head._turns(r["text"]), tokenize=False, add_generation_prompt=True,
                                       enable_thinking=False)
        prompt = tok.encode(text, add_special_tokens=False)
        for a in answers:
            seqs.append(TokensPrompt(prompt_token_ids=prompt + a))
            starts.append(len(prompt))
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outs = llm.generate(seqs, params, use_tqdm=False)
    chosen = []
    for i in range(0, len(outs), len(labels)):
        scores = [sum(o.prompt_logprobs[j][o.prompt_token_ids[j]].logprob
                      for j in range(starts[i + k], len(o.prompt_token_ids)))
                  for k, o in enumerate(outs[i:i + len(labels)])]
        chosen.append(labels[max(range(len(scores)), key=scores.__getitem__)])
    t2 = time.time()
    in_tokens = sum(len(o.prompt_token_ids) for o in outs)
    llm.llm_engine.engine_core.shutdown()
    return {"wall_s": t2 - t0, "gen_s": t2 - t1, "rows": len(chosen), "output_tokens": 0,
            "input_tokens": in_tokens}


def child(args) -> None:
    engine = json.loads(args.engine)
    system, _, variant = args.system.partition("/")
    labels = LABEL_SETS.get(variant, LABELS)
    if system == "vllm-score":
        result = run_vllm_score(args.model, engine, args.prompts, labels)
    elif system in ("qwen-batch-classify", "qwen-batch-per-label"):
        scoring = "trie" if system == "qwen-batch-classify" else "per_label"
        result = run_qwen_batch(args.model, engine, args.input, args.scratch,
                                task={"head": "classify", "options": {"labels": labels, "scoring": scoring}})
    elif system in EXTRACT_SYSTEMS:
        result = (run_qwen_batch_extract(args.model, engine, args.input, args.scratch) if system == "qwen-batch-extract"
                  else run_vllm_json(args.model, engine, args.prompts) if system == "vllm-json"
                  else run_ray_data_llm_json(args.model, engine, args.input))
    elif system == "ray-data-llm-choice":
        result = run_ray_data_llm_choice(args.model, engine, args.input, labels)
    elif args.system == "vllm":
        result = run_vllm(args.model, engine, args.prompts)
    elif args.system == "ray-data-llm":
        result = run_ray_data_llm(args.model, engine, args.prompts, args.input)
    elif args.system == "qwen-batch":
        result = run_qwen_batch(args.model, engine, args.input, args.scratch, task={"head": "chat"},
                                sampling=SAMPLING)
    elif args.system == "vllm-map-reduce":
        result = run_vllm_map_reduce(args.model, engine, args.prompts)
    elif args.system == "qwen-batch-summarize":
        result = run_qwen_batch(args.model, engine, args.input, args.scratch, sampling=SAMPLING,
                                task={"head": "summarize", "options": {"max_tokens": SUMMARY_TOKENS}})
    else:  # the data path: an instant fake engine, so only our own per-row work remains
        from pipeline.testing import fake_engine_factory

        result = run_qwen_batch(args.model, engine, args.input, args.scratch, task={"head": "chat"},
                                engine_factory=fake_engine_factory())
    print("RESULT " + json.dumps(result), flush=True)


# --- the driver ---------------------------------------------------------------------------

def measure(system: str, args, input_dir: Path, scratch: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", system, "--model", args.model, "--prompts", str(args.prompts),
           "--engine", json.dumps(args.engine_kwargs), "--input", str(input_dir), "--scratch", str(scratch)]
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "ERROR", "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, start_new_session=True,
                          timeout=args.timeout)
    process_wall = time.time() - t0
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{system} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    r = json.loads(line[7:])
    r["system"] = system
    # End to end as a user sees it: process start (imports) to exit (engine shut down).
    r["inner_wall_s"], r["wall_s"] = r["wall_s"], process_wall
    r["output_tokens_per_s"] = r["output_tokens"] / r["wall_s"]
    r["total_tokens_per_s"] = (r["output_tokens"] + r["input_tokens"]) / r["wall_s"]
    r["rows_per_s"] = r["rows"] / r["wall_s"]
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint (default: the tiny Qwen3, built in OUT/model)")
    p.add_argument("--prompts", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--systems", default=None, help="comma-separated; default: all for the mix")
    p.add_argument("--mix", choices=["chat", "summarize", "classify", "extract"], default="chat",
                   help="chat: short prompts, varied output lengths; summarize: long documents "
                        "(bare-vLLM map-reduce against the summarize head); classify: reviews "
                        "labeled with 4 and with 10 labels by the classify head (trie scoring), "
                        "the same head with scoring: per_label, and Ray Data LLM decoding the "
                        "label under a structured `choice` grammar; add vllm-score/4 to "
                        "--systems for bare-vLLM per-label scoring; extract: the same reviews "
                        "through the extract head, bare vLLM and Ray Data LLM, all decoding under "
                        "one JSON Schema")
    p.add_argument("--label-sets", default="4,10", help="classify mix: label set sizes to run (4, 10)")
    p.add_argument("--engine-kwargs", default="{}",
                   help="JSON merged into every system's engine arguments (e.g. '{\"block_size\": 32}')")
    p.add_argument("--data-path", action="store_true", help="also measure the data path with a fake engine")
    p.add_argument("--out", default="bench-out")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--from-runs", help="only re-render the table and chart from an earlier OUT/runs.parquet")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--engine", help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.system = args.child
        return child(args)

    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_runs:
        runs = pq.read_table(args.from_runs).to_pylist()
        return report(runs, out, metric="rows_per_s" if args.mix in ("classify", "extract") else "output_tokens_per_s")
    if not args.model:
        from pipeline.ops.tiny_model import make_tiny_model

        args.model = str(make_tiny_model(out / "model"))
    args.engine_kwargs = {"max_model_len": 1024, "gpu_memory_utilization": 0.25, "enforce_eager": True,
                          **json.loads(args.engine_kwargs)}
    input_dir = out / f"input-{args.mix}"
    if args.mix == "chat":
        write_input(input_dir, args.prompts)
        default = SYSTEMS
    elif args.mix == "summarize":
        write_rows(input_dir, documents(args.prompts), shards=4)
        default = ("vllm-map-reduce", "qwen-batch-summarize")
    elif args.mix == "extract":
        write_rows(input_dir, reviews(args.prompts))
        default = EXTRACT_SYSTEMS
    else:
        write_rows(input_dir, reviews(args.prompts))
        default = tuple(f"{s}/{k}" for k in args.label_sets.split(",") for s in CLASSIFY_SYSTEMS)
    systems = [s for s in (args.systems.split(",") if args.systems else default) if s]
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for rep in range(args.repeats):
            order = systems if rep % 2 == 0 else systems[::-1]  # alternate: machines drift
            for system in order:
                r = measure(system, args, input_dir, Path(scratch) / system)
                r["repeat"] = rep
                runs.append(r)
                print(f"  {system:24s} run {rep + 1}: {r['wall_s']:7.1f} s  {r['output_tokens_per_s']:8.1f} out tok/s"
                      f"  {r['rows_per_s']:6.2f} rows/s", flush=True)
        if args.data_path:
            for rep in range(args.repeats):
                r = measure("data-path", args, input_dir, Path(scratch) / "data-path")
                r["repeat"] = rep
                runs.append(r)
                print(f"  data path      run {rep + 1}: {r['rows_per_s']:8.1f} rows/s", flush=True)
    pq.write_table(pa.Table.from_pylist(runs), out / "runs.parquet")
    report(runs, out, metric="rows_per_s" if args.mix in ("classify", "extract") else "output_tokens_per_s")


def report(runs: list[dict], out: Path, *, metric: str) -> None:
    """The table on stdout, OUT/summary.parquet and OUT/throughput.png from the runs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    systems = list(dict.fromkeys(r["system"] for r in runs))
    summary = summarize(runs, systems)
    pq.write_table(pa.Table.from_pylist(summary), out / "summary.parquet")
    print_table(summary)
    chart(runs, systems, out / "throughput.png", metric=metric)
    print(f"\nWrote {out}/runs.parquet, {out}/summary.parquet, {out}/throughput.png")


def _median_or_none(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[dict], systems: list[str]) -> list[dict]:
    rows = []
    base = {s: [r for r in runs if r["system"] == s] for s in dict.fromkeys(r["system"] for r in runs)}
    med = {s: statistics.median(r["wall_s"] for r in rs) for s, rs in base.items()}
    for s, rs in base.items():
        walls = [r["wall_s"] for r in rs]
        row = {"system": s, "runs": len(rs), "wall_s_median": med[s], "wall_s_min": min(walls),
               "wall_s_max": max(walls),
               "output_tokens_per_s": statistics.median(r["output_tokens_per_s"] for r in rs),
               "total_tokens_per_s": statistics.median(r["total_tokens_per_s"] for r in rs),
               "rows_per_s": statistics.median(r["rows_per_s"] for r in rs),
               "output_tokens": rs[0]["output_tokens"],
               # without engine start: first request to last answer, in the system's own clock
               "gen_s_median": _median_or_none(r.get("gen_s") for r in rs),
               "gen_output_tokens_per_s": _median_or_none(r["output_tokens"] / r["gen_s"]
                                                          for r in rs if r.get("gen_s")),
               "gen_rows_per_s": _median_or_none(r["rows"] / r["gen_s"] for r in rs if r.get("gen_s")),
               "input_tokens": rs[0]["input_tokens"],
               "input_tokens_computed": rs[0].get("input_tokens_computed")}
        variant = s.partition("/")[2]
        for name in REFERENCES:
            ref = f"{name}/{variant}" if variant else name  # classify: the same label set
            # Every row gets every ratio column (None where it does not apply): Arrow takes a
            # table's columns from its rows, and a reference's own row has no ratio to itself.
            row.update({f"x_{name}": None, f"x_{name}_min": None, f"x_{name}_max": None})
            if ref in med and s != ref and s != "data-path":  # the fake engine is no rival
                # Throughput ratio (reference wall / our wall) within each repeat, whose runs
                # are adjacent in time: a machine that drifts over the session moves both.
                ref_wall = {r["repeat"]: r["wall_s"] for r in base[ref]}
                paired = [ref_wall[r["repeat"]] / r["wall_s"] for r in rs if r["repeat"] in ref_wall]
                row[f"x_{name}"] = statistics.median(paired)
                row[f"x_{name}_min"], row[f"x_{name}_max"] = min(paired), max(paired)
        rows.append(row)
    return rows


def print_table(summary: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="throughput, median of runs (min-max). wall: the whole process; gen: first request to last "
                    "answer (no imports, no engine start); ratios: end-to-end throughput vs. the reference, "
                    "median over repeats of the ratio within a repeat (min-max)",
              width=170)
    refs = [f"x_{k}" for k in REFERENCES if any(r.get(f"x_{k}") is not None for r in summary)]
    names = {f"x_{k}": f"vs {v}" for k, v in REFERENCES.items()}
    computed = any(r.get("input_tokens_computed") is not None for r in summary)
    for c in ("system", "wall s", "gen s", "out tok/s", "gen out tok/s", "total tok/s", "rows/s", "gen rows/s",
              *(["in tok read / computed"] if computed else []), *[names[k] for k in refs]):
        t.add_column(c, justify="left" if c == "system" else "right", no_wrap=c == "system")
    def fmt(x, digits):
        return "-" if x is None else f"{x:.{digits}f}"

    for r in summary:
        def ratio(k, r=r):
            return f"{r[k]:.2f}x ({r[k + '_min']:.2f}-{r[k + '_max']:.2f})" if r.get(k) is not None else "-"

        t.add_row(r["system"], f"{r['wall_s_median']:.1f} ({r['wall_s_min']:.1f}-{r['wall_s_max']:.1f})",
                  fmt(r["gen_s_median"], 1), f"{r['output_tokens_per_s']:.0f}", fmt(r["gen_output_tokens_per_s"], 0),
                  f"{r['total_tokens_per_s']:.0f}", f"{r['rows_per_s']:.1f}", fmt(r["gen_rows_per_s"], 1),
                  *([f"{r['input_tokens']:,} / " + ("-" if r.get("input_tokens_computed") is None
                                                    else f"{r['input_tokens_computed']:,}")] if computed else []),
                  *[ratio(k) for k in refs])
    Console(width=190).print(t)


def chart(runs: list[dict], systems: list[str], path: Path, *, metric: str = "output_tokens_per_s") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engine_systems = [s for s in systems if s != "data-path"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, s in enumerate(engine_systems):
        vals = [r[metric] for r in runs if r["system"] == s]
        ax.bar(i, statistics.median(vals), color="#4c78a8")
        ax.scatter([i] * len(vals), vals, color="black", zorder=3, s=12)
    ax.set_xticks(range(len(engine_systems)), engine_systems)
    ax.set_ylabel(f"{metric.replace('_per_s', '/s').replace('_', ' ')}, end to end (engine start included)")
    ax.set_title("Same prompts, model, engine settings; dots: single runs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
