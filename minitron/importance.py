"""Activation-based importance (Minitron): heads, MLP neurons, hidden channels and layers, forward only.

One pass over a calibration set, with forward hooks that accumulate statistics in place:
- attention head: the norm of its output (the o_proj input, sliced per head);
- MLP neuron: the down_proj input;
- hidden channel: the outputs of every RMSNorm (attention, MLP, final), summed over the norms;
- layer: Block Importance (1 - cos(input, output)), the LM loss with the layer dropped, and the multiple-choice
  accuracy with a contiguous block of layers dropped (an MMLU-format jsonl).
Per-sample statistics are aggregated over the sequence (``seq_agg``: mean of |x|, l2, var) then over the batch
(``batch_agg``: l2, mean, var); the default (mean, l2) is the paper's best.

Two drivers give the same scores: the whole model in memory, or layer by layer (``mode=layers``), where one
decoder layer is read from the safetensors shards at a time and the calibration activations are carried from
layer to layer (as SparseGPT/Wanda do), so memory stays a few GiB whatever the model size (1.4 GiB for an 8B
model at 32 x 512 calibration tokens: one layer, the activations, one micro-batch's temporaries).

    minitron importance --model runs/demo/teacher --calib runs/demo/world/corpus --out /tmp/imp
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from minitron.adapters import Adapter, Layout, get_adapter
from minitron.config import ConfigError, MinitronError, arg
from minitron.io import atomic_dir, write_json
from minitron.model_source import resolve_model
from minitron.scoring import token_logprobs
from minitron.weights import ShardedCheckpoint

SEQ_AGGS = ("mean", "l2", "var")
BATCH_AGGS = ("l2", "mean", "var")
LAYER_METRICS = ("block_importance", "lm_loss", "mc_block")

@dataclass
class ImportanceConfig:
    model: str = arg(None, "source model directory (standard HF dir with safetensors)")
    out: str | None = arg(None, "output directory for importance.safetensors / importance.json / importance.png")
    calib: str | None = arg(None, "calibration data source (see minitron.data: jsonl/txt/parquet file, dir, datasets name)")
    calib_samples: int = arg(64, "calibration sequences (the paper used 1024)")
    calib_seq_len: int = arg(256, "tokens per calibration sequence")
    seed: int = arg(0, "seed for sampling calibration windows")
    seq_agg: str = arg("mean", "aggregation over the sequence: mean (of |x|), l2, var")
    batch_agg: str = arg("l2", "aggregation over the batch: l2, mean, var")
    layer_metrics: list[str] = arg(["block_importance", "lm_loss"], "layer scores: block_importance, lm_loss, mc_block")
    mc_data: str | None = arg(None, "MMLU-format jsonl for mc_block (question, choices, answer)")
    mc_block: int = arg(0, "size of the contiguous block dropped for mc_block (layers to remove)")
    mc_samples: int = arg(100, "multiple-choice questions used for mc_block")
    mode: str = arg("auto", "driver: whole (model in memory), layers (one decoder layer at a time), auto (layers above 2 GiB)")
    batch_size: int = arg(8, "sequences per forward")
    dtype: str = arg("float32", "compute dtype (float32, bfloat16)")

    def __post_init__(self) -> None:
        if self.seq_agg not in SEQ_AGGS or self.batch_agg not in BATCH_AGGS:
            raise ConfigError(f"seq_agg must be one of {SEQ_AGGS} and batch_agg one of {BATCH_AGGS}")
        bad = [m for m in self.layer_metrics if m not in LAYER_METRICS]
        if bad:
            raise ConfigError(f"unknown layer metric {bad[0]!r}; valid: {', '.join(LAYER_METRICS)}")
        if "mc_block" in self.layer_metrics and (not self.mc_data or self.mc_block < 1):
            raise ConfigError("layer metric mc_block needs --mc-data FILE.jsonl and --mc-block N (layers to drop)")
        if self.mode not in ("auto", "whole", "layers"):
            raise ConfigError("mode must be auto, whole or layers")
        if min(self.calib_samples, self.calib_seq_len, self.batch_size) < 1:
            raise ConfigError("calib_samples, calib_seq_len and batch_size must be >= 1")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError("dtype must be float32 or bfloat16")


# ---------------------------------------------------------------------------------------------- statistics
def seq_reduce(x: torch.Tensor, how: str) -> torch.Tensor:
    """[B, S, C] -> [B, C]: mean of |x|, L2 norm, or variance over the sequence."""
    if how == "mean":
        return x.abs().mean(1)
    if how == "l2":
        return torch.linalg.vector_norm(x, dim=1)
    return x.var(1)


class Stat:
    """Running sums of per-sample values ([B, C] -> sums over B), reduced over the batch at the end."""

    def __init__(self, size: int):
        # float64 sums: thousands of batches of bf16-derived values must not lose the small differences that
        # rank units; the sums are [C], tiny next to the activations.
        self.s1 = torch.zeros(size, dtype=torch.float64)
        self.s2 = torch.zeros(size, dtype=torch.float64)
        self.n = 0

    def add(self, v: torch.Tensor) -> None:
        v = v.detach().to(torch.float64)
        self.s1.add_(v.sum(0))
        self.s2.add_(v.square().sum(0))
        self.n += v.shape[0]

    def result(self, how: str) -> torch.Tensor:
        """[C]: sqrt(sum v^2) (l2), mean, or variance of the per-sample values."""
        if how == "l2":
            return self.s2.sqrt().float()
        mean = self.s1 / max(self.n, 1)
        return (mean if how == "mean" else (self.s2 / max(self.n, 1) - mean.square()).clamp_min(0)).float()


class Collector:
    """Forward hooks on every decoder layer that accumulate head/neuron/channel/block statistics in place."""

    def __init__(self, layout: Layout, seq_agg: str):
        L, self.lay, self.agg = layout.num_hidden_layers, layout, seq_agg
        self.heads = [Stat(layout.num_attention_heads) for _ in range(L)]
        self.neurons = [Stat(layout.intermediate_size) for _ in range(L)]
        self.norms = [Stat(layout.hidden_size) for _ in range(2 * L + 1)]
        self.bi_sum = torch.zeros(L, dtype=torch.float64)
        self.bi_n = torch.zeros(L, dtype=torch.float64)
        self.active = True

    def attach(self, layer: torch.nn.Module, i: int, ad: Adapter) -> list[Any]:
        """Hook layer ``i`` (its index in the source model); returns the handles."""
        hd, nh = self.lay.head_dim, self.lay.num_attention_heads

        # Every hook reduces its activation to [B, C] at once (one pass over [B, S, C]) and adds it to float64
        # sums: nothing of size S is kept, so the cost is a few memory passes per layer next to its GEMMs.
        def heads(_m, args):
            if self.active:
                x = args[0]  # o_proj input [B, S, heads * head_dim]: per-head outputs before mixing
                self.heads[i].add(seq_reduce(x.view(*x.shape[:2], nh, hd).norm(dim=-1), self.agg))

        def neurons(_m, args):  # down_proj input [B, S, I]: act(gate) * up, one value per neuron
            if self.active:
                self.neurons[i].add(seq_reduce(args[0], self.agg))

        def norm(j):
            return lambda _m, _a, out: self.norms[j].add(seq_reduce(out, self.agg)) if self.active else None

        def block(_m, args, kwargs, out):  # the layer's own input/output: pre-final-norm, as BI needs (NOTES)
            if self.active:
                x = args[0] if args else kwargs["hidden_states"]
                y = out[0] if isinstance(out, tuple) else out
                cos = F.cosine_similarity(x.float(), y.float(), dim=-1)
                self.bi_sum[i] += (1 - cos).sum().item()
                self.bi_n[i] += cos.numel()

        g = layer.get_submodule
        return [g(ad.o).register_forward_pre_hook(heads), g(ad.down).register_forward_pre_hook(neurons),
                g(ad.attn_norm).register_forward_hook(norm(2 * i)), g(ad.mlp_norm).register_forward_hook(norm(2 * i + 1)),
                layer.register_forward_hook(block, with_kwargs=True)]

    def attach_final(self, norm: torch.nn.Module) -> Any:
        return norm.register_forward_hook(lambda _m, _a, out: self.norms[-1].add(seq_reduce(out, self.agg))
                                          if self.active else None)

    def scores(self, batch_agg: str) -> dict[str, torch.Tensor]:
        return {"heads": torch.stack([s.result(batch_agg) for s in self.heads]),
                "neurons": torch.stack([s.result(batch_agg) for s in self.neurons]),
                "hidden": torch.stack([s.result(batch_agg) for s in self.norms]).sum(0),
                "layer.block_importance": (self.bi_sum / self.bi_n.clamp_min(1)).float()}


# ---------------------------------------------------------------------------------------------- streams
@dataclass
class Stream:
    """One input set pushed through the model with some layers skipped; ``kind`` says what to measure.

    ``calib`` (hooks on, no skip) feeds the statistics; ``loss`` streams give the LM loss with ``skip`` dropped;
    ``mc`` streams give multiple-choice accuracy (``cont`` marks the answer tokens to score).
    """

    name: str
    kind: str  # calib | loss | mc
    ids: torch.Tensor  # [N, S]
    skip: frozenset = frozenset()
    cont: torch.Tensor | None = None  # [N, S] bool, mc only
    answers: torch.Tensor | None = None  # [N // n_choices], mc only
    sums: list = field(default_factory=lambda: [0.0, 0])  # loss: (nll sum, tokens)
    choice_lp: list = field(default_factory=list)  # mc: per-sequence answer log-probs

    def finish(self, h: torch.Tensor, rows: slice, head: torch.Tensor | None) -> None:
        """Consume the final-norm output ``h`` [b, S, H] of rows ``rows``."""
        if self.kind == "calib" and head is None:
            return  # width scores only: skip the LM head (about 40% of a calibration forward, see NOTES)
        ids = self.ids[rows]
        lp = token_logprobs(h, ids, head)
        if self.kind == "mc":
            self.choice_lp.append((lp * self.cont[rows, 1:]).sum(1))
        else:
            self.sums[0] += -lp.sum().item()
            self.sums[1] += lp.numel()

    def value(self) -> float:
        if self.kind == "mc":
            lp = torch.cat(self.choice_lp).view(self.answers.numel(), -1)
            return (lp.argmax(1) == self.answers).float().mean().item()
        return self.sums[0] / max(self.sums[1], 1)


def mc_batch(path: str, tokenizer: Any, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MMLU-format rows -> (ids [4n, T] right-padded, answer-token mask [4n, T], answers [n]).

    Prompt ``BOS question\\nAnswer:``, continuation `` choice`` (the space goes with the choice, see NOTES).
    """
    from minitron.data import read_jsonl

    seqs, conts, answers = [], [], []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for row in list(read_jsonl(path))[:n]:
        prompt = bos + tokenizer(f"{row['question'].strip()}\nAnswer:", add_special_tokens=False)["input_ids"]
        for choice in row["choices"]:
            c = tokenizer(f" {str(choice).strip()}", add_special_tokens=False)["input_ids"]
            seqs.append(prompt + c)
            conts.append([0] * len(prompt) + [1] * len(c))
        answers.append(int(row["answer"]))
    if not answers:
        raise MinitronError(f"{path}: no multiple-choice rows")
    if len({len(r["choices"]) for r in read_jsonl(path)}) != 1:
        raise MinitronError(f"{path}: every row must have the same number of choices")
    T, pad = max(map(len, seqs)), tokenizer.pad_token_id or 0
    ids = torch.tensor([s + [pad] * (T - len(s)) for s in seqs])
    cont = torch.tensor([c + [0] * (T - len(c)) for c in conts], dtype=torch.float32)
    return ids, cont, torch.tensor(answers)


