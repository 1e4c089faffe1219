"""``minitron run``: a tiny recipe end to end, skip-on-rerun, progressive rounds, and the real recipe's dry run."""

import json
from pathlib import Path

import pytest
import yaml

from minitron.config import ConfigError, load_config
from minitron.pipeline.recipe import PipelineConfig, run

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "world": {"n_entities": 30, "n_rag_entities": 8, "corpus_repeats": 2, "n_mc_test": 40, "n_ifeval": 14, "n_rag": 9,
              "n_bfcl": 4, "n_sft": 40, "n_preference": 30, "n_roleplay_eval": 4},
    "teacher": {"vocab_size": 400, "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 4,
                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "seq_len": 64, "batch_size": 4,
                "tokens": 3072, "eval_items": 8},
    "prune": {"calib_samples": 8, "calib_seq_len": 64},
    "students": {"width": {"hidden_size": 32, "intermediate_size": 64}, "depth": {"num_hidden_layers": 2}},
    "distill": {"tokens": 1024, "seq_len": 64, "batch_size": 4, "micro_batch_size": 4, "val_tokens": 512},
    "scratch": {"lr": 1.0e-3},
    "rounds": [{"teacher_from": "width", "students": {"width": {"hidden_size": 16, "intermediate_size": 32}}}],
    "stages": ["world", "teacher", "prune", "distill", "scratch", "report"],
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    recipe = root / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({"out": str(root / "run"), **TINY}))
    cfg = load_config(PipelineConfig, recipe)
    return cfg, run(cfg)


def test_every_stage_writes_a_loadable_model(tiny_run):
    from transformers import AutoModelForCausalLM

    cfg, report = tiny_run
    root = Path(cfg.out)
    for d in ["teacher", "pruned/width", "pruned/depth", "distilled/width", "distilled/depth", "scratch/width",
              "round2/pruned-width", "round2/distilled-width"]:
        model = AutoModelForCausalLM.from_pretrained(root / d)
        assert model.num_parameters() > 0, d
    assert AutoModelForCausalLM.from_pretrained(root / "pruned/depth").config.num_hidden_layers == 2
    assert AutoModelForCausalLM.from_pretrained(root / "round2/distilled-width").config.hidden_size == 16
    summary = json.loads((root / "report.json").read_text())["models"]
    assert {"teacher", "width pruned", "width distilled", "width scratch", "depth distilled",
            "r2-width distilled"} <= set(summary)
    assert summary["width pruned"]["params"] < summary["teacher"]["params"]
    text = report.read_text()
    assert "| teacher |" in text and (root / "report.png").stat().st_size > 1000


def test_rerun_skips_finished_stages(tiny_run):
    cfg, _ = tiny_run
    root = Path(cfg.out)
    stamp = (root / "distilled/width/model.safetensors").stat().st_mtime
    run(cfg)
    assert (root / "distilled/width/model.safetensors").stat().st_mtime == stamp


