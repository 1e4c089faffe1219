"""Activation importance: hand-checked head/neuron/channel statistics, determinism, aggregation options, and the
layer-by-layer driver giving the same scores as the whole-model one (incl. dropped-layer loss and MC blocks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import TINY_TEXT, make_tiny_model_dir
from minitron.config import ConfigError
from minitron.importance import ImportanceConfig, compute_scores, load_scores, run


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("imp")
    (d / "calib.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TINY_TEXT))
    rows = [{"question": f"What does {n} like?", "choices": ["red", "fox", "bread", "Oslo"], "answer": i % 4,
             "subject": "world"} for i, n in enumerate(["Zorvath", "Mirel", "Quen", "Atha", "Borin"])]
    (d / "mc.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return d / "calib.jsonl", d / "mc.jsonl"


def icfg(model: Path, calib: Path, **kw) -> ImportanceConfig:
    return ImportanceConfig(model=str(model), calib=str(calib), calib_samples=6, calib_seq_len=24, batch_size=4, **kw)


def test_scores_match_a_hand_computation(tiny_model_dir, data):
    """Heads: |o_proj input| per head, neurons: down_proj input, channels: norm outputs; mean over seq, L2 over batch."""
    from minitron.data import calibration_batch

    cfg = icfg(tiny_model_dir, data[0], layer_metrics=["block_importance"], mode="whole")
    scores, _ = compute_scores(cfg)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = calibration_batch(cfg.calib, AutoTokenizer.from_pretrained(tiny_model_dir), 6, 24, seed=0)
    seen = {}
    layer = model.model.layers[2]
    layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("o", a[0]))
    layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("d", a[0]))
    layer.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    layer.register_forward_hook(lambda m, a, out: seen.__setitem__("y", out))
    with torch.no_grad():
        model.model(input_ids=ids)
    heads = seen["o"].view(6, 24, 4, 16).norm(dim=-1).mean(1)  # [B, heads]
    torch.testing.assert_close(scores["heads"][2], heads.square().sum(0).sqrt(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores["neurons"][2], seen["d"].abs().mean(1).square().sum(0).sqrt(), rtol=1e-5, atol=1e-6)
    bi = 1 - torch.nn.functional.cosine_similarity(seen["x"], seen["y"], dim=-1).mean()
    assert scores["layer.block_importance"][2].item() == pytest.approx(bi.item(), rel=1e-5)
    assert scores["hidden"].shape == (64,) and (scores["hidden"] > 0).all()


def test_deterministic_for_a_seed(tiny_model_dir, data):
    a, _ = compute_scores(icfg(tiny_model_dir, data[0], seed=3))
    b, _ = compute_scores(icfg(tiny_model_dir, data[0], seed=3))
    c, _ = compute_scores(icfg(tiny_model_dir, data[0], seed=4))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert not torch.equal(a["neurons"], c["neurons"])


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_layer_by_layer_equals_whole_model(tmp_path, tiny_tokenizer, data, arch):
    src = make_tiny_model_dir(tmp_path / arch, tiny_tokenizer, arch=arch, tie_word_embeddings=arch == "qwen3")
    kw = dict(layer_metrics=["block_importance", "lm_loss", "mc_block"], mc_data=str(data[1]), mc_block=2)
    whole, meta_w = compute_scores(icfg(src, data[0], mode="whole", **kw))
    layers, meta_l = compute_scores(icfg(src, data[0], mode="layers", **kw))
    assert set(whole) == set(layers) == {"heads", "neurons", "hidden", "layer.block_importance", "layer.lm_loss",
                                         "layer.mc_block"}
    for k in whole:
        torch.testing.assert_close(layers[k], whole[k], rtol=1e-5, atol=1e-6)
    assert meta_l["base_loss"] == pytest.approx(meta_w["base_loss"], rel=1e-6)
    assert meta_l["mc_base_acc"] == meta_w["mc_base_acc"]
    assert whole["layer.mc_block"].shape == (3,)  # block starts 0, 1, 2 of 4 layers
    assert (whole["layer.lm_loss"] != meta_w["base_loss"]).all()  # dropping a layer changes the loss


def test_aggregations_differ(tiny_model_dir, data):
    base, _ = compute_scores(icfg(tiny_model_dir, data[0], layer_metrics=["block_importance"]))
    for seq_agg, batch_agg in (("l2", "l2"), ("var", "mean"), ("mean", "var")):
        s, meta = compute_scores(icfg(tiny_model_dir, data[0], seq_agg=seq_agg, batch_agg=batch_agg))
        assert meta["seq_agg"] == seq_agg and s["neurons"].shape == base["neurons"].shape
        assert not torch.allclose(s["neurons"], base["neurons"])


def test_run_saves_scores_and_heatmap(tiny_model_dir, data, tmp_path):
    out = run(icfg(tiny_model_dir, data[0], out=str(tmp_path / "imp")))
    assert {p.name for p in out.iterdir()} == {"importance.safetensors", "importance.json", "importance.png"}
    scores, meta = load_scores(out)
    assert scores["heads"].shape == (4, 4) and scores["neurons"].shape == (4, 128)
    assert meta["layout"]["hidden_size"] == 64 and "base_loss" in meta
    assert len(json.loads((out / "importance.json").read_text())["layers"]["lm_loss"]) == 4


def test_bad_config_is_rejected(tiny_model_dir):
    with pytest.raises(ConfigError, match="mc_block needs --mc-data"):
        ImportanceConfig(model=str(tiny_model_dir), calib="x", layer_metrics=["mc_block"])
    with pytest.raises(ConfigError, match="seq_agg"):
        ImportanceConfig(model=str(tiny_model_dir), calib="x", seq_agg="max")
    with pytest.raises(ConfigError, match="--calib"):
        compute_scores(ImportanceConfig(model=str(tiny_model_dir)))
