"""Alignment data: SFT conversations and preference pairs, normalised to TRL's conversational formats.

Sources are local files or folders (``minitron.data.read_records``: JSONL, JSON, parquet, gzip) or ``datasets``
names (``name[:config][@split]``). Every row is normalised to the project's chat messages:

SFT rows (any of) -> ``{"prompt": [msgs], "completion": [assistant msg], "tools"?: [schemas]}``, one example per
assistant turn, so TRL trains on assistant tokens only (completion-only loss), tool calls included:
- ``{"messages": [...], "tools"?: [...]}`` (OpenAI/HF shape; the demo world's format);
- ShareGPT ``{"conversations": [{"from": "human"|"gpt"|"system"|"tool", "value": ...}]}``;
- Alpaca / GPTeacher ``{"instruction", "input", "output"}`` (roleplay, codegen, self-instruct...);
- GPTeacher toolformer rows (instruction starts ``toolformer: enabled``): the tools named in the header become
  JSON-schema tools and calls such as ``search('x')`` in the output become ``<tool_call>`` turns.

Preference rows (any of) -> ``{"prompt": [msgs], "chosen": [assistant msg], "rejected": [assistant msg]}``:
- ``{"prompt", "chosen", "rejected"}`` (strings or message lists; an HH-style prompt string is parsed);
- Alpaca + preference ``{"instruction", "input", "chosen", "rejected"}``;
- HH-RLHF ``{"chosen", "rejected"}`` full transcripts (``\\n\\nHuman: ...\\n\\nAssistant: ...``).

A row that fits none of these raises ``DataError`` naming file and line, or with ``skip_bad_rows`` is skipped and
counted (``LoadStats``), so the metrics show how much data was dropped.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import random
import re
from pathlib import Path
from typing import Any, Callable, Iterator

from minitron.data import TEXT_SUFFIXES, DataError, read_records, resolve_files

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
         "system": "system", "tool": "tool", "function": "tool", "observation": "tool"}
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_TOOLFORMER_CALL = re.compile(r"\b([A-Za-z_]\w*)\((['\"])(.*?)\2\)", re.S)
_SIGNATURE = re.compile(r"^([A-Za-z_]\w*)\(([A-Za-z_]\w*)\)$")


@dataclasses.dataclass
class LoadStats:
    """How many rows were read, kept (as examples) and skipped, with the first few reasons."""

    rows: int = 0
    examples: int = 0
    skipped: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------- sources
def iter_source(source: str, split: str) -> Iterator[tuple[str, int, Any]]:
    """(file, line, row) of a local path or ``datasets`` name (``name[:config][@split]`` overrides ``split``)."""
    local = Path(source)
    if local.exists():
        for f in _local_files(local, split):
            _check_format(f)
            yield from read_records(f, split)
        return
    if os.sep in source or source.startswith("."):
        raise DataError(f"data source not found: {source} (check the path, or build it first: `minitron world`)")
    name, _, hub_split = source.partition("@")
    try:
        yield from read_records(name, hub_split or split)
    except DataError:
        raise
    except Exception as e:  # datasets raises many kinds (offline, unknown name, bad config): one line names it
        raise DataError(f"data source {source}: not a local path, and `datasets` cannot load it "
                        f"({type(e).__name__}: {e})") from e


def source_label(source: str) -> str:
    """A short name for a data source in reports: the file or folder name without extensions, or the hub name."""
    name = source.partition("@")[0].rstrip("/").rsplit("/", 1)[-1]
    return name.split(".", 1)[0] or name


def from_sources(rows: list[dict[str, Any]], labels: list[str], setting: str) -> list[dict[str, Any]]:
    """The rows whose ``source`` label is one of ``labels`` (all rows when ``labels`` is empty)."""
    if not labels:
        return rows
    known = sorted({r.get("source") for r in rows} - {None})
    unknown = [label for label in labels if label not in known]
    if unknown:
        raise DataError(f"{setting}: no training rows from {unknown}; the sources are {known} (file names without "
                        "extensions, as in the report's per-source table)")
    return [r for r in rows if r.get("source") in labels]


def _local_files(local: Path, split: str) -> list[Path]:
    """The files of a local source: a folder without a file named for ``split`` gives all its JSON(L) files."""
    if local.is_dir() and not any(split in f.name for f in local.rglob("*") if f.is_file()):
        return sorted(p for p in local.rglob("*") if p.is_file() and p.suffix in (".jsonl", ".json", ".gz"))
    return resolve_files(local, split)


def _check_format(f: Path) -> None:
    """Refuse a file type that gives no rows, and a JSON array saved as ``.jsonl`` (one object per line expected)."""
    if not f.name.endswith(TEXT_SUFFIXES):
        raise DataError(f"{f}: unsupported data file type (use {', '.join(TEXT_SUFFIXES)})")
    if f.name.endswith((".jsonl", ".jsonl.gz")):
        with (gzip.open(f, "rt", encoding="utf-8") if f.name.endswith(".gz") else f.open(encoding="utf-8")) as fh:
            head = fh.read(4096).lstrip()[:1]
        if head == "[":
            raise DataError(f"{f}: a JSON array, but a .jsonl file holds one JSON object per line; write one object "
                            "per line, or rename the file to .json")


def load_rows(sources: list[str], split: str, convert: Callable[[dict], list[dict]], skip_bad_rows: bool,
              limit: int | None = None) -> tuple[list[dict], LoadStats]:
    """Convert every row of ``sources``; bad rows raise DataError (file:line) or are skipped and counted."""
    out: list[dict] = []
    stats = LoadStats()
    for source in sources:
        for where, line, row in iter_source(source, split):
            stats.rows += 1
            try:
                if not isinstance(row, dict):
                    raise TypeError(f"expected a JSON object, got {type(row).__name__}")
                examples = convert(row)
            except (ValueError, TypeError, KeyError) as e:
                msg = f"{where}:{line}: {e}"
                if not skip_bad_rows:
                    raise DataError(f"{msg} (fix the row, or pass --skip-bad-rows to skip and count it)") from e
                stats.skipped += 1
                if len(stats.errors) < 5:
                    stats.errors.append(msg)
                continue
            out.extend(examples)  # one row can give several examples (one per assistant turn)
            if limit is not None and len(out) >= limit:
                stats.examples = limit
                return out[:limit], stats
    stats.examples = len(out)
    return out, stats


def holdout(rows: list[dict], n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """A reproducible (train, eval) split taking ``n_eval`` random rows out (at least one row stays for training)."""
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)  # files are often sorted by source or topic: hold out a random sample
    n_eval = max(0, min(n_eval, len(rows) - 1))
    held = set(idx[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


# ----------------------------------------------------------------------------------------------- messages
def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    return value


def normalise_messages(messages: Any) -> list[dict[str, Any]]:
    """Check and normalise an OpenAI/HF or ShareGPT message list to ``[{"role", "content", "tool_calls"?}]``."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    out = []
    for m in messages:
        if not isinstance(m, dict):
            raise ValueError(f"a message must be an object, got {type(m).__name__}")
        role = ROLES.get(str(m.get("role", m.get("from", ""))).lower())
        if role is None:
            raise ValueError(f"unknown message role {m.get('role', m.get('from'))!r} (valid: {sorted(set(ROLES))})")
        content = m.get("content", m.get("value"))
        msg: dict[str, Any] = {"role": role, "content": "" if content is None else _text(content, "content")}
        if m.get("tool_calls"):
            msg["tool_calls"] = m["tool_calls"]
        elif role == "assistant" and not msg["content"]:
            raise ValueError("assistant message has neither content nor tool_calls")
        out.append(msg)
    return out


