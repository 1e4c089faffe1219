"""The alignment report: one JSON summary, one Markdown table (one row per stage) and a PNG of training curves.

Each row shows the number that says whether the stage worked, before -> after:
SFT held-out loss (down), RM pairwise accuracy (up from ~0.5), DPO chosen-minus-rejected log-prob margin (up)
with the implicit-reward accuracy (KTO the same), RS and RL mean reward of sampled completions (up), RL with the KL
to the start policy. Stages whose held-out pairs come from several sources also get a per-source table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from minitron.io import read_json, write_json, write_text

STAGES = ("sft", "rm", "dpo", "kto", "rs", "rl", "steer_rm", "steer_sft")  # steer_*: SteerLM (align/steerlm.py)
POLICIES = ("rl", "rs", "kto", "dpo", "sft")  # the policy stages, latest first (OUT/final, RL's input)
# stage -> (what is measured, key before, key after, extra columns)
HEADLINE = {
    "sft": ("held-out loss", "eval_loss_before", "eval_loss", []),
    "rm": ("pairwise accuracy", "accuracy_before", "accuracy", ["margin"]),
    "dpo": ("log-prob margin chosen-rejected", "logp_margin_before", "logp_margin", ["reward_accuracy", "reward_margin"]),
    "kto": ("log-prob margin chosen-rejected", "logp_margin_before", "logp_margin",
            ["reward_accuracy", "reward_margin"]),
    "rs": ("mean RM reward of samples", "reward_before", "reward",
           ["reward_gain_in_paired_se", "winner_reward_heldin", "sampled_reward_heldin", "baseline_sft_reward",
            "gain_over_baseline"]),
    "rl": ("mean RM reward of samples", "reward_before", "reward",
           ["reward_gain_in_se", "reward_gain_in_paired_se", "kl_to_reference", "kl_within_budget", "algo",
            "obeyed_all_before", "obeyed_all", "obeyed_all_gain", "obeyed_all_gain_se"]),  # obeyed_*: RLVR only
}
CURVE = {"sft": "loss", "rm": "loss", "dpo": "loss", "kto": "loss", "rs": "loss", "rl": "reward"}
# opd (on-policy distillation, align/opd.py) and spin (self-play, align/spin.py): run when named, right after sft
STAGES = STAGES[:1] + ("opd", "spin") + STAGES[1:]
POLICIES = POLICIES[:-1] + ("spin", "opd", "sft")
HEADLINE["opd"] = ("KL(student || teacher) per answer", "kl_to_teacher_before", "kl_to_teacher",
                   ["eval_loss_before", "eval_loss", "teacher_eval_loss", "baseline_sft_kl_to_teacher"])
HEADLINE["spin"] = ("held-out loss", "eval_loss_before", "eval_loss",
                    ["self_margin_before", "self_margin", "baseline_sft_eval_loss"])
CURVE.update(opd="loss", spin="loss")
# SteerLM: the attribute model's held-out MSE; the steered SFT's held-out loss, with the steering it shows (0 vs 4)
HEADLINE["steer_rm"] = ("attribute MSE (mean)", "mse_before", "mse", ["helpfulness_pair_accuracy", "verbosity_mse"])
HEADLINE["steer_sft"] = ("held-out loss", "eval_loss_before", "eval_loss",
                         ["verbosity_ratio", "helpfulness_rm_diff_in_se", "labels_predicted"])
CURVE.update(steer_rm="loss", steer_sft="loss")


def collect(out: Path) -> dict[str, dict[str, Any]]:
    """metrics.json of every finished stage under ``out``."""
    return {s: read_json(out / s / "metrics.json") for s in STAGES if (out / s / "metrics.json").exists()}


def _num(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _se(m: dict[str, Any], key: str, se_key: str) -> str:
    """The value, with "± s.e." when the stage recorded one."""
    se = m.get(se_key)
    return _num(m.get(key)) + (f" ± {se:.4f}" if isinstance(se, float) else "")


def table(metrics: dict[str, dict[str, Any]]) -> str:
    """The per-stage Markdown table."""
    lines = ["| stage | measured on held-out data | before | after | also | steps | seconds (wall / CPU) |",
             "|---|---|---|---|---|---|---|"]
    for stage, m in metrics.items():
        what, k0, k1, extra = HEADLINE[stage]
        also = ", ".join(f"{k} {_num(m.get(k))}" for k in extra if k in m)  # what this run recorded
        n = f" (n={m['eval_n']})" if m.get("eval_n") else ""
        lines.append(f"| {stage} | {what}{n} | {_se(m, k0, f'{k1}_se_before')} | {_se(m, k1, f'{k1}_se')} | {also} "
                     f"| {m.get('steps')} "
                     f"| {m.get('seconds')} / {m.get('cpu_seconds')} |")
    return "\n".join(lines)


def source_table(metrics: dict[str, dict[str, Any]]) -> str | None:
    """Per held-out source (stages that recorded ``by_source``): the headline before -> after, and for margins the
    paired gain's standard error. None when no stage split its held-out set."""
    lines = ["| stage | held-out source | n | before | after | paired gain s.e. |", "|---|---|---|---|---|---|"]
    for stage, m in metrics.items():
        _, k0, k1, _ = HEADLINE[stage]
        for name, s in m.get("by_source", {}).items():
            lines.append(f"| {stage} | {name} | {s.get('eval_n')} | {_se(s, k0, f'{k1}_se_before')} "
                         f"| {_se(s, k1, f'{k1}_se')} | {_num(s.get('margin_gain_se'))} |")
    return "\n".join(lines) if len(lines) > 2 else None


