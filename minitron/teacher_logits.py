"""Offline teacher logits: store the teacher's top-k log-probs once, then distil without the teacher in memory.

As in DistillKit and NeMo: the teacher runs once over the packed training (and validation) rows and keeps,
per token, the ``k`` most likely next tokens and their log-probabilities at temperature ``tau``. The mass
outside the top k (``1 - sum exp(logprobs)``) is the tail the distillation loss matches as one bucket
(``minitron.kd_loss``). ``minitron distill --teacher-logits DIR`` then trains from the file.

Layout of DIR: ``meta.json`` (teacher, vocabulary fingerprint, k, tau, seq_len, rows per split) and
safetensors shards ``{split}-NNNNN.safetensors`` with ``input_ids`` [n, T] (int64), ``topk_ids`` [n, T, k]
(int32) and ``topk_lp`` [n, T, k] (fp32). About ``8 k`` bytes per token (k = 32: 256 B/token).

    minitron teacher-logits --teacher runs/demo/teacher --data runs/demo/world/corpus --tokens 1000000 \\
        --k 32 --out runs/demo/teacher-logits
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from minitron.config import ConfigError, MinitronError, arg
from minitron.io import atomic_dir, read_json, write_json
from minitron.kd_loss import teacher_topk
from minitron.model_source import load_model_and_tokenizer, resolve_model
from minitron.trainer import TrainArgs


@dataclasses.dataclass
class TeacherLogitsConfig:
    teacher: str = arg(None, "teacher model directory")
    data: str = arg(None, "corpus (a minitron.data source), packed exactly as distillation packs it")
    out: str = arg("runs/demo/teacher-logits", "output directory")
    tokens: int = arg(1_000_000, "training tokens to cover")
    val_tokens: int = arg(32768, "validation tokens (the 'validation' split; 0 = none)")
    val_data: str | None = arg(None, "validation source (default: the 'validation' split of --data)")
    text_field: str = arg("text", "JSON field holding the document text")
    seq_len: int = arg(256, "tokens per packed sequence (distillation must use the same)")
    k: int = arg(32, "teacher log-probs kept per token")
    tau: float = arg(1.0, "temperature of the stored log-probs (distillation must use the same)")
    batch_size: int = arg(8, "sequences per teacher forward")
    shard_rows: int = arg(1024, "sequences per safetensors shard")
    force: bool = arg(False, "overwrite an existing output")

    def __post_init__(self) -> None:
        if not self.teacher or not self.data:
            raise ConfigError("--teacher and --data are required")
        if self.k < 1 or self.tau <= 0 or self.seq_len < 2:
            raise ConfigError("need --k >= 1, --tau > 0 and --seq-len >= 2")


def vocab_fingerprint(tokenizer) -> str:
    """A hash of the token -> id mapping (two tokenizers with equal fingerprints share a vocabulary)."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


@torch.no_grad()
def topk_rows(teacher, rows: torch.Tensor, k: int, tau: float, batch_size: int, device) -> tuple:
    """Top-k ids [n, T, k] and log-probs [n, T, k] of the teacher's next-token distribution for ``rows``."""
    from minitron.distill import base_model, lm_head_weight

    w = lm_head_weight(teacher)
    ids_out, lp_out = [], []
    for i in tqdm(range(0, rows.shape[0], batch_size), desc="teacher top-k", unit="batch"):
        h = base_model(teacher)(input_ids=rows[i : i + batch_size].to(device)).last_hidden_state
        ids, lp = teacher_topk(h @ w.t(), k, tau)  # one micro-batch of logits at a time
        ids_out.append(ids.cpu())
        lp_out.append(lp.cpu())
    return torch.cat(ids_out), torch.cat(lp_out)


def run(cfg: TeacherLogitsConfig) -> Path:
    """Precompute the teacher's top-k log-probs over the packed train (and validation) rows."""
    from minitron.distill import train_rows, val_rows

    out = Path(cfg.out)
    if (out / "meta.json").exists() and not cfg.force:
        print(f"{out} exists: skipping (pass --force to redo)")
        return out
    cfg.teacher = str(resolve_model(cfg.teacher, "--teacher"))
    teacher, tok = load_model_and_tokenizer(cfg.teacher)
    teacher.eval()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher.to(device)
    shim = TrainArgs(data=cfg.data, val_data=cfg.val_data, text_field=cfg.text_field, tokens=cfg.tokens,
                     seq_len=cfg.seq_len, val_tokens=max(cfg.val_tokens, 1))
    splits = {"train": train_rows(shim, tok)}
    if cfg.val_tokens:
        v = val_rows(shim, tok)
        if v is not None:
            splits["validation"] = v
    meta = {"teacher": cfg.teacher, "data": cfg.data, "vocab_size": teacher.config.vocab_size,
            "vocab_fingerprint": vocab_fingerprint(tok), "k": cfg.k, "tau": cfg.tau, "seq_len": cfg.seq_len,
            "splits": {}}
    with atomic_dir(out) as tmp:
        for split, rows in splits.items():
            ids, lp = topk_rows(teacher, rows, cfg.k, cfg.tau, cfg.batch_size, device)
            shards = []
            for j, a in enumerate(range(0, rows.shape[0], cfg.shard_rows)):
                name = f"{split}-{j:05d}.safetensors"
                b = a + cfg.shard_rows
                save_file({"input_ids": rows[a:b].contiguous(), "topk_ids": ids[a:b].contiguous(),
                           "topk_lp": lp[a:b].contiguous()}, str(tmp / name))
                shards.append(name)
            meta["splits"][split] = {"rows": rows.shape[0], "shards": shards}
        write_json(tmp / "meta.json", meta)
    return out


def load_split(path: str | Path, split: str) -> dict[str, torch.Tensor] | None:
    """All shards of ``split`` as {"input_ids", "topk_ids", "topk_lp"} (None when the split was not stored)."""
    meta = read_json(Path(path) / "meta.json")
    if split not in meta["splits"]:
        return None
    parts = [load_file(str(Path(path) / s)) for s in meta["splits"][split]["shards"]]
    return {k: torch.cat([p[k] for p in parts]) for k in ("input_ids", "topk_ids", "topk_lp")}


def load_for_distill(cfg, tokenizer, vocab_size: int) -> tuple[dict, dict | None, str]:
    """(train rows, validation rows, teacher description) for ``DistillConfig.teacher_logits``, after checks."""
    path = Path(cfg.teacher_logits)
    if not (path / "meta.json").exists():
        raise MinitronError(f"{path}: no meta.json; precompute it with `minitron teacher-logits`")
    meta = read_json(path / "meta.json")
    if meta["vocab_size"] != vocab_size or meta["vocab_fingerprint"] != vocab_fingerprint(tokenizer):
        from minitron.distill import VocabMismatch

        raise VocabMismatch(f"{path} was computed with another vocabulary (teacher {meta['teacher']}, vocab_size "
                            f"{meta['vocab_size']}) than the student's ({vocab_size}); recompute it for this pair")
    if meta["tau"] != cfg.tau or meta["seq_len"] != cfg.seq_len:
        raise ConfigError(f"{path} stores tau={meta['tau']}, seq_len={meta['seq_len']}: distil with "
                          f"--tau {meta['tau']} --seq-len {meta['seq_len']} (or recompute the file)")
    train, val = load_split(path, "train"), load_split(path, "validation")
    source = f"{meta['teacher']} (offline top-{meta['k']} log-probs: {path})"
    return train, val, source
