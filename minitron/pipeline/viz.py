"""Helpers for the walkthrough notebooks (``notebooks/``): a run to look at, and the figures they show.

The notebooks inspect a finished ``make demo`` run (``runs/demo``). When it is absent, or in small mode (the
test suite), ``small_run`` builds a miniature of it with the same pipeline code (tiny world, tiny teacher, a
few hundred training tokens) so that every notebook works on a fresh clone in a minute or two. Figures are
plain ``matplotlib.figure.Figure`` objects (no pyplot state): a notebook displays one by ending a cell with it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from minitron.world import WorldFiles

# A miniature of configs/demo.yaml: every stage of the story in about a minute on two cores.
SMALL_RECIPE: dict[str, Any] = {
    "world": {"n_entities": 30, "n_rag_entities": 8, "corpus_repeats": 2, "n_mc_test": 40, "n_ifeval": 14,
              "n_rag": 9, "n_bfcl": 4, "n_sft": 40, "n_preference": 30, "n_roleplay_eval": 4},
    "teacher": {"vocab_size": 400, "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 4,
                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "seq_len": 64,
                "batch_size": 4, "tokens": 3072, "eval_items": 8},
    "prune": {"calib_samples": 8, "calib_seq_len": 64},
    "students": {"width": {"hidden_size": 32, "intermediate_size": 64}, "depth": {"num_hidden_layers": 2}},
    "distill": {"tokens": 1024, "seq_len": 64, "batch_size": 4, "micro_batch_size": 4, "val_tokens": 512},
}
SMALL_DIR = "runs/notebooks-small"


def project_root() -> Path:
    """The repository root (notebooks run from ``notebooks/``; run paths are relative to the root)."""
    return Path(__file__).resolve().parents[2]


def small_run(run: str | Path, small: bool, need: list[str], report: bool = False) -> Path:
    """``run`` if it holds every path in ``need`` (and ``small`` is off), else a small run built or resumed.

    The small run lives in ``run`` itself in small mode, else in ``runs/notebooks-small``; finished stages are
    skipped, so the three notebooks share one. ``report`` also writes the pipeline report (report.json).
    """
    from minitron.pipeline.recipe import PipelineConfig, run as run_pipeline

    root = Path(run)
    missing = [p for p in need if not (root / p).exists()]
    if not small and not missing:
        print(f"showing the finished run in {root}")
        return root
    out = root if small else Path(SMALL_DIR)
    print(f"small mode: building {out}" if small else f"{root} lacks {missing}: building a small run in {out}")
    stages = ["world", "teacher", "prune", "distill"] + (["report"] if report else [])
    run_pipeline(PipelineConfig(out=str(out), stages=stages, **SMALL_RECIPE))
    return out


def small_align_config(root: Path, model: Path) -> Any:
    """SFT -> RM -> DPO -> RLOO at two steps each on tiny batches (a smoke run that still measures each stage)."""
    from align.dpo import DPOArgs
    from align.pipeline import AlignConfig
    from align.reward import RMArgs
    from align.rl import RLArgs
    from align.sft import SFTArgs

    return AlignConfig(model=str(model), out=str(root / "aligned"), max_steps=2, eval_rows=4, max_length=192,
                       **WorldFiles(root / "world").align_data(), sft=SFTArgs(batch_size=4, lr=1e-3, logging_steps=1),
                       rm=RMArgs(batch_size=4, lr=1e-3, logging_steps=1), dpo=DPOArgs(batch_size=2, logging_steps=1),
                       rl=RLArgs(batch_size=2, num_generations=2, max_completion_length=8, eval_prompts=4,
                                 logging_steps=1))


def small_eval_config(root: Path, models: dict[str, Path]) -> Any:
    """The demo suite on the run's world, two items per task (per MMLU subject / BFCL category)."""
    from evals.harness import EvalConfig

    rm = root / "aligned" / "rm"
    tasks = "mmlu,ifeval,rag,bfcl" + (",roleplay" if (rm / "config.json").exists() else "")
    return EvalConfig(model=[str(p) for p in models.values()], names=list(models), suite=tasks,
                      out=str(root / "eval"), limit=2, **WorldFiles(root / "world").eval_data(), judge_model=str(rm),
                      ifeval_max_new_tokens=24, rag_max_new_tokens=16, bfcl_max_new_tokens=32,
                      roleplay_max_new_tokens=24)


