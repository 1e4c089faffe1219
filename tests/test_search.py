"""Architecture search under a parameter budget: the candidate grid, the budget pick, the short KD, and
``minitron prune --params N --search`` end to end on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from conftest import TINY_TEXT, tiny_config
from minitron.adapters import Layout
from minitron.prune import PruneConfig, PruneTargetError, run
from minitron.scoring import token_loss
from minitron.search import TOLERANCE, budget_layout, candidates, kd_steps

LLAMA31_8B = Layout.from_config(LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                            num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                            head_dim=128))


def test_candidates_fit_the_budget():
    cands = candidates(LLAMA31_8B, 4.5e9)
    assert 1 < len(cands) <= 12
    assert all((1 - TOLERANCE) * 4.5e9 <= c.num_params() <= 4.5e9 for c in cands)
    assert all(c.num_attention_heads % c.num_key_value_heads == 0 and c.head_dim == 128 for c in cands)
    assert [c.num_params() for c in cands] == sorted((c.num_params() for c in cands), reverse=True)
    assert {c.num_hidden_layers for c in cands} != {32}  # depth is searched too


def test_budget_layout_is_the_largest_width_only_shape():
    lay = budget_layout(LLAMA31_8B, 4.5e9)
    assert lay.num_params() <= 4.5e9 and lay.num_hidden_layers == 32 and lay.num_attention_heads == 32
    bigger = lay.replace(hidden_size=lay.hidden_size + 64)
    assert bigger.num_params() > 4.5e9 or bigger.hidden_size > 4096
    with pytest.raises(PruneTargetError, match="no width-only shape meets"):
        budget_layout(LLAMA31_8B, 1e7)  # even hidden 64 needs more (the q/o projections keep 32 x 128)
    with pytest.raises(PruneTargetError, match="no candidate shape meets"):
        candidates(LLAMA31_8B, 1e8)


def test_width_only_candidates_under_a_non_embedding_budget():
    """search_depth=False keeps every layer; params_scope=non_embedding leaves the embeddings out of the count
    (a width student's embedding shrinks with its hidden size, so a total budget lets it keep fewer layer
    parameters than the same budget on a depth student)."""
    budget = 0.5 * LLAMA31_8B.non_embedding_params()
    cands = candidates(LLAMA31_8B, budget, depth=False, scope="non_embedding")
    assert cands and {c.num_hidden_layers for c in cands} == {32}
    assert all((1 - TOLERANCE) * budget <= c.non_embedding_params() <= budget for c in cands)
    assert any(c.num_params() > budget for c in cands)  # the total count would have refused these
    lay = budget_layout(LLAMA31_8B, budget, scope="non_embedding")
    assert lay.non_embedding_params() <= budget < lay.num_params()


def test_short_kd_reduces_the_kl():
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    student = AutoModelForCausalLM.from_config(tiny_config("llama", num_hidden_layers=2))
    ids = torch.randint(0, 512, (8, 16))
    losses = kd_steps(student, teacher, ids, steps=15, lr=3e-3)
    assert len(losses) == 15 and losses[-1] < 0.7 * losses[0]
    assert token_loss(student, ids) > 0


def test_prune_with_search(tiny_model_dir, tmp_path):
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": t}) for t in TINY_TEXT))
    budget = 150_000  # of 192,960
    out = run(PruneConfig(model=str(tiny_model_dir), out=str(tmp_path / "s"), calib=str(calib), calib_samples=8,
                          calib_seq_len=24, params=budget, search=True, search_top_k=2, search_steps=3))
    rows = json.loads((out / "search.json").read_text())
    assert len(rows) >= 2 and sum(r["chosen"] for r in rows) == 1
    assert [r["loss_pruned"] for r in rows] == sorted(r["loss_pruned"] for r in rows)
    assert all(r["loss_distilled"] is not None for r in rows[:2])
    chosen = next(r for r in rows if r["chosen"])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == chosen["params"] <= budget
    assert model.config.hidden_size == chosen["hidden_size"]
    assert model.config.num_hidden_layers == chosen["num_hidden_layers"]
    assert "| loss after KD |" in (out / "search.md").read_text()
