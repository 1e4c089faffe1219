"""Stage ``spin``, self-play fine-tuning (SPIN, Chen et al. 2024): iterated DPO of the SFT data's answers (chosen)
against the model's own answers to the same prompts (rejected), with TRL's DPOTrainer.

Each of ``iterations`` rounds samples one answer per held-in SFT prompt from the current model, then trains DPO on
(data answer, own answer) pairs against a frozen copy of that round's starting model (the reference); the next
round starts from the result. A round's pairs are cached in ``OUT/.work/spin/before.json`` and its TRL checkpoints
live in ``OUT/.work/spin/iter-K/``; a finished round's model is kept in ``OUT/.work/spin/iter-K/model`` until the
stage ends, so an interrupted run resumes in the round (and at the step) where it stopped.

Metrics on held-out SFT examples, before and after, with standard errors: the teacher-forced loss (mean token NLL
of the data's answers) and SPIN's own margin, log p(data answer) - log p(the starting model's sample) per prompt
(the samples are drawn once, before training). With ``baseline: true`` plain SFT from the same model on the same
prompts' data answers, with ``iterations x steps`` steps (equal compute in optimizer steps), is measured the same way.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import torch

from align.common import (StageContext, StageArgs, freeze, last_checkpoint, load_causal_lm, load_tokenizer,
                          measured_once, prepare_model, save_stage, train_history, trl_args)
from align.data import to_dataset
from align.lora import merge_for_export, peft_config
from align.opd import answer_nll, plain
from align.scoring import completion_logps, mean_se, sample
from minitron.config import ConfigError, MinitronError, arg
from minitron.io import atomic_dir, is_model_dir


@dataclasses.dataclass
class SPINArgs(StageArgs):
    """SPIN settings (``--spin.iterations 3 --spin.beta 0.1``)."""

    iterations: int = arg(2, "self-play rounds: sample own answers, then DPO against them")
    steps: int = arg(50, "DPO optimizer steps per round (capped by --max-steps)")
    lr: float = arg(5e-5, "peak learning rate")
    batch_size: int = arg(8, "pairs per micro-batch")
    beta: float = arg(0.1, "DPO strength of the KL anchor to the round's starting model")
    prompts: int = arg(256, "held-in SFT examples per round (the first N of the shuffled ones; tool examples are "
                            "left out)")
    max_new_tokens: int = arg(48, "tokens per self-generated (rejected) answer")
    temperature: float = arg(1.0, "sampling temperature of the self-generated answers (0 = greedy)")
    eval_prompts: int = arg(32, "held-out SFT examples for the before/after loss and margin")
    baseline: bool = arg(False, "also train and measure plain SFT on the same examples for iterations x steps steps "
                                "(not saved)")

    def __post_init__(self):
        super().__post_init__()
        if self.iterations < 1 or self.prompts < 1 or self.eval_prompts < 1 or self.max_new_tokens < 1:
            raise ConfigError("spin.iterations, spin.prompts, spin.eval_prompts and spin.max_new_tokens must be >= 1")
        if self.beta <= 0 or self.temperature < 0:
            raise ConfigError(f"spin.beta must be positive and spin.temperature >= 0 (got {self.beta}, "
                              f"{self.temperature})")


def own_answers(model: Any, tok: Any, examples: list[dict], args: SPINArgs, seed: int) -> list[dict]:
    """SPIN pairs: the data's answer (chosen) against one of the model's own (rejected), per example."""
    out = sample(model.eval(), tok, [ex["prompt"] for ex in examples], args.max_new_tokens, seed, args.temperature,
                 batch_size=16)
    return [{"prompt": ex["prompt"], "chosen": ex["completion"],
             "rejected": [{"role": "assistant", "content": s["text"]}]} for ex, s in zip(examples, out)]


def measure(model: Any, tok: Any, held_pairs: list[dict]) -> dict[str, float]:
    """Teacher-forced loss on the held-out answers and the SPIN margin against the starting model's samples."""
    model.eval()
    nll, nll_se = mean_se(answer_nll(model, tok, [{"prompt": p["prompt"], "completion": p["chosen"]}
                                                 for p in held_pairs]))
    margin = completion_logps(model, tok, held_pairs, "chosen") - completion_logps(model, tok, held_pairs, "rejected")
    m, m_se = mean_se(margin)
    return {"loss": nll, "loss_se": nll_se, "margin": m, "margin_se": m_se,
            "preferred": (margin > 0).float().mean().item(), "margins": margin.tolist()}


def _round(ctx: StageContext, args: SPINArgs, k: int, start: Path, tok: Any, examples: list[dict],
           resume: str | None) -> Any:
    """Round ``k``: own answers of the model at ``start``, then DPO against them; the trainer after training."""
    from trl import DPOConfig, DPOTrainer

    model = load_causal_lm(start, tok)
    pairs = measured_once(ctx, "spin", f"pairs-{k}", lambda: own_answers(model, tok, examples, args, ctx.seed + k))
    freeze(model.train(), args)
    name = f"spin/iter-{k}"  # its own work dir: checkpoints of round k resume only round k
    config = trl_args(DPOConfig, args, ctx, name, beta=args.beta, loss_type=["sigmoid"])
    trainer = DPOTrainer(model=model, args=config, train_dataset=to_dataset(pairs), processing_class=tok,
                         peft_config=peft_config(ctx.lora), callbacks=ctx.callbacks or None)
    trainer.train(resume_from_checkpoint=resume)
    # a pair whose own answer equals the data's gives DPO no gradient: the share says how much the round could learn
    trainer.same_share = sum(str(p["chosen"][-1].get("content")).strip() == p["rejected"][0]["content"]
                             for p in pairs) / len(pairs)
    return trainer


