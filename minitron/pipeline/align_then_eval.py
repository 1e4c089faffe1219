"""``minitron align``: the alignment stages (``align.pipeline``), then, with ``eval_suite``, the eval harness on the
base model and every stage output. It lives in the orchestration layer because ``align`` does not import ``evals``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from align.pipeline import AlignConfig
from align.pipeline import run as run_align
from minitron.model_source import resolve_model


def evaluator(cfg: AlignConfig) -> Callable[[list[Path]], Any]:
    """models -> eval results for ``cfg.eval_suite``; the suite is checked now, before any training."""
    from evals.harness import EvalConfig
    from evals.harness import run as run_harness

    def config(models: list[Path]) -> EvalConfig:
        return EvalConfig(model=[str(m) for m in models], suite=cfg.eval_suite, out=str(Path(cfg.out) / "evals"),
                          limit=cfg.eval_limit)

    config([resolve_model(cfg.model)])  # an unknown task is refused here, not after the training
    return lambda models: run_harness(config(models))


def run(cfg: AlignConfig) -> Path:
    """Align, then evaluate when ``eval_suite`` is set."""
    return run_align(cfg, evaluator(cfg) if cfg.eval_suite else None)
