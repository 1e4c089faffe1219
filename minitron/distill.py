"""Logit distillation of a pruned student from its teacher (forward KL at temperature tau, the Minitron recipe).

    minitron distill --teacher runs/demo/teacher --student runs/demo/pruned-width \\
        --data runs/demo/world/corpus --tokens 2000000 --out runs/demo/distilled-width

Loss per token: ``(1 - alpha) * KL(p_teacher^tau || p_student^tau) + alpha * CE(student, next token)``
(+ ``hidden_weight`` * normalised MSE between mapped decoder-layer outputs, through an identity or learned
projection). The KL is computed chunk by chunk from hidden states and lm_head weights (``minitron.kd_loss``),
so neither model's full logits exist. ``--teacher-logits DIR`` distils from precomputed top-k teacher
log-probs (``minitron.teacher_logits``) without loading the teacher. Training, checkpoints and ``--resume``
are ``minitron.trainer``. The output is the student as a standard HF directory (model card updated) plus
metrics.json, metrics.jsonl and loss_curve.png.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from minitron.config import ConfigError, MinitronError, arg, save_resolved
from minitron.data import DataError, packed_sequences
from minitron.io import read_json, write_model_card
from minitron.kd_loss import fused_kd_loss, liger_available, liger_kd_loss
from minitron.model_source import load_model_and_tokenizer, resolve_model
from minitron.fingerprint import of_config
from minitron.trainer import Task, TrainArgs, finished, make_accelerator, train


class VocabMismatch(MinitronError):
    """Teacher and student do not share a tokenizer / vocabulary, so their distributions cannot be compared."""


@dataclasses.dataclass
class DistillConfig(TrainArgs):
    teacher: str | None = arg(None, "teacher model directory (standard HF dir); not needed with --teacher-logits")
    student: str = arg(None, "student model directory to distil into (usually a pruned teacher)")
    out: str = arg("runs/demo/distilled", "output directory: the distilled student (standard HF dir)")
    tau: float = arg(1.0, "softmax temperature of the KL (the paper's best: 1)")
    alpha: float = arg(0.0, "weight of the LM (next-token CE) loss; the KL gets 1 - alpha (paper: 0, logit-only)")
    hidden_weight: float = arg(0.0, "weight of the intermediate hidden-state loss (0 = off)")
    layer_map: list[int] = arg([], "teacher layer for each student layer (default: identity, or the layers the "
                                   "pruner kept for a depth-pruned student)")
    hidden_proj: str = arg("auto", "hidden-state projection: identity, learned or auto (identity when sizes match)")
    teacher_logits: str | None = arg(None, "precomputed top-k teacher log-probs (minitron.teacher_logits): no teacher "
                                           "in memory; training rows come from this file")
    chunk: int | None = arg(None, "KD loss tokens per chunk (default: ~64 MiB of logits per chunk)")
    use_liger: bool = arg(False, "use Liger's fused linear KL on CUDA when liger_kernel is installed")
    lr: float = arg(1e-4, "peak learning rate (paper: 1e-4 -> 1e-5 cosine)")

    def __post_init__(self) -> None:
        if self.teacher_logits is None:
            self.validate_train()
        if not self.student:
            raise ConfigError("--student is required (the model directory to distil into)")
        if not self.teacher and not self.teacher_logits:
            raise ConfigError("give --teacher DIR or --teacher-logits DIR (precomputed with minitron.teacher_logits)")
        if self.tau <= 0:
            raise ConfigError("--tau must be > 0")
        if not 0 <= self.alpha <= 1:
            raise ConfigError("--alpha must be in [0, 1]")
        if self.hidden_proj not in ("auto", "identity", "learned"):
            raise ConfigError("--hidden-proj must be auto, identity or learned")
        if self.hidden_weight and self.teacher_logits:
            raise ConfigError("--hidden-weight needs the teacher's hidden states: not available with --teacher-logits")


def base_model(model: nn.Module) -> nn.Module:
    """The decoder stack (``model.model`` for Llama-like classes): returns final-norm hidden states."""
    return getattr(model, model.base_model_prefix)


def lm_head_weight(model: nn.Module) -> torch.Tensor:
    """The lm_head weight [V, H]; models whose logits are more than ``h @ W^T`` are refused."""
    head = model.get_output_embeddings()
    cfg = model.config
    if getattr(head, "bias", None) is not None or getattr(cfg, "final_logit_softcapping", None) or \
            getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        raise MinitronError(f"{cfg.model_type}: the lm_head has a bias, softcapping or scaling; the chunked KD loss "
                            "supports plain linear heads (Llama, Mistral, Qwen)")
    return head.weight


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return base_model(model).layers


class LayerTap:
    """Forward hooks that keep the outputs of chosen decoder layers (pre-final-norm) during one forward."""

    def __init__(self, model: nn.Module, layers: list[int]):
        self.states: dict[int, torch.Tensor] = {}
        mods = decoder_layers(model)
        self.handles = [mods[i].register_forward_hook(self._hook(i)) for i in sorted(set(layers))]

    def _hook(self, i: int):
        def fn(_mod, _inp, out):
            self.states[i] = out[0] if isinstance(out, tuple) else out
        return fn

    def take(self, layers: list[int]) -> list[torch.Tensor]:
        states = [self.states[i] for i in layers]
        self.states = {}
        return states


class StudentLoss(nn.Module):
    """The student (+ hidden-state projections) and its training loss: logit KD against the teacher, LM
    cross-entropy and hidden-state matching, each weighted (a zero weight turns a term off). ``forward`` returns
    (loss, stat sums).

    Inputs: input_ids [B, T]; the teacher's final hidden states [B, T, Ht] and lm_head weight [V, Ht] (and
    ``teacher_states``: mapped layer outputs) or top-k ids/log-probs [B, T, k]; ``scale`` multiplies the loss sum.
    With ``kd_weight = 0`` this is plain LM training (chunked CE), as ``minitron.lm_train`` uses it.
    """

    def __init__(self, student: nn.Module, *, tau: float = 1.0, kd_weight: float = 1.0, ce_weight: float = 0.0,
                 hidden_weight: float = 0.0, student_layers: list[int] = (), proj: nn.ModuleList | None = None,
                 chunk: int | None = None, use_liger: bool = False):
        super().__init__()
        self.student, self.proj = student, proj
        self.tau, self.kd_weight, self.ce_weight, self.hidden_weight = tau, kd_weight, ce_weight, hidden_weight
        self.student_layers, self.chunk, self.use_liger = list(student_layers), chunk, use_liger
        self.tap = LayerTap(student, self.student_layers) if hidden_weight else None

    def forward(self, input_ids, scale, teacher_hidden=None, teacher_weight=None, teacher_states=None,
                topk_ids=None, topk_lp=None):
        h = base_model(self.student)(input_ids=input_ids).last_hidden_state  # [B, T, Hs]
        targets = torch.full_like(input_ids, -100)
        targets[:, :-1] = input_ids[:, 1:]
        n_tok, n_ce = input_ids.numel(), input_ids.shape[0] * (input_ids.shape[1] - 1)
        w = lm_head_weight(self.student)
        if self.use_liger and teacher_hidden is not None and liger_available(h.device):
            loss = liger_kd_loss(h, w, teacher_hidden, teacher_weight, targets, tau=self.tau,
                                 kd_weight=self.kd_weight, ce_weight=self.ce_weight, scale=scale)
            kl = ce = torch.full((), float("nan"))
        else:
            loss, kl, ce = fused_kd_loss(h, w, teacher_hidden, teacher_weight, targets, topk_ids=topk_ids,
                                         topk_logprobs=topk_lp, tau=self.tau, kd_weight=self.kd_weight,
                                         ce_weight=self.ce_weight, scale=scale, chunk=self.chunk)
        stats = {"kl": kl, "ce": ce, "n_tokens": torch.tensor(float(n_tok)), "n_ce": torch.tensor(float(n_ce))}
        total = loss.detach() / scale
        if self.hidden_weight:
            hid = self._hidden_loss(teacher_states)
            loss = loss + self.hidden_weight * scale * hid
            stats["hidden"] = hid.detach()
            total = total + self.hidden_weight * hid.detach()
        stats["loss"] = total
        if self.kd_weight == 0 and not self.hidden_weight:  # plain LM loss: no KL, mean over predicted tokens
            del stats["kl"]
            stats["n_loss"] = stats["n_ce"]
        return loss, stats

    def _hidden_loss(self, teacher_states: list[torch.Tensor]) -> torch.Tensor:
        """Sum over tokens of the mean over layers of ||proj(h_s) - h_t||^2 / ||h_t||^2 (per token)."""
        total = 0.0
        for k, s in enumerate(self.tap.take(self.student_layers)):
            t = teacher_states[k].float()
            s = self.proj[k](s).float() if self.proj is not None else s.float()
            total = total + ((s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-6)).sum()
        return total / max(1, len(self.student_layers))


def check_compatible(teacher_dir: str | Path, student_dir: str | Path, teacher_tok, student_tok) -> None:
    """Refuse a pair whose vocabularies differ (size or token -> id mapping)."""
    tv, sv = read_json(Path(teacher_dir) / "config.json"), read_json(Path(student_dir) / "config.json")
    if tv.get("vocab_size") != sv.get("vocab_size"):
        raise VocabMismatch(f"teacher vocab_size {tv.get('vocab_size')} != student vocab_size {sv.get('vocab_size')}: "
                            "distillation compares distributions over the same vocabulary; prune the student from "
                            "this teacher (pruning never changes the vocabulary)")
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        diff = len(set(teacher_tok.get_vocab().items()) ^ set(student_tok.get_vocab().items()))
        raise VocabMismatch(f"teacher and student tokenizers differ ({diff} token/id pairs differ): use the student "
                            "pruned from this teacher, or retokenize one side so both share a tokenizer")


def default_layer_map(student_dir: str | Path, n_student: int, n_teacher: int) -> list[int]:
    """Teacher layer per student layer: the layers the pruner kept (``dropped_layers`` in its metrics.json),
    identity for equal depth, else evenly spaced with the last layers aligned."""
    metrics = Path(student_dir) / "metrics.json"
    if metrics.exists():
        dropped = read_json(metrics).get("dropped_layers") or []
        kept = [i for i in range(n_teacher) if i not in set(dropped)]
        if len(kept) == n_student:
            return kept
    if n_student == n_teacher:
        return list(range(n_student))
    return [round((i + 1) * n_teacher / n_student) - 1 for i in range(n_student)]


def val_rows(cfg: TrainArgs, tokenizer) -> torch.Tensor | None:
    """Validation rows: ``val_tokens`` of ``--val-data`` (default: the 'validation' split of ``--data``)."""
    try:
        return packed_sequences(cfg.val_data or cfg.data, tokenizer, cfg.seq_len, max_tokens=cfg.val_tokens,
                                split="validation", text_field=cfg.text_field)
    except DataError as e:
        print(f"no validation data ({e}); pass --val-data to get validation losses")
        return None


def train_rows(cfg: TrainArgs, tokenizer) -> torch.Tensor:
    """Packed training rows: enough of ``--data`` for the token budget (repeated in epochs when shorter)."""
    return packed_sequences(cfg.data, tokenizer, cfg.seq_len, max_tokens=cfg.tokens + cfg.seq_len,
                            text_field=cfg.text_field)


def _teacher_inputs(cfg: DistillConfig, teacher, accel, t_layers: list[int]):
    """make_inputs for the live teacher: final hidden states (+ mapped layer outputs), no grad."""
    tap = LayerTap(teacher, t_layers) if cfg.hidden_weight else None
    weight = lm_head_weight(teacher)

    @torch.no_grad()
    def make(batch):
        th = base_model(teacher)(input_ids=batch["input_ids"]).last_hidden_state
        states = tap.take(t_layers) if tap else None
        return {"input_ids": batch["input_ids"], "teacher_hidden": th, "teacher_weight": weight,
                "teacher_states": states}
    return make


def _offline_inputs(batch):
    return {"input_ids": batch["input_ids"], "topk_ids": batch["topk_ids"], "topk_lp": batch["topk_lp"]}


def _projections(cfg: DistillConfig, student, teacher, n_layers: int) -> nn.ModuleList | None:
    hs, ht = student.config.hidden_size, teacher.config.hidden_size
    mode = cfg.hidden_proj if cfg.hidden_proj != "auto" else ("identity" if hs == ht else "learned")
    if mode == "identity":
        if hs != ht:
            raise ConfigError(f"--hidden-proj identity needs equal hidden sizes (student {hs}, teacher {ht}): use learned")
        return None
    return nn.ModuleList(nn.Linear(hs, ht, bias=False) for _ in range(n_layers))


def run(cfg: DistillConfig) -> Path:
    """Distil ``cfg.teacher`` (or ``cfg.teacher_logits``) into ``cfg.student``; write ``cfg.out``."""
    out = Path(cfg.out)
    fp = of_config(cfg)
    if finished(cfg, out, fp, "distill"):
        return out
    cfg.student = str(resolve_model(cfg.student, "--student"))
    if not cfg.teacher_logits:
        cfg.teacher = str(resolve_model(cfg.teacher, "--teacher"))
    accel = make_accelerator(cfg)
    torch.manual_seed(cfg.seed)
    student, tok = load_model_and_tokenizer(cfg.student)
    s_layers, t_layers, proj, teacher = [], [], None, None
    if cfg.teacher_logits:
        from minitron.teacher_logits import load_for_distill

        data, val, source = load_for_distill(cfg, tok, student.config.vocab_size)
        make_inputs = _offline_inputs
    else:
        teacher, ttok = load_model_and_tokenizer(cfg.teacher)
        check_compatible(cfg.teacher, cfg.student, ttok, tok)
        teacher.eval().requires_grad_(False).to(accel.device)
        if cfg.hidden_weight:
            n_s, n_t = student.config.num_hidden_layers, teacher.config.num_hidden_layers
            t_layers = cfg.layer_map or default_layer_map(cfg.student, n_s, n_t)
            if len(t_layers) != n_s or not all(0 <= i < n_t for i in t_layers):
                raise ConfigError(f"--layer-map {t_layers}: need {n_s} teacher layer indices in 0..{n_t - 1}")
            s_layers, proj = list(range(n_s)), _projections(cfg, student, teacher, n_s)
        data = {"input_ids": train_rows(cfg, tok)}
        v = val_rows(cfg, tok)
        val = {"input_ids": v} if v is not None else None
        make_inputs, source = _teacher_inputs(cfg, teacher, accel, t_layers), cfg.teacher
    module = StudentLoss(student, tau=cfg.tau, kd_weight=1 - cfg.alpha, ce_weight=cfg.alpha,
                      hidden_weight=cfg.hidden_weight, student_layers=s_layers, proj=proj, chunk=cfg.chunk,
                      use_liger=cfg.use_liger)

    def save(mod: StudentLoss, tmp: Path, summary: dict, weights: dict) -> None:
        mod.student.save_pretrained(tmp, state_dict={k.removeprefix("student."): v for k, v in weights.items()
                                                    if k.startswith("student.")})
        tok.save_pretrained(tmp)
        save_resolved(cfg, tmp)
        _card(cfg, tmp, summary, source)

    task = Task(module, make_inputs, save, metric_names=("loss", "kl", "ce", "hidden"))
    train(cfg, task, data, val, out, accel, fp)
    return out


def _card(cfg: DistillConfig, tmp: Path, summary: dict, teacher_source: str) -> None:
    """The student's model card, updated: teacher, data, tokens, loss and final losses (previous card kept)."""
    prev = Path(cfg.student) / "README.md"
    fmt = lambda k: f"{summary[k]:.4f}" if isinstance(summary.get(k), float) else "-"  # noqa: E731
    fields = {
        "student (before distillation)": cfg.student, "teacher": teacher_source, "data": cfg.data,
        "tokens": f"{summary['tokens']:,}" + ("" if summary["completed"] else f" (stopped at step {summary['steps']})"),
        "loss": f"(1 - {cfg.alpha}) * forward KL(teacher || student) at tau={cfg.tau} + {cfg.alpha} * LM CE"
                + (f" + {cfg.hidden_weight} * hidden-state loss" if cfg.hidden_weight else ""),
        "schedule": f"lr {cfg.lr} -> {cfg.min_lr} cosine, warmup {cfg.warmup_steps} steps, batch {cfg.batch_size} x "
                    f"{cfg.seq_len} tokens",
        "final train KL / CE": f"{fmt('final_train_kl')} / {fmt('final_train_ce')}",
        "final validation KL / CE": f"{fmt('final_val_kl')} / {fmt('final_val_ce')}",
    }
    body = "Distilled with `minitron distill` (metrics.json, metrics.jsonl, loss_curve.png beside this card)."
    if prev.exists():
        body += "\n\n## Before distillation\n\n" + prev.read_text().replace("\n# ", "\n### ").lstrip("# ")
    write_model_card(tmp, f"Distilled {Path(cfg.student).name}", fields, body)
