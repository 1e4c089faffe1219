"""``minitron bench reproduce``: the Minitron claim, small, on real text (Project Gutenberg).

A teacher Llama is trained from scratch on ``../shared/data/lm/gutenberg``, pruned to a 50%-width and a
50%-depth student (``minitron.prune``), and each student is compared after the same budget of B tokens:

(a) pruned, no training; (b) pruned + LM-loss fine-tuning (B); (c) pruned + logit distillation (B);
(d) teacher correction first (the teacher fine-tuned on the distillation data), then prune + distil (B);
(e) the same shape from random init with B, 4B, 16B... tokens (LM loss); (f) "SGD-style" sequence-level
distillation: the pruned student fine-tuned on B tokens of teacher-generated text.

Reported: validation loss / perplexity on Gutenberg validation and on WikiText-2 test, and the smallest
token multiple at which from-scratch training matches the distilled student. Results go to
``bench/results/reproduce{_scale}.{json,md,png}``; models to ``runs/reproduce-<scale>/`` (every stage is the
core's, so a rerun keeps what its fingerprint says is up to date). ``--scale default`` is sized for <= 60 min on 2 idle CPU cores; ``--scale small`` is a
smoke run; every size is a config field, so a GPU run scales by config (``configs/bench/reproduce.yaml``).

    minitron bench reproduce --scale small
    minitron bench reproduce --config configs/bench/reproduce.yaml
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from minitron.config import ConfigError, arg
from minitron.io import write_json, write_text

SCALES = {  # field overrides per scale (the dataclass defaults are the "default" scale)
    "small": dict(vocab_size=512, hidden_size=64, intermediate_size=192, num_layers=4, num_heads=4, num_kv_heads=2,
                  seq_len=64, teacher_tokens=150_000, budget_tokens=20_000, correction_tokens=10_000,
                  scratch_multiples=[1, 4], eval_tokens=8192, calib_samples=16, batch_size=16, micro_batch_size=16,
                  tokenizer_docs=40),
}


@dataclasses.dataclass
class ReproduceConfig:
    scale: str = arg("default", "default (<= 60 min on 2 idle cores) or small (a smoke run); fields below override")
    data: str = arg("../shared/data/lm/gutenberg", "training / distillation corpus (train and validation splits)")
    wikitext: str = arg("../shared/data/lm/wikitext2/wikitext2_raw_test.jsonl", "WikiText-2 test rows")
    workdir: str | None = arg(None, "where the models go (default: runs/reproduce-<scale>)")
    results: str = arg("bench/results", "where the JSON, Markdown table and PNG go")
    vocab_size: int = arg(2048, "BPE vocabulary trained on the corpus")
    tokenizer_docs: int = arg(100, "books used to train the tokenizer")
    hidden_size: int = arg(192, "teacher hidden size (the width student gets half)")
    intermediate_size: int = arg(512, "teacher MLP size (the width student gets half)")
    num_layers: int = arg(6, "teacher layers (the depth student gets half)")
    num_heads: int = arg(6, "teacher query heads (head_dim 32; kept by the width student, as in Minitron-4B-Width)")
    num_kv_heads: int = arg(2, "teacher KV heads")
    seq_len: int = arg(128, "tokens per packed sequence")
    batch_size: int = arg(32, "sequences per optimizer step")
    micro_batch_size: int = arg(16, "sequences per forward")
    teacher_tokens: int = arg(3_000_000, "teacher pre-training tokens")
    teacher_lr: float = arg(2e-3, "teacher (and from-scratch) peak LR")
    budget_tokens: int = arg(300_000, "B: tokens for (b), (c), (d), (f) and the unit of (e)")
    student_lr: float = arg(1e-3, "peak LR of LM fine-tuning and distillation (cosine to 1/10)")
    correction_tokens: int = arg(150_000, "teacher-correction tokens for (d) (at teacher_lr / 5)")
    scratch_multiples: list[int] = arg([1, 4, 16], "(e): from-scratch budgets in units of B")
    calib_samples: int = arg(64, "pruning calibration sequences")
    eval_tokens: int = arg(65536, "tokens of each validation set")
    seed: int = arg(0, "seed")

    def __post_init__(self) -> None:
        if self.scale not in ("default", "small"):
            raise ConfigError("--scale must be default or small")
        if self.hidden_size % 2 or self.intermediate_size % 2 or self.num_layers % 2:
            raise ConfigError("hidden_size, intermediate_size and num_layers must be even (50% students)")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError("num_heads must be a multiple of num_kv_heads")


def scaled(cfg: ReproduceConfig) -> ReproduceConfig:
    """Apply the scale's overrides to every field still at its default (explicit values win)."""
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cfg)}
    over = {k: v for k, v in SCALES.get(cfg.scale, {}).items() if getattr(cfg, k) == defaults[k]}
    return dataclasses.replace(cfg, **over)


