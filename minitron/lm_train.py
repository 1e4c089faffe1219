"""LM-loss training of a causal LM on a corpus: teacher correction (``minitron correct``), and the trainer behind
the demo teacher, the fine-tuned baselines and the from-scratch baselines.

Teacher correction (Minitron): the original pre-training data is usually unavailable, so the teacher is first
adapted to the data the student will be distilled on (the paper: ~100B tokens at 1/5 of the peak LR). Same data
module, trainer, checkpoints and resume as ``minitron distill``; the loss is the chunked CE of ``minitron.kd_loss``.

    minitron correct --model runs/demo/teacher --data runs/demo/world/corpus --tokens 1000000 \\
        --out runs/demo/teacher-corrected

``reinitialised_copy`` makes the "same shape from random init" baselines that this stage then trains.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from minitron.config import ConfigError, arg, save_resolved
from minitron.distill import StudentLoss, train_rows, val_rows
from minitron.io import atomic_dir, write_model_card
from minitron.fingerprint import of_config, of_path, record
from minitron.model_source import load_model_and_tokenizer, resolve_model
from minitron.trainer import Task, TrainArgs, finished, make_accelerator, train


@dataclasses.dataclass
class LMTrainConfig(TrainArgs):
    model: str = arg(None, "model directory to train (the teacher, for teacher correction)")
    out: str = arg("runs/demo/teacher-corrected", "output directory (standard HF dir)")
    lr: float = arg(2e-5, "peak learning rate (paper: 1/5 of the pre-training peak)")
    min_lr: float = arg(2e-6, "final learning rate of the cosine schedule")
    chunk: int | None = arg(None, "CE loss tokens per chunk (default: ~64 MiB of logits per chunk)")

    def __post_init__(self) -> None:
        self.validate_train()
        if not self.model:
            raise ConfigError("--model is required (the model directory to train, e.g. the teacher to correct)")


def run(cfg: LMTrainConfig, fp: dict | None = None) -> Path:
    """Fine-tune ``cfg.model`` with the LM loss for ``cfg.tokens`` tokens; write ``cfg.out``. ``fp``: the
    fingerprint to record (default: this config's; the teacher passes its own)."""
    out = Path(cfg.out)
    fp = fp or of_config(cfg)
    if finished(cfg, out, fp, "correct"):
        return out
    cfg.model = str(resolve_model(cfg.model))
    accel = make_accelerator(cfg)
    torch.manual_seed(cfg.seed)
    model, tok = load_model_and_tokenizer(cfg.model)
    data = {"input_ids": train_rows(cfg, tok)}
    v = val_rows(cfg, tok)
    module = StudentLoss(model, kd_weight=0.0, ce_weight=1.0, chunk=cfg.chunk)

    def save(mod: StudentLoss, tmp: Path, summary: dict, weights: dict) -> None:
        mod.student.save_pretrained(tmp, state_dict={k.removeprefix("student."): v for k, v in weights.items()
                                                    if k.startswith("student.")})
        tok.save_pretrained(tmp)
        save_resolved(cfg, tmp)
        ce = summary.get("final_val_ce")
        write_model_card(tmp, f"{Path(cfg.model).name} (corrected)", {
            "source": cfg.model, "data": cfg.data, "tokens": f"{summary['tokens']:,}",
            "loss": "LM cross-entropy (teacher correction)",
            "schedule": f"lr {cfg.lr} -> {cfg.min_lr} cosine, batch {cfg.batch_size} x {cfg.seq_len} tokens",
            "final train CE": f"{summary.get('final_train_ce', float('nan')):.4f}",
            "final validation CE": f"{ce:.4f}" if ce is not None else "-"})

    task = Task(module, lambda b: {"input_ids": b["input_ids"]}, save, metric_names=("loss", "ce"))
    train(cfg, task, data, {"input_ids": v} if v is not None else None, out, accel, fp)
    return out


def reinitialised_copy(src: str | Path, out: str | Path, seed: int = 0) -> Path:
    """The architecture of ``src`` with fresh random weights (same tokenizer and generation config) at ``out``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    fp = {"fingerprint": of_path(src) + f"-init{seed}"}
    if Path(out, "config.json").exists() and of_path(out) == fp["fingerprint"]:
        return Path(out)  # the same random init as before: the runs trained from it continue
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))
    try:
        model.generation_config = GenerationConfig.from_pretrained(src)
    except OSError:
        pass
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
        write_model_card(tmp, f"{Path(src).name} (random init)", {"architecture of": str(src), "seed": seed})
        record(tmp, fp)
    return Path(out)
