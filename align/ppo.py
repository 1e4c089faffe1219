"""PPO (actor-critic) with the trained reward model: ``--rl.algo ppo``, a compact port of TRL 1.12's PPOTrainer.

TRL's PPOTrainer (``trl/experimental/ppo/ppo_trainer.py`` in TRL <= 1.12; Ziegler et al. 2019, "Fine-Tuning
Language Models from Human Preferences", on Schulman et al. 2017's PPO) is gone from the installed TRL 1.16, so its
``train`` loop is ported here, with its config names. One optimisation step of the stage (``rl.steps``) is one TRL
update:

1. rollout: ``batch_size x grad_accum`` prompts, each sampled ``num_generations`` times (TRL: once) by the policy at
   ``temperature``, at most ``max_completion_length`` tokens (TRL's ``response_length``), through
   ``align.scoring.sample``;
2. score: the reward model ``OUT/rm`` scores each conversation (``minitron.scoring.reward_scores``, rendered with the
   chat template as TRL's RLOO/GRPO ``reward_funcs`` do); ``missing_eos_penalty`` is taken off completions that did
   not stop;
3. per-token reward: ``-kl_coef x KL_t`` to the frozen start policy (``kl_estimator`` k1 or k3), plus the score on
   the completion's last token; whitened when ``whiten_rewards``;
4. critic: a separate model initialised from the reward model (TRL's ``value_model``), its score head read at every
   position; GAE with ``gamma`` and ``lam``; returns = advantages + values; advantages whitened;
5. ``num_ppo_epochs`` passes over the rollout in ``num_mini_batches`` shuffled minibatches (micro-batches of
   ``batch_size x num_generations`` completions accumulate), one optimizer step each on the clipped policy loss
   (``cliprange``) + ``vf_coef`` x the clipped value loss (``cliprange_value``); AdamW over policy and critic, the
   stage's cosine schedule stepped once per update (as TRL).

Where it differs from TRL 1.12, on purpose: the score sits on the completion's last token (TRL put it one past the
stop token, its "p1" index); the old log-probs come from a forward pass, not from ``generate``'s scores, so the first
ratio is exactly 1; gradients are clipped at norm 1; one process (no accelerate, DeepSpeed or FSDP), and no Trainer
(``ctx.callbacks`` are not called). And it resumes, which TRL's did not: every ``save_steps`` a checkpoint
``OUT/.work/rl/checkpoint-N`` holds the trainable weights of policy and critic, the optimizer and scheduler, and
``trainer_state.json`` (written last, so ``align.common.last_checkpoint`` passes over a cut one); prompts, samples and
minibatch order are seeded by step, so a rerun of the same command continues the same run. From TRL 1.16 it reuses
``selective_log_softmax``, ``entropy_from_logits`` and ``disable_dropout_in_model``. With LoRA, policy and critic both
train adapters (the critic's score head in full); the policy's is merged on export by ``align.common.save_stage``.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from align.common import StageContext, freeze, last_checkpoint, on_gpu, process_state
from align.lora import peft_config
from align.reward import load_reward_model
from align.scoring import sample
from minitron.config import ConfigError
from minitron.io import read_json, write_json
from minitron.scoring import pad_rows, reward_scores


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum()


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the unmasked entries (TRL's ``masked_whiten``, unbiased variance); padding set to 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask) * mask.sum() / (mask.sum() - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + 1e-8) + (0 if shift_mean else mean)
    return out * mask


def train(ctx: StageContext, args: Any, policy: Any, ref: Any, rm: Any, tok: Any, rm_tok: Any, rm_dir: str | Path,
          prompts: list[list[dict]]) -> tuple[Any, list[dict], int, str | None]:
    """PPO from ``policy`` (frozen start ``ref``) with the reward model ``rm`` on ``prompts``; ``args`` is the
    ``rl`` section (``align.rl.RLArgs``). Returns (trained policy, log history, steps, checkpoint resumed from)."""
    from transformers import get_cosine_schedule_with_warmup
    from trl.trainer.utils import disable_dropout_in_model

    if process_state().num_processes > 1:
        raise ConfigError("rl.algo ppo runs in one process: launch it without accelerate/torchrun (or use rloo/grpo)")
    critic = _critic(rm_dir, rm_tok, tok, args)
    if ctx.lora.enabled:
        from peft import get_peft_model

        policy = get_peft_model(policy, peft_config(ctx.lora))
        critic = get_peft_model(critic, peft_config(ctx.lora, "SEQ_CLS"))
    device = torch.device("cuda" if on_gpu() else "cpu")
    for m in (policy, ref, rm, critic):
        disable_dropout_in_model(m)
        m.to(device)
    ref.eval()
    rm.eval()
    params = [p for m in (policy, critic) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    steps = ctx.steps(args)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(args.warmup_ratio * steps), steps)
    resume = last_checkpoint(ctx, "rl")
    start, history = _load_checkpoint(resume, policy, critic, opt, sched) if resume else (0, [])
    per_step = args.batch_size * args.grad_accum
    for step in range(start + 1, steps + 1):
        batch = [p for p in _prompts_at(prompts, step, per_step, ctx.seed) for _ in range(args.num_generations)]
        roll = _rollout(policy, ref, rm, critic, tok, rm_tok, batch, args, seed=ctx.seed + step)
        lr = sched.get_last_lr()[0]  # this update's
        stats = _update(policy, critic, opt, params, roll, args, torch.Generator().manual_seed(ctx.seed + step))
        sched.step()
        if step % args.logging_steps == 0 or step == steps:
            history.append(_log(step, roll, stats, lr, len(batch)))
            shown = ("reward", "objective/kl", "loss/value_avg", "policy/clipfrac_avg")
            print(f"[rl] ppo step {step}/{steps}: " + ", ".join(f"{k} {history[-1][k]:.4g}" for k in shown))
        if step % args.save_steps == 0:
            _save_checkpoint(ctx.work_dir("rl"), step, policy, critic, opt, sched, history)
    return policy, history, steps, resume


def _critic(rm_dir: str | Path, rm_tok: Any, tok: Any, args: Any) -> Any:
    """The value model: a trainable copy of the reward model (TRL initialised its value_model from the RM too). It
    reads the policy's token ids, so both must share one vocabulary."""
    if rm_tok.get_vocab() != tok.get_vocab():
        raise ConfigError(f"rl.algo ppo: the critic starts from the reward model {rm_dir}, whose tokenizer differs "
                          "from the policy's; train the RM from the policy's SFT (the pipeline's rm stage) or use rloo")
    critic = load_reward_model(rm_dir, rm_tok)
    if not hasattr(critic, "score") or not hasattr(critic, critic.base_model_prefix):
        raise ConfigError(f"rl.algo ppo: {type(critic).__name__} ({rm_dir}) has no backbone + `score` head to read "
                          "values from at every token; use rloo or grpo")
    return freeze(critic, args)


