"""Eval data files, read strictly by the core's reader: every problem is refused up front, in one line naming the
file and the line.

``read_rows(path, schemas)`` is ``minitron.data.read_jsonl`` as a list (a file that is one JSON array, a line that
is not JSON, a row that is not an object, or a row that lacks the fields of every accepted schema raise
``minitron.data.DataError``). ``read_json`` reads a plain JSON file with the same kind of message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from minitron.data import DataError, read_jsonl


def read_rows(path: str | Path, schemas: dict[str, tuple[str, ...]] | None = None) -> list[dict[str, Any]]:
    """Objects of a JSONL file, each holding the fields of one of ``schemas`` (name -> required fields)."""
    return list(read_jsonl(path, schemas))


def read_json(path: str | Path) -> Any:
    """A JSON file's value; malformed JSON raises DataError with the file, line and column."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