def alpaca_prompt(row: dict[str, Any]) -> str:
    """The user turn of an Alpaca-style row: instruction, then the input after a blank line when there is one."""
    instruction = _text(row["instruction"], "instruction").strip()
    extra = row.get("input") or ""
    return f"{instruction}\n\n{_text(extra, 'input').strip()}" if extra.strip() else instruction


def parse_hh(transcript: str) -> list[dict[str, str]]:
    """An HH-RLHF transcript (``\\n\\nHuman: ...\\n\\nAssistant: ...``) as messages."""
    parts = _HH_TURN.split(_text(transcript, "transcript"))
    if len(parts) < 3 or parts[0].strip():
        raise ValueError("not an HH transcript (expected '\\n\\nHuman: ...\\n\\nAssistant: ...')")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def parse_toolformer(row: dict[str, Any]) -> dict[str, Any]:
    """A GPTeacher toolformer row as ``{"messages", "tools"}`` in the project's tool format."""
    lines = _text(row["instruction"], "instruction").split("\n")
    tools, pending = [], []
    for line in lines[2:]:  # lines 0-1: "toolformer: enabled", "toolformer access: a, b"
        sig = _SIGNATURE.match(line.strip())
        if sig and pending:  # the lines since the previous signature describe this tool
            tools.append({"type": "function", "function": {
                "name": sig.group(1), "description": " ".join(pending),
                "parameters": {"type": "object", "properties": {sig.group(2): {"type": "string"}},
                               "required": [sig.group(2)]}}})
            pending = []
        elif line.strip():
            pending.append(line.strip())
    task = pending  # what follows the last signature is the task
    names = {t["function"]["name"]: t["function"]["parameters"]["required"][0] for t in tools}
    output = _text(row["output"], "output")
    calls = [{"name": n, "arguments": {names[n]: a}} for n, _, a in _TOOLFORMER_CALL.findall(output) if n in names]
    if not tools or not calls:
        raise ValueError("toolformer row without a parsable tool list and call")
    content = output[: _TOOLFORMER_CALL.search(output).start()].strip()  # type: ignore[union-attr]
    user = alpaca_prompt({"instruction": "\n".join(task), "input": row.get("input", "")})
    assistant = {"role": "assistant", "content": content, "tool_calls": [
        {"type": "function", "function": c} for c in calls]}
    return {"messages": [{"role": "user", "content": user}, assistant], "tools": tools}


