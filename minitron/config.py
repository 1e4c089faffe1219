"""Stage configs: dataclasses loaded from YAML, then overridden from the command line.

Every stage declares one ``XConfig`` dataclass. Fields are documented once, with ``arg(default, "help")``;
``load_config`` reads a YAML file (either the stage's own file or a recipe with one section per stage),
applies overrides, rejects unknown keys with the list of valid ones, and coerces types.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class MinitronError(Exception):
    """Bad input that the user can fix: the CLI prints the message (which names the fix), no traceback."""


class ConfigError(MinitronError, ValueError):
    """A config file or override that cannot be applied (unknown key, wrong type, bad value)."""


def arg(default: Any = dataclasses.MISSING, help: str = "", **kw) -> Any:
    """A dataclass field with a help string (shown by ``minitron STAGE --help``)."""
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def field_help(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type name, default, help) for every field of a config dataclass."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        rows.append((f.name, _type_name(hints[f.name]), default, f.metadata.get("help", "")))
    return rows


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML or command-line value to the field type ``tp``."""
    tp, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional or tp is Any:
            return None
        raise ConfigError(f"{key}: a value is required (got none)")
    origin = typing.get_origin(tp)
    try:
        if tp is Any:
            return value
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping for {tp.__name__}")
            return from_dict(tp, value, prefix=f"{key}.")
        if origin in (list, tuple):
            (item_tp,) = typing.get_args(tp)[:1] or (Any,)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v != ""]
            elif not isinstance(value, (list, tuple)):
                value = [value]
            return [coerce(v, item_tp, key) for v in value]
        if origin is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping")
            return dict(value)
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if tp is int:
            if isinstance(value, str):
                value = float(value) if any(c in value for c in ".eE") else int(value)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
    except ConfigError:
        raise  # a nested section's own validation message already names the fix
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key}: cannot read {value!r} as {_type_name(tp)}") from e
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build ``cls`` from a mapping; unknown keys raise ConfigError naming the valid ones."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s} for {cls.__name__}; valid keys: {', '.join(names)}"
        )
    kwargs = {k: coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{cls.__name__}: {e}") from e


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping, with a clear error when the file is missing or not a mapping."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        raise ConfigError(f"{p}: malformed YAML at {where}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a YAML mapping at the top level")
    return data


def load_config(
    cls: type[T], path: str | os.PathLike | None = None, section: str | None = None, overrides: dict | None = None
) -> T:
    """Load ``cls`` from ``path`` (the ``section`` of a recipe if present, else the whole file), then overrides.

    Overrides are ``{"a.b": value}`` (dotted keys reach nested dataclasses); values may be strings.
    """
    data: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml(path)
        if section is not None and isinstance(raw.get(section), dict):
            data = dict(raw[section])
        elif section is not None and raw and not set(raw) & {f.name for f in dataclasses.fields(cls)}:
            raise ConfigError(f"{path}: no '{section}:' section and no {cls.__name__} keys (its top-level keys: "
                              f"{', '.join(sorted(map(str, raw)))}); add a '{section}:' section or pass the stage's "
                              "own file")
        else:
            data = raw
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    return from_dict(cls, data)


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {p} is not a mapping")
    node[parts[-1]] = value


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as a plain dict (for YAML dumps and model cards)."""
    return dataclasses.asdict(cfg)


def save_resolved(cfg: Any, out_dir: str | os.PathLike, name: str = "config.resolved.yaml") -> Path:
    """Write the resolved config next to a stage's output (atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / name
    with tempfile.NamedTemporaryFile("w", dir=out, delete=False, suffix=".tmp") as fh:
        yaml.safe_dump(to_dict(cfg), fh, sort_keys=False)
    os.replace(fh.name, target)
    return target