def _prompts_at(prompts: list, step: int, k: int, seed: int) -> list:
    """The ``k`` prompts of update ``step`` (1-based): a seeded shuffle per pass over the prompts, a partial batch at
    the end of a pass dropped (TRL's DataLoader(shuffle=True, drop_last=True)); the same on a resumed run."""
    per_pass = len(prompts) // k
    epoch, i = divmod(step - 1, per_pass)
    order = random.Random(seed + epoch).sample(range(len(prompts)), len(prompts))
    return [prompts[j] for j in order[i * k:(i + 1) * k]]


def _autocast() -> Any:
    """bf16 mixed precision on a CUDA device that has it (as the TRL stages), else nothing (fp32 on CPU)."""
    if on_gpu() and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: 0 at each row's first real token (TRL's ``forward``)."""
    return (mask.cumsum(1) - 1).clamp(min=0)


def _logprobs(model: Any, ids: torch.Tensor, mask: torch.Tensor, p: int, temperature: float,
              entropy: bool = False) -> Any:
    """log pi(response token | before) at ``temperature``: [B, R] (and the entropy per position, [B, R])."""
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    with _autocast():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False).logits
    logits = logits[:, p - 1:-1].float() / temperature  # position t predicts token t + 1
    logp = selective_log_softmax(logits, ids[:, p:])
    return (logp, entropy_from_logits(logits)) if entropy else logp


def _values(critic: Any, ids: torch.Tensor, mask: torch.Tensor, p: int) -> torch.Tensor:
    """The critic's value of each response position's state (prompt + response before it): [B, R]."""
    inner = critic.get_base_model() if hasattr(critic, "get_base_model") else critic  # LoRA: the adapted model
    backbone = getattr(inner, inner.base_model_prefix)
    with _autocast():
        hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=_positions(mask),
                          use_cache=False).last_hidden_state
        return inner.score(hidden[:, p - 1:-1]).squeeze(-1).float()


@torch.no_grad()
def _rollout(policy: Any, ref: Any, rm: Any, critic: Any, tok: Any, rm_tok: Any, prompts: list, args: Any,
             seed: int) -> dict[str, Any]:
    """Sample, score, and turn the samples into PPO's training batch: ids [B, P+R] (prompts left-padded to P,
    responses right-padded to R), response mask, old log-probs, values, advantages and returns [B, R]."""
    policy.eval()
    critic.eval()
    device = next(policy.parameters()).device
    samples = sample(policy, tok, prompts, args.max_completion_length, seed, args.temperature,
                     batch_size=args.batch_size * args.num_generations)
    q, q_mask = pad_rows([s["prompt_ids"] for s in samples], tok.pad_token_id, left=True)
    r, r_mask = pad_rows([s["completion_ids"] for s in samples], tok.pad_token_id)
    ids, mask, p = torch.cat([q, r], 1).to(device), torch.cat([q_mask, r_mask], 1).to(device), q.shape[1]
    resp_mask = r_mask.to(device).float()
    logp, entropy = _logprobs(policy, ids, mask, p, args.temperature, entropy=True)
    ref_logp = _logprobs(ref, ids, mask, p, args.temperature)
    values = _values(critic, ids, mask, p) * resp_mask
    convs = [s["prompt"] + [{"role": "assistant", "content": s["text"]}] for s in samples]
    raw = reward_scores(rm, rm_tok, convs).to(device)
    stopped = torch.tensor([s["stopped"] for s in samples], device=device)
    scores = raw - (~stopped).float() * (args.missing_eos_penalty or 0.0)
    adv, returns, kl = _advantages(logp, ref_logp, values, scores, resp_mask, args)
    return {"ids": ids, "mask": mask, "p": p, "resp_mask": resp_mask, "logp": logp, "values": values, "adv": adv,
            "returns": returns, "kl": kl, "raw": raw, "scores": scores, "stopped": stopped,
            "entropy": masked_mean(entropy, resp_mask), "length": resp_mask.sum(1).mean()}


def _advantages(logp: torch.Tensor, ref_logp: torch.Tensor, values: torch.Tensor, scores: torch.Tensor,
                mask: torch.Tensor, args: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token rewards (KL penalty + the score on the last token), then GAE: (advantages, returns, KL) [B, R]."""
    logr = ref_logp - logp
    kl = (-logr if args.kl_estimator == "k1" else logr.exp() - 1 - logr) * mask  # joschu.net/blog/kl-approx.html
    kl_coef = args.beta if args.kl_coef is None else args.kl_coef
    rewards = -kl_coef * kl
    last = mask.sum(1).long() - 1  # every completion has at least one token
    rewards[torch.arange(len(last), device=last.device), last] += scores
    if args.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    gae, advs = torch.zeros_like(scores), []
    for t in reversed(range(rewards.shape[1])):  # values and rewards are 0 past each completion's end
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
        delta = rewards[:, t] + args.gamma * next_value - values[:, t]
        gae = delta + args.gamma * args.lam * gae
        advs.append(gae)
    adv = torch.stack(advs[::-1], 1)
    returns = adv + values
    return masked_whiten(adv, mask), returns, kl


