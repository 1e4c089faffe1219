"""A small training loop shared by teacher correction and distillation (nanoGPT-style, on ``accelerate``).

What it does, in order: packed token rows in a fixed order (a pure function of seed and step), cosine LR with
warmup, gradient accumulation normalised by the tokens of the whole optimizer step, bf16 autocast (CUDA; CPU
with ``cpu_bf16``),
a tqdm bar with loss and tokens/s, metrics as JSONL, a loss-curve PNG, atomic checkpoints every N steps,
exact automatic resume (a rerun of the same fingerprint continues from its latest checkpoint), and a clear error on a NaN/inf loss (the last good checkpoint is kept).

Determinism: the rows of step ``s``, the learning rate of step ``s`` and the RNG seed of step ``s`` are all
computed from ``(seed, s)``, so resuming from a checkpoint (weights + optimizer state + step) reproduces the
uninterrupted run exactly, and ``world_size`` processes with the same global ``batch_size`` see the same rows.

Multi-device: launch with ``accelerate launch`` or ``torchrun`` (DDP; gloo on CPU, NCCL on GPU), or with an
FSDP2 launch config. DDP and single-process checkpoints are ``model.pt`` + ``optimizer.pt`` (the state is
replicated, the main process writes it); FSDP checkpoints are sharded (``torch.distributed.checkpoint``: every
rank writes its own shards of the weights and AdamW state, and a resume reshards them onto the ranks it runs on).

The stage supplies a ``Task``: a trainable ``module`` whose ``forward(**inputs)`` returns
``(loss, {"kl": sum, "ce": sum, ...})`` (loss already multiplied by the ``scale`` input), a function that builds
those inputs from a batch of rows (teacher outputs, targets), and a function that saves the result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from minitron.config import ConfigError, MinitronError, arg
from minitron.fingerprint import record
from minitron.io import atomic_dir, write_json


class TrainingDiverged(MinitronError):
    """The loss became NaN or inf; the message names the step and the last good checkpoint."""


@dataclasses.dataclass
class TrainArgs:
    """Fields shared by ``minitron correct`` and ``minitron distill`` (YAML keys / ``--field-name`` flags)."""

    data: str = arg(None, "training corpus: a file, a directory with train/validation files, or a datasets name")
    val_data: str | None = arg(None, "validation source (default: the 'validation' split of --data)")
    text_field: str = arg("text", "JSON field holding the document text")
    tokens: int = arg(1_000_000, "token budget: optimizer steps = tokens / (batch_size * seq_len)")
    seq_len: int = arg(256, "tokens per packed sequence")
    batch_size: int = arg(16, "sequences per optimizer step, across all devices (the global batch)")
    micro_batch_size: int = arg(8, "sequences per forward pass per device (gradient accumulation makes up the rest)")
    lr: float = arg(1e-4, "peak learning rate (after warmup)")
    min_lr: float = arg(1e-5, "final learning rate of the cosine schedule")
    warmup_steps: int = arg(10, "linear warmup steps")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    grad_clip: float = arg(1.0, "clip the global gradient norm (0 = no clipping)")
    seed: int = arg(0, "seed of data order, initialisation and dropout")
    save_every: int = arg(100, "write a checkpoint every N optimizer steps (0 = only at the end)")
    keep_checkpoints: int = arg(2, "how many recent checkpoints to keep")
    log_every: int = arg(10, "log metrics every N steps")
    eval_every: int = arg(0, "validation every N steps (0 = only at the end)")
    val_tokens: int = arg(32768, "validation tokens")
    resume: bool = arg(False, "continue from the latest checkpoint in <out>.run/checkpoints even if the config "
                              "changed (a rerun of the same config continues by itself)")
    max_steps: int | None = arg(None, "stop after this many steps (the LR schedule still follows --tokens)")
    bf16: bool = arg(True, "bf16 autocast on CUDA")
    cpu_bf16: bool = arg(False, "bf16 autocast on CPU too (weights and optimizer stay fp32; ~3x faster on CPUs "
                                "with AMX, measure with `minitron bench distill`)")
    force: bool = arg(False, "start over: discard the checkpoints and overwrite a finished output")

    def validate_train(self) -> None:
        """Raise ConfigError for inconsistent training fields (called from the stage's ``__post_init__``)."""
        if not self.data:
            raise ConfigError("--data is required (a corpus file, directory or datasets name)")
        for name in ("tokens", "seq_len", "batch_size", "micro_batch_size", "val_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(f"--batch-size {self.batch_size} must be a multiple of --micro-batch-size "
                              f"{self.micro_batch_size}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError("need 0 <= --min-lr <= --lr")


@dataclasses.dataclass
class Task:
    """What a stage trains: see the module docstring."""

    module: torch.nn.Module
    make_inputs: Callable[[dict[str, torch.Tensor]], dict[str, Any]]  # batch rows -> module inputs (no grad)
    # (unwrapped module, tmp out dir, summary, its whole state dict: FSDP shards the module's own) -> files
    save: Callable[[torch.nn.Module, Path, dict, dict], None]
    metric_names: tuple[str, ...] = ("loss",)


def lr_at(step: int, total: int, cfg: TrainArgs) -> float:
    """Linear warmup to ``lr`` then cosine decay to ``min_lr`` at ``total`` steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))


def step_rows(step: int, n_rows: int, batch_size: int, seed: int) -> torch.Tensor:
    """Row indices of the global batch of ``step``: epoch-wise random permutations, seeded by (seed, epoch)."""
    pos = torch.arange(step * batch_size, (step + 1) * batch_size)
    out = torch.empty_like(pos)
    for epoch in pos.div(n_rows, rounding_mode="floor").unique().tolist():
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1009 + epoch))
        sel = pos // n_rows == epoch
        out[sel] = perm[pos[sel] % n_rows]
    return out


def total_steps(cfg: TrainArgs) -> int:
    """Optimizer steps that spend the token budget."""
    return max(1, math.ceil(cfg.tokens / (cfg.batch_size * cfg.seq_len)))


def _checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (those with state.json), oldest first."""
    ck = run_dir / "checkpoints"
    return sorted((p for p in ck.glob("step-*") if (p / "state.json").exists()), key=lambda p: p.name)


def save_checkpoint(run_dir: Path, module, optimizer, state: dict, keep: int) -> Path:
    """Atomically write ``checkpoints/step-NNNNNNN`` (weights, optimizer, state) and prune old ones."""
    target = run_dir / "checkpoints" / f"step-{state['step']:07d}"
    with atomic_dir(target) as tmp:
        torch.save(module.state_dict(), tmp / "model.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        write_json(tmp / "state.json", state)
    for old in _checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(ckpt: Path, module, optimizer) -> dict:
    """Restore weights and optimizer state from ``ckpt``; returns its state dict (step, tokens, ...)."""
    module.load_state_dict(torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
    return json.loads((ckpt / "state.json").read_text())


def is_sharded(ckpt: Path) -> bool:
    """A checkpoint written by ``save_sharded`` (an FSDP run) rather than ``save_checkpoint``."""
    return not (ckpt / "model.pt").exists()


def save_sharded(run_dir: Path, module, optimizer, state: dict, keep: int, accel) -> Path:
    """FSDP: every rank writes its shards of the weights and the AdamW state (``torch.distributed.checkpoint``)
    into ``checkpoints/.step-NNNNNNN.tmp``; the main process then adds ``state.json`` and renames it into place,
    so a run killed while saving leaves no ``step-*`` directory without ``state.json`` (``_checkpoints`` skips it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    target = run_dir / "checkpoints" / f"step-{state['step']:07d}"
    tmp = target.with_name(f".{target.name}.tmp")  # one name for every rank (atomic_dir's is per process)
    if accel.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # a save that was killed
        tmp.mkdir(parents=True)
    accel.wait_for_everyone()
    model_sd, optim_sd = get_state_dict(module, optimizer.optimizer)  # DTensor shards, keyed by parameter name
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=tmp)
    accel.wait_for_everyone()
    if accel.is_main_process:
        write_json(tmp / "state.json", {**state, "world_size": accel.num_processes})
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        for old in _checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accel.wait_for_everyone()
    return target


def load_sharded(ckpt: Path, module, optimizer) -> dict:
    """Restore a ``save_sharded`` checkpoint into the prepared ``module`` (FSDP, or DDP / one process) and its
    optimizer, on every rank; returns its state dict (step, tokens, ...). ``torch.distributed.checkpoint`` reads
    the parts of the saved shards that this rank's parameters cover, so the ranks need not be those that saved it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(module, optimizer.optimizer)  # the layout to fill (AdamW state created)
    sd = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(sd, checkpoint_id=ckpt)
    set_state_dict(module, optimizer.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
    state = json.loads((ckpt / "state.json").read_text())
    state.pop("world_size", None)  # of the run that saved it (a record only)
    return state


def _batch(data: dict[str, torch.Tensor], idx: torch.Tensor, device) -> dict[str, torch.Tensor]:
    return {k: v[idx].to(device) for k, v in data.items()}


@torch.no_grad()
def evaluate(task: Task, module, data: dict[str, torch.Tensor], cfg: TrainArgs, accel) -> dict[str, float]:
    """Mean loss terms per token over ``data`` rows (sharded across processes, summed with all-reduce)."""
    module = accel.unwrap_model(module)  # no DDP collectives (FSDP keeps its own: every forward gathers weights)
    module.eval()
    n = data["input_ids"].shape[0]
    mine = torch.arange(accel.process_index, n, accel.num_processes)
    sums: dict[str, torch.Tensor] = {}
    for i in range(0, math.ceil(n / accel.num_processes), cfg.micro_batch_size):  # as many forwards on each rank
        rows = mine[i : i + cfg.micro_batch_size]
        batch = _batch(data, rows if len(rows) else torch.zeros(1, dtype=torch.long), accel.device)
        with accel.autocast():
            _, stats = module(**task.make_inputs(batch), scale=1.0)
        for k, v in stats.items() if len(rows) else ():  # a rank out of rows ran a dummy row for FSDP's sake
            sums[k] = sums.get(k, 0) + v.detach().float()
    module.train()
    keys = sorted(sums) or ["n_tokens"]
    vec = torch.stack([torch.as_tensor(sums.get(k, 0.0), dtype=torch.float32, device=accel.device) for k in keys])
    vec = accel.reduce(vec, "sum")
    totals = dict(zip(keys, vec.tolist()))
    return per_token(totals)


def per_token(sums: dict[str, float]) -> dict[str, float]:
    """Turn summed stats (``kl``, ``ce``, ``hidden``, ``loss`` with their ``n_*`` counts) into per-token means."""
    out = {}
    for k, v in sums.items():
        if not k.startswith("n_"):
            out[k] = v / max(1.0, sums.get(f"n_{k}", sums.get("n_tokens", 1.0)))
    return out


def _micro_step(task: Task, module, batch, scale: float, accel, sync: bool) -> dict[str, torch.Tensor]:
    """Forward + backward of one micro-batch; gradient all-reduce only on the last one (``sync``)."""
    ctx = accel.no_sync(module) if not sync else contextlib.nullcontext()
    with ctx:
        with accel.autocast():
            loss, stats = module(**task.make_inputs(batch), scale=scale)
        accel.backward(loss)
    return {k: v.detach().float() for k, v in stats.items()}


def _accumulate(task: Task, module, data, rows: torch.Tensor, micro: int, scale: float, accel) -> dict[str, float]:
    """Gradients of this process's ``rows`` accumulated over micro-batches; stats summed over all processes."""
    stats = []
    for i in range(0, len(rows), micro):
        batch = _batch(data, rows[i : i + micro], accel.device)
        stats.append(_micro_step(task, module, batch, scale, accel, sync=i + micro >= len(rows)))
    return _reduce_stats(stats, accel)


def _reduce_stats(stats: list[dict[str, torch.Tensor]], accel) -> dict[str, float]:
    """Sum per-micro-batch stats over micro-batches and processes."""
    keys = sorted(stats[0])
    vec = torch.stack([sum(s[k] for s in stats) for k in keys]).to(accel.device)
    return dict(zip(keys, accel.reduce(vec, "sum").tolist()))


def resumable(cfg: TrainArgs, run_dir: Path, fp: dict | None) -> Path | None:
    """The checkpoint to continue from: the latest one of this run (same fingerprint), or any with ``--resume``;
    none with ``--force``."""
    ckpts = _checkpoints(run_dir)
    if not ckpts or (cfg.force and not cfg.resume):
        return None
    made_by = json.loads((ckpts[-1] / "state.json").read_text()).get("fingerprint")
    if cfg.resume or fp is None or made_by == fp["fingerprint"]:
        return ckpts[-1]
    return None


def _set_aside(run_dir: Path, force: bool) -> None:
    """A fresh run: ``--force`` deletes the old checkpoints; checkpoints of another config are kept aside
    (``<out>.run.<fingerprint>``) so that nothing the user did not ask to delete is lost."""
    ckpts = _checkpoints(run_dir)
    if force or not ckpts:
        shutil.rmtree(run_dir)
        return
    made_by = json.loads((ckpts[-1] / "state.json").read_text()).get("fingerprint") or "old"
    aside = run_dir.with_name(f"{run_dir.name}.{made_by}")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(run_dir, aside)
    print(f"checkpoints in {run_dir} belong to another config: moved to {aside}, starting from step 0")


def finished(cfg: TrainArgs, out: Path, fp: dict, stage: str) -> bool:
    """A finished output made by this config and these inputs (``metrics.json`` present, as many steps as asked)
    is kept; ``--force`` or ``--resume`` (which may extend it) redo it."""
    from minitron.fingerprint import up_to_date
    from minitron.io import is_model_dir

    if cfg.resume or not (is_model_dir(out) and (out / "metrics.json").exists()):
        return False
    if not up_to_date(out, fp, stage, cfg.force):
        return False
    m = json.loads((out / "metrics.json").read_text())
    wanted = m.get("planned_steps", 0) if cfg.max_steps is None else min(cfg.max_steps, m.get("planned_steps", 0))
    if m.get("steps", wanted) < wanted:
        print(f"[{stage}] {out} stopped at step {m['steps']} of {wanted}: continuing")
        return False
    return True


def train(cfg: TrainArgs, task: Task, data: dict[str, torch.Tensor], val: dict[str, torch.Tensor] | None,
          out: Path, accel, fp: dict | None = None) -> dict[str, Any]:
    """Train ``task.module`` on ``data`` rows ({"input_ids": [N, T], ...}); write ``out`` atomically.

    Checkpoints and live metrics go to ``<out>.run/``; a rerun continues from the latest checkpoint made by the
    same fingerprint ``fp`` (``minitron.fingerprint``), which is also recorded in ``out``. Returns the summary
    written to ``metrics.json``.
    """
    out = Path(out)
    run_dir = out.with_name(out.name + ".run")
    n_rows, seq_len = data["input_ids"].shape
    steps = total_steps(cfg)
    world = accel.num_processes
    if cfg.batch_size % (cfg.micro_batch_size * world):
        raise ConfigError(f"--batch-size {cfg.batch_size} must be a multiple of micro_batch_size x processes "
                          f"({cfg.micro_batch_size} x {world})")
    params = [p for p in task.module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    state = {"step": 0, "tokens": 0, "elapsed_s": 0.0, "fingerprint": fp["fingerprint"] if fp else None}
    ckpt = resumable(cfg, run_dir, fp)
    if ckpt is not None and _fsdp(accel) and not is_sharded(ckpt):
        raise ConfigError(f"{ckpt} was written by a DDP or one-process run (whole weights): resume it with that "
                          "launch, or pass --force to start over under FSDP")
    if ckpt is not None and not is_sharded(ckpt):  # replicated state: loaded before DDP copies the module
        state = {**load_checkpoint(ckpt, task.module, optimizer), "fingerprint": state["fingerprint"]}
        accel.print(f"resumed from {ckpt} (step {state['step']})")
    elif ckpt is None and accel.is_main_process and run_dir.exists():
        _set_aside(run_dir, cfg.force)
    accel.wait_for_everyone()
    module, optimizer = accel.prepare(task.module, optimizer)
    if ckpt is not None and is_sharded(ckpt):  # FSDP shards, resharded onto this run's module (FSDP or not)
        state = {**load_sharded(ckpt, module, optimizer), "fingerprint": state["fingerprint"]}
        accel.print(f"resumed from {ckpt} (step {state['step']})")
    params = [p for p in module.parameters() if p.requires_grad]  # FSDP swaps them for DTensor shards
    metrics_path = run_dir / "metrics.jsonl"
    if accel.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(metrics_path, state["step"])
    stop = steps if cfg.max_steps is None else min(steps, cfg.max_steps)
    rows_per_rank = cfg.batch_size // world
    tokens_per_step = cfg.batch_size * seq_len
    bar = tqdm(range(state["step"], stop), initial=state["step"], total=stop, disable=not accel.is_main_process,
               desc=out.name, unit="step")
    module.train()
    for step in bar:
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed * 7919 + step * world + accel.process_index)  # dropout RNG: f(seed, step, rank)
        lr = lr_at(step, steps, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        idx = step_rows(step, n_rows, cfg.batch_size, cfg.seed)
        mine = idx[accel.process_index * rows_per_rank : (accel.process_index + 1) * rows_per_rank]
        # Each micro-batch's loss is a sum over its tokens times 1 / (tokens of the global step); DDP averages
        # gradients over processes, hence the factor ``world``.
        scale = world / tokens_per_step
        sums = _accumulate(task, module, data, mine, cfg.micro_batch_size, scale, accel)
        if not math.isfinite(sums["loss"]):
            _diverged(run_dir, step, lr, sums["loss"], accel)
        if cfg.grad_clip > 0:
            accel.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        state = {**state, "step": step + 1, "tokens": state["tokens"] + tokens_per_step,
                 "elapsed_s": state["elapsed_s"] + dt}
        rec = {"step": step + 1, "tokens": state["tokens"], "lr": lr, **per_token(sums),
               "tokens_per_s": tokens_per_step / dt}
        bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
        if val is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < stop:
            rec.update({f"val_{k}": v for k, v in evaluate(task, module, val, cfg, accel).items()})
        if accel.is_main_process and ((step + 1) % cfg.log_every == 0 or step == 0 or "val_loss" in rec
                                      or step + 1 == stop):
            _append_jsonl(metrics_path, rec)
        if (cfg.save_every and (step + 1) % cfg.save_every == 0) or (step + 1 == stop < steps):
            _save(run_dir, accel, module, optimizer, state, cfg.keep_checkpoints)
    return _finish(cfg, task, module, val, out, run_dir, accel, state, steps, stop, fp)


def _diverged(run_dir: Path, step: int, lr: float, loss: float, accel) -> None:
    """Raise TrainingDiverged. Checkpoints holding the weights that produced the bad loss (step >= ``step``)
    are renamed ``diverged-step-N`` so that ``--resume`` starts from the last good one."""
    good = []
    for ck in _checkpoints(run_dir):
        if int(ck.name.split("-")[1]) < step:
            good.append(ck)
        elif accel.is_main_process:
            os.replace(ck, ck.with_name("diverged-" + ck.name))
    where = f"the last good checkpoint is {good[-1]}" if good else "no good checkpoint was written"
    raise TrainingDiverged(f"loss is {loss} at step {step + 1} (lr {lr:.3g}); {where} . Lower --lr, raise "
                           f"--warmup-steps or set --grad-clip, then rerun with --resume")


def _save(run_dir, accel, module, optimizer, state, keep) -> Path:
    """Checkpoint from the main process (DDP state is replicated), or from every rank (FSDP: sharded)."""
    if _fsdp(accel):
        return save_sharded(run_dir, module, optimizer, state, keep, accel)
    path = run_dir / "checkpoints" / f"step-{state['step']:07d}"
    if accel.is_main_process:
        save_checkpoint(run_dir, accel.unwrap_model(module), optimizer, state, keep)
    accel.wait_for_everyone()
    return path


def _finish(cfg, task, module, val, out, run_dir, accel, state, steps, stop, fp) -> dict[str, Any]:
    """Final validation, then the output directory (model, metrics.json/jsonl, loss_curve.png) atomically."""
    final_val = evaluate(task, module, val, cfg, accel) if val is not None else {}
    weights = accel.get_state_dict(module)  # on every rank: FSDP gathers the whole weights on the main process
    summary = {"steps": state["step"], "planned_steps": steps, "completed": stop == steps, "tokens": state["tokens"],
               "train_time_s": round(state["elapsed_s"], 2),
               "tokens_per_s": state["tokens"] / max(state["elapsed_s"], 1e-9),
               "world_size": accel.num_processes, "device": str(accel.device)}
    history = _read_jsonl(run_dir / "metrics.jsonl") if accel.is_main_process else []
    if history:
        summary.update({f"final_train_{k}": v for k, v in history[-1].items() if k in task.metric_names})
    summary.update({f"final_val_{k}": v for k, v in final_val.items()})
    if accel.is_main_process:
        if final_val:
            _append_jsonl(run_dir / "metrics.jsonl", {"step": state["step"], "tokens": state["tokens"],
                                                      **{f"val_{k}": v for k, v in final_val.items()}})
        with atomic_dir(out) as tmp:
            task.save(accel.unwrap_model(module), tmp, summary, weights)
            shutil.copy(run_dir / "metrics.jsonl", tmp / "metrics.jsonl")
            plot_losses(_read_jsonl(tmp / "metrics.jsonl"), tmp / "loss_curve.png", title=out.name)
            write_json(tmp / "metrics.json", summary)
            if fp:
                record(tmp, fp)
    accel.wait_for_everyone()
    return summary


def _append_jsonl(path: Path, rec: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(rec) + "\n")


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records logged after the checkpoint (they will be logged again)."""
    keep = [r for r in _read_jsonl(path) if r["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def plot_losses(records: list[dict], path: Path, title: str = "") -> Path | None:
    """Training (and validation) loss terms against tokens, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    keys = sorted({k for r in records for k in r if k in ("loss", "kl", "ce", "hidden") or k.startswith("val_")})
    for k in keys:
        pts = [(r["tokens"], r[k]) for r in records if k in r]
        ax.plot(*zip(*pts), marker="o" if k.startswith("val_") else None, label=k, ms=3)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss per token (nats)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def make_accelerator(cfg: TrainArgs):
    """An ``accelerate.Accelerator``: CPU (gloo when launched with several processes) or CUDA; bf16 autocast on
    CUDA with ``bf16``, on CPU with ``cpu_bf16``.

    Launch several processes with ``accelerate launch --config_file configs/accelerate/<ddp|fsdp>_*.yaml`` (or
    ``torchrun``, DDP). An FSDP launch config shards on CPU too (FSDP2 over gloo, see ``_fsdp_on_cpu``).
    """
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    os.environ.setdefault("ACCELERATE_USE_CPU", "false" if cuda else "true")
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp and not cuda and os.environ.get("FSDP_VERSION", "1") != "2":
        raise ConfigError("FSDP on CPU needs `fsdp_version: 2` in the accelerate config (configs/accelerate/"
                          "fsdp_cpu.yaml): torch's FSDP1 refuses a CPU device ('Inconsistent compute device and "
                          "`device_id`: cpu vs cpu:0')")
    bf16 = cfg.bf16 if cuda else cfg.cpu_bf16
    accel = Accelerator(cpu=not cuda, mixed_precision="bf16" if bf16 else "no")
    if fsdp and not cuda and accel.num_processes > 1:
        _fsdp_on_cpu(accel)
    return accel


def _fsdp(accel) -> bool:
    from accelerate.utils import DistributedType

    return accel.distributed_type == DistributedType.FSDP


def _fsdp_on_cpu(accel) -> None:
    """Switch a multi-process CPU accelerator to the FSDP its launch config asked for.

    accelerate 1.15 enables FSDP on accelerator devices only: on CPU the state stays MULTI_CPU and ``prepare``
    silently wraps the model in DDP instead. torch's FSDP2 (``fully_shard``) does shard on CPU over gloo, so the
    state becomes FSDP with the plugin read from the launch environment, as accelerate does on GPUs.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # the fsdp_config of the launch config (FSDP_* variables)
    if accel.mixed_precision != "no":
        plugin.set_mixed_precision(accel.mixed_precision)
    accel.state.fsdp_plugin = plugin
    accel.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP

