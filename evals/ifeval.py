"""Instruction following: lm-eval's ``ifeval`` task, offline, with the project's own NLTK ``punkt_tab``.

The prompts come from a data dir holding ``input_data.jsonl`` (``{"key", "prompt", "instruction_id_list",
"kwargs"}``: ``../shared/data/ifeval`` or the demo world's ``ifeval/``). A task YAML written per data dir includes
lm-eval's ``ifeval.yaml`` (its checkers and metrics) and ``evals/tasks/_ifeval_local_template.yaml`` (local
files). Prompts go through the model's chat template. Metrics: prompt- and instruction-level accuracy, strict
and loose.

NLTK's ``punkt_tab`` for its sentence checks comes from ``minitron.punkt.ensure_punkt`` (trained offline).
"""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path
from typing import Any

import yaml

from evals.generate import EvalError, Generator, run_lm_eval
from evals.jsonl import read_rows
from evals.results import mean_metric
from minitron.punkt import ensure_punkt, seed_langdetect

TEMPLATE = Path(__file__).with_name("tasks") / "_ifeval_local_template.yaml"
FIELDS = ("key", "prompt", "instruction_id_list", "kwargs")
METRICS = ["prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc"]


def _data_file(data_dir: str | Path) -> Path:
    p = Path(data_dir)
    f = p if p.is_file() else p / "input_data.jsonl"
    if not f.exists():
        raise EvalError(f"{f} not found: an IFEval data dir holds input_data.jsonl (key, prompt, instruction_id_list, kwargs)")
    return f


def read_data(data_dir: str | Path) -> list[dict]:
    """The prompts of an IFEval data dir (or file); malformed rows are refused with the file and line."""
    return read_rows(_data_file(data_dir), {"IFEval": FIELDS})


def write_task(data_dir: str | Path, work_dir: str | Path, max_gen_toks: int) -> tuple[Path, str]:
    """Write the task YAML for ``data_dir``; returns (folder, task name)."""
    import lm_eval.tasks

    data = _data_file(data_dir).resolve()
    digest = hashlib.sha256(f"{data}|{data.stat().st_mtime}|{max_gen_toks}".encode()).hexdigest()[:12]
    folder, name = Path(work_dir) / f"ifeval-{digest}", f"ifeval_local_{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    builtin = Path(lm_eval.tasks.__file__).parent / "ifeval" / "ifeval.yaml"
    spec = {"include": [str(builtin), str(TEMPLATE)], "task": name,
            "dataset_kwargs": {"data_files": {"train": str(data)}},
            "generation_kwargs": {"until": [], "do_sample": False, "temperature": 0.0, "max_gen_toks": max_gen_toks}}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    return folder, name


def evaluate(gen: Generator, data_dir: str | Path, limit: int | None, work_dir: str | Path,
             max_new_tokens: int = 1280) -> dict[str, Any]:
    """IFEval on ``gen`` (chat template, greedy, ``max_new_tokens`` per reply): metrics and per-prompt items."""
    read_data(data_dir)  # lm-eval reads the file itself, with no line numbers in its errors
    ensure_punkt(_data_file(data_dir))
    seed_langdetect()
    folder, name = write_task(data_dir, work_dir, max_new_tokens)
    samples = run_lm_eval(gen, [name], folder, limit, chat=True)[name]
    if not samples:
        raise EvalError(f"IFEval: no prompts evaluated from {data_dir}")
    metrics = {}
    for m in METRICS:
        vals = [s[m] for s in samples]
        flat = list(itertools.chain.from_iterable(v if isinstance(v, list) else [v] for v in vals))
        metrics[m] = mean_metric([float(v) for v in flat])
    items = [{"id": s["doc"]["key"], "prompt": s["doc"]["prompt"], "response": s["filtered_resps"][0],
              **{m: s[m] for m in METRICS}} for s in sorted(samples, key=lambda s: s["doc_id"])]
    truncated = 0 if gen.tokenizer is None else sum(1 for s in samples if len(gen.tokenizer(s["filtered_resps"][0])["input_ids"]) >= max_new_tokens - 1)
    return {"metrics": metrics, "items": items,
            "note": f"{truncated}/{len(samples)} replies hit max_new_tokens={max_new_tokens}" if truncated else ""}