def _keep_round(ctx: StageContext, k: int, model: Any, tok: Any) -> Path:
    """Save round ``k``'s model (LoRA merged) as the next round's start; drop its checkpoints."""
    work = ctx.work_dir(f"spin/iter-{k}")
    with atomic_dir(work / "model") as tmp:
        model = prepare_model(merge_for_export(model, tmp), tok)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    for ckpt in work.glob("checkpoint-*"):
        shutil.rmtree(ckpt, ignore_errors=True)
    return work / "model"


def _baseline(ctx: StageContext, args: SPINArgs, model_dir: str | Path, examples: list[dict],
              held_pairs: list[dict]) -> dict[str, float]:
    """Plain SFT from ``model_dir`` on the examples' data answers for iterations x steps steps, measured alike."""
    from trl import SFTConfig, SFTTrainer

    tok = load_tokenizer(model_dir)
    model = freeze(load_causal_lm(model_dir, tok), args)
    work = ctx.work_dir("spin") / "baseline"
    config = trl_args(SFTConfig, args, ctx, "spin", completion_only_loss=True, packing=False, output_dir=str(work),
                      save_strategy="no", max_steps=args.iterations * ctx.steps(args))
    trainer = SFTTrainer(model=model, args=config, processing_class=tok, peft_config=peft_config(ctx.lora),
                         train_dataset=to_dataset([{"prompt": ex["prompt"], "completion": ex["completion"]}
                                                   for ex in examples]))
    trainer.train()
    shutil.rmtree(work, ignore_errors=True)
    return measure(trainer.model, tok, held_pairs)


def train(ctx: StageContext, args: SPINArgs, model_dir: str | Path, train_rows: list[dict], held_rows: list[dict],
          data_stats: dict[str, Any]) -> Path:
    """``iterations`` rounds of SPIN from ``model_dir`` on held-in SFT examples; write ``OUT/spin``."""
    tok = load_tokenizer(model_dir)
    examples, held = plain(train_rows, args.prompts), plain(held_rows, args.eval_prompts)
    if not examples or not held:
        raise MinitronError("spin: no SFT example without tools to train or measure on")
    start = load_causal_lm(model_dir, tok)
    held_pairs = measured_once(ctx, "spin", "heldout_pairs", lambda: own_answers(start, tok, held, args, ctx.seed))
    before = measured_once(ctx, "spin", "heldout", lambda: measure(start, tok, held_pairs))
    del start
    current, rounds, resumed = Path(model_dir), [], []
    for k in range(1, args.iterations + 1):
        kept = ctx.work_dir(f"spin/iter-{k}") / "model"
        if k < args.iterations and is_model_dir(kept):  # a finished round of an interrupted run
            print(f"[spin] round {k} finished earlier: starting round {k + 1} from {kept}")
            current = kept
            continue
        resumed.append(last_checkpoint(ctx, f"spin/iter-{k}"))
        trainer = _round(ctx, args, k, current, tok, examples, resumed[-1])
        rounds.append({"round": k, "steps": trainer.state.global_step, "own_equals_data": trainer.same_share,
                       "history": train_history(trainer)})
        if k < args.iterations:
            current = _keep_round(ctx, k, trainer.model, tok)
    after = measure(trainer.model, tok, held_pairs)
    se = lambda k: (before[f"{k}_se"] ** 2 + after[f"{k}_se"] ** 2) ** 0.5  # noqa: E731
    metrics = {"stage": "spin", "iterations": args.iterations, "beta": args.beta,
               "eval_loss_before": before["loss"], "eval_loss": after["loss"], "eval_loss_se_before": before["loss_se"],
               "eval_loss_se": after["loss_se"], "loss_drop_in_se": (before["loss"] - after["loss"]) / max(1e-9, se("loss")),
               "self_margin_before": before["margin"], "self_margin": after["margin"],
               "self_margin_se_before": before["margin_se"], "self_margin_se": after["margin_se"],
               "self_margin_gain_se": mean_se(torch.tensor(after["margins"]) - torch.tensor(before["margins"]))[1],
               "preferred_before": before["preferred"], "preferred": after["preferred"],
               "train_examples": len(examples), "eval_n": len(held), "steps": trainer.state.global_step,
               "total_steps": args.iterations * ctx.steps(args), "rounds": rounds, "resumed_from": next((r for r in resumed if r), None),
               "data": data_stats, "history": [h for r in rounds for h in r["history"]]}
    if args.baseline:
        base = _baseline(ctx, args, model_dir, examples, held_pairs)
        metrics.update(baseline_sft_eval_loss=base["loss"], baseline_sft_eval_loss_se=base["loss_se"],
                       baseline_sft_self_margin=base["margin"], baseline_sft_self_margin_se=base["margin_se"])
    return save_stage(trainer.model, tok, ctx, "spin", metrics, args, str(model_dir), "SPIN model",
                      f"Self-play fine-tuning: {args.iterations} rounds of DPO (beta {args.beta}, TRL's DPOTrainer) "
                      "of the SFT data's answers against the model's own.")
