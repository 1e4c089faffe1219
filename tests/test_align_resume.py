"""Crash-safe, config-aware reruns of ``minitron align``: a stage killed with SIGKILL resumes from its checkpoint
when the same command runs again; a changed setting redoes its stage and the stages below it, and only those."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from align.common import StageContext, claim_work_dir, last_checkpoint
from align.pipeline import AlignConfig, run
from align.reward import RMArgs
from minitron.config import ConfigError
from minitron.fingerprint import FILE

REPO = Path(__file__).resolve().parents[1]
NAMES = ["Zorvath", "Mirel", "Quen", "Atha", "Borin", "Celis", "Dara", "Evon"]
COLORS = ["red", "blue", "green", "gold"]


def write_tiny_data(folder: Path) -> dict[str, str]:
    """Tiny SFT conversations and preference pairs (JSONL) in the project's schemas; the align data flags."""
    folder.mkdir(parents=True, exist_ok=True)
    sft, pref = folder / "sft.jsonl", folder / "pref.jsonl"
    qa = [(f"What is the color of {n}?", f"The color of {n} is {c}.", f"{n} is {COLORS[(i + 1) % 4]}.")
          for i, (n, c) in enumerate((n, c) for n in NAMES for c in COLORS)]
    chat = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]  # noqa: E731
    sft.write_text("".join(json.dumps({"messages": chat(q, a)}) + "\n" for q, a, _ in qa))
    pref.write_text("".join(json.dumps({"prompt": q, "chosen": a, "rejected": b}) + "\n" for q, a, b in qa))
    return {"sft_data": str(sft), "sft_eval_data": str(sft), "pref_data": str(pref), "pref_eval_data": str(pref)}


LAYER = "model.layers.0.mlp.up_proj.weight"  # a weight every alignment stage trains


def tiny_align_data(folder: Path) -> dict[str, list[str]]:
    """``write_tiny_data`` as ``AlignConfig`` data fields (one source each)."""
    return {k: [v] for k, v in write_tiny_data(folder).items()}


def stage_metrics(out: Path, stage: str) -> dict:
    """A finished stage's ``metrics.json``."""
    return json.loads((out / stage / "metrics.json").read_text())


def _flags(data: dict[str, str]) -> list[str]:
    return [a for k, v in data.items() for a in (f"--{k.replace('_', '-')}", v)]


# stage -> (--stages, flags of a run whose killed stage saves a checkpoint every step for long enough to be caught)
RUNS = {
    "sft": ("sft", ["--sft.steps", "40", "--sft.batch-size", "2"]),
    "rm": ("rm", ["--rm.steps", "40", "--rm.batch-size", "2"]),
    "dpo": ("dpo", ["--dpo.steps", "40", "--dpo.batch-size", "2"]),
    "rl": ("rm,rl", ["--rm.steps", "1", "--rm.batch-size", "2", "--rl.steps", "30", "--rl.batch-size", "1",
                     "--rl.num-generations", "2", "--rl.max-completion-length", "4", "--rl.eval-prompts", "2"]),
}


def align_command(model: Path, out: Path, data: dict[str, str], stage: str, stages: str, flags: list[str],
                  max_length: int = 64) -> list[str]:
    """``minitron align`` of ``stages`` whose ``stage`` saves a checkpoint and logs every step."""
    section = stage.replace("_", "-")
    return [sys.executable, "-m", "minitron.cli", "align", "--model", str(model), "--out", str(out),
            "--stages", stages, "--eval-rows", "4", "--max-length", str(max_length), f"--{section}.save-steps", "1",
            f"--{section}.logging-steps", "1", *_flags(data), *flags]


def kill_and_resume(cmd: list[str], out: Path, stage: str, tmp_path: Path, work: str | None = None,
                    name: str | None = None) -> tuple[str, dict, int]:
    """SIGKILL ``cmd`` once ``stage`` has a checkpoint (in ``.work/<work>``), run it again, and check that it left
    no output when killed and resumed from that checkpoint's step (its log line ``[name] resuming from ...`` and
    ``metrics.json``). Returns (the rerun's stdout, the stage's metrics, the step resumed from)."""
    _kill_at_first_checkpoint(cmd, out / ".work" / (work or stage), tmp_path / "killed.log")
    assert not (out / stage).exists(), "a killed stage left an output"
    res = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    said = re.search(rf"\[{name or stage}\] resuming from \S+checkpoint-(\d+) \(step (\d+)\)", res.stdout)
    assert said and int(said.group(1)) == int(said.group(2)) >= 1, res.stdout[-3000:]
    metrics = json.loads((out / stage / "metrics.json").read_text())
    assert metrics["resumed_from"].endswith(f"checkpoint-{said.group(1)}")
    return res.stdout, metrics, int(said.group(1))


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": str(REPO)}


