"""Stage 4, online RL with the trained reward model: TRL's RLOO (REINFORCE leave-one-out) or GRPO, or PPO.

RLOO/GRPO: the policy samples ``num_generations`` completions per prompt; the reward model from ``OUT/rm`` scores
them (it is passed in ``reward_funcs``, so TRL renders prompt + completion with the chat template and reads the
score); a KL penalty (``beta``) to the frozen starting policy keeps it close. ``--rl.algo ppo`` (actor-critic, a
critic initialised from the RM, GAE, clipped policy and value losses) is ``align/ppo.py``, a port of TRL 1.12's
PPOTrainer, since the installed TRL 1.16 no longer has one; its options keep TRL's PPOConfig names. Metrics (the
same for all three) on held-out prompts: mean reward of sampled completions before and after, and a Monte-Carlo
estimate of KL(policy || reference); the trainer's own per-step reward and KL are kept in ``history``.

Verifiable rewards (Tulu 3's RLVR, ``--rl.constraint-share``): that share of the prompts are held-in SFT questions
with IFEval-type format constraints appended (``align.constraints``); their completions earn, besides the RM score,
``constraint_weight`` x the share of constraints obeyed, checked by lm-eval's IFEval code (a second reward function;
the other prompts get None from it, which TRL leaves out). Measured on held-out constrained prompts (greedy): the
share of answers that obey all their constraints, before and after.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

from align.constraints import obeyed
from align.common import (StageContext, StageArgs, freeze, last_checkpoint, load_causal_lm, load_tokenizer,
                          measured_once, save_stage, train_history, trl_args)
from align.data import to_dataset
from align.lora import peft_config
from align.reward import load_reward_model
from align.scoring import kl_to_reference, mean_reward, reward_change, sample
from minitron import fingerprint
from minitron.config import ConfigError, arg

ALGOS = ("rloo", "grpo", "ppo")  # ppo: align/ppo.py (TRL 1.16 has no PPOTrainer)
# the options only PPO reads (TRL PPOConfig names); an RLOO/GRPO fingerprint leaves them out (fingerprint_args)
# the verifiable-reward options: left out of the fingerprint while constraint_share is 0 (older outputs stay up to date)
CONSTRAINT_FIELDS = ("constraint_share", "constraint_weight", "max_constraints")
PPO_FIELDS = ("num_ppo_epochs", "num_mini_batches", "cliprange", "cliprange_value", "vf_coef", "gamma", "lam",
              "kl_coef", "kl_estimator", "whiten_rewards", "missing_eos_penalty")


@dataclasses.dataclass
class RLArgs(StageArgs):
    """Online RL settings (``--rl.algo grpo --rl.num-generations 8``)."""

    algo: str = arg("rloo", "rloo (REINFORCE leave-one-out), grpo, or ppo (actor-critic, align/ppo.py)")
    steps: int = arg(40, "optimizer steps (ppo: rollouts, each num_ppo_epochs x num_mini_batches optimizer steps; "
                         "capped by --max-steps)")
    lr: float = arg(1e-5, "peak learning rate")
    batch_size: int = arg(4, "prompts per micro-batch (each sampled num_generations times; ppo: a rollout holds "
                             "batch_size x grad_accum prompts)")
    num_generations: int = arg(4, "completions sampled per prompt (rloo/grpo: the group for the baseline; ppo: >= 1)")
    max_completion_length: int = arg(48, "tokens per sampled completion (TRL PPO's response_length)")
    temperature: float = arg(1.0, "sampling temperature")
    beta: float = arg(0.05, "KL penalty to the reference policy (0 turns it off; ppo: unless kl_coef is set)")
    eval_prompts: int = arg(32, "held-out prompts for the before/after reward and the KL estimate")
    normalize_advantages: bool = arg(True, "rloo: scale advantages to unit variance per batch (the reward model's "
                                           "scale then does not set the step size; GRPO always does this per group)")
    kl_budget: float = arg(10.0, "nats per completion: the report says whether the final KL estimate stays within it")
    constraint_share: float = arg(0.0, "share of the RL prompts that are held-in SFT questions with IFEval-type "
                                       "format constraints, rewarded for obeying them (RLVR; rloo/grpo)")
    constraint_weight: float = arg(1.0, "weight of the verifiable reward (share of constraints obeyed, 0..1) "
                                        "beside the reward model's score (weight 1)")
    max_constraints: int = arg(2, "constraints per constrained prompt (1..max)")
    # PPO only (align/ppo.py), TRL 1.12 PPOConfig's names and defaults
    num_ppo_epochs: int = arg(4, "ppo: passes over each rollout")
    num_mini_batches: int = arg(1, "ppo: minibatches per pass, one optimizer step each (must divide the rollout)")
    cliprange: float = arg(0.2, "ppo: policy-ratio clip range")
    cliprange_value: float = arg(0.2, "ppo: value clip range (around the rollout's values)")
    vf_coef: float = arg(0.1, "ppo: weight of the value loss")
    gamma: float = arg(1.0, "ppo: discount factor")
    lam: float = arg(0.95, "ppo: GAE lambda")
    kl_coef: float | None = arg(None, "ppo: per-token KL penalty to the reference (TRL's kl_coef); unset = beta")
    kl_estimator: str = arg("k1", "ppo: per-token KL estimator, k1 (log ratio) or k3 (lower variance)")
    whiten_rewards: bool = arg(False, "ppo: whiten the per-token rewards of each rollout")
    missing_eos_penalty: float | None = arg(None, "ppo: taken off the score of a completion that did not stop")

    def __post_init__(self):
        super().__post_init__()
        if self.algo not in ALGOS:
            raise ConfigError(f"rl.algo must be one of {ALGOS} (got {self.algo!r})")
        if not 0 <= self.constraint_share < 1:
            raise ConfigError(f"rl.constraint_share must be in [0, 1) (got {self.constraint_share}): the other "
                              "prompts are the preference prompts the reward model scores")
        if self.algo == "ppo":
            if self.constraint_share:
                raise ConfigError("rl.constraint_share needs rl.algo rloo or grpo (TRL reward functions); "
                                  "PPO scores with the reward model only")
            self._check_ppo()
        elif self.num_generations < 2:
            raise ConfigError("rl.num_generations must be >= 2 (the baseline needs a group)")

    def _check_ppo(self) -> None:
        """PPO's options, a bad one refused in one line that names it, its value and the valid range."""
        rollout = self.batch_size * self.grad_accum * self.num_generations
        minibatches = max(1, self.num_mini_batches)
        bad = [(self.num_generations < 1, f"num_generations must be >= 1 (got {self.num_generations})"),
               (self.num_ppo_epochs < 1, f"num_ppo_epochs must be >= 1 (got {self.num_ppo_epochs})"),
               (self.num_mini_batches < 1 or rollout % minibatches,
                f"num_mini_batches={self.num_mini_batches} must divide the rollout of {rollout} completions "
                "(batch_size x grad_accum x num_generations)"),
               (self.cliprange <= 0, f"cliprange must be > 0 (got {self.cliprange})"),
               (self.cliprange_value <= 0, f"cliprange_value must be > 0 (got {self.cliprange_value})"),
               (self.vf_coef < 0, f"vf_coef must be >= 0 (got {self.vf_coef})"),
               (not 0 <= self.gamma <= 1, f"gamma must be in [0, 1] (got {self.gamma})"),
               (not 0 <= self.lam <= 1, f"lam must be in [0, 1] (got {self.lam})"),
               (self.beta < 0, f"beta must be >= 0 (got {self.beta})"),
               ((self.kl_coef or 0) < 0, f"kl_coef must be >= 0 (got {self.kl_coef})"),
               (self.kl_estimator not in ("k1", "k3"), f"kl_estimator must be k1 or k3 (got {self.kl_estimator!r})"),
               ((self.missing_eos_penalty or 0) < 0,
                f"missing_eos_penalty must be >= 0, it is subtracted (got {self.missing_eos_penalty})"),
               (self.temperature <= 0, f"temperature must be > 0: PPO samples and divides the logits by it "
                                       f"(got {self.temperature})"),
               (self.whiten_rewards and rollout // minibatches < 8,
                "whiten_rewards needs minibatches of at least 8 completions, TRL's bound "
                f"(got {rollout // minibatches})")]
        for failed, why in bad:
            if failed:
                raise ConfigError(f"rl.algo ppo: {why}")