def build_streams(cfg: ImportanceConfig, tokenizer: Any, n_layers: int) -> list[Stream]:
    """The calibration stream plus one stream per dropped layer / dropped block the layer metrics need."""
    from minitron.data import calibration_batch

    calib = calibration_batch(cfg.calib, tokenizer, cfg.calib_samples, cfg.calib_seq_len, seed=cfg.seed)
    streams = [Stream("calib", "calib", calib)]
    if "lm_loss" in cfg.layer_metrics:
        streams += [Stream(f"drop:{i}", "loss", calib, frozenset([i])) for i in range(n_layers)]
    if "mc_block" in cfg.layer_metrics:
        if cfg.mc_block >= n_layers:
            raise ConfigError(f"mc_block={cfg.mc_block} must be smaller than the {n_layers} layers")
        ids, cont, ans = mc_batch(cfg.mc_data, tokenizer, cfg.mc_samples)
        starts = range(n_layers - cfg.mc_block + 1)
        streams.append(Stream("mc", "mc", ids, cont=cont, answers=ans))
        streams += [Stream(f"mcdrop:{s}", "mc", ids, frozenset(range(s, s + cfg.mc_block)), cont, ans) for s in starts]
    return streams


# ---------------------------------------------------------------------------------------------- drivers
@contextlib.contextmanager
def skipping(model: Any, ad: Adapter, skip: frozenset) -> Iterator[None]:
    """Temporarily remove the layers in ``skip`` from a loaded model (config updated to match)."""
    if not skip:
        yield
        return
    parent_name, attr = ad.layers.rsplit(".", 1)
    parent, cfg = model.get_submodule(parent_name), model.config
    old, old_n, old_types = getattr(parent, attr), cfg.num_hidden_layers, getattr(cfg, "layer_types", None)
    keep = [i for i in range(len(old)) if i not in skip]
    setattr(parent, attr, torch.nn.ModuleList([old[i] for i in keep]))
    if old_types:
        cfg.layer_types = [old_types[i] for i in keep]
    cfg.num_hidden_layers = len(keep)
    try:
        yield
    finally:
        setattr(parent, attr, old)
        cfg.num_hidden_layers = old_n
        if old_types:
            cfg.layer_types = old_types


