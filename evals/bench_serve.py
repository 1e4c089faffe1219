"""Serving benchmark (``minitron bench serve``): teacher vs width- and depth-pruned students behind vLLM.

    minitron bench serve [--teacher DIR] [--width DIR] [--depth DIR] [--concurrency 1,8,32] [--requests 16]

Each model is served the same way (``evals.serve.VLLMServer``: same flags, same KV cache, same context) and
gets the same chat requests: greedy, ``ignore_eos`` and a fixed ``max_tokens``, so every model produces exactly
the same number of tokens and the comparison is pure speed. For each concurrency level ``c``,
``max(requests, 4c)`` requests are sent from ``c`` client threads after a warm-up, ``repeats`` times; the
fastest run is reported (requests/s, output tokens/s, mean latency) with every run's tokens/s beside it.
One JSON object goes to stdout (and ``OUT/serve.json``, with ``serve.md``); its
``throughput_ratio_width_c8`` is the width-pruned student's output tokens/s divided by the teacher's at
concurrency 8 (the Minitron claim: a 50% width-pruned student serves >= 1.6x faster).
Missing student directories are skipped (noted in ``skipped``); the teacher is required.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from evals.serve import VLLMServer, has_cuda, openai_client
from minitron.config import ConfigError, arg
from minitron.io import write_json, write_text
from minitron.weights import stored_parameters

PROMPTS = [
    "Tell me about the color of Mirel.", "Where does Quen live?", "Write a short story about a fox in Lima.",
    "What food does Atha like, and why?", "Describe Oslo in three sentences.", "List five things Borin enjoys.",
    "Explain what a teacher model is.", "Summarise the life of Celis.",
]


@dataclass
class BenchServeConfig:
    """Serving throughput of the teacher and its pruned students (one vLLM server at a time)."""

    teacher: str = arg("runs/demo/teacher", "teacher model directory (required)")
    width: str = arg("runs/demo/pruned/width", "width-pruned student directory (skipped when absent)")
    depth: str = arg("runs/demo/pruned/depth", "depth-pruned student directory (skipped when absent)")
    concurrency: list[int] = arg([1, 8, 32], "client concurrency levels")
    requests: int = arg(16, "requests per level (at least 4x the concurrency are sent)")
    max_tokens: int = arg(64, "output tokens per request (ignore_eos: every model generates exactly this many)")
    max_model_len: int = arg(512, "context length for every server")
    kv_cache_gb: int = arg(1, "KV cache GiB on CPU (VLLM_CPU_KVCACHE_SPACE)")
    warmup: int = arg(4, "unmeasured requests before the first level")
    repeats: int = arg(3, "runs per level; the fastest counts (the machine is shared: others' load only slows)")
    out: str = arg("runs/demo/bench/serve", "folder for serve.json and serve.md")
    dtype: str | None = arg(None, "weights dtype for every server (CPU default float32; bfloat16 on AMX CPUs)")

    def __post_init__(self) -> None:
        if not self.concurrency or min(self.concurrency) < 1:
            raise ConfigError("--concurrency needs positive integers, e.g. 1,8,32")
        if self.requests < 1 or self.max_tokens < 1 or self.requests > 10_000 or self.repeats < 1:
            raise ConfigError("--requests must be 1..10000, --max-tokens and --repeats at least 1")
        if not Path(self.teacher).is_dir():
            raise ConfigError(f"teacher directory not found: {self.teacher} (run `minitron teacher` or pass --teacher)")


def one_request(client: Any, model: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    """(latency in s, completion tokens) of one greedy chat request (``client``: the openai SDK's)."""
    t0 = time.perf_counter()
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True})
    return time.perf_counter() - t0, reply.usage.completion_tokens


