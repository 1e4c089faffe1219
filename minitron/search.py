"""Architecture search within a parameter budget (the Minitron paper's search, ModelOpt's NAS, small).

1. Enumerate candidate shapes (hidden, MLP, query heads per KV group, layers) on a grid whose parameter count
   falls in ``[(1 - TOLERANCE) * budget, budget]``.
2. Prune each one in memory from the cached importance scores and rank them by LM loss on held-out data.
3. Give the ``top_k`` best a short distillation (K steps of forward-KL on the source model's logits) and rank
   again: the loss after this short repair predicts the loss after full distillation better than the loss
   right after pruning (the paper's observation). ``minitron prune --params N --search`` keeps the winner and
   writes the table (search.json, search.md) beside the model.

Without ``--search``, ``--params N`` takes ``budget_layout``: width only (heads and layers kept, as
Llama-3.1-Minitron-4B-Width), hidden and MLP shrunk by one common ratio to the largest shape under the budget.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from minitron.adapters import Layout, get_adapter, pruned_config
from minitron.io import write_json, write_text
from minitron.scoring import token_loss

FRACTIONS = (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25)
DEPTH_FRACTIONS = (1.0, 0.875, 0.75, 0.5)
TOLERANCE = 0.15  # candidates within 15% under the budget
MAX_CANDIDATES = 12  # ranked by loss after pruning (each costs one eval pass)


def _align(n: int) -> int:
    """Granularity of a width axis: multiples of 64 for real models, of 8 for tiny ones."""
    return 64 if n >= 1024 else 8


def _round(n: int, frac: float) -> int:
    a = _align(n)
    return max(a, int(n * frac) // a * a) if frac < 1 else n


def count(layout: Layout, scope: str = "total") -> int:
    """Parameters a budget counts: ``total``, or ``non_embedding`` (what sets the per-token cost)."""
    return layout.non_embedding_params() if scope == "non_embedding" else layout.num_params()


def _check_budget(src: Layout, budget: float, scope: str = "total") -> None:
    from minitron.prune import PruneTargetError

    if budget > count(src, scope):
        raise PruneTargetError(f"params={budget:.4g} is larger than the source's {count(src, scope):,} {scope} parameters: "
                               "pruning only removes units")


def budget_layout(src: Layout, budget: float, scope: str = "total") -> Layout:
    """The largest width-only shape (hidden and MLP shrunk by one ratio) with at most ``budget`` parameters."""
    from minitron.prune import PruneTargetError

    _check_budget(src, budget, scope)
    a = _align(src.hidden_size)
    for hidden in range(src.hidden_size // a * a, 0, -a):
        if hidden % src.num_attention_heads:  # transformers (Llama, ...) wants hidden divisible by the heads
            continue
        ratio = hidden / src.hidden_size
        shape = src.replace(hidden_size=hidden, intermediate_size=_round(src.intermediate_size, ratio))
        if count(shape, scope) <= budget:
            return shape
    smallest = src.replace(hidden_size=a, intermediate_size=_align(src.intermediate_size))
    raise PruneTargetError(f"no width-only shape meets params={budget:.4g}: the smallest (hidden {a}, MLP "
                           f"{smallest.intermediate_size}) has {count(smallest, scope):,} parameters; raise the "
                           "budget or also prune depth (--num-hidden-layers / --search)")


def candidates(src: Layout, budget: float, depth: bool = True, scope: str = "total") -> list[Layout]:
    """Grid shapes with ``(1 - TOLERANCE) * budget <= params <= budget``, largest first (at most MAX_CANDIDATES);
    ``depth=False`` keeps every layer (a width-only search)."""
    from minitron.prune import PruneTargetError

    _check_budget(src, budget, scope)
    g = src.group_size
    groups = sorted({g, max(1, g // 2)}, reverse=True)
    grid = itertools.product({_round(src.hidden_size, f) for f in FRACTIONS},
                             {_round(src.intermediate_size, f) for f in FRACTIONS}, groups,
                             {max(1, round(src.num_hidden_layers * f)) for f in (DEPTH_FRACTIONS if depth else (1.0,))})
    shapes = [src.replace(hidden_size=h, intermediate_size=i, num_attention_heads=src.num_key_value_heads * gs,
                          num_hidden_layers=n) for h, i, gs, n in grid
              if h % (src.num_key_value_heads * gs) == 0]  # transformers wants hidden divisible by the heads
    fit = [s for s in shapes if (1 - TOLERANCE) * budget <= count(s, scope) <= budget]
    if not fit:
        under = [s for s in shapes if count(s, scope) <= budget]
        if not under:
            smallest = min(count(s, scope) for s in shapes)
            raise PruneTargetError(f"no candidate shape meets params={budget:.4g}: the smallest on the grid has "
                                   f"{smallest:,} parameters")
        fit = sorted(under, key=lambda s: -count(s, scope))[:MAX_CANDIDATES]
    fit.sort(key=lambda s: (-count(s, scope), -s.num_hidden_layers, -s.hidden_size))
    return fit[:MAX_CANDIDATES]


# ---------------------------------------------------------------------------------------------- evaluation
def kd_steps(student: Any, teacher: Any, ids: torch.Tensor, steps: int, lr: float = 1e-3, batch_size: int = 4,
             seed: int = 0) -> list[float]:
    """K steps of logit distillation: forward KL(teacher || student) at temperature 1, AdamW. Returns the losses."""
    if steps <= 0:
        return []
    torch.manual_seed(seed)
    dev = next(student.parameters()).device
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    student.train()
    losses = []
    for step in range(steps):
        rows = torch.randint(0, ids.shape[0], (min(batch_size, ids.shape[0]),))
        x = ids[rows].to(dev)
        with torch.no_grad():
            t_logp = F.log_softmax(teacher(input_ids=x, use_cache=False).logits.float(), -1)
        s_logp = F.log_softmax(student(input_ids=x, use_cache=False).logits.float(), -1)
        loss = F.kl_div(s_logp, t_logp, log_target=True, reduction="none").sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    student.eval()
    return losses


def materialize(source: Any, src: Layout, layout: Layout, drop: list[int], scores: dict) -> Any:
    """A pruned copy of the in-memory ``source`` model (same slicing as ``minitron prune``)."""
    from transformers import AutoModelForCausalLM

    from minitron.prune import make_plan, slice_tensor

    plan = make_plan(scores, src, layout, drop)
    ad = get_adapter(source.config)
    state = {}
    for key, value in source.state_dict().items():
        res = slice_tensor(ad, src, plan, key, value)
        if res is not None:
            state[res[0]] = res[1].clone()
    model = AutoModelForCausalLM.from_config(pruned_config(source.config, layout, plan.kept_layers))
    model.load_state_dict(state, strict=True)
    return model.to(next(source.parameters()).device).eval()


def _data(cfg: Any, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out rows for ranking, training rows for the short distillation) from ``cfg.calib``."""
    from minitron.data import DataError, calibration_batch

    n = min(cfg.calib_samples, 32)
    try:
        val = calibration_batch(cfg.calib, tokenizer, n, cfg.calib_seq_len, seed=cfg.seed + 1, split="validation")
    except DataError:  # a single file: disjoint windows are not guaranteed, use another seed
        val = calibration_batch(cfg.calib, tokenizer, n, cfg.calib_seq_len, seed=cfg.seed + 1)
    train = calibration_batch(cfg.calib, tokenizer, max(n, 4 * cfg.search_top_k), cfg.calib_seq_len, seed=cfg.seed + 2)
    return val, train


