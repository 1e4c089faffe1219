"""A whole recipe checked before any work: ``minitron run`` calls ``check`` before its first stage, and
``minitron run --dry-run`` stops there and prints the students' shapes. No weights are loaded.

Checks, for every stage: the stage config builds (no unknown keys, valid values); the teacher's config loads
(a local dir, a hub name, or, offline, ``configs/models/<name>/config.json`` shipped with the project); each
student's target shape is legal against the teacher (GQA grouping, no dimension grows) and its parameter count;
data sources resolve (local files; hub names are listed as unchecked when offline); align and eval recipe files
exist and parse; named eval runs and the report build; the alignment guard has only known keys. Any error names
the recipe section, the key and the valid keys or values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from minitron.config import ConfigError

SHIPPED_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "models"


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


def demo_teacher_config(tcfg: Any) -> Any:
    """The HF config of the teacher the ``teacher:`` section will train (for checking prune targets up front)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=tcfg.vocab_size, hidden_size=tcfg.hidden_size, intermediate_size=tcfg.intermediate_size,
                       num_hidden_layers=tcfg.num_hidden_layers, num_attention_heads=tcfg.num_attention_heads,
                       num_key_value_heads=tcfg.num_key_value_heads, head_dim=tcfg.head_dim,
                       tie_word_embeddings=tcfg.tie_word_embeddings)


def _build(section: str, target: str, *dicts: dict | None) -> Any:
    """One stage's typed config; an error names the recipe section."""
    from minitron.pipeline.recipe import _stage_config

    try:
        return _stage_config(target, *dicts)
    except ConfigError as e:
        raise ConfigError(f"recipe section {section!r}: {e}") from None


def _known_keys(section: str, values: dict, cls: type) -> None:
    import dataclasses

    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in valid]
    if unknown:
        raise ConfigError(f"recipe section {section!r}: unknown config key {unknown[0]} for {cls.__name__}; "
                          f"valid keys: {', '.join(valid)}")


def check(cfg: Any, load_teacher: bool = True) -> dict[str, Any]:
    """Every stage's typed config, data source, model source and prune target of a PipelineConfig, before any
    work; raises ConfigError (naming the section) on the first problem, else returns the findings."""
    from minitron.adapters import Layout, get_adapter
    from minitron.pipeline.recipe import _file_section
    from minitron.prune import resolve_target

    x = "<checked later>"  # stands for paths that earlier stages create
    data = x if cfg.data == "world" else cfg.data
    if cfg.data == "world":
        _build("world", "minitron.world:WorldConfig", cfg.world, {"out": x})
    if cfg.teacher_model:
        if load_teacher:  # a run: the source must resolve now (a dry run also accepts the shipped config copies)
            from minitron.model_source import resolve_model

            resolve_model(cfg.teacher_model, "teacher_model")
        config, origin = teacher_config(cfg.teacher_model)
    else:
        config = demo_teacher_config(_build("teacher", "minitron.teacher:TeacherConfig", cfg.teacher, {"out": x}))
        origin = "the teacher section"
    get_adapter(config)  # unsupported architecture -> clear error
    src = Layout.from_config(config)
    findings: dict[str, Any] = {"teacher": {"name": cfg.teacher_model or "trained (teacher section)", "config": origin,
                                            "params": src.num_params()},
                                "data": {cfg.data: check_data(cfg.data) if cfg.data != "world" else "demo world"},
                                "students": {}}
    if cfg.mix is not None:
        mix = _build("mix", "minitron.mixture:MixConfig", {"text": data}, cfg.mix, {"model": x, "out": x})
        for source in mix.chat:
            findings["data"][source] = check_data(source)
    if cfg.correct is not None:
        _build("correct", "minitron.lm_train:LMTrainConfig", {"data": data}, cfg.correct, {"model": x, "out": x})
    from minitron.prune import PruneConfig

    _known_keys("prune", cfg.prune, PruneConfig)  # shared by every student: name this section, not a student's
    layouts = {}
    rounds = [(cfg.students, cfg.prune, cfg.distill, None)] + [
        (r.get("students", {}), {**cfg.prune, **r.get("prune", {})}, {**cfg.distill, **r.get("distill", {})},
         r.get("teacher_from", cfg.align_student)) for r in cfg.rounds]
    for i, (students, prune, distill, teacher_from) in enumerate(rounds):
        where = "students" if i == 0 else f"rounds[{i - 1}]"
        if teacher_from is not None and teacher_from not in layouts:
            raise ConfigError(f"recipe section {where!r}: teacher_from={teacher_from!r} is not a student of an earlier "
                              f"round ({sorted(layouts)})")
        source = src if teacher_from is None else layouts[teacher_from]
        for name, target in students.items():
            pcfg = _build(f"{where}.{name}", "minitron.prune:PruneConfig", {"calib": data}, prune, target,
                          {"model": x, "out": x})
            tgt = resolve_target(pcfg, source).layout
            layouts[name] = tgt
            findings["students"][name if i == 0 else f"r{i + 1}-{name}"] = {
                **{f: getattr(tgt, f) for f in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                "num_key_value_heads", "num_hidden_layers", "head_dim")},
                "params": tgt.num_params(), "vocab_size": src.vocab_size}
            _build("distill", "minitron.distill:DistillConfig", {"data": data}, distill,
                   {"teacher": x, "student": x, "out": x})
    for section in ("finetune", "scratch"):
        overrides = dict(getattr(cfg, section) or {})
        overrides.pop("students", None)
        if getattr(cfg, section) is not None:
            _build(section, "minitron.lm_train:LMTrainConfig", {"data": data}, overrides, {"model": x, "out": x})
    placeholder = str(SHIPPED_CONFIGS / "llama-3.1-8b")  # a model dir with a config.json: configs check paths
    for section, path, target in (("align", cfg.align_config, "align.pipeline:AlignConfig"),
                                  ("eval", cfg.eval_config, "evals.harness:EvalConfig")):
        if path is not None:
            if not Path(path).exists():
                raise ConfigError(f"{section}_config file not found: {path}")
            model = placeholder if section == "align" else [placeholder]
            _build(section, target, _file_section(path, section), getattr(cfg, section), {"model": model})
    for name, spec in cfg.evals.items():
        spec = dict(spec)
        file = spec.pop("config", None)
        spec.pop("models", None)
        if file is not None and not Path(file).exists():
            raise ConfigError(f"recipe section 'evals.{name}': config file not found: {file}")
        _build(f"evals.{name}", "evals.harness:EvalConfig", _file_section(file, "eval"), cfg.eval, spec,
               {"model": [placeholder]})
    unknown = set(cfg.align_guard) - {"baseline", "must_beat", "must_hold"}
    if unknown:
        raise ConfigError(f"recipe section 'align_guard': unknown key(s) {sorted(unknown)}; valid keys: baseline, "
                          "must_beat, must_hold")
    if cfg.report:
        _build("report", "minitron.pipeline.report:ReportConfig", cfg.report)
    return findings


def validate(cfg: Any) -> dict[str, Any]:
    """``--dry-run``: check the recipe without loading weights, print the student table, return the findings."""
    findings = check(cfg, load_teacher=False)
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
