"""Scoring token sequences with a model: next-token loss, log-probabilities of tokens (from hidden states, for the
importance pass) and of continuations, reward-model scores.

One copy of each, used by the core (teacher, search), alignment (DPO margins, KL, RL rewards) and the evals
(roleplay judge, world MC). Chats are rendered by the tokenizer's chat template exactly as TRL renders them.
"""

from __future__ import annotations

import functools
import inspect
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


def token_logprobs(h: torch.Tensor, ids: torch.Tensor, head: torch.Tensor, rows_per_chunk: int = 2) -> torch.Tensor:
    """log p(ids[:, t+1] | ...) from final hidden states h [B, S, H] and lm_head weight [V, H]: [B, S-1].

    Logits are built a few rows at a time (at vocab 128k one 512-token row is 256 MiB in fp32).
    """
    out = []
    for r in range(0, h.shape[0], rows_per_chunk):
        logits = (h[r:r + rows_per_chunk, :-1] @ head.T).float()
        tgt = ids[r:r + rows_per_chunk, 1:]
        out.append(logits.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1))
    return torch.cat(out)


@torch.no_grad()
def continuation_logprobs(model: Any, contexts: list[list[int]], continuations: list[list[int]], pad_id: int,
                          batch_size: int = 8, greedy: bool = False) -> Any:
    """Sum of log p(continuation token | everything before it) for each (context, continuation) pair: [N] float32.

    ``greedy=True`` also returns whether every continuation token is the argmax at its position (lm-eval's
    ``is_greedy``): ``([N] float32, [N] bool)``, from the same forward pass. Pairs that make the same input (one
    context with one-token choices, as MMLU's `` A``..`` D``) share one forward row; several multi-token
    continuations of one context (cloze choices) run the context once and each continuation on its KV cache.
    """
    results: dict[int, tuple[float, bool]] = {}
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, c in enumerate(contexts):
        by_context.setdefault(tuple(c), []).append(i)
    rest = []
    for ctx, idx in by_context.items():
        if len(idx) > 1 and len(ctx) > 1 and max(len(continuations[i]) for i in idx) > 1:
            results.update(zip(idx, _shared_context(model, list(ctx), [continuations[i] for i in idx], pad_id)))
        else:
            rest += idx
    for s in range(0, len(rest), batch_size):
        idx = rest[s:s + batch_size]
        results.update(zip(idx, _rows(model, [contexts[i] for i in idx], [continuations[i] for i in idx], pad_id)))
    logps = torch.tensor([results[i][0] for i in range(len(contexts))], dtype=torch.float32)
    return (logps, torch.tensor([results[i][1] for i in range(len(contexts))], dtype=torch.bool)) if greedy else logps


def _scored(logp: torch.Tensor, target: list[int]) -> tuple[float, bool]:
    """(sum of the target's log-probs, all of them argmax) from the [len(target), V] log-probs predicting it."""
    t = torch.tensor(target, device=logp.device)
    return float(logp.gather(1, t[:, None]).sum()), bool((logp.argmax(-1) == t).all())


def _rows(model: Any, contexts: list[list[int]], continuations: list[list[int]], pad_id: int) -> list[tuple]:
    """One right-padded forward over the distinct inputs (context + continuation minus its last token), with the
    output head on the positions that predict a continuation token only (a 49k vocabulary costs as much as the
    body at every other position)."""
    device = next(model.parameters()).device
    seqs = [c + x for c, x in zip(contexts, continuations)]
    inputs = list(dict.fromkeys(tuple(q[:-1]) for q in seqs))
    row = {x: i for i, x in enumerate(inputs)}
    ids, mask = pad_rows([list(x) for x in inputs], pad_id)
    # continuation token j sits at len(q) - len(x) + j and is predicted one position before
    spans = [range(len(q) - 1 - len(x), len(q) - 1) for q, x in zip(seqs, continuations)]
    keep = sorted({p for span in spans for p in span})
    col = {p: j for j, p in enumerate(keep)}
    logits = _logits(model, ids.to(device), mask.to(device), torch.tensor(keep, device=device))
    logp = torch.log_softmax(logits.float(), -1)
    return [_scored(logp[row[tuple(q[:-1])], [col[p] for p in span]], x)
            for q, x, span in zip(seqs, continuations, spans)]


@functools.cache
def _keeps_logits(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def _logits(model: Any, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[rows, len(positions), V] logits at ``positions``: by the model's ``logits_to_keep`` where it has one (every
    transformers causal LM of this stack), else from the full logits."""
    if _keeps_logits(type(model)):
        return model(input_ids=ids, attention_mask=mask, logits_to_keep=positions).logits
    return model(input_ids=ids, attention_mask=mask).logits[:, positions]


def _shared_context(model: Any, context: list[int], continuations: list[list[int]], pad_id: int) -> list[tuple]:
    """Continuations of one context: the context (but its last token) once, then every continuation on its cache."""
    device = next(model.parameters()).device
    cache = model(input_ids=torch.tensor([context[:-1]], device=device), use_cache=True).past_key_values
    tails = [context[-1:] + x for x in continuations]  # the context's last token predicts the first one
    ids, tail_mask = pad_rows(tails, pad_id)
    mask = torch.cat([torch.ones((len(tails), len(context) - 1), dtype=torch.long), tail_mask], 1)
    cache.batch_repeat_interleave(len(tails))
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), past_key_values=cache,
                   use_cache=True).logits
    logp = torch.log_softmax(logits.float(), -1)
    return [_scored(logp[i, :len(x)], x) for i, x in enumerate(continuations)]


@torch.no_grad()
def reward_scores(rm: Any, tok: Any, conversations: list[list[dict]], batch_size: int = 16) -> torch.Tensor:
    """A reward model's (sequence classifier's) score of each whole conversation: [N] float32."""
    device = next(rm.parameters()).device
    scores = []
    for s in range(0, len(conversations), batch_size):
        ids, mask = pad_rows([chat_ids(tok, c) for c in conversations[s:s + batch_size]], tok.pad_token_id)
        scores.append(rm(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0].float().cpu())
    return torch.cat(scores)
