"""``minitron bench prune``: importance overhead, 8B/4B shapes, and (``--scale 8b``) pruning an 8B-shaped checkpoint.

Prints one JSON object. Always (about a minute):
- ``importance_overhead_ratio``: the importance pass (hooks accumulating head/neuron/channel/block statistics in
  place) / the plain forward of the same backbone on the same batch (a random 57M-parameter Llama, 8 x 256 tokens;
  minimum of interleaved repeats, in CPU seconds of this process: other jobs on a shared machine inflate wall
  time at random; ``..._wall`` is the wall-clock ratio). ``..._vs_full_forward`` divides by the full forward with the LM head instead;
- parameter counts of Llama-3.1-8B and its 4B-width / 4B-depth shapes, and their forward tokens/s relative to the
  8B shape: one decoder layer of each shape and the LM head are timed on the same tokens (random weights) and
  combined as ``layers x t_layer + t_head``.
With ``--scale 8b`` (tens of minutes, ~16 GB of disk): a random bf16 Llama-3.1-8B-shaped checkpoint is written
to a temp dir in 4 shards (like the hub's), then pruned to 4B width and to 4B depth, layer by layer, each in a
fresh process whose time and peak RSS (``VmHWM``: that process's own high-water mark) are reported.

    minitron bench prune
    minitron bench prune --scale 8b --out bench/results/prune_8b.json
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from minitron.config import ConfigError, arg
from minitron.pipeline.bench.memory import peak_rss
from minitron.weights import write_shard

LLAMA31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                  rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192, "rope_theta": 500000.0})
WIDTH_4B = dict(hidden_size=3072, intermediate_size=9216)
DEPTH_4B = dict(num_hidden_layers=16)
RANDOM_BLOCK = 2**24  # elements drawn at once for the random checkpoint (64 MiB in fp32)


@dataclass
class BenchPruneConfig:
    scale: str = arg("small", "small (about a minute) or 8b (also prune an 8B-shaped checkpoint: tens of minutes)")
    calib_samples: int = arg(32, "8b scale: calibration sequences")
    calib_seq_len: int = arg(512, "8b scale: tokens per calibration sequence")
    dtype: str = arg("bfloat16", "compute dtype of the importance pass and the tokens/s timing")
    repeats: int = arg(5, "repeats of each timed forward (the minimum is kept)")
    workdir: str | None = arg(None, "8b scale: where the 16 GB checkpoint goes (default: a temp dir, removed after)")
    kinds: list[str] = arg(["width", "depth"], "8b scale: which 4B students to prune (width, depth)")
    out: str | None = arg(None, "also write the JSON here")

    def __post_init__(self) -> None:
        if self.scale not in ("small", "8b"):
            raise ConfigError("scale must be small or 8b")
        if not self.kinds or set(self.kinds) - {"width", "depth"}:
            raise ConfigError(f"kinds {self.kinds}: choose from width, depth")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError("dtype must be float32 or bfloat16")


def _median_time(fn, repeats: int, clock=time.perf_counter) -> float:
    """Median duration of ``fn()``; ``clock=time.process_time`` counts this process's CPU seconds (all threads),
    which other processes on a shared machine disturb far less than wall time."""
    times = []
    for _ in range(repeats):
        t = clock()
        fn()
        times.append(clock() - t)
    return statistics.median(times)


def importance_overhead(repeats: int) -> dict[str, float]:
    """Hooked vs plain backbone forward (and full forward) on a random 57M Llama, 8 x 256 tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from minitron.adapters import Layout, get_adapter
    from minitron.importance import Collector

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64)
    model = LlamaForCausalLM(config).eval()
    ad, ids = get_adapter(config), torch.randint(0, 32000, (8, 256))
    col = Collector(Layout.from_config(config), "mean")
    plain = lambda: model.model(input_ids=ids, use_cache=False)  # noqa: E731
    full = lambda: model(input_ids=ids, use_cache=False)  # noqa: E731
    with torch.inference_mode():
        plain()
        t = {k: [] for k in ("plain", "full", "hooked", "plain_wall", "hooked_wall")}
        for _ in range(repeats):  # interleaved, so that load from other processes hits all three alike
            t["plain"].append(_median_time(plain, 1, time.process_time))
            t["plain_wall"].append(_median_time(plain, 1))
            t["full"].append(_median_time(full, 1, time.process_time))
            handles = [h for i, layer in enumerate(model.model.layers) for h in col.attach(layer, i, ad)]
            handles.append(col.attach_final(model.model.norm))
            t["hooked"].append(_median_time(plain, 1, time.process_time))
            t["hooked_wall"].append(_median_time(plain, 1))
            for h in handles:
                h.remove()
    m = {k: min(v) for k, v in t.items()}  # the least disturbed run of each (noise here is +-20%)
    return {"importance_overhead_ratio": round(m["hooked"] / m["plain"], 4),
            "importance_overhead_ratio_wall": round(m["hooked_wall"] / m["plain_wall"], 4),
            "importance_overhead_ratio_vs_full_forward": round(m["hooked"] / m["full"], 4),
            "importance_cpu_seconds": round(m["hooked"], 4), "plain_forward_cpu_seconds": round(m["plain"], 4),
            "overhead_model_params": sum(x.numel() for x in model.parameters()), "overhead_tokens": ids.numel()}


