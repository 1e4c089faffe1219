"""MMLU through lm-eval: 5-shot accuracy, overall and per category (STEM, humanities, social sciences, other).

Two formats: ``letter`` (lm-eval's ``mmlu``: lettered choices, `` A``..`` D`` scored) and ``cloze`` (lm-eval's
``mmlu_continuation``: each answer's text scored after ``Answer:``; ``acc_norm`` divides its log-likelihood by
its length in characters, as lm-eval does). Small models sit at chance in the letter format and are compared
in the cloze one (SmolLM2's card reports MMLU cloze).

Offline (the default): a data dir with ``mmlu_test.jsonl``, ``mmlu_dev.jsonl`` (rows ``{"question", "choices",
"answer", "subject"}``) and ``subject_categories.json`` (``../shared/data/mmlu`` or the demo world's). Rows are
split per subject into ``<work>/{test,dev}/<subject>.jsonl`` and one lm-eval task YAML per subject is written
beside them, each including ``evals/tasks/_mmlu_local_template.yaml`` (lm-eval's ``mmlu`` prompt format:
question, lettered choices, ``Answer:``, choices scored as `` A``..`` D``; first five dev rows as shots).
``data_dir="hub"`` runs lm-eval's built-in ``mmlu`` group on ``cais/mmlu`` instead (needs the hub).

``--limit N`` caps the items per subject, as lm-eval's ``--limit`` does for a group.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from evals.generate import EvalError, Generator, run_lm_eval
from evals.jsonl import read_json, read_rows
from evals.results import mean_metric
from minitron.data import DataError

TASKS_DIR = Path(__file__).with_name("tasks")
TEMPLATE = TASKS_DIR / "_mmlu_local_template.yaml"
CLOZE_TEMPLATE = TASKS_DIR / "_mmlu_cloze_template.yaml"
FORMATS = {"letter": ("mmlu_local", TEMPLATE, "The following are multiple choice questions (with answers) about"),
           "cloze": ("mmlu_cloze", CLOZE_TEMPLATE, "The following are questions (with answers) about")}
FIELDS = ("question", "choices", "answer", "subject")
CATEGORIES = {"STEM": "stem", "humanities": "humanities", "social sciences": "social_sciences"}


def _category(raw: str) -> str:
    """``subject_categories.json`` names -> metric suffixes (``other (business, health, misc.)`` -> ``other``)."""
    return CATEGORIES.get(raw, "other")


def lm_eval_mmlu_dir() -> Path:
    """lm-eval's built-in ``mmlu/default`` task folder."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent / "mmlu" / "default"


def read_data(data_dir: str | Path) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    """``({"test": rows, "dev": rows}, subject categories)`` of an MMLU data dir; malformed files are refused
    (file and line)."""
    data_dir = Path(data_dir)
    splits = {}
    for split in ("test", "dev"):
        f = data_dir / f"mmlu_{split}.jsonl"
        if not f.exists():
            raise EvalError(f"{f} not found: MMLU data dirs hold mmlu_test.jsonl and mmlu_dev.jsonl")
        splits[split] = read_rows(f, {"MMLU": FIELDS})
    cats_file = data_dir / "subject_categories.json"
    cats = read_json(cats_file) if cats_file.exists() else {}
    if not isinstance(cats, dict):
        raise DataError(f"{cats_file}: expected an object {{subject: {{\"category\": ...}}}}")
    return splits, cats


