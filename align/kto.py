"""Stage ``kto``, Kahneman-Tversky optimisation: TRL's KTOTrainer on unpaired good/bad answers.

KTO needs no pairs, only answers labelled desirable or not; here each preference pair gives one of each (its
chosen answer labelled good, its rejected one bad), shuffled so that a batch mixes prompts and labels (TRL
estimates KTO's KL term from the completions of a batch rotated by one, so its sampler must stay sequential).
It starts from the SFT model, like DPO, so the two can be compared. Metrics on the held-out pairs, as DPO's: the
policy's chosen-minus-rejected log-prob margin before and after (it must rise), with standard errors, and the
implicit-reward margin beta * (margin - reference margin) with its accuracy.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

from align.common import (StageContext, StageArgs, freeze, last_checkpoint, load_causal_lm, load_tokenizer,
                          measured_once, save_stage, train_history, trl_args)
from align.data import to_dataset
from align.dpo import held_out_metrics, margins
from align.lora import peft_config
from minitron.config import ConfigError, arg

LOSS_TYPES = ("kto", "apo_zero_unpaired")  # TRL 1.16's KTOConfig choices


@dataclasses.dataclass
class KTOArgs(StageArgs):
    """KTO settings (``--kto.beta 0.1 --kto.undesirable-weight 1.0``)."""

    steps: int = arg(100, "optimizer steps (capped by --max-steps)")
    lr: float = arg(5e-5, "peak learning rate")
    batch_size: int = arg(8, "labelled answers per micro-batch (> 1: KTO's KL term is estimated within a batch)")
    beta: float = arg(0.1, "strength of the KL anchor to the reference model")
    loss_type: str = arg("kto", "TRL loss: kto, or apo_zero_unpaired")
    desirable_weight: float = arg(1.0, "weight of the losses of good answers")
    undesirable_weight: float = arg(1.0, "weight of the losses of bad answers")

    def __post_init__(self):
        super().__post_init__()
        if self.beta <= 0 or self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise ConfigError("kto.beta, kto.desirable_weight and kto.undesirable_weight must be positive")
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"kto.loss_type must be one of {', '.join(LOSS_TYPES)} (got {self.loss_type!r})")
        if self.batch_size < 2 and self.loss_type == "kto":
            raise ConfigError("kto.batch_size must be >= 2: KTO estimates its KL term from the other answers of a "
                              "micro-batch")


def unpair(pairs: list[dict], seed: int) -> list[dict]:
    """Each pair -> a desirable (chosen, ``label`` True) and an undesirable (rejected, False) example, shuffled."""
    rows = [{"prompt": p["prompt"], "completion": p[key], "label": key == "chosen"}
            for p in pairs for key in ("chosen", "rejected")]
    random.Random(seed).shuffle(rows)
    return rows


def train(ctx: StageContext, args: KTOArgs, model_dir: str | Path, train_pairs: list[dict],
          eval_pairs: list[dict], data_stats: dict[str, Any]) -> Path:
    """KTO from ``model_dir`` (policy and reference) on ``train_pairs`` split into labelled answers; write ``OUT/kto``."""
    from trl import KTOConfig, KTOTrainer

    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, tok)
    # Before training the policy is the reference, so these margins are also the reference's (for the implicit reward).
    ref = measured_once(ctx, "kto", "margins", lambda: margins(model, tok, eval_pairs).tolist())
    freeze(model, args)
    rows = unpair(train_pairs, ctx.seed)
    config = trl_args(KTOConfig, args, ctx, "kto", beta=args.beta, loss_type=args.loss_type,
                      desirable_weight=args.desirable_weight, undesirable_weight=args.undesirable_weight)
    trainer = KTOTrainer(model=model, args=config, train_dataset=to_dataset(rows), processing_class=tok,
                         peft_config=peft_config(ctx.lora), callbacks=ctx.callbacks or None)
    resume = last_checkpoint(ctx, "kto")
    trainer.train(resume_from_checkpoint=resume)
    metrics = {"stage": "kto", "loss_type": args.loss_type,
               **held_out_metrics(ref, margins(trainer.model, tok, eval_pairs), args.beta, eval_pairs),
               "train_pairs": len(train_pairs), "train_examples": len(rows), "desirable": sum(r["label"] for r in rows),
               "steps": trainer.state.global_step, "resumed_from": resume, "data": data_stats,
               "history": train_history(trainer)}
    return save_stage(trainer.model, tok, ctx, "kto", metrics, args, str(model_dir), "KTO model",
                      f"Kahneman-Tversky optimisation (loss {args.loss_type}, beta {args.beta}) with TRL's KTOTrainer "
                      "on the preference pairs split into desirable and undesirable answers.")
