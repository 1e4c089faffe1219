"""The pipeline report: every model of a run side by side (the Minitron story in miniature).

For each model: parameters, validation loss on the run's corpus, cloze accuracy on world facts, forward
tokens/s on one fixed batch (same machine, same batch, measured back to back), and the eval harness's
headline metrics (multiple choice, instruction following, RAG, function calling, roleplay) when present.
Writes ``report.json``, ``report.md`` and ``report.png`` under the run's root.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from minitron.io import count_parameters, write_json, write_text

EVAL_COLUMNS = [("mmlu", "acc", "MC (MMLU fmt)"), ("ifeval", "prompt_level_strict_acc", "IFEval strict"),
                ("rag", "f1", "RAG F1"), ("bfcl", "accuracy", "FC acc"), ("roleplay", "win_rate", "roleplay win")]


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


def model_summary(path: Path, corpus: str | None, mc_file: Path | None, seq_len: int = 256) -> dict[str, Any]:
    """Parameters, validation loss, world-fact accuracy and forward tokens/s of one model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minitron.data import packed_sequences
    from minitron.teacher import eval_loss, fact_accuracy

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    row: dict[str, Any] = {"path": str(path), "params": count_parameters(model)}
    if corpus:
        val = packed_sequences(corpus, tok, seq_len, max_tokens=32 * seq_len, split="validation")
        row["val_loss"] = eval_loss(model, val)
        row["fwd_tokens_per_s"] = forward_tokens_per_s(model, val[:8])
    if mc_file is not None and mc_file.exists():
        row["world_mc_cloze"] = fact_accuracy(model, tok, mc_file, limit=100)["world_mc_accuracy"]
    return row


def _eval_metrics(eval_dir: Path) -> dict[str, dict[str, float]]:
    """path -> {column: value} from the eval harness's results.json (if the eval stage ran)."""
    f = eval_dir / "results.json"
    if not f.exists():
        return {}
    out = {}
    for m in json.loads(f.read_text()).get("models", []):
        vals = {}
        for task, metric, col in EVAL_COLUMNS:
            v = m.get("tasks", {}).get(task, {}).get("metrics", {}).get(metric)
            if v is not None:
                vals[col] = v["value"]
        out[str(Path(m.get("path", "")).resolve())] = vals
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int) and v > 10_000:
        return f"{v / 1e6:.2f}M"
    return str(v)


def write_report(root: Path, models: dict[str, Path], timings: dict[str, float], world_dir: Path | None = None,
                 corpus: str | None = None) -> Path:
    """Summarise every model of a run into report.json / report.md / report.png; print the table."""
    corpus = corpus or (str(world_dir / "corpus") if world_dir and (world_dir / "corpus").exists() else None)
    mc_file = world_dir / "mmlu" / "mmlu_test.jsonl" if world_dir else None
    evals = _eval_metrics(root / "eval")
    rows = {}
    for label, path in models.items():
        if Path(path).exists():
            rows[label] = model_summary(Path(path), corpus, mc_file)
            rows[label].update(evals.get(str(Path(path).resolve()), {}))
    cols = ["params", "val_loss", "world_mc_cloze", "fwd_tokens_per_s"] + [c for _, _, c in EVAL_COLUMNS]
    cols = [c for c in cols if any(c in r for r in rows.values())]
    lines = ["# Pipeline report", "", f"Run: `{root}`. Chance on world multiple choice: 0.25.", "",
             "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, r in rows.items():
        lines.append(f"| {label} | " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    lines += ["", "Stage wall-clock seconds: " + ", ".join(f"{k} {v}" for k, v in timings.items()), "",
              "![report](report.png)", ""]
    if (root / "eval" / "report.md").exists():
        lines.append(f"Eval details: [eval/report.md](eval/report.md)")
    write_json(root / "report.json", {"models": rows, "timings_s": timings})
    _plot(rows, root / "report.png")
    out = write_text(root / "report.md", "\n".join(lines) + "\n")
    print("\n".join(lines[:6 + len(rows)]))
    return out


def _plot(rows: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = list(rows)
    for ax, key, title in ((axes[0], "val_loss", "validation loss (lower is better)"),
                           (axes[1], "world_mc_cloze", "world multiple choice (cloze)")):
        vals = [rows[k].get(key, float("nan")) for k in labels]
        ax.bar(range(len(labels)), vals, color="tab:blue")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        for i, label in enumerate(labels):
            ax.annotate(f"{rows[label].get('params', 0) / 1e6:.2f}M", (i, 0), ha="center", va="bottom", fontsize=7)
    axes[1].axhline(0.25, color="gray", ls="--", lw=1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