def plot(metrics: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """Training curves (loss, or reward for RL) of each stage side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in metrics if any(CURVE[s] in h for h in metrics[s].get("history", []))]
    if not stages:
        return None
    fig, axes = plt.subplots(1, len(stages), figsize=(3.2 * len(stages), 2.6), squeeze=False)
    for ax, s in zip(axes[0], stages):
        pts = [(h["step"], h[CURVE[s]]) for h in metrics[s]["history"] if CURVE[s] in h]
        ax.plot(*zip(*pts), marker=".")
        ax.set_title(f"{s}: {CURVE[s]}")
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(out: Path, base_model: str, evals: Any = None) -> dict[str, Any]:
    """Write ``OUT/metrics.json``, ``OUT/report.md`` and ``OUT/report.png``; return the summary."""
    metrics = collect(out)
    summary = {"base_model": base_model,
               "stages": {s: {k: v for k, v in m.items() if k != "history"} for s, m in metrics.items()},
               "evals": evals}
    write_json(out / "metrics.json", summary)
    png = plot(metrics, out / "report.png")
    text = [f"# Alignment report: {base_model}", "", table(metrics), ""]
    if png:
        text += ["![training curves](report.png)", ""]
    per_source = source_table(metrics)
    if per_source:
        text += ["## Per held-out source", "", per_source, ""]
    if "steer_sft" in metrics:  # SteerLM: what the attribute line does to held-out replies (align.steerlm)
        from align.steerlm import preference_lines, steering_markdown

        steer = metrics["steer_sft"]
        text += ["## SteerLM steering (held-out prompts; one attribute at 0 vs 4, the others fixed)", "",
                 steering_markdown(steer["steering"]), ""]
        if "verbosity_short_preference" in steer:  # recorded since the probes exist (helpfulness's is the newer)
            text += [preference_lines(steer["verbosity_short_preference"], steer.get("helpfulness_preference")), ""]
    if evals is not None:
        text += ["Eval suite on each stage's output: see `evals/` in this folder.", ""]
    if (out / "benchmarks.json").exists():  # written by `minitron run` after its evals (minitron.pipeline.report)
        text += ["## Benchmarks", "", read_json(out / "benchmarks.json")["markdown"], ""]
    write_text(out / "report.md", "\n".join(text))
    return summary
