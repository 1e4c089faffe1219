"""Per-item result cache: an interrupted eval resumes where it stopped.

Every generation and every log-likelihood request is stored under a key that hashes the request (prompt token
ids, decoding parameters) in a small SQLite file per model, next to the eval's outputs. Writes are committed
after each batch, so killing the process loses at most one batch of work; a rerun reads the finished items
back instead of recomputing them. A changed model (other weights) gets another file, via its fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any, Iterable


def request_key(kind: str, payload: Any, params: dict[str, Any] | None = None) -> str:
    """A stable hash of one request: its kind ("gen", "ll", ...), payload and decoding parameters."""
    blob = json.dumps([kind, payload, params or {}], sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class ItemCache:
    """A persistent key -> JSON value store (SQLite, one file per model)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS items (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self._db.commit()
        self.hits = 0

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """The cached values among ``keys`` (missing keys are absent from the result)."""
        keys = list(dict.fromkeys(keys))
        found: dict[str, Any] = {}
        for i in range(0, len(keys), 500):  # SQLite caps the number of bound parameters
            chunk = keys[i : i + 500]
            marks = ",".join("?" * len(chunk))
            for k, v in self._db.execute(f"SELECT key, value FROM items WHERE key IN ({marks})", chunk):
                found[k] = json.loads(v)
        self.hits += len(found)
        return found

    def put_many(self, items: dict[str, Any]) -> None:
        """Store ``items`` and commit (one transaction per batch)."""
        rows = [(k, json.dumps(v, ensure_ascii=False)) for k, v in items.items()]
        self._db.executemany("INSERT OR REPLACE INTO items (key, value) VALUES (?, ?)", rows)
        self._db.commit()

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0]

    def close(self) -> None:
        self._db.close()
