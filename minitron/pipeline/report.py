"""The pipeline report: every model of a run side by side (the Minitron story).

For each model: parameters (all and non-embedding), validation loss on the run's corpus, forward tokens/s on
one fixed batch (same machine, same batch, measured back to back) and, when the recipe names them
(``report:`` section, :class:`ReportConfig`): WikiText-2 perplexity, the loss on a plain-text validation
split (Gutenberg), the KL to the teacher on held-out chat text, world-fact cloze accuracy (demo), and the eval
harness's metrics from every eval run under ``<root>/eval`` (MMLU letter and cloze, IFEval, RAG, BFCL,
roleplay) with their standard errors. Writes ``report.json``, ``report.md`` and ``report.png``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from minitron import fingerprint
from minitron.config import arg
from minitron.io import count_parameters, write_json, write_text
from minitron.world import WorldFiles

EVAL_COLUMNS = [("mmlu", "acc", "MMLU letter"), ("mmlu_cloze", "acc_norm", "MMLU cloze"),
                ("ifeval", "prompt_level_strict_acc", "IFEval strict"), ("ifeval", "inst_level_loose_acc", "IFEval inst loose"),
                ("rag", "f1", "RAG F1"), ("bfcl", "accuracy", "FC acc"), ("roleplay", "win_rate", "roleplay win")]
WIN = "roleplay win"
LM_COLUMNS = ["params", "non_embedding_params", "val_loss", "wikitext2_ppl", "text_val_loss", "chat_kl_to_teacher",
              "world_mc_cloze", "fwd_tokens_per_s"]


@dataclasses.dataclass
class ReportConfig:
    """What the report measures on every model (all optional; ``None`` skips a column)."""

    wikitext: str | None = arg(None, "WikiText-2 raw test rows ({text}); perplexity over non-overlapping windows")
    text_val: str | None = arg(None, "plain-text source whose validation split gives text_val_loss (Gutenberg)")
    chat_val: str | None = arg(None, "held-out chat text ({text} rows) for the KL to the teacher")
    teacher: str | None = arg(None, "the model the KL is measured against (default: the run's teacher)")
    seq_len: int = arg(512, "tokens per window")
    tokens: int = arg(32768, "tokens per measurement (WikiText-2, validation losses, KL)")
    batch_size: int = arg(8, "windows per forward")
    bf16: bool = arg(False, "bf16 autocast for these forwards (fast on AMX CPUs; say so when you report)")


@torch.no_grad()
def forward_tokens_per_s(model: torch.nn.Module, batch: torch.Tensor, repeats: int = 3) -> float:
    """Best-of-``repeats`` forward throughput (tokens/s) on ``batch``."""
    model(input_ids=batch)  # warm-up (allocator, thread pool)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        model(input_ids=batch)
        best = min(best, time.perf_counter() - t)
    return batch.numel() / best


@torch.no_grad()
def token_losses(model: torch.nn.Module, rows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Next-token losses of every predicted position of ``rows`` [N, T] -> [N * (T - 1)]."""
    out = []
    for i in range(0, len(rows), batch_size):
        x = rows[i : i + batch_size]
        logits = model(input_ids=x).logits[:, :-1].float()
        out.append(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                     reduction="none"))
    return torch.cat(out)