def _random_layer(cfg: Any, dtype: torch.dtype) -> tuple[Any, torch.Tensor]:
    """One decoder layer and an LM head of ``cfg``'s shape with N(0, 0.02) weights (no slow default init)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    with torch.device("meta"):
        layer = LlamaDecoderLayer(cfg, 0).to(dtype)
    layer = layer.to_empty(device="cpu").eval()
    for p in layer.parameters():
        p.data.normal_(0, 0.02)
    return layer, torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype).normal_(0, 0.02)


def shape_report(dtype: torch.dtype, repeats: int, tokens: int = 64) -> dict[str, Any]:
    """Parameter counts of the 8B / 4B-width / 4B-depth shapes and their estimated forward tokens/s.

    A forward is ``layers x t(one decoder layer) + t(LM head)`` on 1 x ``tokens`` tokens; both hidden sizes are
    timed in alternation and the minimum over repeats is kept (the least disturbed run on a shared machine).
    """
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from minitron.adapters import Layout

    torch.manual_seed(0)
    cfgs = {name: LlamaConfig(**{**LLAMA31_8B, **shape})
            for name, shape in (("8b", {}), ("4b_width", WIDTH_4B), ("4b_depth", DEPTH_4B))}
    parts, times = {}, {}
    for cfg in cfgs.values():
        cfg._attn_implementation = "sdpa"
        if cfg.hidden_size not in parts:
            x = torch.randn(1, tokens, cfg.hidden_size, dtype=dtype)
            pos = torch.arange(tokens)[None]
            parts[cfg.hidden_size] = (*_random_layer(cfg, dtype), x, pos, LlamaRotaryEmbedding(cfg)(x, pos))
            times[cfg.hidden_size] = ([], [])
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first round warms up
            for hidden, (layer, head, x, pos, pe) in parts.items():
                times[hidden][0].append(_median_time(lambda: layer(x, position_embeddings=pe, position_ids=pos), 1,
                                                     time.process_time))
                times[hidden][1].append(_median_time(lambda: x[0] @ head.T, 1, time.process_time))
    out: dict[str, Any] = {}
    for name, cfg in cfgs.items():
        t_layer, t_head = (min(t[1:]) for t in times[cfg.hidden_size])
        out[f"params_{name}"] = Layout.from_config(cfg).num_params()
        out[f"forward_tokens_per_s_{name}"] = round(tokens / (cfg.num_hidden_layers * t_layer + t_head), 2)
    for name in ("4b_width", "4b_depth"):
        out[f"forward_tokens_per_s_ratio_{name}"] = round(out[f"forward_tokens_per_s_{name}"] / out["forward_tokens_per_s_8b"], 3)
    out["forward_timing"] = (f"1 x {tokens} tokens, {str(dtype).replace('torch.', '')}, layers x one layer + lm_head, "
                             f"min CPU seconds of {repeats} alternating repeats")
    return out


# ---------------------------------------------------------------------------------------------- 8B scale
def write_random_checkpoint(out: Path, config: Any, n_shards: int = 4, seed: int = 0) -> Path:
    """A random bf16 checkpoint of ``config`` in ``n_shards`` safetensors files + index, written tensor by tensor.

    Each shard's header is written first, then every tensor is generated a block of rows at a time, so memory
    stays at one block whatever the model size. Weights ~ N(0, 0.02), norms = 1.
    """
    from transformers import AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        names = [(k, tuple(v.shape)) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()]
    total = sum(2 * torch.Size(s).numel() for _, s in names)
    shards, cur, size = [], [], 0
    for name, shape in names:
        cur.append((name, shape))
        size += 2 * torch.Size(shape).numel()
        if size >= total / n_shards and len(shards) < n_shards - 1:
            shards.append(cur)
            cur, size = [], 0
    shards.append(cur)
    g = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(out / fname, [(name, torch.Size(shape), torch.bfloat16) for name, shape in shard],
                    lambda j, shard=shard: _random_weight(*shard[j], g))
        weight_map.update({name: fname for name, _ in shard})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    config.save_pretrained(out)
    return out


def _random_weight(name: str, shape: tuple, g: torch.Generator) -> Iterator[torch.Tensor]:
    """One bf16 tensor like a trained checkpoint's (norms at 1, the rest N(0, 0.02)), in blocks of rows of 64 MiB
    in fp32: drawn whole, the 128256 x 4096 embedding took 4 GiB (the fp32 draw and its scaled copy)."""
    rows = max(1, RANDOM_BLOCK // max(1, math.prod(shape[1:])))
    for start in range(0, shape[0], rows):
        block = (min(rows, shape[0] - start), *shape[1:])
        if name.endswith("norm.weight"):
            yield torch.ones(block, dtype=torch.bfloat16)
        else:
            yield (torch.randn(block, generator=g) * 0.02).to(torch.bfloat16)


def _synthetic_corpus(path: Path, n_docs: int = 3000, seed: int = 0) -> Path:
    """Seeded pseudo-English documents (calibration text for a random model needs no meaning)."""
    rng = random.Random(seed)
    words = [f"{rng.choice('bcdfgklmnprstvz')}{rng.choice('aeiou')}{rng.choice('lnrst')}{rng.choice('aeiou')}"
             for _ in range(800)] + ["the", "of", "and", "a", "to", "in", "is", "was", "he", "she"] * 20
    with open(path, "w") as fh:
        for _ in range(n_docs):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(80, 400)))
            fh.write(json.dumps({"text": text.capitalize() + "."}) + "\n")
    return path


def _child(spec: str) -> None:
    """Run one prune in this (fresh) process; print {seconds, peak_rss_gib, setup_rss_gib} as JSON."""
    import psutil

    from minitron.prune import PruneConfig, run

    setup_rss = psutil.Process().memory_info().rss
    t = time.perf_counter()
    run(PruneConfig(**json.loads(spec)))
    seconds = time.perf_counter() - t
    print(json.dumps({"seconds": round(seconds, 1), "peak_rss_gib": round(peak_rss() / 2**30, 3),
                      "setup_rss_gib": round(setup_rss / 2**30, 3)}))


def _prune_in_fresh_process(spec: dict) -> dict:
    # glibc's default allocator, as `minitron prune` runs (MALLOC_MMAP_THRESHOLD_=1048576, set here until
    # 2026-12, lowered the peak by 0.1 GiB: 1.30 vs 1.42 GiB to 4B width)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, "-c", f"from minitron.pipeline.bench.prune import _child; _child({json.dumps(json.dumps(spec))})"],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"prune subprocess failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_8b(cfg: BenchPruneConfig) -> dict[str, Any]:
    """Write the 8B-shaped checkpoint, prune it to 4B width and 4B depth in fresh processes."""
    from transformers import LlamaConfig

    from minitron.tokenizer import train_bpe

    root = Path(cfg.workdir or tempfile.mkdtemp(prefix="minitron-bench-8b-"))
    try:
        t = time.perf_counter()
        src = write_random_checkpoint(root / "llama31-8b", LlamaConfig(**LLAMA31_8B))
        corpus = _synthetic_corpus(root / "corpus.jsonl")
        train_bpe((json.loads(line)["text"] for line in open(corpus)), vocab_size=1024).save_pretrained(src)
        res: dict[str, Any] = {"write_8b_checkpoint_seconds": round(time.perf_counter() - t, 1)}
        print(f"wrote {src} in {res['write_8b_checkpoint_seconds']} s", file=sys.stderr, flush=True)
        base = dict(model=str(src), calib=str(corpus), calib_samples=cfg.calib_samples,
                    calib_seq_len=cfg.calib_seq_len, mode="layers", batch_size=4, dtype=cfg.dtype, max_shard_size="5GB")
        shapes = {"width": WIDTH_4B, "depth": {**DEPTH_4B, "depth_metric": "block_importance"}}
        for name, shape in ((k, shapes[k]) for k in cfg.kinds):
            r = _prune_in_fresh_process({**base, **shape, "out": str(root / f"4b-{name}")})
            print(f"prune 8b -> 4b {name}: {r}", file=sys.stderr, flush=True)
            res[f"prune_8b_{name}_seconds"] = r["seconds"]
            res[f"prune_8b_{name}_peak_rss_gib"] = r["peak_rss_gib"]
            res["prune_8b_setup_rss_gib"] = r["setup_rss_gib"]
            shutil.rmtree(root / f"4b-{name}", ignore_errors=True)
        res["prune_8b_peak_rss_gib"] = max(res[f"prune_8b_{k}_peak_rss_gib"] for k in cfg.kinds)
        res["prune_8b_calibration"] = f"{cfg.calib_samples} x {cfg.calib_seq_len} tokens, {cfg.dtype}, layer by layer"
        return res
    finally:
        if not cfg.workdir:
            shutil.rmtree(root, ignore_errors=True)


def run(cfg: BenchPruneConfig) -> dict[str, Any]:
    """Run the benchmark; print and return one JSON object."""
    dtype = getattr(torch, cfg.dtype)
    result: dict[str, Any] = {"bench": "prune", "scale": cfg.scale, "threads": torch.get_num_threads()}
    if cfg.scale == "8b":  # first: the long part, before the small timings add their own noise
        result.update(bench_8b(cfg))
    result.update(importance_overhead(cfg.repeats))
    result.update(shape_report(dtype, cfg.repeats))
    print(json.dumps(result))
    if cfg.out:
        from minitron.io import write_json

        write_json(cfg.out, result)
    return result