def fingerprint_args(args: RLArgs) -> Any:
    """The section as fingerprinted: PPO's options count only for ``--rl.algo ppo`` (an RLOO/GRPO output made
    before they existed, or with other values of them, stays up to date)."""
    left_out = (() if args.algo == "ppo" else PPO_FIELDS) + (() if args.constraint_share else CONSTRAINT_FIELDS)
    return fingerprint.without(args, left_out) if left_out else args


def constraint_reward(prompts: list, completions: list, constraints: list[str], **_: Any) -> list[float | None]:
    """TRL reward function: the share of its constraints each completion obeys (None for prompts without any)."""
    out = []
    for completion, spec in zip(completions, constraints, strict=True):
        if not spec:
            out.append(None)
            continue
        c = json.loads(spec)
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        hits = obeyed(text, c["instruction_id_list"], c["kwargs"])
        out.append(sum(hits) / len(hits))
    return out


def measure_constraints(policy: Any, tok: Any, prompts: list[dict], args: RLArgs) -> dict[str, Any]:
    """Greedy answers to held-out constrained prompts: ``{"obeyed_all", "obeyed_all_se", "all", "n"}`` (``all``:
    per prompt, 1 when the answer obeys every constraint)."""
    from minitron.stats import mean_stderr

    samples = sample(policy.eval(), tok, [p["prompt"] for p in prompts], args.max_completion_length, 0, temperature=0)
    hits = []
    for s, p in zip(samples, prompts):
        c = json.loads(p["constraints"])
        hits.append(float(all(obeyed(s["text"], c["instruction_id_list"], c["kwargs"]))))
    rate, se = mean_stderr(hits)
    return {"obeyed_all": rate, "obeyed_all_se": se, "all": hits, "n": len(hits)}


