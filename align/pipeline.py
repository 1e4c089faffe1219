"""``minitron align``: SFT -> reward model -> DPO -> online RL (RLOO/GRPO), the NeMo-Aligner recipe on TRL.

    minitron align --config configs/align/demo.yaml                  # make align: the latest distilled student
    minitron align --model DIR --config configs/align/real-data.yaml --out DIR
    minitron align --config configs/align/demo.yaml --stages sft,dpo --max-steps 5 --skip-bad-rows

Each stage writes a standard HF directory under OUT (``sft/``, ``rm/`` (a sequence classifier), ``dpo/``, ``rl/``)
with ``metrics.json`` and a model card; a finished stage is skipped (``--force`` redoes it) and an interrupted one
resumes from its last checkpoint in ``OUT/.work/``. Stage inputs chain: SFT <- model; RM and DPO <- SFT (or the
model when there is none); RL <- DPO (else SFT, else the model) with the reward model ``OUT/rm``.
``OUT/final`` links to the last policy (rl, else dpo, else sft; ``--final dpo`` picks one); ``OUT/report.md`` holds
the per-stage table; with ``--eval-suite demo`` the eval harness runs on every output.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import random
import time
from pathlib import Path
from typing import Any

from align import data as D
from align.common import StageContext
from align.dpo import DPOArgs
from align.lora import LoraArgs
from align.report import STAGES, write_report
from align.reward import RMArgs
from align.rl import RLArgs
from align.sft import SFTArgs
from align.sft_mix import SFTMixArgs
from minitron.config import ConfigError, MinitronError, arg, save_resolved
from minitron.io import is_model_dir, write_text
from minitron.model_source import resolve_model

WORLD = "runs/demo/world"


def _section(cls: type, help_: str) -> Any:
    return dataclasses.field(default_factory=cls, metadata={"help": help_})


@dataclasses.dataclass
class AlignConfig:
    """The alignment pipeline: data, stages, and one section of settings per stage."""

    model: str = arg("latest:runs/demo/distilled", "model dir, or latest:FOLDER = newest model dir under FOLDER")
    out: str = arg("runs/demo/aligned", "output folder (OUT/sft, OUT/rm, OUT/dpo, OUT/rl, OUT/report.md)")
    stages: list[str] = arg(list(STAGES), "stages to run, in order: sft,rm,dpo,rl (any subset)")
    sft_data: list[str] = arg([f"{WORLD}/sft/train.jsonl"], "SFT sources: files, folders or datasets names")
    sft_eval_data: list[str] = arg([f"{WORLD}/sft/validation.jsonl"], "held-out SFT sources ([] = hold out eval_rows)")
    pref_data: list[str] = arg([f"{WORLD}/preference/train.jsonl"], "preference sources (RM, DPO, RL prompts)")
    pref_eval_data: list[str] = arg([f"{WORLD}/preference/test.jsonl"], "held-out preference sources ([] = hold out)")
    eval_rows: int = arg(64, "held-out examples per data kind (split over the eval sources; an eval source that is "
                              "also a training source is held out of it; no eval source: held out of all training)")
    max_train_rows: int | None = arg(None, "cap on training examples per data kind (None = all)")
    max_rows_per_source: int | None = arg(None, "cap on training examples per source file (balances a mix; None = all)")
    skip_bad_rows: bool = arg(False, "skip rows that fit no schema (counted in metrics) instead of failing")
    max_steps: int | None = arg(None, "cap on every stage's steps (smoke runs)")
    max_length: int = arg(512, "token limit of a training sequence (prompt + answer)")
    seed: int = arg(0, "random seed (data split, training, sampling)")
    force: bool = arg(False, "redo stages whose output already exists")
    final: str = arg("last", "which policy OUT/final points to: last (rl, else dpo, else sft) or a stage name")
    eval_suite: str | None = arg(None, "run evals.harness with this suite on the model and every stage output")
    eval_limit: int | None = arg(None, "examples per eval task (with eval_suite)")
    lora: LoraArgs = _section(LoraArgs, "LoRA for every stage (merged on export)")
    sft_mix: SFTMixArgs = _section(SFTMixArgs, "what joins the SFT data: teacher answers, RAG QA, format constraints")
    sft: SFTArgs = _section(SFTArgs, "SFT stage settings")
    rm: RMArgs = _section(RMArgs, "reward-model stage settings")
    dpo: DPOArgs = _section(DPOArgs, "DPO stage settings")
    rl: RLArgs = _section(RLArgs, "online RL stage settings")

    def __post_init__(self):
        for name in ("stages", "sft_data", "sft_eval_data", "pref_data", "pref_eval_data"):
            # `--stages sft,dpo` arrives as one item; `--sft-eval-data ""` or `none` means "no source"
            items = [v.strip() for item in getattr(self, name) for v in str(item).split(",")]
            setattr(self, name, [v for v in items if v and v.lower() not in ("none", "null")])
        bad = [s for s in self.stages if s not in STAGES]
        if bad or not self.stages:
            raise ConfigError(f"unknown stage(s) {bad or self.stages}: --stages takes a subset of {','.join(STAGES)}")
        if self.eval_rows < 1 or self.max_length < 32:
            raise ConfigError("eval_rows must be >= 1 and max_length >= 32")
        if self.final not in ("last", "sft", "dpo", "rl"):
            raise ConfigError(f"final must be last, sft, dpo or rl (got {self.final!r})")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1 (got {self.max_steps})")


def _load(cfg: AlignConfig, train_src: list[str], eval_src: list[str], convert: Any) -> tuple[list, list, dict]:
    """(train, eval, stats). Held-out rows come from the eval sources; an eval source that is also a training
    source is split: its share of ``eval_rows`` is held out of it and the rest trains. With no eval source,
    ``eval_rows`` are held out of all the training rows. Training rows are shuffled (seeded), then capped."""
    per_source = {s: D.load_rows([s], "train", convert, cfg.skip_bad_rows) for s in train_src}
    info: dict[str, Any] = {"train": {s: st.as_dict() for s, (_, st) in per_source.items()}}
    rows_of = {s: rows for s, (rows, _) in per_source.items()}
    held: list = []
    if not eval_src:
        rows, held = D.holdout([r for s in train_src for r in rows_of[s]], cfg.eval_rows, cfg.seed)
        rows_of = {"all": rows}
        info["eval"] = f"{len(held)} rows held out of train"
    else:
        n = max(1, cfg.eval_rows // len(eval_src))
        for s in eval_src:
            if s in rows_of:
                rows_of[s], h = D.holdout(rows_of[s], n, cfg.seed)
                info.setdefault("eval", {})[s] = f"{len(h)} rows held out of this training source"
            else:
                h, st = D.load_rows([s], "validation", convert, cfg.skip_bad_rows, n)
                info.setdefault("eval", {})[s] = st.as_dict()
            held += h
    if cfg.max_rows_per_source:
        rows_of = {s: random.Random(cfg.seed).sample(v, min(len(v), cfg.max_rows_per_source)) for s, v in rows_of.items()}
    rows = [r for v in rows_of.values() for r in v]
    random.Random(cfg.seed).shuffle(rows)
    rows = rows[: cfg.max_train_rows] if cfg.max_train_rows else rows
    if not rows or not held:
        raise D.DataError(f"no usable examples in {train_src} / {eval_src}: check the paths and the row schema")
    return rows, held, info


def _fit(cfg: AlignConfig, base: Path, loaded: tuple[list, list, dict]) -> tuple[list, list, dict]:
    """Preference pairs trimmed to ``max_length`` tokens (earliest turns first), train and held-out alike."""
    from align.common import load_tokenizer
    from align.scoring import chat_ids

    tok = load_tokenizer(base)
    length = lambda msgs: len(chat_ids(tok, msgs))  # noqa: E731
    train, held, info = loaded
    train, dropped_train = D.fit_pairs(train, length, cfg.max_length)
    held, dropped_held = D.fit_pairs(held, length, cfg.max_length)
    info["too_long_dropped"] = {"train": dropped_train, "eval": dropped_held}
    return train, held, info


def _write_heldout(path: Path, rows: list[dict]) -> None:
    """The held-out rows as JSONL (the evals can read them: e.g. roleplay prompts no stage trained on)."""
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _done(out: Path, stage: str) -> bool:
    return is_model_dir(out / stage) and (out / stage / "metrics.json").exists()


def _input(out: Path, base: Path, *prefer: str) -> Path:
    """The first finished stage output among ``prefer``, else the base model."""
    return next((out / s for s in prefer if _done(out, s)), base)


def _run_stage(cfg: AlignConfig, ctx: StageContext, stage: str, base: Path, data: dict) -> None:
    """Train one stage on its input model (loading the data it needs once)."""
    from align import dpo, reward, rl, sft, sft_mix

    out = ctx.out
    if stage == "sft":
        train, held, info = _load(cfg, cfg.sft_data, cfg.sft_eval_data, D.to_sft_examples)
        _write_heldout(out / "data" / "sft_heldout.jsonl", [{"messages": ex["prompt"] + ex["completion"]} for ex in held])
        train, info["mix"] = sft_mix.build(cfg.sft_mix, train, ctx.work_dir("sft"), cfg.seed)
        print(f"[align] sft mix: {info['mix']}")
        sft.train(ctx, cfg.sft, base, train, held, info)
        return
    if "pref" not in data:
        data["pref"] = _fit(cfg, base, _load(cfg, cfg.pref_data, cfg.pref_eval_data, D.to_preference))
        _write_heldout(out / "data" / "pref_heldout.jsonl", data["pref"][1])
    train_pairs, eval_pairs, info = data["pref"]
    if stage == "rm":
        reward.train(ctx, cfg.rm, _input(out, base, "sft"), train_pairs, eval_pairs, info)
    elif stage == "dpo":
        dpo.train(ctx, cfg.dpo, _input(out, base, "sft"), train_pairs, eval_pairs, info)
    else:
        if not _done(out, "rm"):
            raise MinitronError(f"the RL stage needs a reward model in {out / 'rm'}: run the rm stage first "
                                "(--stages rm,rl)")
        # RL needs prompts only: the preference prompts, so the RM scores answers to the questions it was trained on
        prompts = [p["prompt"] for p in train_pairs]
        rl.train(ctx, cfg.rl, _input(out, base, "dpo", "sft"), out / "rm", prompts,
                 [p["prompt"] for p in eval_pairs][: cfg.rl.eval_prompts], info)


def link_final(out: Path, final: str) -> Path | None:
    """Point ``OUT/final`` (a relative symlink, replaced atomically) at the chosen finished policy stage."""
    order = ("rl", "dpo", "sft") if final == "last" else (final,)
    stage = next((s for s in order if _done(out, s)), None)
    if stage is None:
        return None
    tmp = out / f".final.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(stage, target_is_directory=True)
    os.replace(tmp, out / "final")
    return out / "final"


def run_evals(cfg: AlignConfig, models: list[Path]) -> Any:
    """Run the eval suite (evals.harness, when installed) on the base model and every stage output."""
    if importlib.util.find_spec("evals.harness") is None:
        print(f"eval_suite={cfg.eval_suite!r}: evals.harness is not available, skipping the evals")
        return None
    from evals.harness import EvalConfig, run as run_harness

    return run_harness(EvalConfig(model=[str(m) for m in models], suite=cfg.eval_suite,
                                  out=str(Path(cfg.out) / "evals"), limit=cfg.eval_limit))


def run(cfg: AlignConfig) -> Path:
    """Run the selected stages in order, then write the report (and the evals when asked)."""
    base = resolve_model(cfg.model)  # a directory, .gguf, hub name or latest:FOLDER
    out = Path(cfg.out)
    save_resolved(cfg, out, "align.resolved.yaml")
    ctx = StageContext(out=out, seed=cfg.seed, max_steps=cfg.max_steps, max_length=cfg.max_length, lora=cfg.lora)
    data: dict[str, Any] = {}  # loaded once: RM, DPO and RL share the preference data
    for stage in STAGES:  # always in pipeline order, whatever the order of --stages
        if stage not in cfg.stages:
            continue
        if _done(out, stage) and not cfg.force:
            print(f"[align] {stage}: {out / stage} is complete, skipping (--force redoes it)")
            continue
        print(f"[align] {stage}: training")
        ctx.started[stage] = (time.perf_counter(), time.process_time())
        _run_stage(cfg, ctx, stage, base, data)
    link_final(out, cfg.final)
    evals = None
    if cfg.eval_suite:
        evals = run_evals(cfg, [base] + [out / s for s in ("sft", "dpo", "rl") if _done(out, s)])
    summary = write_report(out, str(base), evals)
    for stage, m in summary["stages"].items():
        print(f"[align] {stage}: " + ", ".join(f"{k}={v:.4g}" for k, v in m.items()
                                               if isinstance(v, float)))
    return out