def _update(policy: Any, critic: Any, opt: Any, params: list, roll: dict, args: Any,
            gen: torch.Generator) -> dict[str, float]:
    """``num_ppo_epochs`` passes over the rollout, ``num_mini_batches`` optimizer steps each; mean statistics."""
    policy.train()
    critic.train()
    n = roll["ids"].shape[0]
    mini = n // args.num_mini_batches
    micro = min(mini, args.batch_size * args.num_generations)
    stats: dict[str, list[float]] = {}
    for _ in range(args.num_ppo_epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, mini):
            rows = order[start:start + mini]
            for m in range(0, mini, micro):
                idx = rows[m:m + micro].to(roll["ids"].device)
                loss, st = _loss(policy, critic, roll, idx, args)
                (loss * len(idx) / mini).backward()
                for k, v in st.items():
                    stats.setdefault(k, []).append(v)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return {k: sum(v) / len(v) for k, v in stats.items()}


def _loss(policy: Any, critic: Any, roll: dict, idx: torch.Tensor, args: Any) -> tuple[torch.Tensor, dict]:
    """TRL's PPO loss on the rows ``idx``: clipped policy-gradient loss + vf_coef x clipped value loss."""
    ids, mask, p, rmask = roll["ids"][idx], roll["mask"][idx], roll["p"], roll["resp_mask"][idx]
    adv, old_logp, old_v, ret = roll["adv"][idx], roll["logp"][idx], roll["values"][idx], roll["returns"][idx]
    logp = _logprobs(policy, ids, mask, p, args.temperature)
    v = _values(critic, ids, mask, p)
    v_clip = torch.clamp(v, old_v - args.cliprange_value, old_v + args.cliprange_value)
    vf1, vf2 = (v - ret) ** 2, (v_clip - ret) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf1, vf2), rmask)
    ratio = torch.exp(logp - old_logp)
    pg1, pg2 = -adv * ratio, -adv * torch.clamp(ratio, 1.0 - args.cliprange, 1.0 + args.cliprange)
    pg_loss = masked_mean(torch.max(pg1, pg2), rmask)
    with torch.no_grad():  # TRL's statistics
        st = {"policy/approxkl_avg": 0.5 * masked_mean((logp - old_logp) ** 2, rmask),
              "policy/clipfrac_avg": masked_mean((pg2 > pg1).float(), rmask), "loss/policy_avg": pg_loss,
              "loss/value_avg": vf_loss, "val/clipfrac_avg": masked_mean((vf2 > vf1).float(), rmask),
              "val/ratio": masked_mean(ratio, rmask)}
    return pg_loss + args.vf_coef * vf_loss, {k: v.item() for k, v in st.items()}


