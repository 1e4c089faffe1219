"""``minitron align``: SFT -> reward model -> DPO -> online RL (RLOO/GRPO/PPO), the NeMo-Aligner recipe on TRL; KTO and
rejection sampling (``rs``, best-of-n with the RM, then SFT) run when named in ``--stages``.

    minitron align --config configs/align/demo.yaml                  # make align: the latest distilled student
    minitron align --model DIR --config configs/align/real-data.yaml --out DIR
    minitron align --config configs/align/demo.yaml --stages sft,dpo --max-steps 5 --skip-bad-rows

Each stage writes a standard HF directory under OUT (``sft/``, ``rm/`` (a sequence classifier), ``dpo/``, ``rl/``)
with ``metrics.json``, a model card and ``fingerprint.json`` (its settings and inputs, ``minitron.fingerprint``).
Before any of that, ``check`` reads the model, its tokenizer and every data row, and refuses a bad input in one
line. A stage whose output has the same fingerprint is skipped; a different one (a changed setting or input, e.g. a
redone SFT under DPO) is redone, and so are the stages below it (``--force`` redoes any). An interrupted stage,
even killed, resumes from its last checkpoint in ``OUT/.work/<stage>/`` when that work has the same fingerprint.
Stage inputs chain: SFT <- model; RM, DPO and KTO <- SFT (or the model when there is none; with ``--rm.init base``
the RM starts from the model); RS <- the latest policy of KTO, DPO, SFT; RL <- the latest of RS, KTO, DPO, SFT (else
the model); RS and RL score with ``OUT/rm``.
``OUT/final`` links to the last policy (rl, else rs, kto, dpo, sft; ``--final dpo`` picks one); ``OUT/report.md`` holds
the per-stage table; with ``--eval-suite demo`` the eval harness runs on every output.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from pathlib import Path
from typing import Any, Callable

from align import data as D
from align.common import StageContext, claim_work_dir
from align.dpo import DPOArgs
from align.kto import KTOArgs
from align.lora import LoraArgs
from align.opd import OPDArgs
from align.stage_report import POLICIES, STAGES, write_report
from align.rejection import RSArgs
from align.reward import RMArgs
from align.rl import RLArgs, fingerprint_args
from align.sft import SFTArgs
from align.sft_mix import SFTMixArgs
from align.spin import SPINArgs
from align.steerlm import SteerRMArgs, SteerSFTArgs
from minitron import fingerprint
from minitron.config import ConfigError, MinitronError, arg, save_resolved
from minitron.io import is_model_dir, write_text
from minitron.model_source import resolve_model

WORLD = "runs/demo/world"
SOURCE_STAGES = {"rm", "dpo"}  # stages whose ``sources`` setting picks the preference files they train on
DEFAULT_STAGES = ["sft", "rm", "dpo", "rl"]  # kto and rs run when named
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _section(cls: type, help_: str) -> Any:
    return dataclasses.field(default_factory=cls, metadata={"help": help_})


@dataclasses.dataclass
class AlignConfig:
    """The alignment pipeline: data, stages, and one section of settings per stage."""

    model: str = arg("latest:runs/demo/distilled", "model dir, or latest:FOLDER = newest model dir under FOLDER")
    out: str = arg("runs/demo/aligned", "output folder (OUT/sft, OUT/rm, OUT/dpo, OUT/rl, OUT/report.md)")
    stages: list[str] = arg(list(DEFAULT_STAGES), "stages to run, in pipeline order sft,rm,dpo,kto,rs,rl (any "
                                                  "subset; kto and rs run only when named)")
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
    cpu_bf16: bool = arg(False, "bf16 autocast for training on CPU too (weights and optimizer stay fp32; ~1.9x "
                                "faster on this AMX CPU, align/README.md); a CUDA device uses bf16 whenever it can")
    seed: int = arg(0, "random seed (data split, training, sampling)")
    force: bool = arg(False, "redo stages whose output already exists")
    final: str = arg("last", "which policy OUT/final points to: last (rl, else dpo, else sft) or a stage name")
    eval_suite: str | None = arg(None, "`minitron align` only: run the eval harness with this suite on the model and "
                                       "every stage output")
    eval_limit: int | None = arg(None, "examples per eval task (with eval_suite)")
    lora: LoraArgs = _section(LoraArgs, "LoRA for every stage (merged on export)")
    sft_mix: SFTMixArgs = _section(SFTMixArgs, "what joins the SFT data: teacher answers, RAG QA, format constraints")
    sft: SFTArgs = _section(SFTArgs, "SFT stage settings")
    rm: RMArgs = _section(RMArgs, "reward-model stage settings")
    dpo: DPOArgs = _section(DPOArgs, "DPO stage settings")
    kto: KTOArgs = _section(KTOArgs, "KTO stage settings (unpaired good/bad answers from the preference pairs)")
    rs: RSArgs = _section(RSArgs, "rejection-sampling stage settings (best-of-n with the RM, then SFT)")
    rl: RLArgs = _section(RLArgs, "online RL stage settings")
    steer_rm: SteerRMArgs = _section(SteerRMArgs, "SteerLM attribute regression model (run when named)")
    steer_sft: SteerSFTArgs = _section(SteerSFTArgs, "SteerLM attribute-conditioned SFT (run when named; needs steer_rm)")
    opd: OPDArgs = _section(OPDArgs, "on-policy distillation from an aligned teacher (run when named; --opd.teacher)")
    spin: SPINArgs = _section(SPINArgs, "SPIN self-play fine-tuning on the SFT data (run when named)")

    def __post_init__(self):
        for name in ("stages", "sft_data", "sft_eval_data", "pref_data", "pref_eval_data"):
            # `--stages sft,dpo` arrives as one item; `--sft-eval-data ""` or `none` means "no source"
            items = [v.strip() for item in getattr(self, name) for v in str(item).split(",")]
            setattr(self, name, [v for v in items if v and v.lower() not in ("none", "null")])
        bad = [s for s in self.stages if s not in STAGES]
        if bad or not self.stages:
            extra = [s for s in STAGES if s not in DEFAULT_STAGES]
            raise ConfigError(f"unknown stage(s) {bad or self.stages}: --stages takes a subset of "
                              f"{','.join(DEFAULT_STAGES + extra)} (run in the order {','.join(STAGES)})")
        if self.eval_rows < 1 or self.max_length < 32:
            raise ConfigError("eval_rows must be >= 1 and max_length >= 32")
        if self.final not in ("last", *POLICIES):
            raise ConfigError(f"final must be last or one of {', '.join(POLICIES)} (got {self.final!r})")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1 (got {self.max_steps})")


def load_split_rows(cfg: AlignConfig, train_src: list[str], eval_src: list[str],
                    convert: Any, tag_source: bool = False) -> tuple[list, list, dict]:
    """(train, eval, stats). Held-out rows come from the eval sources; an eval source that is also a training
    source is split: its share of ``eval_rows`` is held out of it and the rest trains. With no eval source,
    ``eval_rows`` are held out of all the training rows. Training rows are shuffled (seeded), then capped.
    ``tag_source`` names each row's source in its ``source`` field (per-source metrics, ``rm.sources``,
    ``dpo.sources``)."""
    def tagged(rows: list, source: str) -> list:
        return [{**r, "source": D.source_label(source)} for r in rows] if tag_source else rows

    per_source = {s: D.load_rows([s], "train", convert, cfg.skip_bad_rows) for s in train_src}
    info: dict[str, Any] = {"train": {s: st.as_dict() for s, (_, st) in per_source.items()}}
    rows_of = {s: tagged(rows, s) for s, (rows, _) in per_source.items()}
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
                h = tagged(h, s)
            held += h
    if cfg.max_rows_per_source:
        rows_of = {s: random.Random(cfg.seed).sample(v, min(len(v), cfg.max_rows_per_source))
                   for s, v in rows_of.items()}
    rows = [r for v in rows_of.values() for r in v]
    random.Random(cfg.seed).shuffle(rows)
    rows = rows[: cfg.max_train_rows] if cfg.max_train_rows else rows
    if not rows or not held:
        raise D.DataError(f"no usable examples in {train_src} / {eval_src}: check the paths and the row schema")
    return rows, held, info


def _fit(tok: Any, max_length: int, loaded: tuple[list, list, dict]) -> tuple[list, list, dict]:
    """Preference pairs trimmed to ``max_length`` tokens (earliest turns first), train and held-out alike."""
    from minitron.scoring import chat_ids

    length = lambda msgs: len(chat_ids(tok, msgs))  # noqa: E731
    train, held, info = loaded
    train, dropped_train = D.fit_pairs(train, length, max_length)
    held, dropped_held = D.fit_pairs(held, length, max_length)
    info["too_long_dropped"] = {"train": dropped_train, "eval": dropped_held}
    if not train or not held:
        raise D.DataError(f"no preference pair fits max_length={max_length} tokens (train {len(train)}, held out "
                          f"{len(held)}): raise --max-length or shorten the data")
    return train, held, info


@dataclasses.dataclass
class Inputs:
    """What a run reads, loaded and checked before any stage starts."""

    base: Path
    sft: tuple[list, list, dict] | None = None  # (train, held out, stats) of the SFT examples
    pref: tuple[list, list, dict] | None = None  # the same of the preference pairs, fitted to max_length
    constraint_pairs: tuple[list, list, dict] | None = None  # DPO's format pairs from SFT questions, fitted
    constrained_prompts: tuple[list, list] = ([], [])  # RLVR's prompts (held in, held out) from SFT questions


def check(cfg: AlignConfig) -> Inputs:
    """Read and check everything a run needs before it writes anything: the output folder, the model and its
    tokenizer, every row of every data source the chosen stages read, and what the stages need of each other.
    A bad input raises MinitronError in one line that names it and the fix."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise MinitronError(f"--out {out}: a file, not a folder; pass a folder for the stage outputs")
    for stage in ("rs", "rl"):
        if stage in cfg.stages and "rm" not in cfg.stages and not _done(out, "rm"):
            raise MinitronError(f"the {stage.upper()} stage needs a reward model in {out / 'rm'}: run the rm stage "
                                f"first (--stages rm,{stage})")
    if "steer_sft" in cfg.stages and "steer_rm" not in cfg.stages and not _done(out, "steer_rm"):
        raise MinitronError(f"the steer_sft stage labels replies with the attribute model in {out / 'steer_rm'}: "
                            "run the steer_rm stage first (--stages steer_rm,steer_sft)")
    inputs = Inputs(resolve_model(cfg.model))
    _check_layers(cfg, inputs.base)
    if "opd" in cfg.stages:  # the teacher resolves and shares the student's tokenizer
        from align.opd import check_teacher

        check_teacher(cfg.opd, inputs.base)
    tok = _tokenizer(inputs.base)
    # SteerLM labels the SFT replies too; RL's constrained prompts and DPO's format pairs are SFT questions
    if {"sft", "steer_rm", "steer_sft", "opd", "spin"} & set(cfg.stages) or _rl_constraints(cfg) \
            or _dpo_constraints(cfg):
        _check_mix(cfg.sft_mix)
        inputs.sft = load_split_rows(cfg, cfg.sft_data, cfg.sft_eval_data, D.to_sft_examples)
        first = inputs.sft[0][0]
        _check_template(tok, inputs.base, first["prompt"] + first["completion"], first.get("tools"))
    if set(cfg.stages) & {"rm", "dpo", "kto", "rs", "rl", "steer_rm", "steer_sft"}:
        loaded = load_split_rows(cfg, cfg.pref_data, cfg.pref_eval_data, D.to_preference, tag_source=True)
        first = loaded[0][0]
        _check_template(tok, inputs.base, first["prompt"] + first["chosen"])
        inputs.pref = _fit(tok, cfg.max_length, loaded)
        for stage in SOURCE_STAGES & set(cfg.stages):  # a source no pair comes from is refused here
            _stage_pairs(cfg, stage, inputs.pref[0])
        if "rl" in cfg.stages:
            _check_rl_batch(cfg.rl, len(inputs.pref[0]))
    if _dpo_constraints(cfg):
        inputs.constraint_pairs = _constraint_pairs(cfg, tok, inputs)
    if _rl_constraints(cfg):
        inputs.constrained_prompts = _constrained_prompts(cfg, inputs, len(_stage_pairs(cfg, "rl", inputs.pref[0])))
    return inputs


