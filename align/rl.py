"""Stage 4, online RL with the trained reward model: TRL's RLOO (REINFORCE leave-one-out) or GRPO.

The policy samples ``num_generations`` completions per prompt; the reward model from ``OUT/rm`` scores them
(it is passed in ``reward_funcs``, so TRL renders prompt + completion with the chat template and reads the
score); a KL penalty (``beta``) to the frozen starting policy keeps it close. ``--rl.algo ppo`` (actor-critic) is
refused in one line: PPOTrainer left TRL's stable API after 1.12 and ``trl.experimental.ppo`` is gone from the
installed TRL 1.16 (``ModuleNotFoundError``; ``ppo_available`` checks). Metrics on held-out prompts: mean reward of sampled
completions before and after, and a Monte-Carlo estimate of KL(policy || reference); TRL's own per-step
reward and KL are kept in ``history``.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from align.common import (StageContext, StageArgs, freeze, last_checkpoint, load_causal_lm, load_tokenizer,
                          measured_once, save_stage, train_history, trl_args)
from align.data import to_dataset
from align.lora import peft_config
from align.reward import load_reward_model
from align.scoring import kl_to_reference, mean_reward, sample
from minitron.config import ConfigError, arg

ALGOS = ("rloo", "grpo", "ppo")  # ppo: only where the installed TRL still ships it (not 1.16)


def ppo_available() -> str | None:
    """None when TRL's experimental PPOTrainer imports, else why not (one line)."""
    import warnings

    try:
        with warnings.catch_warnings():  # TRL warns on any trl.experimental import
            warnings.simplefilter("ignore")
            from trl.experimental.ppo import PPOTrainer  # noqa: F401
    except ImportError as e:
        import trl

        return f"{type(e).__name__}: {e} (TRL {trl.__version__})"
    return None


@dataclasses.dataclass
class RLArgs(StageArgs):
    """Online RL settings (``--rl.algo grpo --rl.num-generations 8``)."""

    algo: str = arg("rloo", "rloo (REINFORCE leave-one-out) or grpo")
    steps: int = arg(40, "optimizer steps (capped by --max-steps)")
    lr: float = arg(1e-5, "peak learning rate")
    batch_size: int = arg(4, "prompts per micro-batch (each sampled num_generations times)")
    num_generations: int = arg(4, "completions sampled per prompt (the group for the baseline)")
    max_completion_length: int = arg(48, "tokens per sampled completion")
    temperature: float = arg(1.0, "sampling temperature")
    beta: float = arg(0.05, "KL penalty to the reference policy (0 turns it off)")
    eval_prompts: int = arg(32, "held-out prompts for the before/after reward and the KL estimate")
    normalize_advantages: bool = arg(True, "rloo: scale advantages to unit variance per batch (the reward model's "
                                           "scale then does not set the step size; GRPO always does this per group)")
    kl_budget: float = arg(10.0, "nats per completion: the report says whether the final KL estimate stays within it")

    def __post_init__(self):
        super().__post_init__()
        if self.algo not in ALGOS:
            raise ConfigError(f"rl.algo must be one of {ALGOS} (got {self.algo!r})")
        if self.algo == "ppo" and (why := ppo_available()):
            raise ConfigError(f"rl.algo ppo: TRL's PPOTrainer is not installed ({why}); it left the stable API after "
                              "TRL 1.12 and trl.experimental.ppo is gone from this TRL: use --rl.algo rloo or grpo")
        if self.algo == "ppo":
            raise ConfigError("rl.algo ppo: this TRL ships trl.experimental.ppo, but align/rl.py does not wire it "
                              "(its value-head model and reward call differ): use --rl.algo rloo or grpo")
        if self.num_generations < 2:
            raise ConfigError("rl.num_generations must be >= 2 (the baseline needs a group)")


