"""Distillation and teacher correction on tiny random models: KL goes down, bad pairs are refused, offline top-k."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY_TEXT, make_tiny_model_dir
from minitron.config import ConfigError


def write_corpus(root: Path) -> Path:
    """A tiny corpus directory with train.jsonl and validation.jsonl (the minitron.data layout)."""
    root.mkdir(parents=True, exist_ok=True)
    for split, texts in [("train", TINY_TEXT), ("validation", TINY_TEXT[::5])]:
        (root / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return root


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_tokenizer):
    """(teacher dir, width+depth-pruned-shaped student dir, corpus dir), random weights."""
    root = tmp_path_factory.mktemp("kd")
    teacher = make_tiny_model_dir(root / "teacher", tiny_tokenizer, seed=1)
    student = make_tiny_model_dir(root / "student", tiny_tokenizer, seed=2, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2)
    return teacher, student, write_corpus(root / "corpus")


def kd_kl(teacher_dir, student_dir, rows) -> float:
    """Mean forward KL(teacher || student) per token on ``rows`` (naive, full logits)."""
    from transformers import AutoModelForCausalLM

    from minitron.kd_loss import naive_kd_loss

    t = AutoModelForCausalLM.from_pretrained(teacher_dir)
    s = AutoModelForCausalLM.from_pretrained(student_dir)
    with torch.no_grad():
        _, kl, _ = naive_kd_loss(s(rows).logits, t(rows).logits)
    return kl.item() / rows.numel()


def distill_cfg(teacher, student, corpus, out, **kw):
    from minitron.distill import DistillConfig

    base = dict(teacher=str(teacher), student=str(student), data=str(corpus), out=str(out), tokens=64 * 32,
                seq_len=32, batch_size=4, micro_batch_size=2, lr=3e-3, min_lr=3e-4, warmup_steps=2, save_every=0,
                log_every=1, val_tokens=256)
    base.update(kw)
    return DistillConfig(**base)


def test_distill_reduces_kl_and_writes_outputs(pair, tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from minitron.data import packed_sequences
    from minitron.distill import run

    teacher, student, corpus = pair
    val = packed_sequences(corpus, tiny_tokenizer, 32, max_tokens=256, split="validation")
    out = run(distill_cfg(teacher, student, corpus, tmp_path / "out"))
    before, after = kd_kl(teacher, student, val), kd_kl(teacher, out, val)
    assert after < 0.8 * before, (before, after)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 16 and metrics["completed"]
    assert abs(metrics["final_val_kl"] - after) < 1e-3 * max(1.0, after)  # trainer's chunked eval == naive KL
    assert (out / "loss_curve.png").stat().st_size > 1000
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "kl", "tokens_per_s", "lr"} <= set(recs[0])
    card = (out / "README.md").read_text()
    assert str(teacher) in card and "2,048" in card
    assert "final validation KL" in card
    AutoModelForCausalLM.from_pretrained(out)  # a standard HF directory


def test_hidden_state_loss_with_depth_map(pair, tmp_path):
    from minitron.distill import default_layer_map, run

    teacher, student, corpus = pair
    (Path(student) / "metrics.json").write_text(json.dumps({"dropped_layers": [1, 3]}))
    try:
        assert default_layer_map(student, 2, 4) == [0, 2]  # the layers the pruner kept
    finally:
        (Path(student) / "metrics.json").unlink()
    assert default_layer_map(student, 2, 4) == [1, 3]  # no record: evenly spaced, last layers aligned
    out = run(distill_cfg(teacher, student, corpus, tmp_path / "out", tokens=4 * 32 * 3, hidden_weight=0.5,
                          alpha=0.3))
    m = json.loads((out / "metrics.json").read_text())
    assert m["final_val_hidden"] > 0 and m["final_val_ce"] > 0


def test_mismatched_vocab_is_refused(pair, tmp_path):
    from minitron.distill import VocabMismatch, run
    from minitron.tokenizer import train_bpe

    teacher, _, corpus = pair
    other = train_bpe([t.upper() for t in TINY_TEXT], vocab_size=400)
    stranger = make_tiny_model_dir(tmp_path / "stranger", other, hidden_size=32, num_hidden_layers=2)
    with pytest.raises(VocabMismatch, match="vocab_size"):
        run(distill_cfg(teacher, stranger, corpus, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_config_errors():
    from minitron.distill import DistillConfig

    with pytest.raises(ConfigError, match="--teacher"):
        DistillConfig(student="s", data="d")
    with pytest.raises(ConfigError, match="alpha"):
        DistillConfig(student="s", teacher="t", data="d", alpha=2)
    with pytest.raises(ConfigError, match="multiple"):
        DistillConfig(student="s", teacher="t", data="d", batch_size=6, micro_batch_size=4)


def test_offline_topk_distillation(pair, tmp_path, tiny_tokenizer):
    from minitron.distill import run
    from minitron.teacher_logits import TeacherLogitsConfig, load_split, run as precompute

    teacher, student, corpus = pair
    logits = precompute(TeacherLogitsConfig(teacher=str(teacher), data=str(corpus), out=str(tmp_path / "tl"),
                                            tokens=64 * 32, seq_len=32, k=16, val_tokens=256, shard_rows=20))
    train = load_split(logits, "train")
    assert train["topk_ids"].shape[-1] == 16 and train["input_ids"].shape[1] == 32
    assert (train["topk_lp"].exp().sum(-1) <= 1 + 1e-5).all()
    out = run(distill_cfg(None, student, None, tmp_path / "out", teacher_logits=str(logits)))
    val = load_split(logits, "validation")

    def topk_kl(model_dir):  # the offline objective (top-k + tail bucket) on the stored validation rows
        from transformers import AutoModelForCausalLM

        from minitron.kd_loss import naive_topk_kd_loss

        with torch.no_grad():
            s = AutoModelForCausalLM.from_pretrained(model_dir)(val["input_ids"]).logits
        return naive_topk_kd_loss(s, val["topk_ids"].long(), val["topk_lp"]).item()

    assert topk_kl(out) < 0.8 * topk_kl(student)
    assert json.loads((out / "metrics.json").read_text())["final_val_kl"] > 0
    with pytest.raises(ConfigError, match="tau"):
        run(distill_cfg(None, student, None, tmp_path / "out2", teacher_logits=str(logits), tau=2.0))


def test_correct_lowers_lm_loss(pair, tmp_path):
    from minitron.lm_train import LMTrainConfig, reinitialised_copy, run

    teacher, _, corpus = pair
    out = run(LMTrainConfig(model=str(teacher), data=str(corpus), out=str(tmp_path / "c"), tokens=8 * 32 * 4,
                            seq_len=32, batch_size=8, micro_batch_size=8, lr=3e-3, warmup_steps=1, log_every=1,
                            val_tokens=256))
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"ce"' in line]
    assert recs[-1]["ce"] < recs[0]["ce"]
    fresh = reinitialised_copy(teacher, tmp_path / "fresh")
    assert (fresh / "tokenizer.json").exists()


@pytest.mark.parametrize("path,target,extra", [
    ("configs/distill/demo.yaml", "minitron.distill:DistillConfig", {"student": "s"}),
    ("configs/distill/llama31-minitron-4b.yaml", "minitron.distill:DistillConfig",
     {"student": "s", "teacher": "t", "data": "d"}),
    ("configs/correct/demo.yaml", "minitron.lm_train:LMTrainConfig", {}),
    ("configs/bench/reproduce.yaml", "minitron.pipeline.bench.reproduce:ReproduceConfig", {}),
])
def test_recipes_parse(path, target, extra):
    """Every recipe of this stage loads into its dataclass and opens with a comment header."""
    from minitron.cli import resolve
    from minitron.config import load_config

    root = Path(__file__).resolve().parents[1]
    assert (root / path).read_text().startswith("# ")
    cls, _ = resolve(target + ":run")
    cfg = load_config(cls, root / path, section=None, overrides=extra)
    if hasattr(cfg, "lr") and "llama31" in path:
        assert (cfg.lr, cfg.min_lr, cfg.tau, cfg.alpha) == (1e-4, 1e-5, 1.0, 0.0)
