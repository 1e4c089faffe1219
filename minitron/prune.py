"""Width and depth pruning (Minitron) into a standard Hugging Face model directory.

Width: hidden channels, attention heads and MLP neurons are ranked by activation importance
(``minitron.importance``) and the weights are sliced consistently: embeddings, q/k/v/o, gate/up/down, every
norm and lm_head share one set of hidden channels (tied embeddings stay tied). Heads respect GQA: the same
number of query heads is removed from every KV group (and optionally whole KV groups); head_dim is kept and
written explicitly into the config. Depth: a set of layers is removed (explicit, the N least important by a
metric, or the best contiguous block by multiple-choice accuracy) and the rest renumbered.

The slicing streams the safetensors shards tensor by tensor (the embedding and lm_head by blocks of rows), so an
8B checkpoint prunes in about 1.5 GiB of RAM (``minitron bench prune --scale 8b``).
Targets come from ``--target FILE.yaml``, the HF-named flags or a parameter budget (``--params 4.5e9``,
optionally ``--search``); an impossible target fails before any work and leaves no output directory.

    minitron prune --model runs/demo/teacher --calib runs/demo/world/corpus \\
        --target configs/prune/demo-width.yaml --out runs/demo/pruned-width
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from minitron.adapters import Adapter, Layout, get_adapter, pruned_config
from minitron.config import ConfigError, MinitronError, arg, read_yaml, save_resolved
from minitron.fingerprint import of_config, record, up_to_date
from minitron.importance import (ImportanceConfig, compute_scores, load_scores,
                                 save_scores)
from minitron.io import atomic_dir, is_model_dir, write_json, write_model_card
from minitron.model_source import resolve_model
from minitron.weights import ShardedCheckpoint, write_shard

SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")
DEPTH_METRICS = ("block_importance", "lm_loss", "mc_block")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json", "vocab.json", "merges.txt", "added_tokens.json",
                   "tokenizer.model")


class PruneTargetError(MinitronError):
    """A target shape that cannot be built from the source (the message names the constraint)."""


@dataclass
class PruneConfig:
    model: str = arg(None, "source model directory (standard HF dir)")
    out: str | None = arg(None, "output directory (a standard HF model dir)")
    calib: str | None = arg(None, "calibration data (minitron.data source); required unless --scores is given")
    calib_samples: int = arg(64, "calibration sequences (the paper used 1024)")
    calib_seq_len: int = arg(256, "tokens per calibration sequence")
    seed: int = arg(0, "seed for the calibration sample and the search")
    target: str | None = arg(None, "YAML file with target HF config fields (hidden_size, ..., num_hidden_layers)")
    hidden_size: int | None = arg(None, "target hidden size (embedding channels)")
    intermediate_size: int | None = arg(None, "target MLP size")
    num_attention_heads: int | None = arg(None, "target query heads (same number removed from every KV group)")
    num_key_value_heads: int | None = arg(None, "target KV heads (whole KV groups removed)")
    num_hidden_layers: int | None = arg(None, "target number of layers (depth pruning)")
    params: float | None = arg(None, "parameter budget (e.g. 4.5e9): pick a shape at or under it")
    params_scope: str = arg("total", "what --params counts: total, or non_embedding (embeddings and lm_head "
                                     "excluded: the per-token cost, and how shapes compare across vocabularies)")
    depth_metric: str = arg("block_importance", "which layers to drop: block_importance, lm_loss, mc_block")
    layers_to_drop: list[int] = arg([], "explicit layer indices to drop (overrides depth_metric)")
    mc_data: str | None = arg(None, "MMLU-format jsonl for depth_metric=mc_block")
    search: bool = arg(False, "with --params: rank candidate shapes by LM loss after pruning + a short KD")
    search_depth: bool = arg(True, "search candidates may also drop layers (false: width axes only, every layer kept)")
    search_top_k: int = arg(3, "candidates that get the short distillation")
    search_steps: int = arg(20, "K: distillation steps per candidate")
    scores: str | None = arg(None, "cached importance scores (dir or importance.safetensors) instead of --calib")
    seq_agg: str = arg("mean", "importance aggregation over the sequence: mean, l2, var")
    batch_agg: str = arg("l2", "importance aggregation over the batch: l2, mean, var")
    mode: str = arg("auto", "importance driver: whole, layers (one decoder layer in memory), auto")
    batch_size: int = arg(8, "sequences per calibration forward")
    dtype: str = arg("float32", "importance compute dtype: float32, or bfloat16 (about 3x faster on CPUs with avx512_bf16)")
    max_shard_size: str = arg("2GB", "largest output safetensors shard (e.g. 5GB, 500MB)")
    force: bool = arg(False, "redo an output of the same config (one of another config is redone anyway)")

    def __post_init__(self) -> None:
        for name in SHAPE_FIELDS:
            v = getattr(self, name)
            if v is not None and v < 1:
                raise PruneTargetError(f"{name}={v}: a target dimension must be >= 1")
        if self.params is not None and self.params <= 0:
            raise PruneTargetError(f"params={self.params}: the parameter budget must be > 0")
        if self.params_scope not in ("total", "non_embedding"):
            raise ConfigError(f"params_scope must be total or non_embedding (got {self.params_scope!r})")
        if self.depth_metric not in DEPTH_METRICS:
            raise ConfigError(f"depth_metric must be one of {', '.join(DEPTH_METRICS)}")
        if self.search and (self.params is None or self.depth_metric == "mc_block"):
            raise ConfigError("--search needs a parameter budget (--params N) and depth_metric block_importance "
                              "or lm_loss (mc_block depends on the block size)")
        parse_size(self.max_shard_size)


def parse_size(text: str) -> int:
    """'2GB' / '500MB' / '1e9' -> bytes."""
    t = str(text).strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if t.endswith(unit):
            t, m = t[: -len(unit)], mult
            break
    else:
        m = 1
    try:
        return int(float(t) * m)
    except ValueError:
        raise ConfigError(f"max_shard_size: cannot read {text!r} (use e.g. 2GB or 500MB)") from None


# ---------------------------------------------------------------------------------------------- targets
@dataclass
class Target:
    """The resolved output shape and, when already known, the layers to drop."""

    layout: Layout
    drop: list[int] | None = None  # None: pick len = source layers - target layers by depth_metric
    searched: list[dict] = field(default_factory=list)


def requested_shape(cfg: PruneConfig) -> dict[str, int]:
    """Target fields from --target YAML, overridden by the flags."""
    shape: dict[str, int] = {}
    if cfg.target:
        data = read_yaml(cfg.target)
        allowed = SHAPE_FIELDS + ("depth_metric", "layers_to_drop")
        bad = [k for k in data if k not in allowed]
        if bad:
            raise ConfigError(f"{cfg.target}: unknown target key {bad[0]!r}; valid: {', '.join(allowed)}")
        for k, v in data.items():
            if k in SHAPE_FIELDS:
                if not isinstance(v, int) or v < 1:
                    raise PruneTargetError(f"{cfg.target}: {k}={v!r}: a target dimension must be an integer >= 1")
                shape[k] = v
            elif k == "depth_metric" and cfg.depth_metric == "block_importance":
                cfg.depth_metric = v
            elif k == "layers_to_drop" and not cfg.layers_to_drop:
                cfg.layers_to_drop = list(v)
    shape.update({k: getattr(cfg, k) for k in SHAPE_FIELDS if getattr(cfg, k) is not None})
    return shape


def check_loadable(config: Any, tgt: Layout) -> None:
    """The target's config must pass transformers' own validation (e.g. Llama wants hidden_size divisible by
    the number of heads), checked before any work instead of failing at save time."""
    try:
        type(config).from_dict(pruned_config(config, tgt, list(range(tgt.num_hidden_layers))).to_dict())
    except Exception as e:  # noqa: BLE001 (transformers raises its own validation error classes)
        reason = str(e).strip().splitlines()[-1].strip()
        raise PruneTargetError(f"target hidden_size={tgt.hidden_size}, num_attention_heads={tgt.num_attention_heads}: "
                               f"transformers refuses the pruned config ({reason}); pick another shape") from None


def check_shape(src: Layout, tgt: Layout) -> None:
    """Raise PruneTargetError naming the first constraint ``tgt`` breaks."""
    for name in SHAPE_FIELDS:
        if getattr(tgt, name) > getattr(src, name):
            raise PruneTargetError(f"{name}={getattr(tgt, name)} is larger than the source's {getattr(src, name)}: "
                                   "pruning only removes units")
    kv, heads = tgt.num_key_value_heads, tgt.num_attention_heads
    if heads % kv:
        raise PruneTargetError(f"num_attention_heads={heads} breaks the GQA grouping: it must be a multiple of "
                               f"num_key_value_heads={kv} (the same number of query heads per KV group)")
    if heads // kv > src.group_size:
        raise PruneTargetError(f"num_attention_heads={heads} with num_key_value_heads={kv} needs {heads // kv} query "
                               f"heads per KV group; the source has only {src.group_size} per group")


def resolve_target(cfg: PruneConfig, src: Layout) -> Target:
    """The target shape from flags/YAML/budget, validated against the source before any work."""
    shape = requested_shape(cfg)
    if "num_key_value_heads" in shape and "num_attention_heads" not in shape:
        shape["num_attention_heads"] = shape["num_key_value_heads"] * src.group_size
    drop = sorted(set(cfg.layers_to_drop)) or None
    if drop is not None:
        if any(i < 0 or i >= src.num_hidden_layers for i in drop):
            raise PruneTargetError(f"layers_to_drop={drop}: indices must be in 0..{src.num_hidden_layers - 1}")
        n = src.num_hidden_layers - len(drop)
        if shape.get("num_hidden_layers", n) != n:
            raise PruneTargetError(f"layers_to_drop removes {len(drop)} layers but num_hidden_layers="
                                   f"{shape['num_hidden_layers']} asks for {src.num_hidden_layers - shape['num_hidden_layers']}")
        if n < 1:
            raise PruneTargetError("layers_to_drop removes every layer: keep at least one")
        shape["num_hidden_layers"] = n
    tgt = src.replace(**shape)  # unspecified fields keep the source's value
    check_shape(src, tgt)
    if cfg.params is not None:
        from minitron.search import budget_layout

        if shape:
            raise ConfigError("give either --params or explicit target dimensions, not both")
        tgt = budget_layout(src, cfg.params, cfg.params_scope)  # raises PruneTargetError when no shape fits
    elif not shape:
        raise ConfigError("no target: pass --target FILE.yaml, a dimension flag (--hidden-size ...) or --params N")
    return Target(tgt, drop)


# ---------------------------------------------------------------------------------------------- plan
@dataclass
class Plan:
    """Which units of the source survive: sorted index tensors, per kept layer for heads/KV/neurons."""

    hidden: torch.Tensor  # [H'] hidden channels (the same everywhere)
    heads: list[torch.Tensor]  # per kept layer: query heads [nh']
    kv: list[torch.Tensor]  # per kept layer: KV heads [kv']
    neurons: list[torch.Tensor]  # per kept layer: MLP neurons [I']
    kept_layers: list[int]


def _top(score: torch.Tensor | None, k: int, n: int) -> torch.Tensor:
    """Indices of the ``k`` best of ``n`` units, in ascending order (all units when k == n)."""
    if k == n or score is None:
        return torch.arange(k)
    return score.topk(k).indices.sort().values


def head_plan(score: torch.Tensor | None, src: Layout, tgt: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """(query heads, KV heads) of one layer: the best KV groups, then the best query heads inside each group.

    A KV group's score is the sum of its query heads' scores; query head h belongs to group h // group_size.
    """
    g, g_new = src.group_size, tgt.num_attention_heads // tgt.num_key_value_heads
    s = score.view(src.num_key_value_heads, g) if score is not None else None
    kv = _top(s.sum(1) if s is not None else None, tgt.num_key_value_heads, src.num_key_value_heads)
    heads = [kv_i * g + _top(s[kv_i] if s is not None else None, g_new, g) for kv_i in kv.tolist()]
    return torch.cat(heads), kv


def choose_drop(scores: dict | None, meta: dict | None, n_layers: int, n_drop: int, metric: str) -> list[int]:
    """Layers to drop: the ``n_drop`` least important by ``metric`` or the best contiguous block (mc_block)."""
    if n_drop == 0:
        return []
    if metric == "mc_block":
        if "layer.mc_block" not in scores or meta.get("mc_block") != n_drop:
            raise MinitronError(f"depth_metric=mc_block needs scores computed with --mc-block {n_drop}")
        start = int(scores["layer.mc_block"].argmax())  # the block whose removal keeps accuracy highest
        return list(range(start, start + n_drop))
    key = "layer." + metric
    if key not in scores:
        raise MinitronError(f"the importance scores have no {metric!r} layer metric (recompute them with it)")
    return sorted(scores[key].topk(n_drop, largest=False).indices.tolist())  # the smallest loss/BI drop first


def make_plan(scores: dict | None, src: Layout, tgt: Layout, drop: list[int]) -> Plan:
    """Index sets for every pruned axis (scores may be None when no width axis shrinks)."""
    kept = [i for i in range(src.num_hidden_layers) if i not in set(drop)]
    sc = scores or {}
    hidden = _top(sc.get("hidden"), tgt.hidden_size, src.hidden_size)
    heads, kvs, neurons = [], [], []
    for i in kept:
        h, kv = head_plan(sc["heads"][i] if "heads" in sc else None, src, tgt)
        heads.append(h)
        kvs.append(kv)
        neurons.append(_top(sc["neurons"][i] if "neurons" in sc else None, tgt.intermediate_size, src.intermediate_size))
    return Plan(hidden, heads, kvs, neurons, kept)


# ---------------------------------------------------------------------------------------------- slicing
def _rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Head indices -> row indices of a [heads * head_dim, ...] projection."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def slice_tensor(ad: Adapter, src: Layout, plan: Plan, name: str, t: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """The pruned (name, tensor) for source tensor ``name``; None when its layer is dropped."""
    hid = plan.hidden
    top = {f"{ad.embed}.weight": (None, hid), f"{ad.lm_head}.weight": (None, hid), f"{ad.final_norm}.weight": (hid,)}
    if name in top:
        return name, _index(t, top[name])
    if not name.startswith(ad.layers + "."):
        if name.endswith("rotary_emb.inv_freq"):
            return name, t
        raise MinitronError(f"don't know how to prune tensor {name!r} of a {ad.family} model")
    idx, sub = name[len(ad.layers) + 1:].split(".", 1)
    if int(idx) not in plan.kept_layers:
        return None
    j = plan.kept_layers.index(int(idx))
    q, kv, neu = _rows(plan.heads[j], src.head_dim), _rows(plan.kv[j], src.head_dim), plan.neurons[j]
    module, kind = sub.rsplit(".", 1)
    # (rows, cols) kept per weight: nn.Linear weights are [out, in]; a bias follows its rows. Every projection
    # that reads the residual stream keeps the hidden channels as columns, every one that writes it as rows.
    rules = {ad.q: (q, hid), ad.k: (kv, hid), ad.v: (kv, hid), ad.o: (hid, q), ad.gate: (neu, hid),
             ad.up: (neu, hid), ad.down: (hid, neu), ad.attn_norm: (hid,), ad.mlp_norm: (hid,)}
    if module in ad.qk_norms:
        return f"{ad.layers}.{j}.{sub}", t  # over head_dim, which is kept
    if module not in rules:
        raise MinitronError(f"don't know how to prune tensor {name!r} of a {ad.family} model")
    dims = rules[module][:1] if kind == "bias" else rules[module]
    return f"{ad.layers}.{j}.{sub}", _index(t, dims)


def _index(t: torch.Tensor, dims: tuple) -> torch.Tensor:
    """Select ``dims[d]`` along dimension d (None keeps it); a no-op selection returns ``t`` itself."""
    for d, ix in enumerate(dims):
        if ix is not None and not (ix.numel() == t.shape[d] and bool((ix == torch.arange(t.shape[d])).all())):
            t = t.index_select(d, ix)
    return t


def plan_shards(specs: list[tuple[str, str, torch.Size, torch.dtype]], max_bytes: int) -> list[list[tuple]]:
    """Group (source key, output name, shape, dtype) specs into shards of at most ``max_bytes`` (in order)."""
    shards: list[list[tuple]] = [[]]
    size = 0
    for spec in specs:
        n = spec[2].numel() * spec[3].itemsize
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    return shards


def apply_plan(ckpt: ShardedCheckpoint, ad: Adapter, src: Layout, plan: Plan, out: Path, max_bytes: int) -> None:
    """Stream every source tensor through ``slice_tensor`` into new shards + index (source dtype kept).

    Pass 1 slices empty "meta" tensors to learn every output shape (no data read), which fixes the shard
    headers; pass 2 reads, slices and writes one tensor at a time. Peak memory: one source tensor and its slice;
    the embedding and lm_head (vocabulary x hidden: 1 GiB each for Llama-3.1-8B in bf16), whose rows are never
    pruned, go through a block of rows at a time (``ROW_BLOCK_BYTES``), so no whole copy of them is ever held.
    """
    specs = []
    for key in ckpt.keys():  # file by file
        _, dtype, shape = ckpt.entries[key]
        res = slice_tensor(ad, src, plan, key, torch.empty(shape, dtype=dtype, device="meta"))
        if res is not None:
            specs.append((key, res[0], res[1].shape, res[1].dtype))
    shards = plan_shards(specs, max_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    bar = tqdm(total=len(specs), desc="pruning tensors", mininterval=2)

    by_rows = {f"{ad.embed}.weight", f"{ad.lm_head}.weight"}  # sliced along columns only: row blocks slice alike

    for name, shard in zip(names, shards):
        def produce(i: int, shard=shard) -> torch.Tensor | Iterator[torch.Tensor]:
            bar.update(1)
            key = shard[i][0]
            if key in by_rows:
                return (slice_tensor(ad, src, plan, key, block)[1] for _, block in ckpt.row_blocks(key))
            return slice_tensor(ad, src, plan, key, ckpt.read(key))[1]

        write_shard(out / name, [(spec[1], spec[2], spec[3]) for spec in shard], produce)
    bar.close()
    total = sum(spec[2].numel() * spec[3].itemsize for spec in specs)
    write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": {
        spec[1]: name for name, shard in zip(names, shards) for spec in sorted(shard, key=lambda sp: sp[1])}})


# ---------------------------------------------------------------------------------------------- run
def needs_scores(src: Layout, target: Target) -> bool:
    """Scores are needed when a width axis shrinks or layers must be chosen by a metric."""
    tgt = target.layout
    width = any(getattr(tgt, k) != getattr(src, k) for k in SHAPE_FIELDS[:-1])
    return width or (target.drop is None and tgt.num_hidden_layers < src.num_hidden_layers)


def get_scores(cfg: PruneConfig, src: Layout, target: Target) -> tuple[dict, dict]:
    """Load cached scores (checked against the source shape) or run the calibration pass."""
    if cfg.scores:
        scores, meta = load_scores(cfg.scores)
        if meta.get("layout") != src.__dict__:
            raise MinitronError(f"{cfg.scores}: scores were computed for a different model shape "
                                f"({meta.get('layout')}); recompute them for {cfg.model}")
        return scores, meta
    n_drop = src.num_hidden_layers - target.layout.num_hidden_layers
    by_metric = target.drop is None and n_drop > 0  # layers still to choose
    metrics = ["block_importance"]
    if (cfg.search and cfg.search_depth) or (by_metric and cfg.depth_metric == "lm_loss"):
        metrics.append("lm_loss")
    if by_metric and cfg.depth_metric == "mc_block":
        metrics.append("mc_block")
    icfg = ImportanceConfig(model=cfg.model, calib=cfg.calib, calib_samples=cfg.calib_samples,
                            calib_seq_len=cfg.calib_seq_len, seed=cfg.seed, seq_agg=cfg.seq_agg,
                            batch_agg=cfg.batch_agg, layer_metrics=metrics, mc_data=cfg.mc_data,
                            mc_block=n_drop if "mc_block" in metrics else 0, mode=cfg.mode, batch_size=cfg.batch_size,
                            dtype=cfg.dtype)
    return compute_scores(icfg)


def _preflight(cfg: PruneConfig) -> tuple[Any, Layout, Target]:
    """Every check that can fail, before any work: model, output, target, data."""
    from transformers import AutoConfig

    if not cfg.out:
        raise ConfigError("pass --out DIR for the pruned model")
    cfg.model = str(resolve_model(cfg.model))
    config = AutoConfig.from_pretrained(cfg.model)
    src = Layout.from_config(config)
    target = resolve_target(cfg, src)
    check_loadable(config, target.layout)
    if needs_scores(src, target) or cfg.search:
        if cfg.search and not cfg.calib:
            raise ConfigError("--search needs --calib DATA (candidates are ranked by LM loss on it)")
        if not cfg.scores and not cfg.calib:
            raise ConfigError("pruning needs importance scores: pass --calib DATA (calibration corpus) or "
                              "--scores DIR (from `minitron importance`)")
        if cfg.depth_metric == "mc_block" and not cfg.scores and not cfg.mc_data and target.drop is None:
            raise ConfigError("depth_metric=mc_block needs --mc-data FILE.jsonl (MMLU format)")
    return config, src, target


def run(cfg: PruneConfig) -> Path:
    """Prune ``cfg.model`` to the target and write a standard HF directory at ``cfg.out`` (atomically)."""
    t0, source = time.time(), cfg.model  # the name as given (a hub name resolves to a local snapshot)
    fp = of_config(cfg)
    if cfg.out and Path(cfg.out).exists() and not cfg.force:
        if not is_model_dir(cfg.out):
            raise MinitronError(f"{cfg.out} exists and is not a model directory (pass --force to overwrite it)")
        if up_to_date(cfg.out, fp, "prune"):
            return Path(cfg.out)
    config, src, target = _preflight(cfg)  # every user error surfaces here, before any output exists
    ad = get_adapter(config)
    scores, meta = get_scores(cfg, src, target) if needs_scores(src, target) or cfg.search else (None, None)
    if cfg.search:
        from minitron.search import search

        target = search(cfg, config, src, scores, meta)
    drop = target.drop if target.drop is not None else choose_drop(
        scores, meta, src.num_hidden_layers, src.num_hidden_layers - target.layout.num_hidden_layers, cfg.depth_metric)
    plan = make_plan(scores, src, target.layout, drop)
    new_config = pruned_config(config, target.layout, plan.kept_layers)
    with atomic_dir(cfg.out) as tmp:
        apply_plan(ShardedCheckpoint(cfg.model), ad, src, plan, tmp, parse_size(cfg.max_shard_size))
        new_config.save_pretrained(tmp)
        _copy_tokenizer(Path(cfg.model), tmp)
        if scores is not None:
            save_scores(tmp / "importance", scores, meta)
        if target.searched:
            from minitron.search import write_table

            write_table(target.searched, tmp)
        metrics = _metrics(source, src, target.layout, drop, time.time() - t0)
        write_json(tmp / "metrics.json", metrics)
        save_resolved(cfg, tmp)
        record(tmp, fp)
        _card(tmp, cfg, metrics, meta)
    return Path(cfg.out)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    """Tokenizer, chat template and generation config travel unchanged (vocab is never pruned)."""
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def _metrics(source: str, src: Layout, tgt: Layout, drop: list[int], seconds: float) -> dict[str, Any]:
    return {"source": str(source), "params_source": src.num_params(), "params": tgt.num_params(),
            "params_ratio": tgt.num_params() / src.num_params(),
            "shape_source": {k: getattr(src, k) for k in SHAPE_FIELDS + ("head_dim",)},
            "shape": {k: getattr(tgt, k) for k in SHAPE_FIELDS + ("head_dim",)},
            "dropped_layers": drop, "seconds": round(seconds, 2)}


def _card(out: Path, cfg: PruneConfig, metrics: dict, meta: dict | None) -> None:
    """Model card naming source, target, importance method, calibration data and parameter count."""
    shape = ", ".join(f"{k}={v}" for k, v in metrics["shape"].items())
    if meta:
        method = (f"activation-based (Minitron): heads = o_proj input norm, neurons = down_proj input, channels = "
                  f"norm outputs; aggregation {meta['seq_agg']} over sequence, {meta['batch_agg']} over batch")
        calib = f"{meta['calib']} ({meta['calib_samples']} x {meta['calib_seq_len']} tokens, seed {meta['seed']})"
    else:
        method, calib = "none needed (no width axis shrinks; layers given explicitly)", "none"
    depth = (f"dropped layers {metrics['dropped_layers']} "
             f"({'explicit' if cfg.layers_to_drop else cfg.depth_metric})" if metrics["dropped_layers"] else "none")
    write_model_card(out, f"Pruned {Path(metrics['source']).name}", {
        "source": metrics["source"], "target": shape, "parameters": f"{metrics['params']:,} "
        f"({100 * metrics['params_ratio']:.1f}% of {metrics['params_source']:,})", "importance method": method,
        "calibration data": calib, "depth pruning": depth, "search": "yes" if cfg.search else "no"},
        body="Produced by `minitron prune`. Load with `AutoModelForCausalLM.from_pretrained`; importance scores "
             "are in `importance/`. Distil it from the source (`minitron distill`) before use.")