def _config(args: RLArgs, ctx: StageContext, reward_weights: list[float] | None = None) -> Any:
    """RLOOConfig or GRPOConfig; a micro-batch holds ``batch_size`` prompts x ``num_generations`` completions."""
    from trl import GRPOConfig, RLOOConfig

    cls = RLOOConfig if args.algo == "rloo" else GRPOConfig
    # TRL counts completions, not prompts, in a batch: it must be a multiple of num_generations.
    extra = {"loss_type": "grpo"} if args.algo == "grpo" else {"normalize_advantages": args.normalize_advantages}
    return trl_args(cls, args, ctx, "rl", per_device_train_batch_size=args.batch_size * args.num_generations,
                    num_generations=args.num_generations, max_completion_length=args.max_completion_length,
                    temperature=args.temperature, beta=args.beta, log_completions=False,
                    remove_unused_columns=False, reward_weights=reward_weights, **extra)


def _measure(policy: Any, tok: Any, rm: Any, rm_tok: Any, prompts: list, args: RLArgs, seed: int) -> dict:
    samples = sample(policy.eval(), tok, prompts, args.max_completion_length, seed, args.temperature)
    lengths = [len(s["completion_ids"]) for s in samples]
    return {**mean_reward(rm, rm_tok, samples), "length": sum(lengths) / len(lengths),
            "example": samples[0]["text"][:200], "_samples": samples}


