"""Function calling, BFCL-style: data loading, tool rendering, the model-facing task and the standalone checker.

Data: BFCL v4 files (JSONL despite the ``.json`` suffix). ``BFCL_v4_<category>.json`` holds questions
``{"id", "question", "function"}`` (``question``: a list of turns, each a list of chat messages; ``function``:
the function specs) and ``possible_answer/BFCL_v4_<category>.json`` holds ``{"id", "ground_truth"}`` (one
``{func: {param: acceptable values}}`` per expected call). Irrelevance categories have no answer file (no call
is expected). Any category in this format works; its name comes from the file name.

Standalone checker (``minitron eval-fc``)::

    minitron eval-fc --questions DIR_OR_FILE [--answers DIR_OR_FILE] --predictions preds.jsonl \\
        [--verdicts verdicts.jsonl]

Each prediction line is ``{"id": ..., "calls": [{"func": {"arg": value}}]}`` (or ``[{"name", "arguments"}]``)
or ``{"id": ..., "text": "raw model output"}``; it prints per-category accuracy as JSON and writes one
``{"id", "valid", "error"}`` verdict per prediction, in input order (repeated ids are scored one by one).

Model-facing task (``evaluate``): ``generate_fn(messages, tools) -> str`` is called once per question with the
question's messages and its functions as OpenAI tools (rendered by the chat template); the raw text is decoded
(``evals.bfcl_decode``) and checked (``evals.bfcl_checker``).
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

from evals.bfcl_checker import Verdict, check, language_of
from evals.bfcl_decode import DecodeError, decode_output, normalize_calls
from evals.jsonl import read_rows
from minitron.config import ConfigError, MinitronError, arg
from minitron.io import write_text

VERSION = 1  # bump when scoring changes
FILE_RE = re.compile(r"^BFCL_v\d+_(?P<category>.+?)\.jsonl?$")
ALIASES = {"simple": "simple_python", "python": "simple_python", "java": "simple_java",
           "javascript": "simple_javascript", "js": "simple_javascript"}
# BFCL type names -> JSON-schema (OpenAPI) types, as BFCL's GORILLA_TO_OPENAPI.
OPENAPI_TYPES = {"integer": "integer", "number": "number", "float": "number", "string": "string",
                 "boolean": "boolean", "bool": "boolean", "array": "array", "list": "array", "dict": "object",
                 "object": "object", "tuple": "array", "any": "string", "byte": "integer", "short": "integer",
                 "long": "integer", "double": "number", "char": "string", "ArrayList": "array", "Array": "array",
                 "HashMap": "object", "Hashtable": "object", "Queue": "array", "Stack": "array", "Any": "string",
                 "String": "string", "Bigint": "integer"}
LANGUAGE_HINTS = {"python": " Note that the provided function is in Python 3 syntax.",
                  "java": " Note that the provided function is in Java 8 SDK syntax.",
                  "javascript": " Note that the provided function is in JavaScript syntax."}


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


# ---------------------------------------------------------------- tools


def to_openai_tools(functions: list[dict], category: str = "simple_python", underscore_names: bool = False,
                    hints: bool = True) -> list[dict]:
    """BFCL function specs -> OpenAI tools ``{"type": "function", "function": {...}}``, as BFCL's FC mode does.

    Types are mapped to JSON schema (``dict`` -> ``object``, ``float`` -> ``number``, ``tuple`` -> ``array``);
    Java and JavaScript parameters become strings "in string representation" of their declared type, with the
    type named in the description. ``hints`` adds BFCL's description notes (the language hint on each
    function, "This is a float type value." on floats); leave them out for a model fine-tuned on plain tool
    schemas. ``underscore_names`` replaces ``.`` in names by ``_`` (OpenAI's name rule; the checker accepts both).
    """
    language = language_of(category)
    tools = []
    for spec in copy.deepcopy(functions):
        spec["description"] = spec.get("description", "") + (LANGUAGE_HINTS[language] if hints else "")
        params = spec.setdefault("parameters", {})
        params["type"] = "object"
        props = params.setdefault("properties", {})
        if language != "python":
            _stringify_params(props, language)
        _cast_types(props, hints)
        if underscore_names:
            spec["name"] = spec["name"].replace(".", "_")
        tools.append({"type": "function", "function": spec})
    return tools


def _stringify_params(props: dict, language: str) -> None:
    """Java/JavaScript parameters are passed as source literals: type string, declared type in the text."""
    lang = "Java" if language == "java" else "JavaScript"
    for p in props.values():
        desc, tp = p.get("description", ""), p.get("type", "any")
        if tp == "any":
            desc += f" This parameter can be of any type of {lang} object in string representation."
        else:
            desc += f" This is {lang} {tp} type parameter in string representation."
        if "items" in p:
            item = p.pop("items").get("type")
            desc += f" The list elements are of type {item}; they are not in string representation."
        if "properties" in p:
            desc += (" The dictionary entries have the following schema; they are not in string representation. "
                     + json.dumps(p.pop("properties")))
        p["description"], p["type"] = desc, "string"


def _cast_types(props: dict, hints: bool = True) -> None:
    """BFCL types -> JSON-schema types, recursively through ``properties`` and ``items``."""
    for p in props.values():
        tp = p.get("type", "string")
        if tp == "float" and hints:
            p["format"] = "float"
            p["description"] = p.get("description", "") + " This is a float type value."
        p["type"] = OPENAPI_TYPES.get(tp, "string")
        if isinstance(p.get("properties"), dict):
            _cast_types(p["properties"], hints)
        if isinstance(p.get("items"), dict):
            _cast_types({"items": p["items"]}, hints)


# ---------------------------------------------------------------- scoring


def score(question: dict, ground_truth: list[dict] | None, category: str, *, text: str | None = None,
          calls: Any = None) -> Verdict:
    """Check one prediction, given as raw model ``text`` or as already decoded ``calls``."""
    try:
        decoded = decode_output(text) if calls is None else normalize_calls(calls)
    except DecodeError as e:
        return check(question, ground_truth, None, category, decode_error=str(e))
    return check(question, ground_truth, decoded, category)


def _mean_stderr(flags: list[bool]) -> dict[str, float]:
    """Accuracy, n and the standard error of the mean (sample standard deviation, as lm-eval)."""
    n = len(flags)
    acc = sum(flags) / n if n else 0.0
    se = math.sqrt(acc * (1 - acc) / (n - 1)) if n > 1 else 0.0
    return {"accuracy": acc, "n": n, "correct": int(sum(flags)), "stderr": se}


def summarize(records: Iterable[dict]) -> dict[str, Any]:
    """Per-category accuracy (with n and standard error), overall (micro) and macro accuracy."""
    by_cat: dict[str, list[bool]] = {}
    flags = []
    for r in records:
        by_cat.setdefault(r["category"], []).append(bool(r["valid"]))
        flags.append(bool(r["valid"]))
    cats = {c: _mean_stderr(v) for c, v in sorted(by_cat.items())}
    macro = sum(c["accuracy"] for c in cats.values()) / len(cats) if cats else 0.0
    return {"categories": cats, "overall": _mean_stderr(flags), "macro_accuracy": macro, "version": VERSION}


# ---------------------------------------------------------------- model-facing task


def build_requests(data_dir: str | Path, limit: int | None = None,
                   categories: Iterable[str] | None = None, hints: bool = True) -> list[dict]:
    """One request per question: ``{"id", "category", "messages", "tools", "question", "ground_truth"}``.

    ``categories`` picks categories by name (``simple``, ``java`` and ``javascript`` are aliases of BFCL's
    ``simple_python``, ``simple_java``, ``simple_javascript``); ``limit`` caps the questions per category;
    ``hints``: see ``to_openai_tools``. Without ``categories``, files in another format (BFCL's multi-turn
    and agentic ones) are skipped with a warning; named explicitly, they are an error.
    """
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


def score_outputs(requests: list[dict], texts: list[str]) -> dict[str, Any]:
    """Check each raw output against its request: the summary plus per-item records."""
    items = []
    for req, text in zip(requests, texts, strict=True):
        v = score(req["question"], req["ground_truth"], req["category"], text=text)
        items.append({"id": req["id"], "category": req["category"], "text": text, "valid": v.valid,
                      "error": v.error, "error_type": v.error_type})
    return {**summarize(items), "items": items}


def evaluate(generate_fn: Callable[[list[dict], list[dict]], str], data_dir: str | Path,
             limit: int | None = None, categories: Iterable[str] | None = None, hints: bool = True) -> dict[str, Any]:
    """BFCL on a model: ``generate_fn(messages, tools) -> raw assistant text`` for each question.

    Returns ``{"categories": {cat: {"accuracy", "n", "correct", "stderr"}}, "overall": {...},
    "macro_accuracy", "version", "items": [{"id", "category", "text", "valid", "error", "error_type"}]}``.
    ``hints=False`` drops BFCL's description notes from the tools (see ``to_openai_tools``). A harness that
    batches or caches generation can call ``build_requests`` and ``score_outputs`` itself.
    """
    requests = build_requests(data_dir, limit, categories, hints)
    texts = [generate_fn(r["messages"], r["tools"]) for r in tqdm(requests, desc="bfcl", unit="q")]
    return score_outputs(requests, texts)


# ---------------------------------------------------------------- standalone checker (minitron eval-fc)


@dataclasses.dataclass
class CheckConfig:
    """Check a predictions file against BFCL questions and possible answers (``minitron eval-fc``)."""

    questions: str | None = arg(None, "BFCL question file (BFCL_v4_<category>.json) or a directory of them")
    answers: str | None = arg(None, "possible-answer file or directory (default: possible_answer/ beside them)")
    predictions: str | None = arg(None, 'JSONL: {"id", "calls": [{"func": {"arg": value}}]} or {"id", "text"}')
    verdicts: str | None = arg(None, 'write one {"id", "valid", "error"} JSONL line per prediction, in input order')

    def __post_init__(self) -> None:
        for name in ("questions", "predictions"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required (see minitron eval-fc --help)")
            if not Path(getattr(self, name)).exists():
                raise ConfigError(f"--{name} {getattr(self, name)} does not exist")


def check_predictions(questions: dict, answers: dict, predictions: list[dict]) -> list[dict]:
    """One record per prediction, in order: ``{"id", "category", "valid", "error", "error_type"}``."""
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
        v = score(q, gt, category, text=p.get("text"), calls=p.get("calls"))
        records.append({"id": p["id"], "category": category, "valid": v.valid, "error": v.error,
                        "error_type": v.error_type})
    return records


def run(cfg: CheckConfig) -> dict[str, Any]:
    """Score every prediction, print per-category accuracy as JSON (stdout), write verdicts if asked."""
    questions = load_questions(cfg.questions)
    answers = load_answers(cfg.answers, cfg.questions)
    records = check_predictions(questions, answers, read_rows(cfg.predictions, PREDICTION))
    if cfg.verdicts:
        lines = [json.dumps({"id": r["id"], "valid": r["valid"], "error": r["error"]}) for r in records]
        write_text(cfg.verdicts, "".join(line + "\n" for line in lines))
    summary = summarize(records)
    print(json.dumps(summary, indent=2))
    sys.stdout.flush()
    return summary
