"""Eval results: ``results.json``, a Markdown table like Table 1 of the Minitron paper, and PNG plots.

``results.json``: ``{"suite", "created", "config", "models": [{"name", "path", "params", "tasks": {task:
{"metrics": {metric: {"value", "stderr", "n"}}, "seconds"}}}]}``. Every metric carries its item count ``n``
and standard error (``std / sqrt(n)`` of the per-item scores). ``report.md``: one row per model, one column per
headline metric (then one detail table per task). Plots: one bar chart per metric across models, and the stage
progression (teacher -> pruned -> distilled -> aligned, i.e. the models in the order given) of the headline
metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from minitron.io import write_json, write_text
from minitron.stats import mean_stderr

# task -> its headline metrics (the main table's columns), in display order.
HEADLINE = {
    "mmlu": ["acc"],
    "mmlu_cloze": ["acc_norm"],
    "ifeval": ["prompt_level_strict_acc", "inst_level_loose_acc"],
    "rag": ["f1", "recall_at_k"],
    "bfcl": ["accuracy"],
    "roleplay": ["win_rate"],
}


def mean_metric(values: Sequence[float], raw: bool = False) -> dict[str, Any]:
    """``{"value", "stderr", "n"}`` of per-item scores (sample standard error; 0 for a single item).

    ``raw=True`` marks a metric that is not a rate in [0, 1] (reports show it unscaled).
    """
    mean, stderr = mean_stderr(values)
    out = {"value": mean, "stderr": stderr, "n": len(values)}
    return {**out, "scale": "raw"} if raw else out


def _fmt_params(n: int | None) -> str:
    """``2.29M`` / ``4.51B`` (``n/a`` for an endpoint whose weights are not local)."""
    if not n:
        return "n/a"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _fmt(m: dict[str, Any] | None) -> str:
    """One table cell: a rate in % with its standard error, ``–`` for a metric a model lacks."""
    if not m or m.get("n", 0) == 0 or m["value"] != m["value"]:
        return "–"
    if m.get("scale") == "raw":  # not a rate (e.g. a reward margin): shown as is
        return f"{m['value']:.3f} ± {m['stderr']:.3f}"
    return f"{100 * m['value']:.1f} ± {100 * m['stderr']:.1f}"


def metric_columns(results: dict[str, Any], headline_only: bool) -> list[tuple[str, str]]:
    """(task, metric) pairs present in any model, headline ones first, in a stable order."""
    present: dict[tuple[str, str], None] = {}
    for m in results["models"]:
        for task, r in m["tasks"].items():
            for name in r.get("metrics", {}):
                present[(task, name)] = None
    head = [(t, n) for t, names in HEADLINE.items() for n in names if (t, n) in present]
    if headline_only:
        return head or list(present)
    return head + [k for k in present if k not in head]


def write_markdown(results: dict[str, Any], path: Path) -> Path:
    """``report.md``: the headline table (values in %, ± one standard error), then a table per task."""
    cols = metric_columns(results, headline_only=True)
    lines = [f"# Eval report: suite `{results['suite']}`", "",
             "Scores in %, ± one standard error; n = items per metric (see results.json).", "",
             "| model | params | " + " | ".join(f"{t} {n}" for t, n in cols) + " |",
             "|---|---:|" + "---:|" * len(cols)]
    for m in results["models"]:
        cells = [_fmt(m["tasks"].get(t, {}).get("metrics", {}).get(n)) for t, n in cols]
        lines.append(f"| {m['name']} | {_fmt_params(m.get('params'))} | " + " | ".join(cells) + " |")
    tasks = list(dict.fromkeys(t for t, _ in metric_columns(results, headline_only=False)))
    for task in tasks:
        names = [n for t, n in metric_columns(results, headline_only=False) if t == task]
        lines += ["", f"## {task}", "", "| model | " + " | ".join(f"{n} (n)" for n in names) + " |",
                  "|---|" + "---:|" * len(names)]
        for m in results["models"]:
            ms = m["tasks"].get(task, {}).get("metrics", {})
            lines.append(f"| {m['name']} | " + " | ".join(
                f"{_fmt(ms.get(n))} ({ms.get(n, {}).get('n', 0)})" for n in names) + " |")
        notes = {m["name"]: m["tasks"][task]["note"] for m in results["models"] if m["tasks"].get(task, {}).get("note")}
        lines += [f"\n{name}: {note}" for name, note in notes.items()]
    skipped = [(m["name"], t, r["note"]) for m in results["models"] for t, r in m["tasks"].items()
               if not r.get("metrics") and r.get("note")]
    if skipped:
        lines += ["", "## Not scored", ""] + [f"- {name} {task}: {note}" for name, task, note in skipped]
    return write_text(path, "\n".join(lines) + "\n")


def plot_metrics(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """One bar chart per metric (models side by side, standard-error bars) and the stage progression plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    names = [m["name"] for m in results["models"]]
    written = []
    for task, metric in metric_columns(results, headline_only=False):
        vals = [m["tasks"].get(task, {}).get("metrics", {}).get(metric, {}) for m in results["models"]]
        scale = 1.0 if any(v.get("scale") == "raw" for v in vals) else 100.0
        ys = [scale * v["value"] if v.get("n") else 0.0 for v in vals]
        errs = [scale * v["stderr"] if v.get("n") else 0.0 for v in vals]
        # bars in the models' order with one-standard-error whiskers: overlapping whiskers = no clear difference
        fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(names), 3.2))
        ax.bar(range(len(names)), ys, yerr=errs, capsize=4, color="#4C72B0")
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
        ax.set_ylabel("%" if scale == 100.0 else metric)
        ax.set_title(f"{task}: {metric}")
        fig.tight_layout()
        written.append(out_dir / f"{task}_{metric}.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    written.append(plot_progression(results, out_dir / "progression.png", plt))
    return written


def plot_progression(results: dict[str, Any], path: Path, plt: Any) -> Path:
    """Headline metrics across the models in the given order (teacher -> pruned -> distilled -> aligned)."""
    names = [m["name"] for m in results["models"]]
    fig, ax = plt.subplots(figsize=(4.5 + 1.3 * len(names), 3.6))
    for task, metric in metric_columns(results, headline_only=True):
        vals = [m["tasks"].get(task, {}).get("metrics", {}).get(metric, {}) for m in results["models"]]
        xs = [i for i, v in enumerate(vals) if v.get("n")]  # a model without the metric leaves a gap
        ax.errorbar(xs, [100 * vals[i]["value"] for i in xs], yerr=[100 * vals[i]["stderr"] for i in xs],
                    marker="o", capsize=3, label=f"{task} {metric}")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("%")
    ax.set_title("Stage progression")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(results: dict[str, Any], out_dir: str | Path, plots: bool = True) -> dict[str, Any]:
    """Write ``results.json``, ``report.md`` and (optionally) ``plots/*.png``; return their paths."""
    out_dir = Path(out_dir)
    files = {"results": write_json(out_dir / "results.json", results),
             "report": write_markdown(results, out_dir / "report.md")}
    if plots:
        files["plots"] = plot_metrics(results, out_dir / "plots")
    return files