def measure_level(client: Any, model: str, concurrency: int, n: int, max_tokens: int) -> dict[str, float]:
    """Send ``n`` requests from ``concurrency`` threads (one SDK client: it is thread-safe); throughput over the
    wall time of the whole batch."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(lambda p: one_request(client, model, p, max_tokens), prompts))
    wall = time.perf_counter() - t0
    tokens = sum(r[1] for r in results)
    return {"requests": n, "seconds": round(wall, 3), "requests_per_s": round(n / wall, 3),
            "output_tokens_per_s": round(tokens / wall, 1), "output_tokens": tokens,
            "mean_latency_s": round(statistics.mean(r[0] for r in results), 3)}


def bench_model(model_dir: Path, cfg: BenchServeConfig) -> dict[str, Any]:
    """Serve one model and measure every concurrency level."""
    shape = json.loads((model_dir / "config.json").read_text())
    row: dict[str, Any] = {"dir": str(model_dir), "parameters": stored_parameters(model_dir),
                           **{k: shape.get(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                        "num_attention_heads", "num_key_value_heads")}}
    t0 = time.perf_counter()
    with VLLMServer(model_dir, max_model_len=cfg.max_model_len, kv_cache_gb=cfg.kv_cache_gb, dtype=cfg.dtype) as url:
        row["startup_s"] = round(time.perf_counter() - t0, 1)
        client = openai_client(url)
        model = client.models.list().data[0].id
        for i in range(cfg.warmup):
            one_request(client, model, PROMPTS[i % len(PROMPTS)], cfg.max_tokens)
        row["levels"] = {}
        for c in tqdm(cfg.concurrency, desc=f"serve {model_dir.name}", leave=False):
            runs = [measure_level(client, model, c, max(cfg.requests, 4 * c), cfg.max_tokens)
                    for _ in range(cfg.repeats)]
            best = max(runs, key=lambda r: r["output_tokens_per_s"])
            best["output_tokens_per_s_all"] = [r["output_tokens_per_s"] for r in runs]
            row["levels"][f"c{c}"] = best
    return row


def ratio(results: dict[str, Any], name: str, level: str) -> float | None:
    """Student ÷ teacher output tokens/s at ``level`` (None when either is missing)."""
    try:
        student = results[name]["levels"][level]["output_tokens_per_s"]
        return round(student / results["teacher"]["levels"][level]["output_tokens_per_s"], 3)
    except KeyError:
        return None


def vllm_version() -> str | None:
    """The installed vLLM build (``vllm`` on GPUs, ``vllm-cpu`` here), without importing it."""
    import importlib.metadata as md

    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{dist} {md.version(dist)}"
        except md.PackageNotFoundError:
            pass
    return None


def markdown(result: dict[str, Any]) -> str:
    """A table: one row per model and concurrency level."""
    lines = ["# Serving benchmark (vLLM)", "", f"{result['device']}; {result['max_tokens']} output tokens per request "
             "(greedy, ignore_eos); best of "
             f"{result['repeats']} runs per level. Timings on a shared machine are noisy.", "",
             "| model | params | c | requests/s | output tok/s | mean latency s |", "|---|---|---|---|---|---|"]
    for name, row in result["models"].items():
        for level, m in row["levels"].items():
            lines.append(f"| {name} | {row['parameters']:,} | {level[1:]} | {m['requests_per_s']} | "
                         f"{m['output_tokens_per_s']} | {m['mean_latency_s']} |")
    lines += ["", f"throughput_ratio_width_c8 = {result['throughput_ratio_width_c8']}, "
              f"throughput_ratio_depth_c8 = {result['throughput_ratio_depth_c8']} (target width >= 1.6)"]
    return "\n".join(lines) + "\n"


def run(cfg: BenchServeConfig) -> dict[str, Any]:
    """Benchmark every model that exists; print and write one JSON object."""
    models = {"teacher": Path(cfg.teacher), "width": Path(cfg.width), "depth": Path(cfg.depth)}
    skipped = {name: str(p) for name, p in models.items() if not p.is_dir()}
    results = {name: bench_model(p, cfg) for name, p in models.items() if name not in skipped}
    result = {
        "benchmark": "serve", "vllm": vllm_version(),
        "device": "cuda" if has_cuda() else f"cpu ({platform.machine()}, {cfg.dtype or 'float32'}, --enforce-eager)",
        "max_tokens": cfg.max_tokens, "repeats": cfg.repeats, "concurrency": cfg.concurrency,
        "models": results, "skipped": skipped,
        "throughput_ratio_width_c8": ratio(results, "width", "c8"),
        "throughput_ratio_depth_c8": ratio(results, "depth", "c8"),
    }
    out = Path(cfg.out)
    write_json(out / "serve.json", result)
    write_text(out / "serve.md", markdown(result))
    print(json.dumps(result), flush=True)
    return result
