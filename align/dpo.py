"""Stage 3, direct preference optimisation: TRL's DPOTrainer against a frozen copy of the SFT model.

``loss_type`` picks the objective (``sigmoid`` = DPO, ``ipo``, ``robust``, ``hinge``..., or a list mixing several,
e.g. ``[sigmoid, sft]`` for an RPO-like NLL-regularised DPO). Metrics on held-out pairs: the policy's
chosen-minus-rejected log-probability margin before and after (it must rise), the implicit-reward margin
beta * (margin - reference margin) and its accuracy (share of pairs with a positive implicit margin).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from align.common import (StageContext, StageArgs, freeze, last_checkpoint, load_causal_lm, load_tokenizer,
                          measured_once, save_stage, train_history, trl_args)
from align.data import to_dataset
from align.lora import peft_config
from align.scoring import by_source, completion_logps, mean_se
from minitron.config import ConfigError, arg

# the losses TRL 1.16's DPOTrainer computes (it checks only at the first training step)
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


@dataclasses.dataclass
class DPOArgs(StageArgs):
    """DPO settings (``--dpo.beta 0.1 --dpo.loss-type ipo``)."""

    steps: int = arg(100, "optimizer steps (capped by --max-steps)")
    lr: float = arg(5e-5, "peak learning rate")
    batch_size: int = arg(8, "preference pairs per micro-batch")
    beta: float = arg(0.1, "strength of the KL anchor to the reference model")
    loss_type: list[str] = arg(["sigmoid"], "TRL loss(es): sigmoid (DPO), ipo, hinge, robust, sft (NLL, RPO-like)...")
    sources: list[str] = arg([], "train on the pairs of these preference sources only (file names without "
                                 "extensions, as in the report; [] = all); held-out pairs are measured for every source")
    constraint_pairs: int = arg(0, "pairs added from held-in single-turn SFT questions with IFEval-type constraints: "
                                   "chosen obeys them, rejected is the data's answer (as many more held out, from the "
                                   "SFT's held-out rows, as each preference source has; source format_constraints)")
    constraint_max_length: int = arg(0, "train only on format pairs of at most this many tokens (prompt + the "
                                        "longer answer); the held-out ones keep every length: short pairs train "
                                        "several times faster per step (0 = max_length)")

    def __post_init__(self):
        super().__post_init__()
        if self.constraint_pairs < 0:
            raise ConfigError(f"dpo.constraint_pairs must be >= 0 (got {self.constraint_pairs})")
        if self.constraint_max_length < 0:
            raise ConfigError(f"dpo.constraint_max_length must be >= 0 tokens (got {self.constraint_max_length}); "
                              "0 keeps every format pair that fits max_length")
        if self.beta <= 0:
            raise ConfigError(f"dpo.beta must be positive (got {self.beta})")
        unknown = [t for t in self.loss_type if t not in LOSS_TYPES]
        if unknown:
            raise ConfigError(f"dpo.loss_type: unknown loss {unknown}; valid: {', '.join(LOSS_TYPES)}")


def margins(model: Any, tok: Any, pairs: list[dict]) -> Any:
    """log p(chosen | prompt) - log p(rejected | prompt) per pair: [N]."""
    model.eval()
    return completion_logps(model, tok, pairs, "chosen") - completion_logps(model, tok, pairs, "rejected")


def margin_metrics(ref: list[float], after: Any, beta: float) -> dict[str, float]:
    """Held-out preference metrics of a policy trained from ``ref`` (the reference's margins, which were also the
    policy's before training): the log-prob margin before and after with standard errors, the paired gain's s.e.,
    the share of pairs preferred, and the implicit reward ``beta * (after - ref)`` (margin and accuracy)."""
    ref_t = after.new_tensor(ref)
    implicit = beta * (after - ref_t)
    return {"logp_margin_before": mean_se(ref_t)[0], "logp_margin": after.mean().item(),
            "logp_margin_se_before": mean_se(ref_t)[1], "logp_margin_se": mean_se(after)[1],
            "margin_gain_se": mean_se(after - ref_t)[1], "preferred_before": (ref_t > 0).float().mean().item(),
            "preferred": (after > 0).float().mean().item(), "preferred_se": mean_se((after > 0).float())[1],
            "reward_margin": implicit.mean().item(), "reward_accuracy": (implicit > 0).float().mean().item(),
            "reward_accuracy_se": mean_se((implicit > 0).float())[1], "eval_pairs": len(ref), "eval_n": len(ref)}


def held_out_metrics(ref: list[float], after: Any, beta: float, pairs: list[dict]) -> dict[str, Any]:
    """``margin_metrics`` over all held-out pairs, and per source (``by_source``) when they come from several."""
    split = by_source(pairs, lambda idx: margin_metrics([ref[i] for i in idx], after[idx], beta))
    return {**margin_metrics(ref, after, beta), **({"by_source": split} if split else {})}


def train(ctx: StageContext, args: DPOArgs, model_dir: str | Path, train_pairs: list[dict],
          eval_pairs: list[dict], data_stats: dict[str, Any]) -> Path:
    """DPO from ``model_dir`` (policy and reference) on ``train_pairs``; write ``OUT/dpo``."""
    from trl import DPOConfig, DPOTrainer

    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, tok)
    # Before training the policy is the reference, so these margins are also the reference's (for the implicit reward).
    ref = measured_once(ctx, "dpo", "margins", lambda: margins(model, tok, eval_pairs).tolist())
    freeze(model, args)
    config = trl_args(DPOConfig, args, ctx, "dpo", beta=args.beta, loss_type=list(args.loss_type))
    trainer = DPOTrainer(model=model, args=config, train_dataset=to_dataset(train_pairs), processing_class=tok,
                         peft_config=peft_config(ctx.lora), callbacks=ctx.callbacks or None)
    resume = last_checkpoint(ctx, "dpo")
    trainer.train(resume_from_checkpoint=resume)
    metrics = {"stage": "dpo", **held_out_metrics(ref, margins(trainer.model, tok, eval_pairs), args.beta, eval_pairs),
               "train_pairs": len(train_pairs), "steps": trainer.state.global_step, "resumed_from": resume,
               "data": data_stats, "history": train_history(trainer)}
    return save_stage(trainer.model, tok, ctx, "dpo", metrics, args, str(model_dir), "DPO model",
                      f"Direct preference optimisation (loss {args.loss_type}, beta {args.beta}) with TRL's DPOTrainer.")