def run_whole(model: Any, streams: list[Stream], col: Collector, bs: int, want_head: bool) -> None:
    """Push every stream through the loaded model (its backbone: no logits except for the scored streams)."""
    ad = get_adapter(model.config)
    backbone = model.get_submodule(ad.layers.rsplit(".", 1)[0])
    handles = [h for i, layer in enumerate(ad.layer_modules(model)) for h in col.attach(layer, i, ad)]
    handles.append(col.attach_final(model.get_submodule(ad.final_norm)))
    head = model.get_submodule(ad.lm_head).weight if want_head else None
    try:
        for st in tqdm(streams, desc="importance (whole model)", disable=len(streams) < 3):
            col.active = st.kind == "calib"
            with skipping(model, ad, st.skip), torch.inference_mode():
                for r in range(0, st.ids.shape[0], bs):
                    rows = slice(r, r + bs)
                    h = backbone(input_ids=st.ids[rows], use_cache=False).last_hidden_state
                    st.finish(h, rows, head)
    finally:
        for h in handles:
            h.remove()


class LayerLoader:
    """Build one module of the model at a time (decoder layer, final norm) from the checkpoint shards."""

    def __init__(self, model_dir: str | Path, dtype: torch.dtype):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.ckpt = ShardedCheckpoint(model_dir)
        self.config = AutoConfig.from_pretrained(model_dir)
        self.config._attn_implementation = "sdpa"
        self.ad, self.dtype = get_adapter(self.config), dtype
        with torch.device("meta"):  # a weightless skeleton: module classes and shapes only
            self.skeleton = AutoModelForCausalLM.from_config(self.config)
        backbone = self.skeleton.get_submodule(self.ad.layers.rsplit(".", 1)[0])
        self.rotary = type(backbone.rotary_emb)(config=self.config)

    def module(self, path: str, template: torch.nn.Module) -> torch.nn.Module:
        """A real copy of ``template`` (a meta module at ``path``) with its weights read from the shards."""
        import copy

        mod = copy.deepcopy(template)
        state = {k: v.to(self.dtype) for k, v in self.ckpt.read_prefix(path + ".").items()}
        mod.load_state_dict(state, assign=True, strict=True)
        return mod.eval()

    def layer(self, i: int) -> torch.nn.Module:
        return self.module(f"{self.ad.layers}.{i}", self.ad.layer_modules(self.skeleton)[i])

    def tensor(self, path: str) -> torch.Tensor:
        return self.ckpt.read(path + ".weight").to(self.dtype)

    def mask(self, h: torch.Tensor, pos: torch.Tensor, i: int) -> Any:
        """Layer ``i``'s causal (or sliding-window) mask, exactly as the model's own forward builds it."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        kw = dict(config=self.config, inputs_embeds=h, attention_mask=None, past_key_values=None, position_ids=pos)
        sliding = self.layer_kind(i) == "sliding_attention"
        return (create_sliding_window_causal_mask if sliding else create_causal_mask)(**kw)

    def layer_kind(self, i: int) -> str:
        types = getattr(self.config, "layer_types", None)
        if types:
            return types[i]
        return "sliding_attention" if getattr(self.config, "sliding_window", None) else "full_attention"


def run_layers(loader: LayerLoader, streams: list[Stream], col: Collector, bs: int, want_head: bool) -> None:
    """Layer-by-layer driver: one decoder layer in memory, every stream's activations carried between layers."""
    ad, n_layers = loader.ad, loader.config.num_hidden_layers
    # Memory: one layer's weights + one [N, S, H] activation per stream (the calibration stream, plus one per
    # dropped-layer / dropped-block variant when lm_loss / mc_block are asked for) + one micro-batch's temporaries
    # (+ the LM head for the scored streams). The embedding table is never whole in memory (``embed_rows``).
    first: dict[int, torch.Tensor] = {}  # streams share ids tensors (the calibration batch): look up once each
    hs = {}
    for st in streams:
        hs[st.name] = first[id(st.ids)].clone() if id(st.ids) in first else embed_rows(loader, st.ids)  # [N, S, H]
        first.setdefault(id(st.ids), hs[st.name])
    with torch.inference_mode():
        for i in tqdm(range(n_layers), desc="importance (layer by layer)"):
            layer = loader.layer(i)
            handles = col.attach(layer, i, ad)
            for st in streams:
                if i in st.skip:
                    continue
                col.active = st.kind == "calib"
                _layer_forward(loader, layer, i, hs[st.name], bs)
            for h in handles:
                h.remove()
            del layer
        norm = loader.module(ad.final_norm, loader.skeleton.get_submodule(ad.final_norm))
        handle = col.attach_final(norm)
        head = loader.tensor(ad.lm_head if not loader.config.tie_word_embeddings else ad.embed) if want_head else None
        for st in streams:
            col.active = st.kind == "calib"
            for r in range(0, st.ids.shape[0], bs):
                st.finish(norm(hs[st.name][r:r + bs]), slice(r, r + bs), head)
        handle.remove()


