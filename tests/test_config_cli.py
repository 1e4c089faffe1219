"""Config loading, overrides and the CLI registry."""

import dataclasses
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from minitron.cli import BENCHES, STAGES, app, parse_overrides
from minitron.config import ConfigError, arg, load_config

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Inner:
    lr: float = arg(1e-3, "learning rate")


@dataclasses.dataclass
class Demo:
    model: str = arg("m", "model")
    steps: int = arg(3, "steps")
    flag: bool = arg(False, "a flag")
    tags: list[str] = arg([], "tags")
    cap: int | None = arg(None, "optional cap")
    train: Inner = arg(None, "nested")

    def __post_init__(self):
        self.train = self.train or Inner()


def test_unknown_key_names_valid_ones(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("demo:\n  model: x\n  stepz: 4\n")
    with pytest.raises(ConfigError, match=r"unknown config key stepz for Demo; valid keys: model, steps"):
        load_config(Demo, f, section="demo")


def test_section_file_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("demo:\n  model: x\n  steps: 4\n  train: {lr: 0.5}\nother: {a: 1}\n")
    cfg = load_config(Demo, f, section="demo", overrides={"steps": "7", "train.lr": "2e-4", "cap": "none"})
    assert (cfg.model, cfg.steps, cfg.train.lr, cfg.cap) == ("x", 7, 2e-4, None)
    own = tmp_path / "own.yaml"
    own.write_text("model: y\n")
    assert load_config(Demo, own, section="demo").model == "y"


def test_bad_type_is_an_error():
    with pytest.raises(ConfigError, match="steps: cannot read 'many' as int"):
        load_config(Demo, overrides={"steps": "many"})


def test_parse_overrides_flags_and_lists():
    path, ov = parse_overrides(["--config", "a.yaml", "--flag", "--tags", "a", "--tags", "b", "--max-steps=3",
                                "--train.lr", "0.1"], Demo)
    assert path == "a.yaml"
    assert ov == {"flag": "true", "tags": ["a", "b"], "max_steps": "3", "train.lr": "0.1"}
    assert parse_overrides(["--no-flag"], Demo)[1] == {"flag": False}
    assert parse_overrides(["--tags", "a,b", "--tags", "c"], Demo)[1] == {"tags": ["a", "b", "c"]}


def test_every_stage_target_resolves():
    """Each registered subcommand names a module, config dataclass and function that exist."""
    missing = []
    for name, (target, _) in {**STAGES, **{f"bench {k}": v for k, v in BENCHES.items()}}.items():
        module, cls, fn = target.split(":")
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError:
            missing.append(name)
            continue
        assert dataclasses.is_dataclass(getattr(mod, cls)), name
        assert callable(getattr(mod, fn)), name
    assert not missing, f"stages without a module: {missing}"


def test_help_lists_all_stages():
    """Every stage is a command of its own, listed by name in the help (a line per command)."""
    from minitron.cli import STAGES

    out = subprocess.run([sys.executable, "-m", "minitron.cli", "--help"], capture_output=True, text=True, cwd=ROOT,
                         env={**__import__("os").environ, "COLUMNS": "200"})
    assert out.returncode == 0
    listed = [m[1] for m in re.finditer(r"^[│|]\s+([a-z][a-z-]*)\s{2,}", out.stdout, re.M)]
    assert listed == [*STAGES, "bench"], listed
    assert [c.name for c in app.registered_commands] == list(STAGES)


def test_stage_help_and_unknown_flag():
    runner = CliRunner()
    res = runner.invoke(app, ["world", "--help"])
    assert res.exit_code == 0 and "n_entities" in res.output
    res = runner.invoke(app, ["world", "--n-entitiez", "3"])
    assert res.exit_code == 2 and "unknown config key n_entitiez" in res.output
