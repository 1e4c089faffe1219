"""PPO (``--rl.algo ppo``, align/ppo.py), on-policy distillation (``opd``) and SPIN (``spin``) in ``minitron align``
on a tiny Llama (CPU, offline): each runs end to end through the pipeline (output loads in transformers, metrics and
report rows written), resumes after a SIGKILL from its checkpoint when the same command runs again, and trains LoRA
adapters; PPO's GAE is checked by hand and its bad options are refused in one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from align.lora import LoraArgs
from align.opd import OPDArgs
from align.pipeline import AlignConfig, run, stage_input
from align.reward import RMArgs
from align.rl import RLArgs, fingerprint_args
from align.sft import SFTArgs
from align.spin import SPINArgs
from conftest import refused
from minitron.fingerprint import FILE, of_config
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


SMALL_PPO = dict(algo="ppo", batch_size=2, num_generations=2, max_completion_length=6, eval_prompts=4, logging_steps=1)


def ppo_config(model, out, data, **kw) -> AlignConfig:
    """rm (one step) then PPO (two updates) from ``model``."""
    lora = kw.pop("lora", LoraArgs())
    return AlignConfig(model=str(model), out=str(out), stages=["rm", "rl"], max_steps=2, eval_rows=8, max_length=64,
                       lora=lora, **data, rm=RMArgs(steps=1, batch_size=4), rl=RLArgs(**{**SMALL_PPO, **kw}))


@pytest.fixture(scope="module")
def ppo_run(teacher, data, tmp_path_factory):
    """The RM, then two PPO updates (4 epochs each), from the tiny SFT model."""
    out = tmp_path_factory.mktemp("ppo") / "out"
    run(ppo_config(teacher, out, data, lr=1e-3))
    return out


def test_ppo_end_to_end(ppo_run, teacher):
    """Two PPO updates: the policy changed, the output is a plain causal LM (no critic in it), the held-out reward and
    KL are measured as for RLOO, and the report has the row."""
    from transformers import AutoModelForCausalLM

    out = ppo_run
    m = stage_metrics(out, "rl")
    assert m["algo"] == "ppo" and m["steps"] == 2 and m["eval_n"] == 4 and m["resumed_from"] is None
    for k in ("reward_before", "reward", "reward_se_before", "reward_se", "kl_to_reference", "reward_gain_in_se"):
        assert isinstance(m[k], float), k
    assert m["kl_within_budget"] is True and m["kl_to_reference"] > 0
    assert [h["step"] for h in m["history"]] == [1, 2]
    for k in ("reward", "objective/kl", "loss/policy_avg", "loss/value_avg", "policy/clipfrac_avg", "val/ratio"):
        assert isinstance(m["history"][-1][k], float), k
    assert m["history"][0]["val/ratio"] == pytest.approx(1.0, abs=1e-4)  # first minibatch: the rollout policy
    weights = load_file(out / "rl" / "model.safetensors")
    assert not torch.equal(weights[LAYER], load_file(teacher / "model.safetensors")[LAYER])
    assert not any(k.startswith("score") for k in weights)
    AutoModelForCausalLM.from_pretrained(out / "rl")
    assert json.loads((out / "rl" / FILE).read_text())["config"]["num_ppo_epochs"] == 4
    assert "| rl |" in (out / "report.md").read_text() and "algo ppo" in (out / "report.md").read_text()
    assert not (out / ".work" / "rl").exists()


def test_lora_ppo(teacher, data, tmp_path):
    run(ppo_config(teacher, tmp_path, data, lr=1e-2, lora=LoraArgs(enabled=True, r=4, alpha=8)))
    assert (tmp_path / "rl" / "adapter" / "adapter_config.json").exists()
    merged = load_file(tmp_path / "rl" / "model.safetensors")
    assert not any("lora" in k for k in merged)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[key], load_file(teacher / "model.safetensors")[key])
    assert stage_metrics(tmp_path, "rl")["steps"] == 2


def test_ppo_gae_by_hand():
    """No KL, gamma = lam = 1: every return is the completion's score (0 past its end) and the advantage, before
    whitening, the return minus the value; with gamma = 0 a token's return is its own reward."""
    from align.ppo import _advantages, masked_whiten

    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    logp = torch.zeros(2, 3)
    values = torch.tensor([[0.5, -1.0, 2.0], [0.3, 0.0, 0.0]])
    scores = torch.tensor([1.5, -2.0])
    args = RLArgs(algo="ppo", gamma=1.0, lam=1.0)
    adv, returns, kl = _advantages(logp, logp, values, scores, mask, args)
    assert torch.equal(kl, torch.zeros(2, 3))
    assert torch.allclose(returns, torch.tensor([[1.5, 1.5, 1.5], [-2.0, 0.0, 0.0]]))
    assert torch.allclose(adv, masked_whiten(returns - values, mask))
    args = RLArgs(algo="ppo", gamma=0.0, lam=1.0)
    _, returns, _ = _advantages(logp, logp, values, scores, mask, args)
    assert torch.allclose(returns, torch.tensor([[0.0, 0.0, 1.5], [-2.0, 0.0, 0.0]]))


