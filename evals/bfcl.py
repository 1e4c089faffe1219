"""Function calling, BFCL-style: data loading, the model-facing task and the standalone checker (BFCL's own).

Data: BFCL v4 files (JSONL despite the ``.json`` suffix). ``BFCL_v4_<category>.json`` holds questions
``{"id", "question", "function"}`` (``question``: a list of turns, each a list of chat messages; ``function``:
the function specs) and ``possible_answer/BFCL_v4_<category>.json`` holds ``{"id", "ground_truth"}`` (one
``{func: {param: acceptable values}}`` per expected call). Irrelevance categories have no answer file (no call
is expected). Any category in this format works; its name comes from the file name.

Standalone checker (``minitron eval-fc``)::

    minitron eval-fc --questions DIR_OR_FILE [--answers DIR_OR_FILE] --predictions preds.jsonl \\
        [--verdicts verdicts.jsonl] [--lenient]

Each prediction line is ``{"id": ..., "calls": [{"func": {"arg": value}}]}`` (or ``[{"name", "arguments"}]``,
OpenAI ``tool_calls``: scored in BFCL's FC mode) or ``{"id": ..., "text": "raw model output"}`` (``<tool_call>``
blocks: FC mode; anything else: BFCL's prompt mode); it prints per-category accuracy as JSON and writes one
``{"id", "valid", "error"}`` verdict per prediction, in input order (repeated ids are scored one by one).

Model-facing task (``evaluate``): ``generate_fn(messages, tools) -> str`` is called once per question with the
question's messages and its functions as OpenAI tools (rendered by the chat template); the raw text is decoded
(``evals.bfcl_decode``) and checked by BFCL's own checker (``evals.bfcl_checker``, from the ``bfcl-eval``
package). ``lenient`` (``--lenient`` / ``--bfcl-lenient``) also reads python-fenced answers, which BFCL's prompt
mode fails; the summary then reports the strict figures beside the lenient ones.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

from tqdm.auto import tqdm

from evals.bfcl_checker import Verdict, check
from evals.bfcl_decode import decode_reply
from evals.bfcl_upstream import upstream
from evals.jsonl import read_rows
from minitron.config import ConfigError, MinitronError, arg
from minitron.io import write_text
from minitron.tool_schema import to_openai_tools

VERSION = 2  # bump when scoring changes (2: BFCL's own checker and prompt-mode decoder)
FILE_RE = re.compile(r"^BFCL_v\d+_(?P<category>.+?)\.jsonl?$")
ALIASES = {"simple": "simple_python", "python": "simple_python", "java": "simple_java",
           "javascript": "simple_javascript", "js": "simple_javascript"}


class BFCLError(MinitronError):
    """Unreadable or inconsistent BFCL files or predictions."""


QUESTION = {"a BFCL question": ("id", "question", "function")}
ANSWER = {"a BFCL answer": ("id", "ground_truth")}
PREDICTION = {"a prediction": ("id", "calls"), "a raw-text prediction": ("id", "text")}


# ---------------------------------------------------------------- data


def category_of_file(path: str | Path) -> str:
    """``BFCL_v4_simple_python.json`` -> ``simple_python`` (any other name: its stem)."""
    m = FILE_RE.match(Path(path).name)
    return m.group("category") if m else Path(path).stem


def category_of_id(item_id: str) -> str:
    """``simple_python_12`` -> ``simple_python``; ``live_simple_3-2-1`` -> ``live_simple``."""
    head, _, tail = str(item_id).rpartition("_")
    return head if head and re.fullmatch(r"\d+(-\d+)*", tail) else str(item_id)


def category_files(data_dir: str | Path) -> dict[str, tuple[Path, Path | None]]:
    """{category: (question file, answer file or None)} for every BFCL file in ``data_dir``."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise BFCLError(f"{data_dir} is not a directory of BFCL files (BFCL_v4_<category>.json)")
    out = {}
    for q in sorted(data_dir.iterdir()):
        if q.is_file() and FILE_RE.match(q.name):
            a = data_dir / "possible_answer" / q.name
            out[category_of_file(q)] = (q, a if a.exists() else None)
    if not out:
        raise BFCLError(f"no BFCL_v<N>_<category>.json files in {data_dir}")
    return out