def constraint_change(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The held-out share of answers obeying all their constraints, before and after, and its paired change."""
    from minitron.stats import paired_change

    gain, gain_se = paired_change(before["all"], after["all"])
    return {"obeyed_all_before": before["obeyed_all"], "obeyed_all_se_before": before["obeyed_all_se"],
            "obeyed_all": after["obeyed_all"], "obeyed_all_se": after["obeyed_all_se"],
            "obeyed_all_gain": gain, "obeyed_all_gain_se": gain_se, "constraint_eval_n": after["n"]}


def _trl_train(ctx: StageContext, args: RLArgs, policy: Any, rm: Any, tok: Any, rm_tok: Any,
               prompts: list[list[dict]], constrained: list[dict]) -> tuple[Any, list[dict], int, str | None]:
    """RLOO or GRPO with TRL: (trained policy, log history, steps, checkpoint resumed from)."""
    from trl import GRPOTrainer, RLOOTrainer

    cls = RLOOTrainer if args.algo == "rloo" else GRPOTrainer
    rows, funcs, weights = [{"prompt": p} for p in prompts], [rm], None
    if constrained:  # RLVR: a second reward function, None for the preference prompts
        rows = [{**r, "constraints": ""} for r in rows] + constrained
        funcs, weights = [rm, constraint_reward], [1.0, args.constraint_weight]
    trainer = cls(model=policy, reward_funcs=funcs, args=_config(args, ctx, weights),
                  train_dataset=to_dataset(rows), processing_class=tok,
                  reward_processing_classes=[rm_tok, None][:len(funcs)], peft_config=peft_config(ctx.lora),
                  callbacks=ctx.callbacks or None)
    resume = last_checkpoint(ctx, "rl")
    trainer.train(resume_from_checkpoint=resume)
    return trainer.model, train_history(trainer), trainer.state.global_step, resume


def train(ctx: StageContext, args: RLArgs, model_dir: str | Path, rm_dir: str | Path, prompts: list[list[dict]],
          eval_prompts: list[list[dict]], data_stats: dict[str, Any], constrained: list[dict] = (),
          constrained_eval: list[dict] = ()) -> Path:
    """RLOO/GRPO/PPO from ``model_dir`` with the reward model ``rm_dir`` on ``prompts`` (and, for RLVR, the
    ``constrained`` prompts of ``align.constraints.constrained_prompts``); write ``OUT/rl``."""
    tok, rm_tok = load_tokenizer(model_dir), load_tokenizer(rm_dir)
    policy, rm = load_causal_lm(model_dir, tok), load_reward_model(rm_dir, rm_tok).eval()
    ref = copy.deepcopy(policy).eval()  # frozen start policy, for our KL estimate (TRL keeps its own; PPO uses it)
    before = measured_once(ctx, "rl", "sampled", lambda: {
        k: v for k, v in _measure(policy, tok, rm, rm_tok, eval_prompts, args, ctx.seed).items() if k != "_samples"})
    obeyed_before = constrained_eval and measured_once(ctx, "rl", "constraints",
                                                       lambda: measure_constraints(policy, tok, constrained_eval, args))
    freeze(policy, args)
    if args.algo == "ppo":
        from align import ppo

        model, history, steps, resume = ppo.train(ctx, args, policy, ref, rm, tok, rm_tok, rm_dir, prompts)
    else:
        model, history, steps, resume = _trl_train(ctx, args, policy, rm, tok, rm_tok, prompts, list(constrained))
    after = _measure(model, tok, rm, rm_tok, eval_prompts, args, ctx.seed)
    kl = kl_to_reference(model, ref, tok, after.pop("_samples"))
    logged = [h["reward"] for h in history if "reward" in h]
    metrics = {"stage": "rl", "algo": args.algo, "reward_before": before["reward"], "reward": after["reward"],
               "reward_se_before": before.get("reward_se"), "reward_se": after["reward_se"],
               "kl_to_reference": kl, "kl_budget": args.kl_budget, "kl_within_budget": kl <= args.kl_budget,
               **reward_change(before, after),
               "length_before": before["length"], "length": after["length"],
               "train_reward_first": logged[0] if logged else None, "train_reward_last": logged[-1] if logged else None,
               "example_before": before["example"], "example": after["example"], "prompts": len(prompts),
               "eval_prompts": len(eval_prompts), "eval_n": len(eval_prompts), "steps": steps, "resumed_from": resume,
               "data": data_stats, "history": history}
    if constrained_eval:
        metrics.update(constraint_prompts=len(constrained), **constraint_change(
            obeyed_before, measure_constraints(model, tok, constrained_eval, args)))
    notes = (f"Online RL (PPO: align/ppo.py, a port of TRL 1.12's PPOTrainer) with the reward model {rm_dir}, "
             "which also started the critic." if args.algo == "ppo" else
             f"Online RL ({args.algo.upper()}) with the reward model {rm_dir} in TRL's reward_funcs.")
    return save_stage(model, tok, ctx, "rl", metrics, args, str(model_dir), f"{args.algo.upper()} model", notes)