def train_kw(cfg: ReproduceConfig, tokens: int, lr: float, data: str | None = None) -> dict:
    """TrainArgs fields shared by every training run of the reproduction."""
    return dict(data=data or cfg.data, val_data=cfg.data, tokens=tokens, seq_len=cfg.seq_len,
                batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size, lr=lr, min_lr=lr / 10,
                warmup_steps=max(1, min(50, tokens // (cfg.batch_size * cfg.seq_len) // 10)), seed=cfg.seed,
                save_every=200, log_every=10, val_tokens=min(cfg.eval_tokens, 16384))


def make_teacher_init(cfg: ReproduceConfig, out: Path) -> Path:
    """The random-init teacher, made by the teacher builder (``minitron.teacher``: a BPE on the corpus's first
    ``tokenizer_docs`` x 200k characters, a Llama of the configured shape); kept while its fingerprint matches."""
    from minitron.fingerprint import of_config, of_path, record
    from minitron.io import is_model_dir, save_model_dir
    from minitron.teacher import TeacherConfig, build_model, build_tokenizer

    tcfg = TeacherConfig(out=str(out), data=cfg.data, vocab_size=cfg.vocab_size,
                         tokenizer_chars=cfg.tokenizer_docs * 200_000, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                         num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=32,
                         seq_len=max(1024, cfg.seq_len), seed=cfg.seed)
    fp = of_config(tcfg)
    if is_model_dir(out) and of_path(out) == fp["fingerprint"]:
        return out
    tok = build_tokenizer(cfg.data, tcfg)
    save_model_dir(build_model(tcfg, tok), tok, out, card={"init": "random"}, title="reproduction teacher init")
    record(out, fp)
    return out


def lm_train(cfg: ReproduceConfig, model: Path, out: Path, tokens: int, lr: float, data: str | None = None) -> Path:
    """LM-loss training (minitron.lm_train) of ``model`` for ``tokens``."""
    from minitron.lm_train import LMTrainConfig, run

    return run(LMTrainConfig(model=str(model), out=str(out), **train_kw(cfg, tokens, lr, data)))


def distil(cfg: ReproduceConfig, teacher: Path, student: Path, out: Path) -> Path:
    """Logit distillation (forward KL, tau 1) of ``student`` from ``teacher`` for B tokens."""
    from minitron.distill import DistillConfig, run

    return run(DistillConfig(teacher=str(teacher), student=str(student), out=str(out),
                             **train_kw(cfg, cfg.budget_tokens, cfg.student_lr)))


def prune(cfg: ReproduceConfig, teacher: Path, out: Path, kind: str) -> Path:
    """The 50%-width or 50%-depth student of ``teacher`` (minitron.prune)."""
    from minitron.prune import PruneConfig, run

    shape = (dict(hidden_size=cfg.hidden_size // 2, intermediate_size=cfg.intermediate_size // 2) if kind == "width"
             else dict(num_hidden_layers=cfg.num_layers // 2))
    return run(PruneConfig(model=str(teacher), out=str(out), calib=cfg.data, calib_samples=cfg.calib_samples,
                           calib_seq_len=cfg.seq_len, **shape))


def generated_corpus(cfg: ReproduceConfig, teacher: Path, out: Path) -> Path:
    """(f): B tokens of text sampled from the teacher (temperature 1), prompted with BOS + 4 corpus tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minitron.data import packed_sequences

    target = out / "train.jsonl"
    if target.exists():
        return out
    tok = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    prompts = packed_sequences(cfg.data, tok, 5, max_tokens=5 * 4096, split="validation")[:, :5]
    rows, made, g = [], 0, torch.Generator().manual_seed(cfg.seed)
    bar = __import__("tqdm").tqdm(total=cfg.budget_tokens, desc="(f) teacher-generated text", unit="tok")
    while made < cfg.budget_tokens:
        idx = torch.randint(0, prompts.shape[0], (32,), generator=g)
        with torch.no_grad():
            seq = model.generate(prompts[idx], do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                                 max_new_tokens=cfg.seq_len, min_new_tokens=cfg.seq_len, use_cache=True)
        rows += [json.dumps({"text": tok.decode(s[1:], skip_special_tokens=True)}) for s in seq]
        made += seq.numel()
        bar.update(seq.numel())
    out.mkdir(parents=True, exist_ok=True)
    write_text(target, "\n".join(rows) + "\n")
    return out


def run(cfg: ReproduceConfig) -> dict:
    """Build every model of the comparison (skipping finished ones), evaluate, write JSON + Markdown + PNG."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minitron.data import packed_sequences
    from minitron.scoring import token_loss

    cfg = scaled(cfg)
    t0 = time.time()
    work = Path(cfg.workdir or f"runs/reproduce-{cfg.scale}")
    B = cfg.budget_tokens
    init = make_teacher_init(cfg, work / "teacher-init")
    teacher = lm_train(cfg, init, work / "teacher", cfg.teacher_tokens, cfg.teacher_lr)
    corrected = lm_train(cfg, teacher, work / "teacher-corrected", cfg.correction_tokens, cfg.teacher_lr / 5)
    gen = generated_corpus(cfg, teacher, work / "teacher-generated")
    models = {("teacher", "-", "teacher", cfg.teacher_tokens): teacher,
              ("teacher", "-", "teacher corrected", cfg.teacher_tokens + cfg.correction_tokens): corrected}
    for kind in ("width", "depth"):
        pruned = prune(cfg, teacher, work / f"{kind}-pruned", kind)
        models[(kind, "a", "pruned, no training", 0)] = pruned
        models[(kind, "b", "pruned + LM loss", B)] = lm_train(cfg, pruned, work / f"{kind}-lm", B, cfg.student_lr)
        models[(kind, "c", "pruned + distillation", B)] = distil(cfg, teacher, pruned, work / f"{kind}-kd")
        pruned_c = prune(cfg, corrected, work / f"{kind}-pruned-corrected", kind)
        models[(kind, "d", "corrected teacher, pruned + distillation", B)] = distil(
            cfg, corrected, pruned_c, work / f"{kind}-kd-corrected")
        for m in cfg.scratch_multiples:
            from minitron.lm_train import reinitialised_copy

            init_s = work / f"{kind}-scratch-init"
            if not (init_s / "config.json").exists():
                reinitialised_copy(pruned, init_s, seed=cfg.seed)
            models[(kind, "e", f"random init + LM loss, {m}B", m * B)] = lm_train(
                cfg, init_s, work / f"{kind}-scratch-{m}B", m * B, cfg.teacher_lr)
        models[(kind, "f", "pruned + LM loss on teacher-generated text", B)] = lm_train(
            cfg, pruned, work / f"{kind}-seqkd", B, cfg.student_lr, data=str(gen))
    tok = AutoTokenizer.from_pretrained(teacher)
    val = {"gutenberg": packed_sequences(cfg.data, tok, cfg.seq_len, cfg.eval_tokens, split="validation"),
           "wikitext2": packed_sequences(cfg.wikitext, tok, cfg.seq_len, cfg.eval_tokens, split="test")}
    rows = []
    for (student, case, method, tokens), path in models.items():
        r = {"student": student, "case": case, "method": method, "train_tokens": tokens, "dir": str(path)}
        for name, data in val.items():
            loss = token_loss(AutoModelForCausalLM.from_pretrained(path).eval(), data)
            r[f"{name}_loss"], r[f"{name}_ppl"] = round(loss, 4), round(math.exp(loss), 2)
        rows.append(r)
    result = {"scale": cfg.scale, "config": dataclasses.asdict(cfg), "rows": rows,
              "token_multiple_to_match_distilled": match_multiples(rows), "wall_s": round(time.time() - t0, 1)}
    return write_results(cfg, result)


def match_multiples(rows: list[dict]) -> dict:
    """Per student: the smallest from-scratch multiple of B whose Gutenberg loss <= the distilled (c) loss."""
    out = {}
    for student in ("width", "depth"):
        kd = next(r for r in rows if r["student"] == student and r["case"] == "c")
        scratch = sorted((r["train_tokens"], r["gutenberg_loss"]) for r in rows
                         if r["student"] == student and r["case"] == "e")
        hit = next((t // kd["train_tokens"] for t, loss in scratch if loss <= kd["gutenberg_loss"]), None)
        out[student] = hit if hit is not None else f"> {scratch[-1][0] // kd['train_tokens']} (not matched)"
    return out


def write_results(cfg: ReproduceConfig, result: dict) -> dict:
    """reproduce[_small].json, .md (table) and .png (loss vs training tokens) under ``cfg.results``."""
    stem = Path(cfg.results) / ("reproduce" if cfg.scale == "default" else f"reproduce_{cfg.scale}")
    write_json(stem.with_suffix(".json"), result)
    lines = [f"# Minitron claim, reproduced small ({cfg.scale} scale)", "",
             f"Teacher: Llama hidden {cfg.hidden_size}, {cfg.num_layers} layers, trained from scratch on "
             f"{cfg.teacher_tokens:,} Gutenberg tokens; B = {cfg.budget_tokens:,} tokens. Loss = nats/token.", "",
             "| student | case | method | train tokens | Gutenberg val loss | ppl | WikiText-2 test loss | ppl |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['student']} | {r['case']} | {r['method']} | {r['train_tokens']:,} | {r['gutenberg_loss']} | "
                     f"{r['gutenberg_ppl']} | {r['wikitext2_loss']} | {r['wikitext2_ppl']} |")
    lines += ["", "From-scratch token multiple (of B) needed to match the distilled student (c): "
              + ", ".join(f"{k}: {v}" for k, v in result["token_multiple_to_match_distilled"].items()),
              "", f"Wall time: {result['wall_s']} s."]
    write_text(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    plot(result["rows"], stem.with_suffix(".png"))
    print("\n".join(lines))
    return result


def plot(rows: list[dict], path: Path) -> None:
    """Gutenberg validation loss against training tokens: the from-scratch curve and each method as a marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    teacher = next(r for r in rows if r["method"] == "teacher")["gutenberg_loss"]
    for ax, student in zip(axes, ("width", "depth")):
        mine = [r for r in rows if r["student"] == student]
        scratch = sorted((r["train_tokens"], r["gutenberg_loss"]) for r in mine if r["case"] == "e")
        ax.plot(*zip(*scratch), "k-o", label="(e) random init + LM loss")
        for r in mine:
            if r["case"] in "abcdf":
                ax.scatter(max(r["train_tokens"], 1), r["gutenberg_loss"], s=50, label=f"({r['case']}) {r['method']}")
        ax.axhline(teacher, ls="--", c="gray", label="teacher")
        ax.set_xscale("log")
        ax.set_title(f"50% {student} student")
        ax.set_xlabel("training tokens of the student")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Gutenberg validation loss (nats/token)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
