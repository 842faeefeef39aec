"""Graded labeling runs (classify's gold_column) and routing for review (abstain_below), issue 29
items 4-5: the metric math against hand-computed values, shards adding up to the run, a
fake-engine job over 2 shards through metrics/, `status` and `report`, and one short run on the
real engine to show the columns flow end to end."""

import asyncio
import json
import math
import re

import pyarrow as pa
import pytest
from conftest import local_ray, read_dir, run_cli, write_shards
from rich.console import Console

from jobs import spec_maker
from pipeline.heads.classify import ClassifyHead
from pipeline.ops.metrics import add_grading, calibration_bin, grading_counts, grading_scores
from pipeline.runner import EXIT_OK, run_job
from pipeline.testing import FakeEngine

# ---- the metric math, by hand

# gold, predicted, confidence
CASE = [("a", "a", 0.9), ("a", "b", 0.6), ("b", "b", 0.8), ("b", "b", 0.55), ("c", "a", 0.95)]


def rows(case):
    return [{"gold": g, "label": p, "confidence": c} for g, p, c in case]


def test_confusion_accuracy_macro_f1_and_ece_by_hand():
    counts = grading_counts(rows(CASE))
    assert counts["graded"] == 5 and counts["correct"] == 3
    assert {(c["gold"], c["predicted"]): c["count"] for c in counts["confusion"]} == \
        {("a", "a"): 1, ("a", "b"): 1, ("b", "b"): 2, ("c", "a"): 1}
    s = grading_scores(counts["confusion"], counts["calibration"])
    assert s["accuracy"] == pytest.approx(3 / 5)
    # F1 a: TP 1, FP 1, FN 1 -> 0.5; b: TP 2, FP 1, FN 0 -> 0.8; c (never predicted): 0
    assert s["f1"] == pytest.approx({"a": 0.5, "b": 0.8, "c": 0.0})
    assert s["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    # bins: 9 holds 0.9 (right) and 0.95 (wrong), 6: 0.6 (wrong), 8: 0.8 (right), 5: 0.55 (right)
    # ECE = 2/5 |0.5 - 0.925| + 1/5 |0 - 0.6| + 1/5 |1 - 0.8| + 1/5 |1 - 0.55| = 0.42
    assert s["ece"] == pytest.approx(0.42)
    assert {b["bin"]: b["rows"] for b in counts["calibration"] if b["rows"]} == {9: 2, 6: 1, 8: 1, 5: 1}


def test_perfect_and_empty_grading():
    s = grading_scores(*(lambda c: (c["confusion"], c["calibration"]))(grading_counts(rows([("x", "x", 1.0)]))))
    assert (s["accuracy"], s["macro_f1"], s["ece"]) == (1.0, 1.0, 0.0)
    empty = grading_counts([])
    assert grading_scores(empty["confusion"], empty["calibration"])["accuracy"] is None


def test_calibration_bins_are_equal_width():
    assert [calibration_bin(p) for p in (0.0, 0.05, 0.1, 0.3, 0.7, 0.6, 0.99, 1.0)] == [0, 0, 1, 3, 7, 6, 9, 9]


def test_shards_add_up_to_the_run():
    import random

    rng = random.Random(7)
    case = [(rng.choice("abcd"), rng.choice("abc"), rng.random()) for _ in range(200)]
    whole = grading_counts(rows(case))
    parts = [grading_counts(rows(case[i:j])) for i, j in ((0, 37), (37, 120), (120, 121), (121, 200))]
    summed = add_grading([{**p, "review": None, "gold_unknown": 0} for p in parts])
    assert summed["confusion"] == whole["confusion"] and summed["graded"] == 200
    assert summed["correct"] == whole["correct"]
    for a, b in zip(summed["calibration"], whole["calibration"]):
        assert (a["rows"], a["correct"]) == (b["rows"], b["correct"])
        assert a["confidence_sum"] == pytest.approx(b["confidence_sum"])
    got = grading_scores(summed["confusion"], summed["calibration"])
    want = grading_scores(whole["confusion"], whole["calibration"])
    assert got["accuracy"] == want["accuracy"] and got["macro_f1"] == pytest.approx(want["macro_f1"])
    assert got["ece"] == pytest.approx(want["ece"])
    # and against the definition, over all rows at once
    acc = sum(g == p for g, p, _ in case) / len(case)
    ece = 0.0
    for b in range(10):
        inside = [(g == p, c) for g, p, c in case if min(int(c * 10), 9) == b]
        if inside:
            ece += len(inside) / len(case) * abs(sum(x for x, _ in inside) / len(inside)
                                                  - sum(c for _, c in inside) / len(inside))
    assert got["accuracy"] == pytest.approx(acc) and got["ece"] == pytest.approx(ece)


# ---- the head

LABELS = ["pos", "neg", "neu"]


def scripted_factory(labels=tuple(LABELS)):
    """An engine_factory of FakeEngines whose scores follow the row's text: for a prompt
    holding 'pick=L p=P', label L gets probability P and the others share the rest. (Built in a
    closure so that Ray actors get it by value, not by importing this test module.)"""
    from pipeline.heads.base import Scores

    def build(args=None, *, device="cpu"):
        eng = FakeEngine(args, device=device, record=False)

        async def score(prompt, continuations, *, method="trie"):
            m = re.search(r"pick=(\w+) p=([0-9.]+)", eng._text(prompt))
            pick, p = m.group(1), float(m.group(2))
            logprobs = [math.log(p) if label == pick else math.log((1 - p) / (len(labels) - 1)) for label in labels]
            return Scores(logprobs, sum(len(prompt) + len(c) for c in continuations))

        eng.score = score
        return eng

    return build


def run_head(options, row):
    return asyncio.run(ClassifyHead({"labels": LABELS, **options}).run(row, scripted_factory()()))


def test_head_grades_and_flags_rows():
    opts = {"gold_column": "gold", "abstain_below": 0.6}
    out = run_head(opts, {"text": "pick=pos p=0.7", "gold": " pos "})
    assert (out["label"], out["gold"], out["correct"], out["review"]) == ("pos", "pos", True, False)
    assert out["confidence"] == pytest.approx(0.7)
    out = run_head(opts, {"text": "pick=neg p=0.5", "gold": "pos"})
    assert (out["label"], out["correct"], out["review"]) == ("neg", False, True)
    # a gold value that is not a label: kept, not graded
    out = run_head(opts, {"text": "pick=neg p=0.9", "gold": "maybe"})
    assert (out["gold"], out["correct"], out["review"]) == ("maybe", None, False)
    for blank in (None, "  "):
        out = run_head(opts, {"text": "pick=neg p=0.9", "gold": blank})
        assert (out["gold"], out["correct"]) == (None, None)
    # not asked for: no such keys
    out = run_head({}, {"text": "pick=neg p=0.9", "gold": "neg"})
    assert not {"gold", "correct", "review"} & set(out)


def test_a_sequence_classification_checkpoint_is_graded_on_its_own_labels():
    from pipeline.heads.checkpoint_classify import SequenceClassifyHead

    eng = FakeEngine()
    eng.id2label = {0: "ham", 1: "spam"}

    async def classify(prompt):
        return [0.3, 0.7]

    eng.classify = classify
    head = SequenceClassifyHead({"gold_column": "g", "abstain_below": 0.8})
    out = asyncio.run(head.run({"text": "buy now", "g": "spam"}, eng))
    assert (out["label"], out["gold"], out["correct"], out["review"]) == ("spam", "spam", True, True)
    out = asyncio.run(head.run({"text": "buy now", "g": "pos"}, eng))  # not one of id2label's
    assert (out["gold"], out["correct"]) == ("pos", None)


def test_results_schema_and_columns_follow_the_options():
    base = ClassifyHead({"labels": LABELS})
    assert not {"gold", "correct", "review"} & set(base.result_schema(pa.int64()).names)
    assert base.input_columns() == ["text"] and base.required_all() == []
    graded = ClassifyHead({"labels": LABELS, "gold_column": "truth"})
    names = graded.result_schema(pa.int64()).names
    assert {"gold", "correct"} <= set(names) and "review" not in names
    assert graded.input_columns() == ["text", "truth"] and graded.required_all() == ["truth"]
    assert graded.required_any() == ["text"]
    routed = ClassifyHead({"labels": LABELS, "abstain_below": 0.5}).result_schema(pa.int64()).names
    assert "review" in routed and "gold" not in routed


def test_options_are_checked():
    for bad in ({"abstain_below": 0}, {"abstain_below": 1}, {"abstain_below": 1.5},
                {"multi_label": True, "gold_column": "g"}, {"multi_label": True, "abstain_below": 0.5}):
        assert ClassifyHead.check_options({"labels": LABELS, **bad}), bad
    assert ClassifyHead.check_options({"labels": LABELS, "gold_column": "g", "abstain_below": 0.3}) is None


# ---- a graded job on the fake engine, 2 shards

THRESHOLD = 0.6
# (pick, p, gold): 'neu' is some rows' gold label and never predicted
DESIGN = [
    [("pos", 0.9, "pos"), ("pos", 0.55, "neg"), ("neg", 0.8, "neg"), ("neg", 0.45, "neu"), ("pos", 0.7, None),
     ("neg", 0.65, "maybe"), ("pos", 0.95, "pos"), ("neg", 0.35, "neg")],
    [("neg", 0.85, "neg"), ("pos", 0.5, "neu"), ("pos", 0.75, "pos"), ("neg", 0.58, "pos"), ("pos", 0.62, "pos"),
     ("neg", 0.99, "neg")],
]


@pytest.fixture(scope="module", autouse=True)
def _ray():
    yield from local_ray()


MODEL = {}
make_spec = spec_maker(model=MODEL, head="classify", resources={"batch_size": 4})


@pytest.fixture(scope="module")
def graded_job(tmp_path_factory, tiny_model):
    MODEL["source"] = str(tiny_model)
    tmp = tmp_path_factory.mktemp("graded")
    shards = [[{"id": s * 100 + i, "text": f"row {s} {i} pick={pick} p={p}", "gold": gold}
               for i, (pick, p, gold) in enumerate(rows_)] for s, rows_ in enumerate(DESIGN)]
    shards[1].append({"id": 199, "text": "", "gold": "pos"})  # an error row with a gold label: not graded
    write_shards(tmp / "in", shards, pa.schema([("id", pa.int64()), ("text", pa.string()), ("gold", pa.string())]))
    spec = make_spec(tmp, task={"options": {"labels": LABELS, "gold_column": "gold", "abstain_below": THRESHOLD}})

    report = run_job(spec, progress=False, engine_factory=scripted_factory(),
                     console=Console(file=open("/dev/null", "w")))
    assert report.exit_code == EXIT_OK
    return tmp / "out"


def expected():
    """The job's grading, from DESIGN by hand."""
    graded = [(gold, pick, p) for shard in DESIGN for pick, p, gold in shard if gold in LABELS]
    acc = sum(g == p for g, p, _ in graded) / len(graded)
    f1 = {}
    for c in {g for g, _, _ in graded} | {p for _, p, _ in graded}:
        tp = sum(g == p == c for g, p, _ in graded)
        f1[c] = 2 * tp / (sum(g == c for g, _, _ in graded) + sum(p == c for _, p, _ in graded))
    bins = {}
    for g, p, c in graded:
        bins.setdefault(min(int(c * 10), 9), []).append((g == p, c))
    ece = sum(abs(sum(x for x, _ in b) - sum(c for _, c in b)) for b in bins.values()) / len(graded)
    review = sum(p < THRESHOLD for shard in DESIGN for _, p, _ in shard)
    return {"graded": len(graded), "accuracy": acc, "macro_f1": sum(f1.values()) / len(f1), "ece": ece,
            "review": review, "confusion": sorted((g, p) for g, p, _ in graded)}


def test_results_carry_gold_correct_and_review(graded_job):
    results = read_dir(graded_job / "results").to_pylist()
    assert len(results) == 14
    for r in results:
        top = max(d["prob"] for d in r["label_probs"])
        assert r["review"] is (top < THRESHOLD)  # exactly the rows under the threshold
        assert r["confidence"] == top
        if r["gold"] in LABELS:
            assert r["correct"] is (r["gold"] == r["label"])
        else:
            assert r["correct"] is None
    unknown = [r for r in results if r["id"] == 5][0]
    assert (unknown["gold"], unknown["correct"]) == ("maybe", None)
    assert [r for r in results if r["id"] == 4][0]["gold"] is None
    assert sum(r["review"] for r in results) == expected()["review"] == 5


def test_metrics_parquet_has_the_runs_confusion_counts(graded_job):
    metrics = read_dir(graded_job / "metrics").to_pylist()
    assert len(metrics) == 2
    pairs = sorted((c["gold"], c["predicted"]) for m in metrics for c in m["confusion"] for _ in range(c["count"]))
    assert pairs == expected()["confusion"]
    assert sum(m["graded"] for m in metrics) == expected()["graded"] == 12
    assert sum(m["gold_unknown"] for m in metrics) == 1
    assert sum(m["review"] for m in metrics) == 5
    assert sum(b["rows"] for m in metrics for b in m["calibration"]) == 12
    by_shard = {m["shard"].rsplit("/", 1)[-1]: m for m in metrics}
    assert by_shard["part-00000.parquet"]["graded"] == 6 and by_shard["part-00001.parquet"]["graded"] == 6


def test_status_shows_the_scores_and_the_review_count(graded_job, capsys):
    from pipeline.cli import main

    capsys.readouterr()
    assert main(["status", str(graded_job), "--json"]) == 0
    g = json.loads(capsys.readouterr().out)["grading"]
    want = expected()
    assert g["graded"] == want["graded"] and g["gold_unknown"] == 1 and g["review"] == 5
    for k in ("accuracy", "macro_f1", "ece"):
        assert g[k] == pytest.approx(want[k]), k
    assert g["abstain_below"] == THRESHOLD and g["gold_column"] == "gold"
    assert main(["status", str(graded_job)]) == 0
    text = capsys.readouterr().out
    assert "5 rows flagged for review" in text
    assert f"accuracy {want['accuracy']:.3f}, macro-F1 {want['macro_f1']:.3f}, ECE {want['ece']:.3f}" in text
    assert "1 with a gold label not among the labels" in text


def test_report_draws_the_reliability_diagram_and_the_confusion_matrix(graded_job):
    proc = run_cli("report", str(graded_job))
    assert proc.returncode == 0, proc.stderr
    page = (graded_job / "report" / "index.html").read_text()
    for png in ("reliability.png", "confusion.png"):
        assert png in page and (graded_job / "report" / png).stat().st_size > 1000
    assert "5 rows flagged for review" in page and f"accuracy {expected()['accuracy']:.3f}" in page


def test_an_ungraded_job_has_no_grading(tmp_path, tiny_model, capsys):
    from pipeline.cli import main

    MODEL["source"] = str(tiny_model)
    write_shards(tmp_path / "in", [[{"id": i, "text": f"t {i} pick=neg p=0.8"} for i in range(3)]])

    report = run_job(make_spec(tmp_path, task={"options": {"labels": LABELS}}), progress=False,
                     engine_factory=scripted_factory(), console=Console(file=open("/dev/null", "w")))
    assert report.exit_code == EXIT_OK
    results = read_dir(tmp_path / "out" / "results")
    assert not {"gold", "correct", "review"} & set(results.column_names)
    m = read_dir(tmp_path / "out" / "metrics").to_pylist()[0]
    assert m["graded"] is None and m["review"] is None and m["confusion"] is None
    capsys.readouterr()
    assert main(["status", str(tmp_path / "out"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["grading"] is None


# ---- the real engine


def test_gold_and_review_flow_through_the_real_engine(tmp_path, tiny_model):
    texts = ["I loved it.", "Awful.", "It arrived.", "Great value.", "Broken on arrival."]
    golds = ["positive", "negative", "neutral", "bogus", None]
    write_shards(tmp_path / "in", [[{"id": i, "text": t, "gold": g} for i, (t, g) in enumerate(zip(texts, golds))]],
                 pa.schema([("id", pa.int64()), ("text", pa.string()), ("gold", pa.string())]))
    spec = spec_maker(head="classify", model={"source": str(tiny_model), "max_model_len": 512, "dtype": "float32",
                                              "engine_kwargs": {"enforce_eager": True}})(
        tmp_path, task={"options": {"labels": ["positive", "negative", "neutral"], "gold_column": "gold",
                                    "abstain_below": 0.5}})
    report = run_job(spec, progress=False, console=Console(file=open("/dev/null", "w")))
    assert report.exit_code == EXIT_OK
    results = {r["id"]: r for r in read_dir(tmp_path / "out" / "results").to_pylist()}
    assert len(results) == 5
    for i, r in results.items():
        assert r["gold"] == golds[i]
        assert r["correct"] == (None if golds[i] in ("bogus", None) else r["label"] == golds[i])
        assert r["review"] is (r["confidence"] < 0.5)
    m = read_dir(tmp_path / "out" / "metrics").to_pylist()[0]
    assert m["graded"] == 3 and m["gold_unknown"] == 1
    assert m["review"] == sum(r["review"] for r in results.values())
    assert sum(c["count"] for c in m["confusion"]) == 3
