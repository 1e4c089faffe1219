"""Stage 1, supervised fine-tuning: TRL's SFTTrainer on chat conversations, loss on assistant turns only.

Each assistant turn of a conversation is one prompt/completion example (``align.data.to_sft_examples``), so
the loss covers replies and tool calls, never the user's text or the tool schemas. Metric: the held-out loss
before and after training (``eval_loss_before`` > ``eval_loss`` shows the stage worked).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from align.common import (StageContext, StageArgs, freeze, last_checkpoint, load_causal_lm, load_tokenizer,
                          measured_once, save_stage, train_history, trl_args)
from align.data import to_dataset
from align.lora import peft_config
from minitron.config import arg


@dataclasses.dataclass
class SFTArgs(StageArgs):
    """SFT settings (``--sft.steps 200 --sft.lr 1e-4``)."""

    steps: int = arg(200, "optimizer steps (capped by --max-steps)")
    lr: float = arg(3e-4, "peak learning rate")
    batch_size: int = arg(16, "conversations (assistant turns) per micro-batch")


def extend_context(config: Any, input_ids: list[list[int]], max_length: int) -> int:
    """Raise ``config.max_position_embeddings`` to ``max_length`` when SFT trained on longer sequences than it.

    A pretraining context shorter than the chat data (the demo's 512 against tool prompts of ~600 tokens) would
    make evaluators and vLLM cut the very prompts SFT taught; RoPE has no table to grow, so only the config moves.
    """
    longest = max((len(x) for x in input_ids), default=0)
    if longest > config.max_position_embeddings:
        config.max_position_embeddings = max_length
    return config.max_position_embeddings


def train(ctx: StageContext, args: SFTArgs, model_dir: str | Path, train_rows: list[dict],
          eval_rows: list[dict], data_stats: dict[str, Any]) -> Path:
    """Fine-tune ``model_dir`` on ``train_rows`` (prompt/completion examples); write ``OUT/sft``."""
    from trl import SFTConfig, SFTTrainer

    tok = load_tokenizer(model_dir)
    model = freeze(load_causal_lm(model_dir, tok), args)
    # Tool-schema conversations are ~5x longer than plain ones: batching by length saves most of the padding.
    config = trl_args(SFTConfig, args, ctx, "sft", completion_only_loss=True, packing=False,
                      train_sampling_strategy="group_by_length")
    trainer = SFTTrainer(model=model, args=config, train_dataset=to_dataset(train_rows),
                         eval_dataset=to_dataset(eval_rows), processing_class=tok,
                         peft_config=peft_config(ctx.lora), callbacks=ctx.callbacks or None)
    resume = last_checkpoint(ctx, "sft")
    before = measured_once(ctx, "sft", "eval_loss", lambda: trainer.evaluate()["eval_loss"])
    if trainer.accelerator.num_processes > 1:
        # transformers 5.19 + accelerate 1.15: evaluate() prepared the model for evaluation and marked it prepared,
        # so train() would not wrap it in DDP (each rank would train its own copy): clear the mark.
        trainer.model._is_accelerate_prepared = False
    trainer.train(resume_from_checkpoint=resume)
    after = trainer.evaluate()["eval_loss"]
    context = extend_context(trainer.model.config, trainer.train_dataset["input_ids"], ctx.max_length)
    metrics = {"stage": "sft", "eval_loss_before": before, "eval_loss": after, "max_position_embeddings": context,
               "train_examples": len(train_rows), "eval_examples": len(eval_rows), "eval_n": len(eval_rows),
               "steps": trainer.state.global_step, "resumed_from": resume, "data": data_stats,
               "history": train_history(trainer)}
    return save_stage(trainer.model, tok, ctx, "sft", metrics, args, str(model_dir), "SFT model",
                      "Supervised fine-tuning on chat data (assistant turns only) with TRL's SFTTrainer.")
