"""MMLU through lm-eval offline: the project's task YAMLs agree with lm-eval's built-in ``mmlu`` task item by item."""

from __future__ import annotations

import json
import random

import pytest

from evals import mmlu
from evals.generate import EvalError, Generator, HFBackend, run_lm_eval

SUBJECTS = {"anatomy": "other (business, health, misc.)", "philosophy": "humanities", "astronomy": "STEM"}


def write_mmlu(folder, n_test: int = 4) -> None:
    """MMLU-format files for three real subjects (random questions: only the format matters here)."""
    rng = random.Random(0)
    words = "red fox bread Paris Lima Oslo star moon bone mind truth planet".split()
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("dev", 5), ("test", n_test)):
        rows = [{"question": f"Which {rng.choice(words)} is {rng.choice(words)} in {s} question {i}?",
                 "choices": rng.sample(words, 4), "answer": rng.randrange(4), "subject": s}
                for s in SUBJECTS for i in range(n)]
        (folder / f"mmlu_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cats = {s: {"subcategory": s, "category": c} for s, c in SUBJECTS.items()}
    (folder / "subject_categories.json").write_text(json.dumps(cats))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mmlu")
    write_mmlu(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny model whose context holds a whole 5-shot prompt (lm-eval and we truncate longer ones differently)."""
    from conftest import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("mmlu_model") / "m", tiny_tokenizer, max_position_embeddings=2048)


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    return HFBackend(tiny_model_dir)


def test_local_yaml_equals_builtin_task(data, backend, tmp_path):
    """Same rows, same model: our YAMLs and lm-eval's own mmlu_<subject>.yaml build identical requests."""
    gen = Generator(backend, None)
    ours = mmlu.evaluate(gen, data, None, tmp_path)
    folder, subjects, _ = mmlu.write_tasks(data, tmp_path, prefix="mmlu_builtin", include="builtin")
    builtin = mmlu.items_from_samples(run_lm_eval(gen, sorted(subjects), folder, None, 5), subjects)
    assert [i["id"] for i in ours["items"]] == [i["id"] for i in builtin]
    assert [i["pred"] for i in ours["items"]] == [i["pred"] for i in builtin]
    assert [i["loglikelihoods"] for i in ours["items"]] == [i["loglikelihoods"] for i in builtin]


def test_cloze_format_equals_lm_eval_continuation_task(data, backend, tmp_path):
    """The cloze YAMLs build lm-eval's ``mmlu_continuation`` requests; acc_norm agrees with lm-eval's per item."""
    gen = Generator(backend, None)
    ours = mmlu.evaluate(gen, data, None, tmp_path, fmt="cloze")
    folder, subjects, _ = mmlu.write_tasks(data, tmp_path, prefix="mmlu_cont", include="builtin", fmt="cloze")
    samples = run_lm_eval(gen, sorted(subjects), folder, None, 5)
    builtin = mmlu.items_from_samples(samples, subjects)
    assert [i["loglikelihoods"] for i in ours["items"]] == [i["loglikelihoods"] for i in builtin]
    theirs = {f"{subjects[t]}/{s['doc_id']}": s["acc_norm"] for t, rows in samples.items() for s in rows}
    assert [i["correct_norm"] for i in ours["items"]] == [theirs[i["id"]] for i in ours["items"]]
    assert set(ours["metrics"]) >= {"acc", "acc_norm"} and ours["metrics"]["acc_norm"]["n"] == len(ours["items"])
    task = (tmp_path / next(p.name for p in tmp_path.iterdir() if p.name.startswith("mmlu_cloze-"))
            / "mmlu_cloze_anatomy.yaml").read_text()
    assert "_mmlu_cloze_template.yaml" in task and "questions (with answers) about anatomy" in task


def test_predictions_equal_lm_eval_hf_model(data, backend, tiny_model_dir, tmp_path):
    """Our task + our scorer vs lm-eval's built-in task + lm-eval's own HF model: same predictions.

    lm-eval's HFLM adds a BOS only when the tokenizer does (the project's does not), so ours runs without it here.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    ours = mmlu.evaluate(Generator(backend, None, score_bos=False), data, 3, tmp_path)
    folder, subjects, _ = mmlu.write_tasks(data, tmp_path, prefix="mmlu_builtin", include="builtin")
    lm = HFLM(pretrained=str(tiny_model_dir), batch_size=4, device="cpu", dtype="float32")
    out = lm_eval.simple_evaluate(model=lm, tasks=sorted(subjects), num_fewshot=5, limit=3, log_samples=True,
                                  task_manager=TaskManager(include_path=str(folder), include_defaults=False),
                                  bootstrap_iters=0)
    theirs = mmlu.items_from_samples(out["samples"], subjects)
    assert len(theirs) == len(ours["items"]) == 3 * len(SUBJECTS)
    assert [i["pred"] for i in ours["items"]] == [i["pred"] for i in theirs]
    for a, b in zip(ours["items"], theirs):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-4)


def test_metrics_per_category(data, backend, tmp_path):
    """acc over every item, one acc_<category> per category present, each with n and stderr."""
    res = mmlu.evaluate(Generator(backend, None), data, 2, tmp_path)
    m = res["metrics"]
    assert m["acc"]["n"] == 2 * len(SUBJECTS)
    assert {k: v["n"] for k, v in m.items() if k != "acc"} == {"acc_other": 2, "acc_humanities": 2, "acc_stem": 2}
    assert m["acc"]["value"] == pytest.approx(sum(i["correct"] for i in res["items"]) / len(res["items"]))
    assert all(v["stderr"] >= 0 for v in m.values())


def test_prompt_format_is_lm_eval_mmlu(data, tmp_path):
    """The rendered 5-shot prompt: description, five dev shots, lettered choices, choices scored as ' A'..' D'."""
    from lm_eval.tasks import TaskManager, get_task_dict

    folder, subjects, _ = mmlu.write_tasks(data, tmp_path)
    task = get_task_dict(["mmlu_local_anatomy"], TaskManager(include_path=str(folder), include_defaults=False))
    task = task["mmlu_local_anatomy"]
    doc = task.test_docs()[0]
    ctx = task.fewshot_context(doc, num_fewshot=5)
    assert ctx.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert ctx.count("\nAnswer:") == 6 and ctx.endswith("D. " + doc["choices"][3] + "\nAnswer:")
    assert task.doc_to_choice(doc) == ["A", "B", "C", "D"] and task.config.target_delimiter == " "


def test_missing_files_error(tmp_path, backend):
    with pytest.raises(EvalError, match="mmlu_test.jsonl"):
        mmlu.evaluate(Generator(backend, None), tmp_path, 2, tmp_path)