def load_questions(path: str | Path) -> dict[str, tuple[str, dict]]:
    """{id: (category, question)} from a question file or a directory of them."""
    path = Path(path)
    if not path.exists():
        raise BFCLError(f"questions not found: {path}")
    files = [f for f, _ in category_files(path).values()] if path.is_dir() else [path]
    out = {}
    for f in files:
        category = category_of_file(f) if FILE_RE.match(f.name) else None
        for q in read_rows(f, QUESTION):
            out[q["id"]] = (category or category_of_id(q["id"]), q)
    return out


def load_answers(path: str | Path | None, questions: str | Path) -> dict[str, list[dict]]:
    """{id: ground truth} from an answer file or directory; by default ``possible_answer/`` beside the questions."""
    if path is None:
        q = Path(questions)
        path = q / "possible_answer" if q.is_dir() else q.parent / "possible_answer" / q.name
        if not path.exists():
            return {}  # irrelevance: no answer file
    path = Path(path)
    if not path.exists():
        raise BFCLError(f"answers not found: {path} (pass --answers FILE_OR_DIR, or leave it out for irrelevance)")
    files = sorted(f for f in path.iterdir() if FILE_RE.match(f.name)) if path.is_dir() else [path]
    out = {}
    for f in files:
        for a in read_rows(f, ANSWER):
            if not isinstance(a["ground_truth"], list):
                raise BFCLError(f"{f}: answer {a['id']!r}: 'ground_truth' is not a list of calls")
            out[a["id"]] = a["ground_truth"]
    return out


# ---------------------------------------------------------------- scoring


@dataclasses.dataclass
class Scored(Verdict):
    """A verdict with how the reply was read: ``mode`` (``fc`` / ``prompt``), and under ``lenient`` whether it
    was read from a python fence (``fenced``) and the strict verdict (``strict_valid``)."""

    mode: str = ""
    fenced: bool = False
    strict_valid: bool = False


def score(question: dict, ground_truth: list[dict] | None, category: str, *, text: str | None = None,
          calls: Any = None, lenient: bool = False) -> Scored:
    """Check one reply, given as raw model ``text`` or as structured tool ``calls`` (see ``evals.bfcl_decode``)."""
    functions = question.get("function") or []
    decoded = decode_reply(text, calls, functions=functions, category=category, lenient=lenient)
    v = check(question, ground_truth, decoded, category)
    strict = v.valid
    if decoded.fenced:  # lenient reading: the strict verdict is that of the undecodable text
        strict = check(question, ground_truth, decode_reply(text, calls, functions=functions, category=category),
                       category).valid
    return Scored(v.valid, v.error, v.error_type, decoded.mode, decoded.fenced, strict)


def _mean_stderr(flags: list[bool]) -> dict[str, float]:
    """Accuracy, n and the standard error of the mean (sample standard deviation, as lm-eval)."""
    n = len(flags)
    acc = sum(flags) / n if n else 0.0
    se = math.sqrt(acc * (1 - acc) / (n - 1)) if n > 1 else 0.0
    return {"accuracy": acc, "n": n, "correct": int(sum(flags)), "stderr": se}


def summarize(records: Iterable[dict], lenient: bool = False) -> dict[str, Any]:
    """Per-category accuracy (with n and standard error), overall (micro) and macro accuracy.

    With ``lenient``, each category and the overall figure also give ``strict_accuracy``, ``strict_correct``
    (BFCL's own verdicts) and ``fenced`` (replies read from a python fence), so lenient gains are reported apart.
    """
    records = list(records)
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["category"], []).append(r)

    def stats(rs: list[dict]) -> dict[str, Any]:
        out: dict[str, Any] = _mean_stderr([bool(r["valid"]) for r in rs])
        if lenient:
            strict = _mean_stderr([bool(r["strict_valid"]) for r in rs])
            out.update(strict_accuracy=strict["accuracy"], strict_correct=strict["correct"],
                       fenced=sum(bool(r["fenced"]) for r in rs))
        return out

    cats = {c: stats(rs) for c, rs in sorted(groups.items())}
    macro = sum(c["accuracy"] for c in cats.values()) / len(cats) if cats else 0.0
    out = {"categories": cats, "overall": stats(records), "macro_accuracy": macro, "version": VERSION,
           "checker": f"bfcl-eval {upstream().version}"}
    if lenient:
        out["lenient"] = True
        out["strict_macro_accuracy"] = sum(c["strict_accuracy"] for c in cats.values()) / len(cats) if cats else 0.0
    return out


# ---------------------------------------------------------------- model-facing task


def build_requests(data_dir: str | Path, limit: int | None = None,
                   categories: Iterable[str] | None = None, hints: bool = True) -> list[dict]:
    """One request per question: ``{"id", "category", "messages", "tools", "question", "ground_truth"}``.

    ``categories`` picks categories by name (``simple``, ``java`` and ``javascript`` are aliases of BFCL's
    ``simple_python``, ``simple_java``, ``simple_javascript``); ``limit`` caps the questions per category;
    ``hints``: see ``minitron.tool_schema.to_openai_tools``. Without ``categories``, files in another format
    (BFCL's multi-turn and agentic ones) are skipped with a warning; named explicitly, they are an error.
    BFCL's checker is loaded first, so a missing ``bfcl-eval`` is refused before any generation.
    """
    upstream()
    files = category_files(data_dir)
    wanted = list(files) if not categories else [ALIASES.get(c, c) for c in categories]
    unknown = [c for c in wanted if c not in files]
    if unknown:
        raise BFCLError(f"unknown BFCL categories {unknown} in {data_dir}; available: {', '.join(files)}")
    requests = []
    for cat in wanted:
        try:
            requests += _category_requests(cat, *files[cat], limit, hints)
        except BFCLError as e:
            if categories:
                raise
            warnings.warn(f"skipping BFCL category {cat}: {e}", stacklevel=2)
    return requests


def _category_requests(cat: str, qfile: Path, afile: Path | None, limit: int | None, hints: bool) -> list[dict]:
    """The requests of one category; BFCLError when its files are not single-turn AST-checkable BFCL."""
    if afile is None and "relevance" not in cat:
        raise BFCLError(f"{qfile} has no possible_answer/{qfile.name}: only (ir)relevance categories may lack one")
    answers = load_answers(afile, qfile) if afile else {}
    out = []
    for q in read_rows(qfile, QUESTION)[: limit if limit else None]:
        turns, gt = q.get("question") or [], answers.get(q["id"])
        if afile and gt is None:
            raise BFCLError(f"{q['id']}: no ground truth in {afile}")
        if len(turns) != 1 or not isinstance(turns[0], list):
            raise BFCLError(f"{q['id']}: only single-turn questions are supported (got {len(turns)} turns)")
        if gt is not None and not all(isinstance(c, dict) and len(c) == 1 for c in gt):
            raise BFCLError(f"{q['id']}: ground truth is not a list of {{func: {{param: values}}}} calls")
        out.append({"id": q["id"], "category": cat, "messages": copy.deepcopy(turns[0]),
                    "tools": to_openai_tools(q["function"], cat, hints=hints), "question": q, "ground_truth": gt})
    return out


def _record(item_id: str, category: str, v: Scored, lenient: bool) -> dict[str, Any]:
    """One item's record: ``{"id", "category", "valid", "error", "error_type", "mode"}`` (+ lenient fields)."""
    rec = {"id": item_id, "category": category, "valid": v.valid, "error": v.error, "error_type": v.error_type,
           "mode": v.mode}
    if lenient:
        rec.update(strict_valid=v.strict_valid, fenced=v.fenced)
    return rec


def score_outputs(requests: list[dict], texts: list[str], lenient: bool = False) -> dict[str, Any]:
    """Check each raw output against its request: the summary plus per-item records (with the text)."""
    items = []
    for req, text in zip(requests, texts, strict=True):
        v = score(req["question"], req["ground_truth"], req["category"], text=text, lenient=lenient)
        items.append({**_record(req["id"], req["category"], v, lenient), "text": text})
    return {**summarize(items, lenient), "items": items}


