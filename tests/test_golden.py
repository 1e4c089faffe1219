"""Golden losses: a few fixed-seed steps of teacher training, distillation and SFT on CPU give the recorded numbers.

A change that moves any of them (data order, loss normalisation, schedule, template, initialisation) fails here
and must say in its commit why the numbers changed; then record the new ones. Recorded with torch 2.13 (CPU),
transformers 5.19, TRL 1.16; the same with 1 or 2 threads.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TINY_TEXT, make_tiny_model_dir
from test_distill import write_corpus
from test_world import SMALL

TOL = dict(rel=0, abs=2e-5)
GOLDEN = {
    "teacher": [5.748583, 5.638759],  # steps 1 and 4 (logged every 10 steps, and the last)
    "teacher_val_ce": 5.592881,
    "distill": [2.861869, 2.818772, 2.766655, 2.700843],
    "sft": [5.626381, 5.635094, 5.568183],
    "sft_eval_loss": 5.515972,
}


def _losses(path: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from minitron.world import WorldConfig, ensure_world

    root = tmp_path_factory.mktemp("golden")
    world = ensure_world(WorldConfig(out=str(root / "world"), **SMALL))
    return root, world


@pytest.fixture(scope="module")
def teacher(runs):
    from minitron.teacher import TeacherConfig, run

    root, world = runs
    return run(TeacherConfig(out=str(root / "teacher"), world_dir=str(world), vocab_size=300, hidden_size=32,
                             intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                             head_dim=16, seq_len=32, batch_size=4, tokens=32 * 4 * 4, eval_items=0, warmup_steps=2))


def test_teacher_training(teacher):
    assert _losses(teacher / "metrics.jsonl") == pytest.approx(GOLDEN["teacher"], **TOL)
    assert json.loads((teacher / "metrics.json").read_text())["final_val_ce"] == \
        pytest.approx(GOLDEN["teacher_val_ce"], **TOL)


def test_distillation(runs):
    from minitron.distill import DistillConfig, run
    from minitron.tokenizer import train_bpe

    root, _ = runs
    tok = train_bpe(TINY_TEXT, vocab_size=512)
    teacher = make_tiny_model_dir(root / "kd_teacher", tok, seed=1)
    student = make_tiny_model_dir(root / "kd_student", tok, seed=2, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2)
    out = run(DistillConfig(teacher=str(teacher), student=str(student), data=str(write_corpus(root / "corpus")),
                            out=str(root / "kd"), tokens=4 * 4 * 32, seq_len=32, batch_size=4, micro_batch_size=2,
                            lr=3e-3, min_lr=3e-4, warmup_steps=2, log_every=1, val_tokens=256, alpha=0.5))
    assert _losses(out / "metrics.jsonl") == pytest.approx(GOLDEN["distill"], **TOL)


def test_sft(runs, teacher):
    from align.pipeline import AlignConfig, run
    from align.sft import SFTArgs
    from minitron.world import WorldFiles

    root, world = runs
    out = run(AlignConfig(model=str(teacher), out=str(root / "aligned"), stages=["sft"], eval_rows=8, max_length=192,
                          **WorldFiles(world).align_data(), sft=SFTArgs(steps=3, lr=1e-3, batch_size=4, logging_steps=1)))
    m = json.loads((out / "sft" / "metrics.json").read_text())
    assert [h["loss"] for h in m["history"] if "loss" in h] == pytest.approx(GOLDEN["sft"], **TOL)
    assert m["eval_loss"] == pytest.approx(GOLDEN["sft_eval_loss"], **TOL)
