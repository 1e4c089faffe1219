"""The PPO option, on-policy distillation (``opd``) and SPIN (``spin``) stages of ``minitron align`` on a tiny Llama
(CPU, offline): PPO is refused in one line (TRL 1.16 has no PPO trainer); opd and spin each run end to end through
the pipeline (output loads in transformers, metrics and report rows written), resume after a SIGKILL from their
checkpoint when the same command runs again, and train LoRA adapters."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from align.lora import LoraArgs
from align.opd import OPDArgs
from align.pipeline import AlignConfig, run, stage_input
from align.rl import RLArgs
from align.sft import SFTArgs
from align.spin import SPINArgs
from minitron.config import ConfigError
from minitron.fingerprint import FILE
from test_align_resume import LAYER, align_command, kill_and_resume, stage_metrics, tiny_align_data, write_tiny_data

SMALL_OPD = dict(batch_size=2, max_new_tokens=6, prompts=8, eval_prompts=4, logging_steps=1)
SMALL_SPIN = dict(batch_size=2, max_new_tokens=6, prompts=4, eval_prompts=4, iterations=2, logging_steps=1)



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_align_data(tmp_path_factory.mktemp("opd_spin_data"))


@pytest.fixture(scope="module")
def teacher(tiny_model_dir, data, tmp_path_factory):
    """An "aligned teacher": SFT of the tiny model (same tokenizer as the students' SFT)."""
    out = tmp_path_factory.mktemp("teacher") / "out"
    run(AlignConfig(model=str(tiny_model_dir), out=str(out), stages=["sft"], max_steps=3, eval_rows=8, max_length=64,
                    **data, sft=SFTArgs(batch_size=4, lr=1e-2)))
    return out / "sft"


@pytest.fixture(scope="module")
def aligned(tiny_model_dir, teacher, data, tmp_path_factory):
    """sft -> opd (from the SFT, teacher above) -> spin (from the opd output, two rounds), two steps each."""
    out = tmp_path_factory.mktemp("opd_spin") / "out"
    cfg = AlignConfig(model=str(tiny_model_dir), out=str(out), stages=["sft", "opd", "spin"], max_steps=2,
                      eval_rows=8, max_length=64, **data, sft=SFTArgs(batch_size=4, lr=1e-4),
                      opd=OPDArgs(teacher=str(teacher), lr=1e-3, baseline=True, **SMALL_OPD),
                      spin=SPINArgs(lr=1e-3, baseline=True, **SMALL_SPIN))
    run(cfg)
    return cfg, out


def test_ppo_is_refused_in_one_line_naming_what_is_missing():
    with pytest.raises(ConfigError, match=r"rl.algo ppo: .*trl.experimental.ppo.*rloo or grpo"):
        RLArgs(algo="ppo")


def test_new_stages_are_not_default_and_need_a_teacher(tiny_model_dir, tmp_path):
    from minitron.config import MinitronError

    assert AlignConfig().stages == ["sft", "rm", "dpo", "rl"]
    with pytest.raises(MinitronError, match="--opd.teacher"):
        run(AlignConfig(model=str(tiny_model_dir), out=str(tmp_path / "o"), stages=["opd"],
                        **tiny_align_data(tmp_path / "d")))
    assert not (tmp_path / "o").exists()


def test_opd_and_spin_end_to_end(aligned, teacher):
    from transformers import AutoModelForCausalLM

    cfg, out = aligned
    opd, spin = stage_metrics(out, "opd"), stage_metrics(out, "spin")
    assert opd["steps"] == 2 and opd["eval_n"] == 4 and opd["teacher"] == str(teacher)
    for k in ("kl_to_teacher_before", "kl_to_teacher", "kl_to_teacher_se", "eval_loss_before", "eval_loss",
              "eval_loss_se", "teacher_eval_loss", "baseline_sft_kl_to_teacher", "baseline_sft_eval_loss"):
        assert isinstance(opd[k], float), k
    assert spin["steps"] == 2 and spin["total_steps"] == 4 and [r["round"] for r in spin["rounds"]] == [1, 2]
    for k in ("eval_loss_before", "eval_loss", "eval_loss_se", "self_margin_before", "self_margin",
              "baseline_sft_eval_loss"):
        assert isinstance(spin[k], float), k
    for stage, src in (("opd", "sft"), ("spin", "opd")):
        assert json.loads((out / stage / FILE).read_text())["config"]["model"] == str(out / src)
        assert not torch.equal(load_file(out / stage / "model.safetensors")[LAYER],
                               load_file(out / src / "model.safetensors")[LAYER])
        AutoModelForCausalLM.from_pretrained(out / stage)
    assert stage_input(out, out, "spin") == out / "opd"
    assert not (out / ".work" / "spin").exists() and not (out / ".work" / "opd").exists()
    report = (out / "report.md").read_text()
    assert "| opd |" in report and "| spin |" in report
    assert (out / "final").resolve() == (out / "spin").resolve()


def test_lora_opd_and_spin(aligned, teacher, data, tmp_path):
    _, src = aligned
    shutil.copytree(src / "sft", tmp_path / "sft")
    cfg = AlignConfig(model=str(src / "sft"), out=str(tmp_path), stages=["opd", "spin"], max_steps=2, eval_rows=8,
                      max_length=64, lora=LoraArgs(enabled=True, r=4, alpha=8), **data,
                      opd=OPDArgs(teacher=str(teacher), lr=1e-2, **SMALL_OPD), spin=SPINArgs(lr=1e-2, **SMALL_SPIN))
    run(cfg)
    for stage, inp in (("opd", "sft"), ("spin", "opd")):
        assert (tmp_path / stage / "adapter" / "adapter_config.json").exists()
        merged = load_file(tmp_path / stage / "model.safetensors")
        assert not any("lora" in k for k in merged)
        key = "model.layers.0.self_attn.q_proj.weight"
        assert not torch.equal(merged[key], load_file(tmp_path / inp / "model.safetensors")[key])
        assert stage_metrics(tmp_path, stage)["steps"] == 2


# stage -> (--stages, flags of a run that saves a checkpoint every step for long enough to be caught, where its
# checkpoints are, the name its resume line uses)
RUNS = {
    "opd": ("opd", ["--opd.steps", "40", "--opd.batch-size", "1", "--opd.max-new-tokens", "4", "--opd.prompts", "4",
                    "--opd.eval-prompts", "2"], "opd", "opd"),
    # killed in its second round: the rerun starts round 2 from round 1's kept model, at round 2's checkpoint
    "spin": ("spin", ["--spin.steps", "20", "--spin.batch-size", "1", "--spin.iterations", "2",
                      "--spin.max-new-tokens", "4", "--spin.prompts", "4", "--spin.eval-prompts", "2"],
             "spin/iter-2", "spin/iter-2"),
}


@pytest.mark.parametrize("stage", list(RUNS))
def test_a_killed_stage_resumes_from_its_checkpoint(stage, teacher, tmp_path):
    """SIGKILL mid-stage, then the same command: it resumes from the checkpoint's step (as test_align_resume)."""
    from transformers import AutoModelForCausalLM

    out, data = tmp_path / "out", write_tiny_data(tmp_path / "data")
    stages, flags, work, name = RUNS[stage]
    cmd = align_command(teacher, out, data, stage, stages, ["--opd.teacher", str(teacher), *flags])
    stdout, metrics, step = kill_and_resume(cmd, out, stage, tmp_path, work=work, name=name)
    if stage == "spin":
        assert "[spin] round 1 finished earlier: starting round 2 from" in stdout
        assert not (out / ".work" / "spin").exists()  # the kept round and the checkpoints went with the output
    assert metrics["steps"] > step
    AutoModelForCausalLM.from_pretrained(out / stage)
