"""The KTO and rejection-sampling (``rs``) stages of ``minitron align``, for real on a tiny Llama (CPU, offline):
each runs end to end through the pipeline (output loads in transformers, metrics and report rows written),
resumes after a SIGKILL from its checkpoint when the same command runs again, and trains LoRA adapters."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from align.kto import KTOArgs, unpair
from align.lora import LoraArgs
from align.pipeline import AlignConfig, run, stage_input
from align.rejection import RSArgs
from align.reward import RMArgs
from align.sft import SFTArgs
from minitron.fingerprint import FILE
from test_align_resume import LAYER, align_command, kill_and_resume, stage_metrics, tiny_align_data, write_tiny_data

SMALL_RS = dict(prompts=8, n=2, max_new_tokens=6, eval_prompts=4, batch_size=4, logging_steps=1)



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_align_data(tmp_path_factory.mktemp("kto_rs_data"))


@pytest.fixture(scope="module")
def aligned(tiny_model_dir, data, tmp_path_factory):
    """sft -> rm -> kto -> rs (with its plain-SFT baseline), two steps each."""
    out = tmp_path_factory.mktemp("kto_rs") / "out"
    cfg = AlignConfig(model=str(tiny_model_dir), out=str(out), stages=["sft", "rm", "kto", "rs"], max_steps=2,
                      eval_rows=8, max_length=64, **data, sft=SFTArgs(batch_size=4, lr=1e-3),
                      rm=RMArgs(batch_size=4, lr=1e-3), kto=KTOArgs(batch_size=4, lr=1e-3, logging_steps=1),
                      rs=RSArgs(lr=1e-3, baseline=True, **SMALL_RS))
    run(cfg)
    return cfg, out


def test_default_stages_are_unchanged():
    assert AlignConfig().stages == ["sft", "rm", "dpo", "rl"]


def test_unpair_gives_one_good_and_one_bad_answer_per_pair():
    pairs = [{"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": [{"role": "assistant", "content": "good"}],
              "rejected": [{"role": "assistant", "content": "bad"}]} for i in range(6)]
    rows = unpair(pairs, 0)
    assert len(rows) == 12 and sum(r["label"] for r in rows) == 6
    assert all((r["completion"][0]["content"] == "good") == r["label"] for r in rows)


def test_kto_and_rs_end_to_end(aligned):
    from transformers import AutoModelForCausalLM

    cfg, out = aligned
    kto, rs = stage_metrics(out, "kto"), stage_metrics(out, "rs")
    assert kto["steps"] == 2 and kto["train_examples"] == 2 * kto["train_pairs"] and kto["eval_n"] > 0
    for k in ("logp_margin_before", "logp_margin", "logp_margin_se", "reward_accuracy", "reward_margin"):
        assert isinstance(kto[k], float), k
    assert rs["steps"] == 2 and rs["prompts"] == 8 and rs["n"] == 2 and rs["eval_n"] == 4
    for k in ("reward_before", "reward", "reward_se", "winner_reward_heldin", "sampled_reward_heldin"):
        assert isinstance(rs[k], float), k
    assert rs["winner_reward_heldin"] >= rs["sampled_reward_heldin"]  # the best of n beats the mean of n
    # the paired gain is the same mean difference, with its own (paired) standard error
    assert abs(rs["reward_gain"] - (rs["reward"] - rs["reward_before"])) < 1e-5 and rs["reward_gain_se"] >= 0
    assert abs(rs["gain_over_baseline"] - (rs["reward"] - rs["baseline_sft_reward"])) < 1e-5
    # inputs: KTO <- SFT; RS <- the latest policy (KTO); each changed its input's weights
    for stage, src in (("kto", "sft"), ("rs", "kto")):
        assert json.loads((out / stage / FILE).read_text())["config"]["model"] == str(out / src)
        assert not torch.equal(load_file(out / stage / "model.safetensors")[LAYER],
                               load_file(out / src / "model.safetensors")[LAYER])
        AutoModelForCausalLM.from_pretrained(out / stage)
    assert stage_input(out, out, "rl") == out / "rs"
    report = (out / "report.md").read_text()
    assert "| kto |" in report and "| rs |" in report
    assert (out / "final").resolve() == (out / "rs").resolve()


def test_lora_kto_and_rs(aligned, data, tmp_path):
    _, src = aligned
    for stage in ("sft", "rm"):
        shutil.copytree(src / stage, tmp_path / stage)
    cfg = AlignConfig(model=str(src / "sft"), out=str(tmp_path), stages=["kto", "rs"], max_steps=2, eval_rows=8,
                      max_length=64, lora=LoraArgs(enabled=True, r=4, alpha=8), **data,
                      kto=KTOArgs(batch_size=4, lr=1e-2), rs=RSArgs(lr=1e-2, **SMALL_RS))
    run(cfg)
    for stage, inp in (("kto", "sft"), ("rs", "kto")):
        assert (tmp_path / stage / "adapter" / "adapter_config.json").exists()
        merged = load_file(tmp_path / stage / "model.safetensors")
        assert not any("lora" in k for k in merged)
        key = "model.layers.0.self_attn.q_proj.weight"
        assert not torch.equal(merged[key], load_file(tmp_path / inp / "model.safetensors")[key])
        assert stage_metrics(tmp_path, stage)["steps"] == 2


# stage -> (--stages, flags of a run that saves a checkpoint every step for long enough to be caught)
RUNS = {
    "kto": ("kto", ["--kto.steps", "40", "--kto.batch-size", "2"]),
    "rs": ("rm,rs", ["--rm.steps", "1", "--rm.batch-size", "2", "--rs.steps", "40", "--rs.batch-size", "1",
                     "--rs.prompts", "4", "--rs.n", "2", "--rs.max-new-tokens", "4", "--rs.eval-prompts", "2"]),
}


@pytest.mark.parametrize("stage", list(RUNS))
def test_a_killed_stage_resumes_from_its_checkpoint(stage, tiny_model_dir, tmp_path):
    """SIGKILL mid-stage, then the same command: it resumes from the checkpoint's step (as test_align_resume)."""
    from transformers import AutoModelForCausalLM

    out, data = tmp_path / "out", write_tiny_data(tmp_path / "data")
    _, metrics, _ = kill_and_resume(align_command(tiny_model_dir, out, data, stage, *RUNS[stage]), out, stage, tmp_path)
    assert metrics["steps"] == 40
    AutoModelForCausalLM.from_pretrained(out / stage)
    assert json.loads((out / stage / FILE).read_text())["config"]["steps"] == 40