def write_tasks(data_dir: str | Path, work_dir: str | Path, prefix: str = "mmlu_local",
                include: str | None = None, fmt: str = "letter") -> tuple[Path, dict[str, str], dict[str, str]]:
    """Split the data per subject and write one task YAML per subject under ``work_dir/<hash of data>``.

    ``include`` defaults to the project template; ``include="builtin"`` includes lm-eval's own
    ``mmlu_<subject>.yaml`` instead (its prompt, with the dataset pointed at the same local files): that is
    how tests compare the two. Returns (task folder, {task: subject}, {subject: category}).
    """
    data_dir = Path(data_dir)
    splits_rows, cats = read_data(data_dir)
    test, dev = data_dir / "mmlu_test.jsonl", data_dir / "mmlu_dev.jsonl"
    digest = hashlib.sha256(f"{data_dir.resolve()}|{test.stat().st_mtime}|{dev.stat().st_mtime}|{prefix}|{include}"
                            .encode()).hexdigest()[:12]
    out = Path(work_dir) / f"{prefix}-{digest}"
    rows: dict[str, dict[str, list[str]]] = {}
    for split, split_rows in splits_rows.items():
        for row in split_rows:
            rows.setdefault(row["subject"], {"test": [], "dev": []})[split].append(json.dumps(row))
    tasks, categories = {}, {}
    for subject, splits in sorted(rows.items()):
        if not splits["test"]:
            continue
        files = {}
        for split, lines in splits.items():
            files[split] = out / split / f"{subject}.jsonl"
            files[split].parent.mkdir(parents=True, exist_ok=True)
            files[split].write_text("\n".join(lines) + ("\n" if lines else ""))
        name = f"{prefix}_{subject}"
        _, template, intro = FORMATS[fmt]
        builtin = lm_eval_mmlu_dir() if fmt == "letter" else lm_eval_mmlu_dir().parent / "continuation"
        base = str(builtin / f"mmlu_{subject}.yaml") if include == "builtin" else str(include or template)
        spec = {"include": base, "task": name, "dataset_path": "json", "dataset_name": None,
                "dataset_kwargs": {"data_files": {k: str(v) for k, v in files.items()}},
                "description": f"{intro} {subject.replace('_', ' ')}.\n\n"}
        (out / f"{name}.yaml").write_text(yaml.safe_dump({k: v for k, v in spec.items() if v is not None or k == "dataset_name"}))
        tasks[name] = subject
        categories[subject] = _category(cats.get(subject, {}).get("category", "other"))
    return out, tasks, categories


def _builtin_categories() -> dict[str, str]:
    """Subject -> category from lm-eval's built-in YAML tags (``mmlu_stem_tasks`` ...)."""
    cats = {}
    for f in lm_eval_mmlu_dir().glob("mmlu_*.yaml"):
        spec = yaml.safe_load(f.read_text())
        if isinstance(spec, dict) and "tag" in spec:
            cats[spec["dataset_name"]] = spec["tag"].removeprefix("mmlu_").removesuffix("_tasks")
    return cats


def items_from_samples(samples: dict[str, list[dict]], subjects: dict[str, str]) -> list[dict[str, Any]]:
    """One record per question: subject, doc id, prediction (argmax log-likelihood), target, correct."""
    items = []
    for task, rows in samples.items():
        for s in sorted(rows, key=lambda r: r["doc_id"]):
            lls = [float(r[0]) for r in s["filtered_resps"]]
            pred = max(range(len(lls)), key=lls.__getitem__)
            target = int(s["target"])
            item = {"id": f"{subjects.get(task, task)}/{s['doc_id']}", "subject": subjects.get(task, task),
                    "pred": pred, "target": target, "correct": float(pred == target), "loglikelihoods": lls}
            choices = s.get("doc", {}).get("choices")
            if isinstance(choices, list) and len(choices) == len(lls):  # lm-eval's acc_norm: per character
                norm = [ll / max(len(str(c)), 1) for c, ll in zip(choices, lls)]
                item["correct_norm"] = float(max(range(len(norm)), key=norm.__getitem__) == target)
            items.append(item)
    return items


def evaluate(gen: Generator, data_dir: str | Path, limit: int | None, work_dir: str | Path,
             num_fewshot: int = 5, fmt: str = "letter") -> dict[str, Any]:
    """5-shot MMLU on ``gen`` in ``fmt`` (letter | cloze): ``{"metrics": {acc, [acc_norm], acc_stem, ...}, "items"}``."""
    if fmt not in FORMATS:
        raise EvalError(f"MMLU format {fmt!r}: use one of {', '.join(FORMATS)}")
    if str(data_dir) == "hub":
        cats = _builtin_categories()
        group = "mmlu" if fmt == "letter" else "mmlu_continuation"
        samples = run_lm_eval(gen, [group], None, limit, num_fewshot)
        subjects = {t: t.removeprefix("mmlu_").removesuffix("_continuation") for t in samples}
    else:
        folder, subjects, cats = write_tasks(data_dir, work_dir, prefix=FORMATS[fmt][0], fmt=fmt)
        samples = run_lm_eval(gen, sorted(subjects), folder, limit, num_fewshot)
    items = items_from_samples(samples, subjects)
    if not items:
        raise EvalError(f"MMLU: no items evaluated from {data_dir}")
    metrics = {"acc": mean_metric([i["correct"] for i in items])}
    if fmt == "cloze":
        metrics["acc_norm"] = mean_metric([i["correct_norm"] for i in items])
    for cat in ("stem", "humanities", "social_sciences", "other"):
        vals = [i["correct"] for i in items if cats.get(i["subject"], "other") == cat]
        if vals:
            metrics[f"acc_{cat}"] = mean_metric(vals)
    return {"metrics": metrics, "items": items}
