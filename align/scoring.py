"""Measurements that show a stage worked, computed outside the trainers on held-out data.

- ``completion_logps``: summed log-probability of each completion given its prompt (DPO margins, KL);
- ``pairwise_accuracy``: the reward model's scalar (``minitron.scoring.reward_scores``) on chosen vs rejected;
- ``by_source``: any of these per held-out source (HH-RLHF and an instruction set score very differently);
- ``sample``: chat completions from a policy (RL mean reward before/after);
- ``kl_to_reference``: a Monte-Carlo estimate of KL(policy || reference) on the policy's own samples.
Every text goes through the tokenizer's chat template exactly as TRL renders it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from minitron.chat_format import stop_token_ids
from minitron.scoring import chat_ids, continuation_logprobs, pad_rows, reward_scores
from minitron.stats import mean_stderr, paired_change


def completion_logps(model: Any, tok: Any, examples: list[dict], key: str, batch_size: int = 8) -> torch.Tensor:
    """log p(example[key] | example["prompt"]) for conversational examples: [N]."""
    prompts, completions = [], []
    for ex in examples:
        p = chat_ids(tok, ex["prompt"], ex.get("tools"), add_generation_prompt=True)
        full = chat_ids(tok, ex["prompt"] + ex[key], ex.get("tools"))
        prompts.append(p)
        completions.append(full[len(p):])
    return continuation_logprobs(model, prompts, completions, tok.pad_token_id, batch_size)


def mean_se(values: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of a 1-D tensor of per-item values (``minitron.stats.mean_stderr``)."""
    return mean_stderr(values.float().tolist())


def by_source(pairs: list[dict], metric: Callable[[list[int]], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``metric(indices)`` for the held-out pairs of each source (the ``source`` field `minitron align` tags them
    with), when they come from more than one source; otherwise {}."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault(p.get("source", ""), []).append(i)
    return {name: metric(idx) for name, idx in groups.items()} if len(groups) > 1 else {}


def pairwise_accuracy(rm: Any, tok: Any, pairs: list[dict]) -> dict[str, Any]:
    """Share of held-out pairs where r(chosen) > r(rejected), and the mean margin, each with its standard error;
    ``by_source`` holds the same per source when the pairs come from several."""
    chosen = reward_scores(rm, tok, [p["prompt"] + p["chosen"] for p in pairs])
    rejected = reward_scores(rm, tok, [p["prompt"] + p["rejected"] for p in pairs])
    out = _pairwise(chosen, rejected)
    split = by_source(pairs, lambda idx: _pairwise(chosen[idx], rejected[idx]))
    return {**out, "by_source": split} if split else out


def _pairwise(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    acc, acc_se = mean_se((chosen > rejected).float())
    margin, margin_se = mean_se(chosen - rejected)
    return {"accuracy": acc, "accuracy_se": acc_se, "margin": margin, "margin_se": margin_se, "n": len(chosen)}


@torch.no_grad()
def sample(model: Any, tok: Any, prompts: list[list[dict]], max_new_tokens: int, seed: int,
           temperature: float = 1.0, batch_size: int = 8) -> list[dict[str, Any]]:
    """One completion per prompt (greedy when ``temperature`` is 0): ``{"prompt", "prompt_ids", "completion_ids",
    "text", "stopped"}`` (``stopped``: it ended with a stop token rather than at ``max_new_tokens``)."""
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    stops = stop_token_ids(tok)
    out = []
    for s in range(0, len(prompts), batch_size):
        batch = prompts[s:s + batch_size]
        rows = [chat_ids(tok, p, add_generation_prompt=True) for p in batch]
        ids, mask = pad_rows(rows, tok.pad_token_id, left=True)
        how = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
            dict(do_sample=False)
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             eos_token_id=stops, pad_token_id=tok.pad_token_id, use_cache=True, **how)
        for p, r, g in zip(batch, rows, gen[:, ids.shape[1]:].tolist()):
            stop = next((i for i, t in enumerate(g) if t in stops), None)
            cut = len(g) if stop is None else stop + 1  # keep the stop token, drop padding
            text = tok.decode([t for t in g[:cut] if t not in stops], skip_special_tokens=True).strip()
            out.append({"prompt": p, "prompt_ids": r, "completion_ids": g[:cut], "text": text,
                        "stopped": stop is not None})
    return out


def sample_scores(rm: Any, rm_tok: Any, samples: list[dict]) -> torch.Tensor:
    """Reward-model score of each sampled completion (rendered as an assistant turn, as TRL does)."""
    return reward_scores(rm, rm_tok, [s["prompt"] + [{"role": "assistant", "content": s["text"]}] for s in samples])


def mean_reward(rm: Any, rm_tok: Any, samples: list[dict]) -> dict[str, Any]:
    """``{"reward", "reward_se", "scores"}``: the mean score of sampled completions, its s.e., and the per-sample
    scores (``reward_change`` pairs them)."""
    scores = sample_scores(rm, rm_tok, samples)
    reward, reward_se = mean_se(scores)
    return {"reward": reward, "reward_se": reward_se, "scores": scores.float().tolist()}


def reward_change(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """How the mean sampled reward moved from ``before`` to ``after`` (each ``{"reward", "reward_se", "scores"}``):
    in standard errors of the difference of the two means, and paired over the same prompts (``reward_gain`` and
    its ``reward_gain_se``: prompt difficulty cancels out) when both kept their per-prompt scores."""
    se = ((after.get("reward_se") or 0.0) ** 2 + (before.get("reward_se") or 0.0) ** 2) ** 0.5
    out = {"reward_gain_in_se": (after["reward"] - before["reward"]) / max(1e-9, se)}
    if before.get("scores") and after.get("scores"):
        gain, gain_se = paired_change(before["scores"], after["scores"])
        out.update(reward_gain=gain, reward_gain_se=gain_se, reward_gain_in_paired_se=gain / max(1e-9, gain_se))
    return out


def kl_to_reference(policy: Any, ref: Any, tok: Any, samples: list[dict]) -> float:
    """Mean over samples of sum_t [log pi(y_t) - log ref(y_t)], y ~ pi: an unbiased estimate of KL(pi || ref)."""
    prompts = [s["prompt_ids"] for s in samples]
    comps = [s["completion_ids"] for s in samples]
    diff = continuation_logprobs(policy, prompts, comps, tok.pad_token_id) - continuation_logprobs(ref, prompts, comps, tok.pad_token_id)
    return diff.mean().item()