def embed_rows(loader: LayerLoader, ids: torch.Tensor) -> torch.Tensor:
    """``F.embedding(ids, E)`` with the embedding table E read a block of rows at a time, and only the blocks
    that hold one of ``ids``: [N, S] -> [N, S, H] in the compute dtype (the same values: a lookup copies rows)."""
    key = f"{loader.ad.embed}.weight"
    (n_rows, width), step = loader.ckpt.entries[key][2], loader.ckpt.rows_per_block(key)
    if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < n_rows:
        raise MinitronError(f"token ids {int(ids.min())}..{int(ids.max())} outside the {n_rows}-row embedding")
    out = torch.empty(*ids.shape, width, dtype=loader.dtype)
    for start in range(0, n_rows, step):
        sel = (ids >= start) & (ids < start + step)
        if sel.any():
            block = loader.ckpt.read_rows(key, start, min(n_rows, start + step))
            out[sel] = F.embedding(ids[sel] - start, block).to(loader.dtype)
    return out


def _layer_forward(loader: LayerLoader, layer: torch.nn.Module, i: int, h: torch.Tensor, bs: int) -> None:
    """h[r:r+bs] = layer(h[r:r+bs]) for every micro-batch, in place."""
    pos = torch.arange(h.shape[1]).unsqueeze(0)
    for r in range(0, h.shape[0], bs):
        x = h[r:r + bs]
        pe = loader.rotary(x, pos)
        mask = loader.mask(x, pos, i)
        out = layer(x, attention_mask=mask, position_embeddings=pe, position_ids=pos, past_key_values=None,
                    use_cache=False)
        h[r:r + bs] = out[0] if isinstance(out, tuple) else out


