"""``minitron``: one CLI, one subcommand per stage.

Every stage is ``module:ConfigClass:function`` in ``STAGES`` (or ``BENCHES`` under ``minitron bench``).
Options common to all: ``--config FILE.yaml`` (the stage's section of a recipe, or a file of its own),
``--out DIR``, ``--model DIR_OR_HUB_NAME``, ``--max-steps N``; any other ``--field-name VALUE`` overrides
the config field ``field_name`` (dotted names reach nested sections: ``--train.lr 1e-4``).
``minitron STAGE --help`` lists every field with its type, default and meaning.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import typing
from typing import Any, Callable

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from minitron.config import ConfigError, MinitronError, _unwrap_optional, field_help, load_config, to_dict

# name -> (target "module:Config:function", one-line help). Keep in sync with the README's stage list.
STAGES: dict[str, tuple[str, str]] = {
    "import": ("minitron.model_source:ImportConfig:run", "Import a GGUF file as a standard HF model directory (safetensors, tokenizer, chat template)."),
    "world": ("minitron.world:WorldConfig:run", "Generate the demo world's data sets (corpus, MC, IFEval, RAG, BFCL, SFT, preferences)."),
    "teacher": ("minitron.teacher:TeacherConfig:run", "Train a tokenizer and a small Llama teacher from scratch (demo world or a corpus)."),
    "mix": ("minitron.mixture:MixConfig:run", "Distillation corpus: plain text mixed with chat conversations in the teacher's template."),
    "correct": ("minitron.lm_train:LMTrainConfig:run", "Teacher correction: LM training of the teacher on the distillation data."),
    "importance": ("minitron.importance:ImportanceConfig:run", "Score heads, neurons, channels and layers from activations (saved for many targets)."),
    "prune": ("minitron.prune:PruneConfig:run", "Width and/or depth pruning to a target shape or parameter budget."),
    "distill": ("minitron.distill:DistillConfig:run", "Logit knowledge distillation from the teacher into the pruned student."),
    "teacher-logits": ("minitron.teacher_logits:TeacherLogitsConfig:run", "Precompute the teacher's top-k log-probs for offline distillation."),
    "align": ("minitron.pipeline.align_then_eval:AlignConfig:run", "SFT -> reward model -> DPO -> RL (RLOO/GRPO with TRL, or PPO)."),
    "eval": ("evals.harness:EvalConfig:run", "MMLU, IFEval, RAG, function calling and roleplay: JSON, Markdown table, plots."),
    "eval-fc": ("evals.bfcl:CheckConfig:run", "BFCL-style AST checker on a predictions file (standalone)."),
    "serve": ("evals.serve:ServeConfig:run", "Serve a model directory with vLLM's OpenAI-compatible server on 127.0.0.1."),
    "chat": ("evals.chat:ChatConfig:run", "Interactive terminal chat against an OpenAI-compatible endpoint."),
    "run": ("minitron.pipeline.recipe:PipelineConfig:run", "A whole pipeline from one recipe file (make demo)."),
}
BENCHES: dict[str, tuple[str, str]] = {
    "prune": ("minitron.pipeline.bench.prune:BenchPruneConfig:run", "Importance overhead, 8B-scale prune time and memory."),
    "distill": ("minitron.pipeline.bench.distill:BenchDistillConfig:run", "KD loss memory/time vs naive and TRL; distillation throughput."),
    "reproduce": ("minitron.pipeline.bench.reproduce:ReproduceConfig:run", "The paper's claim, small, on Gutenberg."),
    "serve": ("evals.bench_serve:BenchServeConfig:run", "vLLM serving throughput, teacher vs pruned students."),
    "all": ("minitron.pipeline.bench.collect:BenchAllConfig:run", "Every benchmark into one JSON and one Markdown report."),
}

app = typer.Typer(help="Prune, distill, align, evaluate and serve small LLMs (the Minitron recipe on Hugging Face).",
                  no_args_is_help=True, add_completion=False)
bench_app = typer.Typer(help="Benchmarks: one JSON object each (`minitron bench all` collects them).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
console = Console(stderr=True)


def resolve(target: str) -> tuple[type, Callable[[Any], Any]]:
    """Import ``module:Config:function``."""
    module, cls_name, fn_name = target.split(":")
    mod = importlib.import_module(module)
    return getattr(mod, cls_name), getattr(mod, fn_name)


def parse_overrides(args: list[str], cls: type) -> tuple[str | None, dict[str, Any]]:
    """Turn ``--config F --hidden-size 8 --flag --no-other --a.b=v`` into (config path, {field: value})."""
    hints = typing.get_type_hints(cls)
    config_path, overrides = None, {}
    i = 0
    while i < len(args):
        tok = args[i]
        if not tok.startswith("--"):
            raise ConfigError(f"unexpected argument {tok!r}: options are --field-name VALUE (see --help)")
        key, eq, value = tok[2:].partition("=")
        key = key.replace("-", "_")
        top = key.split(".")[0]
        negated = top.startswith("no_") and top[3:] in hints and top not in hints
        tp = _unwrap_optional(hints.get(top[3:] if negated else top, str))[0]
        if negated and tp is bool:
            overrides[top[3:]] = False
            i += 1
            continue
        if not eq:
            nxt = args[i + 1] if i + 1 < len(args) else None
            if tp is bool and "." not in key and (nxt is None or nxt.startswith("--")):
                value = "true"
            elif nxt is None:
                raise ConfigError(f"--{key.replace('_', '-')} needs a value")
            else:
                value, i = nxt, i + 1
        i += 1
        if key == "config":
            config_path = value
        elif typing.get_origin(tp) is list:  # repeated flags and comma lists both extend the list
            overrides[key] = list(overrides.get(key, [])) + [v for v in str(value).split(",") if v]
        else:
            overrides[key] = value
    return config_path, overrides


def print_help(name: str, target: str, short: str) -> None:
    """Stage help: its purpose, the common options, and a table of every config field."""
    cls, fn = resolve(target)
    doc = (sys.modules[cls.__module__].__doc__ or "").strip()  # the stage's own module (its config's)
    console.print(f"[bold]minitron {name}[/bold] [--config FILE.yaml] [--FIELD VALUE ...]\n\n{short}\n")
    if doc:
        console.print(doc + "\n")
    table = Table(title=f"{cls.__name__} fields (YAML keys; flags are --field-name)")
    for col in ("field", "type", "default", "help"):
        table.add_column(col)
    table.add_row("config", "path", "None", "YAML file: this stage's section of a recipe, or a file of its own")
    for fname, tname, default, help_ in field_help(cls):
        table.add_row(fname, tname, repr(default), help_)
    console.print(table)


def run_stage(name: str, target: str, short: str, args: list[str]) -> Any:
    """Load the config for a stage from args and run it; user errors print a message and exit 2."""
    if any(a in ("--help", "-h") for a in args):
        print_help(name, target, short)
        raise typer.Exit(0)
    cls, fn = resolve(target)
    try:
        config_path, overrides = parse_overrides(args, cls)
        section = None if getattr(cls, "RECIPE", False) else name.replace("-", "_")
        cfg = load_config(cls, config_path, section=section, overrides=overrides)
        if dataclasses.is_dataclass(cfg):
            console.log(f"[bold]{name}[/bold] config: {to_dict(cfg)}")
        return fn(cfg)
    except (MinitronError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        refuse(e)


def refuse(e: BaseException) -> None:
    """Bad input: one ``error:`` line naming the cause (no traceback), exit code 2."""
    if isinstance(e, OSError) and not isinstance(e, MinitronError) and e.filename:
        msg = f"{e.strerror or type(e).__name__}: {e.filename}"
    else:
        msg = str(e)
    console.print("[red]error:[/red]", escape(" ".join(msg.split())), soft_wrap=True)
    raise typer.Exit(2) from None


def _register(typer_app: typer.Typer, name: str, target: str, short: str) -> None:
    @typer_app.command(name, help=short + "  (--help lists every option)", add_help_option=False,
                       context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def _command(ctx: typer.Context) -> None:
        result = run_stage(name, target, short, list(ctx.args))
        if result is not None:
            console.print(f"[green]{name} done:[/green] {result}")


for _name, (_target, _short) in STAGES.items():
    _register(app, _name, _target, _short)
for _name, (_target, _short) in BENCHES.items():
    _register(bench_app, _name, _target, _short)


if __name__ == "__main__":
    app()
