"""``minitron run``: a whole pipeline from one recipe file.

    world -> teacher (or a given model) -> [mix: text + chat in the teacher's template] -> [teacher correction]
    -> prune each student (width, depth) -> distill each student -> [each pruned student fine-tuned with the LM
    loss, and each shape from scratch, at the distillation token budget] -> align one student -> evals
    -> report (runs/demo/report.md + plots)

A recipe is a YAML file whose top-level keys are the fields below; each stage section holds overrides of
that stage's config (``teacher:`` is TeacherConfig, ``prune:`` PruneConfig, ...). Every stage config is built
and checked before the first stage starts. On a re-run a stage keeps its output when the fingerprint of its
config and inputs matches (``minitron.fingerprint``), redoes it (and so every stage below it) when it does not,
and continues an interrupted run from its last checkpoint; ``--force`` redoes all.
``rounds:`` chains prune + distill rounds, each round's distilled student becoming the next teacher.

    minitron run --config configs/demo.yaml            # make demo
    minitron run --config configs/llama31-minitron-4b.yaml --dry-run
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from minitron.config import ConfigError, MinitronError, arg, from_dict, read_yaml, save_resolved
from minitron.io import write_json
from minitron.world import WorldFiles

STAGE_NAMES = ["world", "teacher", "mix", "correct", "prune", "distill", "finetune", "scratch", "align", "eval", "report"]


@dataclass
class PipelineConfig:
    RECIPE: ClassVar[bool] = True  # the CLI loads the whole file, not a section

    out: str = arg("runs/demo", "root of every stage's output")
    data: str = arg("world", "corpus for correction, calibration and distillation: 'world' or a path / datasets name")
    teacher_model: str | None = arg(None, "use this model (dir, .gguf file or hub name) as the teacher instead of training one")
    world: dict = arg({}, "WorldConfig overrides (demo world)")
    teacher: dict = arg({}, "TeacherConfig overrides (tiny teacher)")
    mix: dict | None = arg(None, "MixConfig overrides: distil on text mixed with chat rendered in the teacher's "
                                 "template (text defaults to `data`); None uses `data` as it is")
    correct: dict | None = arg(None, "LMTrainConfig overrides; None skips teacher correction")
    prune: dict = arg({}, "PruneConfig overrides shared by every student")
    students: dict = arg({}, "student name -> PruneConfig overrides (target shape), e.g. width / depth")
    distill: dict = arg({}, "DistillConfig overrides shared by every student")
    finetune: dict | None = arg(None, "LMTrainConfig overrides to fine-tune pruned students with the LM loss at "
                                      "the distillation token budget (the KD baseline; `students:` limits which; "
                                      "None = skip)")
    scratch: dict | None = arg(None, "LMTrainConfig overrides to train each student shape from random init "
                                     "at the distillation token budget (None = skip)")
    rounds: list[dict] = arg([], "progressive rounds after the first: each {students, prune, distill, teacher_from}")
    align_config: str | None = arg(None, "align recipe file (configs/align/...)")
    align: dict = arg({}, "AlignConfig overrides")
    align_student: str = arg("width", "which distilled student to align")
    align_guard: dict = arg({}, "aligned vs student after the evals: {baseline: label (default '<align_student> "
                                "distilled'), must_beat: [report columns], must_hold: [columns] or 'all' (default)}; "
                                "a violation fails the run after the reports are written")
    eval_config: str | None = arg(None, "eval recipe file (configs/eval/...)")
    eval: dict = arg({}, "EvalConfig overrides")
    evals: dict = arg({}, "named eval runs instead of eval_config: name -> {config: FILE, models: [labels as in "
                          "the report], EvalConfig overrides}; each writes eval/<name>")
    report: dict = arg({}, "ReportConfig overrides (WikiText-2, plain-text validation, chat KL; see minitron.pipeline.report)")
    stages: list[str] = arg(list(STAGE_NAMES), f"stages to run: {', '.join(STAGE_NAMES)}")
    force: bool = arg(False, "redo finished stages")
    dry_run: bool = arg(False, "validate every stage's config, shapes and data without loading weights")

    def __post_init__(self):
        unknown = [s for s in self.stages if s not in STAGE_NAMES]
        if unknown:
            raise ConfigError(f"unknown stage {unknown[0]!r}; valid stages: {', '.join(STAGE_NAMES)}")
        names = set(self.students) | {f"r{i + 2}-{k}" for i, r in enumerate(self.rounds) for k in r.get("students", {})}
        if self.students and self.align_student not in names and "align" in self.stages:
            raise ConfigError(f"align_student={self.align_student!r} is not one of the students {sorted(names)}")


@dataclass
class Paths:
    """Where every stage of one pipeline writes."""

    root: Path

    def __post_init__(self) -> None:
        r = self.root
        self.world, self.mix, self.teacher, self.corrected = r / "world", r / "mix", r / "teacher", r / "corrected"
        self.finetuned, self.scratch, self.aligned, self.eval = r / "finetuned", r / "scratch", r / "aligned", r / "eval"

    def student(self, kind: str, name: str, round_: int = 0) -> Path:
        return self.root / (kind if round_ == 0 else f"round{round_ + 1}") / (name if round_ == 0 else f"{kind}-{name}")


def _stage_config(target: str, base: dict, *overrides: dict) -> Any:
    """Build a stage's config from ``module:Class`` with later dicts overriding earlier ones."""
    import importlib

    module, cls_name = target.split(":")
    cls = getattr(importlib.import_module(module), cls_name)
    merged: dict = {}
    for d in (base, *overrides):
        merged.update({k: v for k, v in (d or {}).items()})
    return from_dict(cls, merged)


