"""``minitron eval`` end to end on tiny models: every task, results.json, report.md, plots, resume, recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_eval_ifeval import ROWS as IFEVAL_ROWS
from test_eval_mmlu import write_mmlu
from test_eval_rag import write_squad
from test_eval_roleplay import ROWS as ROLEPLAY_ROWS

from evals.generate import EvalError
from evals.harness import EvalConfig, default_names, run
from minitron.config import ConfigError, MinitronError, load_config

REPO = Path(__file__).resolve().parents[1]
WEATHER = {"name": "get_weather", "description": "Weather in a city.",
           "parameters": {"type": "dict", "properties": {"city": {"type": "string", "description": "city name"}},
                          "required": ["city"]}}


def write_bfcl(folder: Path) -> None:
    """Two BFCL v4 categories in the real format: simple_python (with answers) and irrelevance."""
    (folder / "possible_answer").mkdir(parents=True)
    simple = [{"id": f"simple_python_{i}", "question": [[{"role": "user", "content": f"Weather in {c}?"}]],
               "function": [WEATHER]} for i, c in enumerate(["Paris", "Lima"])]
    answers = [{"id": q["id"], "ground_truth": [{"get_weather": {"city": [c]}}]} for q, c in zip(simple, ["Paris", "Lima"])]
    irrelevant = [{"id": "irrelevance_0", "question": [[{"role": "user", "content": "Tell me a joke."}]],
                   "function": [WEATHER]}]
    for path, rows in ((folder / "BFCL_v4_simple_python.json", simple), (folder / "BFCL_v4_irrelevance.json", irrelevant),
                       (folder / "possible_answer" / "BFCL_v4_simple_python.json", answers)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_eval_world(root: Path, n_ifeval: int | None = None) -> Path:
    """Every eval task's data in the demo world's formats (two MMLU questions per subject, ``n_ifeval`` prompts)."""
    write_mmlu(root / "mmlu", n_test=2)
    (root / "ifeval").mkdir()
    (root / "ifeval" / "input_data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in IFEVAL_ROWS[:n_ifeval]))
    (root / "rag").mkdir()
    write_squad(root / "rag" / "rag_eval.jsonl")
    write_bfcl(root / "bfcl")
    (root / "roleplay.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROLEPLAY_ROWS))
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A miniature data world with every task's format."""
    return write_eval_world(tmp_path_factory.mktemp("world"), n_ifeval=2)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer):
    """Two tiny "stages" of different sizes and a tiny reward model (the offline roleplay judge)."""
    import torch
    from conftest import make_tiny_model_dir, tiny_config
    from transformers import AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("stages")
    make_tiny_model_dir(root / "teacher", tiny_tokenizer, seed=0)
    make_tiny_model_dir(root / "width" / "distilled", tiny_tokenizer, seed=1, num_hidden_layers=2)
    torch.manual_seed(3)
    rm = AutoModelForSequenceClassification.from_config(tiny_config(vocab_size=len(tiny_tokenizer), num_labels=1))
    rm.save_pretrained(root / "rm")
    tiny_tokenizer.save_pretrained(root / "rm")
    return root


def config(world: Path, models: Path, out: Path, **kw) -> EvalConfig:
    return EvalConfig(model=[str(models / "teacher"), str(models / "width" / "distilled")], suite="mmlu,ifeval,rag,bfcl,roleplay",
                      out=str(out), limit=2, mmlu_data=str(world / "mmlu"), ifeval_data=str(world / "ifeval"),
                      rag_data=str(world / "rag"), bfcl_data=str(world / "bfcl"), roleplay_data=str(world / "roleplay.jsonl"),
                      judge_model=str(models / "rm"), ifeval_max_new_tokens=8, rag_max_new_tokens=8,
                      bfcl_max_new_tokens=16, roleplay_max_new_tokens=8, **kw)


@pytest.fixture(scope="module")
def first_run(world, models, tmp_path_factory, monkeypatch_module):
    out = tmp_path_factory.mktemp("eval") / "out"
    return run(config(world, models, out))


@pytest.fixture(scope="module")
def monkeypatch_module(tmp_path_factory, world):
    mp = pytest.MonkeyPatch()
    mp.setenv("MINITRON_CACHE", str(tmp_path_factory.mktemp("minitron_cache")))
    from evals.ifeval import ensure_punkt

    ensure_punkt(world / "ifeval" / "input_data.jsonl", max_chars=300_000)  # a small punkt_tab up front (the eval would train on 2M characters)
    yield mp
    mp.undo()


