"""LoRA (peft) for every alignment stage: one option, adapters saved beside the merged model.

With ``lora.enabled`` each TRL trainer gets a ``peft.LoraConfig``; the trained adapter is written to
``OUT/<stage>/adapter/`` and merged into the base weights, so ``OUT/<stage>/`` stays a plain HF model directory
that the next stage (and vLLM) loads with no peft code. Full fine-tuning is the default for small models.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from minitron.config import ConfigError, arg

# Llama/Mistral/Qwen projection names; "all-linear" lets peft find them on other families.
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclasses.dataclass
class LoraArgs:
    """LoRA settings shared by all stages (``--lora.enabled true --lora.r 16``)."""

    enabled: bool = arg(False, "train LoRA adapters instead of all weights (merged into OUT/<stage> on export)")
    r: int = arg(16, "adapter rank")
    alpha: int = arg(32, "LoRA alpha (scale = alpha / r)")
    dropout: float = arg(0.0, "dropout on the adapter input")
    target_modules: list[str] = arg(DEFAULT_TARGETS, "module names to adapt ('all-linear' for every linear layer)")

    def __post_init__(self):
        if self.r <= 0 or self.alpha <= 0:
            raise ConfigError(f"lora.r and lora.alpha must be positive (got r={self.r}, alpha={self.alpha})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1) (got {self.dropout})")


def peft_config(args: LoraArgs, task_type: str = "CAUSAL_LM") -> Any:
    """A ``peft.LoraConfig`` for the trainers, or None when LoRA is off.

    ``task_type="SEQ_CLS"`` (reward model) also trains the new score head in full (``modules_to_save``).
    """
    if not args.enabled:
        return None
    from peft import LoraConfig

    targets: Any = "all-linear" if args.target_modules == ["all-linear"] else list(args.target_modules)
    return LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=targets,
                      task_type=task_type, modules_to_save=["score"] if task_type == "SEQ_CLS" else None)


def merge_for_export(model: Any, out_dir: Path) -> Any:
    """Save the adapter (if ``model`` is a PeftModel) under ``out_dir/adapter`` and return the merged model."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return model
    model.save_pretrained(out_dir / "adapter")
    return model.merge_and_unload()