# ----------------------------------------------------------------------------------------------- SFT rows
def sft_messages(row: dict[str, Any]) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) of one SFT row in any supported schema."""
    if "messages" in row or "conversations" in row:
        tools = row.get("tools") or None
        if tools is not None and not isinstance(tools, list):
            raise ValueError("tools must be a list of JSON schemas")
        return normalise_messages(row.get("messages", row.get("conversations"))), tools
    if "instruction" in row and "output" in row:
        if str(row["instruction"]).startswith("toolformer: enabled"):
            parsed = parse_toolformer(row)
            return parsed["messages"], parsed["tools"]
        return [{"role": "user", "content": alpaca_prompt(row)},
                {"role": "assistant", "content": _text(row["output"], "output").strip()}], None
    raise ValueError(f"unknown SFT row schema (keys {sorted(row)}); expected messages, conversations "
                     "or instruction/input/output")


def to_sft_examples(row: dict[str, Any]) -> list[dict[str, Any]]:
    """One prompt/completion example per assistant turn of ``row`` (TRL's conversational prompt-completion)."""
    messages, tools = sft_messages(row)
    examples = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and i > 0:
            ex: dict[str, Any] = {"prompt": messages[:i], "completion": [m]}
            if tools:
                ex["tools"] = tools
            examples.append(ex)
    if not examples:
        raise ValueError("conversation has no assistant turn after a prompt")
    return examples


# ----------------------------------------------------------------------------------------------- preferences
def _prompt_messages(prompt: Any) -> list[dict[str, Any]]:
    if isinstance(prompt, list):
        return normalise_messages(prompt)
    text = _text(prompt, "prompt")
    if text.startswith("\n\nHuman:"):  # HH-style prompt ending in "\n\nAssistant:"
        msgs = parse_hh(text)
        return msgs[:-1] if msgs[-1]["role"] == "assistant" and not msgs[-1]["content"] else msgs
    return [{"role": "user", "content": text.strip()}]


def _answer(value: Any, what: str) -> list[dict[str, Any]]:
    if isinstance(value, list):
        msgs = normalise_messages(value)
        if msgs[-1]["role"] != "assistant":
            raise ValueError(f"{what} must end with an assistant message")
        return msgs[-1:]
    text = _text(value, what).strip()
    if not text:
        raise ValueError(f"{what} is empty")
    return [{"role": "assistant", "content": text}]


def to_preference(row: dict[str, Any]) -> list[dict[str, Any]]:
    """``{"prompt", "chosen", "rejected"}`` as conversational messages, from any supported schema."""
    if "chosen" not in row or "rejected" not in row:
        raise ValueError(f"preference row needs chosen and rejected (keys {sorted(row)})")
    if "prompt" in row:
        prompt = _prompt_messages(row["prompt"])
    elif "instruction" in row:
        prompt = [{"role": "user", "content": alpaca_prompt(row)}]
    else:  # HH-RLHF full transcripts: the shared prefix is the prompt
        chosen, rejected = parse_hh(row["chosen"]), parse_hh(row["rejected"])
        if chosen[:-1] != rejected[:-1] or chosen[-1]["role"] != "assistant":
            raise ValueError("chosen and rejected transcripts differ before the final assistant turn")
        prompt, row = chosen[:-1], {"chosen": chosen[-1:], "rejected": rejected[-1:]}
    pair = {"prompt": prompt, "chosen": _answer(row["chosen"], "chosen"),
            "rejected": _answer(row["rejected"], "rejected")}
    if pair["chosen"] == pair["rejected"]:
        raise ValueError("chosen and rejected are identical")
    if prompt[-1]["role"] == "assistant":
        raise ValueError("prompt ends with an assistant turn")
    return [pair]


def fit_pairs(pairs: list[dict[str, Any]], length: Any, max_length: int) -> tuple[list[dict[str, Any]], int]:
    """Drop a pair's earliest turns until prompt + either answer fits ``max_length`` tokens; (kept pairs, dropped).

    ``length(messages)`` counts the tokens of a rendered conversation. TRL's RewardTrainer silently drops pairs
    that are too long and its DPOTrainer cuts their ends (the answers); multi-turn HH-RLHF conversations keep their
    last exchange this way. A pair whose last user turn alone is too long is dropped and counted.
    """
    kept, dropped = [], 0
    for pair in pairs:
        prompt = list(pair["prompt"])
        system = prompt[:1] if prompt[0]["role"] == "system" else []
        turns = prompt[len(system):]
        fits = lambda: max(length(system + turns + pair[k]) for k in ("chosen", "rejected")) <= max_length  # noqa: E731
        ok = fits()
        while not ok and len(turns) > 1:
            turns = turns[2:] if len(turns) > 2 else turns[-1:]  # one user + assistant exchange at a time
            ok = fits()
        if ok:
            kept.append({**pair, "prompt": system + turns})
        else:
            dropped += 1
    return kept, dropped


# ----------------------------------------------------------------------------------------------- datasets
def _arrow_safe(example: dict[str, Any]) -> dict[str, Any]:
    """JSON-encode tool schemas and call arguments: Arrow would merge their differing keys into null-filled structs."""
    ex = dict(example)
    if ex.get("tools") is not None:
        ex["tools"] = ex["tools"] if isinstance(ex["tools"], str) else json.dumps(ex["tools"])
    for key in ("prompt", "completion", "chosen", "rejected"):
        if isinstance(ex.get(key), list):
            ex[key] = [_encode_calls(m) for m in ex[key]]
    return ex


def _encode_calls(message: dict[str, Any]) -> dict[str, Any]:
    if not message.get("tool_calls"):
        return message
    calls = []
    for tc in message["tool_calls"]:
        f = tc.get("function", tc)
        args = f["arguments"] if isinstance(f["arguments"], str) else json.dumps(f["arguments"])
        calls.append({"type": "function", "function": {"name": f["name"], "arguments": args}})
    return {**message, "tool_calls": calls}


def to_dataset(rows: list[dict[str, Any]]) -> Any:
    """A ``datasets.Dataset`` of normalised examples, safe for Arrow (see ``_arrow_safe``).

    The ``source`` tag is left out. Every row gets every column (None where it has none): ``Dataset.from_list``
    takes its columns from the first row alone, so a first row without ``tools`` would silently drop the tool
    schemas of all the others.
    """
    import datasets

    columns = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "source"]  # report metadata only
    return datasets.Dataset.from_list([_arrow_safe({k: r.get(k) for k in columns}) for r in rows])
