"""SteerLM in ``minitron align`` (``steer_rm``, ``steer_sft``; ``align/steerlm.py``), for real on tiny Llamas (CPU,
offline): each stage end to end (two steps: the output loads, metrics and report rows written, LoRA adapters), a
finished stage is skipped, a killed one resumes from its checkpoint, and the acceptance check on a small demo
world: asking for verbosity 0 vs 4 changes the mean reply length at least 2x, and helpfulness 0 vs 4 changes the
pairwise reward model's mean score by more than two standard errors; the same training without the attribute line
(the control) passes neither."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from align.lora import LoraArgs
from align.pipeline import AlignConfig, run
from align.reward import RMArgs
from align.steerlm import SteerRMArgs, SteerSFTArgs, length_cuts, masked_mse, variants, verbosity
from minitron.chat_format import attribute_line, parse_attributes, with_attributes
from minitron.fingerprint import FILE
from test_align_resume import LAYER, align_command, kill_and_resume, stage_metrics, tiny_align_data, write_tiny_data

TWO_STEPS = dict(max_steps=2, eval_rows=8, max_length=192)  # the attribute line, words included: ~90 tiny-BPE tokens



# ----------------------------------------------------------------------------------------------- the format
def test_attribute_line_round_trips_and_goes_into_the_system_turn():
    line = attribute_line({"verbosity": 0, "helpfulness": 4})
    # fixed order, whatever the dict's; then the values in words
    assert line == ("Attributes: helpfulness=4 verbosity=0. Give the most helpful answer you can. "
                    "Answer in one short sentence.")
    assert attribute_line({"tone": 1}) == "Attributes: tone=1"  # a name without words: the value alone
    assert parse_attributes(line) == {"helpfulness": 4, "verbosity": 0}
    assert parse_attributes("verbosity=1") == {"verbosity": 1}  # as typed after /attributes
    assert parse_attributes("You are a pirate.\nAttributes: verbosity=3") == {"verbosity": 3}
    for bad in ("verbosity=5", "nothing here"):
        with pytest.raises(ValueError):
            parse_attributes(bad)
    with pytest.raises(ValueError):
        attribute_line({"verbosity": 7})
    user = [{"role": "user", "content": "hi"}]
    assert with_attributes(user, {"verbosity": 2}) == [
        {"role": "system", "content": "Attributes: verbosity=2. Answer in a few sentences."}, *user]
    persona = [{"role": "system",
                "content": "Attributes: verbosity=4. Answer in detail, in several sentences.\nYou are a knight."}, *user]
    assert with_attributes(persona, {"verbosity": 0})[0]["content"] == \
        "Attributes: verbosity=0. Answer in one short sentence.\nYou are a knight."
    assert with_attributes(user, None) == user


def test_labels_from_lengths_variants_and_the_masked_loss():
    cuts = length_cuts(["a"] * 5 + ["a b c"] * 5 + ["a " * 10] * 5 + ["a " * 20] * 5 + ["a " * 40] * 5)
    assert [verbosity(t, cuts) for t in ("a", "a b c", "a " * 10, "a " * 20, "a " * 40)] == [0, 1, 2, 3, 4]
    ex = {"prompt": [{"role": "user", "content": "Where does Quen live?"}],
          "completion": [{"role": "assistant", "content": "Quen lives in Oslo."}]}
    out = variants([ex])
    assert [o["completion"][0]["content"] for o in out][:2] == ["Quen lives in Oslo.", "Oslo."]
    assert len(out[2]["completion"][0]["content"].split()) > 3 * 4  # padded
    long = {**ex, "completion": [{"role": "assistant", "content": "Quen lives in Oslo. " + "She likes it there. " * 4}]}
    assert [o["completion"][0]["content"] for o in variants([long])][1:] == ["Quen lives in Oslo."]  # its first sentence
    nan = float("nan")
    loss = masked_mse(torch.tensor([[1.0, 2.0], [3.0, 0.0]]), torch.tensor([[nan, 4.0], [3.0, nan]]))
    assert loss.item() == pytest.approx(2.0)  # (2-4)^2 and (3-3)^2 over the 2 known labels


# ----------------------------------------------------------------------------------------------- the stages
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_align_data(tmp_path_factory.mktemp("steer_data"))


@pytest.fixture(scope="module")
def steered(tiny_model_dir, data, tmp_path_factory):
    """rm -> steer_rm -> steer_sft, two steps each."""
    out = tmp_path_factory.mktemp("steer") / "out"
    cfg = AlignConfig(model=str(tiny_model_dir), out=str(out), stages=["rm", "steer_rm", "steer_sft"], **TWO_STEPS,
                      **data, rm=RMArgs(batch_size=4, lr=1e-3), steer_rm=SteerRMArgs(batch_size=4, lr=1e-3),
                      steer_sft=SteerSFTArgs(batch_size=4, lr=1e-3, variants=True, eval_prompts=4, max_new_tokens=4))
    run(cfg)
    return cfg, out


def test_default_stages_leave_steerlm_out():
    assert AlignConfig().stages == ["sft", "rm", "dpo", "rl"]


def test_steer_stages_end_to_end(steered, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg, out = steered
    rm, sft = stage_metrics(out, "steer_rm"), stage_metrics(out, "steer_sft")
    assert rm["steps"] == 2 and rm["attributes"] == ["helpfulness", "verbosity"] and rm["eval_n"] > 0
    for k in ("mse_before", "mse", "helpfulness_mse", "verbosity_mse", "helpfulness_pair_accuracy"):
        assert isinstance(rm[k], float), k
    model = AutoModelForSequenceClassification.from_pretrained(out / "steer_rm")
    assert model.config.num_labels == 2 and model.config.id2label[1] == "verbosity"
    assert sft["steps"] == 2 and sft["labels_predicted"] > 0 and sft["scored_by"] == str(out / "rm")
    table = sft["steering"]
    assert set(table) == {"verbosity", "helpfulness"}
    for k in ("length_low", "length_high", "length_ratio", "rm_low", "rm_high", "rm_diff", "rm_diff_se"):
        assert isinstance(table["helpfulness"][k], float), k
    assert table["helpfulness"]["n"] == 4
    assert sft["verbosity_short_preference"]["n"] > 0 and isinstance(sft["verbosity_short_preference"]["gap"], float)
    assert sft["helpfulness_preference"]["n"] == 4 and isinstance(sft["helpfulness_preference"]["gap"], float)
    AutoModelForCausalLM.from_pretrained(out / "steer_sft")
    # both start from the input model (no sft stage here) and changed it; steer_sft is fingerprinted on steer_rm
    for stage in ("steer_rm", "steer_sft"):
        assert json.loads((out / stage / FILE).read_text())["config"]["model"] == str(tiny_model_dir)
    assert not torch.equal(load_file(out / "steer_sft" / "model.safetensors")[LAYER],
                           load_file(tiny_model_dir / "model.safetensors")[LAYER])
    assert "attribute_model" in json.loads((out / "steer_sft" / FILE).read_text())["inputs"]
    report = (out / "report.md").read_text()
    assert "| steer_rm |" in report and "| steer_sft |" in report and "| verbosity | " in report
    assert "Log-odds of a short over a long held-out reply" in report
    assert ("Attributes: helpfulness=4 verbosity=0. Give the most helpful answer you can. Answer in one short "
            "sentence.") in (out / "steer_sft" / "README.md").read_text()


def test_a_finished_steer_stage_is_skipped_and_a_changed_attribute_model_redoes_steer_sft(steered, capsys):
    cfg, out = steered
    stamp = {s: (out / s / "metrics.json").stat().st_mtime_ns for s in ("steer_rm", "steer_sft")}
    run(cfg)
    assert {s: (out / s / "metrics.json").stat().st_mtime_ns for s in stamp} == stamp
    capsys.readouterr()
    cfg.steer_rm.lr = 2e-3
    run(cfg)
    said = capsys.readouterr().out
    assert "[steer_rm] " in said and "[align] steer_sft: training" in said
    assert all((out / s / "metrics.json").stat().st_mtime_ns != stamp[s] for s in stamp)


def test_steer_sft_needs_an_attribute_model(tiny_model_dir, data, tmp_path):
    from minitron.config import MinitronError

    with pytest.raises(MinitronError, match="run the steer_rm stage first"):
        run(AlignConfig(model=str(tiny_model_dir), out=str(tmp_path / "out"), stages=["steer_sft"], **TWO_STEPS,
                        **data))


def test_lora_steer_stages(tiny_model_dir, data, tmp_path):
    cfg = AlignConfig(model=str(tiny_model_dir), out=str(tmp_path), stages=["steer_rm", "steer_sft"], **TWO_STEPS,
                      lora=LoraArgs(enabled=True, r=4, alpha=8), **data, steer_rm=SteerRMArgs(batch_size=4, lr=1e-2),
                      steer_sft=SteerSFTArgs(batch_size=4, lr=1e-2, eval_prompts=2, max_new_tokens=2))
    run(cfg)
    key = "model.layers.0.self_attn.q_proj.weight"
    for stage in ("steer_rm", "steer_sft"):
        assert (tmp_path / stage / "adapter" / "adapter_config.json").exists()
        merged = load_file(tmp_path / stage / "model.safetensors")
        assert not any("lora" in k for k in merged)
        assert not torch.equal(merged[key], load_file(tiny_model_dir / "model.safetensors")[key])
    assert stage_metrics(tmp_path, "steer_sft")["scored_by"] is None  # no OUT/rm: lengths only
    assert "rm_low" not in stage_metrics(tmp_path, "steer_sft")["steering"]["verbosity"]


# stage -> (--stages, flags of a run that saves a checkpoint every step for long enough to be caught)
RUNS = {
    "steer_rm": ("steer_rm", ["--steer-rm.steps", "40", "--steer-rm.batch-size", "2"]),
    "steer_sft": ("steer_rm,steer_sft", ["--steer-rm.steps", "1", "--steer-rm.batch-size", "2",
                                         "--steer-sft.steps", "40", "--steer-sft.batch-size", "2",
                                         "--steer-sft.eval-prompts", "2", "--steer-sft.max-new-tokens", "2"]),
}


@pytest.mark.parametrize("stage", list(RUNS))
def test_a_killed_steer_stage_resumes_from_its_checkpoint(stage, tiny_model_dir, tmp_path):
    """SIGKILL mid-stage, then the same command: it resumes from the checkpoint's step (as test_align_resume)."""
    out, data = tmp_path / "out", write_tiny_data(tmp_path / "data")
    cmd = align_command(tiny_model_dir, out, data, stage, *RUNS[stage], max_length=128)
    _, metrics, _ = kill_and_resume(cmd, out, stage, tmp_path)
    assert metrics["steps"] == 40
    assert json.loads((out / stage / FILE).read_text())["config"]["steps"] == 40