def test_mix_finetune_named_evals_and_report_columns(tiny_run, tmp_path):
    """A recipe in the shape of the SmolLM2 one, on the tiny run's teacher and world: text + chat mix,
    KD vs LM fine-tuning at equal tokens, a named eval run on chosen models, and the report's LM columns."""
    cfg0, _ = tiny_run
    world = Path(cfg0.out) / "world"
    wiki = tmp_path / "wikitext_test.jsonl"
    wiki.write_text("".join(json.dumps({"text": f" = Heading {i} = \n"}) + "\n" + json.dumps({"text": t + "\n"}) + "\n"
                            for i, t in enumerate(json.loads(l)["text"] for l in
                                                  (world / "corpus" / "validation.jsonl").read_text().splitlines())))
    out = tmp_path / "real"
    recipe = {"out": str(out), "teacher_model": str(Path(cfg0.out) / "teacher"), "data": str(world / "corpus"),
              "stages": ["teacher", "mix", "prune", "distill", "finetune", "eval", "report"],
              "mix": {"chat": [str(world / "sft" / "train.jsonl")], "chat_share": 0.3, "chars": 20000,
                      "val_chars": 4000, "chat_val_rows": 6},
              "prune": TINY["prune"], "students": {"width": TINY["students"]["width"]},
              "distill": TINY["distill"], "finetune": {"students": ["width"], "lr": 1.0e-3},
              "evals": {"mc": {"suite": "mmlu", "mmlu_data": str(world / "mmlu"), "limit": 2,
                               "models": ["teacher", "width distilled"]}},
              "report": {"wikitext": str(wiki), "text_val": str(world / "corpus"),
                         "chat_val": str(out / "mix" / "chat_validation.jsonl"), "seq_len": 64, "tokens": 512}}
    f = tmp_path / "real.yaml"
    f.write_text(yaml.safe_dump(recipe))
    run(load_config(PipelineConfig, f))
    chat = [json.loads(l) for l in (out / "mix" / "train.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in chat} == {"text", "chat"}
    fin = json.loads((out / "finetuned" / "width" / "metrics.json").read_text())
    kd = json.loads((out / "distilled" / "width" / "metrics.json").read_text())
    assert fin["tokens"] == kd["tokens"]  # the baseline sees the same token budget
    evaluated = [m["name"] for m in json.loads((out / "eval" / "mc" / "results.json").read_text())["models"]]
    assert evaluated == ["teacher", "width distilled"]
    rows = json.loads((out / "report.json").read_text())["models"]
    assert rows["teacher"]["chat_kl_to_teacher"] == pytest.approx(0.0, abs=1e-4)
    assert rows["width distilled"]["chat_kl_to_teacher"] > 0.0
    assert rows["width distilled"]["wikitext2_ppl"] > 1.0 and rows["width finetuned"]["text_val_loss"] > 0
    assert "MMLU letter" in rows["width distilled"] and "MMLU letter" not in rows["width pruned"]
    assert rows["width pruned"]["non_embedding_params"] < rows["teacher"]["non_embedding_params"]
    kept = json.loads((out / "report.json").read_text())["retention"]["width distilled"]
    assert kept["wikitext2_ppl"] == pytest.approx(rows["teacher"]["wikitext2_ppl"] / rows["width distilled"]["wikitext2_ppl"])
    assert "Retention of the teacher" in (out / "report.md").read_text()


def test_real_recipe_dry_run_offline():
    cfg = load_config(PipelineConfig, ROOT / "configs" / "llama31-minitron-4b.yaml", overrides={"dry_run": True})
    findings = run(cfg)
    width, depth = findings["students"]["width"], findings["students"]["depth"]
    assert (width["hidden_size"], width["intermediate_size"], width["num_attention_heads"]) == (3072, 9216, 32)
    assert depth["num_hidden_layers"] == 16 and depth["hidden_size"] == 4096
    assert 4.0e9 < width["params"] < 5.0e9 and 4.0e9 < depth["params"] < 5.0e9  # the paper: 4.5B
    assert 7.5e9 < findings["teacher"]["params"] < 8.5e9


def test_dry_run_catches_an_impossible_target(tmp_path):
    from minitron.prune import PruneTargetError

    raw = yaml.safe_load((ROOT / "configs" / "llama31-minitron-4b.yaml").read_text())
    raw["students"]["width"] = {"num_attention_heads": 30}
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(raw))
    with pytest.raises(PruneTargetError, match="GQA"):
        run(load_config(PipelineConfig, f, overrides={"dry_run": True}))


def test_unknown_stage_is_an_error():
    with pytest.raises(ConfigError, match="unknown stage 'prun'"):
        PipelineConfig(stages=["prun"])


def test_shipped_recipes_parse():
    for name in ["demo.yaml", "demo-progressive.yaml", "llama31-minitron-4b.yaml"]:
        load_config(PipelineConfig, ROOT / "configs" / name)
