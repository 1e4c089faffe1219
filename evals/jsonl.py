"""Eval data files read strictly: every problem is refused up front, in one line naming the file and the line.

``read_rows(path, schemas)`` returns the objects of a JSONL file (``.gz`` allowed) and raises
``minitron.data.DataError`` for a file that is one JSON array, a line that is not JSON, a row that is not an
object, or a row that lacks the fields of every accepted schema (``{"SQuAD 2.0": ("context", ...), ...}``:
any one schema suffices). ``read_json`` reads a plain JSON file with the same kind of message.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from minitron.data import DataError


def _text(path: Path) -> str:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return fh.read()


def read_json(path: str | Path) -> Any:
    """A JSON file's value; malformed JSON raises DataError with the file, line and column."""
    try:
        return json.loads(_text(Path(path)))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None


def read_rows(path: str | Path, schemas: dict[str, tuple[str, ...]] | None = None) -> list[dict[str, Any]]:
    """Objects of a JSONL file, each holding the fields of one of ``schemas`` (name -> required fields)."""
    path = Path(path)
    text = _text(path)
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            _refuse_array(path, text)
            raise DataError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno}); "
                            "JSONL holds one JSON object per line") from None
        if not isinstance(row, dict):
            _refuse_array(path, text)
            raise DataError(f"{path}:{n}: a JSON {type(row).__name__}, not an object; JSONL holds one object per line")
        if schemas:
            _check_fields(path, n, row, schemas)
        rows.append(row)
    return rows


def _refuse_array(path: Path, text: str) -> None:
    """A whole file that is one JSON array (``[{...}, {...}]``) where JSONL is expected gets its own message."""
    if not text.lstrip().startswith("["):
        return
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        return
    if isinstance(whole, list):
        raise DataError(f"{path}:1: a JSON array, but JSONL (one JSON object per line) is expected; "
                        f"convert it with `jq -c '.[]' {path}`")


def _check_fields(path: Path, n: int, row: dict, schemas: dict[str, tuple[str, ...]]) -> None:
    """Refuse a row that lacks a field of every schema, naming the missing fields of the closest one (the most
    fields present; the first schema on a tie)."""
    missing = {name: [f for f in fields if f not in row] for name, fields in schemas.items()}
    if any(not m for m in missing.values()):
        return
    closest = max(schemas, key=lambda name: len(schemas[name]) - len(missing[name]))
    expected = " or ".join(f"{name} ({', '.join(fields)})" for name, fields in schemas.items())
    raise DataError(f"{path}:{n}: missing {', '.join(repr(f) for f in missing[closest])}; expected a row of "
                    f"{expected}, got fields {sorted(row)}")