# ----------------------------------------------------------------------------------------------- it steers
# A demo world small enough for a few CPU minutes; the tiny model learns it from scratch (its own 1k-token BPE).
# 1,200 conversations hold out 60 (30 plain answers: the verbosity prompts); 500 pairs hold out 50 (+6 roleplay).
SMALL_WORLD = dict(n_entities=30, n_rag_entities=5, n_mc_test=20, n_ifeval=10, n_rag=6, n_rag_train=6, n_bfcl=3,
                   n_sft=1200, n_errands=10, n_preference=500, n_roleplay_eval=4, n_roleplay_pairs=60, corpus_repeats=1)
STEER_STEPS = 500


def passes(table: dict) -> tuple[bool, bool]:
    """The acceptance check: (verbosity 0 vs 4 changes the mean length >= 2x, helpfulness 0 vs 4 raises the
    pairwise RM's mean score by more than two standard errors of the paired difference)."""
    return table["verbosity"]["length_ratio"] >= 2.0, table["helpfulness"]["rm_diff_in_se"] > 2.0


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A small demo world and a random tiny Llama with a BPE trained on its text."""
    from conftest import make_tiny_model_dir
    from minitron.tokenizer import train_bpe
    from minitron.world import WorldConfig, WorldFiles, ensure_world

    root = tmp_path_factory.mktemp("steer_demo")
    world = ensure_world(WorldConfig(out=str(root / "world"), **SMALL_WORLD))
    texts = [json.loads(line)["text"] for line in (world / "corpus" / "train.jsonl").open()][:300]
    texts += [m["content"] for line in (world / "sft" / "train.jsonl").open()
              for m in json.loads(line)["messages"] if isinstance(m.get("content"), str)]
    model = make_tiny_model_dir(root / "tiny", train_bpe(texts, vocab_size=1024), max_position_embeddings=512)
    return model, WorldFiles(world).align_data(), root


def _steer(model, data, out, conditioned: bool) -> dict:
    cfg = AlignConfig(model=str(model), out=str(out), stages=["rm", "steer_rm", "steer_sft"], eval_rows=64,
                      max_length=192, **data, rm=RMArgs(steps=150, batch_size=16, lr=2e-3, logging_steps=25),
                      steer_rm=SteerRMArgs(steps=60, batch_size=16, lr=2e-3, logging_steps=20),
                      steer_sft=SteerSFTArgs(steps=STEER_STEPS, batch_size=16, lr=3e-3, variants=True,
                                             conditioned=conditioned, eval_prompts=48, max_new_tokens=64,
                                             logging_steps=50, save_steps=STEER_STEPS))
    run(cfg)
    return stage_metrics(out, "steer_sft")


def test_it_steers_on_the_demo_world_and_the_unconditioned_control_does_not(demo):
    model, data, root = demo
    steered = _steer(model, data, root / "steered", conditioned=True)
    print(json.dumps(steered["steering"], indent=1))
    assert stage_metrics(root / "steered", "rm")["accuracy"] > 0.75  # the judge of helpfulness learned the pairs
    assert steered["steering"]["verbosity"]["n"] >= 25 and steered["steering"]["helpfulness"]["n"] >= 45
    assert passes(steered["steering"]) == (True, True), steered["steering"]
    short = steered["verbosity_short_preference"]  # verbosity 0 makes a short reply likelier than 4 does
    assert short["n"] >= 20 and short["gap"] > 2 * short["gap_se"], short
    helpful = steered["helpfulness_preference"]  # helpfulness 0 makes the rejected answer likelier than 4 does
    assert helpful["n"] >= 45 and helpful["gap"] > 2 * helpful["gap_se"], helpful
    # the control: the same replies, labels and steps without the attribute line (rm and steer_rm reused)
    for stage in ("rm", "steer_rm"):
        shutil.copytree(root / "steered" / stage, root / "control" / stage)
    control = _steer(model, data, root / "control", conditioned=False)
    print(json.dumps(control["steering"], indent=1))
    assert passes(control["steering"]) == (False, False), control["steering"]
    assert control["verbosity_short_preference"]["gap"] < short["gap"] - 2 * short["gap_se"]  # never taught the line
    assert control["helpfulness_preference"]["gap"] < helpful["gap"] - 2 * helpful["gap_se"]


# ----------------------------------------------------------------------------------------------- steering at inference
def test_chat_attributes_command_sets_the_system_line():
    from evals.chat import set_attributes
    from minitron.config import ConfigError

    assert set_attributes(None, "verbosity=0") == "Attributes: verbosity=0. Answer in one short sentence."
    assert set_attributes("You are Sir Bram.", "verbosity=4 helpfulness=4") == \
        ("Attributes: helpfulness=4 verbosity=4. Give the most helpful answer you can. "
         "Answer in detail, in several sentences.\nYou are Sir Bram.")
    worded = "Attributes: verbosity=0. Answer in one short sentence.\nYou are Sir Bram."
    assert set_attributes(worded, "off") == "You are Sir Bram."
    with pytest.raises(ConfigError, match="0..4"):
        set_attributes(None, "verbosity=9")


def test_the_eval_harness_asks_every_chat_prompt_for_the_attributes(tiny_model_dir, tmp_path):
    from evals.harness import EvalConfig, make_generator
    from minitron.config import ConfigError

    with pytest.raises(ConfigError, match="--attributes"):
        EvalConfig(model=[str(tiny_model_dir)], attributes="verbosity=high")
    gen = make_generator(EvalConfig(model=[str(tiny_model_dir)], attributes="verbosity=0"), str(tiny_model_dir),
                         tmp_path)
    seen: list[str] = []
    gen.complete = lambda prompts, *a, **k: seen.extend(prompts) or [""] * len(prompts)
    gen.chat([{"messages": [{"role": "user", "content": "hi"}]}, [{"role": "user", "content": "yo"}]], 2)
    line = "<|im_start|>system\nAttributes: verbosity=0. Answer in one short sentence.<|im_end|>"
    assert len(seen) == 2 and all(line in p for p in seen), seen