def _stage_pairs(cfg: AlignConfig, stage: str, pairs: list[dict]) -> list[dict]:
    """The preference pairs ``stage`` trains on: those of its ``sources`` where it has the setting."""
    return D.from_sources(pairs, getattr(cfg, stage).sources, f"{stage}.sources") if stage in SOURCE_STAGES else pairs


def _rl_constraints(cfg: AlignConfig) -> bool:
    return "rl" in cfg.stages and cfg.rl.constraint_share > 0


def _dpo_constraints(cfg: AlignConfig) -> bool:
    return "dpo" in cfg.stages and cfg.dpo.constraint_pairs > 0


def _tokenizer(model: Path) -> Any:
    """The model's tokenizer (with the project template when it has none), or a one-line refusal."""
    from align.common import load_tokenizer

    fix = "save the tokenizer beside the weights: tokenizer.save_pretrained(DIR)"
    if not any((model / f).is_file() for f in TOKENIZER_FILES):
        raise MinitronError(f"--model {model}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); {fix}")
    try:
        return load_tokenizer(model)
    except (OSError, ValueError, TypeError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise MinitronError(f"--model {model}: its tokenizer does not load ({type(e).__name__}: {first}); {fix}") from e


def _check_template(tok: Any, model: Path, messages: list[dict], tools: Any = None) -> None:
    """The model's chat template must render the data (a model without one gets the project's)."""
    try:
        tok.apply_chat_template(messages, tools=tools, tokenize=False)
    except Exception as e:  # jinja2 syntax or runtime errors, raise_exception() in the template, ...
        raise MinitronError(f"--model {model}: its chat template cannot render the data ({type(e).__name__}: {e}); "
                            "fix the template, or delete it (chat_template.jinja / tokenizer_config.json "
                            "chat_template) and the project's ChatML template is installed") from e


def _check_layers(cfg: AlignConfig, model: Path) -> None:
    from transformers import AutoConfig

    layers = getattr(AutoConfig.from_pretrained(str(model)), "num_hidden_layers", None)
    for stage in cfg.stages:
        frozen = getattr(cfg, stage).freeze_layers
        if layers is not None and frozen >= layers:
            raise ConfigError(f"{stage}.freeze_layers={frozen} leaves nothing to train: {model} has {layers} "
                              "decoder layers")


def _check_rl_batch(args: RLArgs, prompts: int) -> None:
    """TRL's RL sampler drops a partial batch of prompts: fewer prompts than one batch would train no step."""
    need = args.batch_size * args.grad_accum
    if prompts < need:
        raise ConfigError(f"rl: {prompts} training prompts, fewer than one batch (rl.batch_size x rl.grad_accum = "
                          f"{need}), so RL would train no step; lower them or --eval-rows, or add preference data")


def _check_mix(mix: SFTMixArgs) -> None:
    """The SFT mix's teacher resolves and its RAG files parse."""
    if mix.teacher and mix.teacher_share > 0:
        resolve_model(mix.teacher, "--sft-mix.teacher")
    for source in mix.rag_data if mix.rag_examples else []:
        for _ in D.iter_source(source, "train"):
            pass


def _write_heldout(path: Path, rows: list[dict]) -> None:
    """The held-out rows as JSONL (the evals can read them: e.g. roleplay prompts no stage trained on)."""
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _done(out: Path, stage: str) -> bool:
    return is_model_dir(out / stage) and (out / stage / "metrics.json").exists()


def _input(out: Path, base: Path, *prefer: str) -> Path:
    """The first finished stage output among ``prefer``, else the base model."""
    return next((out / s for s in prefer if _done(out, s)), base)


def stage_input(out: Path, base: Path, stage: str, rm_init: str = "sft") -> Path:
    """The model a stage starts from: SFT <- base; RM (``rm_init`` sft), DPO, KTO <- SFT (else base); RM with
    ``rm_init`` base <- base; RS <- KTO, else DPO, else SFT;
    RL <- the latest policy (RS, KTO, DPO, SFT), else base. OPD <- SFT, else base; SPIN <- OPD, else SFT, else base."""
    if stage in ("opd", "spin"):
        return _input(out, base, *{"opd": ("sft",), "spin": ("opd", "sft")}[stage])
    return _input(out, base, *{"sft": (), "rm": ("sft",) if rm_init == "sft" else (), "dpo": ("sft",), "kto": ("sft",),
                               "rs": ("kto", "dpo", "sft"), "rl": ("rs", "kto", "dpo", "sft"),
                               "steer_rm": ("sft",), "steer_sft": ("sft",)}[stage])


def stage_fingerprint(cfg: AlignConfig, ctx: StageContext, stage: str, model_dir: Path) -> dict[str, Any]:
    """What makes a stage's output: its section (with the steps it really trains), its input model (and the reward
    model for RL), its data sources and the pipeline settings that shape its data and training."""
    args = getattr(cfg, stage)
    shared = {k: getattr(cfg, k) for k in ("seed", "max_length", "eval_rows", "max_train_rows",
                                           "max_rows_per_source", "skip_bad_rows")}
    if cfg.cpu_bf16:  # recorded only when on, so outputs made before the setting existed stay up to date
        shared["cpu_bf16"] = True
    if stage == "sft":
        data = {"sft_data": cfg.sft_data, "sft_eval_data": cfg.sft_eval_data,
                "sft_mix": dataclasses.asdict(cfg.sft_mix)}
    else:
        data = {"pref_data": cfg.pref_data, "pref_eval_data": cfg.pref_eval_data}
    if stage in ("rs", "rl"):
        data["reward_model"] = str(Path(cfg.out) / "rm")
    if stage.startswith("steer_"):  # SteerLM reads both kinds of data; steer_sft labels with steer_rm, scores with rm
        data = {"sft_data": cfg.sft_data, "sft_eval_data": cfg.sft_eval_data, **data}
        if stage == "steer_sft":
            data["attribute_model"] = str(Path(cfg.out) / "steer_rm")
            data["reward_model"] = str(Path(cfg.out) / "rm")
    if stage in ("opd", "spin"):  # prompts (and SPIN's chosen answers) from the SFT data; the teacher is in cfg.opd
        data = {"sft_data": cfg.sft_data, "sft_eval_data": cfg.sft_eval_data}
    if stage == "rl":  # PPO's options count for --rl.algo ppo only, the constraint options when a share is set
        args = fingerprint_args(args)
        if cfg.rl.constraint_share:  # the constrained prompts are SFT questions
            data.update(sft_data=cfg.sft_data, sft_eval_data=cfg.sft_eval_data)
    if stage == "dpo":  # as before the setting existed when 0; the format pairs are SFT questions
        if cfg.dpo.constraint_pairs:
            data.update(sft_data=cfg.sft_data, sft_eval_data=cfg.sft_eval_data,
                        max_constraints=cfg.sft_mix.max_constraints)
        args = fingerprint.without(args, [k for k in ("constraint_pairs", "constraint_max_length")
                                          if not cfg.dpo.constraint_pairs or not getattr(cfg.dpo, k)])
    if stage == "rm":  # rm.init is recorded by the input model
        args = fingerprint.without(args, ("init",))
    if stage in SOURCE_STAGES and not args.sources:  # all sources: as before the setting existed
        args = fingerprint.without(args, ("sources",))
    return fingerprint.of_config(args, steps=ctx.steps(args), model=str(model_dir), lora=dataclasses.asdict(cfg.lora),
                                 **shared, **data)


def _run_stage(cfg: AlignConfig, ctx: StageContext, stage: str, model_dir: Path, inputs: Inputs) -> None:
    """Train one stage from ``model_dir`` on the data loaded by ``check``."""
    from align import dpo, kto, reward, rejection, rl, sft, sft_mix, steerlm
    from align import opd, spin

    if stage in ("opd", "spin"):  # on the SFT data's held-in prompts; measured on its held-out ones
        train, held, info = inputs.sft
        (opd if stage == "opd" else spin).train(ctx, getattr(cfg, stage), model_dir, train, held, info)
        return

    if stage == "steer_rm":
        steerlm.train_rm(ctx, cfg.steer_rm, model_dir, inputs.sft, inputs.pref)
        return
    if stage == "steer_sft":
        steerlm.train_sft(ctx, cfg.steer_sft, model_dir, ctx.out / "steer_rm", inputs.sft, inputs.pref)
        return
    if stage == "sft":
        train, held, info = inputs.sft
        train, mix = sft_mix.build(cfg.sft_mix, train, ctx.work_dir("sft"), cfg.seed)
        print(f"[align] sft mix: {mix}")
        sft.train(ctx, cfg.sft, model_dir, train, held, {**info, "mix": mix})
        return
    train_pairs, eval_pairs, info = inputs.pref
    train_pairs = _stage_pairs(cfg, stage, train_pairs)
    if stage == "rm":
        reward.train(ctx, cfg.rm, model_dir, train_pairs, eval_pairs, info)
    elif stage == "dpo":
        if inputs.constraint_pairs:
            made, held_out, made_info = inputs.constraint_pairs
            train_pairs, eval_pairs = train_pairs + made, eval_pairs + held_out
            info = {**info, "constraint_pairs": {**made_info, "train": len(made), "eval": len(held_out)}}
        dpo.train(ctx, cfg.dpo, model_dir, train_pairs, eval_pairs, info)
    elif stage == "kto":
        kto.train(ctx, cfg.kto, model_dir, train_pairs, eval_pairs, info)
    elif stage == "rs":
        rejection.train(ctx, cfg.rs, model_dir, ctx.out / "rm", train_pairs,
                        [p["prompt"] for p in eval_pairs][: cfg.rs.eval_prompts], info)
    else:
        # RL needs prompts only: the preference prompts, so the RM scores answers to the questions it was trained on
        rl.train(ctx, cfg.rl, model_dir, ctx.out / "rm", [p["prompt"] for p in train_pairs],
                 [p["prompt"] for p in eval_pairs][: cfg.rl.eval_prompts], info, *inputs.constrained_prompts)


def _constrained_sft(cfg: AlignConfig, inputs: Inputs, make: Any, n_train: int, n_held: int, max_constraints: int,
                     setting: str) -> tuple[list, list]:
    """``make(examples, n, rng, max_constraints)`` (``align.constraints``) on the held-in, then the held-out
    single-turn SFT examples, with one RNG seeded by ``cfg.seed``; refused in one line naming ``setting`` when
    either gives nothing."""
    from align.sft_mix import single_turn

    train, held, _ = inputs.sft
    rng = random.Random(cfg.seed)
    made = make([r for r in train if single_turn(r)], n_train, rng, max_constraints)
    held_out = make([r for r in held if single_turn(r)], n_held, rng, max_constraints)
    if not made or not held_out:
        raise D.DataError(f"{setting}: no single-turn SFT examples took constraints ({len(made)} held-in, "
                          f"{len(held_out)} held-out); name SFT data with plain-text answers")
    return made, held_out


def _constrained_prompts(cfg: AlignConfig, inputs: Inputs, preference_prompts: int) -> tuple[list, list]:
    """RLVR's prompts: held-in SFT questions with constraints, ``rl.constraint_share`` of all RL prompts, and as many
    held-out ones as ``rl.eval_prompts`` (from the SFT's held-out rows)."""
    from align.constraints import constrained_prompts

    share = cfg.rl.constraint_share
    return _constrained_sft(cfg, inputs, constrained_prompts, round(share / (1 - share) * preference_prompts),
                            cfg.rl.eval_prompts, cfg.rl.max_constraints, f"rl.constraint_share {share}")


def _constraint_pairs(cfg: AlignConfig, tok: Any, inputs: Inputs) -> tuple[list, list, dict]:
    """DPO's format pairs (``align.constraints.constraint_pairs``): ``dpo.constraint_pairs`` from the held-in
    single-turn SFT examples (with ``dpo.constraint_max_length``, only pairs that short), and as many held-out ones
    as each preference source has, from the SFT's held-out rows (of any length: what is measured stays the same);
    all fitted to ``max_length`` like the preference pairs."""
    from align.constraints import constraint_pairs
    from minitron.scoring import chat_ids

    n, cap = cfg.dpo.constraint_pairs, cfg.dpo.constraint_max_length
    train_rows = len(inputs.sft[0])
    made, held_out = _constrained_sft(cfg, inputs, constraint_pairs, train_rows if cap else n,
                                      max(1, cfg.eval_rows // max(1, len(cfg.pref_eval_data))),
                                      cfg.sft_mix.max_constraints, f"dpo.constraint_pairs {n}")
    info: dict[str, Any] = {"asked": n}
    if cap:
        short = [p for p in made if max(len(chat_ids(tok, p["prompt"] + p[k])) for k in ("chosen", "rejected")) <= cap]
        if not short:
            raise D.DataError(f"dpo.constraint_max_length {cap}: none of the {len(made)} format pairs is that short; "
                              "raise it, or 0 to keep every pair that fits max_length")
        made, info["longer_than_cap"] = short[:n], len(made) - len(short)
    return _fit(tok, cfg.max_length, (made, held_out, info))


def link_final(out: Path, final: str) -> Path | None:
    """Point ``OUT/final`` (a relative symlink, replaced atomically) at the chosen finished policy stage."""
    order = POLICIES if final == "last" else (final,)
    stage = next((s for s in order if _done(out, s)), None)
    if stage is None:
        return None
    tmp = out / f".final.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(stage, target_is_directory=True)
    os.replace(tmp, out / "final")
    return out / "final"


def run(cfg: AlignConfig, evaluate: Callable[[list[Path]], Any] | None = None) -> Path:
    """Check every input, then run the selected stages in order (skipping those whose output is up to date) and
    write the report. ``evaluate`` (models -> eval results) scores the base model and every stage output when
    ``eval_suite`` is set; ``minitron align`` passes the eval harness (align does not import evals)."""
    if cfg.eval_suite and evaluate is None:
        raise ConfigError("eval_suite needs an evaluator: run `minitron align`, which passes the eval harness")
    inputs = check(cfg)
    base, out = inputs.base, Path(cfg.out)
    save_resolved(cfg, out, "align.resolved.yaml")
    if inputs.sft:
        _write_heldout(out / "data" / "sft_heldout.jsonl",
                       [{"messages": ex["prompt"] + ex["completion"]} for ex in inputs.sft[1]])
    if inputs.pref:
        _write_heldout(out / "data" / "pref_heldout.jsonl", inputs.pref[1])
    ctx = StageContext(out=out, seed=cfg.seed, max_steps=cfg.max_steps, max_length=cfg.max_length, lora=cfg.lora,
                       cpu_bf16=cfg.cpu_bf16)
    for stage in STAGES:  # always in pipeline order, whatever the order of --stages
        if stage not in cfg.stages:
            continue
        model_dir = stage_input(out, base, stage, cfg.rm.init)
        fp = stage_fingerprint(cfg, ctx, stage, model_dir)
        if _done(out, stage) and fingerprint.up_to_date(out / stage, fp, stage, cfg.force):
            continue
        claim_work_dir(ctx, stage, fp)
        print(f"[align] {stage}: training from {model_dir}")
        ctx.started[stage] = (time.perf_counter(), time.process_time())
        _run_stage(cfg, ctx, stage, model_dir, inputs)
    link_final(out, cfg.final)
    evals = None
    if cfg.eval_suite:
        evals = evaluate([base] + [out / s for s in POLICIES[::-1] if _done(out, s)])
    summary = write_report(out, str(base), evals)
    for stage, m in summary["stages"].items():
        print(f"[align] {stage}: " + ", ".join(f"{k}={v:.4g}" for k, v in m.items()
                                               if isinstance(v, float)))
    return out