def search(cfg: Any, config: Any, src: Layout, scores: dict, meta: dict) -> Any:
    """Rank candidate shapes under ``cfg.params``; returns the best as a ``minitron.prune.Target`` with the table."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minitron.prune import Target, choose_drop

    tok = AutoTokenizer.from_pretrained(cfg.model)
    val, train = _data(cfg, tok)
    teacher = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32).eval()
    if torch.cuda.is_available():
        teacher = teacher.cuda()
    rows, n = [], src.num_hidden_layers
    for lay in tqdm(candidates(src, cfg.params, cfg.search_depth, cfg.params_scope), desc="search: loss after pruning"):
        drop = choose_drop(scores, meta, n, n - lay.num_hidden_layers, cfg.depth_metric)
        loss = token_loss(materialize(teacher, src, lay, drop, scores).eval(), val, cfg.batch_size)
        rows.append({"hidden_size": lay.hidden_size, "intermediate_size": lay.intermediate_size,
                     "num_attention_heads": lay.num_attention_heads, "num_key_value_heads": lay.num_key_value_heads,
                     "num_hidden_layers": lay.num_hidden_layers, "params": lay.num_params(), "dropped_layers": drop,
                     "loss_pruned": loss, "loss_distilled": None})
    rows.sort(key=lambda r: r["loss_pruned"])
    for row in tqdm(rows[: cfg.search_top_k], desc=f"search: {cfg.search_steps}-step distillation"):
        lay = src.replace(**{k: row[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                   "num_key_value_heads", "num_hidden_layers")})
        student = materialize(teacher, src, lay, row["dropped_layers"], scores)
        kd_steps(student, teacher, train, cfg.search_steps, seed=cfg.seed)
        row["loss_distilled"] = token_loss(student.eval(), val, cfg.batch_size)
    best = min(rows[: cfg.search_top_k], key=lambda r: r["loss_distilled"])
    for row in rows:
        row["chosen"] = row is best
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")
    return Target(src.replace(**{k: best[k] for k in keys}), drop=best["dropped_layers"], searched=rows)


def write_table(rows: list[dict], out: Path) -> None:
    """search.json and a Markdown table search.md (sorted by loss after pruning; * = chosen)."""
    write_json(out / "search.json", rows)
    head = "| hidden | MLP | heads/KV | layers | params | dropped | loss pruned | loss after KD |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kd = "-" if r["loss_distilled"] is None else f"{r['loss_distilled']:.4f}"
        mark = " *" if r.get("chosen") else ""
        lines.append(f"| {r['hidden_size']} | {r['intermediate_size']} | {r['num_attention_heads']}/"
                     f"{r['num_key_value_heads']} | {r['num_hidden_layers']} | {r['params']:,} | {r['dropped_layers']} "
                     f"| {r['loss_pruned']:.4f} | {kd}{mark} |")
    write_text(out / "search.md", "\n".join(lines) + "\n")