def _log(step: int, roll: dict, stats: dict, lr: float, n: int) -> dict[str, float]:
    """One log-history entry with TRL's PPO names; ``reward`` (the raw RM score) is RLOO/GRPO's, for the plot."""
    kl = roll["kl"].sum(1).mean().item()
    return {"step": step, "episode": step * n, "reward": roll["raw"].mean().item(),
            "objective/scores": roll["scores"].mean().item(), "objective/kl": kl,
            "objective/entropy": roll["entropy"].item(), "objective/rlhf_reward": roll["scores"].mean().item() - kl,
            "completions/mean_length": roll["length"].item(),
            "completions/stopped": roll["stopped"].float().mean().item(),
            **stats, "lr": lr}


def _save_checkpoint(work: Path, step: int, policy: Any, critic: Any, opt: Any, sched: Any,
                     history: list[dict]) -> None:
    """``work/checkpoint-<step>``: trainable weights, optimizer and scheduler, then ``trainer_state.json`` (last, so a
    checkpoint cut short by a kill has none and is passed over); older checkpoints go once it is complete."""
    ckpt = work / f"checkpoint-{step}"
    ckpt.mkdir(parents=True, exist_ok=True)
    for name, model in (("policy", policy), ("critic", critic)):
        save_file({k: v.detach().cpu().contiguous() for k, v in model.named_parameters() if v.requires_grad},
                  ckpt / f"{name}.safetensors")
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, ckpt / "optimizer.pt")
    write_json(ckpt / "trainer_state.json", {"global_step": step, "log_history": history})
    for old in work.glob("checkpoint-*"):
        if old != ckpt:
            shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(path: str, policy: Any, critic: Any, opt: Any, sched: Any) -> tuple[int, list[dict]]:
    """Restore a ``_save_checkpoint``: (the step it holds, the log history up to it)."""
    ckpt = Path(path)
    for name, model in (("policy", policy), ("critic", critic)):
        unexpected = model.load_state_dict(load_file(ckpt / f"{name}.safetensors"), strict=False).unexpected_keys
        if unexpected:
            raise ConfigError(f"rl: {ckpt} holds weights this {name} lacks ({unexpected[0]}, ...): it was made by "
                              "another model or LoRA setting; delete it to start over")
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    saved = read_json(ckpt / "trainer_state.json")
    return saved["global_step"], saved["log_history"]