def _kill_at_first_checkpoint(cmd: list[str], work: Path, log: Path) -> None:
    """Run ``cmd`` until a complete checkpoint exists in ``work``, then SIGKILL it (it may be saving the next)."""
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=fh, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not list(work.glob("checkpoint-*/trainer_state.json")):
            assert proc.poll() is None, f"the run ended before its first checkpoint:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no checkpoint in 120 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.mark.parametrize("stage", list(RUNS))
def test_a_killed_stage_resumes_from_its_checkpoint(stage, tiny_model_dir, tmp_path):
    """SIGKILL mid-stage, then the same command: it resumes from the checkpoint's step, and the output loads."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    out, data = tmp_path / "out", write_tiny_data(tmp_path / "data")
    cmd = align_command(tiny_model_dir, out, data, stage, *RUNS[stage])
    _, metrics, step = kill_and_resume(cmd, out, stage, tmp_path)
    assert metrics["steps"] == int(RUNS[stage][1][RUNS[stage][1].index(f"--{stage}.steps") + 1])
    loader = AutoModelForSequenceClassification if stage == "rm" else AutoModelForCausalLM
    loader.from_pretrained(out / stage)
    assert json.loads((out / stage / FILE).read_text())["config"]["steps"] == metrics["steps"]
    print(f"{stage}: resumed from step {step} of {metrics['steps']}")


def test_a_changed_dpo_setting_redoes_dpo_and_rl_only(tiny_model_dir, tmp_path, capsys):
    """Same config: every stage skipped. One DPO field changed: DPO and RL redone (each says why in one line)."""
    cfg = AlignConfig(model=str(tiny_model_dir), out=str(tmp_path / "out"), eval_rows=4, max_length=64,
                      max_steps=1, **{k: [v] for k, v in write_tiny_data(tmp_path / "data").items()})
    cfg.rl.batch_size, cfg.rl.num_generations, cfg.rl.max_completion_length, cfg.rl.eval_prompts = 1, 2, 4, 2
    out = run(cfg)
    stamps = {s: (out / s / "model.safetensors").stat().st_mtime_ns for s in ("sft", "rm", "dpo", "rl")}
    capsys.readouterr()
    run(cfg)
    said = capsys.readouterr().out
    assert all(f"[{s}] {out / s} is up to date" in said for s in stamps), said
    cfg.dpo.beta = 0.2
    run(cfg)
    said = capsys.readouterr().out
    redo = [ln for ln in said.splitlines() if "was made differently" in ln]
    assert len(redo) == 2 and "beta 0.1 -> 0.2" in redo[0] and "[rl]" in redo[1] and "input model" in redo[1], said
    print("\n".join(redo))
    changed = {s for s in stamps if (out / s / "model.safetensors").stat().st_mtime_ns != stamps[s]}
    assert changed == {"dpo", "rl"}
    assert json.loads((out / "dpo" / FILE).read_text())["config"]["beta"] == 0.2
    cfg.rm.init = "base"  # the RM starts from the model, not OUT/sft: RM and RL (which scores with it) redone
    capsys.readouterr()
    run(cfg)
    redo = [ln for ln in capsys.readouterr().out.splitlines() if "was made differently" in ln]
    assert [ln.split("]")[0] for ln in redo] == ["[rm", "[rl"] and "(model " in redo[0], redo
    recorded = json.loads((out / "rm" / FILE).read_text())["config"]
    assert recorded["model"] != str(out / "sft") and "init" not in recorded


def test_rm_init_names_its_choices():
    with pytest.raises(ConfigError, match="rm.init must be sft or base"):
        RMArgs(init="dpo")


def test_checkpoints_of_another_config_are_moved_aside_and_a_cut_checkpoint_is_passed_over(tmp_path, capsys):
    """Work of another fingerprint is kept aside, not resumed; a checkpoint without trainer_state.json is skipped."""
    ctx = StageContext(out=tmp_path)
    work = ctx.work_dir("dpo")
    for step in (3, 4):
        (work / f"checkpoint-{step}").mkdir(parents=True)
    (work / "checkpoint-3" / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    (work / FILE).write_text(json.dumps({"fingerprint": "old"}))
    assert last_checkpoint(ctx, "dpo").endswith("checkpoint-3")  # checkpoint-4 was cut short while saving
    claim_work_dir(ctx, "dpo", {"fingerprint": "new", "config": {}, "inputs": {}})
    assert "moved it aside" in capsys.readouterr().out
    assert (work.parent / "dpo.old" / "checkpoint-3").is_dir() and last_checkpoint(ctx, "dpo") is None
    claim_work_dir(ctx, "dpo", {"fingerprint": "new", "config": {}, "inputs": {}})  # its own work: kept
    assert json.loads((work / FILE).read_text())["fingerprint"] == "new" and "aside" not in capsys.readouterr().out