@torch.no_grad()
def token_kl(model: torch.nn.Module, teacher: torch.nn.Module, rows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Forward KL(teacher || model) per position of ``rows`` [N, T] -> [N * T]."""
    out = []
    for i in range(0, len(rows), batch_size):
        x = rows[i : i + batch_size]
        log_q = torch.log_softmax(model(input_ids=x).logits.float(), -1)
        log_p = torch.log_softmax(teacher(input_ids=x).logits.float(), -1)
        out.append((log_p.exp() * (log_p - log_q)).sum(-1).reshape(-1))
    return torch.cat(out)


def _mean_se(values: torch.Tensor, rows: int) -> tuple[float, float]:
    """Mean, and its standard error from per-window means (positions inside a window are not independent)."""
    per_row = values.reshape(rows, -1).mean(1)
    se = per_row.std().item() / math.sqrt(rows) if rows > 1 else float("nan")
    return values.mean().item(), se


def model_summary(path: Path, corpus: str | None, mc_file: Path | None, cfg: ReportConfig | None = None,
                  teacher: Any = None) -> dict[str, Any]:
    """Every LM column of one model directory (see the module docstring)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minitron.data import packed_sequences
    from minitron.teacher import fact_accuracy

    cfg = cfg or ReportConfig(seq_len=256, tokens=32 * 256, batch_size=16)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    emb = model.get_input_embeddings().weight.numel()
    row: dict[str, Any] = {"path": str(path), "params": count_parameters(model),
                           "non_embedding_params": count_parameters(model) - emb}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.bf16 else contextlib.nullcontext()
    with autocast:
        if corpus:
            val = packed_sequences(corpus, tok, cfg.seq_len, max_tokens=cfg.tokens, split="validation")
            row["val_loss"], row["val_loss_se"] = _mean_se(token_losses(model, val, cfg.batch_size), len(val))
            row["fwd_tokens_per_s"] = forward_tokens_per_s(model, val[: cfg.batch_size])
        if cfg.text_val:
            val = packed_sequences(cfg.text_val, tok, cfg.seq_len, max_tokens=cfg.tokens, split="validation")
            row["text_val_loss"], row["text_val_loss_se"] = _mean_se(token_losses(model, val, cfg.batch_size), len(val))
        if cfg.wikitext:
            rows = wikitext_rows(cfg.wikitext, tok, cfg.seq_len, cfg.tokens)
            loss, se = _mean_se(token_losses(model, rows, cfg.batch_size), len(rows))
            row["wikitext2_ppl"], row["wikitext2_ppl_se"] = math.exp(loss), math.exp(loss) * se  # delta method
        if cfg.chat_val and teacher is not None:
            rows = packed_sequences(cfg.chat_val, tok, cfg.seq_len, max_tokens=cfg.tokens)
            row["chat_kl_to_teacher"], row["chat_kl_to_teacher_se"] = _mean_se(
                token_kl(model, teacher, rows, cfg.batch_size), len(rows))
    if mc_file is not None and mc_file.exists():
        row["world_mc_cloze"] = fact_accuracy(model, tok, mc_file, limit=100)["world_mc_accuracy"]
    return row


def wikitext_rows(source: str, tokenizer: Any, seq_len: int, max_tokens: int) -> torch.Tensor:
    """WikiText-2 the standard way (GPTQ, SliceGPT): the rows joined by blank lines, cut into windows."""
    from minitron.data import DataError, pack, read_records

    text = "\n\n".join(str(r.get("text", "")) for _, _, r in read_records(source, "test"))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: max_tokens]
    if len(ids) < seq_len:
        raise DataError(f"{source}: {len(ids)} tokens, fewer than one window of {seq_len}")
    return pack(torch.tensor(ids), seq_len)


def eval_metrics(eval_dir: Path) -> dict[str, dict[str, Any]]:
    """path -> {column: value, column_se: stderr, column_n: n} from every results.json under ``eval_dir``; results
    recorded for other weights than those now at the path (a stage redone since) are left out."""
    out: dict[str, dict[str, Any]] = {}
    files = [eval_dir / "results.json"] + sorted(eval_dir.glob("*/results.json")) if eval_dir.exists() else []
    for f in files:
        if not f.exists():
            continue
        for m in json.loads(f.read_text()).get("models", []):
            path = Path(m.get("path", "")).resolve()
            if m.get("fingerprint") and path.is_dir() and fingerprint.of_path(path) != m["fingerprint"]:
                continue
            vals = out.setdefault(str(path), {})
            for task, metric, col in EVAL_COLUMNS:
                v = m.get("tasks", {}).get(task, {}).get("metrics", {}).get(metric)
                if v is not None:
                    vals[col], vals[f"{col}_se"], vals[f"{col}_n"] = v["value"], v.get("stderr"), v.get("n")
    return out


LOWER_IS_BETTER = {"val_loss", "wikitext2_ppl", "text_val_loss"}


