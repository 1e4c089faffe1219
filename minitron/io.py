"""Atomic writes and Hugging Face model directories.

A stage never leaves a half-written output: it writes into ``<out>.tmp-<pid>`` and renames it into place
when everything is there, so "the directory exists" means "the stage finished".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; rename it to ``target`` on success, delete it on error."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes 0700; outputs are ordinary shared directories
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"{target} exists (pass --force to overwrite)")
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as fh:
        json.dump(obj, fh, indent=indent, default=_json_default)
        fh.write("\n")
    os.replace(fh.name, path)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as fh:
        fh.write(text)
    os.replace(fh.name, path)
    return path


def hash_file(path: str | os.PathLike, h: Any = None) -> Any:
    """Feed a file's bytes to the hash ``h`` (a new sha256 by default), 1 MiB at a time; returns ``h``."""
    h = hashlib.sha256() if h is None else h
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def is_model_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a complete HF model directory (config, weights, tokenizer)."""
    p = Path(path)
    has_weights = any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").exists()
    return p.is_dir() and (p / "config.json").exists() and has_weights


def count_parameters(model: Any) -> int:
    """Unique parameters of a torch module (tied weights counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def write_model_card(out_dir: str | os.PathLike, title: str, fields: dict[str, Any], body: str = "") -> Path:
    """A README.md model card: a title, a table of facts (source, data, parameters...) and free text."""
    lines = [f"# {title}", "", "| field | value |", "|---|---|"]
    for k, v in fields.items():
        lines.append(f"| {k} | {v} |")
    if body:
        lines += ["", body.strip()]
    return write_text(Path(out_dir) / "README.md", "\n".join(lines) + "\n")


def save_model_dir(
    model: Any,
    tokenizer: Any,
    out: str | os.PathLike,
    card: dict[str, Any] | None = None,
    title: str | None = None,
    max_shard_size: str = "2GB",
    overwrite: bool = True,
) -> Path:
    """Save model + tokenizer (+ generation config + model card) atomically as a standard HF directory."""
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if card is not None:
            write_model_card(tmp, title or out.name, card)
    return out
