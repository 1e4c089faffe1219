"""Stage 2, reward model: TRL's RewardTrainer on preference pairs (Bradley-Terry loss).

The reward model starts from the SFT model (``--rm.init sft``, NeMo-Aligner's recipe) or from the model before any
stage (``--rm.init base``) with a fresh scalar head (``AutoModelForSequenceClassification``,
``num_labels=1``) and scores whole conversations rendered by the chat template. Metric: pairwise accuracy
(share of held-out pairs with r(chosen) > r(rejected)) and mean margin, before (random head, ~chance) and after.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from align.common import (StageContext, StageArgs, freeze, last_checkpoint, load_tokenizer, measured_once,
                          save_stage, train_history, trl_args)
from align.data import to_dataset
from align.lora import peft_config
from align.scoring import pairwise_accuracy
from minitron.config import ConfigError, arg


@dataclasses.dataclass
class RMArgs(StageArgs):
    """Reward-model settings (``--rm.steps 150``)."""

    steps: int = arg(150, "optimizer steps (capped by --max-steps)")
    lr: float = arg(2e-4, "peak learning rate")
    batch_size: int = arg(16, "preference pairs per micro-batch")
    center_rewards: float | None = arg(0.01, "penalty on the mean reward squared (keeps scores centred at 0)")
    init: str = arg("sft", "what the RM starts from: sft (the SFT output, else the model) or base (the model)")
    sources: list[str] = arg([], "train on the pairs of these preference sources only (file names without "
                                 "extensions, as in the report; [] = all); held-out pairs are measured for every source")

    def __post_init__(self):
        super().__post_init__()
        if self.init not in ("sft", "base"):
            raise ConfigError(f"rm.init must be sft or base (got {self.init!r})")


def load_reward_model(path: str | Path, tok: Any) -> Any:
    """A sequence classifier with one output on top of a causal LM directory (or a saved reward model)."""
    from transformers import AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=torch.float32)
    if rm.get_input_embeddings().weight.shape[0] < len(tok):
        rm.resize_token_embeddings(len(tok))
    rm.config.pad_token_id = tok.pad_token_id  # the score is read at the last non-pad token
    return rm


def train(ctx: StageContext, args: RMArgs, model_dir: str | Path, train_pairs: list[dict],
          eval_pairs: list[dict], data_stats: dict[str, Any]) -> Path:
    """Train a reward model from ``model_dir`` on ``train_pairs``; write ``OUT/rm``."""
    from trl import RewardConfig, RewardTrainer

    tok = load_tokenizer(model_dir)
    rm = load_reward_model(model_dir, tok)
    before = measured_once(ctx, "rm", "pairwise", lambda: pairwise_accuracy(rm.eval(), tok, eval_pairs))
    freeze(rm, args)
    config = trl_args(RewardConfig, args, ctx, "rm", center_rewards_coefficient=args.center_rewards)
    trainer = RewardTrainer(model=rm, args=config, train_dataset=to_dataset(train_pairs), processing_class=tok,
                            peft_config=peft_config(ctx.lora, "SEQ_CLS"), callbacks=ctx.callbacks or None)
    resume = last_checkpoint(ctx, "rm")
    trainer.train(resume_from_checkpoint=resume)
    after = pairwise_accuracy(trainer.model.eval(), tok, eval_pairs)
    metrics = {"stage": "rm", "accuracy_before": before["accuracy"], "accuracy": after["accuracy"],
               "accuracy_se": after["accuracy_se"], "margin_before": before["margin"], "margin": after["margin"],
               "margin_se": after["margin_se"], "train_pairs": len(train_pairs),
               "eval_pairs": len(eval_pairs), "eval_n": len(eval_pairs), "steps": trainer.state.global_step, "resumed_from": resume,
               "data": data_stats, "history": train_history(trainer)}
    if "by_source" in after:  # held-out pairs of several sources: each on its own
        was = before.get("by_source", {})  # a cached "before" of an older run may have none
        metrics["by_source"] = {
            name: {"accuracy_before": was.get(name, {}).get("accuracy"), "accuracy": a["accuracy"],
                   "accuracy_se": a["accuracy_se"], "margin": a["margin"], "eval_n": a["n"]}
            for name, a in after["by_source"].items()}
    return save_stage(trainer.model, tok, ctx, "rm", metrics, args, str(model_dir), "Reward model",
                      "Bradley-Terry reward model (sequence classifier, one score) trained with TRL's RewardTrainer.")