def retention(rows: dict[str, dict], reference: str = "teacher") -> dict[str, dict[str, float]]:
    """Each distilled student's share of the reference's quality per metric: student / teacher for scores,
    teacher / student for losses and perplexity (1.0 = fully retained)."""
    ref = rows.get(reference, {})
    out = {}
    for label, r in rows.items():
        if not label.endswith("distilled"):
            continue
        cols = [c for c in ["val_loss", "wikitext2_ppl", "text_val_loss"] + [c for _, _, c in EVAL_COLUMNS]
                if isinstance(r.get(c), float) and isinstance(ref.get(c), float) and ref[c] and r[c]]
        out[label] = {c: (ref[c] / r[c] if c in LOWER_IS_BETTER else r[c] / ref[c]) for c in cols}
    return out


def _fmt(v: Any, se: Any = None) -> str:
    if isinstance(v, float):
        text = f"{v:.3f}" if abs(v) < 100 else f"{v:,.0f}"
        if isinstance(se, float) and not math.isnan(se):
            text += f" ± {se:.3f}" if abs(v) < 100 else f" ± {se:,.0f}"
        return text
    if isinstance(v, int) and v > 10_000:
        return f"{v / 1e6:.2f}M"
    return str(v)


def write_report(root: Path, models: dict[str, Path], timings: dict[str, float], world_dir: Path | None = None,
                 corpus: str | None = None, cfg: ReportConfig | None = None, teacher: Path | None = None) -> Path:
    """Summarise every model of a run into report.json / report.md / report.png; print the table."""
    from transformers import AutoModelForCausalLM

    corpus = corpus or (str(world_dir / "corpus") if world_dir and (world_dir / "corpus").exists() else None)
    mc_file = WorldFiles(world_dir).mmlu_test if world_dir else None
    evals = eval_metrics(root / "eval")
    ref = None
    if cfg is not None and cfg.chat_val and (cfg.teacher or teacher):
        ref = AutoModelForCausalLM.from_pretrained(cfg.teacher or teacher, dtype=torch.float32).eval()
    rows = {}
    for label, path in models.items():
        if Path(path).exists():
            rows[label] = model_summary(Path(path), corpus, mc_file, cfg, ref)
            rows[label].update(evals.get(str(Path(path).resolve()), {}))
    cols = [c for c in LM_COLUMNS + [c for _, _, c in EVAL_COLUMNS] if any(c in r for r in rows.values())]
    lines = ["# Pipeline report", "", f"Run: `{root}`. Values ± one standard error where one applies "
             "(losses and KL: over windows; accuracies: over items).", "", *_metric_table(rows, cols)]
    kept = retention(rows)
    if any(kept.values()):
        cols_r = sorted({c for v in kept.values() for c in v}, key=lambda c: (LM_COLUMNS + [x for _, _, x in EVAL_COLUMNS]).index(c))
        lines += ["", "Retention of the teacher (student / teacher for scores, teacher / student for losses):", "",
                  "| model | " + " | ".join(cols_r) + " |", "|---" * (len(cols_r) + 1) + "|"]
        for label, v in kept.items():
            lines.append(f"| {label} | " + " | ".join(f"{v[c]:.2f}" if c in v else "" for c in cols_r) + " |")
    lines += ["", "Items per eval metric: " + _item_counts(rows, [c for _, _, c in EVAL_COLUMNS]),
              "", "Stage wall-clock seconds: " + ", ".join(f"{k} {v}" for k, v in timings.items()), "",
              "![report](report.png)", ""]
    for f in [root / "eval" / "report.md"] + sorted((root / "eval").glob("*/report.md")):
        if f.exists():
            lines.append(f"Eval details: [{f.relative_to(root)}]({f.relative_to(root)})")
    write_json(root / "report.json", {"models": rows, "timings_s": timings, "retention": kept,
                                      "report_config": dataclasses.asdict(cfg) if cfg else None})
    _plot(rows, root / "report.png")
    out = write_text(root / "report.md", "\n".join(lines) + "\n")
    print("\n".join(lines[:6 + len(rows)]))
    return out