def test_results_json_has_n_and_stderr_everywhere(first_run, models):
    from transformers import AutoModelForCausalLM

    res = json.loads((first_run / "results.json").read_text())
    assert [m["name"] for m in res["models"]] == ["teacher", "width/distilled"]
    # parameter counts (read from the weights' headers) are the loaded models' own
    for m, d in zip(res["models"], ["teacher", "width/distilled"]):
        assert m["params"] == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(models / d).parameters())
    assert res["models"][0]["params"] > res["models"][1]["params"]
    expected = {"mmlu": 6, "ifeval": 2, "rag": 2, "bfcl": 3, "roleplay": 2}  # limit 2 per subject/category/task
    for m in res["models"]:
        assert set(m["tasks"]) == set(expected)
        for task, r in m["tasks"].items():
            assert r["metrics"], f"{task} has no metrics"
            for name, v in r["metrics"].items():
                assert {"value", "stderr", "n"} <= set(v) and v["n"] > 0, (task, name)
            assert r["metrics"][next(iter(r["metrics"]))]["n"] == expected[task]
    # the first model is the roleplay baseline: against itself every comparison is a tie
    assert res["models"][0]["tasks"]["roleplay"]["metrics"]["win_rate"]["value"] == 0.5


def test_report_and_plots_written(first_run):
    report = (first_run / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| teacher") or line.startswith("| width/")]
    assert len(table) >= 2 and "mmlu acc" in report and "0.19M" in report
    pngs = sorted((first_run / "plots").glob("*.png"))
    assert (first_run / "plots" / "progression.png") in pngs and (first_run / "plots" / "mmlu_acc.png") in pngs
    assert all(p.stat().st_size > 1000 for p in pngs)
    assert (first_run / "items" / "teacher" / "bfcl.jsonl").read_text().count("\n") == 3


def test_rerun_resumes_from_the_cache(first_run, world, models):
    """A second run answers every request from the cache and reproduces every number."""
    import sqlite3

    counts = {p.name: sqlite3.connect(p).execute("SELECT COUNT(*) FROM items").fetchone()[0]
              for p in (first_run / "cache").glob("*.sqlite")}
    again = run(config(world, models, first_run))
    after = {p.name: sqlite3.connect(p).execute("SELECT COUNT(*) FROM items").fetchone()[0]
             for p in (again / "cache").glob("*.sqlite")}
    assert after == counts  # nothing new was computed
    a = json.loads((first_run / "results.json").read_text())["models"]
    b = json.loads((again / "results.json").read_text())["models"]
    assert [{t: r["metrics"] for t, r in m["tasks"].items()} for m in a] == \
           [{t: r["metrics"] for t, r in m["tasks"].items()} for m in b]


def test_recipes_load_into_the_config(models):
    for name in ("demo", "full"):
        cfg = load_config(EvalConfig, REPO / "configs" / "eval" / f"{name}.yaml", section="eval",
                          overrides={"model": [str(models / "teacher")]})
        assert cfg.suite == name and cfg.tasks() == ["mmlu", "ifeval", "rag", "bfcl", "roleplay"]
        header = (REPO / "configs" / "eval" / f"{name}.yaml").read_text()
        assert header.startswith("#") and "Launch" in header and "Prerequisites" in header


def test_bad_configs(models, tmp_path):
    with pytest.raises(ConfigError, match="either --model"):
        EvalConfig()
    with pytest.raises(ConfigError, match="unknown tasks"):
        EvalConfig(model=[str(models / "teacher")], suite="mmlu,hellaswag")
    with pytest.raises(MinitronError, match="not a model directory"):
        run(EvalConfig(model=[str(tmp_path)], out=str(tmp_path / "out")))
    with pytest.raises(EvalError, match="data not found"):
        run(EvalConfig(model=[str(models / "teacher")], suite="rag", rag_data=str(tmp_path / "none"), out=str(tmp_path)))


def test_default_names(tmp_path):
    # paths under tmp_path: a checkout's own runs/demo (where aligned/final links to a stage) must not change names
    run_dir = tmp_path / "runs" / "demo"
    assert default_names([str(run_dir / "teacher"), str(run_dir / "width/distilled"), str(run_dir / "aligned/final")]) == [
        "teacher", "width/distilled", "aligned/final"]