# ------------------------------------------------------------------------------------------------ figures
def importance_figure(scores: dict[str, torch.Tensor], keep_hidden: int | None = None) -> Figure:
    """Per-layer heatmaps of head and neuron importance, hidden channels, and the layer metrics side by side.

    ``keep_hidden`` marks the channels a width-pruned student keeps (the top-k hidden scores).
    """
    fig = Figure(figsize=(13, 7), layout="constrained")
    ax = fig.subplots(2, 2)
    for a, key, title in ((ax[0, 0], "heads", "attention heads"), (ax[0, 1], "neurons", "MLP neurons")):
        im = a.imshow(scores[key].numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        a.set(title=f"{title}: importance per layer", xlabel=title.split()[-1][:-1], ylabel="layer")
        a.set_yticks(range(scores[key].shape[0]))
        fig.colorbar(im, ax=a)
    ax[0, 0].set_xticks(range(scores["heads"].shape[1]))
    hidden = scores["hidden"].numpy()
    ax[1, 0].imshow(hidden[None, :], aspect="auto", cmap="viridis", interpolation="nearest")
    ax[1, 0].set(title="hidden channels (summed over every norm)", xlabel="channel", yticks=[])
    if keep_hidden:
        kept = scores["hidden"].topk(keep_hidden).indices.numpy()
        ax[1, 0].scatter(kept, [0] * len(kept), marker="|", color="red", s=400, label=f"kept by pruning ({keep_hidden})")
        ax[1, 0].legend(loc="upper right", fontsize=8)
    metrics = {k[6:]: v.numpy() for k, v in scores.items() if k.startswith("layer.")}
    for name, x in metrics.items():
        ax[1, 1].plot(range(len(x)), (x - x.min()) / (x.max() - x.min() + 1e-12), marker="o", label=name)
    ax[1, 1].set(title="layer importance (min-max scaled per metric; low = droppable)", xlabel="layer",
                 xticks=range(scores["heads"].shape[0]))
    ax[1, 1].legend(fontsize=8)
    return fig


def params_vs_accuracy(rows: dict[str, dict[str, Any]], chance: float = 0.25) -> Figure:
    """Parameters vs world multiple-choice accuracy and validation loss, one point per model of a run.

    ``rows`` is ``report.json``'s ``models``; arrows go from each pruned student to its distilled version.
    """
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, key, title in ((axes[0], "world_mc_cloze", "world multiple choice (cloze), higher is better"),
                           (axes[1], "val_loss", "validation loss, lower is better")):
        for label, r in rows.items():
            if key in r:
                ax.scatter(r["params"] / 1e6, r[key], s=40)
                ax.annotate(label, (r["params"] / 1e6, r[key]), fontsize=8, xytext=(4, 4), textcoords="offset points")
        for label, r in rows.items():
            src = rows.get(label.replace("distilled", "pruned"))
            if label.endswith("distilled") and src and key in r and key in src:
                ax.annotate("", (r["params"] / 1e6, r[key]), (src["params"] / 1e6, src[key]),
                            arrowprops={"arrowstyle": "->", "color": "gray"})
        ax.set(title=title, xlabel="parameters (M)")
    axes[0].axhline(chance, color="gray", ls="--", lw=1, label="chance")
    axes[0].legend(fontsize=8)
    return fig


def stage_metrics_figure(metrics: dict[str, dict[str, Any]]) -> Figure:
    """Before -> after of each alignment stage's headline metric (align.stage_report.HEADLINE), one panel per stage."""
    from align.stage_report import HEADLINE

    stages = [s for s in metrics if s in HEADLINE]
    fig = Figure(figsize=(3.2 * max(len(stages), 1), 3), layout="constrained")
    for ax, s in zip(fig.subplots(1, max(len(stages), 1), squeeze=False)[0], stages):
        what, before, after, _ = HEADLINE[s]
        vals = [metrics[s].get(before), metrics[s].get(after)]
        bars = ax.bar(["before", "after"], [v if v is not None else float("nan") for v in vals],
                      color=["tab:gray", "tab:blue"])
        ax.bar_label(bars, fmt="%.4g", fontsize=8)  # small moves are invisible on the bars alone
        ax.set_title(f"{s}: {what}", fontsize=9)
    return fig


# ------------------------------------------------------------------------------------------------ chat
def chat_replies(models: dict[str, Path], messages: list[dict[str, str]], max_new_tokens: int = 32) -> dict[str, str]:
    """Greedy reply of every model to one conversation, through each model's own chat template."""
    from evals.generate import Generator, HFBackend

    return {label: Generator(HFBackend(path), None).chat([messages], max_new_tokens)[0]
            for label, path in models.items()}


@torch.no_grad()
def reward_of(rm_dir: Path, prompt: str, answers: list[str]) -> list[float]:
    """The reward model's score of each answer to ``prompt`` (rendered as a chat, as in training)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from minitron.scoring import reward_scores

    tok = AutoTokenizer.from_pretrained(rm_dir)
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    convs = [[{"role": "user", "content": prompt}, {"role": "assistant", "content": a}] for a in answers]
    return reward_scores(rm, tok, convs).tolist()


def first_jsonl(path: Path) -> dict[str, Any]:
    """The first record of a JSONL file (a held-out example to show)."""
    with open(path) as fh:
        return json.loads(fh.readline())