def evaluate(generate_fn: Callable[[list[dict], list[dict]], str], data_dir: str | Path,
             limit: int | None = None, categories: Iterable[str] | None = None, hints: bool = True,
             lenient: bool = False) -> dict[str, Any]:
    """BFCL on a model: ``generate_fn(messages, tools) -> raw assistant text`` for each question.

    Returns ``{"categories": {cat: {"accuracy", "n", "correct", "stderr"}}, "overall": {...},
    "macro_accuracy", "version", "checker", "items": [{"id", "category", "text", "valid", "error", "error_type",
    "mode"}]}`` (``lenient``: see ``summarize``). ``hints=False`` drops BFCL's description notes from the tools
    (see ``minitron.tool_schema.to_openai_tools``). A harness that batches or caches generation can call
    ``build_requests`` and ``score_outputs`` itself.
    """
    requests = build_requests(data_dir, limit, categories, hints)
    texts = [generate_fn(r["messages"], r["tools"]) for r in tqdm(requests, desc="bfcl", unit="q")]
    return score_outputs(requests, texts, lenient)


# ---------------------------------------------------------------- standalone checker (minitron eval-fc)


@dataclasses.dataclass
class CheckConfig:
    """Check a predictions file against BFCL questions and possible answers (``minitron eval-fc``)."""

    questions: str | None = arg(None, "BFCL question file (BFCL_v4_<category>.json) or a directory of them")
    answers: str | None = arg(None, "possible-answer file or directory (default: possible_answer/ beside them)")
    predictions: str | None = arg(None, 'JSONL: {"id", "calls": [{"func": {"arg": value}}]} or {"id", "text"}')
    verdicts: str | None = arg(None, 'write one {"id", "valid", "error"} JSONL line per prediction, in input order')
    lenient: bool = arg(False, "also accept python-fenced text answers (BFCL's prompt mode fails them); the strict "
                               "figures are reported beside")

    def __post_init__(self) -> None:
        for name in ("questions", "predictions"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required (see minitron eval-fc --help)")
            if not Path(getattr(self, name)).exists():
                raise ConfigError(f"--{name} {getattr(self, name)} does not exist")


def check_predictions(questions: dict, answers: dict, predictions: list[dict], lenient: bool = False) -> list[dict]:
    """One record per prediction, in order: ``{"id", "category", "valid", "error", "error_type", "mode"}``."""
    records = []
    for n, p in enumerate(predictions, 1):
        if "id" not in p or ("calls" not in p and "text" not in p):
            raise BFCLError(f"prediction {n}: needs 'id' and 'calls' or 'text', got keys {sorted(p)}")
        if p["id"] not in questions:
            raise BFCLError(f"prediction {n}: id {p['id']!r} is not in the question files")
        category, q = questions[p["id"]]
        gt = answers.get(p["id"])
        if gt is None and "relevance" not in category:  # (ir)relevance questions have no ground truth
            raise BFCLError(f"prediction {n}: no ground truth for {p['id']!r}; pass --answers")
        v = score(q, gt, category, text=p.get("text"), calls=p.get("calls"), lenient=lenient)
        records.append(_record(p["id"], category, v, lenient))
    return records


def run(cfg: CheckConfig) -> dict[str, Any]:
    """Score every prediction, print per-category accuracy as JSON (stdout), write verdicts if asked."""
    upstream()  # a missing bfcl-eval is refused before reading anything
    questions = load_questions(cfg.questions)
    answers = load_answers(cfg.answers, cfg.questions)
    records = check_predictions(questions, answers, read_rows(cfg.predictions, PREDICTION), cfg.lenient)
    if cfg.verdicts:
        lines = [json.dumps({"id": r["id"], "valid": r["valid"], "error": r["error"]}) for r in records]
        write_text(cfg.verdicts, "".join(line + "\n" for line in lines))
    summary = summarize(records, cfg.lenient)
    print(json.dumps(summary, indent=2))
    sys.stdout.flush()
    return summary