def _config(args: RLArgs, ctx: StageContext) -> Any:
    """RLOOConfig or GRPOConfig; a micro-batch holds ``batch_size`` prompts x ``num_generations`` completions."""
    from trl import GRPOConfig, RLOOConfig

    cls = RLOOConfig if args.algo == "rloo" else GRPOConfig
    # TRL counts completions, not prompts, in a batch: it must be a multiple of num_generations.
    extra = {"loss_type": "grpo"} if args.algo == "grpo" else {"normalize_advantages": args.normalize_advantages}
    return trl_args(cls, args, ctx, "rl", per_device_train_batch_size=args.batch_size * args.num_generations,
                    num_generations=args.num_generations, max_completion_length=args.max_completion_length,
                    temperature=args.temperature, beta=args.beta, log_completions=False,
                    remove_unused_columns=False, **extra)


def _measure(policy: Any, tok: Any, rm: Any, rm_tok: Any, prompts: list, args: RLArgs, seed: int) -> dict:
    samples = sample(policy.eval(), tok, prompts, args.max_completion_length, seed, args.temperature)
    lengths = [len(s["completion_ids"]) for s in samples]
    reward, reward_se = mean_reward(rm, rm_tok, samples)
    return {"reward": reward, "reward_se": reward_se, "length": sum(lengths) / len(lengths),
            "example": samples[0]["text"][:200], "_samples": samples}


def train(ctx: StageContext, args: RLArgs, model_dir: str | Path, rm_dir: str | Path, prompts: list[list[dict]],
          eval_prompts: list[list[dict]], data_stats: dict[str, Any]) -> Path:
    """RLOO/GRPO from ``model_dir`` with the reward model ``rm_dir`` on ``prompts``; write ``OUT/rl``."""
    from trl import GRPOTrainer, RLOOTrainer

    tok, rm_tok = load_tokenizer(model_dir), load_tokenizer(rm_dir)
    policy, rm = load_causal_lm(model_dir, tok), load_reward_model(rm_dir, rm_tok).eval()
    ref = copy.deepcopy(policy).eval()  # frozen start policy, for our KL estimate (TRL keeps its own)
    before = measured_once(ctx, "rl", "sampled", lambda: {
        k: v for k, v in _measure(policy, tok, rm, rm_tok, eval_prompts, args, ctx.seed).items() if k != "_samples"})
    freeze(policy, args)
    cls = RLOOTrainer if args.algo == "rloo" else GRPOTrainer
    trainer = cls(model=policy, reward_funcs=[rm], args=_config(args, ctx),
                  train_dataset=to_dataset([{"prompt": p} for p in prompts]), processing_class=tok,
                  reward_processing_classes=[rm_tok], peft_config=peft_config(ctx.lora), callbacks=ctx.callbacks or None)
    resume = last_checkpoint(ctx, "rl")
    trainer.train(resume_from_checkpoint=resume)
    after = _measure(trainer.model, tok, rm, rm_tok, eval_prompts, args, ctx.seed)
    kl = kl_to_reference(trainer.model, ref, tok, after.pop("_samples"))
    history = train_history(trainer)
    logged = [h["reward"] for h in history if "reward" in h]
    metrics = {"stage": "rl", "algo": args.algo, "reward_before": before["reward"], "reward": after["reward"],
               "reward_se_before": before.get("reward_se"), "reward_se": after["reward_se"],
               "kl_to_reference": kl, "kl_budget": args.kl_budget, "kl_within_budget": kl <= args.kl_budget,
               "reward_gain_in_se": (after["reward"] - before["reward"]) / max(1e-9, (
                   after["reward_se"] ** 2 + (before.get("reward_se") or 0.0) ** 2) ** 0.5),
               "length_before": before["length"], "length": after["length"],
               "train_reward_first": logged[0] if logged else None, "train_reward_last": logged[-1] if logged else None,
               "example_before": before["example"], "example": after["example"], "prompts": len(prompts),
               "eval_prompts": len(eval_prompts), "eval_n": len(eval_prompts), "steps": trainer.state.global_step, "resumed_from": resume,
               "data": data_stats, "history": history}
    return save_stage(trainer.model, tok, ctx, "rl", metrics, args, str(model_dir), f"{args.algo.upper()} model",
                      f"Online RL ({args.algo.upper()}) with the reward model {rm_dir} in TRL's reward_funcs.")