def _file_section(path: str | None, section: str) -> dict:
    if not path:
        return {}
    raw = read_yaml(path)
    return dict(raw.get(section, raw)) if isinstance(raw.get(section, raw), dict) else {}


class Pipeline:
    """Runs the stages of one recipe in order; each stage keeps an output its fingerprint matches and continues an
    interrupted run from its last checkpoint."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.paths = Paths(Path(cfg.out))
        self.timings: dict[str, float] = {}
        self.students: dict[str, dict[str, Path]] = {}

    def want(self, stage: str) -> bool:
        return stage in self.cfg.stages

    def timed(self, name: str, fn, *args) -> Any:
        t = time.time()
        result = fn(*args)
        self.timings[name] = round(self.timings.get(name, 0.0) + time.time() - t, 1)
        return result

    # ------------------------------------------------------------------ data and teacher
    def corpus(self) -> str:
        """What correction, calibration and distillation read: the mix when there is one, else ``data``."""
        if self.cfg.mix is not None:
            return str(self.paths.mix)
        if self.cfg.data != "world":
            return self.cfg.data
        return str(WorldFiles(self.paths.world).corpus)

    def make_mix(self, teacher: Path) -> None:
        from minitron import mixture

        text = str(WorldFiles(self.paths.world).corpus) if self.cfg.data == "world" else self.cfg.data
        cfg = _stage_config("minitron.mixture:MixConfig", {"text": text}, self.cfg.mix,
                            {"model": str(teacher), "out": str(self.paths.mix), "force": self.cfg.force})
        self.timed("mix", mixture.run, cfg)

    def make_world(self) -> None:
        from minitron.world import WorldConfig, ensure_world

        cfg = _stage_config("minitron.world:WorldConfig", self.cfg.world, {"out": str(self.paths.world),
                                                                           "force": self.cfg.force})
        self.timed("world", ensure_world, cfg)

    def make_teacher(self) -> Path:
        if self.cfg.teacher_model:
            from minitron.model_source import resolve_model

            return resolve_model(self.cfg.teacher_model, "teacher_model")
        from minitron import teacher

        cfg = _stage_config("minitron.teacher:TeacherConfig", self.cfg.teacher,
                            {"out": str(self.paths.teacher), "world_dir": str(self.paths.world), "force": self.cfg.force})
        return self.timed("teacher", teacher.run, cfg)

    def make_corrected(self, teacher: Path) -> Path:
        from minitron import lm_train

        cfg = _stage_config("minitron.lm_train:LMTrainConfig", {"data": self.corpus()}, self.cfg.correct,
                            {"model": str(teacher), "out": str(self.paths.corrected), "force": self.cfg.force})
        return self.timed("correct", lm_train.run, cfg)

    # ------------------------------------------------------------------ students
    def make_students(self, teacher: Path, students: dict, prune: dict, distill: dict, round_: int) -> dict:
        from minitron import distill as distill_mod
        from minitron import prune as prune_mod

        made = {}
        for name, target in students.items():
            pruned, distilled = self.paths.student("pruned", name, round_), self.paths.student("distilled", name, round_)
            if self.want("prune"):
                pcfg = _stage_config("minitron.prune:PruneConfig", {"calib": self.corpus()}, prune, target,
                                     {"model": str(teacher), "out": str(pruned), "force": self.cfg.force})
                self.timed("prune", prune_mod.run, pcfg)
            if self.want("distill"):
                dcfg = _stage_config("minitron.distill:DistillConfig", {"data": self.corpus()}, distill,
                                     {"teacher": str(teacher), "student": str(pruned), "out": str(distilled),
                                      "force": self.cfg.force})
                self.timed("distill", distill_mod.run, dcfg)
            made[name] = {"pruned": pruned, "distilled": distilled}
        return made

    def make_finetuned(self, distill: dict) -> None:
        """Each pruned student trained with the LM loss on the distillation data at its token budget."""
        from minitron.lm_train import LMTrainConfig, run as lm_train_run

        overrides = dict(self.cfg.finetune or {})
        only = overrides.pop("students", None)  # default: every student
        for name, paths in self.students.items():
            if only is not None and name not in only:
                continue
            out = self.paths.finetuned / name
            paths["finetuned"] = out
            cfg = _stage_config("minitron.lm_train:LMTrainConfig", {"data": self.corpus()},
                                {k: v for k, v in distill.items() if k in _fields(LMTrainConfig)}, overrides,
                                {"model": str(paths["pruned"]), "out": str(out), "force": self.cfg.force})
            self.timed("finetune", lm_train_run, cfg)

    def make_scratch(self, distill: dict) -> None:
        """The same student shapes trained from random init with the distillation token budget (LM loss)."""
        from minitron.lm_train import LMTrainConfig, reinitialised_copy, run as lm_train_run

        for name, paths in self.students.items():
            out = self.paths.scratch / name
            paths["scratch"] = out
            init = reinitialised_copy(paths["pruned"], self.paths.scratch / f".{name}-init")
            cfg = _stage_config("minitron.lm_train:LMTrainConfig", {"data": self.corpus()},
                                {k: v for k, v in distill.items() if k in _fields(LMTrainConfig)}, self.cfg.scratch,
                                {"model": str(init), "out": str(out), "force": self.cfg.force})
            self.timed("scratch", lm_train_run, cfg)

    # ------------------------------------------------------------------ align, eval, report
    def make_aligned(self) -> Path:
        from align import pipeline as align_pipeline

        student = self.students[self.cfg.align_student]["distilled"]
        world = self.paths.world
        data = WorldFiles(world).align_data() if self.cfg.data == "world" else {}
        cfg = _stage_config("align.pipeline:AlignConfig", _file_section(self.cfg.align_config, "align"), data,
                            self.cfg.align, {"model": str(student), "out": str(self.paths.aligned), "force": self.cfg.force})
        return self.timed("align", align_pipeline.run, cfg)

    def models(self) -> dict[str, Path]:
        """Every model of the run, in story order: label -> directory."""
        from minitron.model_source import resolve_model

        teacher = resolve_model(self.cfg.teacher_model) if self.cfg.teacher_model else self.paths.teacher
        out: dict[str, Path] = {"teacher": teacher}
        if self.paths.corrected.exists():
            out["teacher (corrected)"] = self.paths.corrected
        for name, p in self.students.items():
            for kind in ("pruned", "scratch", "finetuned", "distilled"):
                if kind in p and Path(p[kind]).exists():
                    out[f"{name} {kind}"] = Path(p[kind])
        final = self.paths.aligned / "final"
        for stage in ("sft", "dpo", "rl"):  # the policies that are not final, for the per-stage benchmark rows
            p = self.paths.aligned / stage
            if (p / "config.json").exists() and (not final.exists() or p.resolve() != final.resolve()):
                out[f"aligned {stage}"] = p
        if final.exists():
            out["aligned"] = final.resolve()
        return out

    def make_evals(self) -> None:
        """Named eval runs (``evals:``), each on the models whose label is one of its ``models`` (all when absent)."""
        from evals import harness

        for name, spec in self.cfg.evals.items():
            spec = dict(spec)
            wanted, file = spec.pop("models", None), spec.pop("config", None)
            labels = {k: v for k, v in self.models().items() if wanted is None or k in wanted}
            cfg = _stage_config("evals.harness:EvalConfig", _file_section(file, "eval"), self.cfg.eval, spec,
                                {"model": [str(p) for p in labels.values()], "names": list(labels),
                                 "out": str(self.paths.eval / name)})
            self.timed(f"eval {name}", harness.run, cfg)

    def make_eval(self) -> Any:
        from evals import harness

        # the harness scores the story's models; from-scratch baselines are compared in the report (loss, MC)
        labels = {k: v for k, v in self.models().items() if "scratch" not in k}
        world = self.paths.world
        data = WorldFiles(world).eval_data() if self.cfg.data == "world" else {}
        rm = self.paths.aligned / "rm"
        judged = {"judge_model": str(rm) if rm.exists() else None}
        if "aligned" in labels:  # roleplay: the aligned model's win rate against the student it came from
            judged["roleplay_baseline"] = str(self.students[self.cfg.align_student]["distilled"])
        cfg = _stage_config("evals.harness:EvalConfig", _file_section(self.cfg.eval_config, "eval"), data,
                            judged, self.cfg.eval,
                            {"model": [str(p) for p in labels.values()], "names": list(labels), "out": str(self.paths.eval)})
        return self.timed("eval", harness.run, cfg)

    def run(self) -> Path:
        cfg = self.cfg
        if self.want("world") and cfg.data == "world":
            self.make_world()
        teacher = self.make_teacher() if self.want("teacher") or cfg.teacher_model else self.paths.teacher
        if cfg.mix is not None and self.want("mix"):
            self.make_mix(Path(teacher))
        if cfg.correct is not None and self.want("correct"):
            teacher = self.make_corrected(Path(teacher))
        self.students = self.make_students(Path(teacher), cfg.students, cfg.prune, cfg.distill, 0)
        for i, rnd in enumerate(cfg.rounds, start=1):
            prev = self.students[rnd.get("teacher_from", cfg.align_student)]["distilled"]
            made = self.make_students(prev, rnd["students"], {**cfg.prune, **rnd.get("prune", {})},
                                      {**cfg.distill, **rnd.get("distill", {})}, i)
            self.students.update({f"r{i + 1}-{k}": v for k, v in made.items()})
        if cfg.finetune is not None and self.want("finetune"):
            self.make_finetuned(cfg.distill)
        if cfg.scratch is not None and self.want("scratch"):
            self.make_scratch(cfg.distill)
        if self.want("align") and cfg.align_config is not None:
            self.make_aligned()
        if self.want("eval") and cfg.evals:
            self.make_evals()
        elif self.want("eval") and cfg.eval_config is not None:
            self.make_eval()
        failed = self.check_alignment() if self.want("eval") and "aligned" in self.models() else None
        out = self.paths.root
        if self.want("report"):
            from minitron.pipeline.report import write_report

            rcfg = _stage_config("minitron.pipeline.report:ReportConfig", self.cfg.report) if self.cfg.report else None
            models = self.models()
            out = write_report(self.paths.root, models, self.timings, world_dir=self.paths.world,
                               corpus=self.corpus() if cfg.data != "world" or cfg.mix is not None else None,
                               cfg=rcfg, teacher=models["teacher"])
        if failed:  # after every report is written
            raise MinitronError(failed)
        return out

    def check_alignment(self) -> str | None:
        """The aligned model's eval metrics against its student's into ``aligned/report.md``; the guard's verdict
        (a message when it failed)."""
        from align.stage_report import write_report as write_align_report
        from minitron.pipeline.report import alignment_benchmarks, eval_metrics

        g = self.cfg.align_guard
        baseline = g.get("baseline", f"{self.cfg.align_student} distilled")
        by_path = eval_metrics(self.paths.eval)
        rows = {label: by_path[str(Path(p).resolve())] for label, p in self.models().items()
                if str(Path(p).resolve()) in by_path}
        bench = alignment_benchmarks(rows, baseline, "aligned", g.get("must_beat", []), g.get("must_hold", "all"))
        write_json(self.paths.aligned / "benchmarks.json", bench)
        write_align_report(self.paths.aligned, str(self.students[self.cfg.align_student]["distilled"]))
        print(bench["markdown"])
        if bench["failed"]:
            return (f"alignment guard: the aligned model is not where it must be against {baseline} on "
                    f"{', '.join(bench['failed'])} (see {self.paths.aligned / 'report.md'})")
        return None


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def run(cfg: PipelineConfig) -> Path:
    """Run (or, with ``dry_run``, validate) the recipe."""
    from minitron.pipeline.check import check, validate

    if cfg.dry_run:
        return validate(cfg)
    findings = check(cfg)
    print(f"[run] recipe checked: teacher {findings['teacher']['name']}, students {sorted(findings['students'])}, "
          f"data {sorted(findings['data'])}")
    out = Pipeline(cfg).run()
    save_resolved(cfg, cfg.out, "pipeline.resolved.yaml")
    return out
