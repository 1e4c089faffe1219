"""What made an output: a hash of a stage's resolved config and of its inputs, recorded beside the output.

Every stage computes ``of_config(cfg)`` when it starts, before it touches anything. Config values that name
existing files or directories are inputs: a directory that records its own fingerprint (the output of an earlier
stage) contributes that fingerprint, any other path a hash of its files' names and contents (not their modification
times: a data set copied afresh, as CI and every new checkout do, is the same input). So
redoing a stage changes the fingerprint of every stage below it, and those are redone too.

``up_to_date(out, fp)`` decides whether a finished output can be kept: same fingerprint, kept; a different one,
redone, with one line that says what changed; no record (an output made before fingerprints existed), kept with a
line saying so. Checkpoints carry the fingerprint as well: the trainer resumes only checkpoints of the same run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

from minitron.io import hash_file, read_json, write_json

FILE = "fingerprint.json"
# fields that do not change what a stage produces (where it goes, how often it saves or logs, how far to go now)
# (micro_batch_size too: only the order of fp32 sums depends on it, so a multi-GPU run's output is kept)
UNHASHED = frozenset({"out", "force", "resume", "dry_run", "save_every", "keep_checkpoints", "log_every", "save_steps",
                      "logging_steps", "max_steps", "progress", "micro_batch_size"})


def of_path(path: str | os.PathLike) -> str:
    """The fingerprint of one input: its recorded fingerprint, else a hash of its files' names and contents."""
    p = Path(path).resolve()
    if (p / FILE).is_file():
        return str(read_json(p / FILE)["fingerprint"])
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()
                                            and not any(s.startswith(".") for s in f.relative_to(p).parts))
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(p) if f != p else f.name}\0{_content(f)}\n".encode())
    return h.hexdigest()[:16]


_BLOCK = 1 << 20
_WHOLE = 256 << 20  # files up to this size are hashed whole; larger ones by size and 64 evenly spaced 1 MiB blocks


def _content(f: Path) -> str:
    """A hash of one file's bytes (whole, or for files over 256 MiB, e.g. an 8B checkpoint, 64 sampled blocks)."""
    size = f.stat().st_size
    h = hashlib.sha256(str(size).encode())
    if size <= _WHOLE:
        return hash_file(f, h).hexdigest()
    with open(f, "rb") as fh:
        for i in range(64):
            fh.seek((size - _BLOCK) * i // 63)
            h.update(fh.read(_BLOCK))
    return h.hexdigest()


def _strings(value: Any, key: str) -> Iterator[tuple[str, str]]:
    """(key, string) for every string in a nested config value (``data[0]``, ``sft_mix.teacher``)."""
    if isinstance(value, str):
        yield key, value
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _strings(v, f"{key}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, f"{key}.{k}")


def _paths(config: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(key, value) of the config values that name an existing file or folder."""
    for k, v in config.items():
        yield from ((key, s) for key, s in _strings(v, k) if s and len(s) < 4096 and Path(s).exists())


def without(cfg: Any, names: "tuple[str, ...] | frozenset[str]") -> Any:
    """A copy of the dataclass ``cfg`` without the fields ``names``: options that count only in some modes, or whose
    effect another fingerprinted value already records, so adding them keeps older outputs up to date."""
    keep = [f for f in dataclasses.fields(cfg) if f.name not in names]
    cls = dataclasses.make_dataclass(type(cfg).__name__, [(f.name, f.type) for f in keep])
    return cls(**{f.name: getattr(cfg, f.name) for f in keep})


def of_config(cfg: Any, **extra: Any) -> dict[str, Any]:
    """``{"fingerprint", "config", "inputs"}`` of a stage config (a dataclass); ``extra`` adds values that are not
    config fields (e.g. the resolved model directory)."""
    config = {k: v for k, v in {**dataclasses.asdict(cfg), **extra}.items() if k not in UNHASHED}
    inputs = {k: of_path(v) for k, v in _paths(config)}
    blob = json.dumps({"config": config, "inputs": inputs}, sort_keys=True, default=str)
    return {"fingerprint": hashlib.sha256(blob.encode()).hexdigest()[:16], "config": config, "inputs": inputs}


def record(out_dir: str | os.PathLike, fp: dict[str, Any]) -> Path:
    """Write ``fingerprint.json`` into ``out_dir`` (inside the stage's temporary directory, before its rename)."""
    return write_json(Path(out_dir) / FILE, fp)


def changes(old: dict[str, Any], new: dict[str, Any], limit: int = 3) -> str:
    """What differs between two fingerprints, in a few words: ``lr 0.0001 -> 0.0002; input teacher``."""
    said = []
    oc, nc = old.get("config", {}), new.get("config", {})
    for k in sorted(set(oc) | set(nc)):
        if oc.get(k) != nc.get(k):
            said.append(f"{k} {_short(oc.get(k))} -> {_short(nc.get(k))}")
    oi, ni = old.get("inputs", {}), new.get("inputs", {})
    changed_keys = {k for k in set(oc) | set(nc) if oc.get(k) != nc.get(k)}
    for k in sorted(set(oi) | set(ni)):
        if oi.get(k) != ni.get(k) and k.split("[")[0].split(".")[0] not in changed_keys:
            said.append(f"input {k} changed")
    if not said:
        return "fingerprint changed"
    return "; ".join(said[:limit]) + (f" (+{len(said) - limit} more)" if len(said) > limit else "")


def _short(v: Any) -> str:
    s = json.dumps(v, default=str) if not isinstance(v, str) else v
    return s if len(s) <= 40 else s[:37] + "..."


def _redone_inputs(out: Path, config: dict[str, Any]) -> list[str]:
    """The stage outputs named in ``config`` (folders with a fingerprint record) recorded after ``out`` was written:
    an output made before records existed is stale once what it was made from has been redone."""
    made = max((f.stat().st_mtime for f in out.iterdir()), default=out.stat().st_mtime)
    return [k for k, v in _paths(config) if (Path(v) / FILE).is_file() and (Path(v) / FILE).stat().st_mtime > made]


def up_to_date(out: str | os.PathLike, fp: dict[str, Any], stage: str, force: bool = False) -> bool:
    """True when the finished output ``out`` was made by this config and these inputs (keep it); says in one line
    why not when it exists but must be redone."""
    out = Path(out)
    if not out.exists():
        return False
    if force:
        print(f"[{stage}] {out}: --force, redoing it")
        return False
    rec = out / FILE
    if not rec.is_file():
        newer = _redone_inputs(out, fp.get("config", {}))
        if newer:
            print(f"[{stage}] {out} has no fingerprint and its input {newer[0]} was remade after it: redoing it")
            return False
        print(f"[{stage}] {out} exists (made before fingerprints were recorded): keeping it; --force redoes it")
        return True
    old = read_json(rec)
    if old.get("fingerprint") == fp["fingerprint"]:
        print(f"[{stage}] {out} is up to date (fingerprint {fp['fingerprint']}): skipping")
        return True
    print(f"[{stage}] {out} was made differently ({changes(old, fp)}): redoing it and what follows")
    return False
