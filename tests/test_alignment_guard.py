"""The alignment guard: the aligned model against its student at two standard errors of the difference."""

from __future__ import annotations

from minitron.pipeline.report import alignment_benchmarks

ROWS = {
    "teacher": {"IFEval strict": 0.30, "IFEval strict_se": 0.04, "RAG F1": 0.10, "RAG F1_se": 0.02},
    "width distilled": {"IFEval strict": 0.10, "IFEval strict_se": 0.03, "RAG F1": 0.10, "RAG F1_se": 0.02,
                        "MMLU letter": 0.30, "MMLU letter_se": 0.02},
    "aligned": {"IFEval strict": 0.20, "IFEval strict_se": 0.04, "RAG F1": 0.03, "RAG F1_se": 0.01,
                "MMLU letter": 0.27, "MMLU letter_se": 0.02, "roleplay win": 0.80, "roleplay win_se": 0.05},
}


def _by_metric(bench):
    return {r["metric"]: r for r in bench["rows"]}


def test_verdicts_at_two_standard_errors_of_the_difference():
    bench = alignment_benchmarks(ROWS, "width distilled", "aligned", must_beat=["IFEval strict"], must_hold="all")
    rows = _by_metric(bench)
    # IFEval: +0.10 with s.e. sqrt(0.03^2 + 0.04^2) = 0.05: exactly two s.e. is not "better"
    assert abs(rows["IFEval strict"]["diff_se"] - 0.05) < 1e-9 and rows["IFEval strict"]["verdict"] == "same"
    # RAG: -0.07 with s.e. sqrt(0.02^2 + 0.01^2) = 0.0224: worse
    assert rows["RAG F1"]["verdict"] == "worse"
    # MMLU: -0.03 with s.e. 0.028: the same
    assert rows["MMLU letter"]["verdict"] == "same"
    # roleplay was judged against the student itself: the student's own value is a tie (0.5)
    assert rows["roleplay win"]["baseline"] == 0.5 and rows["roleplay win"]["verdict"] == "better"
    assert sorted(bench["failed"]) == ["IFEval strict", "RAG F1"]
    assert "FAILED" in bench["markdown"] and "| teacher |" in bench["markdown"]


def test_guard_only_covers_the_metrics_it_names():
    bench = alignment_benchmarks(ROWS, "width distilled", "aligned", must_beat=[], must_hold=["MMLU letter"])
    assert bench["failed"] == []
    assert _by_metric(bench)["RAG F1"]["guard"] == "" and _by_metric(bench)["RAG F1"]["verdict"] == "worse"


def test_pipeline_writes_the_benchmarks_into_the_aligned_report_and_reports_a_failed_guard(tmp_path):
    import json
    import os

    from minitron.pipeline.recipe import Pipeline, PipelineConfig

    root = tmp_path / "run"
    student, rl = root / "distilled" / "width", root / "aligned" / "rl"
    for d in (root / "teacher", student, rl):
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
    os.symlink("rl", root / "aligned" / "final")

    def scored(path, value):
        return {"path": str(path), "tasks": {"ifeval": {"metrics": {
            "prompt_level_strict_acc": {"value": value, "stderr": 0.03, "n": 120}}}}}

    (root / "eval" / "ifeval").mkdir(parents=True)
    (root / "eval" / "ifeval" / "results.json").write_text(json.dumps({"models": [scored(student, 0.10),
                                                                                  scored(rl, 0.14)]}))
    cfg = PipelineConfig(out=str(root), align_guard={"must_beat": ["IFEval strict"]})
    pipe = Pipeline(cfg)
    pipe.students = {"width": {"distilled": student}}
    failed = pipe.check_alignment()  # +0.04 with s.e. 0.042: not better by two s.e.
    assert failed is not None and "IFEval strict" in failed
    report = (root / "aligned" / "report.md").read_text()
    assert "## Benchmarks" in report and "| IFEval strict | +0.040 ± 0.042 | same | beat FAILED |" in report


def test_results_of_replaced_weights_are_left_out(tmp_path):
    """An eval result recorded for other weights than those now in the folder (a stage redone since) is dropped."""
    import json

    from minitron import fingerprint
    from minitron.pipeline.report import eval_metrics

    model = tmp_path / "aligned" / "dpo"
    model.mkdir(parents=True)
    (model / "fingerprint.json").write_text(json.dumps({"fingerprint": "new"}))
    metrics = {"rag": {"metrics": {"f1": {"value": 0.3, "stderr": 0.01, "n": 120}}}}
    for name, fp in (("old", "old"), ("new", fingerprint.of_path(model)), ("unrecorded", None)):
        entry = {"path": str(model), "tasks": metrics, **({"fingerprint": fp} if fp else {})}
        (tmp_path / "eval" / name).mkdir(parents=True)
        (tmp_path / "eval" / name / "results.json").write_text(json.dumps({"models": [entry]}))
    kept = [name for name in ("old", "new", "unrecorded") if eval_metrics(tmp_path / "eval" / name)]
    assert kept == ["new", "unrecorded"]
