"""``minitron bench all``: run every benchmark, one JSON and one Markdown report with targets beside values.

Each benchmark runs in its own process (``minitron bench NAME``, which prints one JSON object), so that
timings and memory are not disturbed by the others. Results saved earlier (e.g. the 8B-scale pruning run,
minutes long, or the reproduction of the paper's claim) are merged from ``include`` files.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minitron.config import arg
from minitron.io import write_json, write_text

# field -> (comparison, target, source benchmark, meaning)
TARGETS: dict[str, tuple[str, float, str, str]] = {
    "importance_overhead_ratio": ("<=", 1.10, "prune", "importance pass time / plain forward time"),
    "prune_8b_width_seconds": ("<=", 1200, "prune --scale 8b", "8B-shaped -> 4B width on this machine"),
    "prune_8b_depth_seconds": ("<=", 1200, "prune --scale 8b", "8B-shaped -> 4B depth on this machine"),
    "prune_8b_peak_rss_gib": ("<=", 4.0, "prune --scale 8b", "peak RSS while pruning the 8B shape"),
    "kd_loss_memory_ratio": ("<=", 0.10, "distill", "chunked KD loss memory / naive (vocab 128k, 2048 tokens)"),
    "kd_loss_time_ratio": ("<=", 0.6, "distill", "chunked KD loss fwd+bwd time / naive"),
    "kd_loss_memory_ratio_vs_trl": ("<=", 0.2, "distill", "memory / TRL 1.16 chunked divergence loss"),
    "kd_loss_time_ratio_vs_trl": ("<=", 0.6, "distill", "time / TRL 1.16 chunked divergence loss"),
    "distill_throughput_ratio": (">=", 0.6, "distill", "distillation tokens/s / LM training tokens/s"),
    "throughput_ratio_width_c8": (">=", 1.6, "serve", "width-pruned / teacher output tokens/s at concurrency 8"),
}


@dataclass
class BenchAllConfig:
    out: str = arg("runs/bench", "where bench.json and bench.md go")
    benches: list[str] = arg(["prune", "distill", "serve"], "benchmarks to run now (each in its own process)")
    include: list[str] = arg(["bench/results/prune_8b.json", "bench/results/reproduce.json",
                              "bench/results/reproduce_smoke.json"],
                             "saved result files to merge (missing ones are listed, not fatal)")
    timeout_s: int = arg(1800, "time limit per benchmark")


def last_json_object(text: str) -> dict[str, Any]:
    """The last top-level JSON object printed in ``text`` (benchmarks may log before it)."""
    starts = [i for i, c in enumerate(text) if c == "{" and (i == 0 or text[i - 1] == "\n")]
    for i in reversed(starts):
        try:
            obj = json.loads(text[i:])
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    raise ValueError("no JSON object in the benchmark's output")


def run_bench(name: str, timeout_s: int) -> dict[str, Any]:
    """Run ``minitron bench NAME`` in a fresh process; its JSON, or an error record."""
    t = time.time()
    proc = subprocess.run([sys.executable, "-m", "minitron.cli", "bench", name], capture_output=True, text=True,
                          timeout=timeout_s)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}", "log_tail": (proc.stdout + proc.stderr)[-2000:]}
    try:
        result = last_json_object(proc.stdout)
    except ValueError as e:
        return {"error": str(e), "log_tail": proc.stdout[-2000:]}
    result["wall_seconds"] = round(time.time() - t, 1)
    return result


def verdict(field: str, value: Any) -> str:
    op, target, _, _ = TARGETS[field]
    if not isinstance(value, (int, float)):
        return "not measured"
    ok = value <= target if op == "<=" else value >= target
    return "met" if ok else "MISSED"


def markdown(results: dict[str, dict[str, Any]]) -> str:
    """The target table, then every benchmark's own figures."""
    flat = {k: v for r in results.values() for k, v in r.items()}
    lines = ["# Benchmarks", "", "| metric | target | measured | verdict | what |", "|---|---|---|---|---|"]
    for field, (op, target, source, what) in TARGETS.items():
        value = flat.get(field)
        shown = f"{value:.3g}" if isinstance(value, (int, float)) else "—"
        lines.append(f"| `{field}` | {op} {target} | {shown} | {verdict(field, value)} | {what} (`bench {source}`) |")
    for name, r in results.items():
        lines += ["", f"## {name}", "", "```json", json.dumps(r, indent=1, default=str)[:4000], "```"]
    return "\n".join(lines) + "\n"


def run(cfg: BenchAllConfig) -> Path:
    results: dict[str, dict[str, Any]] = {}
    for name in cfg.benches:
        print(f"bench {name} ...", file=sys.stderr)
        results[name] = run_bench(name, cfg.timeout_s)
    for path in cfg.include:
        p = Path(path)
        results[p.stem] = json.loads(p.read_text()) if p.exists() else {"error": f"{p} not found (run it to fill)"}
    out = Path(cfg.out)
    write_json(out / "bench.json", results)
    md = markdown(results)
    write_text(out / "bench.md", md)
    print(md.split("\n## ")[0])
    return out / "bench.md"
