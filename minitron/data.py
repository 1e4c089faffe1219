"""Text corpora: read, tokenize, pack into fixed-length sequences, sample calibration batches.

A ``source`` is one of
- a file: ``.jsonl``, ``.jsonl.gz``, ``.json`` (a list or JSONL), ``.txt`` (one document per blank-line block),
  ``.parquet``;
- a directory: the files in it whose name contains the split (``gutenberg_train.jsonl.gz``, ``train.jsonl``);
- a ``datasets`` name (``wikitext:wikitext-2-raw-v1``: the part after ``:`` is the config name).
Rows are JSON objects with a text field (``text`` by default). A malformed row raises ``DataError`` with
the file and line number.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from minitron.config import MinitronError

TEXT_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".txt", ".txt.gz", ".parquet")


class DataError(MinitronError, ValueError):
    """A data file or row that cannot be read; the message names the file and line."""


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")  # type: ignore[return-value]
    return open(path, encoding="utf-8")


def resolve_files(source: str | os.PathLike, split: str = "train") -> list[Path]:
    """The data files behind a local ``source`` for ``split`` (empty list when ``source`` is not local)."""
    p = Path(source)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(TEXT_SUFFIXES))
        if not files:
            raise DataError(f"{p}: no data files ({', '.join(TEXT_SUFFIXES)})")
        chosen = [f for f in files if split in f.name]
        if not chosen:
            raise DataError(f"{p}: no file for split {split!r} among {[f.name for f in files]}")
        return chosen
    return []


def read_jsonl(path: str | os.PathLike, schemas: dict[str, tuple[str, ...]] | None = None) -> Iterator[dict[str, Any]]:
    """Rows of a JSONL file (``.gz`` allowed); a bad line raises DataError naming file and line.

    A file that is one JSON array (``[{...}, {...}]``, on one line or many) is refused as such. With ``schemas``
    (name -> required fields, e.g. ``{"SQuAD 2.0": ("context", "question", "answers")}``) every row must hold
    the fields of at least one of them; the message names the fields the closest schema misses.
    """
    path = Path(path)
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                _refuse_json_array(path)
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); "
                                "JSONL holds one JSON object per line") from e
            if not isinstance(row, dict):
                _refuse_json_array(path)
                raise DataError(f"{path}:{lineno}: a JSON {type(row).__name__}, not an object; JSONL holds one "
                                "object per line")
            missing = {name: [f for f in fields if f not in row] for name, fields in (schemas or {}).items()}
            if missing and all(missing.values()):
                closest = max(missing, key=lambda name: len(schemas[name]) - len(missing[name]))  # most fields present
                expected = " or ".join(f"{name} ({', '.join(fields)})" for name, fields in schemas.items())
                raise DataError(f"{path}:{lineno}: missing {', '.join(map(repr, missing[closest]))}; expected a row "
                                f"of {expected}, got fields {sorted(row)}")
            yield row


def _refuse_json_array(path: Path) -> None:
    """Raise the message for a whole file that is one JSON array where JSONL is expected (read only on that error
    path, and only when the file starts with ``[``)."""
    with _open_text(path) as fh:
        if fh.read(64).lstrip()[:1] != "[":
            return
        fh.seek(0)
        try:
            whole = json.load(fh)
        except json.JSONDecodeError:
            return
    if isinstance(whole, list):
        raise DataError(f"{path}: a JSON array, but a .jsonl file holds one JSON object per line; convert it with "
                        f"`jq -c '.[]' {path}` (a training corpus may instead be renamed to .json)")


def read_records(source: str | os.PathLike, split: str = "train") -> Iterator[tuple[str, int, dict[str, Any]]]:
    """(file, line, row) for every row of ``source``; a ``datasets`` name is loaded with ``load_dataset``."""
    files = resolve_files(source, split)
    if not files:
        if os.sep in str(source) or str(source).startswith("."):
            raise DataError(f"data source not found: {source}")
        yield from _hub_records(str(source), split)
        return
    for f in files:
        name = f.name
        if name.endswith((".jsonl", ".jsonl.gz")):
            for i, row in enumerate(read_jsonl(f), 1):
                yield str(f), i, row
        elif name.endswith((".json", ".json.gz")):
            yield from _json_records(f)
        elif name.endswith((".txt", ".txt.gz")):
            with _open_text(f) as fh:
                for i, block in enumerate(fh.read().split("\n\n"), 1):
                    if block.strip():
                        yield str(f), i, {"text": block}
        elif name.endswith(".parquet"):
            import pyarrow.parquet as pq

            for i, row in enumerate(pq.read_table(f).to_pylist(), 1):
                yield str(f), i, row


def _json_records(f: Path) -> Iterator[tuple[str, int, dict[str, Any]]]:
    with _open_text(f) as fh:
        head = fh.read(1)
        fh.seek(0)
        if head == "[":
            for i, row in enumerate(json.load(fh), 1):
                yield str(f), i, row
            return
    for i, row in enumerate(read_jsonl(f), 1):
        yield str(f), i, row


def _hub_records(name: str, split: str) -> Iterator[tuple[str, int, dict[str, Any]]]:
    import datasets

    path, _, config = name.partition(":")
    ds = datasets.load_dataset(path, config or None, split=split, streaming=True)
    for i, row in enumerate(ds, 1):
        yield name, i, row


def iter_texts(source: str | os.PathLike, split: str = "train", text_field: str = "text") -> Iterator[str]:
    """The documents of ``source``; a row without a string ``text_field`` raises DataError."""
    for where, line, row in read_records(source, split):
        text = row.get(text_field)
        if not isinstance(text, str):
            raise DataError(f"{where}:{line}: row has no string field {text_field!r} (keys: {sorted(row)})")
        if text.strip():
            yield text


def tokenize_stream(texts: Iterable[str], tokenizer: Any, max_tokens: int | None = None) -> torch.Tensor:
    """Concatenate documents as ``BOS doc EOS`` token runs, up to ``max_tokens``; a 1-D LongTensor."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    chunks: list[torch.Tensor] = []
    total = 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        doc = ([bos] if bos is not None else []) + ids + ([eos] if eos is not None else [])
        chunks.append(torch.tensor(doc, dtype=torch.long))
        total += len(doc)
        if max_tokens is not None and total >= max_tokens:
            break
    if not chunks:
        raise DataError("no documents to tokenize")
    stream = torch.cat(chunks)
    return stream[:max_tokens] if max_tokens is not None else stream


def pack(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cut a token stream into [N, seq_len] rows (the remainder is dropped)."""
    n = stream.numel() // seq_len
    if n == 0:
        raise DataError(f"only {stream.numel()} tokens: not enough for one sequence of {seq_len}")
    return stream[: n * seq_len].view(n, seq_len)


def packed_sequences(
    source: str | os.PathLike,
    tokenizer: Any,
    seq_len: int,
    max_tokens: int | None = None,
    split: str = "train",
    text_field: str = "text",
) -> torch.Tensor:
    """Tokenize ``source`` and pack it into [N, seq_len] (documents separated by EOS)."""
    return pack(tokenize_stream(iter_texts(source, split, text_field), tokenizer, max_tokens), seq_len)


def calibration_batch(
    source: str | os.PathLike,
    tokenizer: Any,
    n_samples: int,
    seq_len: int,
    seed: int = 0,
    split: str = "train",
    pool_factor: int = 4,
    text_field: str = "text",
) -> torch.Tensor:
    """``n_samples`` random windows of ``seq_len`` tokens, reproducible for a given seed: [n_samples, seq_len].

    Windows are drawn from the first ``pool_factor * n_samples * seq_len`` tokens of the corpus (or all of it).
    """
    stream = tokenize_stream(iter_texts(source, split, text_field), tokenizer, pool_factor * n_samples * seq_len)
    if stream.numel() < seq_len + 1:
        raise DataError(f"{source}: {stream.numel()} tokens, fewer than one window of {seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len + 1, (n_samples,), generator=g)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


class PackedDataset(torch.utils.data.Dataset):
    """[N, seq_len] token rows as a torch Dataset of ``{"input_ids", "labels"}``."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}