def test_ppo_options_count_in_the_fingerprint_of_ppo_only():
    fp = lambda **kw: of_config(fingerprint_args(RLArgs(**kw)))["fingerprint"]  # noqa: E731
    assert fp(num_ppo_epochs=2) == fp() and "cliprange" not in of_config(fingerprint_args(RLArgs()))["config"]
    assert fp(algo="ppo", num_ppo_epochs=2) != fp(algo="ppo")


BAD_PPO = {
    "minibatches that do not divide the rollout": (["--rl.num-mini-batches", "3"],
                                                    r"rl\.algo ppo: num_mini_batches=3 must divide the rollout of 16"),
    "unknown KL estimator": (["--rl.kl-estimator", "k2"], r"rl\.algo ppo: kl_estimator must be k1 or k3 \(got 'k2'\)"),
    "no clipping": (["--rl.cliprange", "0"], r"rl\.algo ppo: cliprange must be > 0 \(got 0\.0\)"),
    "greedy sampling": (["--rl.temperature", "0"], r"rl\.algo ppo: temperature must be > 0"),
    "GAE lambda above 1": (["--rl.lam", "1.5"], r"rl\.algo ppo: lam must be in \[0, 1\] \(got 1\.5\)"),
    "whitening a small minibatch": (["--rl.whiten-rewards", "true", "--rl.num-mini-batches", "4"],
                                    r"rl\.algo ppo: whiten_rewards needs minibatches of at least 8 .*got 4"),
    "negative EOS penalty": (["--rl.missing-eos-penalty", "-1"], r"rl\.algo ppo: missing_eos_penalty must be >= 0"),
}


@pytest.mark.parametrize("name", list(BAD_PPO))
def test_a_bad_ppo_option_is_refused_in_one_line(name, tiny_model_dir, tmp_path):
    flags, match = BAD_PPO[name]
    data, out = write_tiny_data(tmp_path / "data"), tmp_path / "out"
    data_flags = [a for k, v in data.items() for a in (f"--{k.replace('_', '-')}", v)]
    print(refused(["align", "--model", tiny_model_dir, "--out", out, *data_flags, "--rl.algo", "ppo", *flags],
                  match=match, leaves=(out,)))


def test_a_killed_ppo_run_resumes_from_its_checkpoint(teacher, tmp_path):
    """SIGKILL mid-PPO, then the same command: it resumes at the checkpoint's update (weights, critic, optimizer,
    schedule and log history), finishes every update, and the output loads."""
    from transformers import AutoModelForCausalLM

    out, data = tmp_path / "out", write_tiny_data(tmp_path / "data")
    flags = ["--rm.steps", "1", "--rm.batch-size", "2", "--rl.algo", "ppo", "--rl.steps", "30", "--rl.batch-size", "1",
             "--rl.num-generations", "2", "--rl.max-completion-length", "4", "--rl.eval-prompts", "2"]
    _, metrics, step = kill_and_resume(align_command(teacher, out, data, "rl", "rm,rl", flags), out, "rl", tmp_path)
    assert metrics["algo"] == "ppo" and metrics["steps"] == 30 and step >= 1
    assert [h["step"] for h in metrics["history"]] == list(range(1, 31))  # the checkpoint's history, then the rest
    AutoModelForCausalLM.from_pretrained(out / "rl")


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
    baseline = json.loads((out / "opd_baseline" / "metrics.json").read_text())
    assert baseline["kl"] == opd["baseline_sft_kl_to_teacher"]
    AutoModelForCausalLM.from_pretrained(out / "opd_baseline")
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


@pytest.mark.parametrize("layout", ["on_policy", "collated"])
def test_opd_loss_on_answer_positions_equals_trls(layout):
    """OPD's GKD loss is computed from the first labelled position on (real prompts are hundreds of tokens before a
    short answer): loss and gradient equal TRL's GKDTrainer.compute_loss, which takes every position's logits.
    on_policy: left-padded prompts then the samples (padding after a stop); collated: right-padded whole chats."""
    from types import SimpleNamespace

    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.experimental.gkd import GKDTrainer

    from align.opd import completion_gkd_trainer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    student, teacher = LlamaForCausalLM(config), LlamaForCausalLM(config)
    ids = torch.randint(3, 97, (3, 20))
    mask, labels = torch.ones_like(ids), ids.clone()
    if layout == "on_policy":  # prompts 12 columns (left-padded), answers 8 (the second stops after 5 tokens)
        mask[0, :4] = 0
        mask[1, 12 + 5:] = 0
        labels[mask == 0] = -100
        labels[:, :12] = -100
    else:  # prompts of 9, 11, 14 tokens; the last chat is 4 tokens shorter (right padding)
        for row, prompt in enumerate((9, 11, 14)):
            labels[row, :prompt] = -100
        mask[2, 16:] = 0
        labels[2, 16:] = -100
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    results = []
    for cls in (GKDTrainer, completion_gkd_trainer()):
        student.zero_grad()
        fake = SimpleNamespace(teacher_model=teacher, beta=0.5, generalized_jsd_loss=GKDTrainer.generalized_jsd_loss)
        loss = cls.compute_loss(fake, student, dict(inputs), num_items_in_batch=torch.tensor(17))
        loss.backward()
        results.append((loss.detach(), student.model.layers[1].mlp.up_proj.weight.grad.clone()))
    (trl_loss, trl_grad), (loss, grad) = results
    assert trl_loss > 0
    torch.testing.assert_close(loss, trl_loss)
    torch.testing.assert_close(grad, trl_grad)
