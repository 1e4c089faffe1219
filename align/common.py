"""What the four stages share: training arguments, model loading, resume, and the atomic stage output.

A stage trains in ``OUT/.work/<stage>/`` (TRL checkpoints every ``save_steps``), resumes from the last checkpoint
there after an interruption, and on success writes ``OUT/<stage>/`` atomically: the HF model (LoRA merged, adapter
beside it), the tokenizer with the chat template, ``generation_config.json`` stopping at EOS and ``<|im_end|>``,
``metrics.json``, ``config.resolved.yaml`` and a model card. "The directory exists" means "the stage finished".
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import PartialState

from align.lora import LoraArgs, merge_for_export
from minitron import fingerprint
from minitron.chat_format import ensure_tool_template, install_chat_template, stop_token_ids
from minitron.config import ConfigError, arg
from minitron.io import atomic_dir, count_parameters, read_json, write_json, write_model_card


@dataclasses.dataclass
class StageArgs:
    """Optimisation settings of one stage (each stage subclasses this with its own defaults)."""

    steps: int = arg(100, "optimizer steps (capped by the pipeline's --max-steps)")
    lr: float = arg(5e-5, "peak learning rate (cosine decay after warm-up)")
    batch_size: int = arg(8, "examples per device per micro-batch")
    grad_accum: int = arg(1, "micro-batches per optimizer step")
    warmup_ratio: float = arg(0.05, "fraction of the steps spent warming the learning rate up")
    save_steps: int = arg(25, "checkpoint every N steps (the resume point after an interruption)")
    logging_steps: int = arg(5, "log training metrics every N steps")
    freeze_embeddings: bool = arg(False, "keep the token embeddings (and a tied LM head) frozen")
    freeze_layers: int = arg(0, "keep the bottom N decoder layers frozen (backward stops above them: faster)")

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "save_steps", "logging_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{type(self).__name__}.{name} must be positive (got {getattr(self, name)})")
        if self.freeze_layers < 0:
            raise ConfigError(f"{type(self).__name__}.freeze_layers must be >= 0 (got {self.freeze_layers})")
        if self.lr <= 0 or not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"{type(self).__name__}: lr must be > 0 and warmup_ratio in [0, 1)")


@dataclasses.dataclass
class StageContext:
    """Pipeline-wide settings that every stage reads."""

    out: Path
    seed: int = 0
    max_steps: int | None = None
    max_length: int = 512
    cpu_bf16: bool = False  # bf16 autocast on CPU (a CUDA device uses bf16 whenever it supports it)
    lora: LoraArgs = dataclasses.field(default_factory=LoraArgs)
    started: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)  # stage -> (wall, cpu) at start
    callbacks: list[Any] = dataclasses.field(default_factory=list)  # extra transformers TrainerCallbacks
    fingerprints: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # stage -> what makes it

    def work_dir(self, stage: str) -> Path:
        return self.out / ".work" / stage

    def steps(self, args: StageArgs) -> int:
        return min(args.steps, self.max_steps) if self.max_steps else args.steps


def on_gpu() -> bool:
    return torch.cuda.is_available()


def trl_args(config_cls: type, args: StageArgs, ctx: StageContext, stage: str, **extra: Any) -> Any:
    """A TRL ``XConfig`` with the project's defaults: CPU-safe precision, checkpoints for resume, no reporting.

    TRL configs default to bf16=True; on CPU that is wrong (NOTES.md), so bf16 is on for a CUDA device that
    supports it, and on CPU only with ``ctx.cpu_bf16`` (autocast; the weights and optimizer stay fp32). Gradient
    checkpointing (a TRL default) only slows the small models this runs on CPU.
    """
    steps = ctx.steps(args)
    bf16 = torch.cuda.is_bf16_supported() if on_gpu() else ctx.cpu_bf16
    kw = dict(output_dir=str(ctx.work_dir(stage)), max_steps=steps, per_device_train_batch_size=args.batch_size,
              per_device_eval_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
              learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=math.ceil(args.warmup_ratio * steps),
              logging_steps=min(args.logging_steps, steps), save_strategy="steps", save_steps=args.save_steps,
              save_total_limit=1, report_to="none", seed=ctx.seed, use_cpu=not on_gpu(), bf16=bf16, fp16=False,
              gradient_checkpointing=on_gpu(), dataloader_num_workers=0, eval_strategy="no",
              max_length=ctx.max_length)
    kw.update(extra)
    if "max_length" not in {f.name for f in dataclasses.fields(config_cls)}:
        kw.pop("max_length")  # RL configs bound the completion instead (max_completion_length)
    return config_cls(**kw)


def freeze(model: Any, args: StageArgs) -> Any:
    """Partial fine-tuning: freeze the embeddings and/or the bottom ``freeze_layers`` decoder layers in place."""
    if args.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    if args.freeze_layers:
        layers = model.base_model.layers
        if args.freeze_layers >= len(layers):
            raise ConfigError(f"freeze_layers={args.freeze_layers} leaves nothing to train: the model has "
                              f"{len(layers)} decoder layers")
        for layer in layers[: args.freeze_layers]:
            layer.requires_grad_(False)
    return model


def last_checkpoint(ctx: StageContext, stage: str) -> str | None:
    """The newest complete ``checkpoint-N`` of an interrupted run of ``stage``, or None.

    The Trainer writes ``trainer_state.json`` last, so a checkpoint without a readable one was cut short (a kill
    while saving): it is passed over, and the resumed run overwrites it when it reaches that step again.
    """
    work = ctx.work_dir(stage)
    for ckpt in sorted(work.glob("checkpoint-*"), key=_step_of, reverse=True):
        try:
            step = read_json(ckpt / "trainer_state.json")["global_step"]
        except (OSError, ValueError, KeyError):
            continue
        print(f"[{stage}] resuming from {ckpt} (step {step})")
        return str(ckpt)
    return None


def _step_of(ckpt: Path) -> int:
    tail = ckpt.name.rpartition("-")[2]
    return int(tail) if tail.isdigit() else -1


def process_state() -> PartialState:
    """accelerate's process state, on the CPU when there is no CUDA (as TRL's ``use_cpu``).

    A bare ``PartialState()`` under a torchrun-style launch on a CPU-only machine is *not* distributed: every rank
    reads ``is_main_process`` as True and ``wait_for_everyone`` returns at once (measured, accelerate 1.16). The
    state is a singleton: whichever call comes first (this one or TRL's) sets it for the process.
    """
    return PartialState(cpu=not on_gpu())


def claim_work_dir(ctx: StageContext, stage: str, fp: dict[str, Any]) -> Path:
    """Make ``OUT/.work/<stage>`` this run's: checkpoints of the same fingerprint stay (they are resumed); those of
    another config (or of no recorded one) are moved aside to ``.work/<stage>.<fingerprint>``, with one line. Under
    accelerate launch one rank claims while the others wait (a rank that saw the other's half-written record moved
    the folder from under it)."""
    work = ctx.work_dir(stage)
    ctx.fingerprints[stage] = fp
    ranks = process_state()
    if ranks.is_main_process:
        _claim(work, stage, fp)
    ranks.wait_for_everyone()
    return work


def _claim(work: Path, stage: str, fp: dict[str, Any]) -> None:
    if work.is_dir() and any(work.iterdir()):
        rec = work / fingerprint.FILE
        old = read_json(rec).get("fingerprint", "unrecorded") if rec.is_file() else "unrecorded"
        if old == fp["fingerprint"]:
            return
        aside, n = work.with_name(f"{stage}.{old}"), 1
        while aside.exists():
            aside, n = work.with_name(f"{stage}.{old}.{n}"), n + 1
        work.rename(aside)
        print(f"[{stage}] {work} holds the work of another config (fingerprint {old}): moved it aside to {aside}, "
              "starting at step 0")
    fingerprint.record(work, fp)


def load_tokenizer(path: str | Path) -> Any:
    """The model's tokenizer, with the project chat template installed when it has none."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    install_chat_template(tok)
    ensure_tool_template(tok)  # a ChatML template without tool support gets the project's (tools in SFT, BFCL)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def prepare_model(model: Any, tok: Any) -> Any:
    """Match the embeddings to the tokenizer (new template tokens) and stop generation at end of turn."""
    if model.get_input_embeddings().weight.shape[0] < len(tok):
        # install_chat_template added <|im_start|>/<|im_end|>/tool tokens to a tokenizer that had no template
        model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = tok.pad_token_id
    model.config.use_cache = True  # TRL saves use_cache=false; generation (HF, vLLM) wants the KV cache
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = stop_token_ids(tok)
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.bos_token_id = tok.bos_token_id
    return model


def load_causal_lm(path: str | Path, tok: Any, dtype: torch.dtype = torch.float32) -> Any:
    """A causal LM, fp32 by default (TRL's mixed precision handles bf16 on GPU), ready for the chat template."""
    from minitron.model_source import load_causal_lm as load

    return prepare_model(load(path, dtype), tok)


def save_stage(model: Any, tok: Any, ctx: StageContext, stage: str, metrics: dict[str, Any], args: Any,
               source: str, title: str, notes: str = "") -> Path:
    """Write ``OUT/<stage>/`` atomically (merged model, adapter, tokenizer, metrics, card) and drop the checkpoints."""
    out = ctx.out / stage
    wall, cpu = ctx.started.get(stage, (time.perf_counter(), time.process_time()))
    metrics["seconds"] = round(time.perf_counter() - wall, 1)
    metrics["cpu_seconds"] = round(time.process_time() - cpu, 1)  # all threads: ~2x the wall time on 2 idle cores
    ranks = process_state()  # under accelerate launch every rank gets here: one writes
    if ranks.is_main_process:
        _write_stage(model, tok, ctx, stage, metrics, args, source, title, notes)
        # The checkpoints were only the resume point; the finished output makes them dead weight.
        shutil.rmtree(ctx.work_dir(stage), ignore_errors=True)
    ranks.wait_for_everyone()
    return out


def _write_stage(model: Any, tok: Any, ctx: StageContext, stage: str, metrics: dict[str, Any], args: Any,
                 source: str, title: str, notes: str) -> None:
    with atomic_dir(ctx.out / stage) as tmp:
        # LoRA: adapter to tmp/adapter, then the merged weights; the next stage loads a plain model either way
        model = merge_for_export(model, tmp)
        prepare_model(model, tok)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_json(tmp / "metrics.json", metrics)
        if stage in ctx.fingerprints:
            fingerprint.record(tmp, ctx.fingerprints[stage])
        (tmp / "config.resolved.yaml").write_text(yaml.safe_dump(
            {"stage": stage, "source": source, "args": dataclasses.asdict(args), "seed": ctx.seed,
             "max_length": ctx.max_length, "lora": dataclasses.asdict(ctx.lora)}, sort_keys=False))
        card = {"stage": stage, "base model": source, "architecture": type(model).__name__,
                "parameters": f"{count_parameters(model):,}", "LoRA": "merged (adapter/)" if ctx.lora.enabled else "no",
                **{k: _fmt(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}}
        write_model_card(tmp, title, card, notes)


def _fmt(v: Any) -> Any:
    return f"{v:.4f}" if isinstance(v, float) else v


def train_history(trainer: Any) -> list[dict[str, Any]]:
    """The trainer's log history (loss, rewards, KL... per logging step) for metrics.json and the plots."""
    return [dict(h) for h in trainer.state.log_history]


def measured_once(ctx: StageContext, stage: str, name: str, fn: Any) -> Any:
    """``fn()``, cached in the stage's work dir: a resumed run reports the same "before" numbers as the first."""
    path = ctx.work_dir(stage) / "before.json"
    cache = json.loads(path.read_text()) if path.exists() else {}
    if name not in cache:
        cache[name] = fn()
        write_json(path, cache)
    return cache[name]