# ---------------------------------------------------------------------------------------------- API
def compute_scores(cfg: ImportanceConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Run the calibration pass; returns (score tensors, metadata)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg.model = str(resolve_model(cfg.model))
    if not cfg.calib:
        raise ConfigError("importance needs calibration data: pass --calib DATA (a corpus file/dir or datasets name)")
    config = AutoConfig.from_pretrained(cfg.model)
    layout = Layout.from_config(config)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    torch.manual_seed(cfg.seed)
    streams = build_streams(cfg, tokenizer, layout.num_hidden_layers)
    dtype = getattr(torch, cfg.dtype)
    mode = cfg.mode
    if mode == "auto":
        mode = "layers" if ShardedCheckpoint(cfg.model).nbytes() > 2 * 2**30 else "whole"
    col = Collector(layout, cfg.seq_agg)
    want_head = len(streams) > 1
    if mode == "whole":
        model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype, attn_implementation="sdpa").eval()
        run_whole(model, streams, col, cfg.batch_size, want_head)
        del model
    else:
        run_layers(LayerLoader(cfg.model, dtype), streams, col, cfg.batch_size, want_head)
    return _collect(cfg, layout, streams, col, mode)


def _collect(cfg: ImportanceConfig, layout: Layout, streams: list[Stream], col: Collector, mode: str):
    """Score tensors and metadata from the finished streams."""
    scores = col.scores(cfg.batch_agg)
    by_name = {st.name: st for st in streams}
    meta: dict[str, Any] = {
        "model": str(cfg.model), "calib": str(cfg.calib), "calib_samples": cfg.calib_samples,
        "calib_seq_len": cfg.calib_seq_len, "seed": cfg.seed, "seq_agg": cfg.seq_agg, "batch_agg": cfg.batch_agg,
        "mode": mode, "layout": layout.__dict__, "layer_metrics": list(cfg.layer_metrics),
    }
    if "lm_loss" in cfg.layer_metrics:
        meta["base_loss"] = by_name["calib"].value()
        scores["layer.lm_loss"] = torch.tensor([by_name[f"drop:{i}"].value() for i in range(layout.num_hidden_layers)])
    if "mc_block" in cfg.layer_metrics:
        meta.update(mc_data=str(cfg.mc_data), mc_block=cfg.mc_block, mc_base_acc=by_name["mc"].value())
        n = layout.num_hidden_layers - cfg.mc_block + 1
        scores["layer.mc_block"] = torch.tensor([by_name[f"mcdrop:{s}"].value() for s in range(n)])
    return scores, meta


def save_scores(out_dir: str | Path, scores: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """importance.safetensors (tensors + metadata), importance.json (readable copy), importance.png (heatmaps)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().float() for k, v in scores.items()}, out / "importance.safetensors",
              metadata={"meta": json.dumps(meta)})
    layers = {k.split(".", 1)[1]: v.tolist() for k, v in scores.items() if k.startswith("layer.")}
    write_json(out / "importance.json", {**meta, "layers": layers,
                                         "hidden_top10": scores["hidden"].topk(10).indices.tolist()})
    plot_scores(scores, out / "importance.png")
    return out


def load_scores(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read scores saved by ``save_scores`` (a directory or the .safetensors file)."""
    from safetensors import safe_open

    p = Path(path)
    p = p / "importance.safetensors" if p.is_dir() else p
    if not p.exists():
        raise MinitronError(f"no importance scores at {path} (run `minitron importance` first)")
    with safe_open(str(p), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, json.loads(fh.metadata()["meta"])


def plot_scores(scores: dict[str, torch.Tensor], path: Path) -> None:
    """Per-layer heatmaps of head and neuron scores, sorted hidden-channel scores, layer metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    for a, key, title in ((ax[0, 0], "heads", "attention heads"), (ax[0, 1], "neurons", "MLP neurons")):
        im = a.imshow(scores[key].numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        a.set(title=f"{title} (layer x unit)", xlabel="unit", ylabel="layer")
        fig.colorbar(im, ax=a)
    ax[1, 0].plot(scores["hidden"].sort(descending=True).values.numpy())
    ax[1, 0].set(title="hidden channels (sorted)", xlabel="rank", ylabel="score")
    for key, v in scores.items():
        if key.startswith("layer."):
            x = v.numpy()
            ax[1, 1].plot(range(len(x)), (x - x.min()) / (x.max() - x.min() + 1e-12), marker="o", label=key[6:])
    ax[1, 1].set(title="layer metrics (min-max scaled)", xlabel="layer (block start for mc_block)")
    ax[1, 1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run(cfg: ImportanceConfig) -> Path:
    """Compute and save importance scores into ``cfg.out`` (atomically)."""
    if not cfg.out:
        raise ConfigError("pass --out DIR for the scores")
    scores, meta = compute_scores(cfg)
    with atomic_dir(cfg.out) as tmp:
        save_scores(tmp, scores, meta)
    return Path(cfg.out)
