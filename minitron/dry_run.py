"""``minitron run --dry-run``: validate a whole recipe without loading any weights.

Checks, for every stage: the stage config builds (no unknown keys, valid values); the teacher's config loads
(a local dir, a hub name, or, offline, ``configs/models/<name>/config.json`` shipped with the project); each
student's target shape is legal against the teacher (GQA grouping, no dimension grows) and its parameter count;
data sources resolve (local files; hub names are listed as unchecked when offline); align and eval recipe files
exist and parse. Prints one table and returns the findings as a dict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from minitron.config import ConfigError

SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"


def teacher_config(name: str) -> tuple[Any, str]:
    """The teacher's HF config and where it came from (local/hub, or the shipped copy when offline)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name), "model"
    except (OSError, ValueError) as e:
        shipped = SHIPPED_CONFIGS / Path(name).name.lower() / "config.json"
        if shipped.exists():
            return AutoConfig.from_pretrained(shipped.parent), f"shipped copy {shipped.relative_to(SHIPPED_CONFIGS.parents[1])}"
        raise ConfigError(f"cannot load the config of teacher {name!r} ({e}); give a local dir or a hub name") from e


def check_data(source: str) -> str:
    """'ok (N files)', or 'hub dataset (not checked offline)'; raises for a missing local path."""
    from minitron.data import resolve_files

    p = Path(source)
    if p.exists():
        return f"ok ({len(resolve_files(p, 'train'))} train files)"
    if source.startswith((".", "/")) or source.count("/") > 1:
        raise ConfigError(f"data source not found: {source}")
    return "hub dataset (not checked offline)"


def validate(cfg: Any) -> dict[str, Any]:
    """Validate a PipelineConfig; raise MinitronError on the first problem, else print and return a summary."""
    from minitron.adapters import Layout, get_adapter
    from minitron.pipeline import _file_section, _stage_config
    from minitron.prune import PruneConfig, resolve_target

    if not cfg.teacher_model:
        raise ConfigError("--dry-run validates recipes with a given teacher_model (the demo trains its own)")
    config, origin = teacher_config(cfg.teacher_model)
    get_adapter(config)  # unsupported architecture -> clear error
    src = Layout.from_config(config)
    findings: dict[str, Any] = {"teacher": {"name": cfg.teacher_model, "config": origin, "params": src.num_params()},
                                "data": {cfg.data: check_data(cfg.data)}, "students": {}}
    if cfg.correct is not None:
        _stage_config("minitron.correct:CorrectConfig", {"data": cfg.data}, cfg.correct, {"model": "x", "out": "x"})
    for name, target in cfg.students.items():
        pcfg = _stage_config("minitron.prune:PruneConfig", {"calib": cfg.data}, cfg.prune, target,
                             {"model": cfg.teacher_model, "out": "x"})
        tgt = resolve_target(pcfg, src).layout
        findings["students"][name] = {**{f: getattr(tgt, f) for f in ("hidden_size", "intermediate_size",
                                      "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "head_dim")},
                                      "params": tgt.num_params(), "vocab_size": src.vocab_size}
        _stage_config("minitron.distill:DistillConfig", {"data": cfg.data}, cfg.distill,
                      {"teacher": cfg.teacher_model, "student": "x", "out": "x"})
    for section, path, target in (("align", cfg.align_config, "align.pipeline:AlignConfig"),
                                  ("eval", cfg.eval_config, "evals.harness:EvalConfig")):
        if path is not None:
            if not Path(path).exists():
                raise ConfigError(f"{section}_config file not found: {path}")
            # a placeholder model dir with a config.json: the stage configs check paths, not weights
            placeholder = str(SHIPPED_CONFIGS / "llama-3.1-8b")
            model = placeholder if section == "align" else [placeholder]
            _stage_config(target, _file_section(path, section), getattr(cfg, section), {"model": model})
    _print(findings)
    return findings


def _print(findings: dict[str, Any]) -> None:
    t = findings["teacher"]
    table = Table(title=f"dry run: teacher {t['name']} ({t['params'] / 1e9:.2f}B params, config from {t['config']})")
    cols = ["student", "hidden", "mlp", "heads", "kv", "layers", "head_dim", "params"]
    for c in cols:
        table.add_column(c)
    for name, s in findings["students"].items():
        table.add_row(name, *(str(s[k]) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                  "num_key_value_heads", "num_hidden_layers", "head_dim")),
                      f"{s['params'] / 1e9:.2f}B")
    Console().print(table)
    Console().print(f"data: {findings['data']}  -- every stage config is valid")