def _metric_table(rows: dict[str, dict], cols: list[str]) -> list[str]:
    """A Markdown table, one row per model, each value with "± s.e." where it has one."""
    return ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"] + [
        f"| {label} | " + " | ".join(_fmt(r.get(c, ""), r.get(f"{c}_se")) for c in cols) + " |"
        for label, r in rows.items()]


def _item_counts(rows: dict[str, dict], cols: list[str]) -> str:
    """"col: n=N; ..." for every column that recorded its number of items ("-" for none)."""
    ns = sorted({f"{c}: n={r[c + '_n']}" for r in rows.values() for c in cols if r.get(c + "_n")})
    return "; ".join(ns) if ns else "-"


def alignment_benchmarks(rows: dict[str, dict], baseline: str, final: str, must_beat: list[str],
                         must_hold: list[str] | str) -> dict[str, Any]:
    """The aligned model against the unaligned student on every eval metric both have: the difference, its
    standard error (sqrt(se_a^2 + se_b^2)) and a verdict (better / same / worse at two standard errors).

    The roleplay win rate is measured against ``baseline`` itself (the eval's ``roleplay_baseline``), so the
    baseline's own value is a tie, 0.5. ``must_beat`` metrics fail the guard unless better; ``must_hold`` ones ("all" for every metric) fail when worse.
    Returns ``{"rows": [...], "failed": [...], "markdown": str}`` for the other models of ``rows`` too.
    """
    base, fin = dict(rows.get(baseline, {})), rows.get(final, {})
    if isinstance(fin.get(WIN), float) and WIN not in base:
        base[WIN], base[f"{WIN}_se"] = 0.5, 0.0  # the roleplay eval judged against the baseline itself: a tie
    cols = [c for _, _, c in EVAL_COLUMNS if isinstance(base.get(c), float) and isinstance(fin.get(c), float)]
    hold = cols if must_hold == "all" else list(must_hold)
    out, failed = [], []
    for c in cols:
        diff = fin[c] - base[c]
        se = math.sqrt((fin.get(f"{c}_se") or 0.0) ** 2 + (base.get(f"{c}_se") or 0.0) ** 2)
        verdict = "better" if diff > 2 * se else "worse" if diff < -2 * se else "same"
        need = "beat" if c in must_beat else "hold" if c in hold else ""
        ok = {"beat": verdict == "better", "hold": verdict != "worse", "": True}[need]
        if not ok:
            failed.append(c)
        out.append({"metric": c, "baseline": base[c], "final": fin[c], "diff": diff, "diff_se": se,
                    "verdict": verdict, "guard": need, "pass": ok})
    scored = {k: r for k, r in rows.items() if any(isinstance(r.get(c), float) for c in cols)}
    md = _metric_table(scored, cols)
    md += ["", f"{final} against {baseline} (difference ± s.e. of the difference; guard: beat = better by more than "
           "two s.e., hold = not worse by more than two):", "", "| metric | difference | verdict | guard |",
           "|---|---|---|---|"]
    md += [f"| {r['metric']} | {r['diff']:+.3f} ± {r['diff_se']:.3f} | {r['verdict']} | "
           f"{(r['guard'] + (' ok' if r['pass'] else ' FAILED')) if r['guard'] else '-'} |" for r in out]
    md += ["", "Items per metric: " + _item_counts(scored, cols)]
    return {"rows": out, "failed": failed, "markdown": "\n".join(md)}


def _plot(rows: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("val_loss", "wikitext2_ppl", "chat_kl_to_teacher", "world_mc_cloze", "MMLU cloze", "IFEval strict")
            if any(k in r for r in rows.values())][:4]
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(5 * max(len(keys), 1), 4.5), squeeze=False)
    labels = list(rows)
    for ax, key in zip(axes[0], keys):
        vals = [rows[k].get(key, float("nan")) for k in labels]
        errs = [rows[k].get(f"{key}_se") or 0 for k in labels]
        ax.bar(range(len(labels)), vals, yerr=errs, color="tab:blue")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(key)
        if key == "wikitext2_ppl":
            ax.set_yscale("log")
        for i, label in enumerate(labels):
            ax.annotate(f"{rows[label].get('params', 0) / 1e6:.1f}M", (i, 0), ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
