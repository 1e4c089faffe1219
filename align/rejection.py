"""Stage ``rs``, rejection sampling (best-of-n): the policy samples ``n`` answers to each held-in prompt, the trained
reward model (``OUT/rm``) picks the best, and TRL's SFTTrainer fine-tunes the policy on the winners.

This is NeMo-Aligner's rejection-sampling recipe as one round. Winners are taken among the answers that ended
with a stop token (an answer cut at ``max_new_tokens`` wins only when all ``n`` were cut); they are cached in
``OUT/.work/rs/before.json``, so a resumed run trains on the same ones. Metrics on held-out prompts: the mean RM
reward of sampled answers before and after, with standard errors; on the held-in prompts, the mean reward of the
winners against that of all samples (what selection gained). With ``baseline: true`` a plain SFT from the same
model on the data's chosen answers to the same prompts, with the same steps, is measured the same way.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

from align.common import (StageContext, StageArgs, freeze, last_checkpoint, load_causal_lm, load_tokenizer,
                          measured_once, save_stage, train_history, trl_args)
from align.data import to_dataset
from align.lora import peft_config
from align.reward import load_reward_model
from align.scoring import mean_reward, mean_se, reward_change, sample, sample_scores
from minitron.config import ConfigError, arg


@dataclasses.dataclass
class RSArgs(StageArgs):
    """Rejection-sampling settings (``--rs.n 8 --rs.prompts 512``)."""

    steps: int = arg(100, "SFT optimizer steps on the winners (capped by --max-steps)")
    lr: float = arg(1e-4, "peak learning rate")
    batch_size: int = arg(16, "winning answers per micro-batch")
    prompts: int = arg(256, "held-in preference prompts to sample for (the first N of the shuffled training pairs)")
    n: int = arg(4, "answers sampled per prompt; the reward model keeps the best")
    max_new_tokens: int = arg(48, "tokens per sampled answer")
    temperature: float = arg(1.0, "sampling temperature")
    eval_prompts: int = arg(32, "held-out prompts for the before/after mean reward")
    baseline: bool = arg(False, "also train and measure plain SFT on the data's chosen answers to the same prompts "
                                "(same steps; not saved)")

    def __post_init__(self):
        super().__post_init__()
        if self.n < 2 or self.prompts < 1 or self.eval_prompts < 1 or self.max_new_tokens < 1:
            raise ConfigError("rs.n must be >= 2, and rs.prompts, rs.eval_prompts, rs.max_new_tokens >= 1")
        if self.temperature <= 0:
            raise ConfigError(f"rs.temperature must be positive: best-of-n needs different samples "
                              f"(got {self.temperature})")


def _measure(policy: Any, tok: Any, rm: Any, rm_tok: Any, prompts: list, args: RSArgs, seed: int) -> dict:
    """Mean RM reward (and s.e.) of one sampled answer per held-out prompt."""
    samples = sample(policy.eval(), tok, prompts, args.max_new_tokens, seed, args.temperature)
    return {**mean_reward(rm, rm_tok, samples),
            "length": sum(len(s["completion_ids"]) for s in samples) / len(samples), "example": samples[0]["text"][:200]}


def best_of_n(policy: Any, tok: Any, rm: Any, rm_tok: Any, prompts: list, args: RSArgs, seed: int) -> dict:
    """``n`` samples per prompt, scored by the RM; the best (among those that stopped) per prompt as SFT rows."""
    many = sample(policy.eval(), tok, [p for p in prompts for _ in range(args.n)], args.max_new_tokens, seed + 1,
                  args.temperature, batch_size=32)
    scores = sample_scores(rm, rm_tok, many)
    rows, cut = [], 0
    for i, prompt in enumerate(prompts):
        group = list(range(i * args.n, (i + 1) * args.n))
        pool = [j for j in group if many[j]["stopped"] and many[j]["text"]] or group
        best = max(pool, key=lambda j: scores[j].item())
        cut += not many[best]["stopped"]
        rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": many[best]["text"]}],
                     "reward": scores[best].item()})
    return {"rows": rows, "all_reward": mean_se(scores), "cut_winners": cut,
            "winner_reward": mean_se(scores.new_tensor([r["reward"] for r in rows]))}


def _sft_trainer(model: Any, tok: Any, args: RSArgs, ctx: StageContext, rows: list[dict], **extra: Any) -> Any:
    from trl import SFTConfig, SFTTrainer

    config = trl_args(SFTConfig, args, ctx, "rs", completion_only_loss=True, packing=False,
                      train_sampling_strategy="group_by_length", **extra)
    return SFTTrainer(model=model, args=config, train_dataset=to_dataset(rows), processing_class=tok,
                      peft_config=peft_config(ctx.lora), callbacks=ctx.callbacks or None)


def _baseline(ctx: StageContext, args: RSArgs, model_dir: str | Path, pairs: list[dict], rm: Any, rm_tok: Any,
              eval_prompts: list) -> dict:
    """Plain SFT from ``model_dir`` on the chosen answers of ``pairs`` (same steps), measured like the stage."""
    tok = load_tokenizer(model_dir)
    model = freeze(load_causal_lm(model_dir, tok), args)
    rows = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs]
    work = ctx.work_dir("rs") / "baseline"
    trainer = _sft_trainer(model, tok, args, ctx, rows, output_dir=str(work), save_strategy="no")
    trainer.train()
    shutil.rmtree(work, ignore_errors=True)
    return _measure(trainer.model, tok, rm, rm_tok, eval_prompts, args, ctx.seed)


def train(ctx: StageContext, args: RSArgs, model_dir: str | Path, rm_dir: str | Path, train_pairs: list[dict],
          eval_prompts: list[list[dict]], data_stats: dict[str, Any]) -> Path:
    """Best-of-n from ``model_dir`` scored by ``rm_dir`` on the prompts of ``train_pairs``, then SFT; write ``OUT/rs``."""
    tok, rm_tok = load_tokenizer(model_dir), load_tokenizer(rm_dir)
    policy, rm = load_causal_lm(model_dir, tok), load_reward_model(rm_dir, rm_tok).eval()
    pairs = train_pairs[: args.prompts]
    before = measured_once(ctx, "rs", "sampled", lambda: _measure(policy, tok, rm, rm_tok, eval_prompts, args, ctx.seed))
    picked = measured_once(ctx, "rs", "winners", lambda: best_of_n(policy, tok, rm, rm_tok, [p["prompt"] for p in pairs],
                                                                   args, ctx.seed))
    rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in picked["rows"]]
    trainer = _sft_trainer(freeze(policy.train(), args), tok, args, ctx, rows)
    resume = last_checkpoint(ctx, "rs")
    trainer.train(resume_from_checkpoint=resume)
    after = _measure(trainer.model, tok, rm, rm_tok, eval_prompts, args, ctx.seed)
    metrics = {"stage": "rs", "reward_before": before["reward"], "reward": after["reward"],
               "reward_se_before": before["reward_se"], "reward_se": after["reward_se"],
               **reward_change(before, after),
               "sampled_reward_heldin": picked["all_reward"][0], "winner_reward_heldin": picked["winner_reward"][0],
               "cut_winners": picked["cut_winners"], "n": args.n, "prompts": len(pairs),
               "length_before": before["length"], "length": after["length"],
               "example_before": before["example"], "example": after["example"],
               "eval_prompts": len(eval_prompts), "eval_n": len(eval_prompts), "steps": trainer.state.global_step,
               "resumed_from": resume, "data": data_stats, "history": train_history(trainer)}
    if args.baseline:
        base = _baseline(ctx, args, model_dir, pairs, rm, rm_tok, eval_prompts)
        metrics.update(baseline_sft_reward=base["reward"], baseline_sft_reward_se=base["reward_se"])
        vs = reward_change(base, after)  # rejection sampling against plain SFT, paired over the held-out prompts
        metrics.update(gain_over_baseline=vs["reward_gain"], gain_over_baseline_se=vs["reward_gain_se"])
    return save_stage(trainer.model, tok, ctx, "rs", metrics, args, str(model_dir), "Rejection-sampling model",
                      f"Best-of-{args.n} rejection sampling with the reward model {rm_dir}, then SFT on the "
                      "winners with TRL's SFTTrainer.")
