"""Instruction following: lm-eval's ``ifeval`` task, offline, with the project's own NLTK ``punkt_tab``.

The prompts come from a data dir holding ``input_data.jsonl`` (``{"key", "prompt", "instruction_id_list",
"kwargs"}``: ``../shared/data/ifeval`` or the demo world's ``ifeval/``). A task YAML written per data dir includes
lm-eval's ``ifeval.yaml`` (its checkers and metrics) and ``evals/tasks/_ifeval_local_template.yaml`` (local
files). Prompts go through the model's chat template. Metrics: prompt- and instruction-level accuracy, strict
and loose.

lm-eval's checkers split sentences with NLTK's ``punkt_tab``, which no package registry ships and which cannot be
downloaded offline. ``ensure_punkt`` trains one with NLTK's ``PunktTrainer`` on English text (the Gutenberg
corpus of ``../shared/data`` when present, else the IFEval prompts themselves), writes it under
``$MINITRON_CACHE/nltk_data`` (default ``~/.cache/minitron/nltk_data``) and points ``NLTK_DATA`` there. A
``punkt_tab`` that NLTK already finds (e.g. from ``nltk.download``) is used as is.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from pathlib import Path
from typing import Any

import yaml

from evals.generate import EvalError, Generator, run_lm_eval
from evals.report import mean_metric
from minitron.data import iter_texts, read_jsonl
from minitron.io import atomic_dir

TEMPLATE = Path(__file__).with_name("tasks") / "_ifeval_local_template.yaml"
GUTENBERG = Path(__file__).resolve().parents[2] / "shared" / "data" / "lm" / "gutenberg"
METRICS = ["prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc"]


def nltk_data_dir() -> Path:
    """The project's NLTK data folder (``$MINITRON_CACHE/nltk_data``)."""
    root = os.environ.get("MINITRON_CACHE") or Path.home() / ".cache" / "minitron"
    return Path(root) / "nltk_data"


def _punkt_text(fallback: Path | None, max_chars: int) -> str:
    """English training text for Punkt: Gutenberg validation books, else the IFEval prompts."""
    if GUTENBERG.exists():
        chunks, total = [], 0
        for text in iter_texts(GUTENBERG, split="validation"):
            chunks.append(text[: max_chars - total])
            total += len(chunks[-1])
            if total >= max_chars:
                break
        return "\n\n".join(chunks)
    if fallback is not None and fallback.exists():
        return "\n\n".join(r["prompt"] for r in read_jsonl(fallback))
    raise EvalError("no English text to train NLTK's punkt_tab: install it with `python -m nltk.downloader punkt_tab`")


def ensure_punkt(fallback_text: Path | None = None, max_chars: int = 2_000_000) -> Path:
    """Make ``nltk.data.find("tokenizers/punkt_tab/english/")`` succeed offline; returns the data dir used."""
    import nltk
    from nltk.tabdata import TabEncoder
    from nltk.tokenize.punkt import PunktTrainer

    root = nltk_data_dir()
    os.environ["NLTK_DATA"] = os.pathsep.join(dict.fromkeys([str(root), *filter(None, [os.environ.get("NLTK_DATA")])]))
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return root
    except LookupError:
        pass
    trainer = PunktTrainer()
    trainer.INCLUDE_ALL_COLLOCS = True
    trainer.train(_punkt_text(fallback_text, max_chars), finalize=True)
    params, enc = trainer.get_params(), TabEncoder()
    with atomic_dir(root / "tokenizers" / "punkt_tab" / "english") as tmp:
        (tmp / "collocations.tab").write_text(enc.tups2tab(params.collocations), newline="")
        (tmp / "sent_starters.txt").write_text(enc.set2txt(params.sent_starters), newline="")
        (tmp / "abbrev_types.txt").write_text(enc.set2txt(params.abbrev_types), newline="")
        (tmp / "ortho_context.tab").write_text(enc.ivdict2tab(params.ortho_context), newline="")
    nltk.data.find("tokenizers/punkt_tab/english/")
    return root


def _data_file(data_dir: str | Path) -> Path:
    p = Path(data_dir)
    f = p if p.is_file() else p / "input_data.jsonl"
    if not f.exists():
        raise EvalError(f"{f} not found: an IFEval data dir holds input_data.jsonl (key, prompt, instruction_id_list, kwargs)")
    return f


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
    ensure_punkt(_data_file(data_dir))
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
