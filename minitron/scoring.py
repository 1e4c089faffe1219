"""Scoring token sequences with a model: next-token loss, log-probabilities of continuations, reward-model scores.

One copy of each, used by the core (teacher, search), alignment (DPO margins, KL, RL rewards) and the evals
(roleplay judge, world MC). Chats are rendered by the tokenizer's chat template exactly as TRL renders them.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn.functional as F


def chat_ids(tok: Any, messages: list[dict], tools: Any = None, add_generation_prompt: bool = False) -> list[int]:
    """Token ids of ``messages`` rendered by the chat template (the template adds the single BOS)."""
    tools = json.loads(tools) if isinstance(tools, str) else tools
    text = tok.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                   add_generation_prompt=add_generation_prompt)
    return tok(text, add_special_tokens=False)["input_ids"]


def pad_rows(rows: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] ids and attention mask from ragged rows (right-padded, or left-padded for generation)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, sl], mask[i, sl] = torch.tensor(r, dtype=torch.long), 1
    return ids, mask


@torch.no_grad()
def token_loss(model: Any, rows: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats per predicted token) of ``model`` on packed token rows [N, T]; every
    token weighs the same, however the rows fall into batches."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for r in range(0, rows.shape[0], batch_size):
        x = rows[r:r + batch_size].to(device)
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        total += F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        count += x[:, 1:].numel()
    return total / count


@torch.no_grad()
def continuation_logprobs(model: Any, contexts: list[list[int]], continuations: list[list[int]], pad_id: int,
                          batch_size: int = 8, greedy: bool = False) -> Any:
    """Sum of log p(continuation token | everything before it) for each (context, continuation) pair: [N] float32.

    ``greedy=True`` also returns whether every continuation token is the argmax at its position (lm-eval's
    ``is_greedy``): ``([N] float32, [N] bool)``, from the same forward pass.
    """
    device = next(model.parameters()).device
    out, flags = [], []
    for s in range(0, len(contexts), batch_size):
        ctx, cont = contexts[s:s + batch_size], continuations[s:s + batch_size]
        ids, mask = pad_rows([c + x for c, x in zip(ctx, cont)], pad_id)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()  # [B, T, V]
        # token t is predicted at position t-1: continuation token j sits at len(c) + j, scored at len(c) + j - 1
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None].to(device))[..., 0]  # [B, T-1]
        top = logits[:, :-1].argmax(-1) == ids[:, 1:].to(device) if greedy else None  # [B, T-1]
        for i, (c, x) in enumerate(zip(ctx, cont)):
            span = slice(len(c) - 1, len(c) - 1 + len(x))
            out.append(logp[i, span].sum().cpu())
            if greedy:
                flags.append(bool(top[i, span].all()))
    logps = torch.stack(out)
    return (logps, torch.tensor(flags, dtype=torch.bool)) if greedy else logps


@torch.no_grad()
def reward_scores(rm: Any, tok: Any, conversations: list[list[dict]], batch_size: int = 16) -> torch.Tensor:
    """A reward model's (sequence classifier's) score of each whole conversation: [N] float32."""
    device = next(rm.parameters()).device
    scores = []
    for s in range(0, len(conversations), batch_size):
        ids, mask = pad_rows([chat_ids(tok, c) for c in conversations[s:s + batch_size]], tok.pad_token_id)
        scores.append(rm(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0].float().cpu())
    return torch.cat(scores)
